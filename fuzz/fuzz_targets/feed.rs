//! Denylist feed files: plain lists and rbldnsd zones.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = mxguard::feeds::parse(&String::from_utf8_lossy(data));
});
