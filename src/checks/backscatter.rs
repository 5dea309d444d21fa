//! Backscatter: a bounce (null sender) or a message from a postmaster-style
//! sender, sent by a client that a backscatter feed lists, is refused with
//! 554 — such servers send bounces for mail they should have refused.

use crate::{
    envelope::Envelope,
    feeds::Feed,
    verdict::{Reply, Verdict},
};
use std::time::SystemTime;

/// The check's name in logs and metrics.
pub const NAME: &str = "backscatter";

/// Local parts that send bounces and automatic replies (the reference's
/// postmaster and no-reply names).
const POSTMASTER_NAMES: &[&str] = &[
    "automailer",
    "autoresponder",
    "bounce",
    "bounce-notification",
    "bounce-notifications",
    "bounces",
    "hostmaster",
    "listserv",
    "localhost",
    "mail-daemon",
    "mail.daemon",
    "maildaemon",
    "mailer-daemon",
    "mailer.daemon",
    "mailerdaemon",
    "majordomo",
    "postmaster",
    "do-not-reply",
    "do-not-respond",
    "do.not.reply",
    "donotreply",
    "donotrespond",
    "dont-reply",
    "naoresponda",
    "no-replies",
    "no-reply",
    "no-replys",
    "no.replies",
    "no.reply",
    "no.replys",
    "no_reply",
    "nobody",
    "noreplies",
    "noreply",
    "noreplys",
];

/// True for the null sender, an unparsable one, or a postmaster-style local
/// part (before any `+tag`, any case).
pub fn is_bounce_sender(sender: &str) -> bool {
    let Some((local, domain)) = sender.rsplit_once('@') else {
        return true;
    };
    if local.is_empty() || domain.is_empty() {
        return true;
    }
    let local = local
        .split('+')
        .next()
        .unwrap_or(local)
        .to_ascii_lowercase();
    POSTMASTER_NAMES.contains(&local.as_str())
}

pub fn check(feed: &Feed, env: &Envelope, now: SystemTime) -> Option<(Verdict, String)> {
    let ip = env.client_addr?;
    let sender = env.sender.as_deref()?;
    if !is_bounce_sender(sender) || !feed.contains(ip, now) {
        return None;
    }
    let reply = Reply::new(
        554,
        "5.7.1",
        format!(
            "The IP {ip} is listed on {}, a list of servers that send misdirected bounces; \
             this server does not take bounces from it",
            feed.name()
        ),
    );
    let shown = if sender.is_empty() { "<>" } else { sender };
    Some((
        Verdict::Reject(reply),
        format!(
            "bounce from {shown} sent by {ip}, listed on {}",
            feed.name()
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::is_bounce_sender;

    #[test]
    fn bounce_senders() {
        for s in [
            "",
            "MAILER-DAEMON@example.com",
            "postmaster+x@example.com",
            "No-Reply@example.com",
            "garbage",
        ] {
            assert!(is_bounce_sender(s), "{s}");
        }
        for s in [
            "alice@example.com",
            "postmasters@example.com",
            "noreply-team@example.com",
        ] {
            assert!(!is_bounce_sender(s), "{s}");
        }
    }
}
