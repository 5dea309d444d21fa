//! Member provisioning: the aliases of a domain kept in step with a
//! membership roster (a JSON or YAML list of members from a URL or a file).
//!
//! Each sync reads the roster, keeps the eligible members (required
//! attributes, not banned, a usable user name, not a reserved name), and
//! swaps the domain's rule set in one step. A roster that cannot be read or
//! parsed, or that would remove more than `max_drop` of the members, leaves
//! the last good set in force; that set is kept in the state store so a
//! restart starts from it.

use crate::{
    aliases::{
        Limits, RuleSet,
        grammar::{Target, parse_target},
    },
    config::{Config, DomainSource, RosterConfig},
    metrics::Metrics,
    store::{Key, Store},
};
use serde::Serialize;
use serde_json::Value;
use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, RwLock},
    time::Duration,
};
use tracing::{info, warn};

/// Local parts never provisioned from a roster.
const RESERVED: &[&str] = &[
    "abuse",
    "admin",
    "administrator",
    "hostmaster",
    "mailer-daemon",
    "no-reply",
    "noc",
    "noreply",
    "postmaster",
    "root",
    "security",
    "webmaster",
];

/// How long the last good set is kept in the store.
const SAVED_TTL: Duration = Duration::from_secs(10 * 365 * 86_400);

/// A member as the roster gives it.
pub type Member = serde_json::Map<String, Value>;

/// What provisioning made of a roster: local part → forwarding address,
/// and the members left out with why.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Provisioned {
    pub aliases: BTreeMap<String, String>,
    pub skipped: Vec<(String, String)>,
}

/// The members of a roster document: a list, or `{"members": [...]}`, in
/// JSON or YAML.
pub fn parse_roster(bytes: &[u8]) -> Result<Vec<Member>, String> {
    let value: Value = match serde_json::from_slice(bytes) {
        Ok(v) => v,
        Err(json) => serde_yaml::from_slice(bytes)
            .map_err(|yaml| format!("neither JSON ({json}) nor YAML ({yaml})"))?,
    };
    let list = match value {
        Value::Array(a) => a,
        Value::Object(mut o) => match o.remove("members") {
            Some(Value::Array(a)) => a,
            _ => return Err("expected a list of members, or {\"members\": [...]}".into()),
        },
        _ => return Err("expected a list of members".into()),
    };
    list.into_iter()
        .enumerate()
        .map(|(i, m)| match m {
            Value::Object(o) => Ok(o),
            _ => Err(format!("member {} is not an object", i + 1)),
        })
        .collect()
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Whether `member` has `value` at `attribute` (or in it, for a list).
fn has(member: &Member, attribute: &str, value: &str) -> bool {
    match member.get(attribute) {
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(text)
            .any(|t| t.eq_ignore_ascii_case(value)),
        Some(v) => text(v).is_some_and(|t| t.eq_ignore_ascii_case(value)),
        None => false,
    }
}

/// A user name as a local part: lowercase, letters, digits, `.`, `-`, `_`.
fn local_part(username: &str) -> Result<String, &'static str> {
    let l = username.trim().to_lowercase();
    if l.is_empty() || l.len() > 64 {
        return Err("empty or longer than 64 characters");
    }
    if !l
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        || l.starts_with('.')
        || l.ends_with('.')
        || l.contains("..")
    {
        return Err("not a usable local part (letters, digits, . - _)");
    }
    if RESERVED.contains(&l.as_str()) {
        return Err("a reserved name");
    }
    Ok(l)
}

/// The aliases a roster gives under `config`.
pub fn provision(members: &[Member], config: &RosterConfig) -> Provisioned {
    let mut out = Provisioned::default();
    let banned: Vec<String> = config.banned.iter().map(|b| b.to_lowercase()).collect();
    for (i, m) in members.iter().enumerate() {
        let Some(username) = m.get(&config.username_field).and_then(text) else {
            out.skipped.push((
                format!("member {}", i + 1),
                format!("no {}", config.username_field),
            ));
            continue;
        };
        let who = username.clone();
        if let Some((attr, want)) = config.require.iter().find(|(a, v)| !has(m, a, v)) {
            out.skipped.push((who, format!("{attr} is not {want}")));
            continue;
        }
        let local = match local_part(&username) {
            Ok(l) => l,
            Err(why) => {
                out.skipped.push((who, why.to_owned()));
                continue;
            }
        };
        if banned.contains(&local) {
            out.skipped.push((who, "banned".into()));
            continue;
        }
        let target = m
            .get(&config.forward_field)
            .and_then(text)
            .unwrap_or_default();
        let Some(Target::Address(target)) = parse_target(&target) else {
            out.skipped.push((
                who,
                format!("{} is not an e-mail address", config.forward_field),
            ));
            continue;
        };
        if out.aliases.contains_key(&local) {
            out.skipped
                .push((who, format!("collides with another member as {local}")));
            continue;
        }
        out.aliases.insert(local, target);
    }
    out
}

