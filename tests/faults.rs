//! Fault injection with real processes on loopback: Redis killed and
//! restarted under traffic, a DNS server that is silent, slow, failing or
//! truncating, milter connections dropped mid-message (by a milter client
//! and by killing Postfix's own processes), a webhook endpoint that hangs,
//! a state directory that is read-only or full, and SIGHUP with broken
//! configuration files under load. Each fault has a defined answer, a
//! bounded wait, and recovery without a restart of mxguard.

mod common;

use common::{
    daemon::Mxguard,
    dns::Fault,
    policy::Policy,
    redis::RedisServer,
    stack::{Stack, Wire},
};
use indymilter_test::{MacroStage, Status, TestConnection};
use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader as StdBufReader, Read, Write},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
};

const STORE_DOWN: &str = "action=451 4.3.0 Our state store is unavailable; please try again later";
const GREYLISTED: &str = "action=450 4.7.1 Message was greylisted";
const NO_ALIAS: &str = "action=550 5.1.1 nobody@example.org does not exist";
const LISTED: &str = "action=421 4.7.1 The IP 203.0.113.66 is listed on local";
const REJECTED: &str = "action=REJECT 5.7.1 ";

/// A policy connection kept open for many requests, as Postfix keeps one,
/// each request an RCPT in a transaction of its own.
struct PolicyConn {
    p: Policy,
    n: u64,
}

impl PolicyConn {
    async fn open(addr: SocketAddr) -> std::io::Result<PolicyConn> {
        Ok(PolicyConn {
            p: Policy::open(addr).await,
            n: 0,
        })
    }

    /// The `action=` line of one RCPT request.
    async fn ask(&mut self, client: &str, rcpt: &str) -> std::io::Result<String> {
        self.n += 1;
        let req = format!(
            "request=smtpd_access_policy\nprotocol_state=RCPT\ninstance={:p}.{}\n\
             client_address={client}\nclient_name=unknown\nhelo_name=mx.example.com\n\
             sender=bob@example.com\nrecipient={rcpt}\nrecipient_count=0\n\n",
            self, self.n
        );
        self.p
            .ask(req.as_bytes())
            .await
            .ok_or_else(|| std::io::Error::other("connection closed without an answer"))
    }
}

/// Polls `f` until it holds, up to `within`.
async fn eventually<F, Fut>(within: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if f().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------- Redis --

/// Which kind of request a traffic task sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Case {
    /// A client on a denylist feed (needs no store).
    Listed,
    /// A client in `policy.reject_clients` (needs no store).
    Rejected,
    /// An alias that does not exist (needs no store).
    NoAlias,
    /// A new client, to be greylisted (needs the store).
    New,
}

/// Whether `answer` is one the instance may give for `case` while Redis
/// is up or down, with `on_error: tempfail` (strict) or `continue`.
fn allowed(case: Case, strict: bool, answer: &str) -> bool {
    let down = strict && answer == STORE_DOWN;
    match case {
        Case::Listed => answer.starts_with(LISTED) || down,
        Case::Rejected => answer.starts_with(REJECTED),
        Case::NoAlias => answer == NO_ALIAS || down,
        Case::New => {
            answer.starts_with(GREYLISTED) || down || (!strict && answer == "action=DUNNO")
        }
    }
}

type Tally = Arc<Mutex<BTreeMap<(bool, Case, String), usize>>>;

