//! The state store's conformance suite: the same test bodies run against
//! the embedded store (a temporary file, a clock the test moves) and Redis
//! (a real redis-server, started per test), so that both backends keep the
//! same semantics. Then what is particular to each: persistence across a
//! restart and a `kill -9` for the embedded store, an outage and recovery for
//! Redis.

// The shared harness, without tests/common/mod.rs and the rest of it. It is
// formatted and linted with the tests that own it, not here.
#[path = "common/ports.rs"]
#[allow(dead_code, clippy::all)]
#[rustfmt::skip]
mod ports;
#[path = "common/redis.rs"]
#[allow(dead_code, clippy::all)]
#[rustfmt::skip]
mod redis_server;

use mxguard::{
    clock::{Clock, FixedClock, SystemClock},
    config::{Duration as ConfigDuration, StoreBackend, StoreConfig},
    store::{FailurePolicy, Fallback, Key, OnError, Store, StoreError},
    verdict::Verdict,
};
use redis_server::RedisServer;
use std::{
    collections::HashSet,
    path::Path,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

type TestResult<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const SECOND: Duration = Duration::from_secs(1);

/// A store under test and the means to move its time on.
struct Harness {
    store: Store,
    config: StoreConfig,
    /// The embedded store's clock; Redis keeps its own time.
    clock: Option<Arc<FixedClock>>,
    redis: Option<RedisServer>,
    _dir: tempfile::TempDir,
}

impl Harness {
    async fn embedded() -> TestResult<Self> {
        let dir = tempfile::tempdir()?;
        let config = embedded_config(&dir.path().join("state/mxguard.db"));
        let clock = Arc::new(FixedClock::new(SystemTime::now()));
        let store = Store::open(&config, clock.clone()).await?;
        Ok(Self {
            store,
            config,
            clock: Some(clock),
            redis: None,
            _dir: dir,
        })
    }

    async fn redis() -> TestResult<Self> {
        let dir = tempfile::tempdir()?;
        let server = RedisServer::start().map_err(|e| {
            format!("cannot start redis-server (install it: apt-get install redis-server): {e}")
        })?;
        let config = redis_config(&server.url());
        let store = Store::open(&config, Arc::new(SystemClock)).await?;
        Ok(Self {
            store,
            config,
            clock: None,
            redis: Some(server),
            _dir: dir,
        })
    }

    /// Lets `d` pass: the test clock moves for the embedded store; Redis is
    /// given the real time.
    async fn pass(&self, d: Duration) {
        match &self.clock {
            Some(c) => c.advance(d),
            None => tokio::time::sleep(d).await,
        }
    }

    /// Another store on the same state (a second Redis client; for the
    /// embedded store, nothing: its file is locked).
    async fn twin(&self) -> TestResult<Option<Store>> {
        match self.clock {
            Some(_) => Ok(None),
            None => Ok(Some(
                Store::open(&self.config, Arc::new(SystemClock)).await?,
            )),
        }
    }

    async fn finish(self) -> TestResult {
        self.store.close().await?;
        if let Some(mut r) = self.redis {
            r.stop();
        }
        Ok(())
    }
}

fn embedded_config(path: &Path) -> StoreConfig {
    StoreConfig {
        backend: StoreBackend::Embedded,
        path: path.to_owned(),
        flush_interval: ConfigDuration(Duration::from_millis(50)),
        ..StoreConfig::default()
    }
}

fn redis_config(url: &str) -> StoreConfig {
    StoreConfig {
        backend: StoreBackend::Redis,
        url: Some(url.to_owned()),
        pool_size: 4,
        timeout: ConfigDuration(Duration::from_millis(1000)),
        prefix: "test:".into(),
        ..StoreConfig::default()
    }
}

/// Runs each body against both backends, as `body::embedded` and
/// `body::redis`.
macro_rules! conformance {
    ($($body:ident),* $(,)?) => {$(
        mod $body {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embedded() -> super::TestResult {
                let h = super::Harness::embedded().await?;
                super::$body(&h).await?;
                h.finish().await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn redis() -> super::TestResult {
                let h = super::Harness::redis().await?;
                super::$body(&h).await?;
                h.finish().await
            }
        }
    )*};
}

conformance!(
    get_set_and_ttl,
    keys_expire,
    set_if_absent_keeps_the_first,
    set_if_absent_race_has_one_winner,
    incr_semantics,
    concurrent_increments_add_up,
    delete_semantics,
    hashed_keys_hide_addresses,
);

fn within(ttl: Option<Duration>, low: Duration, high: Duration) -> TestResult {
    match ttl {
        Some(t) if t > low && t <= high => Ok(()),
        other => Err(format!("TTL {other:?} is not within ({low:?}, {high:?}]").into()),
    }
}

async fn get_set_and_ttl(h: &Harness) -> TestResult {
    let s = &h.store;
    let k = Key::plain("conf", &["get_set"]);
    assert_eq!(s.get(&k).await?, None);
    assert_eq!(s.ttl(&k).await?, None);

    // Values are bytes, not text.
    let v: &[u8] = b"\x00\xffbinary\r\n";
    s.set(&k, v, 60 * SECOND).await?;
    assert_eq!(s.get(&k).await?.as_deref(), Some(v));
    within(s.ttl(&k).await?, 50 * SECOND, 60 * SECOND)?;

    // `set` replaces the value and the expiry, longer or shorter.
    s.set(&k, b"second", 120 * SECOND).await?;
    assert_eq!(s.get(&k).await?.as_deref(), Some(&b"second"[..]));
    within(s.ttl(&k).await?, 110 * SECOND, 120 * SECOND)?;
    s.set(&k, b"third", 30 * SECOND).await?;
    within(s.ttl(&k).await?, 20 * SECOND, 30 * SECOND)?;

    // Keys are distinct by every part; an empty value is a value.
    let other = Key::plain("conf", &["get_set", "x"]);
    assert_eq!(s.get(&other).await?, None);
    s.set(&other, b"", 60 * SECOND).await?;
    assert_eq!(s.get(&other).await?.as_deref(), Some(&b""[..]));
    assert_eq!(s.get(&k).await?.as_deref(), Some(&b"third"[..]));
    Ok(())
}

async fn keys_expire(h: &Harness) -> TestResult {
    let s = &h.store;
    let ttl = Duration::from_millis(600);
    let (a, b, c, d) = (
        Key::plain("conf", &["exp", "set"]),
        Key::plain("conf", &["exp", "nx"]),
        Key::plain("conf", &["exp", "incr"]),
        Key::plain("conf", &["exp", "long"]),
    );
    s.set(&a, b"a", ttl).await?;
    assert!(s.set_if_absent(&b, b"b", ttl).await?);
    assert_eq!(s.incr(&c, 3, ttl).await?, 3);
    s.set(&d, b"d", 3600 * SECOND).await?;

    h.pass(Duration::from_millis(200)).await;
    assert_eq!(s.get(&a).await?.as_deref(), Some(&b"a"[..]));
    assert!(s.ttl(&b).await?.is_some());

    h.pass(Duration::from_millis(600)).await;
    for k in [&a, &b, &c] {
        assert_eq!(s.get(k).await?, None, "{k:?} outlived its TTL");
        assert_eq!(s.ttl(k).await?, None, "{k:?} has a TTL after expiring");
    }
    assert!(!s.delete(&a).await?, "an expired key was deleted");
    // Expired keys are absent for every operation: set-if-absent wins, and a
    // counter starts again, with a new TTL.
    assert!(s.set_if_absent(&b, b"again", 60 * SECOND).await?);
    assert_eq!(s.incr(&c, 5, 60 * SECOND).await?, 5);
    within(s.ttl(&c).await?, 50 * SECOND, 60 * SECOND)?;
    assert_eq!(s.get(&d).await?.as_deref(), Some(&b"d"[..]));
    Ok(())
}

async fn set_if_absent_keeps_the_first(h: &Harness) -> TestResult {
    let s = &h.store;
    let k = Key::plain("conf", &["nx"]);
    assert!(s.set_if_absent(&k, b"first", 60 * SECOND).await?);
    assert!(!s.set_if_absent(&k, b"second", 3600 * SECOND).await?);
    // Neither the value nor the expiry changes.
    assert_eq!(s.get(&k).await?.as_deref(), Some(&b"first"[..]));
    within(s.ttl(&k).await?, 50 * SECOND, 60 * SECOND)?;
    // After a delete, it can be set again.
    assert!(s.delete(&k).await?);
    assert!(s.set_if_absent(&k, b"third", 60 * SECOND).await?);
    assert_eq!(s.get(&k).await?.as_deref(), Some(&b"third"[..]));
    Ok(())
}

async fn set_if_absent_race_has_one_winner(h: &Harness) -> TestResult {
    const TASKS: usize = 32;
    for round in 0..20 {
        let k = Key::plain("conf", &["race", &round.to_string()]);
        let mut tasks = Vec::new();
        for t in 0..TASKS {
            let (s, k) = (h.store.clone(), k.clone());
            tasks.push(tokio::spawn(async move {
                let won = s
                    .set_if_absent(&k, t.to_string().as_bytes(), 60 * SECOND)
                    .await?;
                Ok::<_, StoreError>((t, won))
            }));
        }
        let mut winners = Vec::new();
        for task in tasks {
            let (t, won) = task.await??;
            if won {
                winners.push(t);
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: winners {winners:?}");
        let stored = h.store.get(&k).await?;
        assert_eq!(stored, Some(winners[0].to_string().into_bytes()));
    }
    Ok(())
}

async fn incr_semantics(h: &Harness) -> TestResult {
    let s = &h.store;
    let k = Key::plain("conf", &["incr"]);
    // Created at the increment, with the TTL.
    assert_eq!(s.incr(&k, 5, 60 * SECOND).await?, 5);
    within(s.ttl(&k).await?, 50 * SECOND, 60 * SECOND)?;
    // Later increments return the new value and keep the expiry.
    assert_eq!(s.incr(&k, -7, 3600 * SECOND).await?, -2);
    assert_eq!(s.incr(&k, 0, 3600 * SECOND).await?, -2);
    within(s.ttl(&k).await?, 50 * SECOND, 60 * SECOND)?;
    // Stored as decimal text, and `set` can seed a counter.
    assert_eq!(s.get(&k).await?.as_deref(), Some(&b"-2"[..]));
    let seeded = Key::plain("conf", &["incr", "seeded"]);
    s.set(&seeded, b"41", 60 * SECOND).await?;
    assert_eq!(s.incr(&seeded, 1, 3600 * SECOND).await?, 42);
    within(s.ttl(&seeded).await?, 50 * SECOND, 60 * SECOND)?;

    // Not a number, or an overflow: an error, and the value stays.
    let text = Key::plain("conf", &["incr", "text"]);
    for value in [&b"abc"[..], b"+5", b"007", b" 5", b""] {
        s.set(&text, value, 60 * SECOND).await?;
        match s.incr(&text, 1, 60 * SECOND).await {
            Err(StoreError::NotInteger { .. }) => {}
            other => return Err(format!("incr on {value:?}: {other:?}").into()),
        }
        assert_eq!(s.get(&text).await?.as_deref(), Some(value));
    }
    let big = Key::plain("conf", &["incr", "big"]);
    assert_eq!(s.incr(&big, i64::MAX, 60 * SECOND).await?, i64::MAX);
    match s.incr(&big, 1, 60 * SECOND).await {
        Err(StoreError::NotInteger { .. }) => {}
        other => return Err(format!("incr past i64::MAX: {other:?}").into()),
    }
    assert_eq!(s.incr(&big, -1, 60 * SECOND).await?, i64::MAX - 1);
    Ok(())
}

async fn concurrent_increments_add_up(h: &Harness) -> TestResult {
    const TASKS: i64 = 16;
    const EACH: i64 = 250;
    let keys = [
        Key::plain("conf", &["sum", "a"]),
        Key::plain("conf", &["sum", "b"]),
    ];
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let (s, keys) = (h.store.clone(), keys.clone());
        tasks.push(tokio::spawn(async move {
            let mut last = [0; 2];
            for i in 0..EACH {
                let which = usize::from((t + i) % 2 == 0);
                let n = s.incr(&keys[which], 1, 60 * SECOND).await?;
                // Each task sees its own increments in order.
                assert!(n > last[which], "counter went from {} to {n}", last[which]);
                last[which] = n;
            }
            Ok::<_, StoreError>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let total: i64 = [
        h.store.incr(&keys[0], 0, SECOND).await?,
        h.store.incr(&keys[1], 0, SECOND).await?,
    ]
    .iter()
    .sum();
    assert_eq!(total, TASKS * EACH);
    assert_eq!(
        h.store.get(&keys[0]).await?,
        Some((TASKS * EACH / 2).to_string().into_bytes())
    );
    Ok(())
}

async fn delete_semantics(h: &Harness) -> TestResult {
    let s = &h.store;
    let k = Key::plain("conf", &["del"]);
    assert!(!s.delete(&k).await?);
    s.set(&k, b"v", 60 * SECOND).await?;
    assert!(s.delete(&k).await?);
    assert_eq!(s.get(&k).await?, None);
    assert_eq!(s.ttl(&k).await?, None);
    assert!(!s.delete(&k).await?);
    // A deleted counter starts again.
    assert_eq!(s.incr(&k, 2, 60 * SECOND).await?, 2);
    assert!(s.delete(&k).await?);
    assert_eq!(s.incr(&k, 2, 60 * SECOND).await?, 2);
    Ok(())
}

async fn hashed_keys_hide_addresses(h: &Harness) -> TestResult {
    let s = &h.store;
    let k = Key::hashed(
        "greylist",
        &["192.0.2.7", "alice@example.org", "bob@example.net"],
    );
    let shown = s.render(&k).await?;
    assert!(shown.starts_with("greylist:"), "{shown}");
    assert!(!shown.contains("example"), "{shown}");
    assert_eq!(shown.len(), "greylist:".len() + 32, "{shown}");
    assert!(s.set_if_absent(&k, b"1", 60 * SECOND).await?);
    assert_eq!(s.get(&k).await?.as_deref(), Some(&b"1"[..]));
    // Equal parts, equal key; other parts, another key.
    assert_eq!(
        s.render(&Key::hashed(
            "greylist",
            &["192.0.2.7", "alice@example.org", "bob@example.net"]
        ))
        .await?,
        shown
    );
    let other = Key::hashed(
        "greylist",
        &["192.0.2.7", "alice@example.org", "carol@example.net"],
    );
    assert_ne!(s.render(&other).await?, shown);
    assert_eq!(s.get(&other).await?, None);
    // A second client of the same Redis finds the same secret in the store.
    if let Some(twin) = h.twin().await? {
        assert_eq!(twin.render(&k).await?, shown);
        assert_eq!(twin.get(&k).await?.as_deref(), Some(&b"1"[..]));
        twin.close().await?;
    }
    Ok(())
}

// ---- Embedded store only ----

async fn open_embedded(path: &Path, clock: Arc<dyn Clock>) -> Result<Store, StoreError> {
    Store::open(&embedded_config(path), clock).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_survives_close_and_reopen() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("state.db");
    let clock = Arc::new(FixedClock::new(SystemTime::now()));
    let grey = Key::hashed(
        "greylist",
        &["192.0.2.7", "alice@example.org", "bob@example.net"],
    );
    let count = Key::plain("rate", &["192.0.2.7"]);
    let gone = Key::plain("conf", &["gone"]);
    let s = open_embedded(&path, clock.clone()).await?;
    let first_render = s.render(&grey).await?;
    assert!(s.set_if_absent(&grey, b"first-seen", 3600 * SECOND).await?);
    assert_eq!(s.incr(&count, 7, 600 * SECOND).await?, 7);
    s.set(&gone, b"x", 600 * SECOND).await?;
    s.flush().await?;
    assert!(s.delete(&gone).await?);
    s.close().await?;
    assert!(matches!(s.get(&grey).await, Err(StoreError::Closed)));
    drop(s);

    clock.advance(60 * SECOND);
    let s = open_embedded(&path, clock.clone()).await?;
    // The generated key secret persisted with the data.
    assert_eq!(s.render(&grey).await?, first_render);
    assert_eq!(s.get(&grey).await?.as_deref(), Some(&b"first-seen"[..]));
    within(s.ttl(&grey).await?, 3530 * SECOND, 3540 * SECOND)?;
    assert_eq!(s.incr(&count, 1, SECOND).await?, 8);
    within(s.ttl(&count).await?, 530 * SECOND, 540 * SECOND)?;
    assert_eq!(s.get(&gone).await?, None, "a deleted key came back");

    // Still expires by the clock after the restart.
    clock.advance(600 * SECOND);
    assert_eq!(s.get(&count).await?, None);
    assert!(s.get(&grey).await?.is_some());
    s.close().await?;
    Ok(())
}

/// The child half of `embedded_survives_kill_9`: writes, lets a flush pass,
/// writes once more and kills itself with SIGKILL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_kill_9_child() -> TestResult {
    let Some(path) = std::env::var_os("MXGUARD_STORE_CRASH_CHILD") else {
        return Ok(()); // Only does something when run by the test below.
    };
    let s = open_embedded(Path::new(&path), Arc::new(SystemClock)).await?;
    let grey = Key::hashed(
        "greylist",
        &["192.0.2.7", "alice@example.org", "bob@example.net"],
    );
    assert!(s.set_if_absent(&grey, b"before", 3600 * SECOND).await?);
    for _ in 0..1000 {
        s.incr(&Key::plain("rate", &["192.0.2.7"]), 1, 3600 * SECOND)
            .await?;
    }
    // Several flush intervals (50 ms) pass.
    tokio::time::sleep(Duration::from_millis(400)).await;
    s.set(&Key::plain("conf", &["late"]), b"maybe lost", 3600 * SECOND)
        .await?;
    // SAFETY: kill(2) on our own pid has no memory-safety preconditions.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
    panic!("still alive after SIGKILL");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_survives_kill_9() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("state.db");
    let status = std::process::Command::new(std::env::current_exe()?)
        .args([
            "--exact",
            "embedded_kill_9_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("MXGUARD_STORE_CRASH_CHILD", &path)
        .stdout(std::process::Stdio::null())
        .status()?;
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL), "child: {status:?}");
    }
    // The dead process's lock is gone, and what was flushed is there.
    let s = open_embedded(&path, Arc::new(SystemClock)).await?;
    let grey = Key::hashed(
        "greylist",
        &["192.0.2.7", "alice@example.org", "bob@example.net"],
    );
    assert_eq!(s.get(&grey).await?.as_deref(), Some(&b"before"[..]));
    assert_eq!(
        s.get(&Key::plain("rate", &["192.0.2.7"])).await?.as_deref(),
        Some(&b"1000"[..])
    );
    within(s.ttl(&grey).await?, 3500 * SECOND, 3600 * SECOND)?;
    // Writes after the last flush may be lost; the file is whole either way.
    let _ = s.get(&Key::plain("conf", &["late"])).await?;
    s.set(&Key::plain("conf", &["after"]), b"ok", 60 * SECOND)
        .await?;
    s.close().await?;
    Ok(())
}

/// Entries in the file, read with redb directly.
fn entries_in_file(path: &Path) -> TestResult<Vec<String>> {
    use redb::{ReadableDatabase, ReadableTable, TableDefinition};
    let table: TableDefinition<&str, &[u8]> = TableDefinition::new("mxguard_state_v1");
    let db = redb::Database::open(path)?;
    let tx = db.begin_read()?;
    let t = tx.open_table(table)?;
    let mut keys = Vec::new();
    for item in t.iter()? {
        keys.push(item?.0.value().to_owned());
    }
    Ok(keys)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_purges_expired_keys_from_memory_and_file() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("state.db");
    let clock = Arc::new(FixedClock::new(SystemTime::now()));
    let config = StoreConfig {
        purge_interval: ConfigDuration(SECOND),
        ..embedded_config(&path)
    };
    let s = Store::open(&config, clock.clone()).await?;
    for i in 0..100 {
        let ttl = if i < 60 { 10 * SECOND } else { 3600 * SECOND };
        s.set(&Key::plain("conf", &["purge", &i.to_string()]), b"v", ttl)
            .await?;
    }
    s.flush().await?;
    clock.advance(20 * SECOND);
    // The background purge (every second) and flush (every 50 ms) drop the
    // 60 expired keys, with nobody reading them.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        s.purge_expired().await?,
        0,
        "the background purge did not run"
    );
    s.close().await?;
    drop(s);
    let keys = entries_in_file(&path)?;
    let purge_keys = keys.iter().filter(|k| k.starts_with("conf:purge:")).count();
    assert_eq!(purge_keys, 40, "{keys:?}");

    // Keys found expired at open are dropped from the file too.
    clock.advance(7200 * SECOND);
    let s = Store::open(&config, clock.clone()).await?;
    s.close().await?;
    drop(s);
    let keys = entries_in_file(&path)?;
    assert!(!keys.iter().any(|k| k.starts_with("conf:")), "{keys:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_file_holds_no_address() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("state.db");
    let s = open_embedded(&path, Arc::new(SystemClock)).await?;
    for i in 0..50 {
        let rcpt = format!("bob{i}@example.net");
        let k = Key::hashed("greylist", &["192.0.2.7", "alice@example.org", &rcpt]);
        s.set(&k, b"1", 60 * SECOND).await?;
    }
    s.close().await?;
    let bytes = std::fs::read(&path)?;
    assert!(
        bytes.windows(b"greylist:".len()).any(|w| w == b"greylist:"),
        "keys not in the file"
    );
    for needle in [&b"example"[..], b"alice", b"bob0"] {
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle),
            "the file contains {:?}",
            String::from_utf8_lossy(needle)
        );
    }
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path)?.permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "state file mode {mode:o}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_open_errors_are_clear() -> TestResult {
    let dir = tempfile::tempdir()?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);

    // Locked by a running store.
    let path = dir.path().join("state.db");
    let s = open_embedded(&path, clock.clone()).await?;
    match open_embedded(&path, clock.clone()).await {
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains("in use by another process"), "{msg}");
        }
        Ok(_) => return Err("opened a locked state file".into()),
    }
    s.close().await?;
    drop(s);
    open_embedded(&path, clock.clone()).await?.close().await?;

    // Not a state file.
    let junk = dir.path().join("junk.db");
    std::fs::write(&junk, vec![0x5a; 8192])?;
    match Store::open(&embedded_config(&junk), clock.clone()).await {
        Err(e @ (StoreError::Corrupt { .. } | StoreError::Io { .. })) => {
            let msg = e.to_string();
            assert!(msg.contains("junk.db"), "{msg}");
        }
        other => return Err(format!("junk file: {other:?}").into()),
    }

    // A directory that cannot be made (its parent is a file).
    let blocked = dir.path().join("file");
    std::fs::write(&blocked, b"")?;
    match open_embedded(&blocked.join("sub/state.db"), clock.clone()).await {
        Err(StoreError::Io { path, source }) => {
            assert!(path.ends_with("file/sub"), "{}", path.display());
            assert!(
                source
                    .to_string()
                    .contains("cannot create the state directory")
            );
        }
        other => return Err(format!("blocked directory: {other:?}").into()),
    }

    // A read-only directory (root writes anywhere, so only as a user).
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        use std::os::unix::fs::PermissionsExt;
        let ro = dir.path().join("ro");
        std::fs::create_dir(&ro)?;
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555))?;
        match open_embedded(&ro.join("state.db"), clock.clone()).await {
            Err(StoreError::Io { source, .. }) => {
                assert!(source.to_string().contains("cannot open the state file"));
            }
            other => return Err(format!("read-only directory: {other:?}").into()),
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_secret_file_is_used() -> TestResult {
    let dir = tempfile::tempdir()?;
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "0123456789abcdef0123456789abcdef\n")?;
    let k = Key::hashed("greylist", &["alice@example.org"]);
    let mut renders = HashSet::new();
    for name in ["a.db", "b.db"] {
        let config = StoreConfig {
            key_secret_file: Some(secret.clone()),
            ..embedded_config(&dir.path().join(name))
        };
        let s = Store::open(&config, Arc::new(SystemClock)).await?;
        renders.insert(s.render(&k).await?);
        s.close().await?;
    }
    assert_eq!(renders.len(), 1, "two stores with one secret disagree");
    // Without the file, each store makes its own secret.
    let s = open_embedded(&dir.path().join("c.db"), Arc::new(SystemClock)).await?;
    assert!(!renders.contains(&s.render(&k).await?));
    s.close().await?;

    std::fs::write(&secret, "short")?;
    let config = StoreConfig {
        key_secret_file: Some(secret.clone()),
        ..embedded_config(&dir.path().join("d.db"))
    };
    match Store::open(&config, Arc::new(SystemClock)).await {
        Err(StoreError::Config(m)) => assert!(m.contains("at least 16"), "{m}"),
        other => return Err(format!("short secret: {other:?}").into()),
    }
    Ok(())
}

