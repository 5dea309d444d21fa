//! The milter front end spoken to through the milter protocol
//! (indymilter-test acting as the MTA).

mod common;

use common::daemon::Mxguard;
use indymilter_test::{Actions, MacroStage, ProtoOpts, Status, TestConnection, any};
use std::{net::SocketAddr, time::Duration};

async fn open(d: &Mxguard) -> TestConnection {
    TestConnection::configure()
        .read_timeout(Duration::from_secs(5))
        .open_tcp(d.milter_addr())
        .await
        .unwrap_or_else(|e| panic!("open milter connection: {e}"))
}

fn client(ip: &str) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap_or_else(|e| panic!("{ip}: {e}")), 40000)
}

fn rejected_with(status: &Status) -> String {
    match status {
        Status::Reject { message: Some(m) } | Status::Tempfail { message: Some(m) } => {
            m.to_string_lossy().into_owned()
        }
        other => panic!("expected a refusal with a message, got {other:?}"),
    }
}

#[tokio::test]
async fn negotiates_actions_and_macros() {
    let d = Mxguard::start("").await;
    let conn = open(&d).await;
    let actions = conn.negotiated_actions();
    for a in [
        Actions::ADD_HEADER,
        Actions::CHANGE_HEADER,
        Actions::CHANGE_SENDER,
        Actions::ADD_RCPT,
        Actions::ADD_RCPT_EXT,
        Actions::DELETE_RCPT,
    ] {
        assert!(actions.contains(a), "{a:?} not negotiated: {actions:?}");
    }
    let opts = conn.negotiated_opts();
    assert!(opts.contains(ProtoOpts::LEADING_SPACE));
    // Stages that never refuse are not answered, saving a round trip per
    // header line and body chunk.
    for o in [
        ProtoOpts::NOREPLY_HELO,
        ProtoOpts::NOREPLY_MAIL,
        ProtoOpts::NOREPLY_DATA,
        ProtoOpts::NOREPLY_HEADER,
        ProtoOpts::NOREPLY_EOH,
        ProtoOpts::NOREPLY_BODY,
    ] {
        assert!(opts.contains(o), "{o:?} not negotiated: {opts:?}");
    }
    assert!(!opts.contains(ProtoOpts::NOREPLY_CONNECT) && !opts.contains(ProtoOpts::NOREPLY_RCPT));
    let macros = conn.requested_macros();
    let connect = macros
        .get(&MacroStage::Connect)
        .map(|m| m.to_string_lossy().into_owned())
        .unwrap_or_default();
    assert!(
        connect.contains("{client_addr}") && connect.contains("{client_ptr}"),
        "{connect}"
    );
    let mail = macros
        .get(&MacroStage::Mail)
        .map(|m| m.to_string_lossy().into_owned())
        .unwrap_or_default();
    assert!(
        mail.contains('i') && mail.contains("{auth_authen}"),
        "{mail}"
    );
    assert!(macros.contains_key(&MacroStage::Eom));
}

#[tokio::test]
async fn refuses_an_mta_that_cannot_rewrite_recipients() {
    let d = Mxguard::start("").await;
    let result = TestConnection::configure()
        .read_timeout(Duration::from_secs(5))
        .available_actions(Actions::ADD_HEADER | Actions::CHANGE_HEADER)
        .open_tcp(d.milter_addr())
        .await;
    assert!(
        result.is_err(),
        "negotiation must fail without the recipient actions"
    );
}

