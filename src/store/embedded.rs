//! The embedded store: a sharded in-memory map, the source of truth, loaded
//! from one redb file at open and written back to it every `flush_interval`
//! in one transaction (write-behind).
//!
//! Operations never touch the disk, so they are as fast as a mutex; redb's
//! copy-on-write commits make each flush all-or-nothing, so a crash loses at
//! most the writes since the last flush and never damages the file.
//!
//! When a flush fails (disk full, file system read-only), changes are
//! refused with [`StoreError::Unwritable`] until a flush succeeds again, so
//! the checks follow `store.on_error` rather than acknowledge state that a
//! crash would lose. redb refuses every write after one I/O error, so the
//! next flush reopens the file first: the store recovers without a restart
//! once the disk has room again.

use super::{Result, StoreError, ttl_ms};
use crate::clock::Clock;
use redb::{
    Database, DatabaseError, Durability, ReadableDatabase, ReadableTable, TableDefinition,
    TableError,
};
use std::{
    collections::{HashMap, HashSet},
    hash::{BuildHasher, RandomState},
    io::Write as _,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, MutexGuard, PoisonError, Weak,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, UNIX_EPOCH},
};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

/// Key → expiry (milliseconds since the Unix epoch, big-endian u64; `NEVER`
/// for none) followed by the value. The version is in the name, so a future
/// format can live beside this one.
const TABLE: TableDefinition<&str, &[u8]> = TableDefinition::new("mxguard_state_v1");

/// Enough shards that 2–16 cores rarely wait on one another.
const SHARDS: usize = 64;

const NEVER: u64 = u64::MAX;

struct Entry {
    value: Vec<u8>,
    expires: u64,
}

impl Entry {
    fn live(&self, now: u64) -> bool {
        self.expires > now
    }
}

#[derive(Default)]
struct Shard {
    map: HashMap<Box<str>, Entry>,
    /// Keys changed since the last flush; the flush writes their current
    /// state (or deletes them).
    dirty: HashSet<Box<str>>,
}

impl Shard {
    fn mark(&mut self, key: &str) {
        if !self.dirty.contains(key) {
            self.dirty.insert(key.into());
        }
    }

    /// The entry, if it exists and has not expired; an expired one is
    /// dropped on the way.
    fn live(&mut self, key: &str, now: u64) -> Option<&mut Entry> {
        if self.map.get(key).is_some_and(|e| !e.live(now)) {
            self.map.remove(key);
            self.mark(key);
            return None;
        }
        self.map.get_mut(key)
    }

    fn put(&mut self, key: &str, entry: Entry) {
        match self.map.get_mut(key) {
            Some(e) => *e = entry,
            None => {
                self.map.insert(key.into(), entry);
            }
        }
        self.mark(key);
    }
}

struct Shared {
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    clock: Arc<dyn Clock>,
    path: PathBuf,
    /// `None` once closed, so the file is released as soon as the last
    /// flush is done.
    db: Mutex<Option<Arc<Database>>>,
    /// One flush at a time, in order.
    flush_lock: tokio::sync::Mutex<()>,
    /// Read under a shard lock by every write, so that no write slips in
    /// after the final flush of `close`.
    closed: AtomicBool,
    /// Why the last flush failed; `None` after a flush that succeeded.
    unwritable: Mutex<Option<String>>,
}

