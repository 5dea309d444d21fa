//! Automatic denylisting, as the reference MX does it: every message found
//! to be spam or to carry a virus counts against each of its attributes
//! (client address, verified name and its root domain, envelope sender,
//! From address); an attribute whose count passes a threshold is denylisted
//! for `lifetime`. The content checks that find spam call [`record`]; the
//! envelope check [`check`] refuses what is denylisted.

use super::greylist::root_domain;
use crate::{
    config::AutoDenyConfig,
    envelope::Envelope,
    store::{Key, Store, StoreError},
    verdict::{Reply, Verdict},
};

/// The check's name in logs and metrics.
pub const NAME: &str = "autodeny";

/// What a message was found to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finding {
    Spam,
    Virus,
}

impl Finding {
    fn label(self) -> &'static str {
        match self {
            Finding::Spam => "spam",
            Finding::Virus => "virus",
        }
    }
}

/// The attributes of a transaction that can be denylisted, lowercased.
pub fn attributes(env: &Envelope, from: Option<&str>) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(ip) = env.client_addr {
        out.push(ip.to_string());
    }
    if let Some(name) = env.client_name.as_deref() {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let root = root_domain(&name);
        if root != name {
            out.push(root);
        }
        out.push(name);
    }
    for addr in [env.sender.as_deref(), from].into_iter().flatten() {
        let addr = addr.to_ascii_lowercase();
        if addr.contains('@') && !out.contains(&addr) {
            out.push(addr);
        }
    }
    out
}

/// Counts a finding against each attribute and denylists those past their
/// threshold; returns the attributes denylisted now. `allowlisted` (the
/// client was) shortens the counters' life and spares all but addresses
/// from a spam denylisting, as in the reference.
pub async fn record(
    config: &AutoDenyConfig,
    store: &Store,
    attributes: &[String],
    finding: Finding,
    allowlisted: bool,
) -> Result<Vec<String>, StoreError> {
    let counter_life = if allowlisted {
        config.counter_lifetime_allowlisted
    } else {
        config.counter_lifetime
    };
    let mut denied = Vec::new();
    for attr in attributes {
        let key = Key::hashed("autodeny_count", &[finding.label(), attr]);
        let count = u64::try_from(store.incr(&key, 1, counter_life.get()).await?).unwrap_or(0);
        let is_address = attr.contains('@');
        let over = match finding {
            Finding::Virus => is_address && count >= config.virus_threshold,
            Finding::Spam if allowlisted && !is_address => false,
            Finding::Spam => {
                (is_address && count >= config.spam_threshold_address)
                    || count >= config.spam_threshold
            }
        };
        if over {
            let deny = Key::hashed(NAME, &[attr]);
            store
                .set(&deny, finding.label().as_bytes(), config.lifetime.get())
                .await?;
            denied.push(attr.clone());
        }
    }
    Ok(denied)
}

/// `421 4.7.1` when an attribute of the transaction is denylisted.
pub async fn check(env: &Envelope, store: &Store) -> Result<Option<(Verdict, String)>, StoreError> {
    for attr in attributes(env, None) {
        if let Some(why) = store.get(&Key::hashed(NAME, &[&attr])).await? {
            let why = String::from_utf8_lossy(&why).into_owned();
            let reply = Reply::new(
                421,
                "4.7.1",
                format!(
                    "{attr} is temporarily denylisted here after sending {why}; please try again later"
                ),
            );
            return Ok(Some((
                Verdict::Tempfail(reply),
                format!("{attr} was denylisted for {why}"),
            )));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn env() -> Envelope {
        Envelope {
            client_addr: "192.0.2.1".parse().ok(),
            client_name: Some("mx1.Example.com".into()),
            sender: Some("Spammer@example.net".into()),
            ..Envelope::default()
        }
    }

    #[test]
    fn the_attributes_of_a_transaction() {
        assert_eq!(
            attributes(&env(), Some("ceo@example.org")),
            [
                "192.0.2.1",
                "example.com",
                "mx1.example.com",
                "spammer@example.net",
                "ceo@example.org"
            ]
        );
    }

    #[tokio::test]
    async fn thresholds_and_lifetimes() -> Result<(), Box<dyn std::error::Error>> {
        let (store, _dir, clock) = crate::store::test_store().await?;
        let config = AutoDenyConfig::default();
        let attrs = attributes(&env(), None);

        // Spam: the sender address after 5 findings, every attribute after 10.
        for _ in 0..4 {
            assert!(
                record(&config, &store, &attrs, Finding::Spam, false)
                    .await?
                    .is_empty()
            );
        }
        assert_eq!(check(&env(), &store).await?, None);
        assert_eq!(
            record(&config, &store, &attrs, Finding::Spam, false).await?,
            ["spammer@example.net"]
        );
        let refused = check(&env(), &store).await?;
        assert_eq!(
            refused
                .as_ref()
                .and_then(|(v, _)| v.reply())
                .map(ToString::to_string)
                .as_deref(),
            Some(
                "421 4.7.1 spammer@example.net is temporarily denylisted here after sending spam; please try again later"
            )
        );
        for _ in 0..4 {
            record(&config, &store, &attrs, Finding::Spam, false).await?;
        }
        assert_eq!(
            record(&config, &store, &attrs, Finding::Spam, false)
                .await?
                .len(),
            4,
            "all at 10"
        );

        // Denylisted for 30 days.
        clock.advance(Duration::from_secs(30 * 86_400));
        assert_eq!(check(&env(), &store).await?, None);

        // Counters live 5 days: findings spread wider never add up.
        let other = vec!["other@example.net".to_owned()];
        for _ in 0..10 {
            assert!(
                record(&config, &store, &other, Finding::Spam, false)
                    .await?
                    .is_empty()
            );
            clock.advance(Duration::from_secs(6 * 86_400));
        }

        // Allowlisted clients: only addresses, and counters live a day.
        let allowed = vec!["192.0.2.200".to_owned(), "boss@example.org".to_owned()];
        for _ in 0..9 {
            record(&config, &store, &allowed, Finding::Spam, true).await?;
        }
        assert_eq!(
            record(&config, &store, &allowed, Finding::Spam, true).await?,
            ["boss@example.org"]
        );

        // Viruses: an address after 3.
        let v = vec!["192.0.2.77".to_owned(), "worm@example.net".to_owned()];
        record(&config, &store, &v, Finding::Virus, false).await?;
        record(&config, &store, &v, Finding::Virus, false).await?;
        assert_eq!(
            record(&config, &store, &v, Finding::Virus, false).await?,
            ["worm@example.net"]
        );
        Ok(())
    }
}
