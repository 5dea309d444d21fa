//! The Postfix SMTP access policy delegation protocol: a request is
//! `name=value` lines ended by an empty line; the answer is one
//! `action=...` line and an empty line.

use crate::{
    envelope::{Envelope, Stage},
    verdict::Verdict,
};
use std::collections::HashMap;
use thiserror::Error;

/// Longest attribute name accepted; Postfix's longest is about 25 characters.
const MAX_NAME_LEN: usize = 64;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("line longer than {0} bytes")]
    LineTooLong(usize),
    #[error("more than {0} attributes in one request")]
    TooManyAttributes(usize),
    #[error("line without `=`: {0:?}")]
    NoEquals(String),
    #[error("invalid attribute name {0:?}")]
    BadName(String),
    #[error("connection closed in the middle of a request")]
    Truncated,
}

impl ProtocolError {
    /// The metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Self::LineTooLong(_) => "line_too_long",
            Self::TooManyAttributes(_) => "too_many_attributes",
            Self::NoEquals(_) => "malformed_line",
            Self::BadName(_) => "bad_name",
            Self::Truncated => "truncated",
        }
    }
}

/// One policy request's attributes.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Request {
    attrs: HashMap<String, String>,
}

impl Request {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.attrs.get(name).map(String::as_str)
    }

    fn non_empty(&self, name: &str) -> Option<String> {
        self.get(name).filter(|v| !v.is_empty()).map(str::to_owned)
    }

    pub fn stage(&self) -> Stage {
        Stage::from_protocol_state(self.get("protocol_state").unwrap_or(""))
    }

    /// The facts the checks use. Postfix writes `unknown` for names it does
    /// not have; those become absent.
    pub fn envelope(&self) -> Envelope {
        let name = |n: &str| {
            self.non_empty(n)
                .filter(|v| !v.eq_ignore_ascii_case("unknown"))
        };
        Envelope {
            queue_id: self.non_empty("queue_id"),
            client_addr: self.get("client_address").and_then(|a| a.parse().ok()),
            client_name: name("client_name"),
            reverse_client_name: name("reverse_client_name"),
            helo: self.non_empty("helo_name"),
            // The null sender arrives as an empty value: keep it as Some("").
            sender: self.get("sender").map(str::to_owned),
            recipient: self.non_empty("recipient"),
            recipient_count: self
                .get("recipient_count")
                .and_then(|n| n.parse().ok())
                .unwrap_or(0),
            sasl_username: self.non_empty("sasl_username"),
            size: self
                .get("size")
                .and_then(|n| n.parse().ok())
                .filter(|n| *n > 0),
        }
    }
}

/// Collects lines into requests.
pub struct Decoder {
    max_attributes: usize,
    current: Request,
}

impl Decoder {
    pub fn new(max_attributes: usize) -> Self {
        Self {
            max_attributes,
            current: Request::default(),
        }
    }

    /// True between requests.
    pub fn is_idle(&self) -> bool {
        self.current.attrs.is_empty()
    }

    /// Feeds one line (without its `\n`). Returns the request an empty line
    /// completes. An empty line with no attributes before it is ignored, as
    /// Postfix itself never sends one.
    pub fn push_line(&mut self, line: &[u8]) -> Result<Option<Request>, ProtocolError> {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            return Ok((!self.is_idle()).then(|| std::mem::take(&mut self.current)));
        }
        let Some(eq) = line.iter().position(|&b| b == b'=') else {
            return Err(ProtocolError::NoEquals(preview(line)));
        };
        let (name, value) = (&line[..eq], &line[eq + 1..]);
        if name.is_empty()
            || name.len() > MAX_NAME_LEN
            || !name
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'_' || *b == b'-')
        {
            return Err(ProtocolError::BadName(preview(name)));
        }
        if self.current.attrs.len() >= self.max_attributes {
            return Err(ProtocolError::TooManyAttributes(self.max_attributes));
        }
        // Values are data from the SMTP client (HELO names, addresses): keep
        // them even when they are not valid UTF-8.
        let name = String::from_utf8_lossy(name).into_owned();
        let value = String::from_utf8_lossy(value).into_owned();
        self.current.attrs.insert(name, value);
        Ok(None)
    }
}

fn preview(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(&bytes[..bytes.len().min(40)]).into_owned();
    if bytes.len() > 40 { s + "…" } else { s }
}

