//! The milter front end at protocol level, and mxguard's memory: a load
//! driver speaking the milter protocol (indymilter-test) to the mxguard
//! binary in its own process, and to Debian's opendmarc on the same driver.

use crate::common::{self, dns::DnsServer};
use crate::{Settings, median};
use bytes::Bytes;
use indymilter_test::{MacroStage, ProtoOpts, Status, TestConnection};
use mail_auth::{
    common::{crypto::RsaKey, crypto::Sha256, headers::HeaderWriter},
    dkim::DkimSigner,
};
use rustls::pki_types::{PrivateKeyDer, pem::PemObject as _};
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};
use tokio::sync::Barrier;

/// The mxguard binary, in a process of its own (as in production).
pub struct Daemon {
    child: Child,
    pub milter: SocketAddr,
    pub dir: tempfile::TempDir,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    /// Starts `mxguard run` with the test configuration plus `extra` (YAML),
    /// DNS from `dns`, the milter on a free loopback port or on `unix`.
    pub fn start(extra: &str, dns: SocketAddr, unix: Option<&Path>) -> Option<Daemon> {
        let dir = tempfile::tempdir().ok()?;
        let port = common::ports::free_port();
        let listen = match unix {
            Some(p) => format!("unix:{}", p.display()),
            None => format!("inet:127.0.0.1:{port}"),
        };
        let extra = format!("milter: {{ listen: \"{listen}\" }}\nlog: {{ level: warn }}\n{extra}");
        let config = dir.path().join("mxguard.yaml");
        std::fs::write(
            &config,
            common::daemon::config_yaml(dir.path(), dns, &extra),
        )
        .ok()?;
        let log = std::fs::File::create(dir.path().join("mxguard.log")).ok()?;
        let child = Command::new(env!("CARGO_BIN_EXE_mxguard"))
            .arg("run")
            .arg("-c")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .ok()?;
        let milter: SocketAddr = format!("127.0.0.1:{port}").parse().ok()?;
        let mut d = Daemon { child, milter, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        let up = || match unix {
            Some(p) => std::os::unix::net::UnixStream::connect(p).is_ok(),
            None => std::net::TcpStream::connect(milter).is_ok(),
        };
        while !up() {
            if Instant::now() > deadline || d.child.try_wait().ok().flatten().is_some() {
                eprintln!(
                    "mxguard did not start: {}",
                    std::fs::read_to_string(d.dir.path().join("mxguard.log")).unwrap_or_default()
                );
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Let the process settle before an idle reading.
        std::thread::sleep(Duration::from_millis(300));
        d.milter = milter;
        Some(d)
    }

    /// Resident set size now and at its peak, in KiB.
    pub fn rss(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

/// The sending domain's records, as a real one publishes them: SPF for the
/// client, DMARC p=reject, an RSA-2048 DKIM key; and the client's rDNS.
pub struct Sender {
    key: Option<String>,
}

impl Sender {
    /// Generates the DKIM key (openssl) and publishes the records on `dns`.
    pub fn publish(dns: &DnsServer) -> Sender {
        dns.add_txt(
            "example.com",
            "v=spf1 ip4:198.51.100.0/24 ip4:127.0.0.0/8 -all",
        );
        dns.add_txt("_dmarc.example.com", "v=DMARC1; p=reject");
        dns.add_ptr(
            "198.51.100.60".parse().unwrap_or_else(|e| panic!("{e}")),
            "mail.example.com",
        );
        dns.add_a("mail.example.com", [198, 51, 100, 60].into());
        let key = rsa_key();
        match &key {
            Some((_, public)) => dns.add_txt(
                "sel._domainkey.example.com",
                &format!("v=DKIM1; k=rsa; p={public}"),
            ),
            None => eprintln!("openssl is missing: messages go unsigned (apt-get install openssl)"),
        }
        Sender {
            key: key.map(|(pem, _)| pem),
        }
    }

    /// A message of about `size` bytes from bob@example.com to
    /// alice@example.org, DKIM-signed: its header fields and its body.
    pub fn message(&self, size: usize) -> Message {
        let head = "From: Bob <bob@example.com>\r\nTo: alice@example.org\r\n\
             Subject: Quarterly figures\r\nDate: Sun, 22 Nov 2026 12:00:00 +0000\r\n\
             Message-ID: <bench.1@example.com>\r\nMIME-Version: 1.0\r\n\
             Content-Type: text/plain; charset=utf-8\r\n";
        let line = "The quick brown fox jumps over the lazy dog, and the figures add up.\r\n";
        let mut body = String::with_capacity(size + line.len());
        while head.len() + body.len() < size {
            body.push_str(line);
        }
        let raw = format!("{head}\r\n{body}");
        let mut fields = Vec::new();
        if let Some(sig) = self.key.as_deref().and_then(|pem| {
            let der = PrivateKeyDer::from_pem_slice(pem.as_bytes()).ok()?;
            let key = RsaKey::<Sha256>::from_key_der(der).ok()?;
            let sig = DkimSigner::from_key(key)
                .domain("example.com")
                .selector("sel")
                .headers(["From", "To", "Subject", "Date", "Message-ID"])
                .sign(raw.as_bytes())
                .ok()?;
            Some(sig.to_header())
        }) {
            fields.extend(split_fields(&sig));
        }
        fields.extend(split_fields(head));
        Message {
            fields,
            body: Bytes::from(body.into_bytes()),
        }
    }
}

/// "Name: value\r\n" fields → (name, value) as an MTA passes them to a
/// milter (continuation lines kept, the final CRLF dropped).
fn split_fields(text: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in text.split("\r\n").filter(|l| !l.is_empty()) {
        if line.starts_with([' ', '\t']) {
            if let Some(last) = out.last_mut() {
                last.1.push_str("\r\n");
                last.1.push_str(line);
            }
        } else if let Some((n, v)) = line.split_once(':') {
            out.push((n.to_owned(), v.to_owned()));
        }
    }
    out
}

/// An RSA-2048 key: PKCS#8 PEM and the base64 of its public half (DER).
fn rsa_key() -> Option<(String, String)> {
    let pem = Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
        ])
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())?
        .stdout;
    let mut child = Command::new("openssl")
        .args(["pkey", "-pubout", "-outform", "DER"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    use std::io::Write as _;
    child.stdin.take()?.write_all(&pem).ok()?;
    let der = child.wait_with_output().ok()?.stdout;
    use base64::Engine as _;
    Some((
        String::from_utf8(pem).ok()?,
        base64::engine::general_purpose::STANDARD.encode(der),
    ))
}

pub struct Message {
    fields: Vec<(String, String)>,
    body: Bytes,
}

impl Message {
    pub fn size(&self) -> usize {
        self.fields
            .iter()
            .map(|(n, v)| n.len() + v.len() + 3)
            .sum::<usize>()
            + 2
            + self.body.len()
    }
}

#[derive(Clone)]
pub enum Target {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

async fn open(target: &Target) -> Result<TestConnection, String> {
    let b = TestConnection::configure()
        .read_timeout(Duration::from_secs(60))
        .write_timeout(Duration::from_secs(60));
    match target {
        Target::Tcp(a) => b.open_tcp(*a).await,
        Target::Unix(p) => b.open_unix(p).await,
    }
    .map_err(|e| format!("open: {e}"))
}

fn refused(stage: &str, s: Status) -> Result<(), String> {
    match s {
        Status::Continue | Status::Accept => Ok(()),
        other => Err(format!("{stage}: {other:?}")),
    }
}

/// One SMTP session's worth of milter conversation, as Postfix holds it:
/// a connection per session, the macros Postfix sends, one message. At
/// `before_eom`, waits (for the memory benchmark) with the body sent.
async fn session(
    target: &Target,
    msg: &Message,
    n: u64,
    before_eom: Option<&Barrier>,
) -> Result<(), String> {
    let e = |e: indymilter_test::TestError| e.to_string();
    let mut c = open(target).await?;
    // Many clients, as on a real MX (each within the sender's SPF range):
    // per-client limits must not be what is measured.
    let ip = format!("198.51.100.{}", n % 250 + 1);
    let client: SocketAddr = format!("{ip}:40000").parse().map_err(|_| "addr")?;
    let qid = format!("B{n:010X}");
    // What the milter asked not to get, Postfix does not send.
    let opts = c.negotiated_opts();
    let wants = |o: ProtoOpts| !opts.contains(o);
    let answered = |stage: &str, s: Status| {
        if matches!(s, Status::Noreply) {
            Ok(())
        } else {
            refused(stage, s)
        }
    };
    c.macros(
        MacroStage::Connect,
        [
            ("j", "mx.bench.test"),
            ("{daemon_name}", "smtpd"),
            ("{client_addr}", ip.as_str()),
            ("{client_name}", "mail.example.com"),
            ("{client_ptr}", "mail.example.com"),
        ],
    )
    .await
    .map_err(e)?;
    if wants(ProtoOpts::NO_CONNECT) {
        answered(
            "connect",
            c.connect("mail.example.com", client).await.map_err(e)?,
        )?;
    }
    if wants(ProtoOpts::NO_HELO) {
        answered("helo", c.helo("mail.example.com").await.map_err(e)?)?;
    }
    c.macros(MacroStage::Mail, [("i", qid.as_str())])
        .await
        .map_err(e)?;
    if wants(ProtoOpts::NO_MAIL) {
        answered("mail", c.mail(["<bob@example.com>"]).await.map_err(e)?)?;
    }
    c.macros(MacroStage::Rcpt, [("i", qid.as_str())])
        .await
        .map_err(e)?;
    if wants(ProtoOpts::NO_RCPT) {
        answered("rcpt", c.rcpt(["<alice@example.org>"]).await.map_err(e)?)?;
    }
    c.macros(MacroStage::Data, [("i", qid.as_str())])
        .await
        .map_err(e)?;
    if wants(ProtoOpts::NO_DATA) {
        answered("data", c.data().await.map_err(e)?)?;
    }
    if wants(ProtoOpts::NO_HEADER) {
        for (name, value) in &msg.fields {
            answered(
                "header",
                c.header(name.as_str(), value.as_str()).await.map_err(e)?,
            )?;
        }
    }
    if wants(ProtoOpts::NO_EOH) {
        answered("eoh", c.eoh().await.map_err(e)?)?;
    }
    if wants(ProtoOpts::NO_BODY) {
        answered("body", c.body(msg.body.clone()).await.map_err(e)?)?;
    }
    if let Some(b) = before_eom {
        b.wait().await;
    }
    c.macros(MacroStage::Eom, [("i", qid.as_str())])
        .await
        .map_err(e)?;
    let (_, status) = c.eom().await.map_err(e)?;
    refused("eom", status)?;
    c.close().await.map_err(e)?;
    Ok(())
}

pub struct Load {
    pub rate: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub failed: usize,
}

/// `messages` sessions over `conns` concurrent connections.
pub async fn load(target: &Target, msg: Arc<Message>, conns: usize, messages: usize) -> Load {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let (target, msg, next) = (target.clone(), msg.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut failed = Vec::new();
            loop {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if n >= messages {
                    break;
                }
                let t = Instant::now();
                match session(&target, &msg, n as u64, None).await {
                    Ok(()) => lat.push(t.elapsed().as_secs_f64() * 1000.0),
                    Err(e) => failed.push(e),
                }
            }
            (lat, failed)
        }));
    }
    let mut lat = Vec::new();
    let mut failed = Vec::new();
    for t in tasks {
        if let Ok((l, f)) = t.await {
            lat.extend(l);
            failed.extend(f);
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    if let Some(first) = failed.first() {
        eprintln!("{} sessions failed, the first: {first}", failed.len());
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0.0)
    };
    Load {
        rate: lat.len() as f64 / elapsed,
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
        failed: failed.len(),
    }
}

/// The ARC sealing key of the benchmarked mxguard.
#[derive(Clone, Copy, PartialEq)]
pub enum ArcKey {
    Rsa2048,
    Ed25519,
}

/// mxguard's configuration for the milter and memory benchmarks: every
/// check on, forwarding with SRS and an ARC seal.
pub fn mxguard_yaml(dir: &Path, key: ArcKey) -> Option<String> {
    let secret = dir.join("srs.secret");
    std::fs::write(&secret, "bench-secret\n").ok()?;
    let (arc, pem) = match key {
        ArcKey::Rsa2048 => (dir.join("arc-rsa.pem"), rsa_key()?.0),
        ArcKey::Ed25519 => (dir.join("arc-ed25519.pem"), ed25519_key()?),
    };
    std::fs::write(&arc, pem).ok()?;
    Some(format!(
        "domains: {{ example.org: {{ rules: [\"alice:alice@example.net\"] }} }}\n\
         srs: {{ domain: srs.bench.test, secrets_file: \"{}\" }}\n\
         arc: {{ domain: bench.test, selector: arc, key_file: \"{}\" }}\n\
         ratelimit: {{ messages_per_recipient: 1000000000, max_recipients: 1000000 }}\n",
        secret.display(),
        arc.display()
    ))
}

/// An Ed25519 key in PEM, as operators make it.
fn ed25519_key() -> Option<String> {
    let out = Command::new("openssl")
        .args(["genpkey", "-algorithm", "ed25519"])
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    String::from_utf8(out.stdout).ok()
}

const SIZES: [(&str, usize); 3] = [("2 KB", 2_048), ("10 KB", 10_240), ("1 MB", 1_048_576)];
const CONNS: usize = 32;

/// MXGUARD_BENCH_CONNS overrides the concurrency (for profiling).
fn conns() -> usize {
    std::env::var("MXGUARD_BENCH_CONNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(CONNS)
}

pub async fn milter_table(s: &Settings) {
    println!("## Milter front end, protocol level\n");
    let Some(dns) = DnsServer::start().await.ok() else {
        eprintln!("no loopback DNS server: the milter table is left out");
        return;
    };
    let sender = Sender::publish(&dns);
    let Some(dir) = tempfile::tempdir().ok() else {
        return;
    };
    let (Some(yaml), Some(yaml_ed25519)) = (
        mxguard_yaml(dir.path(), ArcKey::Rsa2048),
        mxguard_yaml(dir.path(), ArcKey::Ed25519),
    ) else {
        eprintln!("openssl is missing (apt-get install openssl): the milter table is left out");
        return;
    };
    let count = |size: usize| match (s.quick, size > 100_000) {
        (true, true) => 100,
        (true, false) => 1_000,
        (false, true) => 500,
        (false, false) => 5_000,
    };
    println!(
        "A driver speaking the milter protocol as Postfix does (a connection per SMTP session, \
         Postfix's macros, one DKIM-signed (RSA-2048) message from a domain with SPF and DMARC \
         p=reject; DNS answered by a loopback server, warm cache) over {} concurrent \
         connections; {} runs; median (min–max). mxguard runs every check and forwards \
         (alias, SRS, ARC seal with an RSA-2048 key unless the row says Ed25519); opendmarc \
         checks SPF and DMARC.\n",
        conns(),
        s.runs
    );
    println!("| milter | message | messages/s | p50 ms | p99 ms |");
    println!("|---|---|---|---|---|");
    let mut targets: Vec<(String, Target, Option<Daemon>, Option<crate::Opendmarc>)> = Vec::new();
    if let Some(d) = Daemon::start(&yaml, dns.addr(), None) {
        targets.push((
            "mxguard (inet)".into(),
            Target::Tcp(d.milter),
            Some(d),
            None,
        ));
    }
    let sock = dir.path().join("milter.sock");
    if let Some(d) = Daemon::start(&yaml, dns.addr(), Some(&sock)) {
        targets.push((
            "mxguard (unix)".into(),
            Target::Unix(sock.clone()),
            Some(d),
            None,
        ));
    }
    // The same with an Ed25519 seal: what the two RSA signatures per
    // forwarded message cost.
    let sock = dir.path().join("milter-ed25519.sock");
    if let Some(d) = Daemon::start(&yaml_ed25519, dns.addr(), Some(&sock)) {
        targets.push((
            "mxguard (unix, Ed25519 ARC)".into(),
            Target::Unix(sock.clone()),
            Some(d),
            None,
        ));
    }
    // opendmarc asks the resolver of /etc/resolv.conf on port 53: a server
    // with the same records there, and a private resolv.conf for it.
    let peer_dns = crate::peer_dns(&sender_records()).await;
    if let Some(o) = crate::start_opendmarc(peer_dns.as_ref().map(|(_, conf)| conf.as_path())) {
        let addr = o.addr.trim_start_matches("inet:").parse().ok();
        if let Some(a) = addr {
            targets.push(("opendmarc (inet)".into(), Target::Tcp(a), None, Some(o)));
        }
    }
    for (size_name, size) in SIZES {
        let msg = Arc::new(sender.message(size));
        for (name, target, _, _) in &targets {
            // MXGUARD_BENCH_TARGET=mxguard|opendmarc: only those rows.
            if std::env::var("MXGUARD_BENCH_TARGET").is_ok_and(|t| !name.starts_with(&t)) {
                continue;
            }
            // Warm the caches (DNS, TXT rules) before measuring.
            let _ = load(target, msg.clone(), 4, 20).await;
            // opendmarc does about a tenth of the work per second: a tenth
            // of the messages keeps its rows to the same few seconds.
            let n = if name.starts_with("opendmarc") {
                count(size) / 10
            } else {
                count(size)
            };
            let runs: Vec<Load> = {
                let mut v = Vec::new();
                for _ in 0..s.runs {
                    v.push(load(target, msg.clone(), conns(), n).await);
                }
                v
            };
            let failed: usize = runs.iter().map(|r| r.failed).sum();
            let (r, lo, hi) = median(runs.iter().map(|r| r.rate).collect());
            let (p50, _, _) = median(runs.iter().map(|r| r.p50_ms).collect());
            let (p99, _, _) = median(runs.iter().map(|r| r.p99_ms).collect());
            let note = if failed > 0 {
                format!(" ({failed} failed)")
            } else {
                String::new()
            };
            println!(
                "| {name} | {size_name} ({} bytes) | {r:.0} ({lo:.0}–{hi:.0}){note} | {p50:.2} | {p99:.2} |",
                msg.size()
            );
        }
    }
    println!();
    drop(targets);
    drop(peer_dns);
}

/// The records of [`Sender::publish`] without the DKIM key (opendmarc does
/// not verify DKIM).
fn sender_records() -> Vec<(&'static str, &'static str)> {
    vec![
        (
            "example.com",
            "v=spf1 ip4:198.51.100.0/24 ip4:127.0.0.0/8 -all",
        ),
        ("_dmarc.example.com", "v=DMARC1; p=reject"),
    ]
}

/// RSS of the mxguard process idle, and at its peak while `sessions`
/// milter sessions hold a message of `size` bytes each at once.
pub async fn memory_table(s: &Settings) {
    println!("## Memory\n");
    let sessions = if s.quick { 200 } else { 1000 };
    let size = 1_048_576;
    let Some(dns) = DnsServer::start().await.ok() else {
        return;
    };
    let sender = Sender::publish(&dns);
    let Some(dir) = tempfile::tempdir().ok() else {
        return;
    };
    let Some(yaml) = mxguard_yaml(dir.path(), ArcKey::Rsa2048) else {
        eprintln!("openssl is missing (apt-get install openssl): the memory table is left out");
        return;
    };
    let Some(d) = Daemon::start(&yaml, dns.addr(), None) else {
        return;
    };
    let (idle, _) = d.rss();
    let msg = Arc::new(sender.message(size));
    let barrier = Arc::new(Barrier::new(sessions));
    let target = Target::Tcp(d.milter);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for n in 0..sessions {
        let (target, msg, barrier) = (target.clone(), msg.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            session(&target, &msg, n as u64, Some(&barrier)).await
        }));
    }
    let mut failed = 0;
    for t in tasks {
        if !matches!(t.await, Ok(Ok(()))) {
            failed += 1;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let (after, peak) = d.rss();
    let limit = 52_428_800u64 / 1024;
    println!(
        "The mxguard binary with every check on; its resident set size idle, then while {sessions} \
         milter sessions each hold a {} byte message at once (all bodies sent, then every end of \
         message); the per-message limit is content.max_message_size (default 50 MiB).\n",
        msg.size()
    );
    println!("| measure | value |");
    println!("|---|---|");
    println!("| RSS idle | {:.1} MiB |", idle as f64 / 1024.0);
    println!(
        "| peak RSS, {sessions} sessions × {:.1} MiB | {:.1} MiB ({:.2} × the bodies held) |",
        msg.size() as f64 / 1_048_576.0,
        peak as f64 / 1024.0,
        (peak.saturating_sub(idle)) as f64 * 1024.0 / (sessions as f64 * msg.size() as f64)
    );
    println!(
        "| bound: idle + sessions × limit | {:.0} MiB |",
        (idle + limit * sessions as u64) as f64 / 1024.0
    );
    println!(
        "| RSS after the sessions ended | {:.1} MiB |",
        after as f64 / 1024.0
    );
    println!("| sessions failed | {failed} of {sessions} ({elapsed:.1} s) |");
    println!();
}
