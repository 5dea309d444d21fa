//! Address feeds: lists of client addresses in files that another program
//! refreshes (an rbldnsd zone fetched by cron, an operator's own list). Each
//! feed is read again every `refresh`; a file that cannot be read or holds
//! no address leaves the last good copy in force; an address that drops out
//! stays listed for `grace` (7 days), so a truncated download cannot empty a
//! list at once.

use crate::{
    config::{FeedConfig, IpNet},
    metrics::Metrics,
};
use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, RwLock},
    time::SystemTime,
};
use tracing::{info, warn};

/// One feed's addresses: single addresses in a hash map, blocks in a list
/// (feeds are mostly single addresses, and a lookup must stay cheap). The
/// value is when an entry that dropped out of the file stops counting.
#[derive(Debug, Default)]
struct Entries {
    addrs: HashMap<IpAddr, Option<SystemTime>>,
    nets: Vec<(IpNet, Option<SystemTime>)>,
}

impl Entries {
    fn contains(&self, ip: IpAddr, now: SystemTime) -> bool {
        let live = |until: &Option<SystemTime>| until.is_none_or(|t| now < t);
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.addrs.get(&ip).is_some_and(live)
            || self
                .nets
                .iter()
                .any(|(n, until)| n.contains(ip) && live(until))
    }

    fn len(&self) -> usize {
        self.addrs.len() + self.nets.len()
    }
}

/// What reading a feed file found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    pub addrs: Vec<IpAddr>,
    pub nets: Vec<IpNet>,
    /// Lines that were neither an address, a block, a comment nor an rbldnsd
    /// directive.
    pub skipped: usize,
}

/// Plain lists and rbldnsd `ip4set` text: `#` comments; rbldnsd's `:` (default
/// value), `$` (directive) and `!` (exclusion) lines are skipped; the first
/// field of every other line is an address or a CIDR block.
pub fn parse(text: &str) -> Parsed {
    let mut out = Parsed::default();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() || line.starts_with([':', '$', '!']) {
            continue;
        }
        let field = line.split([' ', '\t', ':']).next().unwrap_or("");
        // rbldnsd writes IPv6 with colons, so a leading field split on ':'
        // would cut it: try the whole first whitespace field first.
        let first = line.split_whitespace().next().unwrap_or("");
        match first.parse::<IpNet>().or_else(|_| field.parse::<IpNet>()) {
            Ok(net) => match net.to_string().parse::<IpAddr>() {
                Ok(ip) => out.addrs.push(ip),
                Err(_) => out.nets.push(net),
            },
            Err(_) => out.skipped += 1,
        }
    }
    out
}

pub struct Feed {
    config: FeedConfig,
    entries: RwLock<Arc<Entries>>,
}

impl Feed {
    pub fn name(&self) -> &str {
        &self.config.name
    }

    pub fn config(&self) -> &FeedConfig {
        &self.config
    }

    pub fn contains(&self, ip: IpAddr, now: SystemTime) -> bool {
        let entries = self
            .entries
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        entries.contains(ip, now)
    }

    pub fn len(&self) -> usize {
        self.entries.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads the file (or fetches the URL) and puts it in force; on failure
    /// the last good copy stays. Returns the number of entries in force, or
    /// why nothing changed.
    pub async fn load(&self, now: SystemTime) -> Result<usize, String> {
        let (origin, bytes) = match (&self.config.path, &self.config.url) {
            (Some(path), _) => {
                let bytes = tokio::fs::read(path)
                    .await
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                (path.display().to_string(), bytes)
            }
            (None, Some(url)) => (url.clone(), fetch(url).await?),
            (None, None) => return Err("the feed has neither a path nor a url".into()),
        };
        let parsed = parse(&String::from_utf8_lossy(&gunzip_if_needed(bytes)?));
        if parsed.addrs.is_empty() && parsed.nets.is_empty() {
            return Err(format!(
                "{origin} holds no address ({} lines not understood); keeping the last good copy",
                parsed.skipped
            ));
        }
        let old = self
            .entries
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let fresh = merge(&old, parsed, now, now + self.config.grace.get());
        let n = fresh.len();
        *self.entries.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(fresh);
        Ok(n)
    }
}

/// Longest a feed download may take, and the most it may weigh (the largest
/// public rbldnsd zones are a few tens of megabytes unpacked).
const FETCH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);
const MAX_FEED_BYTES: usize = 256 << 20;

