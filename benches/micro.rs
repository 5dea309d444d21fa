//! Micro-benchmarks of the pure parts: rule parsing and alias resolution
//! (1, 100 and 10 000 rules), SRS forward and reverse, the message
//! fingerprint, a policy request's parse and reply, the root-domain lookup,
//! and an ARC seal with each key type (the milter's biggest cost).
//!
//! `cargo bench --bench micro` (criterion; `-- --quick` for a smoke run)
//! prints criterion's report, then a Markdown table of this run's figures:
//! the median time per iteration over criterion's samples, and the fastest
//! and slowest sample.

use criterion::{BenchmarkId, Criterion};
use mail_auth::AuthenticationResults;
use mxguard::{
    aliases::{Aliases, Limits, RuleSet, TxtCache},
    checks::{auth::Sealer, greylist::root_domain},
    config::{ArcConfig, Config, DnsConfig},
    engine::fingerprint,
    envelope::Envelope,
    policy::protocol::{Decoder, encode},
    srs::Srs,
    verdict::Verdict,
};
use std::{
    hint::black_box,
    path::{Path, PathBuf},
    sync::Arc,
    time::SystemTime,
};

const SIZES: [usize; 3] = [1, 100, 10_000];

fn rule_strings(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("user{i}:user{i}@example.net"))
        .collect()
}

fn rules(c: &mut Criterion) {
    let mut g = c.benchmark_group("rules/parse");
    for n in SIZES {
        let record = format!("forward-email={}", rule_strings(n).join(","));
        let limits = Limits::operator(n);
        g.bench_with_input(BenchmarkId::from_parameter(n), &record, |b, r| {
            b.iter(|| RuleSet::from_txt(black_box(&[r.as_str()]), &limits))
        });
    }
    g.finish();

    let rt = match tokio::runtime::Builder::new_current_thread().build() {
        Ok(rt) => rt,
        Err(e) => panic!("tokio runtime: {e}"),
    };
    let mut g = c.benchmark_group("rules/resolve");
    for n in SIZES {
        let set = RuleSet::from_rules(&rule_strings(n), None, &Limits::operator(n));
        let aliases = Aliases::new(&Config::default(), None, Arc::new(TxtCache::new(16)))
            .with_rule_set("example.org", Arc::new(set));
        // The last rule: the whole list is searched.
        let address = format!("user{}+tag@example.org", n - 1);
        g.bench_with_input(BenchmarkId::from_parameter(n), &address, |b, a| {
            b.iter(|| rt.block_on(aliases.resolve(black_box(a))))
        });
    }
    g.finish();
}

fn srs(c: &mut Criterion) {
    let srs = match Srs::new(
        vec![b"bench-secret".to_vec()],
        "srs.example.net",
        4,
        21,
        '=',
    ) {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    };
    let day = 20_000;
    let forwarded = match srs.forward_at("alice@example.com", day) {
        Ok(a) => a,
        Err(e) => panic!("{e}"),
    };
    let mut g = c.benchmark_group("srs");
    g.bench_function("forward", |b| {
        b.iter(|| srs.forward_at(black_box("alice@example.com"), day))
    });
    g.bench_function("reverse", |b| {
        b.iter(|| srs.reverse_at(black_box(&forwarded), day))
    });
    g.finish();
}

fn fingerprints(c: &mut Criterion) {
    let env = Envelope {
        client_name: Some("mail.example.com".into()),
        client_addr: "198.51.100.7".parse().ok(),
        ..Envelope::default()
    };
    let headers: Vec<(String, String)> = [
        (
            "Received",
            "from mail.example.com (mail.example.com [198.51.100.7])",
        ),
        ("Message-ID", "<20261122.1234@example.com>"),
        ("Date", "Sun, 22 Nov 2026 10:00:00 +0000"),
        ("From", "Bob <bob@example.com>"),
        ("To", "alice@example.org"),
        ("Subject", "Benchmarks"),
        ("MIME-Version", "1.0"),
        ("Content-Type", "text/plain; charset=utf-8"),
    ]
    .iter()
    .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
    .collect();
    let raw = vec![b'x'; 10_240];
    c.bench_function("fingerprint", |b| {
        b.iter(|| fingerprint(black_box(&env), black_box(&headers), black_box(&raw)))
    });
}

/// What Postfix 3.7 sends at RCPT.
const POLICY_REQUEST: &str = "request=smtpd_access_policy\nprotocol_state=RCPT\n\
protocol_name=ESMTP\nclient_address=198.51.100.7\nclient_name=mail.example.com\n\
client_port=41234\nreverse_client_name=mail.example.com\nserver_address=192.0.2.1\n\
server_port=25\nhelo_name=mail.example.com\nsender=bob@example.com\n\
recipient=alice@example.org\nrecipient_count=0\nqueue_id=\ninstance=1a2b.6563f1a2.c3d4.0\n\
size=10240\netrn_domain=\nstress=\nsasl_method=\nsasl_username=\nsasl_sender=\n\
ccert_subject=\nccert_issuer=\nccert_fingerprint=\nccert_pubkey_fingerprint=\n\
encryption_protocol=TLSv1.3\nencryption_cipher=TLS_AES_256_GCM_SHA384\n\
encryption_keysize=256\npolicy_context=\ncompatibility_level=3.6\nmail_version=3.7.11\n";