/// Requests of every case over one connection until `stop`, each answer
/// counted; a wrong answer or a failed request panics the task.
async fn traffic(addr: SocketAddr, strict: bool, task: u8, stop: Arc<AtomicBool>, tally: Tally) {
    let mut conn = PolicyConn::open(addr)
        .await
        .unwrap_or_else(|e| panic!("policy connect: {e}"));
    let mut i: u32 = 0;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let new_client = format!("10.{task}.{}.{}", i / 250, i % 250 + 1);
        let (case, client, rcpt) = match i % 4 {
            0 => (Case::Listed, "203.0.113.66", "alice@example.org"),
            1 => (Case::Rejected, "192.0.2.66", "alice@example.org"),
            2 => (Case::NoAlias, "198.51.100.9", "nobody@example.org"),
            _ => (Case::New, new_client.as_str(), "alice@example.org"),
        };
        let answer = conn
            .ask(client, rcpt)
            .await
            .unwrap_or_else(|e| panic!("request {i} ({case:?}) failed: {e}"));
        assert!(
            allowed(case, strict, &answer),
            "strict={strict} {case:?}: {answer}"
        );
        // Answers are grouped by their code, not their full text.
        let code: String = answer.chars().take(16).collect();
        *tally
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((strict, case, code))
            .or_default() += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_killed_under_traffic_follows_on_error_keeps_other_refusals_and_recovers() {
    let mut redis = RedisServer::start().unwrap_or_else(|e| panic!("redis: {e}"));
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let feed = dir.path().join("feed.txt");
    std::fs::write(&feed, "203.0.113.66\n").unwrap_or_else(|e| panic!("{e}"));
    let yaml = |on_error: &str| {
        format!(
            "greylist: {{ enabled: true, delay: 1h }}\n\
             store: {{ backend: redis, url: \"{}\", timeout: 500ms, on_error: {on_error} }}\n\
             denylist: {{ feeds: [{{ name: local, path: \"{}\" }}] }}\n\
             policy: {{ reject_clients: [192.0.2.66] }}\n\
             domains: {{ example.org: {{ rules: [\"alice:alice@example.net\"] }} }}\n",
            redis.url(),
            feed.display()
        )
    };
    let strict = Mxguard::start(&yaml("tempfail")).await;
    let lenient = Mxguard::start(&yaml("continue")).await;

    let stop = Arc::new(AtomicBool::new(false));
    let tally: Tally = Arc::default();
    let mut tasks = Vec::new();
    for task in 0..3u8 {
        for (d, is_strict) in [(&strict, true), (&lenient, false)] {
            tasks.push(tokio::spawn(traffic(
                d.policy_addr(),
                is_strict,
                task * 2 + u8::from(is_strict),
                stop.clone(),
                tally.clone(),
            )));
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Killed (SIGKILL) while the traffic runs.
    redis.stop();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let t = Instant::now();
    let mut s = PolicyConn::open(strict.policy_addr())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut l = PolicyConn::open(lenient.policy_addr())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let ask = |c: &'static str, r: &'static str| (c, r);
    for (client, rcpt) in [ask("198.51.100.200", "alice@example.org")] {
        assert_eq!(s.ask(client, rcpt).await.ok().as_deref(), Some(STORE_DOWN));
        assert_eq!(
            l.ask(client, rcpt).await.ok().as_deref(),
            Some("action=DUNNO"),
            "on_error: continue skips greylisting"
        );
    }
    // Checks that need no store still refuse on the lenient instance.
    let listed = l.ask("203.0.113.66", "alice@example.org").await;
    assert!(
        listed.as_deref().is_ok_and(|a| a.starts_with(LISTED)),
        "{listed:?}"
    );
    assert_eq!(
        l.ask("198.51.100.9", "nobody@example.org")
            .await
            .ok()
            .as_deref(),
        Some(NO_ALIAS)
    );
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "bounded by store.timeout: {:?}",
        t.elapsed()
    );
    // Either way, a load balancer hears of it.
    for d in [&strict, &lenient] {
        let (status, body) = d.http_get("/healthz").await;
        assert_eq!(status, "HTTP/1.1 503 Service Unavailable", "{body}");
        assert!(body.starts_with("state store: "), "{body}");
    }

    // Back (empty): greylisting works again without a restart of mxguard.
    redis
        .restart()
        .unwrap_or_else(|e| panic!("redis restart: {e}"));
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut back = false;
    for n in 0u32.. {
        let client = format!("198.51.100.{}", 100 + n % 100);
        if s.ask(&client, "alice@example.org")
            .await
            .is_ok_and(|a| a.starts_with(GREYLISTED))
        {
            back = true;
            break;
        }
        if Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        back,
        "the strict instance greylists again after Redis is back"
    );
    assert_eq!(strict.http_get("/healthz").await.0, "HTTP/1.1 200 OK");
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await
            .unwrap_or_else(|e| panic!("a traffic task failed: {e}"));
    }

    let tally = tally.lock().unwrap_or_else(|p| p.into_inner()).clone();
    eprintln!("answers under traffic: {tally:#?}");
    let seen = |strict: bool, case: Case, prefix: &str| {
        tally
            .iter()
            .filter(|((s, c, a), _)| *s == strict && *c == case && a.starts_with(prefix))
            .map(|(_, n)| *n)
            .sum::<usize>()
    };
    // Every phase showed up in the traffic of both instances.
    assert!(seen(true, Case::New, "action=450") > 0);
    assert!(seen(true, Case::New, "action=451 4.3.0") > 0);
    assert!(seen(false, Case::New, "action=DUNNO") > 0);
    // Nothing that a working check refuses was let through, ever.
    for case in [Case::Listed, Case::Rejected, Case::NoAlias] {
        assert_eq!(
            seen(true, case, "action=DUNNO") + seen(false, case, "action=DUNNO"),
            0
        );
    }
    assert!(seen(false, Case::Listed, "action=421") > 0);
    let metrics = lenient.http_get("/metrics").await.1;
    for check in ["operator_denylist", "greylist", "ratelimit"] {
        assert!(
            metrics.contains(&format!(
                "mxguard_store_failures_total{{action=\"continue\",check=\"{check}\""
            )),
            "{check} counted its store failures: {metrics}"
        );
    }
}

// ------------------------------------------------------------------ DNS --

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_faults_tempfail_with_4_4_3_within_a_bounded_wait_and_recover() {
    let names = [
        "ok.test",
        "servfail.test",
        "silent.test",
        "slow.test",
        "slower.test",
        "truncated.test",
        "truncated-silent.test",
    ];
    let domains: Vec<String> = names
        .iter()
        .map(|n| format!("\"{n}\": {{ source: dns }}"))
        .collect();
    let d = Mxguard::start(&format!(
        "dns: {{ timeout: 1s }}\ndomains: {{ {} }}\n",
        domains.join(", ")
    ))
    .await;
    for n in names {
        d.dns.add_txt(n, "forward-email=target@example.net");
    }
    d.dns.set_fault("servfail.test", Fault::ServFail);
    d.dns.set_fault("silent.test", Fault::Timeout);
    d.dns
        .set_fault("slow.test", Fault::Slow(Duration::from_millis(300)));
    d.dns
        .set_fault("slower.test", Fault::Slow(Duration::from_millis(2500)));
    d.dns.set_fault("truncated.test", Fault::Truncate);
    d.dns
        .set_fault("truncated-silent.test", Fault::TruncateTcpSilent);

    // (name, answered, longest wait): a lookup that gets no answer waits
    // about twice dns.timeout here (2.0 s measured), far from Postfix's
    // own policy timeout; the bounds leave room for a loaded machine.
    let cases = [
        ("ok.test", true, 1.0),
        ("servfail.test", false, 1.0),
        ("silent.test", false, 4.0),
        ("slow.test", true, 1.5),
        ("slower.test", false, 4.0),
        ("truncated.test", true, 1.0),
        ("truncated-silent.test", false, 5.0),
    ];
    let mut asked = Vec::new();
    for (name, answered, bound) in cases {
        let t = Instant::now();
        let a = d
            .ask_rcpt("198.51.100.30", "unknown", &format!("x@{name}"), 0)
            .await;
        let took = t.elapsed().as_secs_f64();
        asked.push(format!("{name}: {a} in {took:.2} s"));
        if answered {
            assert_eq!(a, "action=DUNNO", "{name}");
        } else {
            assert!(a.starts_with("action=451 4.4.3 "), "{name}: {a}");
        }
        assert!(took < bound, "{name} took {took:.2} s, more than {bound} s");
    }
    eprintln!("{asked:#?}");

    // A silent server holds up only the lookups that wait for it.
    let silent = d.ask_rcpt("198.51.100.31", "unknown", "y@silent.test", 0);
    let ok = async {
        let t = Instant::now();
        let a = d.ask_rcpt("198.51.100.32", "unknown", "y@ok.test", 0).await;
        (a, t.elapsed())
    };
    let (silent, (ok, took)) = tokio::join!(silent, ok);
    assert!(silent.starts_with("action=451 4.4.3 "), "{silent}");
    assert_eq!(ok, "action=DUNNO");
    assert!(took < Duration::from_millis(500), "{took:?}");

    // Faults cleared: answered again, with no restart (failures are not
    // cached for long).
    for n in ["servfail.test", "silent.test", "truncated-silent.test"] {
        d.dns.clear_fault(n);
    }
    for n in ["servfail.test", "silent.test", "truncated-silent.test"] {
        let rcpt = format!("z@{n}");
        let d = &d;
        let recovered = eventually(Duration::from_secs(10), || {
            let rcpt = rcpt.clone();
            async move { d.ask_rcpt("198.51.100.33", "unknown", &rcpt, 0).await == "action=DUNNO" }
        })
        .await;
        assert!(recovered, "{n} answered again");
    }
}

// --------------------------------------------------------------- milter --

async fn milter_open(d: &Mxguard) -> TestConnection {
    TestConnection::configure()
        .read_timeout(Duration::from_secs(5))
        .open_tcp(d.milter_addr())
        .await
        .unwrap_or_else(|e| panic!("open milter connection: {e}"))
}

/// Connect through RCPT from `ip`; the connect stage's reply.
async fn milter_envelope(conn: &mut TestConnection, ip: &str) -> Status {
    conn.macros(MacroStage::Connect, [("j", "mx.mxguard.test")])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = SocketAddr::new(ip.parse().unwrap_or_else(|e| panic!("{e}")), 40000);
    let status = conn
        .connect("mail.example.com", addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    if status != Status::Continue {
        return status;
    }
    conn.helo("mail.example.com")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    conn.mail(["<bob@example.com>"])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let rcpt = conn
        .rcpt(["<alice@example.org>"])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(rcpt, Status::Continue);
    status
}

async fn sessions_in_flight(d: &Mxguard) -> f64 {
    d.metric("mxguard_sessions_in_flight{frontend=\"milter\"}")
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn milter_connections_dropped_mid_message_and_mid_body_leave_nothing_behind() {
    // At most 3 sessions per client address: a slot that a dropped session
    // kept would show as a 421 at connect below.
    let d = Mxguard::start("ratelimit: { concurrent_connections: 3 }").await;
    let body = vec![b'x'; 64 * 1024];
    for i in 0..40 {
        let mut conn = milter_open(&d).await;
        assert_eq!(
            milter_envelope(&mut conn, "198.51.100.60").await,
            Status::Continue
        );
        conn.header("From", "bob@example.com")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        conn.header("Subject", "cut short")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        if i % 2 == 1 {
            conn.eoh().await.unwrap_or_else(|e| panic!("{e}"));
            conn.body(body.clone())
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }
        // The MTA goes away without abort or quit.
        drop(conn);
    }
    assert!(
        eventually(Duration::from_secs(5), || async {
            sessions_in_flight(&d).await == 0.0
        })
        .await,
        "every dropped session ended: {}",
        sessions_in_flight(&d).await
    );
    // All three slots of the client are free again, and a whole message
    // still goes through.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut conn = milter_open(&d).await;
        assert_eq!(
            milter_envelope(&mut conn, "198.51.100.60").await,
            Status::Continue
        );
        held.push(conn);
    }
    let mut conn = held.pop().unwrap_or_else(|| panic!("three held"));
    conn.header("From", "bob@example.com")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    conn.eoh().await.unwrap_or_else(|e| panic!("{e}"));
    conn.body(&b"Hello.\r\n"[..])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (actions, status) = conn.eom().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status, Status::Accept);
    assert!(actions.has_insert_header(0, "X-Mxguard", indymilter_test::any()));
}

/// The inodes of the loopback TCP sockets connected to `port`.
fn sockets_to(port: u16) -> Vec<String> {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let want = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2)?.ends_with(&want)).then(|| f.get(9).map(|s| (*s).to_owned()))?
        })
        .collect()
}