/// What one sync of one domain did.
#[derive(Debug, Default, Serialize)]
pub struct SyncReport {
    pub domain: String,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// `local: old → new`.
    pub changed: Vec<String>,
    pub skipped: Vec<String>,
    pub members: usize,
    /// The new set is in force (not a dry run, not refused, no error).
    pub applied: bool,
    pub error: Option<String>,
}

/// A domain's provisioned aliases (local part → target) and their rules.
type Provision = (BTreeMap<String, String>, Arc<RuleSet>);

/// The rosters of the running configuration and the sets they provisioned.
pub struct Rosters {
    sets: RwLock<HashMap<String, Provision>>,
    config: RwLock<Vec<(String, RosterConfig)>>,
    store: Store,
    metrics: Arc<Metrics>,
}

fn rules_of(aliases: &BTreeMap<String, String>) -> Arc<RuleSet> {
    let rules: Vec<String> = aliases.iter().map(|(l, t)| format!("{l}:{t}")).collect();
    // A roster is trusted operator data: every member gets an alias.
    Arc::new(RuleSet::from_rules(
        &rules,
        None,
        &Limits::operator(rules.len()),
    ))
}

impl Rosters {
    pub fn new(store: Store, metrics: Arc<Metrics>) -> Self {
        Self {
            sets: RwLock::new(HashMap::new()),
            config: RwLock::new(Vec::new()),
            store,
            metrics,
        }
    }

    /// Takes the roster domains of a (new) configuration.
    pub fn configure(&self, config: &Config) {
        let rosters: Vec<(String, RosterConfig)> = config
            .domains
            .iter()
            .filter(|(_, d)| d.source == DomainSource::Roster)
            .filter_map(|(n, d)| d.roster.clone().map(|r| (n.to_lowercase(), r)))
            .collect();
        *self.config.write().unwrap_or_else(|p| p.into_inner()) = rosters;
    }

    /// The provisioned rules of `domain`, once a roster was read.
    pub fn rules(&self, domain: &str) -> Option<Arc<RuleSet>> {
        self.sets
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(domain)
            .map(|(_, r)| r.clone())
    }

