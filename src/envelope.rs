//! The facts of one SMTP transaction that the envelope checks look at, as
//! either front end learns them from Postfix.

use std::{fmt, net::IpAddr};

/// The longest address an SMTP path can carry (RFC 5321 §4.5.3.1.3: 256
/// octets with its angle brackets).
pub const MAX_ADDRESS: usize = 254;

/// The SMTP stage a decision is made at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stage {
    Connect,
    Helo,
    Mail,
    Rcpt,
    Data,
    EndOfMessage,
    /// VRFY, ETRN or a state this version does not know.
    Other,
}

impl Stage {
    /// Postfix's `protocol_state` attribute of a policy request.
    pub fn from_protocol_state(s: &str) -> Self {
        match s.to_ascii_uppercase().as_str() {
            "CONNECT" => Stage::Connect,
            "EHLO" | "HELO" => Stage::Helo,
            "MAIL" => Stage::Mail,
            "RCPT" => Stage::Rcpt,
            "DATA" | "BDAT" => Stage::Data,
            "END-OF-MESSAGE" => Stage::EndOfMessage,
            _ => Stage::Other,
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::Connect => "connect",
            Stage::Helo => "helo",
            Stage::Mail => "mail",
            Stage::Rcpt => "rcpt",
            Stage::Data => "data",
            Stage::EndOfMessage => "end-of-message",
            Stage::Other => "other",
        })
    }
}

/// What is known of the transaction so far. Absent facts are `None`; the
/// null sender `<>` is `Some("")`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Envelope {
    pub queue_id: Option<String>,
    pub client_addr: Option<IpAddr>,
    /// Postfix's verified client name (forward-confirmed), if any.
    pub client_name: Option<String>,
    /// The client's PTR name, not verified.
    pub reverse_client_name: Option<String>,
    pub helo: Option<String>,
    pub sender: Option<String>,
    pub recipient: Option<String>,
    /// Recipients accepted so far in this transaction.
    pub recipient_count: u32,
    pub sasl_username: Option<String>,
    /// Declared message size (MAIL FROM SIZE=), if any.
    pub size: Option<u64>,
}

/// Formats an optional fact for logs: `-` when absent, `<>` for an empty sender.
pub fn show(v: &Option<String>) -> &str {
    match v.as_deref() {
        None => "-",
        Some("") => "<>",
        Some(s) => s,
    }
}
