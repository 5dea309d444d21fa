//! Operations per second of each store backend, for set-if-absent and
//! increment, from 64 concurrent tasks: `cargo bench --bench store`.
//!
//! Redis: `REDIS_URL=redis://…` to use a running server; otherwise a
//! redis-server on a free loopback port is started (skipped, with a message,
//! when there is none). Not a test: it prints figures and checks nothing.

use mxguard::{
    clock::SystemClock,
    config::{Duration as ConfigDuration, StoreBackend, StoreConfig},
    store::{Key, Store},
};
use std::{
    net::TcpStream,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

const TASKS: usize = 64;
const HOUR: Duration = Duration::from_secs(3600);

#[derive(Clone, Copy)]
enum Op {
    SetIfAbsent,
    SetIfAbsentHashed,
    Incr,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::SetIfAbsent => "set_if_absent",
            Op::SetIfAbsentHashed => "set_if_absent (hashed key)",
            Op::Incr => "incr",
        }
    }
}

/// Runs `per_task` operations in each of `TASKS` tasks; returns ops/s.
async fn measure(store: &Store, op: Op, per_task: usize, round: usize) -> Result<f64, String> {
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(TASKS);
    for t in 0..TASKS {
        let s = store.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..per_task {
                let r = match op {
                    // Fresh keys: each one is a win, as for a new triplet.
                    Op::SetIfAbsent => {
                        let id = format!("{round}-{t}-{i}");
                        s.set_if_absent(&Key::plain("bench", &[&id]), b"1", HOUR)
                            .await
                            .map(drop)
                    }
                    Op::SetIfAbsentHashed => {
                        let rcpt = format!("rcpt{round}-{t}-{i}@example.net");
                        let k = Key::hashed("greylist", &["192.0.2.0/24", "a@example.org", &rcpt]);
                        s.set_if_absent(&k, b"1", HOUR).await.map(drop)
                    }
                    // 1000 counters shared by all tasks, as rate limits are.
                    Op::Incr => {
                        let id = ((t * 7919 + i) % 1000).to_string();
                        s.incr(&Key::plain("benchrate", &[&id]), 1, HOUR)
                            .await
                            .map(drop)
                    }
                };
                r.map_err(|e| e.to_string())?;
            }
            Ok::<_, String>(())
        }));
    }
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    Ok((TASKS * per_task) as f64 / start.elapsed().as_secs_f64())
}

async fn bench(name: &str, store: &Store, per_task: usize) -> Result<(), String> {
    // A warm-up round, then the best of three (the machine is shared).
    for op in [Op::SetIfAbsent, Op::SetIfAbsentHashed, Op::Incr] {
        measure(store, op, per_task / 10, 0).await?;
        let mut best: f64 = 0.0;
        for round in 1..=3 {
            best = best.max(measure(store, op, per_task, round).await?);
        }
        println!(
            "{name:<9} {:<27} {:>10.0} ops/s   ({TASKS} tasks x {per_task} ops)",
            op.name(),
            best
        );
    }
    Ok(())
}

struct RedisChild(Child);

impl Drop for RedisChild {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A throw-away redis-server without persistence, as the tests use.
fn start_redis() -> Result<(RedisChild, String), String> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run redis-server: {e}"))?;
    let child = RedisChild(child);
    let deadline = Instant::now() + Duration::from_secs(5);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            return Err("redis-server did not start within 5 s".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((child, format!("redis://127.0.0.1:{port}")))
}

async fn run() -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let config = StoreConfig {
        backend: StoreBackend::Embedded,
        path: dir.path().join("state.db"),
        ..StoreConfig::default()
    };
    let store = Store::open(&config, Arc::new(SystemClock))
        .await
        .map_err(|e| e.to_string())?;
    bench("embedded", &store, 20_000).await?;
    store.close().await.map_err(|e| e.to_string())?;

    let (_child, url) = match std::env::var("REDIS_URL") {
        Ok(url) => (None, url),
        Err(_) => match start_redis() {
            Ok((child, url)) => (Some(child), url),
            Err(e) => {
                println!("redis     skipped: {e} (install redis-server or set REDIS_URL)");
                return Ok(());
            }
        },
    };
    let config = StoreConfig {
        backend: StoreBackend::Redis,
        url: Some(url),
        pool_size: 4,
        timeout: ConfigDuration(Duration::from_secs(5)),
        prefix: "mxguard-bench:".into(),
        ..StoreConfig::default()
    };
    let store = Store::open(&config, Arc::new(SystemClock))
        .await
        .map_err(|e| e.to_string())?;
    bench("redis", &store, 3_000).await?;
    store.close().await.map_err(|e| e.to_string())?;
    Ok(())
}

fn main() {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => panic!("cannot start the runtime: {e}"),
    };
    if let Err(e) = rt.block_on(run()) {
        eprintln!("bench failed: {e}");
        std::process::exit(1);
    }
}
