//! Runs each stage's checks in order and turns their verdicts into one
//! decision, applying the operator's mode. Built anew from each configuration
//! (at start and on every reload); front ends hold an `Arc` of the one that
//! was current when their request or session began.

use crate::{
    aliases::{self, Aliases, Outcome, Resolved, TxtCache},
    checks::{
        allowlist::{self, Allowlist},
        autodeny, backscatter,
        clients::{self, RejectClients},
        denylist, greylist, oplists, ratelimit,
    },
    clock::Clock,
    config::{Config, EnvelopeChecks, Mode},
    envelope::{Envelope, Stage, show},
    feeds::Feeds,
    metrics::Metrics,
    store::{FailurePolicy, Store},
    verdict::{Decision, Reply, Verdict},
};
use std::sync::{Arc, RwLock};
use tracing::{debug, info};

/// What outlives a reload: the engine of every configuration shares them.
#[derive(Clone)]
pub struct Services {
    pub metrics: Arc<Metrics>,
    /// The DNS resolver, with SPF, DKIM, ARC and DMARC on top.
    pub auth: Arc<mail_auth::MessageAuthenticator>,
    pub clock: Arc<dyn Clock>,
    pub store: Store,
    pub feeds: Arc<Feeds>,
    /// Parsed TXT forwarding rules, kept across reloads.
    pub txt_cache: Arc<TxtCache>,
    /// Aliases provisioned from membership rosters, kept across reloads.
    pub rosters: Arc<crate::roster::Rosters>,
}

pub use crate::checks::oplists::{Entry as ListEntry, List};

/// The operator's run-time lists, for the admin requests of the HTTP
/// listener (`mxguard deny|allow ...`).
impl Services {
    pub async fn list_entries(&self, list: List) -> Result<Vec<ListEntry>, String> {
        oplists::load(&self.store, list, self.clock.now())
            .await
            .map_err(|e| e.to_string())
    }

    pub async fn list_add(
        &self,
        list: List,
        value: &str,
        ttl: Option<std::time::Duration>,
        reason: &str,
    ) -> Result<ListEntry, String> {
        oplists::add(&self.store, list, value, ttl, reason, self.clock.now()).await
    }

    pub async fn list_remove(&self, list: List, value: &str) -> Result<bool, String> {
        oplists::remove(&self.store, list, value, self.clock.now()).await
    }

    /// The entry a value (an address, a domain, an e-mail address) matches.
    pub async fn list_test(&self, list: List, value: &str) -> Result<Option<ListEntry>, String> {
        let env = oplists::envelope_for(value)?;
        let entries = self.list_entries(list).await?;
        Ok(oplists::matching(&entries, &env).cloned())
    }
}

pub struct Engine {
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    auth: Arc<mail_auth::MessageAuthenticator>,
    clock: Arc<dyn Clock>,
    store: Store,
    feeds: Arc<Feeds>,
    /// What checks do when the store fails (`store.on_error`).
    store_failures: FailurePolicy,
    reject_clients: RejectClients,
    allowlist: Allowlist,
    aliases: Aliases,
    /// `None` when the HTTP client could not be set up (logged): webhook
    /// targets then tempfail.
    webhooks: Option<crate::webhooks::Webhooks>,
    srs: Option<crate::srs::Srs>,
    sealer: Option<crate::checks::auth::Sealer>,
    hostname: String,
}

/// The check names (metric labels) of SRS address validation and of the
/// bounce policy on the SRS reverse path.
pub const SRS: &str = "srs";
pub const SRS_BOUNCE: &str = "srs_bounce";
/// How long a relayed bounce is remembered, so the same one is not relayed
/// twice.
const BOUNCE_DEDUPE: std::time::Duration = std::time::Duration::from_secs(7 * 86_400);

/// The check name (metric label) of alias resolution.
pub const ALIASES: &str = "aliases";

/// How long a webhook delivery is remembered, so a client's retry of the
/// same message does not post it again.
const WEBHOOK_DEDUPE: std::time::Duration = std::time::Duration::from_secs(86_400);

/// The message's fingerprint (behaviour.md §6.1): the client, and the
/// first Message-ID, Date, From, To, Cc and Subject; the whole message
/// when it has none of them.
pub fn fingerprint(env: &Envelope, headers: &[(String, String)], raw: &[u8]) -> String {
    let client = env
        .client_name
        .clone()
        .or_else(|| env.client_addr.map(|ip| ip.to_string()))
        .unwrap_or_default();
    let mut parts = vec![client];
    let mut any = false;
    for name in ["message-id", "date", "from", "to", "cc", "subject"] {
        let value = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .filter(|v| !v.is_empty());
        any |= value.is_some();
        parts.push(value.unwrap_or_default());
    }
    if !any {
        parts.push(String::from_utf8_lossy(raw).into_owned());
    }
    parts.join("\n")
}

/// How long a forwarding port is remembered for a target: longer than
/// Postfix keeps a message queued (`maximal_queue_lifetime`, 5 days).
const ROUTE_TTL: std::time::Duration = std::time::Duration::from_secs(6 * 86_400);

