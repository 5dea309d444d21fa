//! Prometheus metrics. Each daemon instance owns its registry (no global
//! state), so tests can run several instances in one process.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    /// Requests answered, by front end and verdict.
    pub requests: IntCounterVec,
    /// Open connections (policy) and sessions (milter), by front end.
    pub sessions: IntGaugeVec,
    /// Time to decide a request, by front end.
    pub decision_seconds: HistogramVec,
    /// Decisions of each check, by check and verdict (and whether report mode
    /// kept it from being enforced).
    pub check_decisions: IntCounterVec,
    /// Malformed or oversized protocol input, by front end and reason.
    pub protocol_errors: IntCounterVec,
    /// Connections refused because the front end was at its limit.
    pub connections_refused: IntCounterVec,
    /// Configuration reloads, by result.
    pub reloads: IntCounterVec,
    /// State store failures met by a check, by check, error and what was
    /// done (`tempfail` or `continue`, from `store.on_error`).
    pub store_failures: IntCounterVec,
    /// Entries in force in each feed.
    pub feed_entries: IntGaugeVec,
    /// Feed reads, by feed and result (`ok`, `error`: the last good copy stays).
    pub feed_loads: IntCounterVec,
    /// Socketmap lookups, by map and result.
    pub socketmap_requests: IntCounterVec,
    /// Webhook posts, by result.
    pub webhook_posts: IntCounterVec,
    /// Roster syncs, by domain and result (ok, error, refused).
    pub roster_syncs: IntCounterVec,
    /// Members provisioned from each domain's roster.
    pub roster_members: IntGaugeVec,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new_custom(Some("mxguard".into()), None)?;
        let requests = IntCounterVec::new(
            Opts::new(
                "requests_total",
                "Requests answered, by front end and verdict.",
            ),
            &["frontend", "verdict"],
        )?;
        let sessions = IntGaugeVec::new(
            Opts::new(
                "sessions_in_flight",
                "Open policy connections and milter sessions.",
            ),
            &["frontend"],
        )?;
        let decision_seconds = HistogramVec::new(
            HistogramOpts::new("decision_seconds", "Time taken to decide one request.").buckets(
                vec![
                    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05,
                    0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ],
            ),
            &["frontend"],
        )?;
        let check_decisions = IntCounterVec::new(
            Opts::new("check_decisions_total", "Decisions made by each check."),
            &["check", "verdict", "mode"],
        )?;
        let protocol_errors = IntCounterVec::new(
            Opts::new(
                "protocol_errors_total",
                "Malformed or oversized protocol input.",
            ),
            &["frontend", "reason"],
        )?;
        let connections_refused = IntCounterVec::new(
            Opts::new(
                "connections_refused_total",
                "Connections refused at the connection limit.",
            ),
            &["frontend"],
        )?;
        let reloads = IntCounterVec::new(
            Opts::new("config_reloads_total", "Configuration reloads."),
            &["result"],
        )?;
        let store_failures = IntCounterVec::new(
            Opts::new(
                "store_failures_total",
                "State store failures met by checks.",
            ),
            &["check", "error", "action"],
        )?;
        let feed_entries = IntGaugeVec::new(
            Opts::new("feed_entries", "Entries in force in each feed."),
            &["feed"],
        )?;
        let socketmap_requests = IntCounterVec::new(
            Opts::new(
                "socketmap_requests_total",
                "Socketmap lookups, by map and result.",
            ),
            &["map", "result"],
        )?;
        let webhook_posts = IntCounterVec::new(
            Opts::new(
                "webhook_posts_total",
                "Webhook posts, by result (delivered, duplicate, tempfail, reject).",
            ),
            &["result"],
        )?;
        let roster_syncs = IntCounterVec::new(
            Opts::new(
                "roster_syncs_total",
                "Roster syncs, by domain and result (ok, error, refused).",
            ),
            &["domain", "result"],
        )?;
        let roster_members = IntGaugeVec::new(
            Opts::new(
                "roster_members",
                "Members provisioned from each domain's roster.",
            ),
            &["domain"],
        )?;
        let feed_loads = IntCounterVec::new(
            Opts::new("feed_loads_total", "Feed reads, by result."),
            &["feed", "result"],
        )?;
        let build = IntGaugeVec::new(
            Opts::new("build_info", "Always 1; labelled with the version."),
            &["version"],
        )?;
        build.with_label_values(&[crate::VERSION]).set(1);

        for c in [
            &requests,
            &check_decisions,
            &protocol_errors,
            &connections_refused,
            &reloads,
            &store_failures,
            &feed_loads,
            &socketmap_requests,
            &webhook_posts,
            &roster_syncs,
        ] {
            registry.register(Box::new(c.clone()))?;
        }
        registry.register(Box::new(sessions.clone()))?;
        registry.register(Box::new(decision_seconds.clone()))?;
        registry.register(Box::new(build))?;
        registry.register(Box::new(feed_entries.clone()))?;
        registry.register(Box::new(roster_members.clone()))?;
        // Make the series visible at zero before the first event.
        for frontend in ["policy", "milter"] {
            sessions.with_label_values(&[frontend]);
            decision_seconds.with_label_values(&[frontend]);
            for verdict in ["continue", "accept", "discard", "tempfail", "reject"] {
                requests.with_label_values(&[frontend, verdict]);
            }
        }
        Ok(Self {
            registry,
            requests,
            sessions,
            decision_seconds,
            check_decisions,
            protocol_errors,
            connections_refused,
            reloads,
            store_failures,
            feed_entries,
            feed_loads,
            socketmap_requests,
            webhook_posts,
            roster_syncs,
            roster_members,
        })
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!("cannot encode metrics: {e}");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }
}

/// Counts one open session for as long as it lives.
pub struct SessionGuard {
    gauge: prometheus::IntGauge,
}

impl SessionGuard {
    pub fn new(metrics: &Metrics, frontend: &str) -> Self {
        let gauge = metrics.sessions.with_label_values(&[frontend]);
        gauge.inc();
        Self { gauge }
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}