    /// The shortest refresh interval of the configured rosters.
    pub fn refresh(&self) -> Option<Duration> {
        self.config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(_, r)| r.refresh.get())
            .min()
    }

    fn key(domain: &str) -> Key {
        Key::plain("roster", &[domain])
    }

    /// Puts the last good sets saved in the store in force (at start).
    pub async fn load_saved(&self) {
        let domains: Vec<String> = self
            .config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(d, _)| d.clone())
            .collect();
        for domain in domains {
            match Box::pin(self.store.get(&Self::key(&domain))).await {
                Ok(Some(bytes)) => {
                    match serde_json::from_slice::<BTreeMap<String, String>>(&bytes) {
                        Ok(aliases) => {
                            info!(
                                domain,
                                members = aliases.len(),
                                "roster: last good set loaded from the state store"
                            );
                            self.install(&domain, aliases);
                        }
                        Err(e) => warn!(domain, "roster: the saved set does not parse: {e}"),
                    }
                }
                Ok(None) => {}
                Err(e) => warn!(domain, "roster: cannot read the saved set: {e}"),
            }
        }
    }

    fn install(&self, domain: &str, aliases: BTreeMap<String, String>) {
        self.metrics
            .roster_members
            .with_label_values(&[domain])
            .set(i64::try_from(aliases.len()).unwrap_or(i64::MAX));
        let rules = rules_of(&aliases);
        self.sets
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(domain.to_owned(), (aliases, rules));
    }

    /// Reads every roster and applies what changed (unless `dry_run`).
    pub async fn sync(&self, dry_run: bool, force: bool) -> Vec<SyncReport> {
        let config = self
            .config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut fetched: HashMap<String, Result<Vec<Member>, String>> = HashMap::new();
        let mut reports = Vec::new();
        for (domain, roster) in config {
            let source = roster
                .url
                .clone()
                .or_else(|| roster.path.as_ref().map(|p| p.display().to_string()))
                .unwrap_or_default();
            if !fetched.contains_key(&source) {
                let bytes = match (&roster.url, &roster.path) {
                    (Some(url), _) => crate::feeds::fetch(url).await,
                    (None, Some(path)) => tokio::fs::read(path)
                        .await
                        .map_err(|e| format!("{}: {e}", path.display())),
                    (None, None) => Err("no url or path".into()),
                };
                fetched.insert(
                    source.clone(),
                    bytes.and_then(|b| parse_roster(&b).map_err(|e| format!("{source}: {e}"))),
                );
            }
            let members = fetched
                .get(&source)
                .cloned()
                .unwrap_or_else(|| Err("not read".into()));
            let report =
                Box::pin(self.sync_domain(&domain, &roster, members, dry_run, force)).await;
            reports.push(report);
        }
        reports
    }

    async fn sync_domain(
        &self,
        domain: &str,
        roster: &RosterConfig,
        members: Result<Vec<Member>, String>,
        dry_run: bool,
        force: bool,
    ) -> SyncReport {
        let mut report = SyncReport {
            domain: domain.to_owned(),
            ..SyncReport::default()
        };
        let count = |result: &str| {
            self.metrics
                .roster_syncs
                .with_label_values(&[domain, result])
                .inc();
        };
        let members = match members {
            Ok(m) => m,
            Err(e) => {
                warn!(domain, "roster: not read, the last good set stays: {e}");
                count("error");
                report.error = Some(e);
                return report;
            }
        };
        let new = provision(&members, roster);
        let old = self
            .sets
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(domain)
            .map(|(a, _)| a.clone())
            .unwrap_or_default();
        report.members = new.aliases.len();
        report.skipped = new
            .skipped
            .iter()
            .map(|(who, why)| format!("{who}: {why}"))
            .collect();
        for (l, t) in &new.aliases {
            match old.get(l) {
                None => report.added.push(format!("{l}@{domain}")),
                Some(o) if o != t => report.changed.push(format!("{l}@{domain}: {o} -> {t}")),
                _ => {}
            }
        }
        report.removed = old
            .keys()
            .filter(|l| !new.aliases.contains_key(*l))
            .map(|l| format!("{l}@{domain}"))
            .collect();
        // An empty or truncated roster must not unprovision everyone.
        let dropped = report.removed.len() as f64;
        if !old.is_empty() && dropped > old.len() as f64 * roster.max_drop && !force {
            let e = format!(
                "the roster would remove {} of {} members, more than max_drop {}; not applied (force it with `mxguard roster sync --force`)",
                report.removed.len(),
                old.len(),
                roster.max_drop
            );
            warn!(domain, "roster: {e}");
            count("refused");
            report.error = Some(e);
            return report;
        }
        if dry_run {
            return report;
        }
        if let Ok(bytes) = serde_json::to_vec(&new.aliases)
            && let Err(e) = Box::pin(self.store.set(&Self::key(domain), &bytes, SAVED_TTL)).await
        {
            // In force now; a restart would start from the previous set.
            warn!(
                domain,
                "roster: the new set is not saved in the state store: {e}"
            );
        }
        let changed =
            !report.added.is_empty() || !report.removed.is_empty() || !report.changed.is_empty();
        self.install(domain, new.aliases);
        report.applied = true;
        count("ok");
        if changed {
            info!(
                domain,
                added = report.added.len(),
                removed = report.removed.len(),
                changed = report.changed.len(),
                skipped = report.skipped.len(),
                "roster: synced"
            );
        }
        if !report.added.is_empty() && !roster.notify_webhook.is_empty() {
            notify(&roster.notify_webhook, domain, &report.added).await;
        }
        report
    }
}

