//! Hostile senders (issue #10, item 4): each attack gets its defined reply,
//! and the daemon answers a normal message afterwards. Through real Postfix
//! where Postfix passes the input on; through the milter protocol
//! (indymilter-test as the MTA) and the policy protocol directly where
//! Postfix would stop it first, since a compromised or buggy MTA, or a
//! milter-only site, is part of the threat model. What Postfix itself
//! answers is recorded next to each case.

mod common;

use common::{
    daemon::Mxguard,
    policy::Policy,
    postfix::{Postfix, Wiring},
    sink::Sink,
    smtp::{self, Envelope},
};
use indymilter_test::{EomAction, EomActions, MacroStage, Status, TestConnection};
use std::{
    ffi::CString,
    net::SocketAddr,
    time::{Duration, Instant},
};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
};

const MILTER_ONLY: &str = "policy: { listen: null }";

fn cs(b: impl Into<Vec<u8>>) -> CString {
    let b: Vec<u8> = b.into();
    // The milter protocol ends every string at a NUL: one inside cannot be
    // sent (indymilter's MTA side makes it U+FFFD), so it ends it here too.
    let cut = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    CString::new(&b[..cut]).unwrap_or_else(|e| panic!("{e}"))
}

async fn open(d: &Mxguard) -> TestConnection {
    TestConnection::configure()
        .read_timeout(Duration::from_secs(30))
        .open_tcp(d.milter_addr())
        .await
        .unwrap_or_else(|e| panic!("open milter connection: {e}"))
}

fn client(ip: &str) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap_or_else(|e| panic!("{ip}: {e}")), 40000)
}

/// `550 5.1.1 text` of a refusal; `accept`, `continue`, … otherwise.
fn reply_of(status: &Status) -> String {
    match status {
        Status::Reject { message: Some(m) } | Status::Tempfail { message: Some(m) } => {
            m.to_string_lossy().into_owned()
        }
        other => format!("{other:?}").to_lowercase(),
    }
}

