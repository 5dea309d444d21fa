//! mxguard: inbound forwarding-MX checks and rewriting beside Postfix, as a
//! milter and an SMTP access policy service.
//!
//! The library exists so that the integration tests can start the daemon
//! in-process with [`run`]; the `mxguard` binary is a thin CLI over it. No
//! stability is promised for this API.

pub mod aliases;
pub mod checks;
pub mod clock;
pub mod config;
pub mod dns;
pub mod engine;
pub mod envelope;
pub mod feeds;
pub mod http;
pub mod metrics;
pub mod milter;
pub mod net;
pub mod nobounce;
pub mod policy;
pub mod roster;
pub mod socketmap;
pub mod srs;
pub mod store;
pub mod verdict;
pub mod webhooks;

use crate::{
    clock::SystemClock,
    config::{Config, ConfigError, ListenAddr},
    engine::{CurrentEngine, Engine},
    metrics::Metrics,
    milter::InFlight,
    net::{Listener, StoppableListener},
};
use std::{
    future::Future,
    io,
    path::{Path, PathBuf},
    sync::Arc,
};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{error, info, warn};

/// Domains whose parsed TXT forwarding rules are kept at once.
const TXT_CACHE_ENTRIES: usize = 10_000;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// A configuration and the file it came from, so a reload can read it again.
#[derive(Clone, Debug)]
pub struct ConfigFile {
    pub path: PathBuf,
    pub config: Config,
}

impl ConfigFile {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Ok(Self {
            path: path.to_owned(),
            config: Config::load(path)?,
        })
    }

    /// Reads the file again for a reload: as [`ConfigFile::load`], but a
    /// file with no settings is refused ([`Config::load_for_reload`]).
    pub fn reload(path: &Path) -> Result<Self, ConfigError> {
        Ok(Self {
            path: path.to_owned(),
            config: Config::load_for_reload(path)?,
        })
    }
}

/// The sockets of the front ends, bound before [`run`] so that a caller (a
/// test, or `main` before it drops privileges) knows the addresses.
#[derive(Debug, Default)]
pub struct Listeners {
    pub milter: Option<Listener>,
    pub policy: Option<Listener>,
    pub socketmap: Option<Listener>,
    pub http: Option<Listener>,
}

impl Listeners {
    /// Binds every front end the configuration turns on.
    pub async fn bind(config: &Config) -> io::Result<Self> {
        // One front end's listener, if it is on; its socket_group errors
        // name the option.
        async fn bind_one(
            listen: Option<&ListenAddr>,
            mode: config::SocketMode,
            group: Option<&str>,
            option: &str,
        ) -> io::Result<Option<Listener>> {
            match listen {
                Some(a) => Ok(Some(
                    Listener::bind_with_group(a, mode, group.map(|g| (option, g))).await?,
                )),
                None => Ok(None),
            }
        }
        let milter = bind_one(
            config.milter.listen.as_ref(),
            config.milter.socket_mode,
            config.milter.socket_group.as_deref(),
            "milter.socket_group",
        )
        .await?;
        let policy = bind_one(
            config.policy.listen.as_ref(),
            config.policy.socket_mode,
            config.policy.socket_group.as_deref(),
            "policy.socket_group",
        )
        .await?;
        let socketmap = bind_one(
            config.socketmap.listen.as_ref(),
            config.socketmap.socket_mode,
            config.socketmap.socket_group.as_deref(),
            "socketmap.socket_group",
        )
        .await?;
        let http = match &config.http.listen {
            Some(a) => Some(Listener::bind(a, config::SocketMode(0o600)).await?),
            None => None,
        };
        Ok(Self {
            milter,
            policy,
            socketmap,
            http,
        })
    }