pub(crate) async fn fetch(url: &str) -> Result<Vec<u8>, String> {
    let client = reqwest::Client::builder()
        .timeout(FETCH_TIMEOUT)
        .user_agent(concat!("mxguard/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("cannot set up an HTTP client: {e}"))?;
    let mut response = client
        .get(url)
        .send()
        .await
        .map_err(|e| format!("cannot fetch {url}: {e}"))?;
    if !response.status().is_success() {
        return Err(format!(
            "fetching {url}: the server answered {}",
            response.status()
        ));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| format!("fetching {url}: {e}"))?
    {
        if body.len() + chunk.len() > MAX_FEED_BYTES {
            return Err(format!("{url} is larger than {} MB", MAX_FEED_BYTES >> 20));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Unpacks a gzip stream (known by its magic bytes, whatever the file is
/// called or served as), with the same size bound.
fn gunzip_if_needed(bytes: Vec<u8>) -> Result<Vec<u8>, String> {
    use std::io::Read;
    if !bytes.starts_with(&[0x1f, 0x8b]) {
        return Ok(bytes);
    }
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes.as_slice())
        .take(MAX_FEED_BYTES as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| format!("cannot unpack gzip: {e}"))?;
    if out.len() > MAX_FEED_BYTES {
        return Err(format!(
            "the feed unpacks to more than {} MB",
            MAX_FEED_BYTES >> 20
        ));
    }
    Ok(out)
}

/// The new file's entries, plus those that dropped out of it, each listed
/// until its grace runs out.
fn merge(old: &Entries, parsed: Parsed, now: SystemTime, grace_until: SystemTime) -> Entries {
    let mut fresh = Entries {
        addrs: parsed.addrs.into_iter().map(|ip| (ip, None)).collect(),
        nets: parsed.nets.into_iter().map(|n| (n, None)).collect(),
    };
    let dropped_until = |until: &Option<SystemTime>| match until {
        None => Some(grace_until),
        Some(t) if *t > now => Some(*t),
        Some(_) => None,
    };
    for (ip, until) in &old.addrs {
        if !fresh.addrs.contains_key(ip)
            && let Some(t) = dropped_until(until)
        {
            fresh.addrs.insert(*ip, Some(t));
        }
    }
    for (net, until) in &old.nets {
        if !fresh.nets.iter().any(|(n, _)| n == net)
            && let Some(t) = dropped_until(until)
        {
            fresh.nets.push((*net, Some(t)));
        }
    }
    fresh
}

/// Every configured feed, by role.
#[derive(Default)]
pub struct Feeds {
    pub denylist: Vec<Arc<Feed>>,
    pub backscatter: Option<Arc<Feed>>,
}

impl Feeds {
    pub fn new(denylist: &[FeedConfig], backscatter: Option<&FeedConfig>) -> Self {
        let feed = |c: &FeedConfig| {
            Arc::new(Feed {
                config: c.clone(),
                entries: RwLock::new(Arc::default()),
            })
        };
        Self {
            denylist: denylist.iter().map(feed).collect(),
            backscatter: backscatter.map(feed),
        }
    }

    pub fn all(&self) -> impl Iterator<Item = &Arc<Feed>> {
        self.denylist.iter().chain(&self.backscatter)
    }
}

/// Loads a feed, logs and counts the outcome; true on success.
pub async fn refresh(feed: &Feed, now: SystemTime, metrics: &Metrics) -> bool {
    let ok = match feed.load(now).await {
        Ok(n) => {
            info!(feed = feed.name(), entries = n, "feed loaded");
            true
        }
        Err(e) => {
            warn!(feed = feed.name(), "feed not loaded: {e}");
            false
        }
    };
    let result = if ok { "ok" } else { "error" };
    metrics
        .feed_loads
        .with_label_values(&[feed.name(), result])
        .inc();
    metrics
        .feed_entries
        .with_label_values(&[feed.name()])
        .set(i64::try_from(feed.len()).unwrap_or(i64::MAX));
    ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn plain_and_rbldnsd_text() -> Result<(), String> {
        let p = parse(
            "# a comment\n$SOA 3600 ns.example. hostmaster.example. 1 2 3 4 5\n:127.0.0.2:Listed, see $\n\
             192.0.2.1\n198.51.100.0/24 # a block\n2001:db8::1\n!192.0.2.9\n203.0.113.7 :127.0.0.2:custom text\n\
             not an address\n\n",
        );
        assert_eq!(
            p.addrs,
            vec![
                "192.0.2.1".parse::<IpAddr>().map_err(|e| e.to_string())?,
                "2001:db8::1"
                    .parse()
                    .map_err(|e: std::net::AddrParseError| e.to_string())?,
                "203.0.113.7"
                    .parse()
                    .map_err(|e: std::net::AddrParseError| e.to_string())?,
            ]
        );
        assert_eq!(p.nets, vec!["198.51.100.0/24".parse::<IpNet>()?]);
        assert_eq!(p.skipped, 1);
        Ok(())
    }

    #[test]
    fn dropped_entries_stay_for_the_grace_period() -> Result<(), String> {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let week = Duration::from_secs(7 * 86_400);
        let ip = |s: &str| s.parse::<IpAddr>().map_err(|e| e.to_string());
        let first = merge(
            &Entries::default(),
            parse("192.0.2.1\n198.51.100.0/24\n"),
            t0,
            t0 + week,
        );
        assert!(first.contains(ip("192.0.2.1")?, t0));
        assert!(first.contains(ip("198.51.100.77")?, t0));
        assert!(first.contains(ip("::ffff:192.0.2.1")?, t0));
        let later = t0 + Duration::from_secs(3600);
        let second = merge(&first, parse("203.0.113.5\n"), later, later + week);
        assert!(second.contains(ip("203.0.113.5")?, later));
        assert!(
            second.contains(ip("192.0.2.1")?, later + week - Duration::from_secs(1)),
            "still listed in the grace"
        );
        assert!(
            !second.contains(ip("192.0.2.1")?, later + week),
            "gone after it"
        );
        assert!(!second.contains(ip("198.51.100.77")?, later + week));
        let third = merge(
            &second,
            parse("203.0.113.5\n"),
            later + week,
            later + week + week,
        );
        assert_eq!(third.len(), 1, "expired entries are dropped");
        Ok(())
    }
}