/// One message through the milter protocol, every input given as bytes.
#[derive(Clone)]
struct Msg {
    ip: &'static str,
    hostname: Vec<u8>,
    connect_macros: Vec<(&'static str, Vec<u8>)>,
    helo: Vec<u8>,
    sender: Vec<u8>,
    mail_macros: Vec<(&'static str, Vec<u8>)>,
    rcpts: Vec<Vec<u8>>,
    headers: Vec<(Vec<u8>, Vec<u8>)>,
    body: Vec<u8>,
}

impl Default for Msg {
    fn default() -> Self {
        Msg {
            ip: "198.51.100.1",
            hostname: b"mail.example.com".to_vec(),
            connect_macros: vec![
                ("j", b"mx.mxguard.test".to_vec()),
                ("{daemon_name}", b"smtpd".to_vec()),
                ("{client_ptr}", b"mail.example.com".to_vec()),
            ],
            helo: b"mail.example.com".to_vec(),
            sender: b"bob@example.com".to_vec(),
            mail_macros: vec![("i", b"4XyZ1AbC".to_vec())],
            rcpts: vec![b"alice@example.org".to_vec()],
            headers: vec![
                (b"From".to_vec(), b" bob@example.com".to_vec()),
                (b"Subject".to_vec(), b" hello".to_vec()),
            ],
            body: b"Hi.\r\n".to_vec(),
        }
    }
}

/// The replies of each RCPT, and of the end of the message if a recipient
/// was accepted (the message is aborted otherwise).
async fn run(conn: &mut TestConnection, m: &Msg) -> (Vec<Status>, Option<(EomActions, Status)>) {
    conn.macros(
        MacroStage::Connect,
        m.connect_macros.iter().map(|(k, v)| (*k, cs(v.clone()))),
    )
    .await
    .unwrap_or_else(|e| panic!("milter: {e}"));
    let connected = conn
        .connect(cs(m.hostname.clone()), client(m.ip))
        .await
        .unwrap_or_else(|e| panic!("milter: {e}"));
    assert_eq!(connected, Status::Continue);
    conn.helo(cs(m.helo.clone()))
        .await
        .unwrap_or_else(|e| panic!("milter: {e}"));
    conn.macros(
        MacroStage::Mail,
        m.mail_macros.iter().map(|(k, v)| (*k, cs(v.clone()))),
    )
    .await
    .unwrap_or_else(|e| panic!("milter: {e}"));
    let mut sender = b"<".to_vec();
    sender.extend_from_slice(&m.sender);
    sender.push(b'>');
    conn.mail([cs(sender)])
        .await
        .unwrap_or_else(|e| panic!("milter: {e}"));
    let mut statuses = Vec::new();
    for r in &m.rcpts {
        let mut arg = b"<".to_vec();
        arg.extend_from_slice(r);
        arg.push(b'>');
        statuses.push(
            conn.rcpt([cs(arg)])
                .await
                .unwrap_or_else(|e| panic!("milter: {e}")),
        );
    }
    if !statuses.contains(&Status::Continue) {
        conn.abort().await.unwrap_or_else(|e| panic!("milter: {e}"));
        return (statuses, None);
    }
    conn.data().await.unwrap_or_else(|e| panic!("milter: {e}"));
    for (n, v) in &m.headers {
        conn.header(cs(n.clone()), cs(v.clone()))
            .await
            .unwrap_or_else(|e| panic!("milter: {e}"));
    }
    conn.eoh().await.unwrap_or_else(|e| panic!("milter: {e}"));
    if !m.body.is_empty() {
        conn.body(m.body.clone())
            .await
            .unwrap_or_else(|e| panic!("milter: {e}"));
    }
    let end = conn.eom().await.unwrap_or_else(|e| panic!("milter: {e}"));
    (statuses, Some(end))
}

/// A normal message on a new connection is accepted.
async fn still_answers(d: &Mxguard) {
    let mut conn = open(d).await;
    let (rcpts, end) = run(&mut conn, &Msg::default()).await;
    assert_eq!(rcpts, [Status::Continue]);
    assert_eq!(end.map(|(_, s)| s), Some(Status::Accept));
}

/// Every header value inserted or changed: no CR or LF but folding (a line
/// end then a space or tab), no NUL, no line over 998 octets, and no header
/// named X-Evil or Bcc; the new envelope sender a single bounded line.
fn assert_clean(actions: &EomActions, what: &str) {
    for a in &actions.actions {
        let (name, value) = match a {
            EomAction::InsertHeader { name, value, .. }
            | EomAction::AddHeader { name, value }
            | EomAction::ChangeHeader { name, value, .. } => (name, value),
            EomAction::ChangeSender { mail, .. } => {
                let m = mail.as_bytes();
                assert!(
                    !m.contains(&b'\r') && !m.contains(&b'\n') && m.len() <= 256,
                    "{what}: new sender {mail:?}"
                );
                continue;
            }
            _ => continue,
        };
        let n = name.to_string_lossy();
        assert!(
            !n.eq_ignore_ascii_case("x-evil") && !n.eq_ignore_ascii_case("bcc"),
            "{what}: {a:?}"
        );
        let v = value.as_bytes();
        for (i, &b) in v.iter().enumerate() {
            let next = v.get(i + 1).copied();
            match b {
                b'\r' => assert_eq!(next, Some(b'\n'), "{what}: bare CR in {n}: {value:?}"),
                b'\n' => assert!(
                    matches!(next, Some(b' ' | b'\t')),
                    "{what}: a line break that is not folding in {n}: {value:?}"
                ),
                _ => {}
            }
        }
        let first = n.len() + 1;
        for (i, line) in v.split(|&b| b == b'\n').enumerate() {
            let len = line.len() + if i == 0 { first } else { 0 };
            assert!(len <= 998, "{what}: a line of {len} octets in {n}");
        }
    }
}

fn has_header(actions: &EomActions, wanted: &str) -> bool {
    actions.actions.iter().any(|a| match a {
        EomAction::InsertHeader { name, .. }
        | EomAction::AddHeader { name, .. }
        | EomAction::ChangeHeader { name, .. } => name.to_string_lossy() == wanted,
        _ => false,
    })
}

/// Peak resident memory of this test process, in KiB (`VmHWM`).
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

// ---------------------------------------------------------------- policy

/// A raw policy connection.
/// An RCPT request with the given attributes replacing the defaults.
fn rcpt_request(over: &[(&str, &[u8])]) -> Vec<u8> {
    let mut attrs: Vec<(&str, Vec<u8>)> = vec![
        ("request", b"smtpd_access_policy".to_vec()),
        ("protocol_state", b"RCPT".to_vec()),
        ("client_address", b"198.51.100.7".to_vec()),
        ("client_name", b"mail.example.com".to_vec()),
        ("helo_name", b"mail.example.com".to_vec()),
        ("sender", b"bob@example.com".to_vec()),
        ("recipient", b"alice@example.org".to_vec()),
        ("recipient_count", b"0".to_vec()),
    ];
    for (k, v) in over {
        match attrs.iter_mut().find(|(n, _)| n == k) {
            Some(slot) => slot.1 = v.to_vec(),
            None => attrs.push((k, v.to_vec())),
        }
    }
    let mut out = Vec::new();
    for (k, v) in attrs {
        out.extend_from_slice(k.as_bytes());
        out.push(b'=');
        out.extend_from_slice(&v);
        out.push(b'\n');
    }
    out.push(b'\n');
    out
}

// ---------------------------------------------------------------- SMTP

/// A pipelining SMTP client for the many-command cases.
struct Pipe {
    r: BufReader<OwnedReadHalf>,
    w: OwnedWriteHalf,
}

impl Pipe {
    /// Connected, EHLO, posing as `ip` through XCLIENT, EHLO again.
    async fn open(addr: SocketAddr, ip: &str) -> Pipe {
        let (r, w) = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .into_split();
        let mut p = Pipe {
            r: BufReader::new(r),
            w,
        };
        assert_eq!(p.reply().await.0, 220);
        let x = format!(
            "EHLO localhost\r\nXCLIENT ADDR={ip} NAME=mail.example.com HELO=mail.example.com\r\n"
        );
        let got = p.batch(&x, 2).await;
        assert_eq!((got[0].0, got[1].0), (250, 220), "{got:?}");
        assert_eq!(p.batch("EHLO mail.example.com\r\n", 1).await[0].0, 250);
        p
    }

    /// One reply: its code and its last line.
    async fn reply(&mut self) -> (u16, String) {
        loop {
            let mut line = Vec::new();
            let n = tokio::time::timeout(
                Duration::from_secs(30),
                (&mut self.r).take(1 << 20).read_until(b'\n', &mut line),
            )
            .await
            .unwrap_or_else(|_| panic!("no SMTP reply within 30 s"))
            .unwrap_or_else(|e| panic!("{e}"));
            if n == 0 {
                return (0, "connection closed".into());
            }
            let text = String::from_utf8_lossy(&line).trim_end().to_owned();
            let code = text.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
            if text.as_bytes().get(3) != Some(&b'-') {
                return (code, text.get(4..).unwrap_or("").to_owned());
            }
        }
    }

    /// Writes `commands` at once and reads `n` replies.
    async fn batch(&mut self, commands: &str, n: usize) -> Vec<(u16, String)> {
        self.w
            .write_all(commands.as_bytes())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.reply().await);
        }
        out
    }
}

/// mxguard, a sink and Postfix with Postfix's own settings in `postfix`.
struct Chain {
    mxguard: Mxguard,
    sink: Sink,
    postfix: Postfix,
}

async fn chain(yaml: &str, postfix: &[(&str, &str)]) -> Chain {
    let mxguard = Mxguard::start(yaml).await;
    let sink = Sink::start().await.unwrap_or_else(|e| panic!("sink: {e}"));
    let wiring = Wiring {
        policy: mxguard.policy.as_ref().map(|_| mxguard.policy_wiring()),
        milter: Some(mxguard.milter_wiring()),
    };
    let postfix = Postfix::start(sink.addr().port(), &wiring, postfix);
    Chain {
        mxguard,
        sink,
        postfix,
    }
}

async fn send(c: &Chain, from: &str, to: &[&str], msg: &[u8]) -> smtp::Transcript {
    let env = Envelope {
        client_addr: "198.51.100.9",
        client_name: "mail.example.com",
        helo: "mail.example.com",
        from,
        to,
    };
    smtp::send(c.postfix.smtpd_addr(), &env, msg)
        .await
        .unwrap_or_else(|e| panic!("send: {e}"))
}

// ---------------------------------------------------------------- 2. headers

