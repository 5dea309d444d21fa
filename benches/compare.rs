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

fn version(cmd: &str, arg: &str) -> String {
    Command::new(cmd)
        .arg(arg)
        .output()
        .map(|o| {
            let t = String::from_utf8_lossy(&o.stdout).to_string()
                + &String::from_utf8_lossy(&o.stderr);
            t.lines().next().unwrap_or("").trim().to_owned()
        })
        .unwrap_or_else(|_| "not installed".into())
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

fn start_opendmarc() -> Option<Opendmarc> {
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
             PidFile {}/pid\nUserID opendmarc\n",
            dir.path().display()
        ),
    )
    .ok()?;
    let _ = Command::new("chmod")
        .args(["755", &dir.path().display().to_string()])
        .status();
    let child = Command::new(bin)
        .arg("-c")
        .arg(&conf)
        .arg("-f")
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

/// smtp-source → Postfix (wired as given) → smtp-sink: messages/s accepted.
fn postfix_run(
    wiring: &common::postfix::Wiring,
    extra: &[(&str, &str)],
    messages: usize,
) -> Option<f64> {
    let sink_port = common::ports::free_port();
    let mut sink = Command::new("/usr/sbin/smtp-sink")
        .args(["-c", &format!("127.0.0.1:{sink_port}"), "256"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    // The client is not in mynetworks, so the policy service is asked.
    let mut all: Vec<(&str, &str)> = vec![("mynetworks", "127.0.0.2/32")];
    all.extend_from_slice(extra);
    let pf = common::postfix::Postfix::start(sink_port, wiring, &all);
    let started = Instant::now();
    let out = Command::new("/usr/sbin/smtp-source")
        .args([
            "-s",
            "20",
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
    let elapsed = started.elapsed().as_secs_f64();
    let _ = sink.kill();
    let _ = sink.wait();
    if !out.status.success() {
        eprintln!("smtp-source: {}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    let log = pf.maillog();
    let refused = log.matches(" reject: ").count() + log.matches("milter-reject").count();
    if refused > 0 {
        eprintln!("{refused} messages refused during the run; the figure is not comparable");
    }
    Some(messages as f64 / elapsed)
}

async fn postfix_table(s: &Settings, messages: usize) {
    println!("## End to end through Postfix\n");
    println!(
        "`smtp-source -s 20 -m {messages} -l 10240` → Postfix → `smtp-sink`; messages/s until \
         Postfix accepted the last one; {} runs; median (min–max); ratio to bare Postfix.\n",
        s.runs
    );
    println!("| stack | messages/s | ratio |");
    println!("|---|---|---|");
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
    let mut rows: Vec<(String, Vec<f64>)> = Vec::new();
    let measure = |wiring: common::postfix::Wiring, extra: Vec<(String, String)>| {
        let extra: Vec<(&str, &str)> = extra
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        (0..s.runs)
            .filter_map(|_| postfix_run(&wiring, &extra, messages))
            .collect::<Vec<f64>>()
    };
    rows.push((
        "Postfix alone".into(),
        measure(common::postfix::Wiring::default(), vec![]),
    ));
    {
        let d = Mxguard::start(&yaml).await;
        let w = common::postfix::Wiring {
            policy: Some(d.policy_wiring()),
            milter: Some(d.milter_wiring()),
        };
        rows.push((
            "Postfix + mxguard (policy + milter, inet)".into(),
            tokio::task::block_in_place(|| measure(w, vec![])),
        ));
    }
    {
        let sock = dir.path().join("milter.sock");
        let d = Mxguard::start(&format!(
            "{yaml}\nmilter: {{ listen: \"unix:{}\" }}",
            sock.display()
        ))
        .await;
        let w = common::postfix::Wiring {
            policy: Some(d.policy_wiring()),
            milter: Some(format!("unix:{}", sock.display())),
        };
        rows.push((
            "Postfix + mxguard (policy + milter, unix)".into(),
            tokio::task::block_in_place(|| measure(w, vec![])),
        ));
    }
    if let (Some(pg), Some(od)) = (start_postgrey(), start_opendmarc()) {
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
        let (m, lo, hi) = median(runs);
        if bare.is_none() {
            bare = Some(m);
        }
        let ratio = bare.filter(|b| *b > 0.0).map_or(0.0, |b| m / b);
        println!("| {name} | {m:.0} ({lo:.0}–{hi:.0}) | {ratio:.2} |");
    }
    println!();
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let settings = if quick {
        Settings {
            runs: 3,
            seconds: 1.0,
        }
    } else {
        Settings {
            runs: 5,
            seconds: 3.0,
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    println!("# mxguard benchmarks\n");
    println!(
        "Machine: {} cores; mxguard {}; {}; {}; {}.\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        mxguard::VERSION,
        version("/usr/sbin/postgrey", "--version"),
        Command::new("/usr/sbin/postconf")
            .args(["-d", "-h", "mail_version"])
            .output()
            .map_or_else(
                |_| "Postfix not installed".into(),
                |o| format!("Postfix {}", String::from_utf8_lossy(&o.stdout).trim())
            ),
        version("/usr/sbin/opendmarc", "-V"),
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
        if wants("postfix") {
            postfix_table(&settings, messages).await;
        }
    });
}
