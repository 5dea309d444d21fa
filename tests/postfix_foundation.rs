//! End to end through a real Postfix: client → Postfix (policy service and
//! milter wired as in contrib/postfix/main.cf) → sink.

mod common;

use common::{
    daemon::Mxguard,
    postfix::{Postfix, Wiring},
    sink::Sink,
    smtp::{Reply, Transcript},
    stack::{Stack, Wire},
};
use std::time::Duration;

const REFUSED: &str = "Your client address 192.0.2.66 is refused by this server's policy; \
                       if you think this is a mistake, reach the recipient's postmaster another way";

/// The first refusal of a session, wherever it came.
fn first_refusal(t: &Transcript) -> &Reply {
    std::iter::once(&t.mail)
        .chain(&t.rcpts)
        .chain(&t.data)
        .find(|r| r.code >= 400)
        .unwrap_or_else(|| panic!("no refusal: {t:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_is_delivered_with_the_mxguard_header() {
    let s = Stack::start("", Wire::Both).await;
    let t = s.send("198.51.100.20", &["alice@example.org"]).await;
    assert_eq!(t.rcpts[0].code, 250, "{}", t.rcpts[0]);
    let data = t
        .data
        .as_ref()
        .unwrap_or_else(|| panic!("no DATA reply: {t:?}"));
    assert_eq!(data.code, 250, "{data}");

    let delivered = s.sink.wait_for(1, Duration::from_secs(20)).await;
    let m = &delivered[0];
    assert_eq!(m.mail_from, "bob@example.com");
    assert_eq!(m.rcpt_to, ["alice@example.org"]);
    let expected = format!("mx.mxguard.test {}", mxguard::VERSION);
    assert_eq!(m.header("X-Mxguard").as_deref(), Some(expected.as_str()));
    assert_eq!(m.header("Subject").as_deref(), Some("hello"));
    // Postfix asked the policy service at RCPT and ran the milter.
    let d = &s.mxguard;
    assert!(
        d.metric(r#"mxguard_requests_total{frontend="policy",verdict="continue"}"#)
            .await
            >= 1.0
    );
    assert_eq!(
        d.metric(r#"mxguard_requests_total{frontend="milter",verdict="accept"}"#)
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listed_client_is_refused_at_rcpt_through_the_policy_service() {
    let s = Stack::start("policy: { reject_clients: [192.0.2.0/24] }", Wire::Both).await;
    let t = s.send("192.0.2.66", &["alice@example.org"]).await;
    assert_eq!(t.mail.code, 250, "{}", t.mail);
    assert_eq!(t.rcpts[0].code, 554, "{}", t.rcpts[0]);
    assert_eq!(
        t.rcpts[0].text(),
        format!("5.7.1 <alice@example.org>: Recipient address rejected: {REFUSED}")
    );
    assert!(t.data.is_none());
    // A client not on the list, in the same Postfix, still gets through.
    let t = s.send("198.51.100.20", &["alice@example.org"]).await;
    assert_eq!(t.rcpts[0].code, 250, "{}", t.rcpts[0]);
    let delivered = s.sink.wait_for(1, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        s.sink.messages().len(),
        1,
        "only the unlisted client's message arrives: {delivered:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listed_client_is_refused_at_rcpt_by_a_milter_only_setup() {
    let s = Stack::start(
        "policy: { listen: null, reject_clients: [192.0.2.0/24] }",
        Wire::MilterOnly,
    )
    .await;
    let t = s.send("192.0.2.66", &["alice@example.org"]).await;
    assert_eq!(t.rcpts[0].code, 554, "{}", t.rcpts[0]);
    assert_eq!(t.rcpts[0].text(), format!("5.7.1 {REFUSED}"));
    assert!(t.data.is_none());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(s.sink.messages().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_mxguard_means_a_temporary_failure_not_a_silent_accept() {
    let d = Mxguard::start("").await;
    let wiring = Wiring {
        policy: Some(d.policy_wiring()),
        milter: Some(d.milter_wiring()),
    };
    d.stop().await.unwrap_or_else(|e| panic!("stop: {e}"));
    let sink = Sink::start().await.unwrap_or_else(|e| panic!("sink: {e}"));
    let msg = common::smtp::message("bob@example.com", "alice@example.org", "hello", "Hi.\r\n");
    let env = common::smtp::Envelope {
        client_addr: "198.51.100.20",
        client_name: "mail.example.com",
        helo: "mail.example.com",
        from: "bob@example.com",
        to: &["alice@example.org"],
    };

    // The milter alone (milter_default_action = tempfail).
    let pf = Postfix::start(
        sink.addr().port(),
        &Wiring {
            policy: None,
            milter: wiring.milter.clone(),
        },
        &[],
    );
    let t = common::smtp::send(pf.smtpd_addr(), &env, &msg)
        .await
        .unwrap_or_else(|e| panic!("send: {e}"));
    let refusal = first_refusal(&t);
    assert_eq!(refusal.code, 451, "{refusal}");
    assert!(refusal.text().starts_with("4.7.1 "), "{refusal}");
    drop(pf);

    // Both (the policy service's default_action = DEFER_IF_PERMIT).
    let pf = Postfix::start(sink.addr().port(), &wiring, &[]);
    let t = common::smtp::send(pf.smtpd_addr(), &env, &msg)
        .await
        .unwrap_or_else(|e| panic!("send: {e}"));
    let refusal = first_refusal(&t);
    assert!((400..500).contains(&refusal.code), "{refusal}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        sink.messages().is_empty(),
        "nothing may be delivered unchecked"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_policy_input_does_not_harm_postfix_traffic() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = Stack::start("policy: { reject_clients: [192.0.2.0/24] }", Wire::Both).await;
    for junk in [
        format!("x={}\n", "y".repeat(100_000)).into_bytes(),
        b"\xff\xfe\x00\n\n".to_vec(),
    ] {
        let mut c = tokio::net::TcpStream::connect(s.mxguard.policy_addr())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let _ = c.write_all(&junk).await;
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut rest)).await;
    }
    let t = s.send("192.0.2.66", &["alice@example.org"]).await;
    assert_eq!(t.rcpts[0].code, 554, "{}", t.rcpts[0]);
    let t = s.send("198.51.100.20", &["alice@example.org"]).await;
    assert_eq!(t.data.as_ref().map(|r| r.code), Some(250), "{t:?}");
    s.sink.wait_for(1, Duration::from_secs(20)).await;
}
