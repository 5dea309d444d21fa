//! The mail logic of one milter connection (one SMTP session in Postfix):
//! what was learnt so far, and what each stage decides. Free of protocol
//! details, which stay in `callbacks.rs`.

use super::InFlightGuard;
use crate::{
    aliases::{
        Destination, Outcome,
        rewrite::{self, Plan, Recipient},
    },
    engine::Engine,
    envelope::{Envelope, Stage, show},
    metrics::SessionGuard,
    verdict::{Reply, Verdict},
};
use std::{net::IpAddr, sync::Arc};
use tracing::info;

pub struct Session {
    engine: Arc<Engine>,
    envelope: Envelope,
    recipients: Vec<Recipient>,
    /// The message's headers as received, up to `content.max_header_size`.
    headers: Vec<(String, String)>,
    /// Bytes of the whole header section, also past the limit (which the
    /// end of the message then refuses).
    header_bytes: u64,
    /// The whole message, kept in memory only while some recipient is
    /// forwarded to a webhook; `None` once over `webhooks.max_message_size`.
    raw: Option<Vec<u8>>,
    raw_wanted: bool,
    raw_too_big: bool,
    /// Where the body starts in `raw`.
    body_start: usize,
    /// Held from MAIL FROM to the end or abort of the message, so a stopping
    /// daemon can wait for messages in flight.
    message: Option<InFlightGuard>,
    in_flight: super::InFlight,
    /// Header values are exchanged with their leading space (exact bytes).
    leading_space: bool,
    /// Stages the MTA agreed not to wait for a reply to.
    noreply: indymilter::ProtoOpts,
    /// Bytes of the message so far (headers and body, as the milter sees them).
    size: u64,
    /// This connection, counted against its client while the session lives.
    _slot: Option<crate::checks::ratelimit::Slot>,
    /// This session's place under `milter.max_connections`, or the refusal
    /// it gets at connect when there was none.
    _connection_slot: Option<tokio::sync::OwnedSemaphorePermit>,
    over_limit: Option<Verdict>,
    _counted: SessionGuard,
}

/// What the end of a message brings: the edits to make, and the verdict
/// for the message.
#[derive(Default)]
pub struct EndOfMessage {
    pub insert_headers: Vec<(String, String)>,
    /// Existing headers to delete (name, 1-based index), in this order.
    pub delete_headers: Vec<(String, i32)>,
    pub delete_recipients: Vec<String>,
    /// Recipients to add, with their ESMTP arguments (`NOTIFY=NEVER`).
    pub add_recipients: Vec<(String, Option<String>)>,
    /// The SRS envelope sender of a forwarded message.
    pub new_sender: Option<String>,
    /// Existing headers to replace: name, 1-based index, new value.
    pub change_headers: Vec<(String, i32, String)>,
    pub verdict: Verdict,
}

impl Session {
    pub fn new(engine: Arc<Engine>, in_flight: super::InFlight) -> Self {
        let counted = SessionGuard::new(engine.metrics(), "milter");
        Self {
            engine,
            envelope: Envelope::default(),
            recipients: Vec::new(),
            headers: Vec::new(),
            header_bytes: 0,
            raw: None,
            raw_wanted: false,
            raw_too_big: false,
            body_start: 0,
            message: None,
            in_flight,
            leading_space: false,
            noreply: indymilter::ProtoOpts::empty(),
            size: 0,
            _slot: None,
            _connection_slot: None,
            over_limit: None,
            _counted: counted,
        }
    }

    /// Holds the session's slot under `milter.max_connections`.
    pub fn hold_connection_slot(&mut self, slot: tokio::sync::OwnedSemaphorePermit) {
        self._connection_slot = Some(slot);
    }

    /// The session got no slot: it is refused with `refusal` at connect.
    pub fn refuse_at_connect(&mut self, refusal: Verdict) {
        self.over_limit = Some(refusal);
    }

    /// The refusal of a session past `milter.max_connections`.
    pub fn over_limit(&self) -> Option<&Verdict> {
        self.over_limit.as_ref()
    }

    pub fn set_leading_space(&mut self, on: bool) {
        self.leading_space = on;
    }

    pub fn leading_space(&self) -> bool {
        self.leading_space
    }