/// Kills (SIGKILL) the smtpd processes of this Postfix instance that hold a
/// connection to the milter, as a crash of smtpd would. cleanup holds the
/// connection too during the message (smtpd hands it over), and lets it go
/// when its smtpd is gone; it is not killed, as Postfix throttles a
/// service for a minute when a process dies in its first use.
fn kill_smtpd_holding(postfix_dir: &Path, milter_port: u16) -> usize {
    let master: i32 = std::fs::read_to_string(postfix_dir.join("queue/pid/master.pid"))
        .unwrap_or_else(|e| panic!("master.pid: {e}"))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("master.pid: {e}"));
    let inodes = sockets_to(milter_port);
    let mut killed = 0;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let ppid = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.split(' ').nth(1))
            .and_then(|p| p.parse::<i32>().ok());
        let smtpd = stat
            .split_once(" (")
            .is_some_and(|(_, rest)| rest.starts_with("smtpd)"));
        if ppid != Some(master) || !smtpd {
            continue;
        }
        let holds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|fd| std::fs::read_link(fd.path()).ok())
            .any(|link| {
                let link = link.to_string_lossy().into_owned();
                inodes.iter().any(|i| link == format!("socket:[{i}]"))
            });
        if holds {
            // SAFETY: pid is a child of this test's own Postfix master.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            killed += 1;
        }
    }
    killed
}

