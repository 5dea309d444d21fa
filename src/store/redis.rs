//! The Redis backend: one server (`url`) or a Redis Cluster (`urls`).
//!
//! Every operation is one command (or one small Lua script), so it is one
//! round trip and atomic on the server. Connections come from a
//! deadpool-redis pool, but are kept rather than returned after each
//! command: a Redis connection carries many requests at once, and the pool's
//! health check on every checkout would double the round trips. A connection
//! that fails or times out is dropped and the next operation on its slot
//! opens a new one, so the store recovers by itself when Redis comes back.
//! Reads and plain sets that meet a dead kept connection are sent once more
//! on a fresh one; the other operations are not (they may have been applied),
//! so right after a Redis restart each kept connection may fail one of them.

use super::{Result, StoreError, ttl_ms};
use crate::config::StoreConfig;
use crate::config::redact_in;
use deadpool_redis::{
    Connection, Manager, Pool, PoolError, Runtime,
    cluster::{Connection as ClusterObject, Manager as ClusterManager, Pool as ClusterPool},
    redis::{
        self, AsyncConnectionConfig, Cmd, ErrorKind, FromRedisValue, RedisError, ServerErrorKind,
        aio::MultiplexedConnection, cluster_async::ClusterConnection,
    },
};
use std::{
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};
use tokio::time::{Instant, timeout_at};

/// INCRBY, and an expiry only when the key is new; `KEYS[1]` is the key,
/// `ARGV[1]` the increment, `ARGV[2]` the TTL in milliseconds. The new value
/// is read back with GET because Lua turns INCRBY's integer into a double,
/// which is inexact beyond 2^53. Sent with EVAL every time: one round trip
/// always, and Redis caches the compiled script itself.
const INCR_SCRIPT: &str = "local new = redis.call('EXISTS', KEYS[1]) == 0 \
redis.call('INCRBY', KEYS[1], ARGV[1]) \
if new then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end \
return redis.call('GET', KEYS[1])";

enum Pools {
    Single(Pool),
    Cluster(ClusterPool),
}

#[derive(Clone)]
enum Conn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl Conn {
    async fn query<T: FromRedisValue>(&mut self, cmd: &Cmd) -> redis::RedisResult<T> {
        match self {
            Conn::Single(c) => cmd.query_async(c).await,
            Conn::Cluster(c) => cmd.query_async(c).await,
        }
    }
}

/// A kept connection and its generation number.
type Slot = Mutex<Option<(u64, Conn)>>;

pub(super) struct RedisStore {
    pools: Pools,
    /// `pool_size` connections, used in turn; each entry carries a number
    /// that tells a replaced connection from the one that failed.
    slots: Box<[Slot]>,
    next_slot: AtomicUsize,
    generation: AtomicU64,
    prefix: String,
    timeout: Duration,
    /// The URL(s), to hide a password from error messages.
    urls: Vec<String>,
}

impl RedisStore {
    /// Builds the pool; no connection is made until the first operation.
    pub(super) fn open(config: &StoreConfig) -> Result<Self> {
        let timeout = config.timeout.get();
        let size = config.pool_size.max(1);
        let (pools, urls) = match &config.url {
            Some(url) => {
                // The operation's own timeout bounds the response; the
                // connection's built-in 500 ms one would cut it shorter.
                let conn_config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(None);
                let manager = Manager::new_with_config(url.as_str(), conn_config).map_err(|e| {
                    StoreError::Config(format!("store.url: {}", redact_in(url, &e.to_string())))
                })?;
                let pool = Pool::builder(manager)
                    .max_size(size)
                    .runtime(Runtime::Tokio1)
                    .create_timeout(Some(timeout))
                    .wait_timeout(Some(timeout))
                    .build()
                    .map_err(|e| StoreError::Config(format!("store.url: {e}")))?;
                (Pools::Single(pool), vec![url.clone()])
            }
            None => {
                let manager = ClusterManager::new(config.urls.clone(), false).map_err(|e| {
                    let text = config
                        .urls
                        .iter()
                        .fold(e.to_string(), |t, u| redact_in(u, &t));
                    StoreError::Config(format!("store.urls: {text}"))
                })?;
                let pool = ClusterPool::builder(manager)
                    .max_size(size)
                    .runtime(Runtime::Tokio1)
                    .create_timeout(Some(timeout))
                    .wait_timeout(Some(timeout))
                    .build()
                    .map_err(|e| StoreError::Config(format!("store.urls: {e}")))?;
                (Pools::Cluster(pool), config.urls.clone())
            }
        };
        Ok(Self {
            pools,
            slots: (0..size).map(|_| Mutex::new(None)).collect(),
            next_slot: AtomicUsize::new(0),
            generation: AtomicU64::new(0),
            prefix: config.prefix.clone(),
            timeout,
            urls,
        })
    }

