//! The milter front end (Postfix `smtpd_milters`), built on indymilter.

mod callbacks;
mod session;

pub use callbacks::{REQUIRED_ACTIONS, make_callbacks};
pub use session::Session;

use crate::{engine::CurrentEngine, metrics::Metrics, net::StoppableListener};
use std::{future::Future, sync::Arc};
use tokio::sync::watch;

/// Counts the messages in flight (MAIL FROM seen, end or abort not yet), so
/// that a stopping daemon can let them finish.
#[derive(Clone)]
pub struct InFlight(Arc<watch::Sender<usize>>);

pub struct InFlightGuard(Arc<watch::Sender<usize>>);

impl InFlight {
    pub fn new() -> Self {
        Self(Arc::new(watch::Sender::new(0)))
    }

    fn enter(&self) -> InFlightGuard {
        self.0.send_modify(|n| *n += 1);
        InFlightGuard(self.0.clone())
    }

    /// Resolves once no message is in flight.
    pub async fn idle(&self) {
        let _ = self.0.subscribe().wait_for(|n| *n == 0).await;
    }
}

impl Default for InFlight {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// Serves milter connections until `shutdown` resolves.
pub async fn serve(
    listener: StoppableListener,
    current: Arc<CurrentEngine>,
    metrics: Arc<Metrics>,
    in_flight: InFlight,
    shutdown: impl Future,
) -> std::io::Result<()> {
    let engine = current.get();
    let config = indymilter::Config {
        max_connections: engine.config().milter.max_connections,
        actions: REQUIRED_ACTIONS,
        connection_timeout: engine.config().milter.idle_timeout.get(),
    };
    drop(engine);
    let callbacks = make_callbacks(current, metrics, in_flight);
    indymilter::run(listener, callbacks, config, shutdown).await
}
