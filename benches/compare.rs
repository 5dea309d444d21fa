//! mxguard beside the peers Debian ships, in one run:
//! `cargo bench --bench compare [-- --quick]` (contrib/bench/run.sh installs
//! the peers and runs it). Prints Markdown tables: the median of the runs
//! and their min–max. Not a test: it measures and checks nothing.
//!
//! Policy front end vs postgrey: the same load generator and request mix
//! (90 % known triplets, 10 % new) at 1, 16 and 64 connections.

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;
#[path = "support/milter.rs"]
mod milter;

use common::daemon::Mxguard;
use std::{
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
};

struct Settings {
    quick: bool,
    runs: usize,
    seconds: f64,
}

/// One measurement: requests/s and latency percentiles (µs).
#[derive(Clone, Copy, Default)]
struct Sample {
    rate: f64,
    p50: f64,
    p99: f64,
}

fn median(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        return (0.0, 0.0, 0.0);
    }
    (v[n / 2], v[0], v[n - 1])
}

fn request(client: &str, sender: &str, rcpt: &str, n: u64) -> String {
    format!(
        "request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\n\
         client_address={client}\nclient_name=unknown\nreverse_client_name=unknown\n\
         helo_name=mail.example.net\nsender={sender}\nrecipient={rcpt}\nrecipient_count=0\n\
         queue_id=\ninstance=b{n:x}.{n:x}\nsize=10240\netrn_domain=\nstress=\nsasl_method=\n\
         sasl_username=\nsasl_sender=\nccert_subject=\nccert_issuer=\nccert_fingerprint=\n\
         encryption_protocol=\nencryption_cipher=\nencryption_keysize=0\n\n"
    )
}

/// The triplet of known entry `i`.
fn known(i: u64) -> (String, String, String) {
    (
        format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255),
        format!("sender{i}@example.net"),
        format!("rcpt{}@example.org", i % 97),
    )
}

const KNOWN: u64 = 2000;

async fn ask(conn: &mut BufReader<TcpStream>, req: &str) -> std::io::Result<String> {
    conn.get_mut().write_all(req.as_bytes()).await?;
    let mut answer = String::new();
    loop {
        let mut line = String::new();
        if conn.read_line(&mut line).await? == 0 {
            return Err(std::io::Error::other("closed"));
        }
        if line.trim().is_empty() {
            return Ok(answer);
        }
        answer = line;
    }
}

/// Makes every known triplet pass greylisting (first try, wait, retry).
async fn warm_up(addr: SocketAddr, delay: Duration) {
    let mut c = BufReader::new(
        TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("{e}")),
    );
    for round in 0..2 {
        for i in 0..KNOWN {
            let (ip, s, r) = known(i);
            let _ = ask(&mut c, &request(&ip, &s, &r, i)).await;
        }
        if round == 0 {
            tokio::time::sleep(delay + Duration::from_millis(500)).await;
        }
    }
}