    fn key(&self, key: &str) -> String {
        let mut k = String::with_capacity(self.prefix.len() + key.len());
        k.push_str(&self.prefix);
        k.push_str(key);
        k
    }

    pub(super) async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.run(redis::cmd("GET").arg(self.key(key)), true).await
    }

    pub(super) async fn set(&self, key: &str, value: &[u8], ttl: Duration) -> Result<()> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.key(key)).arg(value).arg("PX").arg(ttl_ms(ttl));
        self.run(&cmd, true).await
    }

    pub(super) async fn set_if_absent(
        &self,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> Result<bool> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.key(key)).arg(value).arg("NX");
        if let Some(ttl) = ttl {
            cmd.arg("PX").arg(ttl_ms(ttl));
        }
        // `OK` when set, nil when the key exists.
        let set: Option<String> = self.run(&cmd, false).await?;
        Ok(set.is_some())
    }

    pub(super) async fn incr(&self, key: &str, by: i64, ttl_on_create: Duration) -> Result<i64> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(INCR_SCRIPT)
            .arg(1)
            .arg(self.key(key))
            .arg(by)
            .arg(ttl_ms(ttl_on_create));
        self.run(&cmd, false).await.map_err(|e| match e {
            StoreError::Backend(m) if m.contains("not an integer") || m.contains("overflow") => {
                StoreError::NotInteger { key: key.into() }
            }
            e => e,
        })
    }

    pub(super) async fn delete(&self, key: &str) -> Result<bool> {
        let n: i64 = self
            .run(redis::cmd("DEL").arg(self.key(key)), false)
            .await?;
        Ok(n > 0)
    }

    pub(super) async fn ttl(&self, key: &str) -> Result<Option<Duration>> {
        let ms: i64 = self
            .run(redis::cmd("PTTL").arg(self.key(key)), true)
            .await?;
        Ok(match ms {
            -2 => None,
            -1 => Some(Duration::MAX),
            ms => Some(Duration::from_millis(u64::try_from(ms).unwrap_or(0))),
        })
    }

    pub(super) fn close(&self) {
        match &self.pools {
            Pools::Single(p) => p.close(),
            Pools::Cluster(p) => p.close(),
        }
        for slot in &self.slots {
            *slot.lock().unwrap_or_else(PoisonError::into_inner) = None;
        }
    }

    /// One command within the timeout. A command that fails because its
    /// kept connection died is sent once more on a fresh connection if it is
    /// `idempotent` (the others might have been applied already).
    async fn run<T: FromRedisValue>(&self, cmd: &Cmd, idempotent: bool) -> Result<T> {
        let deadline = Instant::now() + self.timeout;
        let slot = self.next_slot.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let (generation, mut conn, kept) = self.connection(slot, deadline).await?;
        match self.query(slot, generation, &mut conn, cmd, deadline).await {
            Err(Failed { lost: true, .. }) if kept && idempotent => {
                let (generation, mut conn, _) = self.connection(slot, deadline).await?;
                self.query(slot, generation, &mut conn, cmd, deadline)
                    .await
                    .map_err(|f| f.error)
            }
            r => r.map_err(|f| f.error),
        }
        .map_err(|e| {
            if let StoreError::Unavailable(m) = e {
                StoreError::Unavailable(self.hide_passwords(&m))
            } else {
                e
            }
        })
    }

    async fn query<T: FromRedisValue>(
        &self,
        slot: usize,
        generation: u64,
        conn: &mut Conn,
        cmd: &Cmd,
        deadline: Instant,
    ) -> std::result::Result<T, Failed> {
        match timeout_at(deadline, conn.query(cmd)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                let lost = connection_lost(&e);
                if lost {
                    self.discard(slot, generation);
                }
                Err(Failed {
                    error: map_error(&e, self.timeout),
                    lost,
                })
            }
            Err(_) => {
                // The connection may be stuck: start afresh next time.
                self.discard(slot, generation);
                Err(Failed {
                    error: StoreError::Timeout(self.timeout),
                    lost: false,
                })
            }
        }
    }

    /// The slot's connection (and true), or a new one from the pool.
    async fn connection(&self, slot: usize, deadline: Instant) -> Result<(u64, Conn, bool)> {
        if let Some((g, c)) = self.slots[slot]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
        {
            return Ok((g, c, true));
        }
        let conn = match timeout_at(deadline, self.connect()).await {
            Ok(c) => c?,
            Err(_) => return Err(StoreError::Timeout(self.timeout)),
        };
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        *self.slots[slot]
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some((generation, conn.clone()));
        Ok((generation, conn, false))
    }

    async fn connect(&self) -> Result<Conn> {
        Ok(match &self.pools {
            Pools::Single(p) => Conn::Single(Connection::take(
                p.get().await.map_err(|e| self.pool_error(e))?,
            )),
            Pools::Cluster(p) => Conn::Cluster(ClusterObject::take(
                p.get().await.map_err(|e| self.pool_error(e))?,
            )),
        })
    }

    fn discard(&self, slot: usize, generation: u64) {
        let mut s = self.slots[slot]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if s.as_ref().is_some_and(|(g, _)| *g == generation) {
            *s = None;
        }
    }

    fn pool_error(&self, e: PoolError) -> StoreError {
        match e {
            PoolError::Timeout(_) => StoreError::Timeout(self.timeout),
            PoolError::Backend(e) => match map_error(&e, self.timeout) {
                // Whatever fails while connecting means Redis cannot be used.
                StoreError::Backend(m) => StoreError::Unavailable(m),
                other => other,
            },
            PoolError::Closed => StoreError::Closed,
            other => StoreError::Unavailable(other.to_string()),
        }
    }

    fn hide_passwords(&self, text: &str) -> String {
        self.urls
            .iter()
            .fold(text.to_owned(), |t, u| redact_in(u, &t))
    }
}

