//! Loading mxguard.yaml: any text gets a configuration or a precise error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mxguard::config::Config;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Config::parse(text, "fuzz.yaml");
    }
});
