//! Aliases: where mail for an address of a domain mxguard forwards for
//! goes. One grammar (`grammar`) and one resolver (`resolve`) serve the
//! rules written in mxguard.yaml and those published in a domain's
//! `forward-email=` TXT records.

pub mod grammar;
pub mod resolve;
pub mod rewrite;

pub use grammar::{Limits, RuleSet};
pub use resolve::{Destination, Outcome, Resolved};

use crate::config::{Config, DomainSource};
use mail_auth::hickory_resolver::{
    net::{DnsError, NetError},
    proto::rr::RData,
};
use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

/// The default most forwarding targets of one address.
pub const DEFAULT_MAX_FORWARDED: usize = 10;

/// Parsed TXT rules by domain, kept for the TTL of the answer. Shared by the
/// engines of successive configurations, so a reload does not empty it.
pub struct TxtCache {
    entries: Mutex<HashMap<String, (Cached, Instant)>>,
    max_entries: usize,
}

#[derive(Clone)]
enum Cached {
    Rules(Arc<RuleSet>),
    /// The domain has no TXT records at all.
    NoRecords,
}

/// Longest a negative answer is kept, and how long one without an SOA is.
const NEGATIVE_TTL_MAX: Duration = Duration::from_secs(300);
const NEGATIVE_TTL_DEFAULT: Duration = Duration::from_secs(60);

impl TxtCache {
    pub fn new(max_entries: usize) -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            max_entries: max_entries.max(1),
        }
    }

    fn get(&self, domain: &str) -> Option<Cached> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .get(domain)
            .filter(|(_, until)| *until > Instant::now())
            .map(|(c, _)| c.clone())
    }

    fn put(&self, domain: &str, value: Cached, until: Instant) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= self.max_entries {
            let now = Instant::now();
            entries.retain(|_, (_, until)| *until > now);
            // Still full of live answers: drop the ones closest to expiry.
            if entries.len() >= self.max_entries {
                let mut untils: Vec<Instant> = entries.values().map(|(_, u)| *u).collect();
                untils.sort_unstable();
                let cut = untils[untils.len() / 2];
                entries.retain(|_, (_, until)| *until > cut);
            }
        }
        entries.insert(domain.to_owned(), (value, until));
    }

    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where the rules of a domain come from.
pub enum Lookup {
    Rules(Arc<RuleSet>),
    /// Not a domain mxguard forwards for.
    NotHandled,
    /// DNS trouble: try again later.
    Failed(String),
}

struct DomainSettings {
    max_forwarded: usize,
    webhook_key: String,
}

/// The alias sources of one configuration.
pub struct Aliases {
    config_rules: HashMap<String, Arc<RuleSet>>,
    dns_domains: HashSet<String>,
    /// `domains: { "*": { source: dns } }`: any domain with `forward-email=`
    /// records.
    wildcard: bool,
    settings: HashMap<String, DomainSettings>,
    default_max_forwarded: usize,
    /// Records that stand in for DNS (`mxguard resolve --txt`): no query
    /// is sent for any domain.
    offline: Option<HashMap<String, Vec<String>>>,
    resolver: Option<Arc<mail_auth::MessageAuthenticator>>,
    cache: Arc<TxtCache>,
    limits: Limits,
    /// Domains whose aliases a membership roster provisions.
    roster_domains: HashSet<String>,
    rosters: Option<Arc<crate::roster::Rosters>>,
}

impl Aliases {
    pub fn new(
        config: &Config,
        resolver: Option<Arc<mail_auth::MessageAuthenticator>>,
        cache: Arc<TxtCache>,
    ) -> Self {
        let limits = Limits::default();
        let mut config_rules = HashMap::new();
        let mut dns_domains = HashSet::new();
        let mut roster_domains = HashSet::new();
        let mut settings = HashMap::new();
        let mut wildcard = false;
        let mut default_max_forwarded = DEFAULT_MAX_FORWARDED;
        for (name, domain) in &config.domains {
            let name = normalize_domain(name);
            if name == "*" {
                wildcard = domain.source == DomainSource::Dns;
                default_max_forwarded = domain.max_forwarded;
                continue;
            }
            match domain.source {
                DomainSource::Config => {
                    let set = RuleSet::from_rules(
                        &domain.rules,
                        domain.port,
                        &Limits::operator(domain.rules.len()),
                    );
                    for e in &set.errors {
                        tracing::warn!(domain = %name, "forwarding rule {e}");
                    }
                    config_rules.insert(name.clone(), Arc::new(set));
                }
                DomainSource::Dns => {
                    dns_domains.insert(name.clone());
                }
                DomainSource::Roster => {
                    roster_domains.insert(name.clone());
                }
            }
            settings.insert(
                name,
                DomainSettings {
                    max_forwarded: domain.max_forwarded,
                    webhook_key: domain.webhook_key.clone(),
                },
            );
        }
        Self {
            config_rules,
            dns_domains,
            wildcard,
            settings,
            default_max_forwarded,
            offline: None,
            resolver,
            cache,
            limits,
            roster_domains,
            rosters: None,
        }
    }

