//! The operator's own deny and allow lists, kept in the state store (so
//! every MX sharing a Redis sees them) and managed at run time with
//! `mxguard deny|allow add|del|list|test`. Entries are IP addresses, CIDR
//! blocks, domains and addresses, each with an optional expiry.

use super::greylist::root_domain;
use crate::{
    config::{AllowEntry, IpNet},
    envelope::Envelope,
    store::{Key, Store, StoreError},
};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The check's name in logs and metrics.
pub const NAME: &str = "operator_denylist";

/// The lists: entries without expiry are kept this long in the store.
const FOREVER: Duration = Duration::from_secs(100 * 365 * 86_400);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum List {
    Deny,
    Allow,
}

impl List {
    pub fn name(self) -> &'static str {
        match self {
            List::Deny => "deny",
            List::Allow => "allow",
        }
    }

    fn key(self) -> Key {
        Key::plain("oplist", &[self.name()])
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub value: String,
    pub expires: Option<SystemTime>,
    pub reason: String,
}

impl Entry {
    /// `VALUE  expires=UNIX|never  REASON`, one line.
    pub fn line(&self) -> String {
        let expires = self
            .expires
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or_else(|| "never".to_owned(), |d| d.as_secs().to_string());
        format!("{}\t{expires}\t{}", self.value, self.reason)
    }

    fn parse(line: &str) -> Option<Self> {
        let mut f = line.splitn(3, '\t');
        let value = f.next()?.to_owned();
        let expires = match f.next()? {
            "never" => None,
            secs => Some(UNIX_EPOCH + Duration::from_secs(secs.parse().ok()?)),
        };
        Some(Self {
            value,
            expires,
            reason: f.next().unwrap_or("").to_owned(),
        })
    }
}

/// The canonical form of an entry: a network, a lowercase address, or a
/// lowercase domain.
pub fn normalize(value: &str) -> Result<String, String> {
    let v = value.trim();
    if let Ok(net) = v.parse::<IpNet>() {
        return Ok(net.to_string());
    }
    if let Some((local, domain)) = v.rsplit_once('@') {
        let ok_local =
            !local.is_empty() && local.len() <= 64 && local.chars().all(|c| c.is_ascii_graphic());
        if ok_local && matches!(domain.parse::<AllowEntry>(), Ok(AllowEntry::Domain(_))) {
            return Ok(v.to_ascii_lowercase());
        }
        return Err(format!("`{value}` is not an e-mail address"));
    }
    match v.parse::<AllowEntry>() {
        Ok(AllowEntry::Domain(d)) => Ok(d),
        _ => Err(format!(
            "`{value}` is neither an IP address, a CIDR block, a domain nor an e-mail address"
        )),
    }
}

/// The entries in force (expired ones left out).
pub async fn load(store: &Store, list: List, now: SystemTime) -> Result<Vec<Entry>, StoreError> {
    let raw = store.get(&list.key()).await?.unwrap_or_default();
    Ok(String::from_utf8_lossy(&raw)
        .lines()
        .filter_map(Entry::parse)
        .filter(|e| e.expires.is_none_or(|t| t > now))
        .collect())
}

async fn save(store: &Store, list: List, entries: &[Entry]) -> Result<(), StoreError> {
    let text: String = entries.iter().map(|e| e.line() + "\n").collect();
    store.set(&list.key(), text.as_bytes(), FOREVER).await
}

/// Adds (or replaces) an entry; `ttl` None: until removed.
pub async fn add(
    store: &Store,
    list: List,
    value: &str,
    ttl: Option<Duration>,
    reason: &str,
    now: SystemTime,
) -> Result<Entry, String> {
    let value = normalize(value)?;
    let reason: String = reason
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let entry = Entry {
        value,
        expires: ttl.map(|t| now + t),
        reason,
    };
    let mut entries = load(store, list, now).await.map_err(|e| e.to_string())?;
    entries.retain(|e| e.value != entry.value);
    entries.push(entry.clone());
    save(store, list, &entries)
        .await
        .map_err(|e| e.to_string())?;
    Ok(entry)
}