/// The reply line for a verdict, with its terminating empty line.
///
/// A refusal with code 554 is written `REJECT`, so Postfix applies its own
/// `access_map_reject_code` (554 unless the operator changed it) as it would
/// for any access table; other codes are written as numbers. `Accept` is
/// written `DUNNO`: an mxguard allowlist skips mxguard's checks, never the
/// restrictions that follow in Postfix.
pub fn encode(verdict: &Verdict) -> String {
    let action = match verdict {
        Verdict::Continue | Verdict::Accept => "DUNNO".to_owned(),
        Verdict::Discard => "DISCARD".to_owned(),
        Verdict::Reject(r) if r.code == 554 => format!("REJECT {} {}", r.status, r.text),
        Verdict::Tempfail(r) | Verdict::Reject(r) => r.to_string(),
    };
    format!("action={action}\n\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verdict::Reply;

    fn feed(d: &mut Decoder, text: &str) -> Result<Vec<Request>, ProtocolError> {
        let mut out = Vec::new();
        for line in text.split('\n') {
            if let Some(r) = d.push_line(line.as_bytes())? {
                out.push(r);
            }
        }
        Ok(out)
    }

    #[test]
    fn parses_a_postfix_request() -> Result<(), ProtocolError> {
        let mut d = Decoder::new(128);
        let reqs = feed(
            &mut d,
            "request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\nclient_address=192.0.2.7\n\
             client_name=unknown\nreverse_client_name=mail.example.com\nhelo_name=mail.example.com\nsender=\n\
             recipient=alice@example.org\nrecipient_count=0\nqueue_id=\nsize=0\nsasl_username=\n\
             ccert_subject=\nextra=a=b\n\n",
        )?;
        assert_eq!(reqs.len(), 1);
        let r = &reqs[0];
        assert_eq!(r.stage(), Stage::Rcpt);
        assert_eq!(r.get("extra"), Some("a=b"));
        let env = r.envelope();
        assert_eq!(env.client_addr, "192.0.2.7".parse().ok());
        assert_eq!(env.client_name, None);
        assert_eq!(env.reverse_client_name.as_deref(), Some("mail.example.com"));
        assert_eq!(env.sender.as_deref(), Some(""));
        assert_eq!(env.recipient.as_deref(), Some("alice@example.org"));
        assert_eq!(env.queue_id, None);
        assert_eq!(env.size, None);
        assert!(d.is_idle());
        Ok(())
    }

    #[test]
    fn several_requests_and_crlf() -> Result<(), ProtocolError> {
        let mut d = Decoder::new(128);
        let reqs = feed(&mut d, "a=1\r\n\r\n\nb=2\nc=3\n\n")?;
        assert_eq!(reqs.len(), 2);
        assert_eq!(reqs[0].get("a"), Some("1"));
        assert_eq!(reqs[1].get("c"), Some("3"));
        Ok(())
    }

    #[test]
    fn malformed_input_is_an_error() {
        let mut d = Decoder::new(128);
        assert_eq!(
            d.push_line(b"garbage"),
            Err(ProtocolError::NoEquals("garbage".into()))
        );
        assert!(matches!(
            d.push_line(b"=value"),
            Err(ProtocolError::BadName(_))
        ));
        assert!(matches!(
            d.push_line(b"na me=value"),
            Err(ProtocolError::BadName(_))
        ));
        assert!(matches!(
            d.push_line(&[0xff, 0xfe, b'=', b'x']),
            Err(ProtocolError::BadName(_))
        ));
        let mut d = Decoder::new(2);
        assert_eq!(d.push_line(b"a=1"), Ok(None));
        assert_eq!(d.push_line(b"b=1"), Ok(None));
        assert_eq!(
            d.push_line(b"c=1"),
            Err(ProtocolError::TooManyAttributes(2))
        );
    }

    #[test]
    fn invalid_utf8_values_are_kept() -> Result<(), ProtocolError> {
        let mut d = Decoder::new(8);
        d.push_line(b"helo_name=caf\xe9")?;
        let r = d.push_line(b"")?.ok_or(ProtocolError::Truncated)?;
        assert_eq!(r.get("helo_name"), Some("caf\u{fffd}"));
        Ok(())
    }

    #[test]
    fn encodes_each_verdict() {
        assert_eq!(encode(&Verdict::Continue), "action=DUNNO\n\n");
        assert_eq!(encode(&Verdict::Accept), "action=DUNNO\n\n");
        assert_eq!(encode(&Verdict::Discard), "action=DISCARD\n\n");
        assert_eq!(
            encode(&Verdict::Reject(Reply::new(554, "5.7.1", "Go away"))),
            "action=REJECT 5.7.1 Go away\n\n"
        );
        assert_eq!(
            encode(&Verdict::Reject(Reply::new(550, "5.1.1", "No such user"))),
            "action=550 5.1.1 No such user\n\n"
        );
        assert_eq!(
            encode(&Verdict::Tempfail(Reply::new(451, "4.7.1", "Try later\nx"))),
            "action=451 4.7.1 Try later x\n\n"
        );
    }
}