/// Headers past `content.max_header_size` used to be dropped silently, so a
/// second From or extra Received headers could hide behind 256 KiB of
/// filler; now the message is refused. One header folded over 1000 lines
/// stays under the limit and passes whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_header_sections_get_552_at_milter_level() {
    let d = Mxguard::start(MILTER_ONLY).await;
    let refusal = "552 5.3.4 Message header section exceeds 262144 bytes";

    let folded: Vec<u8> = (0..1000)
        .flat_map(|i| format!(" part {i} of a header folded over a thousand lines\n").into_bytes())
        .collect();
    let mut m = Msg::default();
    m.headers
        .push((b"X-Folded".to_vec(), folded[..folded.len() - 1].to_vec()));
    let (_, end) = run(&mut open(&d).await, &m).await;
    assert_eq!(
        end.map(|(_, s)| s),
        Some(Status::Accept),
        "1000 folded lines"
    );

    // 100 000 headers.
    let before = peak_rss_kib();
    let started = Instant::now();
    let mut m = Msg::default();
    m.headers
        .extend((0..100_000).map(|i| (b"X-Filler".to_vec(), format!(" {i}").into_bytes())));
    let (_, end) = run(&mut open(&d).await, &m).await;
    let elapsed = started.elapsed();
    let (_, status) = end.unwrap_or_else(|| panic!("no end of message"));
    assert_eq!(reply_of(&status), refusal);
    println!(
        "100000 headers through the milter protocol: {elapsed:?}, peak RSS of the test process {} KiB (was {before} KiB)",
        peak_rss_kib()
    );
    assert!(elapsed < Duration::from_secs(20), "{elapsed:?}");

    // A second From hidden after 256 KiB of filler.
    let mut m = Msg::default();
    m.headers
        .extend((0..300).map(|_| (b"X-Filler".to_vec(), vec![b'x'; 1000])));
    m.headers
        .push((b"From".to_vec(), b" ceo@example.org".to_vec()));
    let (_, end) = run(&mut open(&d).await, &m).await;
    assert_eq!(end.map(|(_, s)| reply_of(&s)).as_deref(), Some(refusal));
    assert_eq!(
        d.metric(
            r#"mxguard_check_decisions_total{check="content",mode="enforce",verdict="reject"}"#
        )
        .await,
        2.0
    );

    // The limit is configurable.
    let d = Mxguard::start("policy: { listen: null }\ncontent: { max_header_size: 4KB }").await;
    let mut m = Msg::default();
    m.headers.push((b"X-Big".to_vec(), vec![b'y'; 4100]));
    let (_, end) = run(&mut open(&d).await, &m).await;
    assert_eq!(
        end.map(|(_, s)| reply_of(&s)).as_deref(),
        Some("552 5.3.4 Message header section exceeds 4096 bytes")
    );
    still_answers(&d).await;
}

/// Through Postfix: one header folded over 1000 lines (70 KB, under
/// Postfix's header_size_limit of 102400 bytes) is delivered whole; with
/// 100 000 headers Postfix (no limit on their number; the 1.6 MB are under
/// message_size_limit) passes every one to the milter, which refuses the
/// message with mxguard's 552 5.3.4 (Postfix adds nothing to the text).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_header_sections_through_postfix() {
    let c = chain("", &[]).await;
    let folded: String = (0..1000)
        .map(|i| format!("\r\n part {i} of a header folded over a thousand lines"))
        .collect();
    let msg = format!(
        "From: bob@example.com\r\nTo: alice@example.org\r\nSubject: folded\r\nX-Folded: start{folded}\r\n\r\nHi.\r\n"
    );
    let t = send(
        &c,
        "bob@example.com",
        &["alice@example.org"],
        msg.as_bytes(),
    )
    .await;
    assert_eq!(t.data.as_ref().map(|r| r.code), Some(250), "{t:?}");
    let m = &c.sink.wait_for(1, Duration::from_secs(20)).await[0];
    let v = m.header("X-Folded").unwrap_or_default();
    assert!(
        v.starts_with("start part 0 of"),
        "{}",
        &v[..40.min(v.len())]
    );
    assert!(v.ends_with("part 999 of a header folded over a thousand lines"));

    let started = Instant::now();
    let mut msg =
        String::from("From: bob@example.com\r\nTo: alice@example.org\r\nSubject: many\r\n");
    for i in 0..100_000 {
        msg.push_str(&format!("X-Filler: {i}\r\n"));
    }
    msg.push_str("\r\nHi.\r\n");
    let t = send(
        &c,
        "bob@example.com",
        &["alice@example.org"],
        msg.as_bytes(),
    )
    .await;
    let data = t
        .data
        .unwrap_or_else(|| panic!("no DATA reply: {:?}", t.rcpts));
    println!("100000 headers through Postfix: {:?}", started.elapsed());
    assert_eq!(
        (data.code, data.text()),
        (
            552,
            "5.3.4 Message header section exceeds 262144 bytes".to_owned()
        )
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    let t = send(
        &c,
        "bob@example.com",
        &["alice@example.org"],
        b"From: bob@example.com\r\n\r\nHi.\r\n",
    )
    .await;
    assert_eq!(t.data.as_ref().map(|r| r.code), Some(250), "{t:?}");
}

// ------------------------------------------------------------ 5. injection

const SECRET: &str = "hostile-test-secret";

fn ed25519_pem() -> String {
    use base64::Engine as _;
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 =
        ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap_or_else(|e| panic!("{e}"));
    format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
        base64::engine::general_purpose::STANDARD.encode(pkcs8.as_ref())
    )
}

/// mxguard forwarding example.org (alice, and a catch-all), with SRS, ARC
/// sealing and friendly-from for quarantine.example's p=quarantine.
async fn forwarding(extra: &str) -> (Mxguard, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let key = dir.path().join("arc.pem");
    std::fs::write(&key, ed25519_pem()).unwrap_or_else(|e| panic!("{e}"));
    let secret = dir.path().join("srs.secret");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap_or_else(|e| panic!("{e}"));
    let d = Mxguard::start(&format!(
        "domains: {{ example.org: {{ rules: [\"alice:alice@example.net\", \"catchall@example.net\"] }} }}\n\
         local_domains: [mxguard.test]\n\
         srs: {{ domain: srs.mxguard.test, secrets_file: \"{}\" }}\n\
         arc: {{ domain: mxguard.test, selector: arc, key_file: \"{}\" }}\n\
         auth: {{ authserv_id: mx.mxguard.test }}\n{extra}",
        secret.display(),
        key.display()
    ))
    .await;
    d.dns.add_txt("quarantine.example", "v=spf1 ?all");
    d.dns
        .add_txt("_dmarc.quarantine.example", "v=DMARC1; p=quarantine");
    (d, dir)
}

