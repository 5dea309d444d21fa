//! The milter front end (Postfix `smtpd_milters`), built on indymilter.

mod callbacks;
mod session;

pub use callbacks::{REQUIRED_ACTIONS, make_callbacks};
pub use session::Session;

use crate::{
    engine::CurrentEngine,
    metrics::Metrics,
    net::StoppableListener,
    verdict::{Reply, Verdict},
};
use std::{future::Future, sync::Arc};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

/// `milter.max_connections`, enforced by mxguard rather than by indymilter:
/// indymilter stops accepting at its limit, which leaves Postfix waiting in
/// the listen backlog until `milter_command_timeout`. Sessions past the
/// limit are accepted instead and told `421` at connect, at once.
#[derive(Clone)]
pub struct ConnectionLimit {
    slots: Arc<Semaphore>,
    max: usize,
}

impl ConnectionLimit {
    pub fn new(max: usize) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(max)),
            max,
        }
    }

    /// A slot for a new session, held while it lives; `None` at the limit.
    pub fn take(&self) -> Option<OwnedSemaphorePermit> {
        self.slots.clone().try_acquire_owned().ok()
    }

    /// What a session past the limit is told at connect.
    pub fn refusal(&self) -> Verdict {
        Verdict::Tempfail(Reply::new(
            421,
            "4.7.0",
            format!(
                "Too many connections to the mail filter ({} open); please try again later",
                self.max
            ),
        ))
    }

    /// indymilter's own limit: room past ours for the sessions that are only
    /// refused (each lives for one round trip); past it the backlog waits.
    fn accept_limit(&self) -> usize {
        self.max.saturating_mul(2)
    }
}

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
    let limit = ConnectionLimit::new(engine.config().milter.max_connections);
    let config = indymilter::Config {
        max_connections: limit.accept_limit(),
        actions: REQUIRED_ACTIONS,
        connection_timeout: engine.config().milter.idle_timeout.get(),
    };
    drop(engine);
    let callbacks = make_callbacks(current, metrics, in_flight, limit);
    indymilter::run(listener, callbacks, config, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::ConnectionLimit;
    use crate::verdict::Verdict;

    #[test]
    fn sessions_past_the_limit_get_no_slot_and_a_421_until_one_closes() {
        let limit = ConnectionLimit::new(2);
        let first = limit.take();
        let second = limit.take();
        assert!(first.is_some() && second.is_some());
        assert!(limit.take().is_none());
        assert!(
            limit.accept_limit() > 2,
            "refused sessions must still be accepted"
        );
        match limit.refusal() {
            Verdict::Tempfail(r) => assert_eq!(
                r.to_string(),
                "421 4.7.0 Too many connections to the mail filter (2 open); please try again later"
            ),
            other => panic!("{other:?}"),
        }
        drop(first);
        assert!(limit.take().is_some());
    }
}
