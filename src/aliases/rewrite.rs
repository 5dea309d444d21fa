//! The end-of-message rewriting of a forwarded message, as a plan the
//! milter carries out: which recipients go, which targets come, which
//! headers are added, where webhooks post, which targets need a port.

use super::{Destination, Outcome, Resolved};
use crate::{
    envelope::Envelope,
    verdict::{Reply, Verdict},
};

/// The header naming the original recipient (added only when the message
/// had one recipient, and no such header yet).
pub const ORIGINAL_TO: &str = "X-Original-To";
/// mxguard's trace of the original envelope: `rfc822; sender, PTR name, IP`.
pub const SENDER_TRACE: &str = "X-Mxguard-Sender";

/// One accepted recipient, with what it resolved to at RCPT.
#[derive(Clone, Debug)]
pub struct Recipient {
    pub address: String,
    pub resolved: Option<Resolved>,
    /// An SRS address being reversed (a bounce or reply going back): no
    /// forwarding headers, no SRS of its own.
    pub srs: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Webhook {
    pub url: String,
    /// Every recipient mapped to this URL; the first is the session's.
    pub recipients: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub delete: Vec<String>,
    pub add: Vec<String>,
    /// Why the added recipients carry `NOTIFY=NEVER`, if they do.
    pub no_bounce: Option<&'static str>,
    pub webhooks: Vec<Webhook>,
    /// Targets (or kept recipients) that go out on a custom port.
    pub routes: Vec<(String, u16)>,
    /// Headers to insert at the top, in order.
    pub insert_headers: Vec<(String, String)>,
    /// Existing headers to delete: name and 1-based index among its name,
    /// highest first so the indices stay valid.
    pub delete_headers: Vec<(String, i32)>,
    /// A refusal that replaces the message's acceptance.
    pub refuse: Option<Verdict>,
    /// Every recipient was dropped (`!alias`, or delivered by webhook only).
    pub nothing_left: bool,
    /// Some recipient was forwarded (headers were planned).
    pub forwarded: bool,
    /// The targets added for forwarded aliases (not reversed SRS
    /// addresses): what the SRS sender rewriting looks at.
    pub forwarded_to: Vec<String>,
}

/// The plan for a message. `headers` are the message's headers as
/// received (name, value).
pub fn plan(
    recipients: &[Recipient],
    env: &Envelope,
    headers: &[(String, String)],
    hostname: &str,
) -> Plan {
    let mut plan = Plan::default();
    let mut kept = 0;
    for r in recipients {
        let Some(resolved) = &r.resolved else {
            kept += 1;
            continue;
        };
        match &resolved.outcome {
            Outcome::NotHandled => kept += 1,
            Outcome::Discard => plan.delete.push(r.address.clone()),
            Outcome::Refuse(v) => {
                // Accepted at RCPT, refused now: the rules changed in
                // between. Nothing is dropped; the client tries again and
                // gets each recipient's own answer.
                let reply = Reply::new(
                    451,
                    "4.3.0",
                    format!(
                        "The forwarding of {} changed during the message ({}); try again",
                        r.address,
                        v.reply().map_or_else(String::new, ToString::to_string)
                    ),
                );
                plan.refuse.get_or_insert(Verdict::Tempfail(reply));
            }
            Outcome::Forward { destinations, port } => {
                if !r.srs {
                    plan.forwarded = true;
                    for d in destinations {
                        if let Destination::Address(a) = d {
                            plan.forwarded_to.push(a.clone());
                        }
                    }
                }
                let own = r.address.to_lowercase();
                let itself =
                    destinations.len() == 1 && destinations[0] == Destination::Address(own.clone());
                if itself {
                    kept += 1;
                } else {
                    plan.delete.push(r.address.clone());
                }
                for d in destinations {
                    match d {
                        Destination::Address(a) => {
                            if !itself && !plan.add.iter().any(|x| x.eq_ignore_ascii_case(a)) {
                                plan.add.push(a.clone());
                            }
                            if let Some(p) = port {
                                plan.routes.push((a.clone(), *p));
                            }
                        }
                        Destination::Webhook(url) => {
                            match plan.webhooks.iter_mut().find(|w| &w.url == url) {
                                Some(w) => w.recipients.push(r.address.clone()),
                                None => plan.webhooks.push(Webhook {
                                    url: url.clone(),
                                    recipients: vec![r.address.clone()],
                                }),
                            }
                        }
                    }
                }
            }
        }
    }
    plan.nothing_left = kept == 0 && plan.add.is_empty();
    if plan.forwarded {
        let sender = env.sender.as_deref().unwrap_or("");
        plan.no_bounce = crate::nobounce::reason(sender, headers);
        // Forged traces of ours are removed before ours is added.
        let forged = headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(SENDER_TRACE))
            .count();
        for i in (1..=forged).rev() {
            plan.delete_headers.push((
                SENDER_TRACE.to_owned(),
                i32::try_from(i).unwrap_or(i32::MAX),
            ));
        }
        let has_original_to = headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case(ORIGINAL_TO));
        if recipients.len() == 1 && !has_original_to {
            plan.insert_headers
                .push((ORIGINAL_TO.to_owned(), clean(&recipients[0].address)));
        }
        plan.insert_headers
            .push((SENDER_TRACE.to_owned(), sender_trace(env, hostname)));
    }
    plan
}

