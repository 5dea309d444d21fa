//! Clients listed by a denylist feed are refused with 421 at RCPT, with a
//! sentence that tells them how to ask for removal.

use crate::{
    config::DenylistConfig,
    envelope::Envelope,
    feeds::Feed,
    verdict::{Reply, Verdict},
};
use std::{sync::Arc, time::SystemTime};

/// The check's name in logs and metrics.
pub const NAME: &str = "denylist";

pub fn check(
    config: &DenylistConfig,
    feeds: &[Arc<Feed>],
    env: &Envelope,
    now: SystemTime,
) -> Option<(Verdict, String)> {
    let ip = env.client_addr?;
    let feed = feeds.iter().find(|f| f.contains(ip, now))?;
    let how = if config.removal_url.is_empty() {
        format!("to be removed, ask the maintainers of {}", feed.name())
    } else {
        format!("to request removal, visit {}?q={ip}", config.removal_url)
    };
    let reply = Reply::new(
        421,
        "4.7.1",
        format!("The IP {ip} is listed on {}; {how}", feed.name()),
    );
    Some((
        Verdict::Tempfail(reply),
        format!("{ip} is listed on {}", feed.name()),
    ))
}