/// Removes an entry; false if it was not there.
pub async fn remove(
    store: &Store,
    list: List,
    value: &str,
    now: SystemTime,
) -> Result<bool, String> {
    let value = normalize(value)?;
    let mut entries = load(store, list, now).await.map_err(|e| e.to_string())?;
    let before = entries.len();
    entries.retain(|e| e.value != value);
    if entries.len() == before {
        return Ok(false);
    }
    save(store, list, &entries)
        .await
        .map_err(|e| e.to_string())?;
    Ok(true)
}

/// The entry that matches the transaction: its client address, its
/// verified name (or a parent domain of it), its sender address or the
/// sender's domain (or a parent of it).
pub fn matching<'a>(entries: &'a [Entry], env: &Envelope) -> Option<&'a Entry> {
    let name = env
        .client_name
        .as_deref()
        .map(|n| n.trim_end_matches('.').to_ascii_lowercase());
    let sender = env
        .sender
        .as_deref()
        .map(str::to_ascii_lowercase)
        .filter(|s| s.contains('@'));
    let sender_domain = sender
        .as_deref()
        .and_then(|s| s.rsplit_once('@'))
        .map(|(_, d)| d.to_owned());
    let under = |host: &Option<String>, d: &str| {
        host.as_deref()
            .is_some_and(|h| h == d || h.ends_with(&format!(".{d}")) || root_domain(h) == d)
    };
    entries.iter().find(|e| {
        if let Ok(net) = e.value.parse::<IpNet>() {
            return env.client_addr.is_some_and(|ip| net.contains(ip));
        }
        if e.value.contains('@') {
            return sender.as_deref() == Some(e.value.as_str());
        }
        under(&name, &e.value) || under(&sender_domain, &e.value)
    })
}

/// For `mxguard deny|allow test VALUE`: the transaction a value stands for.
pub fn envelope_for(value: &str) -> Result<Envelope, String> {
    let v = normalize(value)?;
    let mut env = Envelope::default();
    if let Ok(ip) = v.parse() {
        env.client_addr = Some(ip);
    } else if v.contains('@') {
        env.sender = Some(v);
    } else {
        env.client_name = Some(v);
    }
    Ok(env)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn add_list_match_expire_remove() -> Result<(), Box<dyn std::error::Error>> {
        let (store, _dir, clock) = crate::store::test_store().await?;
        let now = || crate::clock::Clock::now(clock.as_ref());
        add(
            &store,
            List::Deny,
            "198.51.100.0/24",
            None,
            "spam run",
            now(),
        )
        .await?;
        add(
            &store,
            List::Deny,
            "Spammer@Example.NET",
            Some(Duration::from_secs(60)),
            "",
            now(),
        )
        .await?;
        add(&store, List::Deny, "bad.example", None, "", now()).await?;
        assert!(
            add(&store, List::Deny, "not valid!", None, "", now())
                .await
                .is_err()
        );
        let entries = load(&store, List::Deny, now()).await?;
        assert_eq!(entries.len(), 3);
        let hit = |env: Envelope| matching(&entries, &env).map(|e| e.value.clone());
        let env = |ip: &str, name: Option<&str>, sender: &str| Envelope {
            client_addr: ip.parse().ok(),
            client_name: name.map(str::to_owned),
            sender: Some(sender.into()),
            ..Envelope::default()
        };
        assert_eq!(
            hit(env("198.51.100.7", None, "a@b.example")).as_deref(),
            Some("198.51.100.0/24")
        );
        assert_eq!(
            hit(env("192.0.2.1", None, "spammer@example.net")).as_deref(),
            Some("spammer@example.net")
        );
        assert_eq!(
            hit(env("192.0.2.1", Some("mx.bad.example"), "a@c.example")).as_deref(),
            Some("bad.example")
        );
        assert_eq!(
            hit(env("192.0.2.1", None, "x@mail.bad.example")).as_deref(),
            Some("bad.example")
        );
        assert_eq!(hit(env("192.0.2.1", None, "a@c.example")), None);
        assert!(
            load(&store, List::Allow, now()).await?.is_empty(),
            "the lists are apart"
        );
        clock.advance(Duration::from_secs(61));
        assert_eq!(
            load(&store, List::Deny, now()).await?.len(),
            2,
            "the address expired"
        );
        assert!(remove(&store, List::Deny, "BAD.example", now()).await?);
        assert!(!remove(&store, List::Deny, "bad.example", now()).await?);
        assert_eq!(load(&store, List::Deny, now()).await?.len(), 1);
        Ok(())
    }
}