/// CR, LF, CRLF, NUL and header lines put into every input that reaches a
/// header mxguard writes. With the policy front end on, the milter leaves
/// the envelope checks to it, so this is what a compromised MTA (or one
/// that skips the policy service) can make mxguard write. Postfix itself
/// never passes these: a line end ends its SMTP command, XCLIENT values
/// must be printable, and a NUL in a milter string ends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_input_breaks_out_of_a_header_mxguard_writes() {
    let (d, _dir) = forwarding("").await;
    // A NUL cannot be sent inside a milter string (it ends it, see `cs`):
    // here it cuts the address before its domain. It is tried anyway.
    let payloads: [&[u8]; 8] = [
        b"\r",
        b"\n",
        b"\r\n",
        b"\0",
        b"\r\n X-Evil: 1",
        b"\r\nX-Evil: 1",
        b"\nBcc: victim@example.net",
        b"\r\n\r\nX-Evil: 1",
    ];
    for p in payloads {
        let with = |s: &str| {
            let (a, b) = s.split_at(s.find('@').unwrap_or(s.len()));
            [a.as_bytes(), p, b.as_bytes()].concat()
        };
        let m = Msg {
            hostname: with("mail.example.com"),
            connect_macros: vec![
                ("j", with("mx.mxguard.test")),
                ("{daemon_name}", with("smtpd")),
                ("{client_ptr}", with("ptr.example.com")),
            ],
            helo: with("helo.example.com"),
            sender: with("q@quarantine.example"),
            mail_macros: vec![("i", with("4XyZ1AbC")), ("{auth_authen}", with("someone"))],
            rcpts: vec![with("anyone@example.org")],
            headers: vec![
                (
                    b"From".to_vec(),
                    // A NUL would end the From value (see `cs`): it goes
                    // into the other inputs only.
                    [
                        b" \"Pay".as_slice(),
                        if p == b"\0" { b"" } else { p },
                        b" now\" <q@quarantine.example>",
                    ]
                    .concat(),
                ),
                (b"To".to_vec(), b" anyone@example.org".to_vec()),
                (b"Subject".to_vec(), [b" hello".as_slice(), p].concat()),
            ],
            ..Msg::default()
        };
        let what = String::from_utf8_lossy(p).into_owned();
        let (rcpts, end) = run(&mut open(&d).await, &m).await;
        assert_eq!(rcpts, [Status::Continue], "{what:?}");
        let (actions, status) = end.unwrap_or_else(|| panic!("{what:?}: no end"));
        assert_eq!(status, Status::Accept, "{what:?}");
        assert_clean(&actions, &what);
        if p == b"\0" {
            // `anyone` without its domain is not forwarded.
            assert!(!has_header(&actions, "X-Original-To"), "{actions:?}");
            continue;
        }
        // A From value with a line break that is not folding does not
        // parse: no friendly-from then (DMARC has no From domain).
        let breaks_from = p
            .windows(2)
            .any(|w| w[0] == b'\n' && !matches!(w[1], b' ' | b'\t'));
        if breaks_from {
            assert!(!has_header(&actions, "X-Original-From"), "{actions:?}");
        }
        // Every header that carries client data was written.
        for name in [
            "X-Mxguard",
            "Authentication-Results",
            "X-Original-To",
            "X-Mxguard-Sender",
            "From",
            "X-Original-From",
            "Reply-To",
            "ARC-Seal",
            "ARC-Message-Signature",
            "ARC-Authentication-Results",
        ] {
            if breaks_from && ["From", "X-Original-From", "Reply-To"].contains(&name) {
                continue;
            }
            assert!(
                has_header(&actions, name),
                "{what:?}: no {name}: {actions:?}"
            );
        }
        assert_clean(&actions, &what);
        // A sender with a line break in it is not made into an SRS sender
        // (one cut at a NUL has no domain left).
        assert!(
            !actions
                .actions
                .iter()
                .any(|a| matches!(a, EomAction::ChangeSender { .. })),
            "{what:?}: {actions:?}"
        );
    }
    // Milter-only, the envelope checks run in the milter, and refuse such
    // addresses at RCPT with their reply.
    let d = Mxguard::start(MILTER_ONLY).await;
    for p in [b"\r\n X-Evil: 1".as_slice(), b"\n"] {
        let m = Msg {
            sender: [b"bob".as_slice(), p, b"@example.com"].concat(),
            ..Msg::default()
        };
        let (rcpts, _) = run(&mut open(&d).await, &m).await;
        assert_eq!(
            rcpts.iter().map(reply_of).collect::<Vec<_>>(),
            ["501 5.1.7 Sender address contains a control character"]
        );
        let m = Msg {
            rcpts: vec![[b"alice".as_slice(), p, b"@example.org"].concat()],
            ..Msg::default()
        };
        let (rcpts, _) = run(&mut open(&d).await, &m).await;
        assert_eq!(
            rcpts.iter().map(reply_of).collect::<Vec<_>>(),
            ["501 5.1.3 Recipient address contains a control character"]
        );
    }
    assert_eq!(
        d.metric(
            r#"mxguard_check_decisions_total{check="address",mode="enforce",verdict="reject"}"#
        )
        .await,
        4.0
    );
    still_answers(&d).await;
}

// ------------------------------------------------------- 4. long addresses

fn long_address(len: usize, domain: &str) -> String {
    format!("{}@{domain}", "a".repeat(len - domain.len() - 1))
}

/// Addresses of 1 000, 10 000 and 100 000 characters at milter level: a
/// milter-only site refuses them at RCPT; with the policy service on (the
/// milter leaves the envelope checks to it) a forwarded message keeps every
/// header it gets under the line limit, and its sender is not made into an
/// SRS address longer still.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlong_addresses_at_milter_level() {
    let d = Mxguard::start(MILTER_ONLY).await;
    let (f, _dir) = forwarding("").await;
    for len in [1_000, 10_000, 100_000] {
        let long = long_address(len, "example.com").into_bytes();
        let m = Msg {
            sender: long.clone(),
            ..Msg::default()
        };
        let (rcpts, _) = run(&mut open(&d).await, &m).await;
        assert_eq!(
            rcpts.iter().map(reply_of).collect::<Vec<_>>(),
            ["501 5.1.7 Sender address is longer than 254 characters"],
            "{len}"
        );
        let m = Msg {
            rcpts: vec![long_address(len, "example.org").into_bytes()],
            ..Msg::default()
        };
        let (rcpts, _) = run(&mut open(&d).await, &m).await;
        assert_eq!(
            rcpts.iter().map(reply_of).collect::<Vec<_>>(),
            ["501 5.1.3 Recipient address is longer than 254 characters"],
            "{len}"
        );

        let m = Msg {
            hostname: vec![b'h'; len],
            helo: vec![b'e'; len],
            sender: long,
            rcpts: vec![long_address(len, "example.org").into_bytes()],
            ..Msg::default()
        };
        let started = Instant::now();
        let (rcpts, end) = run(&mut open(&f).await, &m).await;
        assert_eq!(rcpts, [Status::Continue], "{len}");
        let (actions, status) = end.unwrap_or_else(|| panic!("no end"));
        assert_eq!(status, Status::Accept, "{len}");
        assert!(has_header(&actions, "X-Original-To") && has_header(&actions, "X-Mxguard-Sender"));
        assert_clean(&actions, &format!("{len} characters"));
        assert!(
            !actions
                .actions
                .iter()
                .any(|a| matches!(a, EomAction::ChangeSender { .. })),
            "{len}"
        );
        assert!(started.elapsed() < Duration::from_secs(10), "{len}");
    }
    assert_eq!(
        d.metric(
            r#"mxguard_check_decisions_total{check="address",mode="enforce",verdict="reject"}"#
        )
        .await,
        6.0
    );
    still_answers(&d).await;
    still_answers(&f).await;
}