    pub fn milter_addr(&self) -> Option<ListenAddr> {
        self.milter.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn policy_addr(&self) -> Option<ListenAddr> {
        self.policy.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn socketmap_addr(&self) -> Option<ListenAddr> {
        self.socketmap.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn http_addr(&self) -> Option<ListenAddr> {
        self.http.as_ref().and_then(|l| l.local_addr().ok())
    }
}

#[derive(Debug, Error)]
pub enum RunError {
    #[error("{0}")]
    Dns(String),
    #[error("cannot open the state store: {0}")]
    Store(#[from] store::StoreError),
    #[error("cannot set up metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("the milter front end failed: {0}")]
    Milter(io::Error),
}

/// Runs the daemon on the given sockets until `shutdown` resolves.
///
/// Each message on `reload` re-reads the configuration file; a file that does
/// not load is logged and the running configuration stays. On shutdown the
/// sockets close at once, messages and policy requests in flight get up to
/// `shutdown_timeout` to finish, and then the function returns.
pub async fn run(
    listeners: Listeners,
    file: ConfigFile,
    mut reload: mpsc::Receiver<()>,
    shutdown: impl Future,
) -> Result<(), RunError> {
    match net::raise_open_files_limit() {
        Ok(n) if n < 4096 => {
            warn!("open files limited to {n}: connections past it are refused; raise LimitNOFILE")
        }
        Ok(_) => {}
        Err(e) => warn!("cannot read or raise the open files limit: {e}"),
    }
    let metrics = Arc::new(Metrics::new()?);
    let clock: Arc<dyn clock::Clock> = Arc::new(SystemClock);
    let store = store::Store::open(&file.config.store, clock.clone()).await?;
    let feeds = Arc::new(feeds::Feeds::new(
        &file.config.denylist.feeds,
        file.config.backscatter.feed.as_ref(),
    ));
    // Read every feed once before answering; a feed that fails starts empty
    // and is tried again at its next refresh.
    for feed in feeds.all() {
        feeds::refresh(feed, clock.now(), &metrics).await;
    }
    let auth = Arc::new(dns::authenticator(&file.config.dns).map_err(RunError::Dns)?);
    let services = engine::Services {
        metrics: metrics.clone(),
        auth,
        clock: clock.clone(),
        store: store.clone(),
        feeds,
        txt_cache: Arc::new(aliases::TxtCache::new(TXT_CACHE_ENTRIES)),
        rosters: Arc::new(roster::Rosters::new(store.clone(), metrics.clone())),
    };
    let current = Arc::new(CurrentEngine::new(Engine::new(
        Arc::new(file.config.clone()),
        services.clone(),
    )));
    let (stop_tx, stop_rx) = watch::channel(false);
    let in_flight = InFlight::new();
    // Rosters: the last good sets at once, then a sync now and on every
    // refresh interval.
    services.rosters.load_saved().await;
    let roster_task = {
        let rosters = services.rosters.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            loop {
                if rosters.refresh().is_some() {
                    rosters.sync(false, false).await;
                }
                let wait = rosters
                    .refresh()
                    .unwrap_or(std::time::Duration::from_secs(60));
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = net::stopping(&mut stop) => break,
                }
            }
        })
    };
    let feed_tasks: Vec<_> = services
        .feeds
        .all()
        .map(|feed| {
            let (feed, services, mut stop) = (feed.clone(), services.clone(), stop_rx.clone());
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(feed.config().refresh.get()) => {
                            feeds::refresh(&feed, services.clock.now(), &services.metrics).await;
                        }
                        _ = net::stopping(&mut stop) => break,
                    }
                }
            })
        })
        .collect();

    let (milter_shutdown_tx, milter_shutdown_rx) = oneshot::channel::<()>();
    let mut milter_task = listeners.milter.map(|l| {
        let listener = StoppableListener::new(l, stop_rx.clone());
        tokio::spawn(milter::serve(
            listener,
            current.clone(),
            metrics.clone(),
            in_flight.clone(),
            async {
                let _ = milter_shutdown_rx.await;
            },
        ))
    });
    let mut policy_task = listeners.policy.map(|l| {
        tokio::spawn(policy::serve(
            l,
            current.clone(),
            metrics.clone(),
            stop_rx.clone(),
        ))
    });
    let mut socketmap_task = listeners.socketmap.map(|l| {
        tokio::spawn(socketmap::serve(
            l,
            current.clone(),
            metrics.clone(),
            stop_rx.clone(),
        ))
    });
    let http_task = listeners
        .http
        .map(|l| tokio::spawn(http::serve(l, services.clone(), stop_rx.clone())));

    info!(version = VERSION, config = %file.path.display(), mode = %file.config.mode, "mxguard started");
    let mut running = file;
    let mut failure = None;
    tokio::pin!(shutdown);
    let mut reload_open = true;
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            msg = reload.recv(), if reload_open => match msg {
                Some(()) => reload_config(&mut running, &current, &services),
                None => reload_open = false,
            },
            // The milter's accept loop only ends on its own when it can no
            // longer accept: that is fatal.
            res = finished(&mut milter_task) => {
                let e = match res {
                    Ok(Ok(())) => io::Error::other("stopped unexpectedly"),
                    Ok(Err(e)) => e,
                    Err(join) => io::Error::other(join.to_string()),
                };
                error!("the milter front end failed: {e}; stopping");
                failure = Some(RunError::Milter(e));
                break;
            }
        }
    }
    if failure.is_some() {
        // Its task has completed; it must not be awaited again.
        milter_task = None;
    }

    info!(
        "mxguard stopping: no new connections; waiting up to {} for sessions in flight",
        running.config.shutdown_timeout
    );
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(running.config.shutdown_timeout.get(), async {
        in_flight.idle().await;
        if let Some(t) = policy_task.as_mut() {
            let _ = t.await;
        }
        if let Some(t) = socketmap_task.as_mut() {
            let _ = t.await;
        }
    })
    .await;
    if drained.is_err() {
        warn!(
            "sessions still open after {}; closing them",
            running.config.shutdown_timeout
        );
    }
    let _ = milter_shutdown_tx.send(());
    if let Some(t) = milter_task {
        // indymilter closes its idle sessions at once; give it a moment.
        if tokio::time::timeout(std::time::Duration::from_secs(5), t)
            .await
            .is_err()
        {
            warn!("the milter front end did not stop in time");
        }
    }
    for t in [policy_task, socketmap_task, http_task]
        .into_iter()
        .flatten()
        .chain(feed_tasks)
        .chain(std::iter::once(roster_task))
    {
        t.abort();
    }
    // The embedded store writes what it holds in memory.
    if let Err(e) = store.close().await {
        error!("closing the state store: {e}");
    }
    info!("mxguard stopped");
    failure.map_or(Ok(()), Err)
}