pub(super) struct Embedded {
    shared: Arc<Shared>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Embedded {
    pub(super) async fn open(
        path: PathBuf,
        flush_interval: Duration,
        purge_interval: Duration,
        clock: Arc<dyn Clock>,
    ) -> Result<Self> {
        let now = now_ms(&*clock);
        let p = path.clone();
        let (db, loaded, dropped) = tokio::task::spawn_blocking(move || load(&p, now))
            .await
            .map_err(|e| io_error(&path, std::io::Error::other(e.to_string())))??;
        let mut shards: Vec<Shard> = (0..SHARDS).map(|_| Shard::default()).collect();
        let hasher = RandomState::new();
        let count = loaded.len();
        for (k, e) in loaded {
            let i = shard_index(&hasher, &k);
            shards[i].map.insert(k, e);
        }
        for k in dropped {
            let i = shard_index(&hasher, &k);
            shards[i].dirty.insert(k);
        }
        debug!(path = %path.display(), keys = count, "embedded store opened");
        let shared = Arc::new(Shared {
            shards: shards.into_iter().map(Mutex::new).collect(),
            hasher,
            clock,
            path,
            db: Mutex::new(Some(Arc::new(db))),
            flush_lock: tokio::sync::Mutex::new(()),
            closed: AtomicBool::new(false),
            unwritable: Mutex::new(None),
        });
        // The tasks hold the store weakly: dropping every handle ends them.
        let flusher = every(flush_interval, Arc::downgrade(&shared), |s| async move {
            // Detached: aborting this task (close, drop) must not cut a
            // flush in the middle.
            // The first failure and the recovery are logged by the flush.
            if let Err(e) = s.flush_detached().await {
                debug!("embedded store: cannot write the state file: {e}; retrying");
            }
        });
        let purger = every(purge_interval, Arc::downgrade(&shared), |s| async move {
            let n = s.purge().await;
            if n > 0 {
                debug!(keys = n, "embedded store: expired keys purged");
            }
        });
        Ok(Self {
            shared,
            tasks: Mutex::new(vec![flusher, purger]),
        })
    }

    /// [`StoreError::Unwritable`] while the last flush had failed.
    pub(super) fn health(&self) -> Result<()> {
        match lock(&self.shared.unwritable).clone() {
            Some(detail) => Err(StoreError::Unwritable {
                path: self.shared.path.clone(),
                detail,
            }),
            None => Ok(()),
        }
    }

    pub(super) fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.shared
            .with(key, |s, now| Ok(s.live(key, now).map(|e| e.value.clone())))
    }

    pub(super) fn set(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> Result<()> {
        self.shared.with_write(key, |s, now| {
            s.put(
                key,
                Entry {
                    value: value.to_vec(),
                    expires: expiry(now, ttl),
                },
            );
            Ok(())
        })
    }

    pub(super) fn set_if_absent(
        &self,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> Result<bool> {
        self.shared.with_write(key, |s, now| {
            if s.live(key, now).is_some() {
                return Ok(false);
            }
            s.put(
                key,
                Entry {
                    value: value.to_vec(),
                    expires: expiry(now, ttl),
                },
            );
            Ok(true)
        })
    }

    pub(super) fn incr(&self, key: &str, by: i64, ttl_on_create: Duration) -> Result<i64> {
        self.shared.with_write(key, |s, now| {
            let n = match s.live(key, now) {
                Some(e) => {
                    let n = parse_integer(&e.value)
                        .and_then(|cur| cur.checked_add(by))
                        .ok_or_else(|| StoreError::NotInteger { key: key.into() })?;
                    e.value.clear();
                    let _ = write!(e.value, "{n}");
                    n
                }
                None => {
                    s.map.insert(
                        key.into(),
                        Entry {
                            value: by.to_string().into_bytes(),
                            expires: expiry(now, Some(ttl_on_create)),
                        },
                    );
                    by
                }
            };
            s.mark(key);
            Ok(n)
        })
    }

    pub(super) fn delete(&self, key: &str) -> Result<bool> {
        self.shared.with_write(key, |s, now| {
            let existed = s.live(key, now).is_some();
            if existed {
                s.map.remove(key);
                s.mark(key);
            }
            Ok(existed)
        })
    }

    pub(super) fn ttl(&self, key: &str) -> Result<Option<Duration>> {
        self.shared.with(key, |s, now| {
            Ok(s.live(key, now).map(|e| match e.expires {
                NEVER => Duration::MAX,
                t => Duration::from_millis(t - now),
            }))
        })
    }

    pub(super) async fn flush(&self) -> Result<()> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(StoreError::Closed);
        }
        self.shared.clone().flush_detached().await
    }

