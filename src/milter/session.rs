//! The mail logic of one milter connection (one SMTP session in Postfix):
//! what was learnt so far, and what each stage decides. Free of protocol
//! details, which stay in `callbacks.rs`.

use super::InFlightGuard;
use crate::{
    engine::Engine,
    envelope::{Envelope, Stage, show},
    metrics::SessionGuard,
    verdict::Verdict,
};
use std::{net::IpAddr, sync::Arc};
use tracing::info;

pub struct Session {
    engine: Arc<Engine>,
    envelope: Envelope,
    recipients: Vec<String>,
    /// Held from MAIL FROM to the end or abort of the message, so a stopping
    /// daemon can wait for messages in flight.
    message: Option<InFlightGuard>,
    in_flight: super::InFlight,
    /// Header values are exchanged with their leading space (exact bytes).
    leading_space: bool,
    /// Bytes of the message so far (headers and body, as the milter sees them).
    size: u64,
    /// This connection, counted against its client while the session lives.
    _slot: Option<crate::checks::ratelimit::Slot>,
    _counted: SessionGuard,
}

/// What the end of a message brings: headers to insert at the top, and the
/// verdict for the message.
pub struct EndOfMessage {
    pub insert_headers: Vec<(String, String)>,
    pub verdict: Verdict,
}

impl Session {
    pub fn new(engine: Arc<Engine>, in_flight: super::InFlight) -> Self {
        let counted = SessionGuard::new(engine.metrics(), "milter");
        Self {
            engine,
            envelope: Envelope::default(),
            recipients: Vec::new(),
            message: None,
            in_flight,
            leading_space: false,
            size: 0,
            _slot: None,
            _counted: counted,
        }
    }

    pub fn set_leading_space(&mut self, on: bool) {
        self.leading_space = on;
    }

    pub fn leading_space(&self) -> bool {
        self.leading_space
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn envelope(&self) -> &Envelope {
        &self.envelope
    }

    /// `hostname` is Postfix's verified client name, or `unknown` / `[ip]`
    /// when it has none; `ptr` is the unverified PTR name, if known.
    pub fn connect(&mut self, hostname: &str, addr: Option<IpAddr>, ptr: Option<&str>) {
        let name = (!hostname.is_empty()
            && !hostname.starts_with('[')
            && !hostname.eq_ignore_ascii_case("unknown"))
        .then(|| hostname.to_owned());
        self.envelope = Envelope {
            client_addr: addr,
            client_name: name,
            reverse_client_name: ptr
                .filter(|p| !p.eq_ignore_ascii_case("unknown"))
                .map(str::to_owned),
            ..Envelope::default()
        };
    }

    /// The connect-stage checks, once the client is known.
    pub async fn check_connection(&mut self) -> Verdict {
        let (decision, slot) = self.engine.connect(&self.envelope).await;
        self._slot = slot;
        decision.verdict
    }

    pub fn helo(&mut self, name: &str) {
        self.envelope.helo = Some(name.to_owned());
    }

    /// Starts a message: forgets the previous one's sender and recipients.
    pub fn mail(&mut self, sender: &str, sasl_username: Option<String>) {
        self.reset_message();
        self.envelope.sender = Some(strip_brackets(sender).to_owned());
        self.envelope.sasl_username = sasl_username;
        self.message = Some(self.in_flight.enter());
    }

    pub fn set_queue_id(&mut self, id: Option<String>) {
        if id.is_some() {
            self.envelope.queue_id = id;
        }
    }

    /// Decides one recipient. The envelope checks run here only for sites
    /// without the policy front end.
    pub async fn rcpt(&mut self, rcpt: &str) -> Verdict {
        let rcpt = strip_brackets(rcpt).to_owned();
        if self.engine.milter_runs_envelope_checks() {
            let mut env = self.envelope.clone();
            env.recipient = Some(rcpt.clone());
            env.recipient_count = u32::try_from(self.recipients.len()).unwrap_or(u32::MAX);
            let decision = self.engine.envelope(Stage::Rcpt, &env).await;
            if decision.verdict.is_final() {
                return decision.verdict;
            }
        }
        self.recipients.push(rcpt);
        Verdict::Continue
    }

    /// Counts bytes of the message (a header, a body chunk).
    pub fn add_size(&mut self, bytes: usize) {
        self.size = self
            .size
            .saturating_add(u64::try_from(bytes).unwrap_or(u64::MAX));
    }

    pub async fn end_of_message(&mut self) -> EndOfMessage {
        let decision = self.engine.end_of_message(&self.envelope, self.size).await;
        if decision.verdict.is_final() {
            info!(
                queue_id = show(&self.envelope.queue_id),
                client = %self.envelope.client_addr.map_or_else(|| "-".to_owned(), |ip| ip.to_string()),
                sender = show(&self.envelope.sender),
                recipients = %self.recipients.join(","),
                verdict = decision.verdict.label(),
                check = decision.check,
                "message refused"
            );
            return EndOfMessage {
                insert_headers: Vec::new(),
                verdict: decision.verdict,
            };
        }
        let mut insert_headers = Vec::new();
        if self.engine.config().milter.trace_header {
            insert_headers.push((
                "X-Mxguard".to_owned(),
                format!("{} {}", self.engine.hostname(), crate::VERSION),
            ));
        }
        let verdict = Verdict::Continue;
        info!(
            queue_id = show(&self.envelope.queue_id),
            client = %self.envelope.client_addr.map_or_else(|| "-".to_owned(), |ip| ip.to_string()),
            sender = show(&self.envelope.sender),
            recipients = %self.recipients.join(","),
            verdict = "accept",
            "message checked"
        );
        EndOfMessage {
            insert_headers,
            verdict,
        }
    }

    /// The message ended (accepted, refused or aborted): forget it.
    pub fn reset_message(&mut self) {
        self.envelope.sender = None;
        self.envelope.queue_id = None;
        self.envelope.recipient = None;
        self.envelope.sasl_username = None;
        self.recipients.clear();
        self.size = 0;
        self.message = None;
    }
}

/// `<a@b>` → `a@b`; Postfix passes MAIL and RCPT arguments with brackets.
fn strip_brackets(s: &str) -> &str {
    s.strip_prefix('<')
        .and_then(|s| s.strip_suffix('>'))
        .unwrap_or(s)
}

#[cfg(test)]
mod tests {
    use super::strip_brackets;

    #[test]
    fn brackets() {
        assert_eq!(strip_brackets("<a@b>"), "a@b");
        assert_eq!(strip_brackets("<>"), "");
        assert_eq!(strip_brackets("a@b"), "a@b");
        assert_eq!(strip_brackets("<a@b"), "<a@b");
    }
}
