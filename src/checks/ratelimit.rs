//! Limits on how much one client may send: recipients per message, and
//! messages per hour from one client to one recipient.

use super::greylist::identity;
use crate::{
    config::{GreylistKey, RatelimitConfig},
    envelope::Envelope,
    store::{Key, Store, StoreError},
    verdict::{Reply, Verdict},
};

/// The checks' names in logs and metrics.
pub const RECIPIENTS: &str = "max_recipients";
pub const NAME: &str = "ratelimit";
pub const CONCURRENCY: &str = "concurrency";
pub const DAILY: &str = "daily_budget";

/// Counts a finished message and its size against the client's budgets for
/// the day (UTC); past one, `421 4.7.0`.
pub async fn daily(
    config: &RatelimitConfig,
    env: &Envelope,
    size: u64,
    allowlisted: bool,
    now: std::time::SystemTime,
    store: &Store,
) -> Result<Option<(Verdict, String)>, StoreError> {
    let (max_messages, max_bytes) = if allowlisted {
        (
            config.daily_messages_allowlisted,
            config.daily_bytes_allowlisted.0,
        )
    } else {
        (config.daily_messages, config.daily_bytes.0)
    };
    let Some(who) =
        identity(env, GreylistKey::Client).filter(|_| max_messages > 0 || max_bytes > 0)
    else {
        return Ok(None);
    };
    let day = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400)
        .to_string();
    let two_days = std::time::Duration::from_secs(2 * 86_400);
    let refuse = |what: String| {
        let reply = Reply::new(
            421,
            "4.7.0",
            format!(
                "Daily limit reached: more than {what} today from {who}; please try again tomorrow"
            ),
        );
        Some((
            Verdict::Tempfail(reply),
            format!("{who} is past its daily budget of {what}"),
        ))
    };
    if max_messages > 0 {
        let n = store
            .incr(&Key::hashed("daily_messages", &[&who, &day]), 1, two_days)
            .await?;
        if u64::try_from(n).unwrap_or(0) > max_messages {
            let plural = if max_messages == 1 { "" } else { "s" };
            return Ok(refuse(format!("{max_messages} message{plural}")));
        }
    }
    if max_bytes > 0 {
        let by = i64::try_from(size).unwrap_or(i64::MAX);
        let n = store
            .incr(&Key::hashed("daily_bytes", &[&who, &day]), by, two_days)
            .await?;
        if u64::try_from(n).unwrap_or(0) > max_bytes {
            return Ok(refuse(crate::config::Size(max_bytes).to_string()));
        }
    }
    Ok(None)
}

/// How long a connection counts if its end is never seen (a crash): the
/// counter then expires, as the reference's does after 3 minutes.
const SLOT_LIFETIME: std::time::Duration = std::time::Duration::from_secs(600);

/// One connection counted against its client; dropping it gives the slot
/// back.
pub struct Slot {
    store: Store,
    key: Key,
}

impl Drop for Slot {
    fn drop(&mut self) {
        // Drop cannot wait: the decrement runs on its own task.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (store, key) = (self.store.clone(), self.key.clone());
            runtime.spawn(async move {
                let _ = store.incr(&key, -1, SLOT_LIFETIME).await;
            });
        }
    }
}

/// Counts a new connection from the client of `env`; past the limit, `421
/// 4.7.0` (and the connection is not counted).
pub async fn connection(
    config: &RatelimitConfig,
    env: &Envelope,
    store: &Store,
) -> Result<(Option<(Verdict, String)>, Option<Slot>), StoreError> {
    let Some(ip) = env
        .client_addr
        .filter(|ip| config.concurrent_connections > 0 && !ip.is_loopback())
    else {
        return Ok((None, None));
    };
    let key = Key::hashed(CONCURRENCY, &[&ip.to_string()]);
    let open = store.incr(&key, 1, SLOT_LIFETIME).await?;
    let slot = Slot {
        store: store.clone(),
        key,
    };
    if u64::try_from(open).unwrap_or(0) <= config.concurrent_connections {
        return Ok((None, Some(slot)));
    }
    drop(slot);
    let reply = Reply::new(
        421,
        "4.7.0",
        format!("Too many concurrent connections from {ip}; please try again later"),
    );
    Ok((
        Some((
            Verdict::Tempfail(reply),
            format!("connection {open} from {ip}"),
        )),
        None,
    ))
}

