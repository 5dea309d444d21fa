//! Protocol glue: indymilter callbacks that translate milter stages into
//! calls on `Session` and verdicts back into milter replies.

use super::{
    ConnectionLimit, InFlight,
    session::{EndOfMessage, Session},
};
use crate::{
    engine::CurrentEngine,
    envelope::show,
    metrics::Metrics,
    verdict::{Reply, Verdict},
};
use indymilter::{
    Actions, Callbacks, Context, ContextActions, EomContext, MacroStage, Macros, NegotiateContext,
    ProtoOpts, SetErrorReply, SmtpReply, SocketInfo, Status,
};
use std::{
    ffi::{CStr, CString},
    net::IpAddr,
    sync::Arc,
    time::Instant,
};
use tracing::{Instrument, error, info_span, warn};

const FRONTEND: &str = "milter";

/// What mxguard asks of the MTA: header edits now, envelope rewriting for the
/// aliases and SRS. An MTA that cannot do all of it is refused at
/// negotiation rather than half-served.
pub const REQUIRED_ACTIONS: Actions = Actions::ADD_HEADER
    .union(Actions::CHANGE_HEADER)
    .union(Actions::CHANGE_SENDER)
    .union(Actions::ADD_RCPT)
    .union(Actions::ADD_RCPT_EXT)
    .union(Actions::DELETE_RCPT);

/// Stages whose callbacks always continue (refusals come at connect, RCPT
/// and end of message), so the MTA need not wait for their reply.
const QUIET_STAGES: ProtoOpts = ProtoOpts::NOREPLY_HELO
    .union(ProtoOpts::NOREPLY_MAIL)
    .union(ProtoOpts::NOREPLY_DATA)
    .union(ProtoOpts::NOREPLY_HEADER)
    .union(ProtoOpts::NOREPLY_EOH)
    .union(ProtoOpts::NOREPLY_BODY);

/// `Continue`, or `Noreply` where the MTA does not wait for an answer.
fn proceed(session: &Session, stage: ProtoOpts) -> Status {
    if session.noreply(stage) {
        Status::Noreply
    } else {
        Status::Continue
    }
}

pub fn make_callbacks(
    current: Arc<CurrentEngine>,
    metrics: Arc<Metrics>,
    in_flight: InFlight,
    limit: ConnectionLimit,
) -> Callbacks<Session> {
    let m_rcpt = metrics.clone();
    let m_connect = metrics.clone();
    let m_eom = metrics;
    Callbacks::new()
        .on_negotiate(move |cx, actions, opts| {
            let mut session = Session::new(current.get(), in_flight.clone());
            match limit.take() {
                Some(slot) => session.hold_connection_slot(slot),
                None => session.refuse_at_connect(limit.refusal()),
            }
            Box::pin(async move { negotiate(cx, session, actions, opts) })
        })
        .on_connect(move |cx, hostname, info| {
            let metrics = m_connect.clone();
            Box::pin(async move { connect(cx, hostname, info, &metrics).await })
        })
        .on_helo(|cx, name| Box::pin(async move { helo(cx, name) }))
        .on_mail(|cx, args| Box::pin(async move { mail(cx, args) }))
        .on_rcpt(move |cx, args| {
            let metrics = m_rcpt.clone();
            Box::pin(async move { rcpt(cx, args, &metrics).await })
        })
        .on_data(|cx| Box::pin(async move { with_queue_id(cx) }))
        .on_header(|cx, name, value| Box::pin(async move { header(cx, name, value) }))
        .on_eoh(|cx| Box::pin(async move { end_of_headers(cx) }))
        .on_body(|cx, chunk| Box::pin(async move { body(cx, chunk) }))
        .on_eom(move |cx| {
            let metrics = m_eom.clone();
            Box::pin(async move { eom(cx, &metrics).await })
        })
        .on_abort(|cx| Box::pin(async move { abort(cx) }))
}

fn negotiate(
    cx: &mut NegotiateContext<Session>,
    mut session: Session,
    actions: Actions,
    opts: ProtoOpts,
) -> Status {
    if !actions.contains(REQUIRED_ACTIONS) {
        error!(
            "milter: the MTA does not offer the actions {:?}; refusing the connection (use Postfix 2.6 or later with milter_protocol = 6)",
            REQUIRED_ACTIONS.difference(actions)
        );
        return Status::Reject;
    }
    cx.requested_actions = REQUIRED_ACTIONS;
    // Exact header bytes, for the DKIM verification that will need them.
    if opts.contains(ProtoOpts::LEADING_SPACE) {
        cx.requested_opts |= ProtoOpts::LEADING_SPACE;
        session.set_leading_space(true);
    }
    // Stages that never refuse need no reply: the MTA streams headers and
    // body without a round trip per line or chunk (measured: 2 KB messages
    // X → Y msg/s on the protocol driver).
    let quiet = QUIET_STAGES.intersection(opts);
    cx.requested_opts |= quiet;
    session.set_noreply(quiet);
    let macros: [(MacroStage, &CStr); 5] = [
        (
            MacroStage::Connect,
            c"j {client_addr} {client_name} {client_ptr} {daemon_name}",
        ),
        (MacroStage::Mail, c"i {auth_type} {auth_authen}"),
        (MacroStage::Rcpt, c"i"),
        (MacroStage::Data, c"i"),
        (MacroStage::Eom, c"i"),
    ];
    for (stage, names) in macros {
        cx.requested_macros.insert(stage, names.into());
    }
    cx.data = Some(session);
    Status::Continue
}