/// The rules every roster domain of `config` would get from its roster as
/// it reads now (for `mxguard resolve`); unreadable rosters are left out.
pub async fn read_now(config: &Config) -> Vec<(String, Arc<RuleSet>)> {
    let mut out = Vec::new();
    for (name, d) in &config.domains {
        let (DomainSource::Roster, Some(r)) = (d.source, &d.roster) else {
            continue;
        };
        let bytes = match (&r.url, &r.path) {
            (Some(url), _) => crate::feeds::fetch(url).await,
            (None, Some(path)) => std::fs::read(path).map_err(|e| e.to_string()),
            _ => continue,
        };
        if let Ok(members) = bytes.and_then(|b| parse_roster(&b)) {
            out.push((
                name.to_lowercase(),
                rules_of(&provision(&members, r).aliases),
            ));
        }
    }
    out
}

/// Tells the domain's admins which addresses a sync added.
async fn notify(url: &str, domain: &str, added: &[String]) {
    let body = serde_json::json!({ "domain": domain, "added": added });
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .redirect(reqwest::redirect::Policy::none())
        .build();
    let sent = match client {
        Ok(c) => c
            .post(url)
            .header("Content-Type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .map(|r| r.status()),
        Err(e) => Err(e),
    };
    match sent {
        Ok(s) if s.is_success() => info!(domain, added = added.len(), "roster: admins notified"),
        Ok(s) => warn!(domain, "roster: the notification webhook answered {s}"),
        Err(e) => warn!(domain, "roster: the notification webhook failed: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(json: &str) -> Vec<Member> {
        parse_roster(json.as_bytes()).unwrap()
    }

    #[test]
    fn eligibility_normalisation_and_collisions() {
        let roster = RosterConfig {
            require: [
                ("is_valid".to_owned(), "true".to_owned()),
                ("teams".to_owned(), "core".to_owned()),
            ]
            .into_iter()
            .collect(),
            banned: vec!["Mallory".into()],
            ..RosterConfig::default()
        };
        let m = members(
            r#"{"members": [
            {"username": "Alice", "forward": "Alice@Example.NET", "is_valid": true, "teams": ["core", "web"]},
            {"username": "bob", "forward": "bob@example.net", "is_valid": false, "teams": ["core"]},
            {"username": "carol", "forward": "carol@example.net", "is_valid": true, "teams": ["web"]},
            {"username": "mallory", "forward": "m@example.net", "is_valid": true, "teams": ["core"]},
            {"username": "postmaster", "forward": "p@example.net", "is_valid": true, "teams": ["core"]},
            {"username": "dave smith", "forward": "d@example.net", "is_valid": true, "teams": ["core"]},
            {"username": "ALICE", "forward": "other@example.net", "is_valid": true, "teams": ["core"]},
            {"username": "erin", "forward": "not an address", "is_valid": true, "teams": ["core"]},
            {"forward": "x@example.net"}
        ]}"#,
        );
        let p = provision(&m, &roster);
        assert_eq!(
            p.aliases,
            [("alice".to_owned(), "alice@example.net".to_owned())]
                .into_iter()
                .collect()
        );
        let why: Vec<&str> = p.skipped.iter().map(|(_, w)| w.as_str()).collect();
        assert_eq!(
            why,
            [
                "is_valid is not true",
                "teams is not core",
                "banned",
                "a reserved name",
                "not a usable local part (letters, digits, . - _)",
                "collides with another member as alice",
                "forward is not an e-mail address",
                "no username"
            ]
        );
    }

    #[test]
    fn yaml_rosters_and_bad_documents() {
        let m = parse_roster(b"- username: a\n  forward: a@example.net\n").unwrap();
        assert_eq!(provision(&m, &RosterConfig::default()).aliases.len(), 1);
        assert!(parse_roster(b"42").is_err());
        assert!(parse_roster(b"{\"members\": 3}").is_err());
        assert!(parse_roster(b"[1, 2]").is_err());
        assert!(parse_roster(b"{{{").is_err());
    }

    #[tokio::test]
    async fn a_roster_file_feeds_resolve() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("roster.yaml");
        std::fs::write(
            &path,
            "members:\n  - { login: Ann, mail: ann@example.net }\n",
        )
        .unwrap();
        let yaml = format!(
            "domains: {{ example.org: {{ source: roster, roster: {{ path: \"{}\", username_field: login, forward_field: mail }} }} }}",
            path.display()
        );
        let config = Config::parse(&yaml, "t").unwrap();
        let sets = read_now(&config).await;
        assert_eq!(sets.len(), 1);
        assert_eq!(sets[0].0, "example.org");
        assert_eq!(sets[0].1.rules.len(), 1);
        assert_eq!(sets[0].1.rules[0].element, "ann:ann@example.net");
    }
}