    pub fn set_noreply(&mut self, stages: indymilter::ProtoOpts) {
        self.noreply = stages;
    }

    /// `true` when the MTA does not wait for an answer at this stage
    /// (`stage` is one `NOREPLY_*` option).
    pub fn noreply(&self, stage: indymilter::ProtoOpts) -> bool {
        self.noreply.contains(stage)
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
    /// without the policy front end; the alias resolution always does, as
    /// the end of the message rewrites with it (and a recipient that
    /// resolves to nothing is never accepted).
    pub async fn rcpt(&mut self, rcpt: &str) -> Verdict {
        let rcpt = strip_brackets(rcpt).to_owned();
        let mut env = self.envelope.clone();
        env.recipient = Some(rcpt.clone());
        env.recipient_count = u32::try_from(self.recipients.len()).unwrap_or(u32::MAX);
        // Mail Postfix makes itself (bounces, through non_smtpd_milters) has
        // no client: the envelope checks are for SMTP clients.
        let runs_checks =
            self.engine.milter_runs_envelope_checks() && self.envelope.client_addr.is_some();
        if runs_checks {
            let decision = self.engine.envelope(Stage::Rcpt, &env).await;
            if decision.verdict.is_final() {
                return decision.verdict;
            }
        }
        // A recipient at the SRS domain: the reverse path.
        if let Some(reversed) = self.engine.srs_reverse(&rcpt) {
            let enforce = self.engine.config().mode == crate::config::Mode::Enforce;
            match reversed {
                Ok(original) => {
                    if self.envelope.sender.as_deref() == Some("") {
                        // A bounce: its report is read at the end.
                        self.raw_wanted = true;
                    }
                    let reason = format!("SRS address of {original}");
                    self.recipients.push(Recipient {
                        address: rcpt.clone(),
                        resolved: Some(crate::aliases::Resolved {
                            address: rcpt,
                            outcome: Outcome::Forward {
                                destinations: vec![Destination::Address(original)],
                                port: None,
                            },
                            reason,
                            looped: false,
                        }),
                        srs: true,
                    });
                    return Verdict::Continue;
                }
                Err(e) => {
                    if !runs_checks
                        && enforce
                        && let Some(d) = self.engine.srs_decision(Stage::Rcpt, &env).await
                        && d.verdict.is_final()
                    {
                        return d.verdict;
                    }
                    if e != crate::srs::SrsError::NotSrs {
                        self.recipients.push(Recipient {
                            address: rcpt,
                            resolved: None,
                            srs: false,
                        });
                        return Verdict::Continue;
                    }
                }
            }
        }
        let resolved = if runs_checks {
            if self.engine.aliases().is_empty() {
                None
            } else {
                Some(self.engine.resolve_alias(&rcpt).await)
            }
        } else if self.engine.aliases().is_empty() {
            None
        } else {
            // The policy service decided (and counted) this recipient; a
            // refusal here means Postfix is not wired to it, and is then
            // made, logged and counted here (unless only reported).
            let resolved = self.engine.resolve_alias(&rcpt).await;
            if resolved.verdict().is_final()
                && self.engine.config().mode == crate::config::Mode::Enforce
                && let Some((decision, _)) = self.engine.alias_decision(Stage::Rcpt, &env).await
                && decision.verdict.is_final()
            {
                return decision.verdict;
            }
            Some(resolved)
        };
        // A refusal that report mode let through: the recipient is left as
        // it is, not rewritten.
        let resolved = resolved.filter(|r| !r.verdict().is_final());
        if let Some(r) = &resolved
            && let Outcome::Forward { destinations, .. } = &r.outcome
            && destinations
                .iter()
                .any(|d| matches!(d, Destination::Webhook(_)))
        {
            self.raw_wanted = true;
        }
        self.recipients.push(Recipient {
            address: rcpt,
            resolved,
            srs: false,
        });
        Verdict::Continue
    }

    /// One header as the milter received it.
    pub fn header(&mut self, name: &str, value: &str) {
        let line = name.len() + value.len() + 4;
        self.add_size(line);
        let stripped = if self.leading_space {
            value.strip_prefix(' ').unwrap_or(value)
        } else {
            value
        };
        self.header_bytes = self
            .header_bytes
            .saturating_add(u64::try_from(line).unwrap_or(u64::MAX));
        // Past the limit nothing more is kept: the message is refused at
        // its end, so no decision is made on a part of its headers.
        let max = self.engine.config().content.max_header_size.0;
        if max == 0 || self.header_bytes <= max {
            self.headers.push((name.to_owned(), stripped.to_owned()));
        }
        // The exact header line for DKIM: with LEADING_SPACE the value
        // keeps its own leading white space; folded lines get CRLF.
        let text = if self.leading_space {
            format!("{name}:{value}")
        } else {
            format!("{name}: {value}")
        };
        self.raw_push(crlf(&text).as_bytes());
        self.raw_push(b"\r\n");
    }

    pub fn end_of_headers(&mut self) {
        self.raw_push(b"\r\n");
        self.body_start = self.raw.as_ref().map_or(0, Vec::len);
    }

    pub fn body(&mut self, chunk: &[u8]) {
        self.add_size(chunk.len());
        self.raw_push(chunk);
    }

    /// Keeps the message in memory (for DKIM, content rules, webhooks and
    /// ARC) up to the configured size; past it, nothing more is kept and
    /// the message is refused at its end.
    fn raw_push(&mut self, bytes: &[u8]) {
        if self.raw_too_big {
            return;
        }
        let max = self.engine.max_buffered_message();
        let raw = self.raw.get_or_insert_with(Vec::new);
        if max > 0 && (raw.len() + bytes.len()) as u64 > max {
            self.raw = None;
            self.raw_too_big = true;
            return;
        }
        raw.extend_from_slice(bytes);
    }

    /// Counts bytes of the message (a header, a body chunk).
    pub fn add_size(&mut self, bytes: usize) {
        self.size = self
            .size
            .saturating_add(u64::try_from(bytes).unwrap_or(u64::MAX));
    }

    pub async fn end_of_message(&mut self) -> EndOfMessage {
        let decision = self.engine.end_of_message(&self.envelope, self.size).await;
        let addresses = self
            .recipients
            .iter()
            .map(|r| r.address.as_str())
            .collect::<Vec<_>>()
            .join(",");
        if decision.verdict.is_final() {
            info!(
                queue_id = show(&self.envelope.queue_id),
                client = %self.envelope.client_addr.map_or_else(|| "-".to_owned(), |ip| ip.to_string()),
                sender = show(&self.envelope.sender),
                recipients = %addresses,
                verdict = decision.verdict.label(),
                check = decision.check,
                "message refused"
            );
            return EndOfMessage {
                verdict: decision.verdict,
                ..EndOfMessage::default()
            };
        }
        let engine = self.engine.clone();
        let raw = self.raw.take().unwrap_or_default();
        let content = engine
            .content_decision(
                &self.envelope,
                &self.headers,
                self.header_bytes,
                self.size,
                &raw,
            )
            .await;
        if content.verdict.is_final() {
            return EndOfMessage {
                verdict: content.verdict,
                ..EndOfMessage::default()
            };
        }
        let auth = engine.authenticate(&self.envelope, &raw).await;
        if let Some((d, _)) = &auth
            && d.verdict.is_final()
        {
            return EndOfMessage {
                verdict: d.verdict.clone(),
                ..EndOfMessage::default()
            };
        }
        self.raw = Some(raw);
        // Bounces on the SRS reverse path that must not be relayed are
        // accepted and dropped.
        if self.envelope.sender.as_deref() == Some("") && self.recipients.iter().any(|r| r.srs) {
            let raw = self.raw.clone().unwrap_or_default();
            for i in 0..self.recipients.len() {
                let original = match &self.recipients[i] {
                    Recipient {
                        srs: true,
                        resolved: Some(r),
                        ..
                    } => match &r.outcome {
                        Outcome::Forward { destinations, .. } => {
                            destinations.first().map(ToString::to_string)
                        }
                        _ => None,
                    },
                    _ => None,
                };
                let Some(original) = original else { continue };
                if self
                    .engine
                    .bounce_suppressed(&self.envelope, &raw, &original)
                    .await
                    .is_some()
                    && let Some(r) = self.recipients[i].resolved.as_mut()
                {
                    r.outcome = Outcome::Discard;
                }
            }
        }
        let plan = rewrite::plan(
            &self.recipients,
            &self.envelope,
            &self.headers,
            self.engine.hostname(),
        );
        let mut eom = EndOfMessage::default();
        if let Some(v) = plan.refuse.clone() {
            eom.verdict = v;
            self.log_forwarding(&plan, &eom.verdict);
            return eom;
        }
        if !plan.webhooks.is_empty() {
            let posted = match (self.raw.as_deref(), self.raw_too_big) {
                (Some(raw), false) => {
                    self.engine
                        .post_webhooks(&plan, &self.envelope, &self.headers, raw)
                        .await
                }
                _ => Verdict::Reject(Reply::new(
                    552,
                    "5.3.4",
                    "Message too big to be delivered to a webhook",
                )),
            };
            if posted.is_final() {
                self.log_forwarding(&plan, &posted);
                eom.verdict = posted;
                return eom;
            }
        }
        for (address, port) in &plan.routes {
            if let Err(e) = self.engine.record_route(address, *port).await {
                // Without the route the copy would go out on port 25.
                eom.verdict = self.engine.store_failed(crate::engine::ALIASES, &e);
                if eom.verdict.is_final() {
                    return eom;
                }
            }
        }
        if plan.nothing_left {
            eom.verdict = Verdict::Discard;
            self.log_forwarding(&plan, &eom.verdict);
            return eom;
        }
        if self.engine.config().milter.trace_header {
            eom.insert_headers.push((
                "X-Mxguard".to_owned(),
                format!("{} {}", self.engine.hostname(), crate::VERSION),
            ));
        }
        eom.insert_headers
            .extend(plan.insert_headers.iter().cloned());
        eom.delete_headers = plan.delete_headers.clone();
        if let Some((_, findings)) = &auth {
            // Authentication-Results claiming to be ours are forged: they go,
            // and ours comes first.
            let id = engine.authserv_id();
            let ours: Vec<usize> = self
                .headers
                .iter()
                .filter(|(n, _)| n.eq_ignore_ascii_case("authentication-results"))
                .enumerate()
                .filter(|(_, (_, v))| {
                    v.split(';')
                        .next()
                        .is_some_and(|a| a.trim().eq_ignore_ascii_case(id))
                })
                .map(|(i, _)| i + 1)
                .collect();
            for i in ours.into_iter().rev() {
                eom.delete_headers.push((
                    "Authentication-Results".to_owned(),
                    i32::try_from(i).unwrap_or(i32::MAX),
                ));
            }
            eom.insert_headers.insert(
                0,
                ("Authentication-Results".to_owned(), findings.header.clone()),
            );
            if plan.forwarded
                && let Some((from, original)) = engine.friendly_from(findings, &self.headers)
            {
                info!(
                    queue_id = show(&self.envelope.queue_id),
                    from = %original,
                    "friendly-from: From rewritten, the original From's DMARC policy would fail at the target"
                );
                eom.change_headers.push(("From".to_owned(), 1, from));
                eom.insert_headers
                    .push(("X-Original-From".to_owned(), rewrite::clean(&original)));
                if !self
                    .headers
                    .iter()
                    .any(|(n, _)| n.eq_ignore_ascii_case("reply-to"))
                {
                    eom.insert_headers
                        .push(("Reply-To".to_owned(), rewrite::clean(&original)));
                }
            }
        }
        eom.delete_recipients = plan.delete.clone();
        if let Some(sender) = self.envelope.sender.as_deref()
            && !plan.forwarded_to.is_empty()
        {
            eom.new_sender = self.engine.srs_sender(sender, &plan.forwarded_to);
        }
        let args = plan.no_bounce.map(|_| "NOTIFY=NEVER".to_owned());
        eom.add_recipients = plan.add.iter().map(|a| (a.clone(), args.clone())).collect();
        // Whatever went into them (envelope, macros, the message's own
        // headers), the headers written stay headers: sealed as sent.
        fit_headers(&mut eom);
        // ARC seal over the message as it will leave.
        if plan.forwarded
            && let Some((_, findings)) = &auth
            && let Some(results) = findings.results.as_ref()
        {
            let body = self
                .raw
                .as_deref()
                .and_then(|r| r.get(self.body_start..))
                .unwrap_or_default();
            let message = final_message(&eom, &self.headers, body);
            match engine.arc_seal(&message, results).await {
                Some(Ok(set)) => {
                    let mut headers: Vec<(String, String)> = set
                        .into_iter()
                        .map(|(n, v)| {
                            let v = fit_header(&n, &v);
                            (n, v)
                        })
                        .collect();
                    headers.append(&mut eom.insert_headers);
                    eom.insert_headers = headers;
                }
                Some(Err(e)) => {
                    tracing::warn!(
                        queue_id = show(&self.envelope.queue_id),
                        "forwarded without an ARC seal: {e}"
                    );
                }
                None => {}
            }
        }
        self.log_forwarding(&plan, &Verdict::Accept);
        info!(
            queue_id = show(&self.envelope.queue_id),
            client = %self.envelope.client_addr.map_or_else(|| "-".to_owned(), |ip| ip.to_string()),
            sender = show(&self.envelope.sender),
            recipients = %addresses,
            verdict = "accept",
            "message checked"
        );
        eom
    }

    fn log_forwarding(&self, plan: &Plan, verdict: &Verdict) {
        if !plan.forwarded && plan.delete.is_empty() {
            return;
        }
        info!(
            queue_id = show(&self.envelope.queue_id),
            client = %self.envelope.client_addr.map_or_else(|| "-".to_owned(), |ip| ip.to_string()),
            sender = show(&self.envelope.sender),
            removed = %plan.delete.join(","),
            added = %plan.add.join(","),
            webhooks = plan.webhooks.len(),
            no_bounce = plan.no_bounce.unwrap_or("-"),
            verdict = verdict.label(),
            reply = %verdict.reply().map(ToString::to_string).unwrap_or_default(),
            "forwarding"
        );
    }

    /// The message ended (accepted, refused or aborted): forget it.
    pub fn reset_message(&mut self) {
        self.envelope.sender = None;
        self.envelope.queue_id = None;
        self.envelope.recipient = None;
        self.envelope.sasl_username = None;
        self.recipients.clear();
        self.headers.clear();
        self.header_bytes = 0;
        self.raw = None;
        self.raw_wanted = false;
        self.raw_too_big = false;
        self.body_start = 0;
        self.size = 0;
        self.message = None;
    }
}

/// The message as it will leave mxguard: the inserted headers on top, the
/// received ones with the deletions and changes made, then the body.
fn final_message(eom: &EndOfMessage, headers: &[(String, String)], body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 4096);
    for (n, v) in &eom.insert_headers {
        out.extend_from_slice(crlf(&format!("{n}: {v}\r\n")).as_bytes());
    }
    let mut seen: std::collections::HashMap<String, i32> = std::collections::HashMap::new();
    for (n, v) in headers {
        let count = seen.entry(n.to_ascii_lowercase()).or_insert(0);
        *count += 1;
        let index = *count;
        if eom
            .delete_headers
            .iter()
            .any(|(d, i)| d.eq_ignore_ascii_case(n) && *i == index)
        {
            continue;
        }
        let value = eom
            .change_headers
            .iter()
            .find(|(c, i, _)| c.eq_ignore_ascii_case(n) && *i == index)
            .map_or(v.as_str(), |(_, _, new)| new.as_str());
        out.extend_from_slice(crlf(&format!("{n}: {value}\r\n")).as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

/// Longest line of a header mxguard writes (RFC 5322 allows 998 octets).
const MAX_WRITTEN_LINE: usize = 900;

fn fit_headers(eom: &mut EndOfMessage) {
    for (n, v) in &mut eom.insert_headers {
        *v = fit_header(n, v);
    }
    for (n, _, v) in &mut eom.change_headers {
        *v = fit_header(n, v);
    }
}

/// A header value mxguard writes, safe whatever it was built from: no NUL
/// or other control character, no line end that is not folding (LF then a
/// space or tab, as Postfix takes folded values), no line left empty, and
/// no line over [`MAX_WRITTEN_LINE`] (folded at white space where there is
/// some, else cut with a tab: a long token of a hostile input is split
/// rather than sent as a line a relay would break or refuse).
fn fit_header(name: &str, value: &str) -> String {
    let mut flat = String::with_capacity(value.len());
    let mut chars = value.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' | '\n' => {
                if c == '\r' && chars.peek() == Some(&'\n') {
                    chars.next();
                }
                if matches!(chars.peek(), Some(' ' | '\t')) {
                    flat.push('\n');
                } else {
                    flat.push(' ');
                }
            }
            '\t' => flat.push('\t'),
            c if c.is_control() => {}
            c => flat.push(c),
        }
    }
    let mut out = String::with_capacity(flat.len() + 16);
    let mut budget = MAX_WRITTEN_LINE.saturating_sub(name.len() + 2).max(1);
    for (i, line) in flat.split('\n').enumerate() {
        if i > 0 && line.trim().is_empty() {
            continue;
        }
        let mut rest = line;
        if i > 0 {
            out.push('\n');
        }
        while rest.len() > budget {
            let mut cut = budget;
            while !rest.is_char_boundary(cut) {
                cut -= 1;
            }
            // The last white space after some text, else a hard cut.
            match rest[..cut]
                .rfind([' ', '\t'])
                .filter(|&at| !rest[..at].trim().is_empty())
            {
                Some(at) => {
                    out.push_str(&rest[..at]);
                    out.push('\n');
                    rest = &rest[at..];
                    budget = MAX_WRITTEN_LINE;
                }
                None => {
                    out.push_str(&rest[..cut]);
                    out.push_str("\n\t");
                    rest = &rest[cut..];
                    // The tab that starts the next line counts.
                    budget = MAX_WRITTEN_LINE - 1;
                }
            }
        }
        out.push_str(rest);
        budget = MAX_WRITTEN_LINE;
    }
    out.truncate(out.trim_end().len());
    out
}

