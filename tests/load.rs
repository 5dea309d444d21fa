//! Load: thousands of connections held at once on both front ends, the
//! connections past each front end's limit refused at once and counted, and
//! the held ones still answered correctly. mxguard runs in this process, so
//! the process holds both ends of every connection.

mod common;

use common::daemon::Mxguard;
use indymilter_test::{MacroStage, Status, TestConnection, any};
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
    sync::Mutex,
};

const POLICY_HELD: usize = 2000;
const POLICY_EXTRA: usize = 100;
const MILTER_HELD: usize = 1000;
const MILTER_EXTRA: usize = 50;
/// Connections opened at once while filling up: below the listen backlog
/// (1024), so no SYN is dropped and retried a second later.
const BATCH: usize = 250;

/// The two tests measure descriptors and memory of the whole process: one
/// at a time.
static SERIAL: Mutex<()> = Mutex::const_new(());

/// Makes sure the process may open `needed` descriptors: the soft limit is
/// raised to the hard one (the daemon's own function), and the hard one too
/// when it is lower and we are root.
fn ensure_open_files(needed: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct given.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) },
        0,
        "getrlimit: {}",
        std::io::Error::last_os_error()
    );
    if lim.rlim_max < needed {
        let raised = libc::rlimit {
            rlim_cur: needed,
            rlim_max: needed,
        };
        // SAFETY: setrlimit only reads the struct given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            panic!(
                "this test needs {needed} open files and the hard limit is {} (raising it: {}); \
                 run it as root or with `ulimit -Hn {needed}`",
                lim.rlim_max,
                std::io::Error::last_os_error()
            );
        }
    }
    let now = mxguard::net::raise_open_files_limit()
        .unwrap_or_else(|e| panic!("cannot raise the open files limit: {e}"));
    assert!(
        now >= needed,
        "this test needs {needed} open files; the limit is {now}"
    );
    now
}

/// Open descriptors and resident memory (KiB) of this process.
fn footprint() -> (usize, u64) {
    let fds = std::fs::read_dir("/proc/self/fd")
        .unwrap_or_else(|e| panic!("/proc/self/fd: {e}"))
        .count();
    let status = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_else(|e| panic!("/proc/self/status: {e}"));
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/self/status"));
    (fds, rss)
}

/// Waits until `series` reads `want` (metrics are updated by the daemon's
/// tasks, a moment after the client's side of things).
async fn wait_metric(d: &Mxguard, series: &str, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = d.metric(series).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{series} is {got}, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `make(i)` for `0..n`, `BATCH` at a time, and returns the results in
/// order.
async fn in_batches<T, F, Fut>(n: usize, make: F) -> Vec<T>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let mut out = Vec::with_capacity(n);
    for start in (0..n).step_by(BATCH) {
        let handles: Vec<_> = (start..(start + BATCH).min(n))
            .map(|i| tokio::spawn(make(i)))
            .collect();
        for h in handles {
            out.push(h.await.unwrap_or_else(|e| panic!("task: {e}")));
        }
    }
    out
}

/// Client `i`: every tenth one is in `policy.reject_clients` (192.0.2.0/24,
/// and 192.0.3.0/24 past 255), the others are not.
fn policy_client(i: usize) -> (String, bool) {
    let low = u8::try_from(i % 250).unwrap_or(0);
    let high = u8::try_from(i / 250).unwrap_or(0);
    if i.is_multiple_of(10) {
        (format!("192.0.{}.{}", 2 + (i / 250) % 2, low), true)
    } else {
        (format!("198.51.{high}.{low}"), false)
    }
}

fn policy_request(client: &str, i: usize) -> String {
    format!(
        "request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\nclient_address={client}\n\
         client_name=unknown\nreverse_client_name=unknown\nhelo_name=mail.example.com\nsender=bob@example.com\n\
         recipient=user{i}@example.org\nrecipient_count=0\nqueue_id=\ninstance=load{i}\nsize=0\n\n"
    )
}

fn policy_expected(client: &str, rejected: bool) -> String {
    if rejected {
        format!(
            "action=REJECT 5.7.1 Your client address {client} is refused by this server's policy; \
             if you think this is a mistake, reach the recipient's postmaster another way\n\n"
        )
    } else {
        "action=DUNNO\n\n".to_owned()
    }
}