// ---- Redis only ----

fn assert_outage(r: Result<impl std::fmt::Debug, StoreError>, started: Instant, limit: Duration) {
    match r {
        Err(StoreError::Unavailable(_) | StoreError::Timeout(_)) => {}
        other => panic!("expected an outage error, got {other:?}"),
    }
    assert!(
        started.elapsed() <= limit,
        "the failure took {:?}, more than {limit:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_and_back() -> TestResult {
    let h = Harness::redis().await?;
    let s = &h.store;
    let k = Key::plain("conf", &["outage"]);
    s.set(&k, b"before", 60 * SECOND).await?;
    let Some(mut server) = h.redis else {
        return Err("no redis".into());
    };

    server.stop();
    let limit = h.config.timeout.get() + Duration::from_millis(500);
    for _ in 0..(2 * h.config.pool_size) {
        let t = Instant::now();
        assert_outage(s.get(&k).await, t, limit);
        let t = Instant::now();
        assert_outage(s.incr(&k, 1, SECOND).await, t, limit);
        let t = Instant::now();
        assert_outage(s.set_if_absent(&k, b"x", SECOND).await, t, limit);
    }
    // The configured failure behaviour.
    let e = match s.delete(&k).await {
        Err(e) => e,
        Ok(d) => return Err(format!("delete with Redis down: {d}").into()),
    };
    let tempfail = FailurePolicy::new(OnError::Tempfail, 60 * SECOND).handle("greylist", &e);
    assert!(
        matches!(&tempfail, Fallback::Tempfail(Verdict::Tempfail(r)) if r.code == 451 && r.status == "4.3.0"),
        "{tempfail:?}"
    );
    let skip = FailurePolicy::new(OnError::Continue, 60 * SECOND).handle("greylist", &e);
    assert_eq!(skip, Fallback::Skip);

    // Back, without a new Store: every pooled connection recovers.
    server.restart()?;
    let deadline = Instant::now() + 10 * SECOND;
    loop {
        match s.set(&k, b"after", 60 * SECOND).await {
            Ok(()) => break,
            Err(e) if Instant::now() < deadline => {
                eprintln!("not yet: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(format!("Redis came back but the store did not: {e}").into()),
        }
    }
    for _ in 0..(4 * h.config.pool_size) {
        assert_eq!(s.get(&k).await?.as_deref(), Some(&b"after"[..]));
        s.incr(&Key::plain("conf", &["after"]), 1, 60 * SECOND)
            .await?;
    }
    s.close().await?;
    server.stop();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_that_never_answers_times_out() -> TestResult {
    // Accepts connections and reads, never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            held.push(sock);
        }
    });
    let config = StoreConfig {
        timeout: ConfigDuration(Duration::from_millis(300)),
        ..redis_config(&format!("redis://{addr}"))
    };
    let s = Store::open(&config, Arc::new(SystemClock)).await?;
    for _ in 0..3 {
        let t = Instant::now();
        match s.incr(&Key::plain("conf", &["hang"]), 1, SECOND).await {
            Err(StoreError::Timeout(_)) => {}
            other => return Err(format!("expected a timeout, got {other:?}").into()),
        }
        assert!(
            t.elapsed() < Duration::from_millis(800),
            "{:?}",
            t.elapsed()
        );
    }
    // Hashed keys need the secret from the store: that times out too.
    let t = Instant::now();
    assert_outage(
        s.get(&Key::hashed("greylist", &["a@example.org"])).await,
        t,
        Duration::from_millis(800),
    );

    // Nobody listening: refused at once.
    let free = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let s = Store::open(
        &redis_config(&format!("redis://{free}")),
        Arc::new(SystemClock),
    )
    .await?;
    let t = Instant::now();
    assert_outage(s.get(&Key::plain("conf", &["x"])).await, t, SECOND);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_keys_carry_the_prefix_and_no_address() -> TestResult {
    let h = Harness::redis().await?;
    let url = h.config.url.clone().unwrap_or_default();
    let grey = Key::hashed(
        "greylist",
        &["192.0.2.7", "alice@example.org", "bob@example.net"],
    );
    h.store.set(&grey, b"1", 60 * SECOND).await?;
    h.store
        .set(&Key::plain("conf", &["p"]), b"2", 60 * SECOND)
        .await?;

    // Another prefix is another namespace.
    let other = Store::open(
        &StoreConfig {
            prefix: "other:".into(),
            ..h.config.clone()
        },
        Arc::new(SystemClock),
    )
    .await?;
    assert_eq!(other.get(&Key::plain("conf", &["p"])).await?, None);
    other.close().await?;

    let keys: Vec<String> = tokio::task::spawn_blocking(move || {
        let client = deadpool_redis::redis::Client::open(url)?;
        let mut c = client.get_connection()?;
        deadpool_redis::redis::cmd("KEYS")
            .arg("*")
            .query::<Vec<String>>(&mut c)
    })
    .await??;
    assert!(!keys.is_empty());
    for k in &keys {
        assert!(k.starts_with("test:") || k.starts_with("other:"), "{k}");
        assert!(!k.contains("example") && !k.contains("alice"), "{k}");
    }
    assert!(keys.contains(&"test:conf:p".to_owned()), "{keys:?}");
    h.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_to_a_plain_server_fails_cleanly() -> TestResult {
    // TLS set up through the URL: against a server without TLS the
    // handshake fails with an error (no panic over a missing crypto
    // provider, no hang).
    let h = Harness::redis().await?;
    let url = h
        .config
        .url
        .clone()
        .unwrap_or_default()
        .replacen("redis://", "rediss://", 1);
    let s = Store::open(&redis_config(&url), Arc::new(SystemClock)).await?;
    let t = Instant::now();
    assert_outage(s.get(&Key::plain("conf", &["tls"])).await, t, 2 * SECOND);
    h.finish().await
}

// ---- Redis Cluster ----

/// Three redis-server masters joined into a cluster with redis-cli.
struct RedisCluster {
    nodes: Vec<std::process::Child>,
    ports: Vec<u16>,
    _dir: tempfile::TempDir,
}

impl RedisCluster {
    fn start() -> TestResult<Self> {
        use std::process::{Command, Stdio};
        let dir = tempfile::tempdir()?;
        let mut cluster = Self {
            nodes: Vec::new(),
            ports: Vec::new(),
            _dir: dir,
        };
        for i in 0..3 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port();
            let node_dir = cluster._dir.path().join(i.to_string());
            std::fs::create_dir(&node_dir)?;
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args([
                    "--cluster-enabled",
                    "yes",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .current_dir(&node_dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("cannot run redis-server: {e}"))?;
            cluster.nodes.push(child);
            cluster.ports.push(port);
        }
        for &port in &cluster.ports {
            wait_for(|| std::net::TcpStream::connect(("127.0.0.1", port)).is_ok())?;
        }
        let status = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(cluster.ports.iter().map(|p| format!("127.0.0.1:{p}")))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|e| format!("cannot run redis-cli: {e}"))?;
        if !status.success() {
            return Err(format!("redis-cli --cluster create: {status}").into());
        }
        let ports = cluster.ports.clone();
        wait_for(|| {
            ports.iter().all(|p| {
                std::process::Command::new("redis-cli")
                    .args(["-p", &p.to_string(), "cluster", "info"])
                    .output()
                    .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("cluster_state:ok"))
            })
        })?;
        Ok(cluster)
    }

    fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            let _ = n.kill();
            let _ = n.wait();
        }
    }
}

fn wait_for(mut ready: impl FnMut() -> bool) -> TestResult {
    let deadline = Instant::now() + 10 * SECOND;
    while !ready() {
        if Instant::now() > deadline {
            return Err("not ready after 10 s".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_passes_the_conformance_bodies() -> TestResult {
    let cluster = tokio::task::spawn_blocking(RedisCluster::start).await??;
    let config = StoreConfig {
        url: None,
        urls: cluster.urls(),
        ..redis_config("")
    };
    let h = Harness {
        store: Store::open(&config, Arc::new(SystemClock)).await?,
        config,
        clock: None,
        redis: None,
        _dir: tempfile::tempdir()?,
    };
    get_set_and_ttl(&h).await?;
    keys_expire(&h).await?;
    set_if_absent_keeps_the_first(&h).await?;
    set_if_absent_race_has_one_winner(&h).await?;
    incr_semantics(&h).await?;
    concurrent_increments_add_up(&h).await?;
    delete_semantics(&h).await?;
    hashed_keys_hide_addresses(&h).await?;
    h.finish().await?;
    drop(cluster);
    Ok(())
}