/// Every callback needs the session made at negotiation; without it the
/// only safe answer is a temporary failure.
macro_rules! session {
    ($cx:expr) => {
        match $cx.data.as_mut() {
            Some(s) => s,
            None => {
                error!("milter: no session state; answering tempfail");
                return Status::Tempfail;
            }
        }
    };
}

fn macro_string(macros: &Macros, name: &CStr) -> Option<String> {
    macros
        .get(name)
        .map(|v| v.to_string_lossy().into_owned())
        .filter(|v| !v.is_empty())
}

async fn connect(
    cx: &mut Context<Session>,
    hostname: CString,
    info: SocketInfo,
    metrics: &Metrics,
) -> Status {
    let addr: Option<IpAddr> = match info {
        SocketInfo::Inet(a) => Some(a.ip()),
        _ => macro_string(&cx.macros, c"{client_addr}").and_then(|a| a.parse().ok()),
    };
    let ptr = macro_string(&cx.macros, c"{client_ptr}");
    let session = session!(cx);
    if let Some(refusal) = session.over_limit() {
        metrics
            .connections_refused
            .with_label_values(&[FRONTEND])
            .inc();
        warn!("milter: session refused: milter.max_connections sessions already open");
        return answer(&mut cx.reply, refusal);
    }
    session.connect(&hostname.to_string_lossy(), addr, ptr.as_deref());
    let verdict = session.check_connection().await;
    if verdict.is_final() {
        metrics
            .requests
            .with_label_values(&[FRONTEND, verdict.label()])
            .inc();
    }
    answer(&mut cx.reply, &verdict)
}

fn helo(cx: &mut Context<Session>, name: CString) -> Status {
    let session = session!(cx);
    session.helo(&name.to_string_lossy());
    proceed(session, ProtoOpts::NOREPLY_HELO)
}

fn mail(cx: &mut Context<Session>, args: Vec<CString>) -> Status {
    let sender = args
        .first()
        .map(|a| a.to_string_lossy().into_owned())
        .unwrap_or_default();
    let auth = macro_string(&cx.macros, c"{auth_authen}");
    let queue_id = macro_string(&cx.macros, c"i");
    let session = session!(cx);
    session.mail(&sender, auth);
    session.set_queue_id(queue_id);
    proceed(session, ProtoOpts::NOREPLY_MAIL)
}

async fn rcpt(cx: &mut Context<Session>, args: Vec<CString>, metrics: &Metrics) -> Status {
    let rcpt = args
        .first()
        .map(|a| a.to_string_lossy().into_owned())
        .unwrap_or_default();
    let queue_id = macro_string(&cx.macros, c"i");
    let session = session!(cx);
    session.set_queue_id(queue_id);
    let span = span_for(session);
    let started = Instant::now();
    let verdict = session.rcpt(&rcpt).instrument(span).await;
    if session.engine().milter_runs_envelope_checks() {
        metrics
            .decision_seconds
            .with_label_values(&[FRONTEND])
            .observe(started.elapsed().as_secs_f64());
    }
    // A refused recipient is a request answered; accepted ones are counted
    // with their message at its end.
    if verdict.is_final() {
        metrics
            .requests
            .with_label_values(&[FRONTEND, verdict.label()])
            .inc();
    }
    answer(&mut cx.reply, &verdict)
}

fn header(cx: &mut Context<Session>, name: CString, value: CString) -> Status {
    let session = session!(cx);
    session.header(&name.to_string_lossy(), &value.to_string_lossy());
    proceed(session, ProtoOpts::NOREPLY_HEADER)
}

fn end_of_headers(cx: &mut Context<Session>) -> Status {
    let queue_id = macro_string(&cx.macros, c"i");
    let session = session!(cx);
    session.set_queue_id(queue_id);
    session.end_of_headers();
    proceed(session, ProtoOpts::NOREPLY_EOH)
}

fn body(cx: &mut Context<Session>, chunk: bytes::Bytes) -> Status {
    let session = session!(cx);
    session.body(&chunk);
    proceed(session, ProtoOpts::NOREPLY_BODY)
}

fn with_queue_id(cx: &mut Context<Session>) -> Status {
    let queue_id = macro_string(&cx.macros, c"i");
    let session = session!(cx);
    session.set_queue_id(queue_id);
    proceed(session, ProtoOpts::NOREPLY_DATA)
}