/// Connect to RCPT through the callbacks; returns the replies of the stages
/// that can refuse (connect and each RCPT).
async fn message(conn: &mut TestConnection, ip: &str, rcpts: &[&str]) -> Vec<Status> {
    let mut statuses = Vec::new();
    conn.macros(
        MacroStage::Connect,
        [
            ("j", "mx.mxguard.test"),
            ("{client_ptr}", "mail.example.com"),
        ],
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    statuses.push(
        conn.connect("mail.example.com", client(ip))
            .await
            .unwrap_or_else(|e| panic!("{e}")),
    );
    // HELO and MAIL never refuse, so Postfix is told not to wait for them.
    assert_eq!(
        conn.helo("mail.example.com")
            .await
            .unwrap_or_else(|e| panic!("{e}")),
        Status::Noreply
    );
    assert_eq!(
        conn.mail(["<bob@example.com>"])
            .await
            .unwrap_or_else(|e| panic!("{e}")),
        Status::Noreply
    );
    for r in rcpts {
        statuses.push(
            conn.rcpt([format!("<{r}>")])
                .await
                .unwrap_or_else(|e| panic!("{e}")),
        );
    }
    statuses
}

#[tokio::test]
async fn accepted_messages_get_the_trace_header() {
    let d = Mxguard::start("").await;
    let mut conn = open(&d).await;
    let statuses = message(&mut conn, "198.51.100.1", &["alice@example.org"]).await;
    assert!(
        statuses.iter().all(|s| *s == Status::Continue),
        "{statuses:?}"
    );
    conn.macros(MacroStage::Data, [("i", "4XyZ1AbC")])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        conn.data().await.unwrap_or_else(|e| panic!("{e}")),
        Status::Noreply
    );
    let quiet = [
        conn.header("From", " bob@example.com").await,
        conn.header("Subject", " hello").await,
        conn.eoh().await,
        conn.body("Hi.\r\n").await,
    ];
    for s in quiet {
        assert_eq!(s.unwrap_or_else(|e| panic!("{e}")), Status::Noreply);
    }
    let (actions, status) = conn.eom().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status, Status::Accept);
    let expected = format!(" mx.mxguard.test {}", mxguard::VERSION);
    assert!(
        actions.has_insert_header(0, "X-Mxguard", expected.as_str()),
        "{actions:?}"
    );
    assert_eq!(
        d.metric(r#"mxguard_requests_total{frontend="milter",verdict="accept"}"#)
            .await,
        1.0
    );
    assert_eq!(
        d.metric(r#"mxguard_sessions_in_flight{frontend="milter"}"#)
            .await,
        1.0
    );
    conn.close().await.unwrap_or_else(|e| panic!("{e}"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        d.metric(r#"mxguard_sessions_in_flight{frontend="milter"}"#)
            .await,
        0.0
    );
}

#[tokio::test]
async fn the_trace_header_can_be_turned_off() {
    let d = Mxguard::start("milter: { trace_header: false }").await;
    let mut conn = open(&d).await;
    message(&mut conn, "198.51.100.1", &["alice@example.org"]).await;
    conn.data().await.unwrap_or_else(|e| panic!("{e}"));
    conn.header("From", " bob@example.com")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    conn.eoh().await.unwrap_or_else(|e| panic!("{e}"));
    let (actions, status) = conn.eom().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status, Status::Accept);
    assert!(
        !actions.has_insert_header(any(), "X-Mxguard", any()),
        "{actions:?}"
    );
}

#[tokio::test]
async fn milter_only_sites_get_the_envelope_checks_at_rcpt() {
    let d = Mxguard::start("policy: { listen: null, reject_clients: [192.0.2.0/24] }").await;
    let mut conn = open(&d).await;
    let statuses = message(&mut conn, "192.0.2.10", &["alice@example.org"]).await;
    let last = statuses.last().cloned().unwrap_or(Status::Continue);
    assert_eq!(
        rejected_with(&last),
        "554 5.7.1 Your client address 192.0.2.10 is refused by this server's policy; \
         if you think this is a mistake, reach the recipient's postmaster another way"
    );
    assert_eq!(
        d.metric(r#"mxguard_requests_total{frontend="milter",verdict="reject"}"#)
            .await,
        1.0
    );
}

#[tokio::test]
async fn with_the_policy_service_on_the_milter_leaves_envelope_checks_to_it() {
    let d = Mxguard::start("policy: { reject_clients: [192.0.2.0/24] }").await;
    let mut conn = open(&d).await;
    let statuses = message(&mut conn, "192.0.2.10", &["alice@example.org"]).await;
    assert!(
        statuses.iter().all(|s| *s == Status::Continue),
        "{statuses:?}"
    );
}

#[tokio::test]
async fn a_new_message_on_the_same_connection_starts_clean() {
    let d = Mxguard::start("").await;
    let mut conn = open(&d).await;
    message(&mut conn, "198.51.100.1", &["a@example.org"]).await;
    conn.abort().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        conn.mail(["<>"]).await.unwrap_or_else(|e| panic!("{e}")),
        Status::Noreply
    );
    assert_eq!(
        conn.rcpt(["<b@example.org>"])
            .await
            .unwrap_or_else(|e| panic!("{e}")),
        Status::Continue
    );
    conn.data().await.unwrap_or_else(|e| panic!("{e}"));
    conn.header("From", " bob@example.com")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    conn.eoh().await.unwrap_or_else(|e| panic!("{e}"));
    let (_, status) = conn.eom().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status, Status::Accept);
}

#[tokio::test]
async fn stop_lets_a_message_in_flight_finish() {
    let d = Mxguard::start("").await;
    let addr = d.milter_addr();
    let mut conn = open(&d).await;
    message(&mut conn, "198.51.100.1", &["a@example.org"]).await;
    conn.data().await.unwrap_or_else(|e| panic!("{e}"));
    let stopping = tokio::spawn(d.stop());
    tokio::time::sleep(Duration::from_millis(300)).await;
    // No new connections once stopping...
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the milter socket must be closed"
    );
    // ...but the message in flight completes.
    conn.header("From", " bob@example.com")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    conn.header("Subject", " late")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    conn.eoh().await.unwrap_or_else(|e| panic!("{e}"));
    let (actions, status) = conn.eom().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status, Status::Accept);
    assert!(actions.has_insert_header(0, "X-Mxguard", any()));
    let result = stopping.await.unwrap_or_else(|e| panic!("{e}"));
    assert!(result.is_ok(), "{result:?}");
}

