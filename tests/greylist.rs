//! Greylisting through the policy front end and through real Postfix, on
//! the embedded store and on Redis shared by two mxguard instances, with
//! Redis failing and coming back.

mod common;

use common::{
    daemon::Mxguard,
    redis::RedisServer,
    stack::{Stack, Wire},
};
use std::time::Duration;

const FIRST: &str = "action=450 4.7.1 Message was greylisted, try again in 2 seconds";

#[tokio::test]
async fn a_new_client_waits_for_the_delay_then_passes() {
    let d = Mxguard::start("greylist: { enabled: true, delay: 2s }").await;
    assert_eq!(
        d.ask_rcpt("198.51.100.7", "mx1.example.com", "alice@example.org", 0)
            .await,
        FIRST
    );
    // Another host of the same organisation shares the timer.
    let early = d
        .ask_rcpt("198.51.100.8", "mx2.example.com", "alice@example.org", 0)
        .await;
    assert!(
        early.starts_with("action=450 4.7.1 Message was greylisted, try again in "),
        "{early}"
    );
    // A client with no verified name is keyed by its address.
    assert_eq!(
        d.ask_rcpt("203.0.113.9", "unknown", "alice@example.org", 0)
            .await,
        FIRST
    );
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(
        d.ask_rcpt("198.51.100.9", "mx3.example.com", "alice@example.org", 0)
            .await,
        "action=DUNNO"
    );
    assert_eq!(
        d.ask_rcpt("203.0.113.9", "unknown", "alice@example.org", 0)
            .await,
        "action=DUNNO"
    );
    assert_eq!(
        d.metric(
            r#"mxguard_check_decisions_total{check="greylist",mode="enforce",verdict="tempfail"}"#
        )
        .await,
        3.0
    );
    assert_eq!(
        d.metric(
            r#"mxguard_check_decisions_total{check="greylist",mode="enforce",verdict="continue"}"#
        )
        .await,
        2.0
    );
}

#[tokio::test]
async fn report_mode_only_counts_greylisting() {
    let d = Mxguard::start("mode: report\ngreylist: { enabled: true }").await;
    assert_eq!(
        d.ask_rcpt("198.51.100.7", "unknown", "alice@example.org", 0)
            .await,
        "action=DUNNO"
    );
    assert_eq!(
        d.metric(
            r#"mxguard_check_decisions_total{check="greylist",mode="report",verdict="tempfail"}"#
        )
        .await,
        1.0
    );
}

#[tokio::test]
async fn greylist_state_survives_a_restart_of_the_embedded_store() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let yaml = format!(
        "greylist: {{ enabled: true, delay: 1s }}\nstore: {{ path: \"{}/state.db\" }}",
        dir.path().display()
    );
    let d = Mxguard::start(&yaml).await;
    assert!(
        d.ask_rcpt("198.51.100.7", "unknown", "alice@example.org", 0)
            .await
            .starts_with("action=450")
    );
    d.stop().await.unwrap_or_else(|e| panic!("{e}"));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let d = Mxguard::start(&yaml).await;
    assert_eq!(
        d.ask_rcpt("198.51.100.7", "unknown", "alice@example.org", 0)
            .await,
        "action=DUNNO",
        "the first sighting was kept"
    );
}