/// In a policy request a 1000-character address gets mxguard's reply; a
/// line longer than policy.max_line_length (4096) closes the connection
/// without an answer (Postfix then applies its default_action), counted as
/// a protocol error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlong_addresses_in_policy_requests() {
    let d = Mxguard::start("").await;
    let mut p = Policy::open(d.policy_addr()).await;
    let long = long_address(1_000, "example.com");
    assert_eq!(
        p.ask(&rcpt_request(&[("sender", long.as_bytes())]))
            .await
            .as_deref(),
        Some("action=501 5.1.7 Sender address is longer than 254 characters")
    );
    let long = long_address(1_000, "example.org");
    assert_eq!(
        p.ask(&rcpt_request(&[("recipient", long.as_bytes())]))
            .await
            .as_deref(),
        Some("action=501 5.1.3 Recipient address is longer than 254 characters")
    );
    assert_eq!(
        p.ask(&rcpt_request(&[])).await.as_deref(),
        Some("action=DUNNO")
    );
    for len in [10_000, 100_000] {
        for attr in ["sender", "recipient"] {
            let long = long_address(len, "example.org");
            let mut p = Policy::open(d.policy_addr()).await;
            assert_eq!(p.ask(&rcpt_request(&[(attr, long.as_bytes())])).await, None);
        }
    }
    assert_eq!(
        d.metric(r#"mxguard_protocol_errors_total{frontend="policy",reason="line_too_long"}"#)
            .await,
        4.0
    );
    let mut p = Policy::open(d.policy_addr()).await;
    assert_eq!(
        p.ask(&rcpt_request(&[])).await.as_deref(),
        Some("action=DUNNO")
    );
}

/// Through Postfix. Postfix reads SMTP commands up to line_length_limit
/// (2048) and drops the rest of a longer line, so the address loses its
/// closing `>`: the 10 000 and 100 000-character addresses get Postfix's own
/// `501 5.1.7 Bad sender address syntax` (MAIL) and `501 5.1.3 Bad
/// recipient address syntax` (RCPT) and never reach mxguard. The
/// 1000-character ones pass Postfix and get mxguard's 501 from the policy
/// service, in Postfix's words (`<rcpt>: Recipient address rejected: ...`;
/// Postfix rewrites the policy's 5.1.7 to 5.1.3 there, as the refusal is of
/// a recipient restriction).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlong_addresses_through_postfix() {
    let c = chain("", &[]).await;
    let msg = b"From: bob@example.com\r\n\r\nHi.\r\n";
    let from = long_address(1_000, "example.com");
    let t = send(&c, &from, &["alice@example.org"], msg).await;
    assert_eq!(t.mail.code, 250, "{t:?}");
    assert_eq!(
        t.rcpts.iter().map(|r| r.text()).collect::<Vec<_>>(),
        [
            "5.1.3 <alice@example.org>: Recipient address rejected: Sender address is longer than 254 characters"
        ]
    );
    let to = long_address(1_000, "example.org");
    let t = send(&c, "bob@example.com", &[&to], msg).await;
    assert_eq!(
        t.rcpts.iter().map(|r| r.to_string()).collect::<Vec<_>>(),
        [format!(
            "501 5.1.3 <{to}>: Recipient address rejected: Recipient address is longer than 254 characters"
        )]
    );
    for len in [10_000, 100_000] {
        let from = long_address(len, "example.com");
        let t = send(&c, &from, &["alice@example.org"], msg).await;
        assert_eq!(
            t.mail.to_string(),
            "501 5.1.7 Bad sender address syntax",
            "{len}"
        );
        let to = long_address(len, "example.org");
        let t = send(&c, "bob@example.com", &[&to], msg).await;
        assert_eq!(
            t.rcpts.iter().map(|r| r.to_string()).collect::<Vec<_>>(),
            ["501 5.1.3 Bad recipient address syntax"],
            "{len}"
        );
    }
    assert_eq!(
        c.mxguard
            .metric(
                r#"mxguard_check_decisions_total{check="address",mode="enforce",verdict="reject"}"#
            )
            .await,
        2.0
    );
    let t = send(&c, "bob@example.com", &["alice@example.org"], msg).await;
    assert_eq!(t.data.as_ref().map(|r| r.code), Some(250), "{t:?}");
}

// ------------------------------------------------------- 1. recipients

