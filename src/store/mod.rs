//! Shared state with expiry for the checks: greylisting, rate limits,
//! denylisting, fingerprints and bounce de-duplication.
//!
//! One [`Store`] handle (cheap to clone) offers the few atomic operations the
//! checks need, over one of two backends:
//!
//! - **embedded** (the default): the state lives in memory and is written to
//!   one file every `flush_interval` (1 s) in one crash-safe transaction, so a
//!   crash (`kill -9`, power loss) loses at most the writes of the last
//!   interval. Expired keys are purged every `purge_interval`.
//! - **redis**: one Redis server or a Redis Cluster, shared by several MX
//!   hosts. Every operation is one round trip and atomic on the server.
//!
//! Keys are built with [`Key`]: addresses and domains go into
//! [`Key::hashed`], which the store turns into a keyed hash, so the store
//! never holds readable correspondence data.
//!
//! Every operation is cancellation-safe: dropping its future leaves the store
//! consistent (the operation happened entirely or not at all).

mod embedded;
mod key;
mod policy;
mod redis;

pub use crate::config::{OnError, redact_in, redact_url};
pub use key::Key;
pub use policy::{FailurePolicy, Fallback};

use crate::{clock::Clock, config::StoreBackend, config::StoreConfig};
use ring::{hmac, rand::SecureRandom};
use std::{future::Future, path::PathBuf, sync::Arc, time::Duration};
use thiserror::Error;
use tokio::sync::OnceCell;

/// Why a store operation failed.
#[derive(Debug, Error)]
pub enum StoreError {
    #[error("the state store is unavailable: {0}")]
    Unavailable(String),
    #[error("the state store did not answer within {0:?}")]
    Timeout(Duration),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: the state file is damaged ({detail}); move it away to start with empty state", path.display())]
    Corrupt { path: PathBuf, detail: String },
    #[error("{}: the state file is in use by another process (is another mxguard running?)", path.display())]
    Locked { path: PathBuf },
    #[error("the value stored under `{key}` is not an integer, or the increment would overflow")]
    NotInteger { key: String },
    #[error("the state store answered with an error: {0}")]
    Backend(String),
    #[error("the state store is closed")]
    Closed,
    /// The embedded store's last flush failed (disk full, read-only file
    /// system): changes are refused, so none is acknowledged that a crash
    /// would lose, until a flush succeeds again.
    #[error("{}: the state file cannot be written ({detail}); changes are refused until it can be", path.display())]
    Unwritable { path: PathBuf, detail: String },
    #[error("{0}")]
    Config(String),
}