    /// `rules` stand for the domain's (a roster read by `mxguard resolve`).
    pub fn with_rule_set(mut self, domain: &str, rules: Arc<RuleSet>) -> Self {
        let domain = normalize_domain(domain);
        self.roster_domains.remove(&domain);
        self.config_rules.insert(domain, rules);
        self
    }

    /// Where the rules of `source: roster` domains come from.
    pub fn with_rosters(mut self, rosters: Arc<crate::roster::Rosters>) -> Self {
        self.rosters = Some(rosters);
        self
    }

    /// The same sources, with `records` standing in for the DNS of `domain`
    /// (which is then handled whatever the configuration says) and no DNS
    /// query for any other.
    pub fn offline(mut self, domain: &str, records: Vec<String>) -> Self {
        let domain = normalize_domain(domain);
        self.config_rules.remove(&domain);
        self.dns_domains.insert(domain.clone());
        let mut map = self.offline.take().unwrap_or_default();
        map.insert(domain, records);
        self.offline = Some(map);
        self.resolver = None;
        self
    }

    /// Whether any domain is forwarded at all (the checks are skipped
    /// otherwise).
    pub fn is_empty(&self) -> bool {
        self.config_rules.is_empty()
            && self.dns_domains.is_empty()
            && self.roster_domains.is_empty()
            && !self.wildcard
    }

    pub fn max_forwarded(&self, domain: &str) -> usize {
        self.settings
            .get(domain)
            .map_or(self.default_max_forwarded, |s| s.max_forwarded)
    }

    /// The HMAC key for webhooks of this domain, if one is set.
    pub fn webhook_key(&self, domain: &str) -> Option<&str> {
        self.settings
            .get(&normalize_domain(domain))
            .map(|s| s.webhook_key.as_str())
            .filter(|k| !k.is_empty())
    }

    /// The rules of `domain`, from the YAML, the cache or DNS.
    pub async fn rules(&self, domain: &str) -> Lookup {
        let domain = normalize_domain(domain);
        if let Some(set) = self.config_rules.get(&domain) {
            return Lookup::Rules(set.clone());
        }
        if self.roster_domains.contains(&domain) {
            return match self.rosters.as_ref().and_then(|r| r.rules(&domain)) {
                Some(set) => Lookup::Rules(set),
                // Until the roster is read, nothing is accepted for good.
                None => Lookup::Failed(format!("the roster of {domain} has not been read yet")),
            };
        }
        let explicit = self.dns_domains.contains(&domain);
        let wildcard = self.wildcard && grammar::is_fqdn(&domain);
        if !explicit && !wildcard {
            return Lookup::NotHandled;
        }
        let found = match self.offline.as_ref() {
            Some(map) => match map.get(&domain) {
                Some(records) => Ok(Cached::Rules(Arc::new(RuleSet::from_txt(
                    records,
                    &self.limits,
                )))),
                None if explicit => Err(format!(
                    "no DNS queries in offline mode (records for {domain} were not given)"
                )),
                None => Ok(Cached::NoRecords),
            },
            None => self.txt(&domain).await,
        };
        match found {
            Ok(Cached::Rules(set)) if set.has_records || explicit => Lookup::Rules(set),
            Ok(_) if !explicit => Lookup::NotHandled,
            Ok(_) => Lookup::Failed(format!("{domain} has no TXT records")),
            Err(e) => Lookup::Failed(e),
        }
    }