/// 10 000 RCPT commands in one session through Postfix, in ten
/// transactions (MAIL, 1 001 or 991 RCPT, then DATA or RSET): in each the
/// first 50 are accepted and every other gets mxguard's 452 4.5.3
/// (ratelimit.max_recipients). Postfix's own limit (smtpd_recipient_limit
/// 1000, `452 4.5.3 Error: too many recipients`) counts accepted recipients
/// only, so behind mxguard it is never reached, even at RCPT 1001. Postfix's
/// error limits are raised for this: with its defaults (smtpd_soft_error_limit
/// 10, smtpd_error_sleep_time 1s, smtpd_hard_error_limit 20) it slows the
/// session after 10 refusals and ends it with 421 after 20, before mxguard
/// sees much.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_recipients_in_one_session_through_postfix() {
    let c = chain(
        "",
        &[
            ("smtpd_soft_error_limit", "100000"),
            ("smtpd_hard_error_limit", "100000"),
            ("smtpd_error_sleep_time", "0"),
        ],
    )
    .await;
    let started = Instant::now();
    let mut p = Pipe::open(c.postfix.smtpd_addr(), "198.51.100.11").await;
    let (mut accepted, mut ours, mut total) = (0, 0, 0);
    let mut delivered = 0;
    for n in 0..10 {
        let count = if n < 9 { 1001 } else { 10_000 - 9 * 1001 };
        let mut cmds = String::from("MAIL FROM:<bob@example.com>\r\n");
        for i in 0..count {
            cmds.push_str(&format!("RCPT TO:<r{n}x{i}@example.org>\r\n"));
        }
        let replies = p.batch(&cmds, count + 1).await;
        assert_eq!(replies[0].0, 250, "{:?}", replies[0]);
        for (i, (code, text)) in replies[1..].iter().enumerate() {
            total += 1;
            match (i, *code) {
                (0..50, 250) => accepted += 1,
                (50.., 452) => {
                    assert!(
                        text.ends_with("Recipient address rejected: Too many recipients: at most 50 per message; send the others in another message"),
                        "{i}: {text}"
                    );
                    ours += 1;
                }
                other => panic!("transaction {n}, RCPT {i}: {other:?} {text}"),
            }
        }
        if n % 2 == 0 {
            let go = p.batch("DATA\r\n", 1).await;
            assert_eq!(go[0].0, 354);
            let end = p
                .batch(
                    &format!("From: bob@example.com\r\nSubject: {n}\r\n\r\nHi.\r\n.\r\n"),
                    1,
                )
                .await;
            assert_eq!(end[0].0, 250, "{end:?}");
            delivered += 1;
        } else {
            assert_eq!(p.batch("RSET\r\n", 1).await[0].0, 250);
        }
    }
    assert_eq!((total, accepted, ours), (10_000, 500, 9_500));
    assert_eq!(p.batch("QUIT\r\n", 1).await[0].0, 221);
    println!("10000 RCPT through Postfix: {:?}", started.elapsed());
    let got = c.sink.wait_for(delivered, Duration::from_secs(30)).await;
    let rcpts: usize = got.iter().map(|m| m.rcpt_to.len()).sum();
    assert_eq!(rcpts, 5 * 50);
    assert_eq!(
        c.mxguard
            .metric(r#"mxguard_check_decisions_total{check="max_recipients",mode="enforce",verdict="tempfail"}"#)
            .await,
        9_500.0
    );
    let (status, body) = c.mxguard.http_get("/healthz").await;
    assert!(status.contains("200"), "{status} {body}");
    let t = send(
        &c,
        "bob@example.com",
        &["alice@example.org"],
        b"From: bob@example.com\r\n\r\nHi.\r\n",
    )
    .await;
    assert_eq!(t.data.as_ref().map(|r| r.code), Some(250), "{t:?}");
}

/// 10 000 RCPT in one message at milter level (milter-only): 50 continue,
/// the others get 452 4.5.3, and the end of the message is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_recipients_in_one_message_at_milter_level() {
    let d = Mxguard::start(MILTER_ONLY).await;
    let m = Msg {
        rcpts: (0..10_000)
            .map(|i| format!("r{i}@example.org").into_bytes())
            .collect(),
        ..Msg::default()
    };
    let started = Instant::now();
    let (rcpts, end) = run(&mut open(&d).await, &m).await;
    println!(
        "10000 RCPT through the milter protocol: {:?}",
        started.elapsed()
    );
    assert!(rcpts[..50].iter().all(|s| *s == Status::Continue));
    for s in &rcpts[50..] {
        assert_eq!(
            reply_of(s),
            "452 4.5.3 Too many recipients: at most 50 per message; send the others in another message"
        );
    }
    assert_eq!(end.map(|(_, s)| s), Some(Status::Accept));
    still_answers(&d).await;
}

// ------------------------------------------------------- 3. NUL and 8-bit

/// 8-bit bytes (not valid UTF-8) in every macro, the envelope, header names
/// and values, and NUL and 8-bit bytes in the body (the one place the milter
/// protocol carries a NUL: strings end at one, see `cs`). Accepted, with
/// clean headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_bit_and_nul_bytes_at_milter_level() {
    let d = Mxguard::start(MILTER_ONLY).await;
    let m = Msg {
        hostname: b"m\xe4il.example.com".to_vec(),
        connect_macros: vec![
            ("j", b"mx.\xff\xfe.test".to_vec()),
            ("{daemon_name}", b"smtpd\xc3".to_vec()),
            ("{client_ptr}", b"\xe4\x00ptr.example.com".to_vec()),
        ],
        helo: b"h\xe9lo.example.com".to_vec(),
        sender: b"j\xfcrgen@b\xfccher.example".to_vec(),
        mail_macros: vec![
            ("i", b"4X\xff".to_vec()),
            ("{auth_authen}", b"\xe9".to_vec()),
        ],
        rcpts: vec![
            b"\xe4lice@example.org".to_vec(),
            b"bob@ex\xe4mple.org".to_vec(),
        ],
        headers: vec![
            (b"From".to_vec(), b" J\xfcrgen <bob@example.com>".to_vec()),
            (
                b"X-\xe4\xff".to_vec(),
                b" \xc3\x28 \xf0\x28\x8c\x28".to_vec(),
            ),
            (b"Subject".to_vec(), b" =?x?\xff".to_vec()),
        ],
        body: b"\x00\x01 NUL \x00 and \xff\xfe 8-bit\r\n\x00\r\n".to_vec(),
        ..Msg::default()
    };
    let (rcpts, end) = run(&mut open(&d).await, &m).await;
    assert_eq!(rcpts, [Status::Continue, Status::Continue]);
    let (actions, status) = end.unwrap_or_else(|| panic!("no end"));
    assert_eq!(status, Status::Accept);
    assert_clean(&actions, "8-bit");
    still_answers(&d).await;
}

/// Policy requests with NUL, 8-bit and invalid UTF-8 values: each answered,
/// on the same connection, then a normal request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_and_eight_bit_bytes_in_policy_requests() {
    let d = Mxguard::start("").await;
    let mut p = Policy::open(d.policy_addr()).await;
    let cases: [(&str, &[u8], &str); 9] = [
        (
            "sender",
            b"b\x00ob@example.com",
            "action=501 5.1.7 Sender address contains a control character",
        ),
        (
            "recipient",
            b"alice\x00@example.org",
            "action=501 5.1.3 Recipient address contains a control character",
        ),
        ("sender", b"j\xfcrgen@b\xfccher.example", "action=DUNNO"),
        ("recipient", b"\xff\xfe@example.org", "action=DUNNO"),
        ("helo_name", b"h\x00\xffelo", "action=DUNNO"),
        ("client_name", b"\xc3\x28.example", "action=DUNNO"),
        ("client_address", b"198.51.100.7\x00", "action=DUNNO"),
        ("queue_id", b"\x00\xff", "action=DUNNO"),
        ("sasl_username", b"\xe9\x00", "action=DUNNO"),
    ];
    for (attr, value, want) in cases {
        assert_eq!(
            p.ask(&rcpt_request(&[(attr, value)])).await.as_deref(),
            Some(want),
            "{attr}={value:?}"
        );
    }
    assert_eq!(
        p.ask(&rcpt_request(&[])).await.as_deref(),
        Some("action=DUNNO")
    );
}