/// Lone LF (how Postfix passes folded header lines) as CRLF.
fn crlf(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    let mut prev = '\0';
    for c in s.chars() {
        if c == '\n' && prev != '\r' {
            out.push('\r');
        }
        out.push(c);
        prev = c;
    }
    out
}

/// `<a@b>` → `a@b`; Postfix passes MAIL and RCPT arguments with brackets.
fn strip_brackets(s: &str) -> &str {
    s.strip_prefix('<')
        .and_then(|s| s.strip_suffix('>'))
        .unwrap_or(s)
}

#[cfg(test)]
mod tests {
    use super::{MAX_WRITTEN_LINE, fit_header, strip_brackets};

    #[test]
    fn written_headers_cannot_be_broken_out_of() {
        for evil in [
            "a\r\nX-Evil: 1",
            "a\nX-Evil: 1",
            "a\rX-Evil: 1",
            "a\0X-Evil: 1",
            "a\r\n\r\nX-Evil: 1",
            "a\n\nBcc: x@example.net",
        ] {
            let v = fit_header("X-Original-To", evil);
            assert!(!v.contains(['\r', '\n', '\0']), "{evil:?} gave {v:?}");
        }
        // Folding stays folding; a line of white space alone goes.
        assert_eq!(fit_header("A", "a\r\n b"), "a\n b");
        assert_eq!(fit_header("A", "a\n\tb"), "a\n\tb");
        assert_eq!(fit_header("A", "a\r\n \r\n b\r\n "), "a\n b");
        assert_eq!(fit_header("A", "a\r\n X-Evil: 1"), "a\n X-Evil: 1");
    }

    #[test]
    fn written_headers_are_folded_under_the_line_limit() {
        let words = "word ".repeat(1000);
        let v = fit_header("X-Mxguard-Sender", &words);
        assert_eq!(v.replace("\n", ""), words.trim_end());
        let token = "é".repeat(5000);
        let v = fit_header("Authentication-Results", &token);
        assert_eq!(v.replace("\n\t", ""), token);
        for v in [fit_header("X-Mxguard-Sender", &words), v] {
            let lines: Vec<&str> = v.split('\n').collect();
            assert!(lines.len() > 1);
            assert!(
                lines.iter().all(|l| l.len() <= MAX_WRITTEN_LINE),
                "{lines:?}"
            );
            assert!(lines[1..].iter().all(|l| l.starts_with([' ', '\t'])));
        }
    }

    #[test]
    fn brackets() {
        assert_eq!(strip_brackets("<a@b>"), "a@b");
        assert_eq!(strip_brackets("<>"), "");
        assert_eq!(strip_brackets("a@b"), "a@b");
        assert_eq!(strip_brackets("<a@b"), "<a@b");
    }
}
