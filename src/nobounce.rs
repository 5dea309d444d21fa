//! When no bounce may ever be sent for a message (behaviour.md §5.2): the
//! forwarded copies of such a message are added with `NOTIFY=NEVER`, so
//! Postfix never bounces them to a sender that did not ask for it (mailing
//! lists, auto-replies, reports, mailer-daemons).

/// Local parts of mailer-daemon style senders.
const POSTMASTERS: &[&str] = &[
    "abuse",
    "ftp",
    "hostmaster",
    "list",
    "list-request",
    "listserv",
    "mailer-daemon",
    "majordomo",
    "noc",
    "no-reply",
    "noreply",
    "null",
    "postmaster",
    "root",
    "security",
    "usenet",
    "uucp",
    "webmaster",
    "www",
];

const LIST_HEADERS: &[&str] = &[
    "list-id",
    "list-subscribe",
    "list-unsubscribe",
    "list-help",
    "list-post",
    "list-owner",
    "list-archive",
    "x-autoreply",
    "x-autorespond",
    "x-auto-respond",
];

/// Why no bounce may be sent for a message with this envelope sender and
/// these headers (names any case, values as received), or `None`.
pub fn reason(sender: &str, headers: &[(String, String)]) -> Option<&'static str> {
    if sender.trim().is_empty() {
        return Some("null sender");
    }
    let value = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_lowercase())
    };
    let from = value("from").map(|f| address_in(&f)).unwrap_or_default();
    if from.is_empty() {
        return Some("no From address");
    }
    if value("content-type").is_some_and(|v| v.starts_with("multipart/report")) {
        return Some("a delivery or disposition report");
    }
    if value("auto-submitted").is_some_and(|v| v != "no") {
        return Some("Auto-Submitted");
    }
    if value("x-auto-response-suppress").is_some_and(|v| {
        ["dr", "autoreply", "auto-reply", "auto_reply", "all"].contains(&v.as_str())
    }) {
        return Some("X-Auto-Response-Suppress");
    }
    if headers
        .iter()
        .any(|(n, _)| LIST_HEADERS.iter().any(|l| n.eq_ignore_ascii_case(l)))
    {
        return Some("a mailing list or auto-reply header");
    }
    if value("precedence").is_some_and(|v| {
        ["bulk", "autoreply", "auto-reply", "auto_reply", "list"].contains(&v.as_str())
    }) {
        return Some("Precedence");
    }
    if is_mailer_daemon(&sender.to_lowercase()) || is_mailer_daemon(&from) {
        return Some("a mailer-daemon sender");
    }
    if value("x-mddsn-message").is_some() && from.split('@').next() == Some("mdaemon") {
        return Some("an MDaemon notice");
    }
    let local = sender.to_lowercase();
    if let Some((l, d)) = local.rsplit_once('@')
        && l.contains("feedback")
        && d.starts_with("arf.")
    {
        return Some("an ARF feedback report");
    }
    None
}

/// Why no bounce may go back to `sender` whatever the message: a
/// postmaster-style or no-reply address, or an ARF reporter.
pub fn sender_reason(sender: &str) -> Option<&'static str> {
    let lower = sender.to_lowercase();
    if is_mailer_daemon(&lower) {
        return Some("a postmaster or no-reply address");
    }
    if let Some((l, d)) = lower.rsplit_once('@')
        && l.contains("feedback")
        && d.starts_with("arf.")
    {
        return Some("an ARF feedback report");
    }
    None
}

/// What a delivery status notification says of the message it reports:
/// its headers (from a `message/rfc822` or `text/rfc822-headers` part) and
/// the first `Status:` of its `message/delivery-status` part.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Dsn {
    pub original_headers: Vec<(String, String)>,
    pub status: String,
}