/// Reads one SMTP reply (all its lines); its code.
async fn smtp_reply(s: &mut BufReader<TcpStream>) -> u16 {
    loop {
        let mut line = String::new();
        let n = tokio::time::timeout(Duration::from_secs(10), s.read_line(&mut line))
            .await
            .unwrap_or_else(|_| panic!("no SMTP reply"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(n > 0, "connection closed");
        if line.as_bytes().get(3) != Some(&b'-') {
            return line.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postfix_processes_killed_mid_body_leave_mxguard_serving() {
    let mxguard = Mxguard::start("").await;
    let sink = common::sink::Sink::start()
        .await
        .unwrap_or_else(|e| panic!("sink: {e}"));
    let wiring = common::postfix::Wiring {
        policy: Some(mxguard.policy_wiring()),
        milter: Some(mxguard.milter_wiring()),
    };
    // Should a process die in its first use anyway, its service is
    // throttled for a second rather than a minute.
    let postfix = common::postfix::Postfix::start(
        sink.addr().port(),
        &wiring,
        &[("service_throttle_time", "1s")],
    );
    let s = Stack {
        mxguard,
        sink,
        postfix,
    };
    let stream = TcpStream::connect(s.postfix.smtpd_addr())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut c = BufReader::new(stream);
    assert_eq!(smtp_reply(&mut c).await, 220);
    for (line, code) in [
        ("EHLO client.example.com", 250),
        ("XCLIENT ADDR=198.51.100.61 NAME=mail.example.com", 220),
        ("EHLO mail.example.com", 250),
        ("MAIL FROM:<bob@example.com>", 250),
        ("RCPT TO:<alice@example.org>", 250),
        ("DATA", 354),
    ] {
        c.get_mut()
            .write_all(format!("{line}\r\n").as_bytes())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(smtp_reply(&mut c).await, code, "{line}");
    }
    c.get_mut()
        .write_all(b"From: bob@example.com\r\nSubject: half\r\n\r\n")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for _ in 0..64 {
        c.get_mut()
            .write_all(&[b'y'; 1023])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        c.get_mut()
            .write_all(b"\n")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    // Postfix has the milter in the middle of this message: its smtpd and
    // cleanup processes die, and with them the milter connection.
    assert!(
        eventually(Duration::from_secs(5), || async {
            sessions_in_flight(&s.mxguard).await >= 1.0
        })
        .await
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let killed = kill_smtpd_holding(s.postfix.dir(), s.mxguard.milter_addr().port());
    assert_eq!(
        killed, 1,
        "the smtpd of this session holds the milter connection"
    );
    drop(c);
    assert!(
        eventually(Duration::from_secs(5), || async {
            sessions_in_flight(&s.mxguard).await == 0.0
        })
        .await,
        "the milter session of the killed smtpd ended"
    );
    // Postfix's master starts new processes; mail flows as before, and the
    // half message never arrives.
    let msg = common::smtp::message(
        "bob@example.com",
        "alice@example.org",
        "hello",
        "Hello.\r\n",
    );
    let env = common::smtp::Envelope {
        client_addr: "198.51.100.62",
        client_name: "mail.example.com",
        helo: "mail.example.com",
        from: "bob@example.com",
        to: &["alice@example.org"],
    };
    let t = common::smtp::send(s.postfix.smtpd_addr(), &env, &msg)
        .await
        .unwrap_or_else(|e| panic!("send: {e}; Postfix's log:\n{}", s.postfix.maillog()));
    assert_eq!(t.data.as_ref().map(|r| r.code), Some(250), "{t:?}");
    let got = s.sink.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].header("Subject").as_deref(), Some("hello"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        s.sink.messages().len(),
        1,
        "the half message is not delivered"
    );
}

// -------------------------------------------------------------- webhook --

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_that_hangs_is_a_421_within_timeout_and_retries() {
    // Accepts, reads, never answers; keeps every connection open.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let port = listener
        .local_addr()
        .unwrap_or_else(|e| panic!("{e}"))
        .port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            held.push(s);
        }
    });
    let s = Stack::start(
        &format!(
            "domains: {{ example.org: {{ rules: [\"hook:http://127.0.0.1:{port}/hang\", \
             \"alice:alice@example.net\"] }} }}\n\
             webhooks: {{ allow_private: true, timeout: 1s, retries: 1 }}\n"
        ),
        Wire::Both,
    )
    .await;
    let t0 = Instant::now();
    let t = s.send("198.51.100.70", &["hook@example.org"]).await;
    let took = t0.elapsed();
    let data = t.data.as_ref().unwrap_or_else(|| panic!("{t:?}"));
    assert_eq!(data.code, 421, "{t:?}");
    assert!(data.text().contains("4.3.0"), "{}", data.text());
    // One attempt and one retry, 1 s each, 2 s apart: about 4 s, far from
    // Postfix's milter_content_timeout.
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2,
        "first attempt and one retry"
    );
    // Nothing was delivered, and other mail flows.
    let t = s.send("198.51.100.71", &["alice@example.org"]).await;
    assert_eq!(t.data.as_ref().map(|r| r.code), Some(250), "{t:?}");
    let got = s.sink.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].rcpt_to, vec!["alice@example.net".to_owned()]);
}

