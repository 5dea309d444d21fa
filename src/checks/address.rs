//! Envelope addresses no mail system can carry: longer than an SMTP path
//! (RFC 5321 §4.5.3.1.3, 256 octets with the brackets), or holding a
//! control character (a NUL, a line break). Postfix stops most of these
//! itself; a milter-only site or a broken MTA passes them on, and every
//! address mxguard writes (the SRS sender, X-Original-To, X-Mxguard-Sender)
//! starts as one of them.

use crate::{
    envelope::{Envelope, MAX_ADDRESS},
    verdict::{Reply, Verdict},
};

pub const NAME: &str = "address";

/// The refusal of an envelope whose sender or recipient is unusable.
pub fn check(env: &Envelope) -> Option<(Verdict, String)> {
    let parts = [
        (env.sender.as_deref(), "Sender", "5.1.7", "sender"),
        (env.recipient.as_deref(), "Recipient", "5.1.3", "recipient"),
    ];
    for (address, what, status, label) in parts {
        let Some(address) = address else { continue };
        let problem = if address.len() > MAX_ADDRESS {
            format!("is longer than {MAX_ADDRESS} characters")
        } else if address.contains(char::is_control) {
            "contains a control character".to_owned()
        } else {
            continue;
        };
        return Some((
            Verdict::Reject(Reply::new(501, status, format!("{what} address {problem}"))),
            format!(
                "{label} of {} characters {problem}",
                address.chars().count()
            ),
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(sender: &str, recipient: &str) -> Envelope {
        Envelope {
            sender: Some(sender.into()),
            recipient: Some(recipient.into()),
            ..Envelope::default()
        }
    }

    fn reply(e: &Envelope) -> Option<String> {
        check(e).and_then(|(v, _)| v.reply().map(ToString::to_string))
    }

    #[test]
    fn overlong_and_control_characters_are_refused() {
        let at_limit = format!("{}@example.org", "a".repeat(MAX_ADDRESS - 12));
        assert_eq!(at_limit.len(), MAX_ADDRESS);
        assert_eq!(reply(&env(&at_limit, &at_limit)), None);
        assert_eq!(reply(&env("", "a@example.org")), None, "the null sender");
        let long = format!("a{at_limit}");
        assert_eq!(
            reply(&env(&long, "a@example.org")).as_deref(),
            Some("501 5.1.7 Sender address is longer than 254 characters")
        );
        assert_eq!(
            reply(&env("b@example.com", &long)).as_deref(),
            Some("501 5.1.3 Recipient address is longer than 254 characters")
        );
        for bad in [
            "a\0b@example.org",
            "a\r\nX-Evil: 1@example.org",
            "a\n@example.org",
        ] {
            assert_eq!(
                reply(&env("b@example.com", bad)).as_deref(),
                Some("501 5.1.3 Recipient address contains a control character"),
                "{bad:?}"
            );
            assert_eq!(
                reply(&env(bad, "a@example.org")).as_deref(),
                Some("501 5.1.7 Sender address contains a control character"),
                "{bad:?}"
            );
        }
        // 8-bit (SMTPUTF8) addresses are addresses.
        assert_eq!(reply(&env("jürgen@bücher.example", "a@example.org")), None);
    }
}