/// Resolves when the task ends; never, when there is none.
async fn finished<T>(
    task: &mut Option<tokio::task::JoinHandle<T>>,
) -> Result<T, tokio::task::JoinError> {
    match task {
        Some(t) => t.await,
        None => std::future::pending().await,
    }
}

/// Reads the configuration again and, if it loads, puts it in force. Values
/// that only take effect at start are kept, with a warning.
fn reload_config(running: &mut ConfigFile, current: &CurrentEngine, services: &engine::Services) {
    let metrics = &services.metrics;
    let mut fresh = match ConfigFile::reload(&running.path) {
        Ok(f) => f,
        Err(e) => {
            metrics.reloads.with_label_values(&["error"]).inc();
            error!("configuration not reloaded, the running one stays: {e}");
            return;
        }
    };
    let old = &running.config;
    let new = &mut fresh.config;
    macro_rules! keep {
        ($($field:ident).+) => {
            if new.$($field).+ != old.$($field).+ {
                warn!(concat!("new value for ", stringify!($($field).+), " not loaded: restart needed"));
                new.$($field).+ = old.$($field).+.clone();
            }
        };
    }
    keep!(milter.listen);
    keep!(milter.socket_mode);
    keep!(milter.socket_group);
    keep!(milter.max_connections);
    keep!(milter.idle_timeout);
    keep!(policy.listen);
    keep!(policy.socket_mode);
    keep!(policy.socket_group);
    keep!(policy.max_connections);
    keep!(socketmap.listen);
    keep!(socketmap.socket_mode);
    keep!(socketmap.socket_group);
    keep!(socketmap.max_connections);
    keep!(http.listen);
    keep!(log.level);
    // The open store and the feeds stay; their options apply at the next start.
    keep!(store);
    keep!(denylist.feeds);
    keep!(backscatter.feed);
    current.replace(Engine::new(Arc::new(new.clone()), services.clone()));
    metrics.reloads.with_label_values(&["ok"]).inc();
    info!(config = %fresh.path.display(), mode = %new.mode, "configuration reloaded");
    *running = fresh;
}