/// A failed command, and whether its connection was lost (so that sending
/// it again on a new one may succeed).
struct Failed {
    error: StoreError,
    lost: bool,
}

/// True when the connection is unusable and must be replaced.
fn connection_lost(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_unrecoverable_error()
}

fn map_error(e: &RedisError, timeout: Duration) -> StoreError {
    if e.is_timeout() {
        return StoreError::Timeout(timeout);
    }
    if connection_lost(e) {
        return StoreError::Unavailable(e.to_string());
    }
    match e.kind() {
        ErrorKind::AuthenticationFailed
        | ErrorKind::ClusterConnectionNotFound
        | ErrorKind::Server(
            ServerErrorKind::ClusterDown
            | ServerErrorKind::MasterDown
            | ServerErrorKind::TryAgain
            | ServerErrorKind::BusyLoading
            | ServerErrorKind::ReadOnly
            | ServerErrorKind::NoPerm,
        ) => StoreError::Unavailable(e.to_string()),
        _ => StoreError::Backend(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use crate::config::redact_url;

    #[test]
    fn redaction() {
        assert_eq!(redact_url("redis://:pw@h:1/0"), "redis://:***@h:1/0");
        assert_eq!(redact_url("rediss://user:pw@h"), "rediss://user:***@h");
        assert_eq!(redact_url("redis://pw@h"), "redis://***@h");
        assert_eq!(redact_url("redis://h:6379"), "redis://h:6379");
        assert_eq!(
            redact_url("redis+unix:///run/r.sock"),
            "redis+unix:///run/r.sock"
        );
    }
}