/// Through Postfix: 8-bit header values and an 8-bit body pass Postfix and
/// mxguard unchanged; a NUL in the body is passed on as well
/// (Postfix's message_reject_characters and message_strip_characters are
/// empty by default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_bit_and_nul_bytes_through_postfix() {
    let c = chain("", &[]).await;
    let msg =
        b"From: J\xfcrgen <bob@example.com>\r\nTo: alice@example.org\r\nSubject: \xe4\xff\r\n\
                X-\xe4: \xc3\x28\r\n\r\nbody \xff\xfe\r\nNUL \x00 here\r\n";
    let t = send(&c, "bob@example.com", &["alice@example.org"], msg).await;
    assert_eq!(t.data.as_ref().map(|r| r.code), Some(250), "{t:?}");
    let m = &c.sink.wait_for(1, Duration::from_secs(20)).await[0];
    assert!(
        m.data.windows(4).any(|w| w == b"\xe4\xff\r\n"),
        "8-bit Subject kept"
    );
    // Postfix takes `X-\xe4:` for no header (a name is printable ASCII):
    // the header section ends before it, with an empty line Postfix adds.
    assert_eq!(
        m.body(),
        b"X-\xe4: \xc3\x28\r\n\r\nbody \xff\xfe\r\nNUL \x00 here\r\n"
    );
    assert!(m.header("X-Mxguard").is_some());
}

// ------------------------------------------------------- 6. SRS forgery

const SRS_DOMAIN: &str = "srs.mxguard.test";

fn today() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400)
}