    pub(super) async fn purge(&self) -> Result<usize> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(StoreError::Closed);
        }
        Ok(self.shared.purge().await)
    }

    pub(super) async fn close(&self) -> Result<()> {
        if self.shared.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        for t in lock(&self.tasks).drain(..) {
            t.abort();
        }
        // Runs after any flush in progress (the flush lock orders them).
        let result = self.shared.clone().flush_detached().await;
        let _guard = self.shared.flush_lock.lock().await;
        let db = lock(&self.shared.db).take();
        // Closing the file may write and sync: not on a runtime thread.
        let _ = tokio::task::spawn_blocking(move || drop(db)).await;
        result
    }
}

impl Drop for Embedded {
    fn drop(&mut self) {
        for t in lock(&self.tasks).drain(..) {
            t.abort();
        }
    }
}

impl Shared {
    /// [`Shared::with`] for an operation that changes state: refused while
    /// the state file cannot be written.
    fn with_write<R>(&self, key: &str, f: impl FnOnce(&mut Shard, u64) -> Result<R>) -> Result<R> {
        if let Some(detail) = lock(&self.unwritable).clone() {
            return Err(StoreError::Unwritable {
                path: self.path.clone(),
                detail,
            });
        }
        self.with(key, f)
    }

    fn with<R>(&self, key: &str, f: impl FnOnce(&mut Shard, u64) -> Result<R>) -> Result<R> {
        let now = now_ms(&*self.clock);
        let mut shard = lock(&self.shards[shard_index(&self.hasher, key)]);
        if self.closed.load(Ordering::Acquire) {
            return Err(StoreError::Closed);
        }
        f(&mut shard, now)
    }

    /// Runs the flush in its own task, so that a caller that gives up
    /// waiting cannot cut it between taking the changed keys and writing
    /// them (which would lose them).
    async fn flush_detached(self: Arc<Self>) -> Result<()> {
        let path = self.path.clone();
        tokio::spawn(async move { self.flush().await })
            .await
            .map_err(|e| io_error(&path, std::io::Error::other(e.to_string())))?
    }

    async fn flush(&self) -> Result<()> {
        let _guard = self.flush_lock.lock().await;
        let reopen = lock(&self.unwritable).is_some();
        // To reopen, the handle is taken out, so that the file is released.
        let db = if reopen {
            lock(&self.db).take()
        } else {
            lock(&self.db).clone()
        };
        if db.is_none() && !reopen {
            // Closed, and its final flush wrote everything.
            return Ok(());
        }
        let now = now_ms(&*self.clock);
        let mut batch: Vec<(Box<str>, Option<Vec<u8>>)> = Vec::new();
        for shard in &self.shards {
            let mut s = lock(shard);
            let Shard { map, dirty } = &mut *s;
            batch.extend(dirty.drain().map(|k| {
                let v = map.get(&k).filter(|e| e.live(now)).map(encode);
                (k, v)
            }));
        }
        // While unwritable, even an empty batch is committed: it shows the
        // file takes writes again.
        if batch.is_empty() && !reopen {
            return Ok(());
        }
        let path = self.path.clone();
        let written = tokio::task::spawn_blocking(move || {
            // After a failed commit redb refuses every later one
            // (`PreviousIo`): the file is reopened (and repaired if need be)
            // before trying again.
            let db = if reopen {
                drop(db);
                match Database::builder().create(&path) {
                    Ok(db) => Some(Arc::new(db)),
                    Err(e) => return (Err(database_error(&path, e)), None, batch),
                }
            } else {
                db
            };
            let r = match &db {
                Some(db) => write_batch(db, &batch).map_err(|e| redb_error(&path, e)),
                None => Ok(()),
            };
            (r, db, batch)
        })
        .await;
        let (result, reopened, batch) = match written {
            Ok(w) => w,
            Err(e) => {
                let e = io_error(&self.path, std::io::Error::other(e.to_string()));
                self.set_unwritable(&e);
                return Err(e);
            }
        };
        if reopen {
            *lock(&self.db) = reopened;
        }
        match result {
            Ok(()) => {
                if lock(&self.unwritable).take().is_some() {
                    warn!(path = %self.path.display(), "embedded store: the state file is written again; changes are taken again");
                }
                Ok(())
            }
            Err(e) => {
                // Written next time, with whatever value the key has then.
                for (k, _) in batch {
                    let i = shard_index(&self.hasher, &k);
                    lock(&self.shards[i]).dirty.insert(k);
                }
                self.set_unwritable(&e);
                Err(e)
            }
        }
    }

