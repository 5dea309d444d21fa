//! The operator's allowlist: clients that skip greylisting and rate limits.
//! A domain entry only ever matches through the client's verified
//! (forward-confirmed) name, so a forged HELO or MAIL FROM never allowlists.

use super::greylist::root_domain;
use crate::{config::AllowEntry, envelope::Envelope};

/// The check's name in logs and metrics.
pub const NAME: &str = "allowlist";

pub struct Allowlist {
    entries: Vec<AllowEntry>,
}

impl Allowlist {
    /// The configured entries, plus the operator's own domains.
    pub fn new(entries: &[AllowEntry], local_domains: &[String]) -> Self {
        let mut entries = entries.to_vec();
        entries.extend(local_domains.iter().filter_map(|d| d.parse().ok()));
        Self { entries }
    }

    /// The entry the client matches, if any: its address, else its verified
    /// name's root domain, the name itself, or one of its parent domains
    /// (down to a top-level domain entry).
    pub fn matches(&self, env: &Envelope) -> Option<&AllowEntry> {
        if let Some(ip) = env.client_addr
            && let Some(e) = self
                .entries
                .iter()
                .find(|e| matches!(e, AllowEntry::Net(n) if n.contains(ip)))
        {
            return Some(e);
        }
        self.domain_entry(env.client_name.as_deref()?)
    }

    /// The domain entry a host or mail domain falls under: the name itself,
    /// its root domain, or a parent domain.
    fn domain_entry(&self, name: &str) -> Option<&AllowEntry> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let root = root_domain(&name);
        self.entries.iter().find(|e| match e {
            AllowEntry::Domain(d) => *d == root || name == *d || name.ends_with(&format!(".{d}")),
            AllowEntry::Net(_) => false,
        })
    }

    /// The domain entry the envelope sender's domain falls under. A match
    /// here allowlists only once SPF passes for that domain (the caller
    /// checks): a sender address alone is forged at will.
    pub fn sender_domain_entry(&self, env: &Envelope) -> Option<&AllowEntry> {
        let (_, domain) = env.sender.as_deref()?.rsplit_once('@')?;
        self.domain_entry(domain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(ip: &str, name: Option<&str>, helo: &str, sender: &str) -> Envelope {
        Envelope {
            client_addr: ip.parse().ok(),
            client_name: name.map(str::to_owned),
            helo: Some(helo.into()),
            sender: Some(sender.into()),
            ..Envelope::default()
        }
    }

    #[test]
    fn networks_and_verified_names_match_forged_names_do_not() -> Result<(), String> {
        let entries: Vec<AllowEntry> = ["192.0.2.0/24", "example.com", "edu", "2001:db8::/32"]
            .iter()
            .map(|e| e.parse())
            .collect::<Result<_, _>>()?;
        let list = Allowlist::new(&entries, &["example.org".into()]);
        let hit = |e: &Envelope| list.matches(e).map(ToString::to_string);
        assert_eq!(
            hit(&env("192.0.2.9", None, "x", "a@x")).as_deref(),
            Some("192.0.2.0/24")
        );
        assert_eq!(
            hit(&env("2001:db8::1", None, "x", "a@x")).as_deref(),
            Some("2001:db8::/32")
        );
        assert_eq!(
            hit(&env(
                "198.51.100.1",
                Some("mx.mail.example.com"),
                "x",
                "a@x"
            ))
            .as_deref(),
            Some("example.com")
        );
        assert_eq!(
            hit(&env(
                "198.51.100.1",
                Some("smtp.cs.example.edu"),
                "x",
                "a@x"
            ))
            .as_deref(),
            Some("edu")
        );
        assert_eq!(
            hit(&env("198.51.100.1", Some("mx.example.org"), "x", "a@x")).as_deref(),
            Some("example.org")
        );
        // A forged HELO or sender, or an unverified name, never allowlists.
        assert_eq!(
            hit(&env(
                "198.51.100.1",
                None,
                "mx.example.com",
                "ceo@example.com"
            )),
            None
        );
        assert_eq!(
            hit(&env(
                "198.51.100.1",
                Some("example.com.evil.test"),
                "x",
                "a@x"
            )),
            None
        );
        assert_eq!(
            hit(&env("198.51.100.1", Some("notexample.com"), "x", "a@x")),
            None
        );
        assert!("not a domain!".parse::<AllowEntry>().is_err());
        Ok(())
    }
}
