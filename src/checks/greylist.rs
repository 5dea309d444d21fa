//! Greylisting, as the reference MX does it: keyed by the client, not by the
//! (client, sender, recipient) triplet, so that any host of one organisation
//! shares one timer and a retry from another host of its pool still passes.

use crate::{
    config::{GreylistConfig, GreylistKey},
    envelope::Envelope,
    store::{Key, Store, StoreError},
    verdict::{Reply, Verdict},
};
use std::{
    net::IpAddr,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

/// The check's name in logs and metrics.
pub const NAME: &str = "greylist";

/// What identifies the client: the root domain of its verified name, else
/// its address. IPv6 clients are keyed by their /64, because a host usually
/// owns a whole /64 and may send its retry from another address in it.
pub fn identity(env: &Envelope, key: GreylistKey) -> Option<String> {
    if key == GreylistKey::Client
        && let Some(name) = env.client_name.as_deref()
    {
        return Some(root_domain(name));
    }
    let ip = env.client_addr?;
    Some(match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
        },
    })
}

/// The registrable ("root") domain of a host name by the ICANN section of the
/// Public Suffix List: `mail.example.co.uk` → `example.co.uk`. Private
/// suffixes do not count (`a.b.github.io` → `github.io`), so one provider's
/// hosts share one key. Names under unknown TLDs, single labels and IP
/// literals are returned whole. Always lowercase, without a final dot.
pub fn root_domain(name: &str) -> String {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let Some(suffix) = psl::suffix(name.as_bytes()) else {
        return name;
    };
    if !suffix.is_known() || name.parse::<IpAddr>().is_ok() {
        return name;
    }
    let suffix = if suffix.typ() == Some(psl::Type::Private) {
        // The ICANN suffix inside the private one: the longest tail of it
        // that the list knows as an ICANN suffix of its own.
        let private = String::from_utf8_lossy(suffix.as_bytes()).into_owned();
        let mut icann = None;
        let mut tail = private.as_str();
        while let Some((_, rest)) = tail.split_once('.') {
            tail = rest;
            if let Some(s) = psl::suffix(tail.as_bytes())
                && s.as_bytes() == tail.as_bytes()
                && s.typ() == Some(psl::Type::Icann)
            {
                icann = Some(tail.len());
                break;
            }
        }
        match icann {
            Some(len) => len,
            None => return name,
        }
    } else {
        suffix.as_bytes().len()
    };
    if name.len() <= suffix + 1 {
        return name;
    }
    let above = &name[..name.len() - suffix - 1];
    let label = above.rsplit('.').next().unwrap_or(above);
    name[name.len() - suffix - 1 - label.len()..].to_owned()
}

