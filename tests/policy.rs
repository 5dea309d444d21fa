//! The policy front end spoken to directly, as Postfix's policy client does.

mod common;

use common::daemon::Mxguard;
use std::time::Duration;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpStream, UnixStream},
};

/// One RCPT request, each of a transaction (`instance`) of its own.
fn request(client: &str, rcpt: &str) -> String {
    static INSTANCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let instance = INSTANCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!(
        "request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\nclient_address={client}\n\
         client_name=unknown\nreverse_client_name=unknown\nhelo_name=mail.example.com\nsender=bob@example.com\n\
         recipient={rcpt}\nrecipient_count=0\nqueue_id=\ninstance={instance}\nsize=0\n\n"
    )
}

/// Sends a request and reads the answer up to its empty line.
async fn ask<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: &mut BufReader<S>,
    req: &str,
) -> String {
    s.get_mut()
        .write_all(req.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("write: {e}"));
    let mut answer = String::new();
    loop {
        let mut line = String::new();
        let n = tokio::time::timeout(Duration::from_secs(5), s.read_line(&mut line))
            .await
            .unwrap_or_else(|_| panic!("no answer within 5 s; so far {answer:?}"))
            .unwrap_or_else(|e| panic!("read: {e}"));
        if n == 0 {
            panic!("connection closed; so far {answer:?}");
        }
        if line == "\n" {
            return answer;
        }
        answer.push_str(&line);
    }
}

async fn connect(d: &Mxguard) -> BufReader<TcpStream> {
    BufReader::new(
        TcpStream::connect(d.policy_addr())
            .await
            .unwrap_or_else(|e| panic!("connect: {e}")),
    )
}