fn srs_with(secret: &str) -> mxguard::srs::Srs {
    mxguard::srs::Srs::new(vec![secret.as_bytes().to_vec()], SRS_DOMAIN, 4, 21, '=')
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Forged SRS addresses (tests/srs.rs and src/srs.rs cover a forged hash
/// and the reversal rules; these are the attacks, each with its reason),
/// and a valid one with its case changed, which passes: the hash is
/// compared without regard to case, as postsrsd does, since relays may
/// change the case of an address.
fn forgeries() -> Vec<(String, Option<&'static str>)> {
    let ours = srs_with(SECRET);
    let valid = ours
        .forward_at("bob@example.com", today())
        .unwrap_or_else(|e| panic!("{e}"));
    let stamp = mxguard::srs::timestamp(today());
    let forward = |srs: &mxguard::srs::Srs, day| {
        srs.forward_at("bob@example.com", day)
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let bad_hash = Some("the SRS signature does not match");
    let expired = Some("the SRS address has expired");
    vec![
        (
            format!("SRS0=Zq9x={stamp}=example.com=bob@{SRS_DOMAIN}"),
            bad_hash,
        ),
        (
            format!("SRS0=AAAAAAAA={stamp}=example.com=bob@{SRS_DOMAIN}"),
            bad_hash,
        ),
        (forward(&srs_with("another secret"), today()), bad_hash),
        (forward(&ours, today() - 22), expired),
        (forward(&ours, today() - 300), expired),
        (forward(&ours, today() + 2), expired),
        (
            format!("SRS1=Zq9x=hop.example==HHHH={stamp}=orig.example=alice@{SRS_DOMAIN}"),
            bad_hash,
        ),
        (
            srs_with("a forwarder's secret")
                .forward_at(
                    &format!("SRS0=HHHH={stamp}=orig.example=alice@hop.example"),
                    today(),
                )
                .unwrap_or_else(|e| panic!("{e}")),
            bad_hash,
        ),
        (valid.to_uppercase(), None),
        (valid.to_lowercase(), None),
        (
            valid[..valid.rfind('=').unwrap_or(0)].to_owned() + "@" + SRS_DOMAIN,
            Some("malformed SRS address (SRS0 needs hash, time, domain and user)"),
        ),
        (
            valid[..=valid.rfind('=').unwrap_or(0)].to_owned() + "@" + SRS_DOMAIN,
            Some("malformed SRS address (empty domain or user)"),
        ),
        (valid.replacen(&valid[5..9], &valid[5..8], 1), bad_hash),
        (
            format!("SRS0=@{SRS_DOMAIN}"),
            Some("malformed SRS address (SRS0 needs hash, time, domain and user)"),
        ),
        (
            format!("SRS1=Zq9x=hop.example@{SRS_DOMAIN}"),
            Some("malformed SRS address (SRS1 needs hash, hop and address)"),
        ),
        (
            format!("SRS1=Zq9x=hop.example=x@{SRS_DOMAIN}"),
            Some("malformed SRS address (SRS1 without `==`)"),
        ),
        (
            format!("SRS0=Zq9x=G!=example.com=bob@{SRS_DOMAIN}"),
            bad_hash,
        ),
    ]
}

async fn srs_daemon(extra: &str) -> (Mxguard, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let secret = dir.path().join("srs.secret");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap_or_else(|e| panic!("{e}"));
    let d = Mxguard::start(&format!(
        "srs: {{ domain: {SRS_DOMAIN}, secrets_file: \"{}\" }}\n{extra}",
        secret.display()
    ))
    .await;
    (d, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_srs_addresses_get_550_with_their_reason_from_the_policy_service() {
    let (d, _dir) = srs_daemon("").await;
    for (address, reason) in forgeries() {
        let want = match reason {
            Some(r) => format!("action=550 5.1.1 {address} is not a valid bounce address: {r}"),
            None => "action=DUNNO".to_owned(),
        };
        assert_eq!(
            d.ask_rcpt_from("198.51.100.7", "mail.example.com", "", &address, 0)
                .await,
            want,
            "{address}"
        );
    }
}

/// Through Postfix (relaying the SRS domain): the same replies, in
/// Postfix's words.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_srs_addresses_get_550_through_postfix() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let secret = dir.path().join("srs.secret");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap_or_else(|e| panic!("{e}"));
    let c = chain(
        &format!(
            "srs: {{ domain: {SRS_DOMAIN}, secrets_file: \"{}\" }}",
            secret.display()
        ),
        &[(
            "relay_domains",
            &format!("example.org example.net example.com {SRS_DOMAIN}"),
        )],
    )
    .await;
    let list = forgeries();
    let to: Vec<&str> = list.iter().map(|(a, _)| a.as_str()).collect();
    let t = send(
        &c,
        "",
        &to,
        b"From: MAILER-DAEMON@example.com\r\n\r\nbounce\r\n",
    )
    .await;
    assert_eq!(t.rcpts.len(), list.len(), "{t:?}");
    for ((address, reason), reply) in list.iter().zip(&t.rcpts) {
        if address.contains('!') {
            // Postfix takes `!` for UUCP source routing and refuses it
            // itself (allow_untrusted_routing = no) before mxguard is asked.
            assert_eq!(
                reply.to_string(),
                format!("454 4.7.1 <{address}>: Relay access denied")
            );
            continue;
        }
        match reason {
            Some(r) => assert_eq!(
                reply.to_string(),
                format!(
                    "550 5.1.1 <{address}>: Recipient address rejected: {address} is not a valid bounce address: {r}"
                )
            ),
            None => assert_eq!(reply.code, 250, "{address}: {reply}"),
        }
    }
    assert_eq!(t.data.as_ref().map(|r| r.code), Some(250), "{t:?}");
}

// ------------------------------------------------------- 7. DNS records

/// TXT records built to blow up the rule resolver, through the loopback
/// DNS server, each answered within a bounded time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_txt_records_get_their_replies_in_bounded_time() {
    let dns = common::dns::DnsServer::start()
        .await
        .unwrap_or_else(|e| panic!("dns: {e}"));
    let domains = [
        "big.test",
        "huge.test",
        "many.test",
        "c1.test",
        "c2.test",
        "c3.test",
        "c4.test",
        "c5.test",
        "c6.test",
        "c7.test",
        "l1.test",
        "l2.test",
        "re.test",
        "wide.test",
    ];
    let listed: Vec<String> = domains
        .iter()
        .map(|d| format!("{d}: {{ source: dns }}"))
        .collect();
    let d = Mxguard::start(&format!(
        "domains: {{ {} }}\ndns: {{ nameservers: [\"{}\"], timeout: 2s }}",
        listed.join(", "),
        dns.addr()
    ))
    .await;
    // About 60 KiB: over UDP's 4096 bytes, so the answer comes over TCP.
    for i in 0..230 {
        let mut r = format!("forward-email=a{i}:t{i}@example.net,");
        while r.len() < 250 {
            r.push('x');
        }
        dns.add_txt("big.test", &r);
    }
    // Over the 65 535 bytes a DNS message can hold: no answer can be sent.
    for i in 0..300 {
        dns.add_txt(
            "huge.test",
            &format!("forward-email=a{i}:t{i}@example.net,{}", "y".repeat(220)),
        );
    }
    // Over a thousand records at one name (1400: what fits in one answer).
    for i in 0..1400 {
        dns.add_txt("many.test", &format!("forward-email=u{i}:t@x.io"));
    }
    // A chain through seven handled domains, and a loop between two.
    for i in 1..7 {
        dns.add_txt(
            &format!("c{i}.test"),
            &format!("forward-email=a:a@c{}.test", i + 1),
        );
    }
    dns.add_txt("c7.test", "forward-email=a:end@example.net");
    dns.add_txt("l1.test", "forward-email=a:a@l2.test");
    dns.add_txt("l2.test", "forward-email=a:a@l1.test");
    // Catastrophic backtracking patterns (linear in Rust's regex).
    dns.add_txt("re.test", "forward-email=/^(a+)+$/:x@example.net,/^(a|aa)+b$/:y@example.net,/^(.*a){20}$/:z@example.net");
    // As many targets as one DNS answer holds.
    let mut record = String::from("forward-email=");
    let mut n = 0;
    while record.len() < 50_000 {
        record.push_str(&format!("w:{n}@x.io,"));
        n += 1;
    }
    dns.add_txt("wide.test", record.trim_end_matches(','));

    // Addresses are at most 254 characters (the address check).
    let long_a = "a".repeat(235);
    let cases: Vec<(String, String, Duration)> = vec![
        ("a5@big.test".into(), "action=DUNNO".into(), Duration::from_secs(5)),
        ("nobody@big.test".into(), "action=550 5.1.1 nobody@big.test does not exist".into(), Duration::from_secs(5)),
        (
            "a5@huge.test".into(),
            "action=451 4.4.3 Cannot look up where mail for a5@huge.test goes (DNS trouble); try again later".into(),
            Duration::from_secs(15),
        ),
        ("u5@many.test".into(), "action=DUNNO".into(), Duration::from_secs(5)),
        ("u999@many.test".into(), "action=DUNNO".into(), Duration::from_secs(5)),
        // Past the 1000 elements kept from one record set.
        ("u1200@many.test".into(), "action=550 5.1.1 u1200@many.test does not exist".into(), Duration::from_secs(5)),
        ("a@c1.test".into(), "action=DUNNO".into(), Duration::from_secs(5)),
        (
            "a@l1.test".into(),
            "action=550 5.4.6 Mail for a@l1.test is forwarded back to itself (a forwarding loop)".into(),
            Duration::from_secs(5),
        ),
        ("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa@re.test".into(), "action=DUNNO".into(), Duration::from_secs(5)),
        (
            format!("{long_a}c@re.test"),
            format!("action=550 5.1.1 {long_a}c@re.test does not exist"),
            Duration::from_secs(5),
        ),
    ];
    for (rcpt, want, bound) in cases {
        let started = Instant::now();
        let got = d
            .ask_rcpt("198.51.100.7", "mail.example.com", &rcpt, 0)
            .await;
        let took = started.elapsed();
        assert_eq!(
            got.chars().take(300).collect::<String>(),
            want.chars().take(300).collect::<String>(),
            "{rcpt:.60}"
        );
        assert!(took < bound, "{rcpt:.60}: {took:?}");
        println!("{:.40}: {took:?}", rcpt);
    }
    let started = Instant::now();
    let got = d
        .ask_rcpt("198.51.100.7", "mail.example.com", "w@wide.test", 0)
        .await;
    assert!(
        got.starts_with(
            "action=421 4.4.2 The address w@wide.test is attempted to be forwarded to ("
        ) && got.ends_with(") addresses which exceeds the maximum of (10)"),
        "{got}"
    );
    println!(
        "w@wide.test ({n} targets in the record): {:?}: {got}",
        started.elapsed()
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    // The chain is followed five hops deep (MAX_DEPTH), then forwarded to
    // the address it reached: the next domain's mail server gets it.
    let m = Msg {
        rcpts: vec![b"a@c1.test".to_vec()],
        ..Msg::default()
    };
    let (_, end) = run(&mut open(&d).await, &m).await;
    let (actions, status) = end.unwrap_or_else(|| panic!("no end"));
    assert_eq!(status, Status::Accept);
    let added: Vec<String> = actions
        .actions
        .iter()
        .filter_map(|a| match a {
            EomAction::AddRecipient { rcpt, .. } => Some(rcpt.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect();
    assert_eq!(added, ["<a@c7.test>"]);
}