fn policy(c: &mut Criterion) {
    c.bench_function("policy/parse+encode", |b| {
        b.iter(|| {
            let mut d = Decoder::new(100);
            for line in black_box(POLICY_REQUEST).lines() {
                let _ = d.push_line(line.as_bytes());
            }
            let request = d.push_line(b"");
            (request.is_ok(), encode(&Verdict::Continue))
        })
    });
}

fn root_domains(c: &mut Criterion) {
    let mut g = c.benchmark_group("root_domain");
    for name in [
        "mail.example.com",
        "smtp.out.example.co.uk",
        "a.b.c.d.example.org",
    ] {
        g.bench_with_input(BenchmarkId::from_parameter(name), name, |b, n| {
            b.iter(|| root_domain(black_box(n)))
        });
    }
    g.finish();
}

fn arc_seal(c: &mut Criterion) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => panic!("tokio runtime: {e}"),
    };
    // No query is sent to seal a message without an ARC set.
    let dns = DnsConfig {
        nameservers: vec!["127.0.0.1:9".into()],
        ..DnsConfig::default()
    };
    let resolver = match mxguard::dns::authenticator(&dns) {
        Ok(r) => r,
        Err(e) => panic!("{e}"),
    };
    let mut msg = b"From: Bob <bob@example.com>\r\nTo: alice@example.org\r\n\
Subject: Benchmarks\r\nMessage-ID: <1@example.com>\r\n\r\n"
        .to_vec();
    msg.extend(b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\r\n".repeat(160));
    let results = AuthenticationResults::new("mx.example.org");
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => panic!("{e}"),
    };
    let mut g = c.benchmark_group("arc_seal/10KB");
    for (name, pem) in [
        ("rsa-2048", include_str!("../tests/data/arc-test-rsa.pem")),
        (
            "ed25519",
            include_str!("../tests/data/arc-test-ed25519.pem"),
        ),
    ] {
        let path = dir.path().join(name);
        if let Err(e) = std::fs::write(&path, pem) {
            panic!("{e}");
        }
        let config = ArcConfig {
            domain: "example.org".into(),
            selector: "arc".into(),
            key_file: Some(path),
        };
        let sealer = match Sealer::from_config(&config) {
            Ok(Some(s)) => s,
            Ok(None) => panic!("{name}: no sealer"),
            Err(e) => panic!("{name}: {e}"),
        };
        g.bench_function(name, |b| {
            b.iter(|| rt.block_on(sealer.seal(&resolver, black_box(&msg), &results)))
        });
    }
    g.finish();
}

fn main() {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| PathBuf::from("target"), PathBuf::from)
        .join("criterion");
    let started = SystemTime::now();
    let mut c = Criterion::default()
        .output_directory(&dir)
        .configure_from_args();
    rules(&mut c);
    srs(&mut c);
    fingerprints(&mut c);
    policy(&mut c);
    root_domains(&mut c);
    arc_seal(&mut c);
    c.final_summary();
    let mut rows = Vec::new();
    collect(&dir, started, &mut rows);
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    println!("\n## Micro-benchmarks (criterion)\n");
    println!(
        "Time per iteration: the median over criterion's samples, and the fastest and slowest \
         sample.\n"
    );
    println!("| benchmark | median | min–max | samples |");
    println!("|---|---|---|---|");
    for (name, median, lo, hi, n) in rows {
        println!(
            "| {name} | {} | {}–{} | {n} |",
            human(median),
            human(lo),
            human(hi)
        );
    }
}

/// This run's results under criterion's directory: (name, median, min,
/// max, samples), times in ns.
fn collect(dir: &Path, since: SystemTime, out: &mut Vec<(String, f64, f64, f64, usize)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        if !path.is_dir() {
            continue;
        }
        let new = path.join("new");
        let fresh = std::fs::metadata(new.join("sample.json"))
            .and_then(|m| m.modified())
            .is_ok_and(|t| t >= since);
        if fresh && let Some(row) = read_result(&new) {
            out.push(row);
        } else {
            collect(&path, since, out);
        }
    }
}

fn read_result(new: &Path) -> Option<(String, f64, f64, f64, usize)> {
    let json = |f: &str| -> Option<serde_json::Value> {
        serde_json::from_str(&std::fs::read_to_string(new.join(f)).ok()?).ok()
    };
    let name = json("benchmark.json")?.get("full_id")?.as_str()?.to_owned();
    let median = json("estimates.json")?
        .get("median")?
        .get("point_estimate")?
        .as_f64()?;
    let sample = json("sample.json")?;
    let numbers = |k: &str| -> Option<Vec<f64>> {
        sample
            .get(k)?
            .as_array()?
            .iter()
            .map(serde_json::Value::as_f64)
            .collect()
    };
    let (iters, times) = (numbers("iters")?, numbers("times")?);
    let per: Vec<f64> = iters
        .iter()
        .zip(&times)
        .filter(|(i, _)| **i > 0.0)
        .map(|(i, t)| t / i)
        .collect();
    let lo = per.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = per.iter().copied().fold(0.0, f64::max);
    Some((name, median, lo, hi, per.len()))
}

fn human(ns: f64) -> String {
    if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.2} µs", ns / 1e3)
    } else {
        format!("{ns:.0} ns")
    }
}