/// Sends one request and reads its answer through the empty line.
async fn ask(s: &mut BufReader<TcpStream>, req: &str) -> String {
    s.get_mut()
        .write_all(req.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("write: {e}"));
    let mut answer = String::new();
    while !answer.ends_with("\n\n") {
        let n = tokio::time::timeout(Duration::from_secs(20), s.read_line(&mut answer))
            .await
            .unwrap_or_else(|_| panic!("no answer within 20 s; so far {answer:?}"))
            .unwrap_or_else(|e| panic!("read: {e}"));
        assert!(n > 0, "connection closed; so far {answer:?}");
    }
    answer
}

async fn policy_connect(addr: SocketAddr) -> BufReader<TcpStream> {
    BufReader::new(
        tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
            .await
            .unwrap_or_else(|_| panic!("policy connect: timed out"))
            .unwrap_or_else(|e| panic!("policy connect: {e}")),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_holds_2000_connections_and_refuses_the_next_ones_at_once() {
    let _serial = SERIAL.lock().await;
    // Both ends of every connection, plus the daemon's own files and slack.
    let limit = ensure_open_files(2 * (POLICY_HELD + POLICY_EXTRA) as u64 + 512);
    let (fds_before, rss_before) = footprint();
    let d = Mxguard::start(&format!(
        "policy: {{ max_connections: {POLICY_HELD}, reject_clients: [192.0.2.0/24, 192.0.3.0/24] }}"
    ))
    .await;
    let addr = d.policy_addr();
    let started = Instant::now();
    let held = in_batches(POLICY_HELD, move |_| policy_connect(addr)).await;
    let opened = started.elapsed();
    wait_metric(
        &d,
        r#"mxguard_sessions_in_flight{frontend="policy"}"#,
        POLICY_HELD as f64,
    )
    .await;

    // Every held connection is answered, each with its own verdict.
    let started = Instant::now();
    let mut held = {
        let mut answered = Vec::with_capacity(POLICY_HELD);
        let mut tasks = Vec::with_capacity(POLICY_HELD);
        for (i, mut s) in held.into_iter().enumerate() {
            tasks.push(tokio::spawn(async move {
                let (client, rejected) = policy_client(i);
                let answer = ask(&mut s, &policy_request(&client, i)).await;
                assert_eq!(answer, policy_expected(&client, rejected), "connection {i}");
                (s, rejected)
            }));
        }
        let mut rejected = 0;
        for t in tasks {
            let (s, r) = t.await.unwrap_or_else(|e| panic!("task: {e}"));
            rejected += usize::from(r);
            answered.push(s);
        }
        assert_eq!(rejected, POLICY_HELD / 10);
        answered
    };
    let asked = started.elapsed();
    let (fds_held, rss_held) = footprint();

    // Past the limit: accepted and closed at once, no answer, counted.
    let started = Instant::now();
    let refused = in_batches(POLICY_EXTRA, move |_| async move {
        let mut s = policy_connect(addr).await.into_inner();
        let mut buf = [0u8; 64];
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
            Ok(Ok(0)) => true,
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => true,
            Ok(Ok(n)) => panic!("a refused connection got {n} bytes: {:?}", &buf[..n]),
            Ok(Err(e)) => panic!("a refused connection failed: {e}"),
            Err(_) => false,
        }
    })
    .await;
    let refusing = started.elapsed();
    assert!(
        refused.iter().all(|closed| *closed),
        "{} of {POLICY_EXTRA} connections past the limit were not closed within 5 s",
        refused.iter().filter(|c| !**c).count()
    );
    assert_eq!(
        d.metric(r#"mxguard_connections_refused_total{frontend="policy"}"#)
            .await,
        POLICY_EXTRA as f64
    );
    // The held ones are still served after the refusals.
    for i in [0, 1, POLICY_HELD - 1] {
        let (client, rejected) = policy_client(i);
        assert_eq!(
            ask(&mut held[i], &policy_request(&client, i)).await,
            policy_expected(&client, rejected)
        );
    }

    // Closing them frees the slots: new connections are served again.
    drop(held);
    wait_metric(&d, r#"mxguard_sessions_in_flight{frontend="policy"}"#, 0.0).await;
    for i in 0..50 {
        let mut s = policy_connect(addr).await;
        let (client, rejected) = policy_client(i);
        assert_eq!(
            ask(&mut s, &policy_request(&client, i)).await,
            policy_expected(&client, rejected)
        );
    }
    assert_eq!(
        d.metric(r#"mxguard_connections_refused_total{frontend="policy"}"#)
            .await,
        POLICY_EXTRA as f64
    );
    d.stop()
        .await
        .unwrap_or_else(|e| panic!("mxguard did not stop cleanly: {e}"));
    let (fds_after, rss_after) = footprint();
    println!(
        "load/policy: open files limit {limit}; {POLICY_HELD} connections opened in {opened:?}, \
         answered in {asked:?}; {POLICY_EXTRA} past the limit refused in {refusing:?}, counted; \
         descriptors {fds_before} before, {fds_held} held, {fds_after} after; \
         RSS {rss_before} KiB before, {rss_held} KiB held, {rss_after} KiB after"
    );
    assert!(
        fds_held >= 2 * POLICY_HELD,
        "{fds_held} descriptors while {POLICY_HELD} connections are held"
    );
}

fn milter_client(i: usize) -> SocketAddr {
    // A distinct address per session: the per-client concurrency limit
    // (10) must not be what refuses them.
    let n = u32::try_from(i).unwrap_or(0);
    SocketAddr::new(
        IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 20, 0, 0)) + n)),
        40000,
    )
}