// ------------------------------------------------------- state directory --

/// A tmpfs mounted for the test, unmounted when dropped (even on panic).
struct Tmpfs {
    dir: PathBuf,
    _parent: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(options: &str) -> Tmpfs {
        let parent = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let dir = parent.path().join("state");
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("{e}"));
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(&dir)
            .output()
            .unwrap_or_else(|e| panic!("mount: {e}"));
        assert!(
            out.status.success(),
            "mount -t tmpfs (the tests run as root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs {
            dir,
            _parent: parent,
        }
    }

    /// Writes a file until the file system is full; its path.
    fn fill(&self) -> PathBuf {
        let path = self.dir.join("filler");
        let mut f = std::fs::File::create(&path).unwrap_or_else(|e| panic!("{e}"));
        let block = vec![0u8; 4096];
        while f.write_all(&block).is_ok() {}
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// The real binary, `mxguard run -c PATH`, its standard error piped;
/// killed when dropped, so a failing test leaves no daemon behind.
struct Daemon(std::process::Child);

impl std::ops::Deref for Daemon {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Daemon {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_run(path: &Path) -> Daemon {
    Daemon(
        Command::new(env!("CARGO_BIN_EXE_mxguard"))
            .args(["run", "-c"])
            .arg(path)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run mxguard: {e}")),
    )
}

/// `mxguard run` with a policy listener and the store at `state`; its
/// exit status and standard error, or a panic if it keeps running.
fn run_until_exit(state: &Path) -> (Option<i32>, String) {
    let cfg = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = cfg.path().join("mxguard.yaml");
    std::fs::write(
        &path,
        format!(
            "milter: {{ listen: null }}\npolicy: {{ listen: \"inet:127.0.0.1:0\" }}\n\
             http: {{ listen: null }}\nstore: {{ path: \"{}\" }}\n",
            state.display()
        ),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mut child = spawn_run(&path);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap_or_else(|e| panic!("{e}")) {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            return (status.code(), err);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("mxguard started on an unusable state directory");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_read_only_or_full_state_directory_is_a_clear_start_failure() {
    let ro = Tmpfs::mount("size=1m,ro");
    let (code, err) = run_until_exit(&ro.dir.join("state.db"));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("cannot open the state store"), "{err}");
    assert!(err.contains("Read-only file system"), "{err}");
    assert!(
        err.contains(&ro.dir.display().to_string()),
        "names the path: {err}"
    );

    let full = Tmpfs::mount("size=256k");
    full.fill();
    let (code, err) = run_until_exit(&full.dir.join("state.db"));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("cannot open the state store"), "{err}");
    assert!(err.contains("No space left on device"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_state_directory_at_run_time_tempfails_then_recovers() {
    let fs = Tmpfs::mount("size=4m");
    let d = Mxguard::start(&format!(
        "greylist: {{ enabled: true, delay: 1h }}\n\
         store: {{ path: \"{}/state.db\", flush_interval: 100ms }}\n",
        fs.dir.display()
    ))
    .await;
    let mut c = PolicyConn::open(d.policy_addr())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut n = 0u32;
    let mut new_client = move || {
        n += 1;
        format!("10.{}.{}.{}", n >> 16 & 255, n >> 8 & 255, n & 255)
    };
    let a = c
        .ask(&new_client(), "alice@example.org")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(a.starts_with(GREYLISTED), "{a}");
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The disk fills up: once a flush fails, changes are refused and the
    // checks that need them follow store.on_error (tempfail).
    let filler = fs.fill();
    let mut refused_after = None;
    for i in 0..200_000u32 {
        let a = c
            .ask(&new_client(), "alice@example.org")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        if a == STORE_DOWN {
            refused_after = Some(i);
            break;
        }
        assert!(a.starts_with(GREYLISTED), "{a}");
        if i % 500 == 499 {
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }
    let refused_after =
        refused_after.unwrap_or_else(|| panic!("a full disk never made the store refuse changes"));
    eprintln!("the store refused changes after {refused_after} new entries on a full disk");
    for _ in 0..20 {
        let a = c
            .ask(&new_client(), "alice@example.org")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a, STORE_DOWN);
    }
    let failures = d
        .metric(
            "mxguard_store_failures_total{action=\"tempfail\",check=\"greylist\",error=\"unwritable\"}",
        )
        .await;
    assert!(failures >= 20.0, "{failures}");
    let (status, body) = d.http_get("/healthz").await;
    assert_eq!(status, "HTTP/1.1 503 Service Unavailable");
    assert!(body.contains("the state file cannot be written"), "{body}");

    // Room again: the store reopens its file and takes changes, with no
    // restart.
    std::fs::remove_file(&filler).unwrap_or_else(|e| panic!("{e}"));
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut back = false;
    while Instant::now() < deadline {
        if c.ask(&new_client(), "alice@example.org")
            .await
            .is_ok_and(|a| a.starts_with(GREYLISTED))
        {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(back, "greylisting works again once the disk has room");
    assert_eq!(
        d.http_get("/healthz").await,
        ("HTTP/1.1 200 OK".into(), "ok\n".into())
    );
    d.stop()
        .await
        .unwrap_or_else(|e| panic!("the final flush fails: {e}"));
}

// ---------------------------------------------------------------- SIGHUP --

#[test]
fn sighup_with_broken_files_under_load_keeps_every_answer_right() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let port = common::ports::free_port();
    let good = |reject: &str| {
        format!(
            "milter: {{ listen: null }}\npolicy: {{ listen: \"inet:127.0.0.1:{port}\", \
             reject_clients: [{reject}] }}\nhttp: {{ listen: null }}\n\
             store: {{ path: \"{}/state.db\" }}\ngreylist: {{ enabled: false }}\n",
            dir.path().display()
        )
    };
    let broken = [
        "policy: [this is not a map\n".to_owned(),
        format!("policy: {{ listen: \"inet:127.0.0.1:{port}\", frobnicate: 1 }}\n"),
        "greylist: { delay: five minutes }\n".to_owned(),
        String::new(),
        "\u{0}\u{1}binary\u{ff}".to_owned(),
    ];
    let path = dir.path().join("mxguard.yaml");
    std::fs::write(&path, good("192.0.2.66")).unwrap_or_else(|e| panic!("{e}"));
    let mut child = spawn_run(&path);
    let logs = Arc::new(Mutex::new(Vec::<String>::new()));
    if let Some(err) = child.stderr.take() {
        let logs = logs.clone();
        std::thread::spawn(move || {
            for line in StdBufReader::new(err).lines().map_while(Result::ok) {
                logs.lock().unwrap_or_else(|p| p.into_inner()).push(line);
            }
        });
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "mxguard did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = i32::try_from(child.id()).unwrap_or_else(|e| panic!("{e}"));

    // Eight Postfix-like connections, each asking without pause.
    let stop = Arc::new(AtomicBool::new(false));
    let switched = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for w in 0..8 {
        let (stop, switched, answered) = (stop.clone(), switched.clone(), answered.clone());
        workers.push(std::thread::spawn(move || {
            let s = std::net::TcpStream::connect(("127.0.0.1", port))
                .unwrap_or_else(|e| panic!("connect: {e}"));
            s.set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap_or_else(|e| panic!("{e}"));
            let mut r = StdBufReader::new(s.try_clone().unwrap_or_else(|e| panic!("{e}")));
            let mut s = s;
            let mut i = 0u64;
            let mut seen_new = false;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let client = if i.is_multiple_of(2) {
                    "192.0.2.66"
                } else {
                    "192.0.2.77"
                };
                write!(
                    s,
                    "request=smtpd_access_policy\nprotocol_state=RCPT\ninstance={w}.{i}\n\
                     client_address={client}\nrecipient=w{w}.{i}@example.org\n\n"
                )
                .unwrap_or_else(|e| panic!("worker {w} request {i}: {e}"));
                let mut action = String::new();
                r.read_line(&mut action)
                    .unwrap_or_else(|e| panic!("worker {w} request {i} unanswered: {e}"));
                let mut blank = String::new();
                r.read_line(&mut blank)
                    .unwrap_or_else(|e| panic!("worker {w} request {i}: {e}"));
                let reject = action.starts_with(REJECTED);
                if client == "192.0.2.66" {
                    assert!(reject, "worker {w} request {i}: {action}");
                } else if reject {
                    // Only once the good file is loaded, and never undone.
                    assert!(switched.load(Ordering::SeqCst), "{action}");
                    seen_new = true;
                } else {
                    assert_eq!(action, "action=DUNNO\n", "worker {w} request {i}");
                    assert!(!seen_new, "the good configuration was undone");
                }
                answered.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    std::thread::sleep(Duration::from_millis(300));
    for i in 0..40 {
        std::fs::write(&path, &broken[i % broken.len()]).unwrap_or_else(|e| panic!("{e}"));
        // SAFETY: pid is the mxguard child this test started.
        unsafe { libc::kill(pid, libc::SIGHUP) };
        std::thread::sleep(Duration::from_millis(50));
    }
    let rejected_before = logs
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|l| l.contains("configuration not reloaded, the running one stays"))
        .count();
    // A good file is put in force under the same load.
    switched.store(true, Ordering::SeqCst);
    std::fs::write(&path, good("192.0.2.66, 192.0.2.77")).unwrap_or_else(|e| panic!("{e}"));
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGHUP) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !logs
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .any(|l| l.contains("configuration reloaded"))
    {
        assert!(Instant::now() < deadline, "the good file was not loaded");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join()
            .unwrap_or_else(|_| panic!("a policy connection got a wrong answer or none"));
    }
    let total = answered.load(Ordering::Relaxed);
    eprintln!(
        "{total} requests answered over 40 broken reloads; {rejected_before} refusals logged"
    );
    assert!(rejected_before >= 1, "broken files are logged");
    assert!(total > 1000, "{total}");
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap_or_else(|e| panic!("{e}")) {
            break s;
        }
        assert!(Instant::now() < deadline, "mxguard did not stop");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0));
}