/// `452 4.5.3` for a recipient past the limit (RFC 5321: the client sends
/// the rest in another message).
pub fn recipients(config: &RatelimitConfig, env: &Envelope) -> Option<(Verdict, String)> {
    (env.recipient_count >= config.max_recipients).then(|| {
        let reply = Reply::new(
            452,
            "4.5.3",
            format!(
                "Too many recipients: at most {} per message; send the others in another message",
                config.max_recipients
            ),
        );
        (
            Verdict::Tempfail(reply),
            format!("recipient {} of one message", env.recipient_count + 1),
        )
    })
}

/// Counts this message to this recipient and refuses it with 421 past the
/// limit. Called last, so only requests every other check let through count.
pub async fn check(
    config: &RatelimitConfig,
    env: &Envelope,
    store: &Store,
) -> Result<Option<(Verdict, String)>, StoreError> {
    if config.messages_per_recipient == 0 || env.sasl_username.is_some() {
        return Ok(None);
    }
    let (Some(who), Some(rcpt)) = (identity(env, GreylistKey::Client), env.recipient.as_deref())
    else {
        return Ok(None);
    };
    let rcpt = rcpt.to_ascii_lowercase();
    let key = Key::hashed(NAME, &[&who, &rcpt]);
    let count = store.incr(&key, 1, config.window.get()).await?;
    if u64::try_from(count).unwrap_or(0) <= config.messages_per_recipient {
        return Ok(None);
    }
    let reply = Reply::new(
        421,
        "4.7.0",
        format!(
            "Rate limit exceeded: more than {} messages in {} from {who} to this recipient; please try again later",
            config.messages_per_recipient, config.window
        ),
    );
    Ok(Some((
        Verdict::Tempfail(reply),
        format!("message {count} from {who} to {rcpt} in {}", config.window),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_recipient_after_the_limit_is_deferred() {
        let config = RatelimitConfig::default();
        let env = |n| Envelope {
            recipient_count: n,
            ..Envelope::default()
        };
        assert!(recipients(&config, &env(49)).is_none());
        let (v, _) = recipients(&config, &env(50)).unwrap_or((Verdict::Continue, String::new()));
        assert_eq!(
            v.reply().map(ToString::to_string).as_deref(),
            Some(
                "452 4.5.3 Too many recipients: at most 50 per message; send the others in another message"
            )
        );
    }

    #[tokio::test]
    async fn message_101_to_one_recipient_in_an_hour_is_refused()
    -> Result<(), Box<dyn std::error::Error>> {
        let (store, _dir, clock) = crate::store::test_store().await?;
        let config = RatelimitConfig::default();
        let env = Envelope {
            client_addr: "192.0.2.1".parse().ok(),
            client_name: Some("mx.example.com".into()),
            recipient: Some("Alice@example.org".into()),
            ..Envelope::default()
        };
        for _ in 0..100 {
            assert_eq!(check(&config, &env, &store).await?, None);
        }
        let refused = check(&config, &env, &store).await?;
        assert_eq!(
            refused
                .as_ref()
                .and_then(|(v, _)| v.reply())
                .map(ToString::to_string)
                .as_deref(),
            Some(
                "421 4.7.0 Rate limit exceeded: more than 100 messages in 1h from example.com to this recipient; please try again later"
            )
        );
        let other = Envelope {
            recipient: Some("bob@example.org".into()),
            ..env.clone()
        };
        assert_eq!(check(&config, &other, &store).await?, None, "per recipient");
        clock.advance(Duration::from_secs(3600));
        assert_eq!(check(&config, &env, &store).await?, None, "a new window");
        Ok(())
    }
}