async fn milter_open(addr: SocketAddr) -> TestConnection {
    TestConnection::configure()
        .read_timeout(Duration::from_secs(20))
        .open_tcp(addr)
        .await
        .unwrap_or_else(|e| panic!("open milter connection: {e}"))
}

/// Connect through the first body chunk of a message; the message is left
/// open.
async fn milter_start(addr: SocketAddr, i: usize) -> TestConnection {
    let mut c = milter_open(addr).await;
    c.macros(MacroStage::Connect, [("j", "mx.mxguard.test")])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let status = c
        .connect("mail.example.com", milter_client(i))
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"));
    assert_eq!(status, Status::Continue, "session {i} at connect");
    c.helo("mail.example.com")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    c.macros(MacroStage::Mail, [("i", format!("LOAD{i:05}").as_str())])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    c.mail(["<bob@example.com>"])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let status = c
        .rcpt([format!("<user{i}@example.org>")])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status, Status::Continue, "session {i} at RCPT");
    c.data().await.unwrap_or_else(|e| panic!("{e}"));
    c.header("From", " bob@example.com")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    c.header("Subject", format!(" load {i}").as_str())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    c.eoh().await.unwrap_or_else(|e| panic!("{e}"));
    c.body(format!("Message {i}, first half.\r\n"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn milter_holds_1000_open_messages_and_refuses_the_next_sessions_with_421() {
    let _serial = SERIAL.lock().await;
    let limit = ensure_open_files(2 * (MILTER_HELD + MILTER_EXTRA) as u64 + 512);
    let (fds_before, rss_before) = footprint();
    let d = Mxguard::start(&format!("milter: {{ max_connections: {MILTER_HELD} }}")).await;
    let addr = d.milter_addr();
    let started = Instant::now();
    let mut held = in_batches(MILTER_HELD, move |i| milter_start(addr, i)).await;
    let opened = started.elapsed();
    wait_metric(
        &d,
        r#"mxguard_sessions_in_flight{frontend="milter"}"#,
        MILTER_HELD as f64,
    )
    .await;
    let (fds_held, rss_held) = footprint();

    // Past the limit: told 421 at connect at once (Postfix then answers
    // its client 421 and closes), and counted.
    let started = Instant::now();
    let mut refused = Vec::with_capacity(MILTER_EXTRA);
    for i in 0..MILTER_EXTRA {
        let mut c = milter_open(addr).await;
        let status = c
            .connect("mail.example.com", milter_client(MILTER_HELD + i))
            .await
            .unwrap_or_else(|e| panic!("connect: {e}"));
        match &status {
            Status::Tempfail { message: Some(m) } => assert_eq!(
                m.to_string_lossy(),
                format!(
                    "421 4.7.0 Too many connections to the mail filter ({MILTER_HELD} open); \
                     please try again later"
                )
            ),
            other => panic!("session {} past the limit: {other:?}", MILTER_HELD + i),
        }
        refused.push(c);
    }
    let refusing = started.elapsed();
    assert!(
        refusing < Duration::from_secs(10),
        "refusals took {refusing:?}"
    );
    assert_eq!(
        d.metric(r#"mxguard_connections_refused_total{frontend="milter"}"#)
            .await,
        MILTER_EXTRA as f64
    );
    drop(refused);

    // Every held message is finished and accepted with its trace header.
    let started = Instant::now();
    let tasks: Vec<_> = held
        .drain(..)
        .enumerate()
        .map(|(i, mut c)| {
            tokio::spawn(async move {
                c.body("Second half.\r\n")
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
                let (actions, status) = c.eom().await.unwrap_or_else(|e| panic!("eom {i}: {e}"));
                assert_eq!(status, Status::Accept, "session {i} at end of message");
                assert!(
                    actions.has_insert_header(0, "X-Mxguard", any()),
                    "session {i}: {actions:?}"
                );
                c
            })
        })
        .collect();
    for t in tasks {
        held.push(t.await.unwrap_or_else(|e| panic!("task: {e}")));
    }
    let finished = started.elapsed();
    assert_eq!(
        d.metric(r#"mxguard_requests_total{frontend="milter",verdict="accept"}"#)
            .await,
        MILTER_HELD as f64
    );

    // Closing them frees the slots.
    drop(held);
    wait_metric(&d, r#"mxguard_sessions_in_flight{frontend="milter"}"#, 0.0).await;
    let c = milter_start(addr, 0).await;
    drop(c);
    assert_eq!(
        d.metric(r#"mxguard_connections_refused_total{frontend="milter"}"#)
            .await,
        MILTER_EXTRA as f64
    );
    d.stop()
        .await
        .unwrap_or_else(|e| panic!("mxguard did not stop cleanly: {e}"));
    let (fds_after, rss_after) = footprint();
    println!(
        "load/milter: open files limit {limit}; {MILTER_HELD} messages opened in {opened:?}, \
         {MILTER_EXTRA} sessions past the limit told 421 in {refusing:?}, counted; \
         {MILTER_HELD} messages finished in {finished:?}; \
         descriptors {fds_before} before, {fds_held} held, {fds_after} after; \
         RSS {rss_before} KiB before, {rss_held} KiB held, {rss_after} KiB after"
    );
    assert!(
        fds_held >= 2 * MILTER_HELD,
        "{fds_held} descriptors while {MILTER_HELD} sessions are held"
    );
}

/// Sets the soft limit on open files (the hard one stays).
fn set_soft_open_files(soft: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct given.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = soft.min(lim.rlim_max);
        assert_eq!(
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim),
            0,
            "setrlimit: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_milter_survives_running_out_of_descriptors() {
    let _serial = SERIAL.lock().await;
    let limit = ensure_open_files(1024);
    let d = Mxguard::start("").await;
    let addr = d.milter_addr();
    // The HTTP listener answers once the daemon has opened its store and
    // started every front end.
    wait_metric(&d, r#"mxguard_sessions_in_flight{frontend="milter"}"#, 0.0).await;
    // Connections the kernel completes while the daemon cannot accept them.
    let waiting: Vec<std::net::TcpStream> = (0..10)
        .map(|_| std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect: {e}")))
        .collect();
    let (fds, _) = footprint();
    // No descriptor left: the daemon's accept fails with EMFILE...
    set_soft_open_files(u64::try_from(fds).unwrap_or(u64::MAX));
    let more: Vec<std::net::TcpStream> = (0..5)
        .filter_map(|_| std::net::TcpStream::connect(addr).ok())
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    set_soft_open_files(limit);
    drop(more);
    drop(waiting);
    // ...and once descriptors are free again, it serves as before.
    let c = milter_start(addr, 1).await;
    let mut c = c;
    let (_, status) = c.eom().await.unwrap_or_else(|e| panic!("eom: {e}"));
    assert_eq!(status, Status::Accept);
    drop(c);
    d.stop()
        .await
        .unwrap_or_else(|e| panic!("the milter front end did not survive EMFILE: {e}"));
}