    /// The TXT records of `domain`, parsed, through the cache.
    async fn txt(&self, domain: &str) -> Result<Cached, String> {
        if let Some(found) = self.cache.get(domain) {
            return Ok(found);
        }
        let Some(resolver) = self.resolver.as_ref() else {
            return Err("no DNS resolver".into());
        };
        let fqdn = format!("{domain}.");
        match resolver.resolver().txt_lookup(fqdn.as_str()).await {
            Ok(lookup) => {
                let records: Vec<String> = lookup
                    .answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        // Character-strings join without a separator.
                        RData::TXT(txt) => Some(
                            txt.txt_data
                                .iter()
                                .map(|s| String::from_utf8_lossy(s))
                                .collect::<String>(),
                        ),
                        _ => None,
                    })
                    .collect();
                let set = RuleSet::from_txt(&records, &self.limits);
                for e in &set.errors {
                    tracing::warn!(domain, "forwarding rule in TXT record {e}");
                }
                let found = Cached::Rules(Arc::new(set));
                self.cache.put(domain, found.clone(), lookup.valid_until());
                Ok(found)
            }
            Err(NetError::Dns(DnsError::NoRecordsFound(none))) => {
                let ttl = none
                    .negative_ttl
                    .map_or(NEGATIVE_TTL_DEFAULT, |s| Duration::from_secs(u64::from(s)))
                    .min(NEGATIVE_TTL_MAX);
                self.cache
                    .put(domain, Cached::NoRecords, Instant::now() + ttl);
                Ok(Cached::NoRecords)
            }
            Err(e) => Err(format!("TXT lookup of {domain} failed: {e}")),
        }
    }

    /// Whether mail for `domain` is forwarded by mxguard: for the
    /// socketmap's `domains` map (Postfix's `relay_domains`).
    pub async fn handles_domain(&self, domain: &str) -> Result<bool, String> {
        match self.rules(domain).await {
            Lookup::Rules(_) => Ok(true),
            Lookup::NotHandled => Ok(false),
            Lookup::Failed(e) => Err(e),
        }
    }
}

/// `mxguard resolve`: where mail for `address` goes and why, as one JSON
/// object. With `records`, they stand in for the DNS of the address's
/// domain and no query is sent.
pub async fn explain(config: &Config, records: Vec<String>, address: &str) -> serde_json::Value {
    let address = address.trim().trim_start_matches('<').trim_end_matches('>');
    let cache = Arc::new(TxtCache::new(100));
    let offline = !records.is_empty();
    let resolver = if offline {
        None
    } else {
        crate::dns::authenticator(&config.dns).ok().map(Arc::new)
    };
    let mut aliases = Aliases::new(config, resolver, cache);
    // Roster domains: the roster as it reads now.
    for (domain, rules) in crate::roster::read_now(config).await {
        aliases = aliases.with_rule_set(&domain, rules);
    }
    if offline && let Some((_, domain)) = address.rsplit_once('@') {
        aliases = aliases.offline(domain, records);
    }
    let resolved = aliases.resolve(address).await;
    let (verdict, code, reason) = match &resolved.outcome {
        Outcome::Forward { .. } => ("forward", 250, resolved.reason.clone()),
        Outcome::Discard => ("discard", 250, resolved.reason.clone()),
        Outcome::Refuse(v) => {
            let reply = v.reply();
            (
                if matches!(v, crate::verdict::Verdict::Tempfail(_)) {
                    "tempfail"
                } else {
                    "reject"
                },
                reply.map_or(451, |r| r.code),
                reply.map_or_else(
                    || resolved.reason.clone(),
                    |r| format!("{} {} ({})", r.status, r.text, resolved.reason),
                ),
            )
        }
        Outcome::NotHandled => ("reject", 550, resolved.reason.clone()),
    };
    let (targets, port) = match &resolved.outcome {
        Outcome::Forward { destinations, port } => (
            destinations.iter().map(ToString::to_string).collect(),
            port.unwrap_or(25),
        ),
        _ => (Vec::new(), 25),
    };
    serde_json::json!({
        "address": address,
        "verdict": verdict,
        "code": code,
        "targets": targets,
        "port": port,
        "reason": reason,
    })
}

/// Lowercase, without a trailing dot.
pub fn normalize_domain(d: &str) -> String {
    d.trim().trim_end_matches('.').to_lowercase()
}

#[cfg(test)]
mod tests;