    fn set_unwritable(&self, e: &StoreError) {
        if lock(&self.unwritable).replace(e.to_string()).is_none() {
            warn!(
                "embedded store: cannot write the state file: {e}; changes are refused (store.on_error) until it can be written again"
            );
        }
    }

    /// Drops expired entries from memory and marks them for deletion from
    /// the file at the next flush.
    async fn purge(&self) -> usize {
        let mut purged = 0;
        for shard in &self.shards {
            let now = now_ms(&*self.clock);
            {
                let mut s = lock(shard);
                let Shard { map, dirty } = &mut *s;
                map.retain(|k, e| {
                    let keep = e.live(now);
                    if !keep {
                        dirty.insert(k.clone());
                        purged += 1;
                    }
                    keep
                });
            }
            // A large store is purged a shard at a time, between requests.
            tokio::task::yield_now().await;
        }
        purged
    }
}

/// Runs `f` every `interval` while the store exists.
fn every<F, Fut>(interval: Duration, shared: Weak<Shared>, f: F) -> JoinHandle<()>
where
    F: Fn(Arc<Shared>) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(s) = shared.upgrade() else { break };
            if s.closed.load(Ordering::Acquire) {
                break;
            }
            f(s).await;
        }
    })
}

fn shard_index(hasher: &RandomState, key: &str) -> usize {
    (hasher.hash_one(key) as usize) % SHARDS
}

fn now_ms(clock: &dyn Clock) -> u64 {
    clock
        .now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(NEVER - 1))
}

fn expiry(now: u64, ttl: Option<Duration>) -> u64 {
    match ttl {
        Some(ttl) => now.saturating_add(ttl_ms(ttl)).min(NEVER - 1),
        None => NEVER,
    }
}

/// An integer as Redis reads one: canonical decimal only (no `+`, no
/// leading zeros, no blanks), so both backends take the same values.
fn parse_integer(bytes: &[u8]) -> Option<i64> {
    let digits = bytes.strip_prefix(b"-").unwrap_or(bytes);
    let canonical = match digits {
        [b'0'] => bytes.len() == 1,
        [b'1'..=b'9', ..] => true,
        _ => false,
    };
    if !canonical {
        return None;
    }
    std::str::from_utf8(bytes).ok()?.parse().ok()
}

fn encode(e: &Entry) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + e.value.len());
    v.extend_from_slice(&e.expires.to_be_bytes());
    v.extend_from_slice(&e.value);
    v
}

fn decode(bytes: &[u8]) -> Option<Entry> {
    let (head, value) = bytes.split_first_chunk::<8>()?;
    Some(Entry {
        value: value.to_vec(),
        expires: u64::from_be_bytes(*head),
    })
}

type Loaded = (Database, Vec<(Box<str>, Entry)>, Vec<Box<str>>);

