//! The rule grammar and resolver: each input line is a TXT record of
//! example.com (regexes included, under the default limits), then a few
//! addresses, one made from the input, are resolved against them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mxguard::{
    aliases::{Aliases, Limits, RuleSet, TxtCache},
    config::Config,
};
use std::sync::{Arc, OnceLock};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(
        || match tokio::runtime::Builder::new_current_thread().build() {
            Ok(rt) => rt,
            Err(e) => panic!("tokio runtime: {e}"),
        },
    )
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let records: Vec<String> = text.lines().map(str::to_owned).collect();
    let _ = RuleSet::from_txt(&records, &Limits::default());
    let aliases = Aliases::new(&Config::default(), None, Arc::new(TxtCache::new(4)))
        .offline("example.com", records.clone());
    let local: String = text
        .chars()
        .filter(|c| !c.is_whitespace() && *c != '@')
        .take(64)
        .collect();
    for address in [
        "info@example.com".to_owned(),
        "a+tag@example.com".to_owned(),
        format!("{local}@example.com"),
    ] {
        let _ = runtime().block_on(aliases.resolve(&address));
    }
});