pub fn parse_dsn(raw: &[u8]) -> Dsn {
    use mail_parser::{MessageParser, MimeHeaders, PartType};
    let mut dsn = Dsn::default();
    let Some(m) = MessageParser::default().parse(raw) else {
        return dsn;
    };
    let headers_of = |m: &mail_parser::Message<'_>| -> Vec<(String, String)> {
        m.headers_raw()
            .map(|(n, v)| (n.to_owned(), v.trim().to_owned()))
            .collect()
    };
    for part in m.parts.iter().skip(1) {
        let ctype = part
            .content_type()
            .map(|c| {
                format!(
                    "{}/{}",
                    c.c_type.to_lowercase(),
                    c.c_subtype.as_deref().unwrap_or("").to_lowercase()
                )
            })
            .unwrap_or_default();
        match (&part.body, ctype.as_str()) {
            (PartType::Message(inner), _) if dsn.original_headers.is_empty() => {
                dsn.original_headers = headers_of(inner);
            }
            (_, "text/rfc822-headers") if dsn.original_headers.is_empty() => {
                let mut text = part.contents().to_vec();
                text.extend_from_slice(b"\r\n\r\n");
                if let Some(inner) = MessageParser::default().parse(&text) {
                    dsn.original_headers = headers_of(&inner);
                }
            }
            (_, "message/delivery-status") if dsn.status.is_empty() => {
                let text = String::from_utf8_lossy(part.contents()).into_owned();
                dsn.status = text
                    .lines()
                    .find_map(|l| {
                        let (n, v) = l.split_once(':')?;
                        n.trim()
                            .eq_ignore_ascii_case("status")
                            .then(|| v.trim().to_owned())
                    })
                    .unwrap_or_default();
            }
            _ => {}
        }
    }
    dsn
}

fn is_mailer_daemon(address: &str) -> bool {
    let local = address.rsplit_once('@').map_or(address, |(l, _)| l);
    let user = local.split('+').next().unwrap_or(local);
    POSTMASTERS.contains(&user)
        || ["+donotreply", "-donotreply", "+noreply", "-noreply"]
            .iter()
            .any(|s| local.ends_with(s))
}

/// The address in a From value (`Name <a@b>` or `a@b`), lowercased.
fn address_in(value: &str) -> String {
    let inner = match (value.rfind('<'), value.rfind('>')) {
        (Some(a), Some(b)) if a < b => &value[a + 1..b],
        _ => value,
    };
    let inner = inner.trim();
    if inner.contains('@') {
        inner.to_lowercase()
    } else {
        String::new()
    }
}

#[cfg(test)]
mod tests {
    use super::reason;

    fn h(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn each_condition() {
        let from = ("From", "Alice <alice@example.net>");
        assert_eq!(reason("alice@example.net", &h(&[from])), None);
        assert_eq!(reason("", &h(&[from])), Some("null sender"));
        assert_eq!(reason("a@b.c", &h(&[])), Some("no From address"));
        for extra in [
            (
                "Content-Type",
                "multipart/report; report-type=delivery-status",
            ),
            ("Auto-Submitted", "auto-replied"),
            ("X-Auto-Response-Suppress", "All"),
            ("List-Id", "<x.lists.example.org>"),
            ("list-unsubscribe", "<mailto:x>"),
            ("X-Autoreply", "yes"),
            ("Precedence", "bulk"),
            ("Precedence", "list"),
        ] {
            assert!(reason("a@b.c", &h(&[from, extra])).is_some(), "{extra:?}");
        }
        for fine in [
            ("Auto-Submitted", "no"),
            ("X-Auto-Response-Suppress", "DR, AutoReply"),
            ("Precedence", "junk"),
        ] {
            assert_eq!(reason("a@b.c", &h(&[from, fine])), None, "{fine:?}");
        }
        assert!(reason("MAILER-DAEMON@b.c", &h(&[from])).is_some());
        assert!(reason("news-noreply@b.c", &h(&[from])).is_some());
        assert!(reason("a@b.c", &h(&[("From", "postmaster+x@b.c")])).is_some());
        assert!(reason("x-feedback-1@arf.mail.example", &h(&[from])).is_some());
        assert!(
            reason(
                "a@b.c",
                &h(&[("From", "MDaemon@b.c"), ("X-MDDSN-Message", "yes")])
            )
            .is_some()
        );
    }

    #[test]
    fn reports_are_read() {
        let raw = b"From: MAILER-DAEMON@x.example\r\nContent-Type: multipart/report; report-type=delivery-status; boundary=B\r\n\r\n\
--B\r\nContent-Type: text/plain\r\n\r\nFailed.\r\n\
--B\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; x\r\n\r\nStatus: 5.1.1\r\n\r\n\
--B\r\nContent-Type: message/rfc822\r\n\r\nFrom: a@b.example\r\nAuto-Submitted: auto-replied\r\n\r\nbody\r\n--B--\r\n";
        let dsn = super::parse_dsn(raw);
        assert_eq!(dsn.status, "5.1.1");
        assert!(
            dsn.original_headers
                .iter()
                .any(|(n, v)| n == "Auto-Submitted" && v == "auto-replied"),
            "{dsn:?}"
        );
        assert_eq!(super::parse_dsn(b"not a report"), super::Dsn::default());
        assert_eq!(
            super::sender_reason("postmaster@x.example"),
            Some("a postmaster or no-reply address")
        );
        assert_eq!(super::sender_reason("bob@x.example"), None);
    }
}
