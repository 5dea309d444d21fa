//! What a check does when the store fails (`store.on_error`).

use super::StoreError;
use crate::{
    config::{OnError, StoreConfig},
    verdict::{Reply, Verdict},
};
use std::{
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};
use tracing::warn;

/// What the check that met the error does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fallback {
    /// Answer with this verdict (451 4.3.0).
    Tempfail(Verdict),
    /// Skip this check (count it in a metric).
    Skip,
}

impl Fallback {
    /// The verdict the check returns: the tempfail, or `Continue` to skip.
    pub fn into_verdict(self) -> Verdict {
        match self {
            Fallback::Tempfail(v) => v,
            Fallback::Skip => Verdict::Continue,
        }
    }
}

/// Turns store errors into the configured fallback and logs them, at most
/// once per `warn_interval` (with the count of those not logged), so an
/// outage does not flood the log. Shared by all checks.
#[derive(Debug)]
pub struct FailurePolicy {
    on_error: OnError,
    warn_interval: Duration,
    last_warning: Mutex<Option<Instant>>,
    unlogged: AtomicU64,
}

impl FailurePolicy {
    pub fn new(on_error: OnError, warn_interval: Duration) -> Self {
        Self {
            on_error,
            warn_interval,
            last_warning: Mutex::new(None),
            unlogged: AtomicU64::new(0),
        }
    }

    pub fn from_config(config: &StoreConfig) -> Self {
        Self::new(config.on_error, config.warn_interval.get())
    }

    pub fn on_error(&self) -> OnError {
        self.on_error
    }

    /// The fallback for `check`, which met `error`; logs a warning if none
    /// was logged in the last interval.
    pub fn handle(&self, check: &'static str, error: &StoreError) -> Fallback {
        if let Some(unlogged) = self.should_warn(Instant::now()) {
            let action = match self.on_error {
                OnError::Tempfail => "answering 451 4.3.0 (store.on_error: tempfail)",
                OnError::Continue => "skipping the check (store.on_error: continue)",
            };
            warn!(
                check,
                error = %error,
                kind = error.label(),
                unlogged,
                "state store failure: {action}; further failures are logged at most once per {:?}",
                self.warn_interval
            );
        }
        self.fallback()
    }

    /// The fallback, without logging.
    pub fn fallback(&self) -> Fallback {
        match self.on_error {
            OnError::Tempfail => Fallback::Tempfail(Verdict::Tempfail(Reply::new(
                451,
                "4.3.0",
                "Our state store is unavailable; please try again later",
            ))),
            OnError::Continue => Fallback::Skip,
        }
    }

    /// `Some(failures not logged since the last warning)` when a warning is
    /// due at `now`.
    fn should_warn(&self, now: Instant) -> Option<u64> {
        let mut last = self
            .last_warning
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match *last {
            Some(t) if now.saturating_duration_since(t) < self.warn_interval => {
                self.unlogged.fetch_add(1, Ordering::Relaxed);
                None
            }
            _ => {
                *last = Some(now);
                Some(self.unlogged.swap(0, Ordering::Relaxed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tempfail_answers_451() {
        let p = FailurePolicy::new(OnError::Tempfail, Duration::from_secs(60));
        let f = p.handle("greylist", &StoreError::Timeout(Duration::from_secs(1)));
        let Fallback::Tempfail(v) = f else {
            panic!("not a tempfail: {f:?}")
        };
        let r = v.reply().map(ToString::to_string);
        assert_eq!(
            r.as_deref(),
            Some("451 4.3.0 Our state store is unavailable; please try again later")
        );
    }

    #[test]
    fn continue_skips() {
        let p = FailurePolicy::new(OnError::Continue, Duration::from_secs(60));
        let f = p.handle("ratelimit", &StoreError::Closed);
        assert_eq!(f, Fallback::Skip);
        assert_eq!(f.into_verdict(), Verdict::Continue);
    }

    #[test]
    fn warns_once_per_interval() {
        let p = FailurePolicy::new(OnError::Continue, Duration::from_secs(60));
        let t0 = Instant::now();
        assert_eq!(p.should_warn(t0), Some(0));
        assert_eq!(p.should_warn(t0 + Duration::from_secs(1)), None);
        assert_eq!(p.should_warn(t0 + Duration::from_secs(59)), None);
        assert_eq!(p.should_warn(t0 + Duration::from_secs(60)), Some(2));
        assert_eq!(p.should_warn(t0 + Duration::from_secs(61)), None);
    }
}