#[tokio::test]
async fn unix_socket_milter() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = dir.path().join("milter.sock");
    let d = Mxguard::start(&format!(
        "milter: {{ listen: \"unix:{}\" }}",
        path.display()
    ))
    .await;
    let mut conn = TestConnection::configure()
        .read_timeout(Duration::from_secs(5))
        .open_unix(&path)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    message(&mut conn, "198.51.100.1", &["a@example.org"]).await;
    conn.data().await.unwrap_or_else(|e| panic!("{e}"));
    conn.header("From", " bob@example.com")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    conn.eoh().await.unwrap_or_else(|e| panic!("{e}"));
    let (actions, status) = conn.eom().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status, Status::Accept);
    assert!(actions.has_insert_header(0, "X-Mxguard", any()));
    drop(d);
}

#[tokio::test]
async fn concurrent_connections_past_the_limit_get_421_at_connect() {
    let d = Mxguard::start(
        "ratelimit: { concurrent_connections: 2 }\nallowlist: { entries: [192.0.2.0/24] }",
    )
    .await;
    let mut first = open(&d).await;
    let mut second = open(&d).await;
    let mut third = open(&d).await;
    let ip = client("198.51.100.1");
    assert_eq!(
        first
            .connect("a.example", ip)
            .await
            .unwrap_or_else(|e| panic!("{e}")),
        Status::Continue
    );
    assert_eq!(
        second
            .connect("a.example", ip)
            .await
            .unwrap_or_else(|e| panic!("{e}")),
        Status::Continue
    );
    let refused = third
        .connect("a.example", ip)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        rejected_with(&refused),
        "421 4.7.0 Too many concurrent connections from 198.51.100.1; please try again later"
    );
    // Other clients, allowlisted ones and loopback are not affected.
    let mut other = open(&d).await;
    assert_eq!(
        other
            .connect("b.example", client("198.51.100.2"))
            .await
            .unwrap_or_else(|e| panic!("{e}")),
        Status::Continue
    );
    for ip in ["192.0.2.1", "127.0.0.1"] {
        let mut c = open(&d).await;
        let mut c2 = open(&d).await;
        let mut c3 = open(&d).await;
        for conn in [&mut c, &mut c2, &mut c3] {
            assert_eq!(
                conn.connect("x", client(ip))
                    .await
                    .unwrap_or_else(|e| panic!("{e}")),
                Status::Continue,
                "{ip}"
            );
        }
    }
    // A closed connection gives its slot back.
    first.close().await.unwrap_or_else(|e| panic!("{e}"));
    drop(third);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut again = open(&d).await;
    assert_eq!(
        again
            .connect("a.example", ip)
            .await
            .unwrap_or_else(|e| panic!("{e}")),
        Status::Continue
    );
    assert_eq!(
        d.metric(r#"mxguard_check_decisions_total{check="concurrency",mode="enforce",verdict="tempfail"}"#).await,
        1.0
    );
}