/// Opens (or creates) the file and reads every live entry; expired and
/// unreadable entries are returned apart, to be deleted at the first flush.
fn load(path: &Path, now: u64) -> Result<Loaded> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).map_err(|e| {
            io_error(
                dir,
                std::io::Error::new(e.kind(), format!("cannot create the state directory: {e}")),
            )
        })?;
    }
    // Created here rather than by redb so that the file is private: it holds
    // who wrote to whom, if only as hashes.
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            io_error(
                path,
                std::io::Error::new(e.kind(), format!("cannot open the state file: {e}")),
            )
        })?;
    let db = Database::builder()
        .create(path)
        .map_err(|e| database_error(path, e))?;
    let mut live = Vec::new();
    let mut dropped = Vec::new();
    let mut read = || -> std::result::Result<(), redb::Error> {
        let tx = db.begin_read()?;
        let table = match tx.open_table(TABLE) {
            Ok(t) => t,
            Err(TableError::TableDoesNotExist(_)) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        for item in table.iter()? {
            let (k, v) = item?;
            let key: Box<str> = k.value().into();
            match decode(v.value()) {
                Some(e) if e.live(now) => live.push((key, e)),
                Some(_) => dropped.push(key),
                None => {
                    warn!(path = %path.display(), "embedded store: dropping an unreadable entry");
                    dropped.push(key);
                }
            }
        }
        Ok(())
    };
    read().map_err(|e| redb_error(path, e))?;
    Ok((db, live, dropped))
}

fn write_batch(
    db: &Database,
    batch: &[(Box<str>, Option<Vec<u8>>)],
) -> std::result::Result<(), redb::Error> {
    let mut tx = db.begin_write()?;
    tx.set_durability(Durability::Immediate)?;
    // Commits cost a little more, but opening after a crash needs no full
    // repair of the file.
    tx.set_quick_repair(true);
    {
        let mut table = tx.open_table(TABLE)?;
        for (k, v) in batch {
            match v {
                Some(v) => {
                    table.insert(&**k, v.as_slice())?;
                }
                None => {
                    table.remove(&**k)?;
                }
            }
        }
    }
    tx.commit()?;
    Ok(())
}

fn io_error(path: &Path, source: std::io::Error) -> StoreError {
    StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

fn database_error(path: &Path, e: DatabaseError) -> StoreError {
    match e {
        DatabaseError::DatabaseAlreadyOpen | DatabaseError::LockProtocolMismatch => {
            StoreError::Locked {
                path: path.to_owned(),
            }
        }
        DatabaseError::UpgradeRequired(v) => StoreError::Corrupt {
            path: path.to_owned(),
            detail: format!("written in redb file format {v}, which this build cannot read"),
        },
        DatabaseError::RepairAborted => StoreError::Corrupt {
            path: path.to_owned(),
            detail: "the repair after an unclean shutdown failed".into(),
        },
        DatabaseError::Storage(s) => redb_error(path, s.into()),
        other => redb_error(path, other.into()),
    }
}

fn redb_error(path: &Path, e: redb::Error) -> StoreError {
    match e {
        redb::Error::Io(source) => io_error(path, source),
        redb::Error::Corrupted(detail) => StoreError::Corrupt {
            path: path.to_owned(),
            detail,
        },
        redb::Error::DatabaseAlreadyOpen | redb::Error::LockProtocolMismatch => {
            StoreError::Locked {
                path: path.to_owned(),
            }
        }
        other => StoreError::Backend(format!("{}: {other}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_are_read_as_redis_reads_them() {
        for (text, n) in [("0", Some(0)), ("42", Some(42)), ("-7", Some(-7))] {
            assert_eq!(parse_integer(text.as_bytes()), n, "{text}");
        }
        assert_eq!(
            parse_integer(i64::MIN.to_string().as_bytes()),
            Some(i64::MIN)
        );
        for text in [
            "",
            "-",
            "+5",
            "007",
            "-0",
            " 5",
            "5 ",
            "1e3",
            "9223372036854775808",
        ] {
            assert_eq!(parse_integer(text.as_bytes()), None, "{text:?}");
        }
    }

    #[test]
    fn entries_round_trip() {
        let e = Entry {
            value: b"v\x00".to_vec(),
            expires: 1_700_000_000_123,
        };
        let back = decode(&encode(&e));
        assert!(back.is_some_and(|b| b.value == e.value && b.expires == e.expires));
        assert!(decode(b"short").is_none());
    }
}