/// Reads until the peer closes; true if it closed within the time.
async fn closed_by_peer(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

#[tokio::test]
async fn answers_dunno_and_rejects_listed_clients_on_one_connection() {
    let d = Mxguard::start("policy: { reject_clients: [192.0.2.0/24, \"2001:db8::/32\"] }").await;
    let mut s = connect(&d).await;
    assert_eq!(
        ask(&mut s, &request("198.51.100.1", "a@example.org")).await,
        "action=DUNNO\n"
    );
    assert_eq!(
        ask(&mut s, &request("192.0.2.77", "a@example.org")).await,
        "action=REJECT 5.7.1 Your client address 192.0.2.77 is refused by this server's policy; \
         if you think this is a mistake, reach the recipient's postmaster another way\n"
    );
    assert!(
        ask(&mut s, &request("2001:db8::25", "a@example.org"))
            .await
            .starts_with("action=REJECT 5.7.1 ")
    );
    // Many requests on one connection, as Postfix sends them.
    for _ in 0..50 {
        assert_eq!(
            ask(&mut s, &request("203.0.113.5", "a@example.org")).await,
            "action=DUNNO\n"
        );
    }
    assert_eq!(
        d.metric(r#"mxguard_requests_total{frontend="policy",verdict="reject"}"#)
            .await,
        2.0
    );
    assert_eq!(
        d.metric(r#"mxguard_requests_total{frontend="policy",verdict="continue"}"#)
            .await,
        51.0
    );
    assert_eq!(
        d.metric(r#"mxguard_check_decisions_total{check="reject_clients",mode="enforce",verdict="reject"}"#).await,
        2.0
    );
    assert_eq!(
        d.metric(r#"mxguard_sessions_in_flight{frontend="policy"}"#)
            .await,
        1.0
    );
    assert_eq!(
        d.metric(r#"mxguard_decision_seconds_count{frontend="policy"}"#)
            .await,
        53.0
    );
}

#[tokio::test]
async fn report_mode_answers_dunno_but_counts() {
    let d = Mxguard::start("mode: report\npolicy: { reject_clients: [192.0.2.0/24] }").await;
    let mut s = connect(&d).await;
    assert_eq!(
        ask(&mut s, &request("192.0.2.1", "a@example.org")).await,
        "action=DUNNO\n"
    );
    assert_eq!(
        d.metric(r#"mxguard_check_decisions_total{check="reject_clients",mode="report",verdict="reject"}"#).await,
        1.0
    );
}

#[tokio::test]
async fn bad_input_closes_only_that_connection() {
    let d = Mxguard::start("").await;
    let mut good = connect(&d).await;
    assert_eq!(
        ask(&mut good, &request("198.51.100.1", "a@example.org")).await,
        "action=DUNNO\n"
    );

    // An oversized line (the default limit is 4096 bytes).
    let mut s = TcpStream::connect(d.policy_addr())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let long = format!("helo_name={}\n", "x".repeat(10_000));
    let _ = s.write_all(long.as_bytes()).await;
    assert!(
        closed_by_peer(&mut s).await,
        "an oversized line must close the connection"
    );

    // Garbage bytes: no `=`.
    let mut s = TcpStream::connect(d.policy_addr())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let _ = s.write_all(b"\x00\xff\xfe garbage \x01\n").await;
    assert!(
        closed_by_peer(&mut s).await,
        "garbage must close the connection"
    );

    // Too many attributes in one request.
    let mut s = TcpStream::connect(d.policy_addr())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let many: String = (0..200).map(|i| format!("a{i}=1\n")).collect();
    let _ = s.write_all(many.as_bytes()).await;
    assert!(
        closed_by_peer(&mut s).await,
        "too many attributes must close the connection"
    );

    // A request without its terminating empty line, then EOF.
    let mut s = TcpStream::connect(d.policy_addr())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let partial = request("192.0.2.1", "a@example.org");
    let _ = s.write_all(partial.trim_end().as_bytes()).await;
    let _ = s.shutdown().await;
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    assert!(
        rest.is_empty(),
        "a truncated request gets no answer: {rest:?}"
    );

    // The connection opened before, and new ones, are unharmed.
    assert_eq!(
        ask(&mut good, &request("198.51.100.1", "a@example.org")).await,
        "action=DUNNO\n"
    );
    let mut fresh = connect(&d).await;
    assert_eq!(
        ask(&mut fresh, &request("198.51.100.1", "a@example.org")).await,
        "action=DUNNO\n"
    );

    for reason in [
        "line_too_long",
        "malformed_line",
        "too_many_attributes",
        "truncated",
    ] {
        let series =
            format!(r#"mxguard_protocol_errors_total{{frontend="policy",reason="{reason}"}}"#);
        assert_eq!(d.metric(&series).await, 1.0, "{series}");
    }
}

#[tokio::test]
async fn connections_over_the_limit_are_refused_and_counted() {
    let d = Mxguard::start("policy: { max_connections: 2 }").await;
    let mut a = connect(&d).await;
    let mut b = connect(&d).await;
    assert_eq!(
        ask(&mut a, &request("198.51.100.1", "a@example.org")).await,
        "action=DUNNO\n"
    );
    assert_eq!(
        ask(&mut b, &request("198.51.100.1", "a@example.org")).await,
        "action=DUNNO\n"
    );
    let mut c = TcpStream::connect(d.policy_addr())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        closed_by_peer(&mut c).await,
        "the third connection must be closed"
    );
    assert_eq!(
        d.metric(r#"mxguard_connections_refused_total{frontend="policy"}"#)
            .await,
        1.0
    );
    drop(a);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut e = connect(&d).await;
    assert_eq!(
        ask(&mut e, &request("198.51.100.1", "a@example.org")).await,
        "action=DUNNO\n"
    );
}

#[tokio::test]
async fn idle_connections_are_closed() {
    let d = Mxguard::start("policy: { idle_timeout: 300ms }").await;
    let mut s = TcpStream::connect(d.policy_addr())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let started = std::time::Instant::now();
    assert!(closed_by_peer(&mut s).await);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "closed after {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn listens_on_a_unix_socket() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = dir.path().join("sub/policy.sock");
    let d = Mxguard::start(&format!(
        "policy: {{ listen: \"unix:{}\", socket_mode: \"0600\", reject_clients: [192.0.2.1] }}",
        path.display()
    ))
    .await;
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path)
        .unwrap_or_else(|e| panic!("{e}"))
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let mut s = BufReader::new(
        UnixStream::connect(&path)
            .await
            .unwrap_or_else(|e| panic!("{e}")),
    );
    assert!(
        ask(&mut s, &request("192.0.2.1", "a@example.org"))
            .await
            .starts_with("action=REJECT 5.7.1")
    );
    drop(s);
    d.stop().await.unwrap_or_else(|e| panic!("{e}"));
    assert!(!path.exists(), "the socket file is removed on stop");
}

#[tokio::test]
async fn reload_applies_a_good_file_and_keeps_the_running_one_on_a_bad_one() {
    let d = Mxguard::start("").await;
    let mut s = connect(&d).await;
    assert_eq!(
        ask(&mut s, &request("192.0.2.9", "a@example.org")).await,
        "action=DUNNO\n"
    );

    d.reconfigure("policy: { reject_clients: [192.0.2.9] }")
        .await;
    // The same connection sees the new configuration from its next request.
    assert!(
        ask(&mut s, &request("192.0.2.9", "a@example.org"))
            .await
            .starts_with("action=REJECT")
    );
    assert_eq!(
        d.metric(r#"mxguard_config_reloads_total{result="ok"}"#)
            .await,
        1.0
    );

    d.write_config("policy: { reject_clients: [not-an-ip] }\n");
    d.reload().await;
    assert!(
        ask(&mut s, &request("192.0.2.9", "a@example.org"))
            .await
            .starts_with("action=REJECT")
    );
    assert_eq!(
        d.metric(r#"mxguard_config_reloads_total{result="error"}"#)
            .await,
        1.0
    );
}

#[tokio::test]
async fn stop_finishes_the_request_in_flight_then_closes() {
    let d = Mxguard::start("").await;
    let mut idle = TcpStream::connect(d.policy_addr())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut busy = TcpStream::connect(d.policy_addr())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // Half a request in flight when the stop begins.
    let req = request("198.51.100.1", "a@example.org");
    let (first, second) = req.split_at(40);
    busy.write_all(first.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stopping = tokio::spawn(d.stop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    busy.write_all(second.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), busy.read_to_end(&mut answer)).await;
    assert_eq!(
        String::from_utf8_lossy(&answer),
        "action=DUNNO\n\n",
        "the request in flight is answered, then closed"
    );
    assert!(
        closed_by_peer(&mut idle).await,
        "idle connections are closed"
    );
    let result = stopping.await.unwrap_or_else(|e| panic!("{e}"));
    assert!(result.is_ok(), "{result:?}");
}

#[tokio::test]
async fn http_serves_metrics_and_health() {
    let d = Mxguard::start("").await;
    let (status, body) = d.http_get("/healthz").await;
    assert_eq!(
        (status.as_str(), body.as_str()),
        ("HTTP/1.1 200 OK", "ok\n")
    );
    let (status, body) = d.http_get("/metrics").await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    for name in [
        "mxguard_sessions_in_flight",
        "mxguard_build_info",
        "# TYPE mxguard_decision_seconds histogram",
        "# TYPE mxguard_requests_total counter",
    ] {
        assert!(body.contains(name), "{name} missing from /metrics:\n{body}");
    }
    let (status, _) = d.http_get("/nothing").await;
    assert_eq!(status, "HTTP/1.1 404 Not Found");
}

#[tokio::test]
async fn recipients_are_counted_per_transaction() {
    let d = Mxguard::start("ratelimit: { max_recipients: 3 }").await;
    let mut s = connect(&d).await;
    let rcpt = |instance: &str, n: u32| {
        format!(
            "request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address=198.51.100.1\n\
             recipient=r{n}@example.org\nrecipient_count=0\ninstance={instance}\n\n"
        )
    };
    for n in 0..3 {
        assert_eq!(ask(&mut s, &rcpt("A", n)).await, "action=DUNNO\n");
    }
    assert!(
        ask(&mut s, &rcpt("A", 3))
            .await
            .starts_with("action=452 4.5.3 Too many recipients")
    );
    // A refused recipient is not counted, and a new transaction starts at 0.
    assert!(
        ask(&mut s, &rcpt("A", 4))
            .await
            .starts_with("action=452 4.5.3 ")
    );
    assert_eq!(ask(&mut s, &rcpt("B", 0)).await, "action=DUNNO\n");
}
