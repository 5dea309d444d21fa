//! What a check decides, independent of the protocol that carries it.

use std::fmt;

/// An SMTP reply for a refusal: a code, an RFC 3463 enhanced status code and
/// a human sentence. The sentence is kept to one line of printable text, so no
/// reply can be used to inject protocol lines.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub status: &'static str,
    pub text: String,
}

impl Reply {
    pub fn new(code: u16, status: &'static str, text: impl Into<String>) -> Self {
        debug_assert!((400..600).contains(&code));
        Self {
            code,
            status,
            text: one_line(&text.into()),
        }
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.code, self.status, self.text)
    }
}

/// Replaces control characters by spaces and caps the length under the
/// 980-byte limit milter replies and SMTP lines share.
fn one_line(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if out.len() > 900 {
        let mut cut = 900;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
    }
    out
}

/// The outcome of a check, or of a whole stage.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing to object; go on with the next check or stage.
    #[default]
    Continue,
    /// Accept without further checks.
    Accept,
    /// Accept and silently drop (the message, or this recipient).
    Discard,
    /// Refuse for now (4xx).
    Tempfail(Reply),
    /// Refuse for good (5xx).
    Reject(Reply),
}

impl Verdict {
    /// The label used in metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Verdict::Continue => "continue",
            Verdict::Accept => "accept",
            Verdict::Discard => "discard",
            Verdict::Tempfail(_) => "tempfail",
            Verdict::Reject(_) => "reject",
        }
    }

    pub fn reply(&self) -> Option<&Reply> {
        match self {
            Verdict::Tempfail(r) | Verdict::Reject(r) => Some(r),
            _ => None,
        }
    }

    /// True when the verdict stops the checks that would follow it.
    pub fn is_final(&self) -> bool {
        !matches!(self, Verdict::Continue)
    }
}

/// A verdict with the check that made it and why, for the log line and the
/// metric each decision gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    /// The check's name, also its metric label; `none` when no check objected.
    pub check: &'static str,
    pub reason: String,
    /// True when `mode: report` turned a refusal into `Continue`.
    pub reported_only: bool,
}

impl Decision {
    pub fn pass() -> Self {
        Self {
            verdict: Verdict::Continue,
            check: "none",
            reason: String::new(),
            reported_only: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_text_is_one_line() {
        let r = Reply::new(554, "5.7.1", "bad\r\naction=OK\n\0end");
        assert_eq!(r.text, "bad  action=OK  end");
        assert_eq!(r.to_string(), "554 5.7.1 bad  action=OK  end");
        let long = Reply::new(550, "5.1.1", "é".repeat(1000));
        assert!(long.text.len() <= 900);
    }
}