/// "5 minutes", "2 minutes 3 seconds", "1 hour": whole seconds, rounded up.
pub fn human(d: Duration) -> String {
    let mut secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    let mut parts = Vec::new();
    for (unit, size) in [
        ("day", 86_400),
        ("hour", 3_600),
        ("minute", 60),
        ("second", 1),
    ] {
        let n = secs / size;
        secs %= size;
        if n > 0 {
            parts.push(format!("{n} {unit}{}", if n == 1 { "" } else { "s" }));
        }
    }
    if parts.is_empty() {
        "1 second".to_owned()
    } else {
        parts.join(" ")
    }
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn greylisted(to_go: Duration) -> Verdict {
    Verdict::Tempfail(Reply::new(
        450,
        "4.7.1",
        format!("Message was greylisted, try again in {}", human(to_go)),
    ))
}

/// The greylist's verdict for the client of `env` at `now`, with its reason;
/// `None` when it may pass (or is exempt).
pub async fn check(
    config: &GreylistConfig,
    env: &Envelope,
    now: SystemTime,
    store: &Store,
) -> Result<Option<(Verdict, String)>, StoreError> {
    // A client that logged in is one of the operator's own.
    if env.sasl_username.is_some() {
        return Ok(None);
    }
    let Some(who) = identity(env, config.key) else {
        return Ok(None);
    };
    let key = Key::hashed(NAME, &[&who]);
    let now_ms = millis(now);
    let delay_ms = u64::try_from(config.delay.get().as_millis()).unwrap_or(u64::MAX);
    let first = store
        .get(&key)
        .await?
        .and_then(|v| String::from_utf8(v).ok()?.parse::<u64>().ok());
    let first = match first {
        Some(first) if first > 0 => first,
        _ => {
            // First sight. Of two racing first sights, the earlier write wins.
            let value = now_ms.to_string();
            if store
                .set_if_absent(&key, value.as_bytes(), config.lifetime.get())
                .await?
            {
                return Ok(Some((
                    greylisted(config.delay.get()),
                    format!("first sight of {who}"),
                )));
            }
            store
                .get(&key)
                .await?
                .and_then(|v| String::from_utf8(v).ok()?.parse().ok())
                .unwrap_or(now_ms)
        }
    };
    let ready = first.saturating_add(delay_ms);
    if now_ms < ready {
        let to_go = Duration::from_millis(ready - now_ms);
        return Ok(Some((
            greylisted(to_go),
            format!("{who} retried {}s too early", to_go.as_secs_f64().ceil()),
        )));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_domains() {
        for (name, root) in [
            ("mail.example.com", "example.com"),
            ("MX1.Mail.Example.CO.UK.", "example.co.uk"),
            ("example.com", "example.com"),
            ("a.b.github.io", "github.io"),
            ("ec2-198-51-100-1.compute-1.amazonaws.com", "amazonaws.com"),
            ("mail-oi1-f171.google.com", "google.com"),
            ("host.example.unknowntld", "host.example.unknowntld"),
            ("localhost", "localhost"),
            ("com", "com"),
            ("co.uk", "co.uk"),
            ("192.0.2.1", "192.0.2.1"),
        ] {
            assert_eq!(root_domain(name), root, "{name}");
        }
    }

    #[test]
    fn identities() {
        let env = |ip: &str, name: Option<&str>| Envelope {
            client_addr: ip.parse().ok(),
            client_name: name.map(str::to_owned),
            ..Envelope::default()
        };
        assert_eq!(
            identity(
                &env("192.0.2.1", Some("mx.a.example.com")),
                GreylistKey::Client
            )
            .as_deref(),
            Some("example.com")
        );
        assert_eq!(
            identity(&env("192.0.2.1", Some("mx.a.example.com")), GreylistKey::Ip).as_deref(),
            Some("192.0.2.1")
        );
        assert_eq!(
            identity(&env("192.0.2.1", None), GreylistKey::Client).as_deref(),
            Some("192.0.2.1")
        );
        assert_eq!(
            identity(&env("2001:db8:1:2:3::9", None), GreylistKey::Client).as_deref(),
            Some("2001:db8:1:2::/64")
        );
        assert_eq!(
            identity(&env("::ffff:192.0.2.9", None), GreylistKey::Client).as_deref(),
            Some("192.0.2.9")
        );
        assert_eq!(identity(&Envelope::default(), GreylistKey::Client), None);
    }

    #[test]
    fn durations_read_like_the_reference() {
        assert_eq!(human(Duration::from_secs(300)), "5 minutes");
        assert_eq!(human(Duration::from_secs(123)), "2 minutes 3 seconds");
        assert_eq!(human(Duration::from_secs(3600)), "1 hour");
        assert_eq!(human(Duration::from_millis(1500)), "2 seconds");
        assert_eq!(human(Duration::ZERO), "1 second");
    }

    fn text(v: &Option<(Verdict, String)>) -> Option<String> {
        v.as_ref()
            .and_then(|(v, _)| v.reply())
            .map(ToString::to_string)
    }

    #[tokio::test]
    async fn first_sight_waits_then_passes_for_the_lifetime()
    -> Result<(), Box<dyn std::error::Error>> {
        let (store, _dir, clock) = crate::store::test_store().await?;
        let config = GreylistConfig::default();
        let env = Envelope {
            client_addr: "192.0.2.1".parse().ok(),
            client_name: Some("mx1.example.com".into()),
            ..Envelope::default()
        };
        let sibling = Envelope {
            client_name: Some("mx2.example.com".into()),
            ..env.clone()
        };
        let now = || crate::clock::Clock::now(clock.as_ref());

        let first = check(&config, &env, now(), &store).await?;
        assert_eq!(
            text(&first).as_deref(),
            Some("450 4.7.1 Message was greylisted, try again in 5 minutes")
        );
        clock.advance(Duration::from_secs(123));
        let early = check(&config, &sibling, now(), &store).await?;
        assert_eq!(
            text(&early).as_deref(),
            Some("450 4.7.1 Message was greylisted, try again in 2 minutes 57 seconds"),
            "hosts of one root domain share the timer"
        );
        clock.advance(Duration::from_secs(177));
        assert_eq!(
            check(&config, &env, now(), &store).await?,
            None,
            "passes once the delay is over"
        );
        clock.advance(Duration::from_secs(29 * 86_400));
        assert_eq!(
            check(&config, &sibling, now(), &store).await?,
            None,
            "and for the rest of the lifetime"
        );
        clock.advance(Duration::from_secs(86_400));
        assert!(
            check(&config, &env, now(), &store).await?.is_some(),
            "greylisted again once forgotten"
        );

        let other = Envelope {
            client_addr: "198.51.100.7".parse().ok(),
            ..Envelope::default()
        };
        assert!(
            check(&config, &other, now(), &store).await?.is_some(),
            "an unnamed client is keyed by address"
        );
        let authenticated = Envelope {
            sasl_username: Some("alice".into()),
            ..other.clone()
        };
        assert_eq!(check(&config, &authenticated, now(), &store).await?, None);
        Ok(())
    }
}