/// Greylisting on Redis; automatic denylisting, which would meet a failing
/// store first, is off.
fn redis_yaml(redis: &RedisServer, on_error: &str) -> String {
    format!(
        "greylist: {{ enabled: true, delay: 2s }}\ndenylist: {{ auto: {{ enabled: false }} }}\n\
         store: {{ backend: redis, url: \"{}\", timeout: 500ms, on_error: {on_error} }}",
        redis.url()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_state_through_one_redis() {
    let redis = RedisServer::start().unwrap_or_else(|e| panic!("redis: {e}"));
    let a = Mxguard::start(&redis_yaml(&redis, "tempfail")).await;
    let b = Mxguard::start(&redis_yaml(&redis, "tempfail")).await;
    assert_eq!(
        a.ask_rcpt("198.51.100.7", "mx1.example.com", "alice@example.org", 0)
            .await,
        FIRST
    );
    // B has never seen this client, yet knows how long it still has to wait.
    let from_b = b
        .ask_rcpt("198.51.100.8", "mx2.example.com", "alice@example.org", 0)
        .await;
    assert!(
        from_b.starts_with("action=450 4.7.1 Message was greylisted, try again in "),
        "{from_b}"
    );
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(
        b.ask_rcpt("198.51.100.9", "mx3.example.com", "alice@example.org", 0)
            .await,
        "action=DUNNO"
    );
    // Keys hold no readable address or domain.
    let keys = redis
        .command(&["KEYS", "*"])
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(keys.contains("mxguard:greylist:"), "{keys}");
    assert!(
        !keys.contains("example") && !keys.contains("198.51"),
        "{keys}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_going_away_follows_on_error_and_recovers_without_restart() {
    let mut redis = RedisServer::start().unwrap_or_else(|e| panic!("redis: {e}"));
    let strict = Mxguard::start(&redis_yaml(&redis, "tempfail")).await;
    let lenient = Mxguard::start(&redis_yaml(&redis, "continue")).await;
    assert_eq!(
        strict
            .ask_rcpt("198.51.100.7", "unknown", "alice@example.org", 0)
            .await,
        FIRST
    );

    redis.stop();
    let started = std::time::Instant::now();
    assert_eq!(
        strict
            .ask_rcpt("198.51.100.20", "unknown", "alice@example.org", 0)
            .await,
        "action=451 4.3.0 Our state store is unavailable; please try again later"
    );
    assert_eq!(
        lenient
            .ask_rcpt("198.51.100.21", "unknown", "alice@example.org", 0)
            .await,
        "action=DUNNO"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "bounded by store.timeout: {:?}",
        started.elapsed()
    );
    let text = strict.http_get("/metrics").await.1;
    assert!(
        text.contains(r#"mxguard_store_failures_total{action="tempfail""#),
        "{text}"
    );
    let text = lenient.http_get("/metrics").await.1;
    assert!(
        text.contains(r#"mxguard_store_failures_total{action="continue",check="greylist""#),
        "{text}"
    );

    // Back again (empty, as Redis here keeps nothing on disk): greylisting
    // works at once, with no restart of mxguard.
    redis
        .restart()
        .unwrap_or_else(|e| panic!("redis restart: {e}"));
    let mut answer = String::new();
    for _ in 0..10 {
        answer = strict
            .ask_rcpt("198.51.100.22", "unknown", "alice@example.org", 0)
            .await;
        if answer == FIRST {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(answer, FIRST);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_postfix_a_greylisted_sender_gets_450_then_is_delivered() {
    for wire in [Wire::Both, Wire::MilterOnly] {
        let yaml = match wire {
            Wire::Both => "greylist: { enabled: true, delay: 2s }",
            Wire::MilterOnly => "greylist: { enabled: true, delay: 2s }\npolicy: { listen: null }",
        };
        let s = Stack::start(yaml, wire).await;
        let t = s.send("198.51.100.30", &["alice@example.org"]).await;
        assert_eq!(t.rcpts[0].code, 450, "{wire:?}: {}", t.rcpts[0]);
        let expected = match wire {
            Wire::Both => {
                "4.7.1 <alice@example.org>: Recipient address rejected: Message was greylisted, try again in 2 seconds"
            }
            Wire::MilterOnly => "4.7.1 Message was greylisted, try again in 2 seconds",
        };
        assert_eq!(t.rcpts[0].text(), expected, "{wire:?}");
        assert!(t.data.is_none());
        tokio::time::sleep(Duration::from_millis(2100)).await;
        let t = s.send("198.51.100.30", &["alice@example.org"]).await;
        assert_eq!(
            t.data.as_ref().map(|r| r.code),
            Some(250),
            "{wire:?}: {t:?}"
        );
        let got = s.sink.wait_for(1, Duration::from_secs(20)).await;
        assert_eq!(got.len(), 1, "{wire:?}");
    }
}
