//! The policy protocol decoder: arbitrary bytes as request lines, every
//! request completed turned into an envelope, and a reply encoded.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mxguard::{
    policy::protocol::{Decoder, encode},
    verdict::Verdict,
};

fuzz_target!(|data: &[u8]| {
    let mut decoder = Decoder::new(100);
    for line in data.split(|&b| b == b'\n') {
        match decoder.push_line(line) {
            Ok(Some(request)) => {
                let _ = request.stage();
                let _ = request.envelope();
            }
            Ok(None) => {}
            // A protocol error closes the connection: start over.
            Err(_) => decoder = Decoder::new(100),
        }
    }
    let _ = encode(&Verdict::Continue);
});