async fn eom(cx: &mut EomContext<Session>, metrics: &Metrics) -> Status {
    let queue_id = macro_string(&cx.macros, c"i");
    let session = session!(cx);
    session.set_queue_id(queue_id);
    let span = span_for(session);
    eom_in_span(cx, metrics).instrument(span).await
}

async fn eom_in_span(cx: &mut EomContext<Session>, metrics: &Metrics) -> Status {
    let session = session!(cx);
    let started = Instant::now();
    let outcome = session.end_of_message().await;
    session.reset_message();
    let leading_space = session.leading_space();
    if let Err(e) = apply(cx, &outcome, leading_space).await {
        // Postfix would be left with a half-changed message: tempfail it.
        error!("milter: {e}; answering tempfail");
        metrics
            .requests
            .with_label_values(&[FRONTEND, "tempfail"])
            .inc();
        return Status::Tempfail;
    }
    metrics
        .decision_seconds
        .with_label_values(&[FRONTEND])
        .observe(started.elapsed().as_secs_f64());
    let verdict = match &outcome.verdict {
        Verdict::Continue => Verdict::Accept,
        other => other.clone(),
    };
    metrics
        .requests
        .with_label_values(&[FRONTEND, verdict.label()])
        .inc();
    answer(&mut cx.reply, &verdict)
}

/// Carries out the end-of-message edits: headers, then recipients.
async fn apply(
    cx: &mut EomContext<Session>,
    outcome: &EndOfMessage,
    leading_space: bool,
) -> Result<(), String> {
    if !outcome.verdict.is_final() || outcome.verdict == Verdict::Accept {
        for (name, index) in &outcome.delete_headers {
            cx.actions
                .change_header(name.as_str(), *index, None::<CString>)
                .await
                .map_err(|e| format!("cannot delete the {name} header: {e}"))?;
        }
        for (name, index, value) in &outcome.change_headers {
            let value = if leading_space {
                format!(" {value}")
            } else {
                value.clone()
            };
            cx.actions
                .change_header(name.as_str(), *index, Some(value))
                .await
                .map_err(|e| format!("cannot change the {name} header: {e}"))?;
        }
        // Inserted at the top one by one: the last insert ends up first.
        for (name, value) in outcome.insert_headers.iter().rev() {
            // With LEADING_SPACE negotiated the MTA adds no space after the colon.
            let value = if leading_space {
                format!(" {value}")
            } else {
                value.clone()
            };
            cx.actions
                .insert_header(0, name.as_str(), value)
                .await
                .map_err(|e| format!("cannot add the {name} header: {e}"))?;
        }
        if let Some(sender) = &outcome.new_sender {
            cx.actions
                .change_sender(format!("<{sender}>"), None::<CString>)
                .await
                .map_err(|e| format!("cannot change the sender to {sender}: {e}"))?;
        }
        for rcpt in &outcome.delete_recipients {
            cx.actions
                .delete_recipient(format!("<{rcpt}>"))
                .await
                .map_err(|e| format!("cannot remove the recipient {rcpt}: {e}"))?;
        }
        for (rcpt, args) in &outcome.add_recipients {
            let rcpt = format!("<{rcpt}>");
            let done = match args {
                Some(a) => {
                    cx.actions
                        .add_recipient_ext(rcpt.as_str(), Some(a.as_str()))
                        .await
                }
                None => cx.actions.add_recipient(rcpt.as_str()).await,
            };
            done.map_err(|e| format!("cannot add the recipient {rcpt}: {e}"))?;
        }
    }
    Ok(())
}

fn abort(cx: &mut Context<Session>) -> Status {
    session!(cx).reset_message();
    Status::Continue
}

fn span_for(session: &Session) -> tracing::Span {
    let env = session.envelope();
    info_span!(
        "milter",
        queue_id = show(&env.queue_id),
        client = %env.client_addr.map_or_else(|| "-".to_owned(), |ip| ip.to_string()),
    )
}

/// A verdict as a milter status, with the custom reply for refusals.
fn answer(reply: &mut SmtpReply, verdict: &Verdict) -> Status {
    match verdict {
        Verdict::Continue => Status::Continue,
        Verdict::Accept => Status::Accept,
        Verdict::Discard => Status::Discard,
        Verdict::Tempfail(r) => with_reply(reply, r, Status::Tempfail),
        Verdict::Reject(r) => with_reply(reply, r, Status::Reject),
    }
}

fn with_reply(reply: &mut SmtpReply, r: &Reply, status: Status) -> Status {
    let code = r.code.to_string();
    if let Err(e) = reply.set_error_reply(&code, Some(r.status), [r.text.as_str()]) {
        // Postfix's generic reply is still a refusal of the right class.
        warn!("milter: cannot set the reply `{r}`: {e}");
    }
    status
}