impl StoreError {
    /// A short stable name for metrics labels.
    pub fn label(&self) -> &'static str {
        match self {
            StoreError::Unavailable(_) => "unavailable",
            StoreError::Timeout(_) => "timeout",
            StoreError::Io { .. } => "io",
            StoreError::Corrupt { .. } => "corrupt",
            StoreError::Locked { .. } => "locked",
            StoreError::NotInteger { .. } => "not_integer",
            StoreError::Backend(_) => "backend",
            StoreError::Closed => "closed",
            StoreError::Unwritable { .. } => "unwritable",
            StoreError::Config(_) => "config",
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The atomic operations of a state store backend, on keys already
/// rendered (hashed where needed). Both backends implement it; [`Store`],
/// the handle the checks hold, renders keys and hands each operation to the
/// configured backend through it. Every operation is cancellation-safe.
pub trait StoreOps: Send + Sync {
    /// The value under `key`, if it exists and has not expired.
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<Vec<u8>>>> + Send;
    /// Stores `value` for `ttl`, replacing any value and expiry.
    fn set(
        &self,
        key: &str,
        value: &[u8],
        ttl: Duration,
    ) -> impl Future<Output = Result<()>> + Send;
    /// Stores `value` only if `key` does not exist; true if stored. `None`:
    /// no expiry (the store's own bookkeeping only).
    fn set_if_absent(
        &self,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> impl Future<Output = Result<bool>> + Send;
    /// Adds `by` to the integer under `key`; a new key starts at 0 and
    /// expires after `ttl_on_create`, an existing one keeps its expiry.
    fn incr(
        &self,
        key: &str,
        by: i64,
        ttl_on_create: Duration,
    ) -> impl Future<Output = Result<i64>> + Send;
    /// Removes `key`; true if it existed.
    fn delete(&self, key: &str) -> impl Future<Output = Result<bool>> + Send;
    /// The time `key` has left to live; `None` if it does not exist.
    fn ttl(&self, key: &str) -> impl Future<Output = Result<Option<Duration>>> + Send;
    /// Makes what is held in memory durable now.
    fn flush(&self) -> impl Future<Output = Result<()>> + Send;
    /// Drops expired keys now; returns how many.
    fn purge_expired(&self) -> impl Future<Output = Result<usize>> + Send;
    /// Stops background work and releases the file or connections.
    fn close(&self) -> impl Future<Output = Result<()>> + Send;
}

impl StoreOps for embedded::Embedded {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        embedded::Embedded::get(self, key)
    }
    async fn set(&self, key: &str, value: &[u8], ttl: Duration) -> Result<()> {
        embedded::Embedded::set(self, key, value, Some(ttl))
    }
    async fn set_if_absent(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> Result<bool> {
        embedded::Embedded::set_if_absent(self, key, value, ttl)
    }
    async fn incr(&self, key: &str, by: i64, ttl_on_create: Duration) -> Result<i64> {
        embedded::Embedded::incr(self, key, by, ttl_on_create)
    }
    async fn delete(&self, key: &str) -> Result<bool> {
        embedded::Embedded::delete(self, key)
    }
    async fn ttl(&self, key: &str) -> Result<Option<Duration>> {
        embedded::Embedded::ttl(self, key)
    }
    async fn flush(&self) -> Result<()> {
        embedded::Embedded::flush(self).await
    }
    async fn purge_expired(&self) -> Result<usize> {
        embedded::Embedded::purge(self).await
    }
    async fn close(&self) -> Result<()> {
        embedded::Embedded::close(self).await
    }
}

impl StoreOps for redis::RedisStore {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        redis::RedisStore::get(self, key).await
    }
    async fn set(&self, key: &str, value: &[u8], ttl: Duration) -> Result<()> {
        redis::RedisStore::set(self, key, value, ttl).await
    }
    async fn set_if_absent(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> Result<bool> {
        redis::RedisStore::set_if_absent(self, key, value, ttl).await
    }
    async fn incr(&self, key: &str, by: i64, ttl_on_create: Duration) -> Result<i64> {
        redis::RedisStore::incr(self, key, by, ttl_on_create).await
    }
    async fn delete(&self, key: &str) -> Result<bool> {
        redis::RedisStore::delete(self, key).await
    }
    async fn ttl(&self, key: &str) -> Result<Option<Duration>> {
        redis::RedisStore::ttl(self, key).await
    }
    /// Redis persists on its own terms (see its `appendonly`).
    async fn flush(&self) -> Result<()> {
        Ok(())
    }
    /// Redis expires keys itself.
    async fn purge_expired(&self) -> Result<usize> {
        Ok(0)
    }
    async fn close(&self) -> Result<()> {
        redis::RedisStore::close(self);
        Ok(())
    }
}

/// Hands an operation to the configured backend, through [`StoreOps`].
macro_rules! dispatch {
    ($backend:expr, $op:ident ( $($arg:expr),* )) => {
        match $backend {
            Backend::Embedded(b) => StoreOps::$op(b, $($arg),*).await,
            Backend::Redis(b) => StoreOps::$op(b, $($arg),*).await,
        }
    };
}

/// The state store. Clones share one backend.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    backend: Backend,
    /// The HMAC key for [`Key::hashed`]: read from `key_secret_file` at open,
    /// or fetched from (and on first use created in) the store itself on the
    /// first hashed key, so a store that is down at start does not stop the
    /// daemon from starting.
    secret: OnceCell<hmac::Key>,
}

enum Backend {
    Embedded(embedded::Embedded),
    Redis(redis::RedisStore),
}

/// The key under which a generated key secret is kept.
const SECRET_KEY: &str = "meta:key_secret";

impl Store {
    /// Opens the configured backend. The embedded store reads its file here
    /// (errors: unreadable, damaged, locked by another process); Redis is not
    /// contacted until the first operation.
    ///
    /// `clock` gives the embedded store its time (a test clock expires keys
    /// without sleeping); Redis expires keys by its own clock.
    pub async fn open(config: &StoreConfig, clock: Arc<dyn Clock>) -> Result<Self> {
        config.validate().map_err(StoreError::Config)?;
        let backend = match config.backend {
            StoreBackend::Embedded => Backend::Embedded(
                embedded::Embedded::open(
                    config.path.clone(),
                    config.flush_interval.get(),
                    config.purge_interval.get(),
                    clock,
                )
                .await?,
            ),
            StoreBackend::Redis => Backend::Redis(redis::RedisStore::open(config)?),
        };
        let secret = OnceCell::new();
        if let Some(path) = &config.key_secret_file {
            let bytes = tokio::fs::read(path).await.map_err(|e| {
                StoreError::Config(format!(
                    "store.key_secret_file {}: cannot read the key secret: {e}",
                    path.display()
                ))
            })?;
            let trimmed = bytes.trim_ascii();
            if trimmed.len() < 16 {
                return Err(StoreError::Config(format!(
                    "store.key_secret_file {}: the secret is {} bytes long; it must be at least 16 (e.g. `openssl rand -hex 32`)",
                    path.display(),
                    trimmed.len()
                )));
            }
            let _ = secret.set(hmac::Key::new(hmac::HMAC_SHA256, trimmed));
        }
        Ok(Self {
            inner: Arc::new(Inner { backend, secret }),
        })
    }

    /// Whether the store takes changes now, for `/healthz`: the embedded
    /// store's file can be written (its last flush did not fail); Redis
    /// answers a read within `store.timeout`.
    pub async fn health(&self) -> Result<()> {
        match &self.inner.backend {
            Backend::Embedded(e) => e.health(),
            Backend::Redis(_) => self
                .get(&Key::plain("health", &["probe"]))
                .await
                .map(|_| ()),
        }
    }

    /// `embedded` or `redis`, for logs and metrics.
    pub fn backend_name(&self) -> &'static str {
        match self.inner.backend {
            Backend::Embedded(_) => "embedded",
            Backend::Redis(_) => "redis",
        }
    }

    /// The value under `key`, if it exists and has not expired.
    pub async fn get(&self, key: &Key) -> Result<Option<Vec<u8>>> {
        let k = self.render(key).await?;
        dispatch!(&self.inner.backend, get(&k))
    }

    /// Stores `value` under `key` for `ttl`, replacing any value and expiry.
    pub async fn set(&self, key: &Key, value: &[u8], ttl: Duration) -> Result<()> {
        let k = self.render(key).await?;
        dispatch!(&self.inner.backend, set(&k, value, ttl))
    }

    /// Stores `value` under `key` for `ttl` only if the key does not exist;
    /// true if it was stored. An existing key keeps its value and expiry.
    pub async fn set_if_absent(&self, key: &Key, value: &[u8], ttl: Duration) -> Result<bool> {
        let k = self.render(key).await?;
        self.set_if_absent_raw(&k, value, Some(ttl)).await
    }

    /// Adds `by` (which may be negative) to the integer under `key` and
    /// returns the new value. A key that does not exist starts at 0 and
    /// expires after `ttl_on_create`; an existing key keeps its expiry.
    /// Counters are stored as decimal text, so [`Store::get`] reads `b"42"`.
    pub async fn incr(&self, key: &Key, by: i64, ttl_on_create: Duration) -> Result<i64> {
        let k = self.render(key).await?;
        dispatch!(&self.inner.backend, incr(&k, by, ttl_on_create))
    }

    /// Removes `key`; true if it existed (and had not expired).
    pub async fn delete(&self, key: &Key) -> Result<bool> {
        let k = self.render(key).await?;
        dispatch!(&self.inner.backend, delete(&k))
    }

    /// The time `key` has left to live; `None` if it does not exist. Only the
    /// store's own bookkeeping keys live for ever: they read as
    /// `Duration::MAX`.
    pub async fn ttl(&self, key: &Key) -> Result<Option<Duration>> {
        let k = self.render(key).await?;
        dispatch!(&self.inner.backend, ttl(&k))
    }

    /// Writes the embedded store's changes to disk now (it does so on its
    /// own every `flush_interval`); nothing to do for Redis.
    pub async fn flush(&self) -> Result<()> {
        dispatch!(&self.inner.backend, flush())
    }

    /// Drops the embedded store's expired keys now (it does so on its own
    /// every `purge_interval`) and returns how many; Redis expires keys
    /// itself.
    pub async fn purge_expired(&self) -> Result<usize> {
        dispatch!(&self.inner.backend, purge_expired())
    }

    /// Stops the background tasks, writes the last changes and releases the
    /// file (or the Redis connections). Operations after it fail with
    /// [`StoreError::Closed`]. Call it on shutdown: without it, the embedded
    /// store loses the writes since its last flush.
    pub async fn close(&self) -> Result<()> {
        dispatch!(&self.inner.backend, close())
    }

    /// The key as the backend stores it (without the Redis prefix): for
    /// tests and debugging; a hashed key shows only its hash.
    pub async fn render(&self, key: &Key) -> Result<String> {
        if key.is_hashed() {
            let secret = self.secret().await?;
            Ok(key.render(Some(secret)))
        } else {
            Ok(key.render(None))
        }
    }

    async fn secret(&self) -> Result<&hmac::Key> {
        self.inner
            .secret
            .get_or_try_init(|| async {
                let bytes = self.shared_secret().await?;
                Ok(hmac::Key::new(hmac::HMAC_SHA256, &bytes))
            })
            .await
    }

    /// The secret kept in the store: the first MX to need one creates it with
    /// set-if-absent, every other one reads the winner's, so hosts sharing a
    /// Redis agree on every hash without configuration.
    async fn shared_secret(&self) -> Result<Vec<u8>> {
        for _ in 0..3 {
            if let Some(v) = self.get_raw(SECRET_KEY).await? {
                return Ok(v);
            }
            let mut fresh = [0u8; 32];
            ring::rand::SystemRandom::new()
                .fill(&mut fresh)
                .map_err(|_| StoreError::Backend("no random numbers for the key secret".into()))?;
            let hexed = key::hex(&fresh);
            if self
                .set_if_absent_raw(SECRET_KEY, hexed.as_bytes(), None)
                .await?
            {
                return Ok(hexed.into_bytes());
            }
            // Another host won the race: read its secret on the next turn.
        }
        Err(StoreError::Backend(
            "the key secret keeps disappearing from the store".into(),
        ))
    }

    async fn get_raw(&self, k: &str) -> Result<Option<Vec<u8>>> {
        match &self.inner.backend {
            Backend::Embedded(e) => e.get(k),
            Backend::Redis(r) => r.get(k).await,
        }
    }

    async fn set_if_absent_raw(
        &self,
        k: &str,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> Result<bool> {
        dispatch!(&self.inner.backend, set_if_absent(k, value, ttl))
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.backend_name())
            .finish_non_exhaustive()
    }
}

/// A TTL in whole milliseconds, at least 1: both backends count in
/// milliseconds, and Redis refuses an expiry of 0.
fn ttl_ms(ttl: Duration) -> u64 {
    let ms = ttl.as_nanos().div_ceil(1_000_000);
    u64::try_from(ms)
        .unwrap_or(u64::MAX / 4)
        .clamp(1, u64::MAX / 4)
}

/// An embedded store in a temporary directory, on a clock the test moves
/// (2023-11-14, the reference's test-vector time): for the checks' unit tests.
#[cfg(test)]
pub(crate) async fn test_store()
-> Result<(Store, tempfile::TempDir, Arc<crate::clock::FixedClock>), Box<dyn std::error::Error>> {
    let clock = Arc::new(crate::clock::FixedClock::new(
        std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
    ));
    let dir = tempfile::tempdir()?;
    let config = StoreConfig {
        path: dir.path().join("state.db"),
        ..StoreConfig::default()
    };
    let store = Store::open(&config, clock.clone()).await?;
    Ok((store, dir, clock))
}