async fn policy_load(addr: SocketAddr, conns: usize, seconds: f64, seed: u64) -> Sample {
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for t in 0..conns {
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = BufReader::new(TcpStream::connect(addr).await.ok()?);
            let mut lat = Vec::with_capacity(100_000);
            let mut n: u64 = seed.wrapping_mul(1_000_003) + t as u64 * 7919;
            while !stop.load(Ordering::Relaxed) {
                n = n
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                let req = if (n >> 33).is_multiple_of(10) {
                    // A new triplet: a client never seen.
                    let id = n >> 20;
                    request(
                        &format!("172.{}.{}.{}", (id >> 16) & 255, (id >> 8) & 255, id & 255),
                        &format!("new{id}@example.com"),
                        "rcpt1@example.org",
                        n,
                    )
                } else {
                    let (ip, s, r) = known((n >> 33) % KNOWN);
                    request(&ip, &s, &r, n)
                };
                let started = Instant::now();
                ask(&mut c, &req).await.ok()?;
                lat.push(started.elapsed().as_micros() as u32);
            }
            Some(lat)
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all: Vec<u32> = Vec::new();
    for t in tasks {
        if let Ok(Some(l)) = t.await {
            all.extend(l);
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0) as f64
    };
    Sample {
        rate: all.len() as f64 / elapsed,
        p50: pct(0.50),
        p99: pct(0.99),
    }
}

struct Postgrey {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Postgrey {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_postgrey() -> Option<Postgrey> {
    let bin = "/usr/sbin/postgrey";
    if !std::path::Path::new(bin).exists() {
        eprintln!("postgrey is not installed (apt-get install postgrey): its rows are left out");
        return None;
    }
    let dir = tempfile::tempdir().ok()?;
    let _ = Command::new("chown")
        .args(["postgrey:postgrey", &dir.path().display().to_string()])
        .status();
    let port = common::ports::free_port();
    let child = Command::new(bin)
        .arg(format!("--inet=127.0.0.1:{port}"))
        .arg(format!("--dbdir={}", dir.path().display()))
        .arg("--delay=1")
        .arg("--quiet")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().ok()?;
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::net::TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            eprintln!("postgrey did not start");
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Some(Postgrey {
        child,
        addr,
        _dir: dir,
    })
}

async fn policy_table(s: &Settings) {
    println!("## Policy front end vs postgrey\n");
    println!(
        "Greylisting at RCPT with a delay of 1 s, 2 000 known triplets warmed up, then a mix of \
         90 % known and 10 % new triplets for {} s per run; {} runs; median (min–max).\n",
        s.seconds, s.runs
    );
    println!("| server | connections | requests/s | p50 µs | p99 µs |");
    println!("|---|---|---|---|---|");
    let yaml = "greylist: { enabled: true, delay: 1s }\nratelimit: { messages_per_recipient: 1000000000, max_recipients: 1000000 }\nlog: { level: error }";
    let mut rates: Vec<(String, usize, f64)> = Vec::new();
    // (label, policy address, the server kept alive while measured)
    type Target = (
        String,
        Option<SocketAddr>,
        Option<Mxguard>,
        Option<Postgrey>,
    );
    let mut targets: Vec<Target> = Vec::new();
    let embedded = Mxguard::start(yaml).await;
    targets.push((
        "mxguard (embedded store)".into(),
        Some(embedded.policy_addr()),
        Some(embedded),
        None,
    ));
    match common::redis::RedisServer::start() {
        Ok(redis) => {
            let d = Mxguard::start(&format!(
                "{yaml}\nstore: {{ backend: redis, url: \"{}\" }}",
                redis.url()
            ))
            .await;
            targets.push((
                "mxguard (Redis)".into(),
                Some(d.policy_addr()),
                Some(d),
                None,
            ));
            std::mem::forget(redis);
        }
        Err(e) => eprintln!("no redis-server ({e}): the Redis rows are left out"),
    }
    if let Some(pg) = start_postgrey() {
        let addr = pg.addr;
        targets.push(("postgrey".into(), Some(addr), None, Some(pg)));
    }
    for (name, addr, _, _) in &targets {
        let Some(addr) = *addr else { continue };
        warm_up(addr, Duration::from_secs(1)).await;
        for conns in [1, 16, 64] {
            let mut samples = Vec::new();
            for run in 0..s.runs {
                samples.push(policy_load(addr, conns, s.seconds, run as u64 + 1).await);
            }
            let (r, rmin, rmax) = median(samples.iter().map(|x| x.rate).collect());
            let (p50, _, _) = median(samples.iter().map(|x| x.p50).collect());
            let (p99, p99min, p99max) = median(samples.iter().map(|x| x.p99).collect());
            println!(
                "| {name} | {conns} | {r:.0} ({rmin:.0}–{rmax:.0}) | {p50:.0} | {p99:.0} ({p99min:.0}–{p99max:.0}) |"
            );
            rates.push((name.clone(), conns, r));
        }
    }
    println!();
    for conns in [1, 16, 64] {
        let get = |n: &str| {
            rates
                .iter()
                .find(|(x, c, _)| x == n && *c == conns)
                .map(|(_, _, r)| *r)
        };
        if let (Some(m), Some(p)) = (get("mxguard (embedded store)"), get("postgrey"))
            && p > 0.0
        {
            println!(
                "- {conns} connections: mxguard (embedded) / postgrey = {:.1}×",
                m / p
            );
        }
    }
    println!();
    drop(targets);
}

struct Opendmarc {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Drop for Opendmarc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback DNS server on port 53 with `records`, and a resolv.conf
/// naming it: for peers that ask only /etc/resolv.conf's servers on port
/// 53. Needs root (port 53, and a mount namespace for the peer).
struct PeerDns {
    _server: common::dns::DnsServer,
    _dir: tempfile::TempDir,
}

async fn peer_dns(records: &[(&str, &str)]) -> Option<(PeerDns, std::path::PathBuf)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root: opendmarc asks the system's resolver");
        return None;
    }
    let ip = "127.0.0.153";
    let server = common::dns::DnsServer::start_at(format!("{ip}:53").parse().ok()?)
        .await
        .map_err(|e| {
            eprintln!("no DNS server on {ip}:53 ({e}): opendmarc asks the system's resolver")
        })
        .ok()?;
    for (owner, text) in records {
        server.add_txt(owner, text);
    }
    let dir = tempfile::tempdir().ok()?;
    let conf = dir.path().join("resolv.conf");
    std::fs::write(&conf, format!("nameserver {ip}\n")).ok()?;
    let _ = Command::new("chmod")
        .args(["755", &dir.path().display().to_string()])
        .status();
    Some((
        PeerDns {
            _server: server,
            _dir: dir,
        },
        conf,
    ))
}

/// Debian's opendmarc on a free loopback port, checking SPF itself and
/// rejecting DMARC failures; with `resolv` its /etc/resolv.conf is that
/// file (a private mount namespace).
fn start_opendmarc(resolv: Option<&std::path::Path>) -> Option<Opendmarc> {
    let bin = "/usr/sbin/opendmarc";
    if !std::path::Path::new(bin).exists() {
        eprintln!("opendmarc is not installed (apt-get install opendmarc): its rows are left out");
        return None;
    }
    let dir = tempfile::tempdir().ok()?;
    let port = common::ports::free_port();
    let conf = dir.path().join("opendmarc.conf");
    std::fs::write(
        &conf,
        format!(
            "Socket inet:{port}@127.0.0.1\nAuthservID mx.bench\nSyslog false\nRejectFailures true\n\
             SPFSelfValidate true\nIgnoreHosts {}/ignore\nPidFile {}/pid\nUserID opendmarc\n",
            dir.path().display(),
            dir.path().display()
        ),
    )
    .ok()?;
    // No host is exempt (the default exempts 127.0.0.1).
    std::fs::write(dir.path().join("ignore"), "192.0.2.255\n").ok()?;
    let _ = Command::new("chmod")
        .args(["755", &dir.path().display().to_string()])
        .status();
    let mut cmd = match resolv {
        Some(r) => {
            let mut c = Command::new("unshare");
            c.args(["-m", "sh", "-c"]).arg(format!(
                "mount --bind '{}' /etc/resolv.conf && exec {bin} -c '{}' -f",
                r.display(),
                conf.display()
            ));
            c
        }
        None => {
            let mut c = Command::new(bin);
            c.arg("-c").arg(&conf).arg("-f");
            c
        }
    };
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            eprintln!("opendmarc did not start");
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Some(Opendmarc {
        child,
        addr: format!("inet:127.0.0.1:{port}"),
        _dir: dir,
    })
}

/// The floor of the end-to-end figures: a policy service that answers
/// DUNNO at once, and a milter that asks for what mxguard asks (every stage,
/// no reply where mxguard needs none, the same TCP handling) and makes the
/// same edits with constant values. What they cost is Postfix's and the
/// kernel's share of the two protocols and of forwarding, which no policy
/// service or milter can avoid; the difference to mxguard's row is
/// mxguard's own work.
struct NullServices {
    policy: SocketAddr,
    milter: String,
    _stop: tokio::sync::watch::Sender<bool>,
}

async fn start_null_services() -> Option<NullServices> {
    use indymilter::{Callbacks, ContextActions, ProtoOpts, Status};
    use mxguard::{
        config::{ListenAddr, SocketMode},
        net::{Listener, StoppableListener},
    };
    let policy = tokio::net::TcpListener::bind("127.0.0.1:0").await.ok()?;
    let policy_addr = policy.local_addr().ok()?;
    tokio::spawn(async move {
        while let Ok((conn, _)) = policy.accept().await {
            let _ = conn.set_nodelay(true);
            tokio::spawn(async move {
                let (r, mut w) = conn.into_split();
                let mut lines = BufReader::new(r).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if line.is_empty() && w.write_all(b"action=DUNNO\n\n").await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let addr = ListenAddr::Inet {
        host: "127.0.0.1".into(),
        port: 0,
    };
    let listener = Listener::bind(&addr, SocketMode(0o600)).await.ok()?;
    let milter = listener.local_addr().ok()?.to_string();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let quiet = ProtoOpts::NOREPLY_HELO
        | ProtoOpts::NOREPLY_MAIL
        | ProtoOpts::NOREPLY_DATA
        | ProtoOpts::NOREPLY_HEADER
        | ProtoOpts::NOREPLY_EOH
        | ProtoOpts::NOREPLY_BODY;
    let callbacks: Callbacks<()> = Callbacks::new()
        .on_negotiate(move |cx, _, opts| {
            cx.requested_opts |= quiet.intersection(opts);
            Box::pin(async { Status::Continue })
        })
        .on_connect(|_, _, _| Box::pin(async { Status::Continue }))
        .on_helo(|_, _| Box::pin(async { Status::Noreply }))
        .on_mail(|_, _| Box::pin(async { Status::Noreply }))
        .on_rcpt(|_, _| Box::pin(async { Status::Continue }))
        .on_data(|_| Box::pin(async { Status::Noreply }))
        .on_header(|_, _, _| Box::pin(async { Status::Noreply }))
        .on_eoh(|_| Box::pin(async { Status::Noreply }))
        .on_body(|_, _| Box::pin(async { Status::Noreply }))
        // The edits mxguard makes to this benchmark's forwarded message,
        // with constant values: the work Postfix's cleanup does for them.
        .on_eom(|cx| {
            Box::pin(async move {
                let headers = [
                    ("X-Mxguard", " mx.bench.test 0"),
                    (
                        "Received",
                        " from mail.example.com (127.0.0.1) by mx.bench.test",
                    ),
                    ("X-Original-To", " alice@example.org"),
                    (
                        "Authentication-Results",
                        " mx.bench.test; spf=pass; dmarc=pass",
                    ),
                    ("X-Original-From", " bob@example.com"),
                    ("Reply-To", " bob@example.com"),
                ];
                for (name, value) in headers {
                    if cx.actions.insert_header(0, name, value).await.is_err() {
                        return Status::Tempfail;
                    }
                }
                let edits = async {
                    cx.actions
                        .change_header("From", 1, Some(" \"bob\" <noreply@example.org>"))
                        .await?;
                    cx.actions
                        .change_sender(
                            "<SRS0=abcd=TT=example.com=bob@srs.bench.test>",
                            None::<&str>,
                        )
                        .await?;
                    cx.actions.delete_recipient("<alice@example.org>").await?;
                    cx.actions.add_recipient("<alice@example.net>").await
                };
                match edits.await {
                    Ok(()) => Status::Accept,
                    Err(_) => Status::Tempfail,
                }
            })
        });
    let config = indymilter::Config {
        actions: mxguard::milter::REQUIRED_ACTIONS,
        ..Default::default()
    };
    let mut shutdown = stopped.clone();
    tokio::spawn(indymilter::run(
        StoppableListener::new(listener, stopped),
        callbacks,
        config,
        async move {
            let _ = shutdown.wait_for(|s| *s).await;
        },
    ));
    Some(NullServices {
        policy: policy_addr,
        milter,
        _stop: stop,
    })
}

/// smtp-source → Postfix (wired as given) → smtp-sink: messages/s accepted.
fn postfix_run(
    wiring: &common::postfix::Wiring,
    extra: &[(&str, &str)],
    messages: usize,
) -> Option<(f64, f64)> {
    let sink_port = common::ports::free_port();
    let mut sink = Command::new("/usr/sbin/smtp-sink")
        .args(["-u", "nobody", &format!("127.0.0.1:{sink_port}"), "256"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    // Postfix must not find the sink closed: it would defer everything
    // through the error transport and measure that instead.
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", sink_port)).is_err() {
        if Instant::now() > deadline {
            eprintln!("smtp-sink did not start");
            let _ = sink.kill();
            let _ = sink.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // The client is not in mynetworks, so the policy service is asked.
    let mut all: Vec<(&str, &str)> = vec![("mynetworks", "127.0.0.2/32")];
    all.extend_from_slice(extra);
    let pf = common::postfix::Postfix::start(sink_port, wiring, &all);
    let started = Instant::now();
    let out = Command::new("/usr/sbin/smtp-source")
        .args([
            "-s",
            &std::env::var("MXGUARD_BENCH_SESSIONS").unwrap_or_else(|_| "20".into()),
            "-m",
            &messages.to_string(),
            "-l",
            "10240",
            "-f",
            "bob@example.com",
            "-t",
            "alice@example.org",
            &pf.smtpd_addr().to_string(),
        ])
        .output()
        .ok()?;
    let accepted = started.elapsed().as_secs_f64();
    if !out.status.success() {
        eprintln!("smtp-source: {}", String::from_utf8_lossy(&out.stderr));
        let _ = sink.kill();
        let _ = sink.wait();
        return None;
    }
    // Delivered: the queue is empty again.
    let deadline = Instant::now() + Duration::from_secs(120);
    while queued(&pf.dir().join("queue")) > 0 {
        if Instant::now() > deadline {
            eprintln!("Postfix did not empty its queue within 120 s");
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let delivered = started.elapsed().as_secs_f64();
    let _ = sink.kill();
    let _ = sink.wait();
    let log = pf.maillog();
    if std::env::var_os("MXGUARD_BENCH_MAILLOG").is_some() {
        eprintln!("{log}");
    }
    let refused = log.matches(" reject: ").count() + log.matches("milter-reject").count();
    let unsent = log.matches("status=").count() - log.matches("status=sent").count();
    if refused + unsent > 0 {
        eprintln!(
            "{refused} messages refused and {unsent} deliveries not sent during the run; \
             the figure is not comparable"
        );
    }
    Some((messages as f64 / accepted, messages as f64 / delivered))
}

/// Messages in a Postfix queue directory (incoming, active, deferred…).
fn queued(queue: &std::path::Path) -> usize {
    fn walk(dir: &std::path::Path) -> usize {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return 0;
        };
        entries
            .flatten()
            .map(|e| match e.file_type() {
                Ok(t) if t.is_dir() => walk(&e.path()),
                Ok(t) if t.is_file() => 1,
                _ => 0,
            })
            .sum()
    }
    ["maildrop", "incoming", "active", "deferred", "hold"]
        .iter()
        .map(|d| walk(&queue.join(d)))
        .sum()
}

async fn postfix_table(s: &Settings, messages: usize) {
    println!("## End to end through Postfix\n");
    println!(
        "`smtp-source -s 20 -m {messages} -l 10240` → Postfix → `smtp-sink`: messages/s until \
         Postfix accepted the last one, and until its queue was empty again (all delivered); \
         {} runs; median (min–max); ratio to bare Postfix.\n",
        s.runs
    );
    println!("| stack | accepted/s | ratio | delivered/s | ratio |");
    println!("|---|---|---|---|---|");
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let secret = dir.path().join("srs.secret");
    let _ = std::fs::write(&secret, "bench-secret\n");
    let yaml = format!(
        "domains: {{ example.org: {{ rules: [\"alice:alice@example.net\"] }} }}\n\
         srs: {{ domain: srs.bench.test, secrets_file: \"{}\" }}\nlog: {{ level: error }}\n\
         ratelimit: {{ messages_per_recipient: 1000000000 }}",
        secret.display()
    );
    let mut bare = None;
    let mut rows: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    let measure = |wiring: common::postfix::Wiring, extra: Vec<(String, String)>| {
        let extra: Vec<(&str, &str)> = extra
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        (0..s.runs)
            .filter_map(|_| postfix_run(&wiring, &extra, messages))
            .collect::<Vec<(f64, f64)>>()
    };
    // For profiling one stack: MXGUARD_BENCH_STACK=bare|null|inet|policy|milter|unix|peers.
    let only = std::env::var("MXGUARD_BENCH_STACK").ok();
    let wants = |name: &str| only.as_deref().is_none_or(|o| o == name);
    // The records mxguard's checks find, for opendmarc too.
    let records = [
        ("example.com", "v=spf1 ip4:127.0.0.0/8 -all"),
        ("_dmarc.example.com", "v=DMARC1; p=reject"),
    ];
    let publish = |d: &Mxguard| {
        for (owner, text) in records {
            d.dns.add_txt(owner, text);
        }
    };
    let peer = if wants("peers") {
        peer_dns(&records).await
    } else {
        None
    };
    if wants("bare") {
        rows.push((
            "Postfix alone".into(),
            measure(common::postfix::Wiring::default(), vec![]),
        ));
    }
    if wants("inet") {
        let d = Mxguard::start(&yaml).await;
        publish(&d);
        let w = common::postfix::Wiring {
            policy: Some(d.policy_wiring()),
            milter: Some(d.milter_wiring()),
        };
        rows.push((
            "Postfix + mxguard (policy + milter, inet)".into(),
            tokio::task::block_in_place(|| measure(w, vec![])),
        ));
    }
    if wants("null")
        && let Some(n) = start_null_services().await
    {
        let w = common::postfix::Wiring {
            policy: Some(format!("inet:{}", n.policy)),
            milter: Some(n.milter.clone()),
        };
        rows.push((
            "Postfix + null policy service + null milter making the same edits (inet)".into(),
            tokio::task::block_in_place(|| measure(w, vec![])),
        ));
    }
    if wants("policy") {
        let d = Mxguard::start(&yaml).await;
        publish(&d);
        let w = common::postfix::Wiring {
            policy: Some(d.policy_wiring()),
            milter: None,
        };
        rows.push((
            "Postfix + mxguard (policy only)".into(),
            tokio::task::block_in_place(|| measure(w, vec![])),
        ));
    }
    if wants("milter") {
        let d = Mxguard::start(&yaml).await;
        publish(&d);
        let w = common::postfix::Wiring {
            policy: None,
            milter: Some(d.milter_wiring()),
        };
        rows.push((
            "Postfix + mxguard (milter only, inet)".into(),
            tokio::task::block_in_place(|| measure(w, vec![])),
        ));
    }
    if wants("unix") {
        let sock = dir.path().join("milter.sock");
        let d = Mxguard::start(&format!(
            "{yaml}\nmilter: {{ listen: \"unix:{}\" }}",
            sock.display()
        ))
        .await;
        publish(&d);
        let w = common::postfix::Wiring {
            policy: Some(d.policy_wiring()),
            milter: Some(format!("unix:{}", sock.display())),
        };
        rows.push((
            "Postfix + mxguard (policy + milter, unix)".into(),
            tokio::task::block_in_place(|| measure(w, vec![])),
        ));
    }
    if !wants("peers") {
    } else if let (Some(pg), Some(od)) = (
        start_postgrey(),
        start_opendmarc(peer.as_ref().map(|(_, conf)| conf.as_path())),
    ) {
        let srsd = common::postsrsd::Postsrsd::start("bench-secret", "srs.bench.test");
        let (f, r) = srsd.ports();
        let w = common::postfix::Wiring {
            policy: Some(format!("inet:{}", pg.addr)),
            milter: Some(od.addr.clone()),
        };
        let extra = vec![
            (
                "sender_canonical_maps".to_owned(),
                format!("tcp:127.0.0.1:{f}"),
            ),
            (
                "sender_canonical_classes".to_owned(),
                "envelope_sender".to_owned(),
            ),
            (
                "recipient_canonical_maps".to_owned(),
                format!("tcp:127.0.0.1:{r}"),
            ),
            (
                "recipient_canonical_classes".to_owned(),
                "envelope_recipient".to_owned(),
            ),
        ];
        // postgrey greylists the one triplet first: let it pass.
        let _ = tokio::task::block_in_place(|| postfix_run(&w, &[], 1));
        tokio::time::sleep(Duration::from_secs(2)).await;
        rows.push((
            "Postfix + postgrey + postsrsd + opendmarc".into(),
            tokio::task::block_in_place(|| measure(w, extra)),
        ));
    }
    for (name, runs) in rows {
        let (a, alo, ahi) = median(runs.iter().map(|r| r.0).collect());
        let (m, lo, hi) = median(runs.iter().map(|r| r.1).collect());
        if bare.is_none() {
            bare = Some((a, m));
        }
        let (ra, rd) = bare
            .filter(|b| b.0 > 0.0 && b.1 > 0.0)
            .map_or((0.0, 0.0), |b| (a / b.0, m / b.1));
        println!(
            "| {name} | {a:.0} ({alo:.0}–{ahi:.0}) | {ra:.2} | {m:.0} ({lo:.0}–{hi:.0}) | {rd:.2} |"
        );
    }
    println!();
}

/// `name version, ...` of installed Debian packages (`name missing` if not).
fn package_versions(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| {
            Command::new("dpkg-query")
                .args(["-W", "-f", "${Version}", n])
                .output()
                .ok()
                .filter(|o| o.status.success() && !o.stdout.is_empty())
                .map_or_else(
                    || format!("{n} missing"),
                    |o| format!("{n} {}", String::from_utf8_lossy(&o.stdout).trim()),
                )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn main() {
    // 1 000 concurrent milter sessions need more than the usual 1 024.
    if let Err(e) = mxguard::net::raise_open_files_limit() {
        eprintln!("cannot raise the open files limit: {e}");
    }
    let quick = std::env::args().any(|a| a == "--quick");
    let settings = if quick {
        Settings {
            quick,
            runs: 3,
            seconds: 1.0,
        }
    } else {
        Settings {
            quick,
            runs: 5,
            seconds: 3.0,
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    println!("# mxguard benchmarks\n");
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    println!(
        "Machine: {} cores ({cpu}); mxguard {}; Debian packages: {}.\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        mxguard::VERSION,
        package_versions(&[
            "postfix",
            "redis-server",
            "postgrey",
            "postsrsd",
            "opendmarc"
        ]),
    );
    let messages = if quick { 500 } else { 2000 };
    // `--only policy|postfix` runs one section (for profiling).
    let args: Vec<String> = std::env::args().collect();
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let wants = |name: &str| only.as_deref().is_none_or(|o| o == name);
    runtime.block_on(async {
        if wants("policy") {
            policy_table(&settings).await;
        }
        if wants("milter") {
            milter::milter_table(&settings).await;
        }
        if wants("postfix") {
            postfix_table(&settings, messages).await;
        }
        if wants("memory") {
            milter::memory_table(&settings).await;
        }
    });
}
