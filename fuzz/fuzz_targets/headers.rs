//! Header and address parsing: the input as a header block (From,
//! Received, anything) and body for the content rules, From addresses, the
//! no-bounce rules, and as a DSN (bounce) message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mxguard::{
    checks::content::{check, from_address},
    config::ContentConfig,
    nobounce::{parse_dsn, reason},
};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let headers: Vec<(String, String)> = head
        .split("\r\n")
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.to_owned(), v.to_owned()))
        .collect();
    let _ = check(
        &ContentConfig::default(),
        &headers,
        head.len() as u64,
        data.len() as u64,
        body.as_bytes(),
    );
    for (_, v) in &headers {
        let _ = from_address(v);
    }
    let sender = headers.first().map_or("", |(_, v)| v.as_str());
    let _ = reason(sender, &headers);
    let _ = parse_dsn(data);
});