/// A whole message on an open connection; the end-of-message status.
async fn whole_message(conn: &mut TestConnection, body_len: usize) -> Status {
    conn.mail(["<bob@example.com>"])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    conn.rcpt(["<alice@example.org>"])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    conn.data().await.unwrap_or_else(|e| panic!("{e}"));
    conn.header("From", " bob@example.com")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    conn.header("Subject", " budget")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    conn.eoh().await.unwrap_or_else(|e| panic!("{e}"));
    conn.body(vec![b'x'; body_len])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    conn.eom().await.unwrap_or_else(|e| panic!("{e}")).1
}

#[tokio::test]
async fn daily_budgets_refuse_at_the_end_of_the_message() {
    let d = Mxguard::start("ratelimit: { daily_messages: 2, daily_bytes: 10KB }").await;
    let mut conn = open(&d).await;
    conn.connect("mx.example.com", client("198.51.100.1"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(whole_message(&mut conn, 100).await, Status::Accept);
    assert_eq!(whole_message(&mut conn, 100).await, Status::Accept);
    assert_eq!(
        rejected_with(&whole_message(&mut conn, 100).await),
        "421 4.7.0 Daily limit reached: more than 2 messages today from example.com; please try again tomorrow"
    );
    // Bytes: a client of its own, one large message.
    let mut big = open(&d).await;
    big.connect("mx.example.net", client("198.51.100.2"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        rejected_with(&whole_message(&mut big, 20_000).await),
        "421 4.7.0 Daily limit reached: more than 10KB today from example.net; please try again tomorrow"
    );
    // Allowlisted clients have budgets of their own (none by default).
    let d = Mxguard::start(
        "ratelimit: { daily_messages: 1 }\nallowlist: { entries: [198.51.100.0/24] }",
    )
    .await;
    let mut conn = open(&d).await;
    conn.connect("mx.example.com", client("198.51.100.1"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for _ in 0..3 {
        assert_eq!(whole_message(&mut conn, 10).await, Status::Accept);
    }
}

/// The content rules through the milter protocol alone.
#[tokio::test]
async fn content_rules_refuse_with_their_codes_at_the_end_of_the_message() {
    let d = Mxguard::start("content: { max_message_size: 1KB }").await;
    let loop_headers: Vec<(&str, &str)> = std::iter::once(("From", " bob@example.com"))
        .chain(std::iter::repeat_n(("Received", " from a by b"), 26))
        .collect();
    let big: &'static str = Box::leak("x".repeat(2000).into_boxed_str());
    for (headers, body, reply) in [
        (
            vec![("Subject", " no from")],
            "Hi.\r\n",
            "550 5.7.1 Your message is not RFC 5322 compliant, please include a valid \"From\" header",
        ),
        (
            vec![("From", " not an address")],
            "Hi.\r\n",
            "550 5.7.1 Your message must contain one valid email address in the \"From\" header",
        ),
        (
            vec![("From", " bob@example.com")],
            "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X\r\n",
            "554 5.7.1 Message detected as spam (it contains the GTUBE test string)",
        ),
        (
            loop_headers.clone(),
            "Hi.\r\n",
            "550 5.4.6 Message was stuck in a redirect loop",
        ),
        (
            vec![
                ("From", " bob@example.com"),
                ("Subject", " You've been HACKED"),
            ],
            "Hi.\r\n",
            "554 5.7.1 Message detected as spam (its subject matches a known extortion or phishing pattern)",
        ),
        (
            vec![("From", " bob@example.com")],
            big,
            "552 5.3.4 Message size exceeds the limit of 1024 bytes",
        ),
    ] {
        let mut conn = open(&d).await;
        message(&mut conn, "198.51.100.1", &["alice@example.org"]).await;
        conn.data().await.unwrap_or_else(|e| panic!("{e}"));
        for (n, v) in &headers {
            conn.header(*n, *v).await.unwrap_or_else(|e| panic!("{e}"));
        }
        conn.eoh().await.unwrap_or_else(|e| panic!("{e}"));
        conn.body(body).await.unwrap_or_else(|e| panic!("{e}"));
        let (_, status) = conn.eom().await.unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(status, Status::Reject { .. }), "{status:?}");
        assert_eq!(rejected_with(&status), reply, "{headers:?}");
    }
}