/// `rfc822; <sender>, <PTR name>, <IP>; by <host>` with the parts that
/// are known.
fn sender_trace(env: &Envelope, hostname: &str) -> String {
    let mut parts = Vec::new();
    if let Some(s) = env.sender.as_deref().filter(|s| !s.is_empty()) {
        parts.push(clean(s));
    }
    if let Some(p) = env
        .client_name
        .as_deref()
        .or(env.reverse_client_name.as_deref())
    {
        parts.push(clean(p));
    }
    if let Some(ip) = env.client_addr {
        parts.push(ip.to_string());
    }
    format!("rfc822; {}; by {}", parts.join(", "), clean(hostname))
}

/// A header value built from envelope facts: printable, one line, bounded,
/// so no client can inject a header or a line through it.
pub fn clean(s: &str) -> String {
    let mut out: String = s.chars().filter(|c| !c.is_control()).take(500).collect();
    out.truncate(out.trim_end().len());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forward(address: &str, to: &[&str], port: Option<u16>) -> Recipient {
        let destinations = to
            .iter()
            .map(|t| {
                if t.starts_with("http") {
                    Destination::Webhook((*t).to_owned())
                } else {
                    Destination::Address((*t).to_owned())
                }
            })
            .collect();
        Recipient {
            address: address.into(),
            resolved: Some(Resolved {
                address: address.into(),
                outcome: Outcome::Forward { destinations, port },
                reason: String::new(),
                looped: false,
            }),
            srs: false,
        }
    }

    fn env() -> Envelope {
        Envelope {
            client_addr: "192.0.2.1".parse().ok(),
            client_name: Some("mail.example.net".into()),
            sender: Some("alice@example.net\r\nBcc: x@evil.example".into()),
            ..Envelope::default()
        }
    }

    fn from() -> Vec<(String, String)> {
        vec![("From".into(), "alice@example.net".into())]
    }

    #[test]
    fn one_alias_is_replaced_by_its_targets_with_headers() {
        let p = plan(
            &[forward(
                "hello@example.com",
                &["a@gmail.com", "b@gmail.com"],
                None,
            )],
            &env(),
            &from(),
            "mx.example.com",
        );
        assert_eq!(p.delete, ["hello@example.com"]);
        assert_eq!(p.add, ["a@gmail.com", "b@gmail.com"]);
        assert_eq!(p.no_bounce, None);
        assert!(!p.nothing_left);
        assert_eq!(
            p.insert_headers,
            [
                ("X-Original-To".to_owned(), "hello@example.com".to_owned()),
                (
                    "X-Mxguard-Sender".to_owned(),
                    "rfc822; alice@example.netBcc: x@evil.example, mail.example.net, 192.0.2.1; by mx.example.com".to_owned()
                )
            ]
        );
    }

    #[test]
    fn two_recipients_share_targets_and_webhooks_and_get_no_original_to() {
        let rs = [
            forward(
                "a@example.com",
                &["x@gmail.com", "https://h.example.org/"],
                None,
            ),
            forward(
                "b@example.com",
                &["X@gmail.com", "https://h.example.org/"],
                None,
            ),
            Recipient {
                address: "local@elsewhere.example".into(),
                resolved: None,
                srs: false,
            },
        ];
        let mut headers = from();
        headers.push(("X-Mxguard-Sender".into(), "forged".into()));
        headers.push(("x-mxguard-sender".into(), "forged".into()));
        let p = plan(&rs, &env(), &headers, "mx");
        assert_eq!(p.add, ["x@gmail.com"]);
        assert_eq!(
            p.webhooks,
            [Webhook {
                url: "https://h.example.org/".into(),
                recipients: vec!["a@example.com".into(), "b@example.com".into()]
            }]
        );
        assert!(p.insert_headers.iter().all(|(n, _)| n != ORIGINAL_TO));
        assert_eq!(
            p.delete_headers,
            [
                ("X-Mxguard-Sender".to_owned(), 2),
                ("X-Mxguard-Sender".to_owned(), 1)
            ]
        );
    }

    #[test]
    fn discards_webhook_only_and_custom_ports() {
        let discard = Recipient {
            address: "gone@example.com".into(),
            resolved: Some(Resolved {
                address: "gone@example.com".into(),
                outcome: Outcome::Discard,
                reason: String::new(),
                looped: false,
            }),
            srs: false,
        };
        let p = plan(std::slice::from_ref(&discard), &env(), &from(), "mx");
        assert!(p.nothing_left && p.delete == ["gone@example.com"] && !p.forwarded);

        let p = plan(
            &[forward("h@example.com", &["https://h.example.org/"], None)],
            &env(),
            &from(),
            "mx",
        );
        assert!(p.nothing_left);

        let p = plan(
            &[forward("h@example.com", &["h@example.com"], Some(2525))],
            &env(),
            &from(),
            "mx",
        );
        assert!(p.delete.is_empty() && p.add.is_empty() && !p.nothing_left);
        assert_eq!(p.routes, [("h@example.com".to_owned(), 2525)]);
    }

    #[test]
    fn no_bounce_messages_are_marked() {
        let mut headers = from();
        headers.push(("List-Id".into(), "<l.example.org>".into()));
        let p = plan(
            &[forward("h@example.com", &["a@gmail.com"], None)],
            &env(),
            &headers,
            "mx",
        );
        assert!(p.no_bounce.is_some());
    }

    #[test]
    fn a_reversed_srs_address_gets_no_forwarding_headers() {
        let mut r = forward(
            "SRS0=x=y=example.com=bob@srs.example.org",
            &["bob@example.com"],
            None,
        );
        r.srs = true;
        let p = plan(&[r], &env(), &from(), "mx");
        assert_eq!(p.delete, ["SRS0=x=y=example.com=bob@srs.example.org"]);
        assert_eq!(p.add, ["bob@example.com"]);
        assert!(!p.forwarded && p.forwarded_to.is_empty() && p.insert_headers.is_empty());
    }
}
