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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_postfix_denylisted_attributes_and_operator_entries_get_421() {
    use common::stack::{Stack, Wire};
    let redis = RedisServer::start().unwrap_or_else(|e| panic!("redis: {e}"));
    let s = Stack::start(
        &format!(
            "store: {{ backend: redis, url: \"{}\" }}\ndenylist: {{ removal_url: \"https://mx.example.org/unlist\" }}",
            redis.url()
        ),
        Wire::Both,
    )
    .await;
    // Automatic: the client's verified name (mail.example.com, as the
    // harness poses) was found sending spam ten times.
    let store_config = StoreConfig {
        backend: StoreBackend::Redis,
        url: Some(redis.url()),
        ..StoreConfig::default()
    };
    let store = Store::open(&store_config, Arc::new(SystemClock))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let attrs = vec!["mail.example.com".to_owned()];
    for _ in 0..10 {
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
    let t = s.send("198.51.100.80", &["alice@example.org"]).await;
    assert_eq!(t.rcpts[0].code, 421, "{t:?}");
    assert!(
        t.rcpts[0].text().ends_with("mail.example.com is temporarily denylisted here after sending spam; please try again later"),
        "{t:?}"
    );

    // The operator's list, through the admin request `mxguard deny add` makes.
    let s = Stack::start(
        "denylist: { removal_url: \"https://mx.example.org/unlist\" }",
        Wire::Both,
    )
    .await;
    // As `mxguard deny add` sends it.
    let (status, body) = common::daemon::http_request(
        s.mxguard.http_addr(),
        "POST /lists/deny/add?value=198.51.100.81 HTTP/1.1\r\nHost: 127.0.0.1\r\n\
         X-Mxguard-Operator: 1\r\nContent-Length: 0\r\n",
    )
    .await;
    assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
    let t = s.send("198.51.100.81", &["alice@example.org"]).await;
    assert_eq!(t.rcpts[0].code, 421, "{t:?}");
    assert!(
        t.rcpts[0].text().ends_with(
            "198.51.100.81 is on this server's denylist; to request removal, visit https://mx.example.org/unlist?q=198.51.100.81"
        ),
        "{t:?}"
    );
}
