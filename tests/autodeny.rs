//! Automatic denylisting: findings recorded through the core function (as
//! the content checks will) make the running daemon refuse the sender, when
//! both share one Redis.

mod common;

use common::{daemon::Mxguard, redis::RedisServer};
use mxguard::{
    checks::autodeny::{self, Finding},
    clock::SystemClock,
    config::{AutoDenyConfig, StoreBackend, StoreConfig},
    envelope::Envelope,
    store::Store,
};
use std::sync::Arc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_found_sending_spam_five_times_is_refused_with_421() {
    let redis = RedisServer::start().unwrap_or_else(|e| panic!("redis: {e}"));
    let d = Mxguard::start(&format!(
        "store: {{ backend: redis, url: \"{}\" }}\nallowlist: {{ entries: [192.0.2.0/24] }}",
        redis.url()
    ))
    .await;
    let store_config = StoreConfig {
        backend: StoreBackend::Redis,
        url: Some(redis.url()),
        ..StoreConfig::default()
    };
    let store = Store::open(&store_config, Arc::new(SystemClock))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let env = Envelope {
        client_addr: "198.51.100.7".parse().ok(),
        sender: Some("spammer@example.net".into()),
        ..Envelope::default()
    };
    let attrs = autodeny::attributes(&env, None);
    for _ in 0..4 {
        autodeny::record(
            &AutoDenyConfig::default(),
            &store,
            &attrs,
            Finding::Spam,
            false,
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    }
    assert_eq!(
        d.ask_rcpt("198.51.100.7", "unknown", "alice@example.org", 0)
            .await,
        "action=DUNNO"
    );
    autodeny::record(
        &AutoDenyConfig::default(),
        &store,
        &attrs,
        Finding::Spam,
        false,
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    // ask_rcpt sends as bob@example.com: the client address is not (yet)
    // denylisted, the sender address is.
    assert_eq!(
        d.ask_rcpt("198.51.100.7", "unknown", "alice@example.org", 0)
            .await,
        "action=DUNNO"
    );
    let answer = d
        .ask_rcpt_from(
            "198.51.100.9",
            "unknown",
            "spammer@example.net",
            "alice@example.org",
            0,
        )
        .await;
    assert_eq!(
        answer,
        "action=421 4.7.1 spammer@example.net is temporarily denylisted here after sending spam; please try again later"
    );
    // Allowlisted clients are not refused for it.
    assert_eq!(
        d.ask_rcpt_from(
            "192.0.2.9",
            "unknown",
            "spammer@example.net",
            "alice@example.org",
            0
        )
        .await,
        "action=DUNNO"
    );
    assert_eq!(
        d.metric(
            r#"mxguard_check_decisions_total{check="autodeny",mode="enforce",verdict="tempfail"}"#
        )
        .await,
        1.0
    );
}
