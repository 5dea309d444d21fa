//! SRS: reversing arbitrary addresses (forged hashes, old timestamps,
//! other forwarders' chains), and forward then reverse of arbitrary senders.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mxguard::srs::Srs;
use std::sync::OnceLock;

fn srs() -> &'static Srs {
    static SRS: OnceLock<Srs> = OnceLock::new();
    SRS.get_or_init(|| {
        match Srs::new(
            vec![b"fuzz-secret".to_vec(), b"old-secret".to_vec()],
            "srs.example.org",
            4,
            21,
            '=',
        ) {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let day = 20_000;
    let _ = srs().reverse_at(&text, day);
    if let Ok(forwarded) = srs().forward_at(&text, day) {
        // What we made, we take back, on the same day and 21 days later.
        assert!(
            srs().reverse_at(&forwarded, day).is_ok(),
            "{forwarded:?} does not reverse"
        );
        assert!(srs().reverse_at(&forwarded, day + 21).is_ok());
        let _ = srs().reverse_at(&forwarded, day + 22);
    }
});