impl Engine {
    pub fn new(config: Arc<Config>, services: Services) -> Self {
        let Services {
            metrics,
            auth,
            clock,
            store,
            feeds,
            txt_cache,
            rosters,
        } = services;
        rosters.configure(&config);
        let aliases = Aliases::new(&config, Some(auth.clone()), txt_cache).with_rosters(rosters);
        let srs = if config.srs.enabled() {
            let c = &config.srs;
            match crate::srs::Srs::new(
                c.secrets.clone(),
                &c.domain,
                c.hash_length,
                c.max_age.get().as_secs() / 86_400,
                c.separator,
            ) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::error!("SRS is off: {e}");
                    None
                }
            }
        } else {
            None
        };
        let sealer = match crate::checks::auth::Sealer::from_config(&config.arc) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("ARC sealing is off: {e}");
                None
            }
        };
        let webhooks = match crate::webhooks::Webhooks::new(&config.webhooks) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::error!("{e}; webhook targets will be answered with a tempfail");
                None
            }
        };
        let reject_clients = RejectClients::new(&config.policy.reject_clients);
        let allowlist = Allowlist::new(&config.allowlist.entries, &config.local_domains);
        let hostname = if config.hostname.is_empty() {
            system_hostname()
        } else {
            config.hostname.clone()
        };
        let store_failures = FailurePolicy::from_config(&config.store);
        Self {
            config,
            metrics,
            auth,
            clock,
            store,
            feeds,
            store_failures,
            reject_clients,
            allowlist,
            aliases,
            webhooks,
            srs,
            sealer,
            hostname,
        }
    }

    /// The authserv-id of Authentication-Results.
    pub fn authserv_id(&self) -> &str {
        if self.config.auth.authserv_id.is_empty() {
            &self.hostname
        } else {
            &self.config.auth.authserv_id
        }
    }

    /// Most bytes of one message kept in memory.
    pub fn max_buffered_message(&self) -> u64 {
        match self.config.content.max_message_size.0 {
            0 => self.config.webhooks.max_message_size.0,
            n => n,
        }
    }

    /// The content rules at the end of the message, then the 5-day retry
    /// cutoff (by fingerprint), logged and counted.
    pub async fn content_decision(
        &self,
        env: &Envelope,
        headers: &[(String, String)],
        header_bytes: u64,
        size: u64,
        raw: &[u8],
    ) -> Decision {
        let c = &self.config.content;
        if let Some((verdict, reason)) =
            crate::checks::content::check(c, headers, header_bytes, size, raw)
        {
            return self.decide(
                Stage::EndOfMessage,
                env,
                crate::checks::content::NAME,
                verdict,
                reason,
                c.mode,
            );
        }
        if let Some(max) = c.max_retry_period
            && env.client_addr.is_some()
        {
            let key = crate::store::Key::hashed("first", &[&fingerprint(env, headers, raw)]);
            let now = self
                .clock
                .now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            // Kept past the period, so the retry after it is recognised.
            let ttl = max.get() + std::time::Duration::from_secs(86_400);
            let first = match Box::pin(self.store.set_if_absent(
                &key,
                now.to_string().as_bytes(),
                ttl,
            ))
            .await
            {
                Ok(true) => now,
                Ok(false) => Box::pin(self.store.get(&key))
                    .await
                    .ok()
                    .flatten()
                    .and_then(|v| String::from_utf8(v).ok())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(now),
                Err(e) => {
                    let v = self.store_failed(crate::checks::content::NAME, &e);
                    if v.is_final() {
                        return self.decide(
                            Stage::EndOfMessage,
                            env,
                            crate::checks::content::NAME,
                            v,
                            format!("state store: {e}"),
                            c.mode,
                        );
                    }
                    now
                }
            };
            if now.saturating_sub(first) > max.get().as_secs() {
                let reply = Reply::new(
                    550,
                    "5.4.7",
                    format!(
                        "This message has been retried for the maximum period of {max} and has permanently failed"
                    ),
                );
                return self.decide(
                    Stage::EndOfMessage,
                    env,
                    crate::checks::content::NAME,
                    Verdict::Reject(reply),
                    format!("first seen {}s ago", now - first),
                    c.mode,
                );
            }
        }
        self.passed(crate::checks::content::NAME);
        Decision::pass()
    }

    /// SPF, DKIM, ARC and DMARC for the message, and the decision on them
    /// (logged and counted). `None` when authentication is off or the
    /// message has no SMTP client (mail Postfix made itself).
    pub async fn authenticate(
        &self,
        env: &Envelope,
        raw: &[u8],
    ) -> Option<(Decision, crate::checks::auth::AuthFindings<'_>)> {
        if !self.config.auth.enabled {
            return None;
        }
        let mut findings = Box::pin(crate::checks::auth::authenticate(
            &self.auth,
            &self.config.auth,
            self.authserv_id(),
            &self.hostname,
            env,
            raw,
        ))
        .await?;
        let decision = match findings.refusal.take() {
            Some((verdict, reason)) => self.decide(
                Stage::EndOfMessage,
                env,
                crate::checks::auth::NAME,
                verdict,
                format!("{reason} ({})", findings.summary),
                self.config.auth.mode,
            ),
            None => {
                self.decide(
                    Stage::EndOfMessage,
                    env,
                    crate::checks::auth::NAME,
                    Verdict::Continue,
                    findings.summary.clone(),
                    None,
                );
                Decision::pass()
            }
        };
        Some((decision, findings))
    }

    /// The friendly From of a forwarded message that would fail DMARC at
    /// its target: `(new From, original From)`.
    pub fn friendly_from(
        &self,
        findings: &crate::checks::auth::AuthFindings<'_>,
        headers: &[(String, String)],
    ) -> Option<(String, String)> {
        let a = &self.config.auth;
        if !a.friendly_from || !findings.strict_dmarc || findings.dkim_aligned {
            return None;
        }
        if a.friendly_from_exempt
            .iter()
            .any(|d| d.eq_ignore_ascii_case(&findings.from_domain))
        {
            return None;
        }
        let original = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("from"))
            .map(|(_, v)| v.trim().to_owned())?;
        let address = if a.friendly_from_address.is_empty() {
            format!("noreply@{}", self.hostname)
        } else {
            a.friendly_from_address.clone()
        };
        Some((
            crate::checks::auth::friendly_from(&original, &address),
            original,
        ))
    }

    /// The ARC set for the message as it leaves, if sealing is configured.
    pub async fn arc_seal(
        &self,
        final_message: &[u8],
        results: &mail_auth::AuthenticationResults<'_>,
    ) -> Option<Result<Vec<(String, String)>, String>> {
        let sealer = self.sealer.as_ref()?;
        Some(Box::pin(sealer.seal(&self.auth, final_message, results)).await)
    }

    pub fn srs(&self) -> Option<&crate::srs::Srs> {
        self.srs.as_ref()
    }

    /// Days since the epoch, by the engine's clock (SRS timestamps).
    pub fn today(&self) -> u64 {
        self.clock
            .now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() / 86_400)
    }

    /// For a recipient at the SRS domain: the original address, or why
    /// the SRS address is not valid. `None` for other recipients.
    pub fn srs_reverse(&self, rcpt: &str) -> Option<Result<String, crate::srs::SrsError>> {
        let srs = self.srs.as_ref()?;
        let (_, domain) = rcpt.rsplit_once('@')?;
        srs.is_srs_domain(domain)
            .then(|| srs.reverse_at(rcpt, self.today()))
    }

    /// The RCPT decision for a recipient at the SRS domain (logged and
    /// counted): valid addresses pass, others get 550 5.1.1 now rather than
    /// a bounce later. `None` for other recipients, and for non-SRS
    /// addresses at the SRS domain when aliases handle that domain.
    pub async fn srs_decision(&self, stage: Stage, env: &Envelope) -> Option<Decision> {
        let rcpt = env.recipient.as_deref()?;
        let verdict_reason = match self.srs_reverse(rcpt)? {
            Ok(original) => (Verdict::Continue, format!("SRS address of {original}")),
            Err(crate::srs::SrsError::NotSrs) => {
                let domain = rcpt.rsplit_once('@').map_or("", |(_, d)| d);
                if matches!(self.aliases.rules(domain).await, aliases::Lookup::Rules(_)) {
                    return None;
                }
                (
                    Verdict::Reject(Reply::new(550, "5.1.1", format!("{rcpt} does not exist"))),
                    "not an SRS address, and the SRS domain has no aliases".to_owned(),
                )
            }
            Err(e) => (
                Verdict::Reject(Reply::new(
                    550,
                    "5.1.1",
                    format!("{rcpt} is not a valid bounce address: {e}"),
                )),
                e.to_string(),
            ),
        };
        let (verdict, reason) = verdict_reason;
        Some(self.decide(stage, env, SRS, verdict, reason, None))
    }

    /// Whether `domain` is one of the operator's: `local_domains`, the
    /// domains mxguard forwards for, or the SRS domain.
    pub fn is_operator_domain(&self, domain: &str) -> bool {
        let d = aliases::normalize_domain(domain);
        self.config
            .local_domains
            .iter()
            .any(|l| aliases::normalize_domain(l) == d)
            || self
                .config
                .domains
                .keys()
                .any(|k| aliases::normalize_domain(k) == d)
            || self.srs.as_ref().is_some_and(|s| s.is_srs_domain(&d))
    }

    /// The SRS sender for a message forwarded to `targets`: only when SRS
    /// is on, the sender is not null and not of the operator's domains, and
    /// some target is outside them.
    pub fn srs_sender(&self, sender: &str, targets: &[String]) -> Option<String> {
        let srs = self.srs.as_ref()?;
        let (_, domain) = sender.rsplit_once('@')?;
        if self.is_operator_domain(domain) {
            return None;
        }
        let outside = targets.iter().any(|t| {
            t.rsplit_once('@')
                .is_some_and(|(_, d)| !self.is_operator_domain(d))
        });
        if !outside {
            return None;
        }
        match srs.forward_at(sender, self.today()) {
            Ok(a) => Some(a),
            Err(e) => {
                tracing::warn!(sender, "SRS: sender not rewritten: {e}");
                None
            }
        }
    }

    /// The bounce policy of the SRS reverse path: why a bounce (null
    /// sender) for `original` must not be relayed, or `None` to relay it.
    /// A relayed bounce is remembered for 7 days.
    pub async fn bounce_suppressed(
        &self,
        env: &Envelope,
        raw: &[u8],
        original: &str,
    ) -> Option<&'static str> {
        let dsn = crate::nobounce::parse_dsn(raw);
        let reason = crate::nobounce::sender_reason(original).or_else(|| {
            (!dsn.original_headers.is_empty())
                .then(|| crate::nobounce::reason(original, &dsn.original_headers))
                .flatten()
        });
        let reason = match reason {
            Some(r) => Some(r),
            None => {
                let mut parts = vec![original.to_lowercase(), dsn.status.clone()];
                for name in ["message-id", "date", "from", "to", "cc", "subject"] {
                    parts.push(
                        dsn.original_headers
                            .iter()
                            .find(|(n, _)| n.eq_ignore_ascii_case(name))
                            .map(|(_, v)| v.clone())
                            .unwrap_or_default(),
                    );
                }
                if dsn.original_headers.is_empty() {
                    parts.push(String::from_utf8_lossy(raw).into_owned());
                }
                let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
                let key = crate::store::Key::hashed("bounce", &refs);
                match Box::pin(self.store.set_if_absent(&key, b"1", BOUNCE_DEDUPE)).await {
                    Ok(true) => None,
                    Ok(false) => Some("the same bounce was relayed in the last 7 days"),
                    Err(e) => {
                        // Relaying a duplicate is better than losing a bounce.
                        tracing::warn!("bounce dedupe not checked: state store: {e}");
                        None
                    }
                }
            }
        };
        let (verdict, text) = match reason {
            Some(r) => (
                Verdict::Discard,
                format!("bounce for {original} not relayed: {r}"),
            ),
            None => (
                Verdict::Continue,
                format!("bounce for {original} relayed (status {})", dsn.status),
            ),
        };
        let mut env = env.clone();
        env.recipient = Some(original.to_owned());
        self.decide(Stage::EndOfMessage, &env, SRS_BOUNCE, verdict, text, None);
        reason
    }

    pub fn aliases(&self) -> &Aliases {
        &self.aliases
    }

    /// Where mail for `address` goes (no log line, no metric).
    pub async fn resolve_alias(&self, address: &str) -> Resolved {
        Box::pin(self.aliases.resolve(address)).await
    }

    /// The alias decision for the envelope's recipient, logged and
    /// counted: unknown aliases and disabled ones are refused here, at
    /// RCPT, so nothing is accepted for an address that resolves to nothing.
    pub async fn alias_decision(
        &self,
        stage: Stage,
        env: &Envelope,
    ) -> Option<(Decision, Resolved)> {
        if self.aliases.is_empty() {
            return None;
        }
        let rcpt = env.recipient.as_deref()?;
        let resolved = self.resolve_alias(rcpt).await;
        let decision = match &resolved.outcome {
            Outcome::NotHandled => return Some((Decision::pass(), resolved)),
            Outcome::Refuse(v) => self.decide(
                stage,
                env,
                ALIASES,
                v.clone(),
                resolved.reason.clone(),
                None,
            ),
            Outcome::Forward { .. } | Outcome::Discard => {
                let label = resolved.label();
                self.metrics
                    .check_decisions
                    .with_label_values(&[ALIASES, label, "enforce"])
                    .inc();
                info!(
                    queue_id = show(&env.queue_id),
                    client = %display_ip(env),
                    sender = show(&env.sender),
                    recipient = rcpt,
                    %stage,
                    check = ALIASES,
                    verdict = label,
                    "{}",
                    resolved.reason
                );
                Decision::pass()
            }
        };
        Some((decision, resolved))
    }

    /// Largest message kept in memory for webhooks.
    pub fn max_webhook_message(&self) -> u64 {
        self.config.webhooks.max_message_size.0
    }

    /// Replaces the webhook client (tests shorten the pause between tries).
    pub fn set_webhooks(&mut self, webhooks: crate::webhooks::Webhooks) {
        self.webhooks = Some(webhooks);
    }

    /// Posts the message to the plan's webhooks, each URL once per message
    /// even when the client sends it again (a fingerprint of the client and
    /// the message's identifying headers, kept a day). A post that can be
    /// retried tempfails the message (`421 4.3.0`); one refused for good
    /// rejects it only when nothing else was delivered.
    pub async fn post_webhooks(
        &self,
        plan: &aliases::rewrite::Plan,
        env: &Envelope,
        headers: &[(String, String)],
        raw: &[u8],
    ) -> Verdict {
        let Some(webhooks) = self.webhooks.as_ref() else {
            return Verdict::Tempfail(Reply::new(
                421,
                "4.3.0",
                "Webhook delivery is not available right now; try again later",
            ));
        };
        let fingerprint = fingerprint(env, headers, raw);
        let count = |result: &str| {
            self.metrics
                .webhook_posts
                .with_label_values(&[result])
                .inc()
        };
        let mut delivered = false;
        let mut refused: Option<Verdict> = None;
        for hook in &plan.webhooks {
            let key = crate::store::Key::hashed("webhook", &[&fingerprint, &hook.url]);
            match Box::pin(self.store.set_if_absent(&key, b"1", WEBHOOK_DEDUPE)).await {
                Ok(true) => {}
                Ok(false) => {
                    info!(queue_id = show(&env.queue_id), recipients = %hook.recipients.join(","), "webhook: already delivered for this message; not posted again");
                    count("duplicate");
                    delivered = true;
                    continue;
                }
                Err(e) => {
                    let v = self.store_failed(ALIASES, &e);
                    if v.is_final() {
                        return v;
                    }
                }
            }
            let alias = hook.recipients.first().map_or("", String::as_str);
            let meta = crate::webhooks::Meta {
                recipients: hook.recipients.clone(),
                remote_address: env.client_addr,
                client_hostname: env
                    .client_name
                    .clone()
                    .or_else(|| env.reverse_client_name.clone()),
                helo: env.helo.clone(),
                sender: env.sender.clone().unwrap_or_default(),
                mta: self.hostname.clone(),
                arrival: self.clock.now(),
                auth_results: None,
            };
            let domain = alias.rsplit_once('@').map_or("", |(_, d)| d);
            let outcome = match crate::webhooks::Webhooks::payload(raw, &meta, &hook.url) {
                Ok(body) => {
                    Box::pin(webhooks.post(
                        &hook.url,
                        &body,
                        alias,
                        self.aliases.webhook_key(domain),
                    ))
                    .await
                }
                Err(e) => crate::webhooks::Outcome::Tempfail(e),
            };
            match outcome {
                crate::webhooks::Outcome::Delivered { .. } => {
                    count("delivered");
                    delivered = true;
                }
                crate::webhooks::Outcome::Tempfail(text) => {
                    count("tempfail");
                    let _ = Box::pin(self.store.delete(&key)).await;
                    return Verdict::Tempfail(Reply::new(421, "4.3.0", text));
                }
                crate::webhooks::Outcome::Reject(text) => {
                    count("reject");
                    let _ = Box::pin(self.store.delete(&key)).await;
                    refused.get_or_insert(Verdict::Reject(Reply::new(550, "5.7.1", text)));
                }
            }
        }
        match refused {
            Some(v) if plan.nothing_left && !delivered => v,
            Some(v) => {
                tracing::warn!(queue_id = show(&env.queue_id), reply = %v.reply().map(ToString::to_string).unwrap_or_default(), "webhook refused for good; the message's other destinations still get it");
                Verdict::Continue
            }
            None => Verdict::Continue,
        }
    }

    /// Whether mail for `domain` is forwarded by mxguard (YAML or DNS
    /// rules): the socketmap's `domains` map.
    pub async fn handles_domain(&self, domain: &str) -> Result<bool, String> {
        // The SRS domain receives the bounces and replies that go back.
        if self.srs.as_ref().is_some_and(|s| s.is_srs_domain(domain)) {
            return Ok(true);
        }
        Box::pin(self.aliases.handles_domain(domain)).await
    }

    /// Remembers that forwarded mail for `address` goes out on `port`.
    pub async fn record_route(
        &self,
        address: &str,
        port: u16,
    ) -> Result<(), crate::store::StoreError> {
        let key = crate::store::Key::hashed("route", &[&address.to_lowercase()]);
        Box::pin(self.store.set(&key, port.to_string().as_bytes(), ROUTE_TTL)).await
    }

    /// The custom port forwarded mail to `address` must use, if any: the
    /// socketmap's `transport` map.
    pub async fn forwarding_port(&self, address: &str) -> Result<Option<u16>, String> {
        let key = crate::store::Key::hashed("route", &[&address.to_lowercase()]);
        let found = Box::pin(self.store.get(&key))
            .await
            .map_err(|e| e.to_string())?;
        Ok(found
            .and_then(|v| String::from_utf8(v).ok())
            .and_then(|v| v.parse().ok()))
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn clock(&self) -> &dyn Clock {
        self.clock.as_ref()
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The fallback of `check` for a store failure, counted in
    /// `mxguard_store_failures_total` and logged (at most once per
    /// `store.warn_interval`).
    pub fn store_failed(&self, check: &'static str, error: &crate::store::StoreError) -> Verdict {
        let fallback = self.store_failures.handle(check, error);
        let action = match fallback {
            crate::store::Fallback::Tempfail(_) => "tempfail",
            crate::store::Fallback::Skip => "continue",
        };
        self.metrics
            .store_failures
            .with_label_values(&[check, error.label(), action])
            .inc();
        fallback.into_verdict()
    }

    /// The name this host gives itself in added headers.
    pub fn hostname(&self) -> &str {
        &self.hostname
    }

    /// Whether the milter must run the envelope checks itself.
    pub fn milter_runs_envelope_checks(&self) -> bool {
        match self.config.milter.envelope_checks {
            EnvelopeChecks::On => true,
            EnvelopeChecks::Off => false,
            EnvelopeChecks::Auto => self.config.policy.listen.is_none(),
        }
    }

    /// The envelope checks for one stage of a transaction, in order:
    /// reject_clients, then at RCPT the allowlist, the recipient limit,
    /// greylisting and the rate limit (the last two skipped for allowlisted
    /// clients). A check in report mode is logged and counted, and the
    /// checks after it still run.
    pub async fn envelope(&self, stage: Stage, env: &Envelope) -> Decision {
        // The first decision report mode kept from being enforced, returned
        // when nothing else stops the request.
        let mut reported = None;
        let mut keep = |d: Decision| {
            if d.verdict.is_final() {
                return Some(d);
            }
            if d.reported_only && reported.is_none() {
                reported = Some(d);
            }
            None
        };
        if stage == Stage::Rcpt
            && let Some((verdict, reason)) = crate::checks::address::check(env)
            && let Some(d) = keep(self.decide(
                stage,
                env,
                crate::checks::address::NAME,
                verdict,
                reason,
                None,
            ))
        {
            return d;
        }
        if let Some((verdict, reason)) = self.reject_clients.check(env)
            && let Some(d) = keep(self.decide(stage, env, clients::NAME, verdict, reason, None))
        {
            return d;
        }
        if stage == Stage::Rcpt {
            let now = self.clock.now();
            // The operator's run-time lists (`mxguard deny|allow ...`).
            let lists = Box::pin(async {
                let allow = oplists::load(&self.store, oplists::List::Allow, now).await?;
                let deny = oplists::load(&self.store, oplists::List::Deny, now).await?;
                Ok::<_, crate::store::StoreError>((allow, deny))
            })
            .await;
            let (op_allow, op_deny) = match lists {
                Ok(lists) => lists,
                Err(e) => {
                    let verdict = self.store_failed(oplists::NAME, &e);
                    if verdict.is_final() {
                        let reason = format!("state store: {e}");
                        if let Some(d) =
                            keep(self.decide(stage, env, oplists::NAME, verdict, reason, None))
                        {
                            return d;
                        }
                    }
                    (Vec::new(), Vec::new())
                }
            };
            let mut allowed = self
                .allowlist
                .matches(env)
                .map(ToString::to_string)
                .or_else(|| oplists::matching(&op_allow, env).map(|e| e.value.clone()));
            if allowed.is_none() {
                allowed = Box::pin(self.spf_allowlisted(env)).await;
            }
            if allowed.is_none()
                && let Some(entry) = oplists::matching(&op_deny, env)
            {
                let how = if self.config.denylist.removal_url.is_empty() {
                    "contact the postmaster of the recipient's domain by other means".to_owned()
                } else {
                    format!(
                        "to request removal, visit {}?q={}",
                        self.config.denylist.removal_url, entry.value
                    )
                };
                let reply = Reply::new(
                    421,
                    "4.7.1",
                    format!("{} is on this server's denylist; {how}", entry.value),
                );
                let reason = format!(
                    "{} is on the operator's denylist {}",
                    entry.value, entry.reason
                )
                .trim_end()
                .to_owned();
                let mode = self.config.denylist.mode;
                if let Some(d) = keep(self.decide(
                    stage,
                    env,
                    oplists::NAME,
                    Verdict::Tempfail(reply),
                    reason,
                    mode,
                )) {
                    return d;
                }
            }
            if let Some(entry) = &allowed {
                // Logged and counted like any decision; the checks go on.
                let reason = format!("allowlisted by {entry}: greylisting and rate limits skipped");
                self.decide(stage, env, allowlist::NAME, Verdict::Accept, reason, None);
            }
            let limits = &self.config.ratelimit;
            if let Some((verdict, reason)) = ratelimit::recipients(limits, env) {
                let d = self.decide(
                    stage,
                    env,
                    ratelimit::RECIPIENTS,
                    verdict,
                    reason,
                    limits.mode,
                );
                if let Some(d) = keep(d) {
                    return d;
                }
            }
            if allowed.is_none() {
                let listed = denylist::check(&self.config.denylist, &self.feeds.denylist, env, now);
                if let Some((verdict, reason)) = listed {
                    let mode = self.config.denylist.mode;
                    if let Some(d) =
                        keep(self.decide(stage, env, denylist::NAME, verdict, reason, mode))
                    {
                        return d;
                    }
                }
                let bounced = self
                    .feeds
                    .backscatter
                    .as_ref()
                    .and_then(|f| backscatter::check(f, env, now));
                if let Some((verdict, reason)) = bounced {
                    let mode = self.config.backscatter.mode;
                    if let Some(d) =
                        keep(self.decide(stage, env, backscatter::NAME, verdict, reason, mode))
                    {
                        return d;
                    }
                }
            }
            if allowed.is_none() && self.config.denylist.auto.enabled {
                let checked = Box::pin(autodeny::check(env, &self.store)).await;
                let mode = self.config.denylist.mode;
                if let Some(d) = self.store_check(stage, env, autodeny::NAME, checked, mode)
                    && let Some(d) = keep(d)
                {
                    return d;
                }
            }
            let srs = Box::pin(self.srs_decision(stage, env)).await;
            if let Some(d) = srs.clone()
                && let Some(d) = keep(d)
            {
                return d;
            }
            if srs.is_none()
                && let Some((d, _)) = Box::pin(self.alias_decision(stage, env)).await
                && let Some(d) = keep(d)
            {
                return d;
            }
            if allowed.is_none() && self.config.greylist.enabled {
                let now = self.clock.now();
                // Boxed: the store's future types nest deep enough to overflow
                // the compiler's layout queries for the front ends' tasks.
                let checked = Box::pin(greylist::check(
                    &self.config.greylist,
                    env,
                    now,
                    &self.store,
                ))
                .await;
                let mode = self.config.greylist.mode;
                if let Some(d) = self.store_check(stage, env, greylist::NAME, checked, mode)
                    && let Some(d) = keep(d)
                {
                    return d;
                }
            }
            if allowed.is_none() {
                let checked = Box::pin(ratelimit::check(limits, env, &self.store)).await;
                if let Some(d) = self.store_check(stage, env, ratelimit::NAME, checked, limits.mode)
                    && let Some(d) = keep(d)
                {
                    return d;
                }
            }
        }
        debug!(
            queue_id = show(&env.queue_id),
            client = %display_ip(env),
            sender = show(&env.sender),
            recipient = show(&env.recipient),
            %stage,
            "envelope checks passed"
        );
        reported.unwrap_or_else(Decision::pass)
    }

    /// The decision of a check that used the store, if it objected (enforced
    /// or only reported); a store failure follows `store.on_error`.
    fn store_check(
        &self,
        stage: Stage,
        env: &Envelope,
        check: &'static str,
        result: Result<Option<(Verdict, String)>, crate::store::StoreError>,
        mode: Option<Mode>,
    ) -> Option<Decision> {
        let (verdict, reason) = match result {
            Ok(Some(found)) => found,
            Ok(None) => {
                self.passed(check);
                return None;
            }
            Err(e) => {
                let verdict = self.store_failed(check, &e);
                if !verdict.is_final() {
                    return None;
                }
                (verdict, format!("state store: {e}"))
            }
        };
        Some(self.decide(stage, env, check, verdict, reason, mode))
    }

    /// An allowlist domain entry that the envelope sender's domain falls
    /// under, once SPF passes for that domain and the client.
    async fn spf_allowlisted(&self, env: &Envelope) -> Option<String> {
        let entry = self.allowlist.sender_domain_entry(env)?;
        let (ip, sender) = (env.client_addr?, env.sender.as_deref()?);
        let helo = env.helo.as_deref().unwrap_or("");
        let params = mail_auth::spf::verify::SpfParameters::verify_mail_from(
            ip,
            helo,
            &self.hostname,
            sender,
        );
        let spf = self.auth.verify_spf(params).await;
        (spf.result() == mail_auth::SpfResult::Pass)
            .then(|| format!("{entry} (SPF pass for {sender})"))
    }

    /// The end-of-message checks of the milter: the daily budgets.
    pub async fn end_of_message(&self, env: &Envelope, size: u64) -> Decision {
        let now = self.clock.now();
        let op_allow = Box::pin(oplists::load(&self.store, oplists::List::Allow, now))
            .await
            .unwrap_or_default();
        let allowlisted =
            self.allowlist.matches(env).is_some() || oplists::matching(&op_allow, env).is_some();
        let limits = &self.config.ratelimit;
        let checked = Box::pin(ratelimit::daily(
            limits,
            env,
            size,
            allowlisted,
            now,
            &self.store,
        ))
        .await;
        self.store_check(
            Stage::EndOfMessage,
            env,
            ratelimit::DAILY,
            checked,
            limits.mode,
        )
        .unwrap_or_else(Decision::pass)
    }

    /// The connect-stage decision of the milter: the concurrency limit (not
    /// for allowlisted or loopback clients). The slot, while held, counts
    /// the connection.
    pub async fn connect(&self, env: &Envelope) -> (Decision, Option<ratelimit::Slot>) {
        if self.allowlist.matches(env).is_some() {
            return (Decision::pass(), None);
        }
        let limits = &self.config.ratelimit;
        let (found, slot) = match Box::pin(ratelimit::connection(limits, env, &self.store)).await {
            Ok((found, slot)) => (Ok(found), slot),
            Err(e) => (Err(e), None),
        };
        let decision = self
            .store_check(
                Stage::Connect,
                env,
                ratelimit::CONCURRENCY,
                found,
                limits.mode,
            )
            .unwrap_or_else(Decision::pass);
        (decision, slot)
    }

    /// Counts a check that let the request through.
    fn passed(&self, check: &'static str) {
        self.metrics
            .check_decisions
            .with_label_values(&[check, "continue", "enforce"])
            .inc();
    }

    /// Applies the mode, counts and logs one check's verdict.
    fn decide(
        &self,
        stage: Stage,
        env: &Envelope,
        check: &'static str,
        verdict: Verdict,
        reason: String,
        mode: Option<Mode>,
    ) -> Decision {
        let mode_in_force = mode.unwrap_or(self.config.mode);
        // Report mode holds back refusals; an accept has nothing to hold back.
        let reported_only =
            mode_in_force == Mode::Report && verdict.is_final() && verdict != Verdict::Accept;
        let mode = if reported_only { "report" } else { "enforce" };
        self.metrics
            .check_decisions
            .with_label_values(&[check, verdict.label(), mode])
            .inc();
        info!(
            queue_id = show(&env.queue_id),
            client = %display_ip(env),
            sender = show(&env.sender),
            recipient = show(&env.recipient),
            %stage,
            check,
            verdict = verdict.label(),
            reply = %verdict.reply().map(|r| r.to_string()).unwrap_or_default(),
            mode,
            "{reason}"
        );
        let verdict = if reported_only {
            Verdict::Continue
        } else {
            verdict
        };
        Decision {
            verdict,
            check,
            reason,
            reported_only,
        }
    }
}

/// The engine in force, replaced whole on a reload. A request or session
/// takes its own `Arc` at the start, so a reload never changes a decision
/// half-way.
pub struct CurrentEngine(RwLock<Arc<Engine>>);

impl CurrentEngine {
    pub fn new(engine: Engine) -> Self {
        Self(RwLock::new(Arc::new(engine)))
    }

    pub fn get(&self) -> Arc<Engine> {
        self.0
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    pub fn replace(&self, engine: Engine) {
        *self
            .0
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(engine);
    }
}

fn display_ip(env: &Envelope) -> String {
    env.client_addr
        .map_or_else(|| "-".to_owned(), |ip| ip.to_string())
}

/// The host name from the kernel, as printable ASCII without spaces (so it is
/// safe inside a header); `localhost` when it cannot be had.
fn system_hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its whole length, and gethostname writes
    // at most that many bytes.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let name = if rc == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        String::new()
    };
    let clean: String = name.chars().filter(|c| c.is_ascii_graphic()).collect();
    if clean.is_empty() {
        "localhost".to_owned()
    } else {
        clean
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;

    async fn engine(yaml: &str) -> Result<(Engine, tempfile::TempDir), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let mut config = Config::parse(yaml, "test")?;
        config.store.path = dir.path().join("state.db");
        let store = Store::open(&config.store, Arc::new(SystemClock)).await?;
        let dns = crate::config::DnsConfig {
            nameservers: vec!["127.0.0.1:9".into()],
            ..Default::default()
        };
        let metrics = Arc::new(Metrics::new()?);
        let services = Services {
            metrics: metrics.clone(),
            auth: Arc::new(crate::dns::authenticator(&dns)?),
            clock: Arc::new(SystemClock),
            store: store.clone(),
            feeds: Arc::new(Feeds::default()),
            txt_cache: Arc::new(TxtCache::new(100)),
            rosters: Arc::new(crate::roster::Rosters::new(store, metrics)),
        };
        let engine = Engine::new(Arc::new(config), services);
        Ok((engine, dir))
    }

    fn from(ip: &str) -> Envelope {
        Envelope {
            client_addr: ip.parse().ok(),
            recipient: Some("a@example.org".into()),
            ..Envelope::default()
        }
    }

    #[tokio::test]
    async fn enforce_mode_refuses_and_counts() -> Result<(), Box<dyn std::error::Error>> {
        let (e, _dir) =
            engine("policy: { reject_clients: [192.0.2.0/24] }\ngreylist: { enabled: false }")
                .await?;
        let d = e.envelope(Stage::Rcpt, &from("192.0.2.1")).await;
        assert!(matches!(d.verdict, Verdict::Reject(ref r) if r.code == 554));
        assert_eq!(d.check, "reject_clients");
        assert!(!d.reported_only);
        assert_eq!(
            e.envelope(Stage::Rcpt, &from("198.51.100.1")).await,
            Decision::pass()
        );
        let text = e.metrics().render();
        assert!(text.contains(r#"mxguard_check_decisions_total{check="reject_clients",mode="enforce",verdict="reject"} 1"#), "{text}");
        Ok(())
    }

    #[tokio::test]
    async fn report_mode_logs_but_continues() -> Result<(), Box<dyn std::error::Error>> {
        let (e, _dir) = engine("mode: report\npolicy: { reject_clients: [192.0.2.0/24] }").await?;
        let d = e.envelope(Stage::Rcpt, &from("192.0.2.1")).await;
        assert_eq!(d.verdict, Verdict::Continue);
        assert!(d.reported_only);
        assert_eq!(d.check, "reject_clients");
        assert!(
            e.metrics()
                .render()
                .contains(r#"check="reject_clients",mode="report",verdict="reject"} 1"#)
        );
        Ok(())
    }

    #[tokio::test]
    async fn envelope_checks_run_in_the_milter_only_without_policy()
    -> Result<(), Box<dyn std::error::Error>> {
        for (yaml, expected) in [
            ("", false),
            ("policy: { listen: null }", true),
            ("milter: { envelope_checks: on }", true),
            (
                "policy: { listen: null }\nmilter: { envelope_checks: off }",
                false,
            ),
        ] {
            assert_eq!(
                engine(yaml).await?.0.milter_runs_envelope_checks(),
                expected,
                "{yaml}"
            );
        }
        Ok(())
    }

    #[tokio::test]
    async fn hostname_is_header_safe() -> Result<(), Box<dyn std::error::Error>> {
        let h = engine("").await?.0.hostname().to_owned();
        assert!(
            !h.is_empty() && h.chars().all(|c| c.is_ascii_graphic()),
            "{h:?}"
        );
        assert_eq!(
            engine("hostname: mx1.example.org").await?.0.hostname(),
            "mx1.example.org"
        );
        Ok(())
    }

    #[tokio::test]
    async fn store_failures_follow_on_error() -> Result<(), Box<dyn std::error::Error>> {
        let err = crate::store::StoreError::Timeout(std::time::Duration::from_secs(1));
        let (e, _dir) = engine("").await?;
        let v = e.store_failed("greylist", &err);
        assert_eq!(v.reply().map(|r| (r.code, r.status)), Some((451, "4.3.0")));
        let (e, _dir) = engine("store: { on_error: continue }").await?;
        assert_eq!(e.store_failed("greylist", &err), Verdict::Continue);
        assert!(e.metrics().render().contains(
            r#"mxguard_store_failures_total{action="continue",check="greylist",error="timeout"} 1"#
        ));
        Ok(())
    }
}
