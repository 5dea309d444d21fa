//! The policy front end's connections: many requests on each, bounded lines,
//! an idle timeout, and a clean stop between requests.

use super::protocol::{Decoder, ProtocolError, encode};
use crate::{
    engine::CurrentEngine,
    envelope::{Stage, show},
    metrics::{Metrics, SessionGuard},
    net::{Listener, Stream},
};
use std::{sync::Arc, time::Instant};
use tokio::{
    io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader},
    sync::{Semaphore, watch},
    task::JoinSet,
    time::timeout,
};
use tracing::{Instrument, debug, info_span, warn};

const FRONTEND: &str = "policy";

/// Accepts connections until `stop` turns true, then waits for the open
/// connections to finish the request they are in and close.
pub async fn serve(
    listener: Listener,
    current: Arc<CurrentEngine>,
    metrics: Arc<Metrics>,
    stop: watch::Receiver<bool>,
) {
    let limit = Arc::new(Semaphore::new(
        current.get().config().policy.max_connections,
    ));
    let mut connections = JoinSet::new();
    let mut stop_wait = stop.clone();
    loop {
        tokio::select! {
            _ = crate::net::stopping(&mut stop_wait) => break,
            accepted = listener.accept() => match accepted {
                Ok(stream) => {
                    let Ok(permit) = limit.clone().try_acquire_owned() else {
                        metrics.connections_refused.with_label_values(&[FRONTEND]).inc();
                        warn!("policy: connection refused: {} connections already open", limit_of(&current));
                        continue;
                    };
                    let (current, metrics, stop) = (current.clone(), metrics.clone(), stop.clone());
                    connections.spawn(async move {
                        handle(stream, current, metrics, stop).await;
                        drop(permit);
                    });
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off briefly
                    // rather than spin.
                    warn!("policy: accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

fn limit_of(current: &CurrentEngine) -> usize {
    current.get().config().policy.max_connections
}

/// The message transaction a connection is in, and the recipients mxguard
/// accepted in it so far.
#[derive(Default)]
struct Transaction {
    instance: String,
    recipients: u32,
}

impl Transaction {
    fn enter(&mut self, instance: &str) {
        if instance != self.instance {
            self.instance = instance.to_owned();
            self.recipients = 0;
        }
    }
}

enum Line {
    Complete,
    Eof,
    TooLong,
}

/// Reads up to `\n` into `buf` (not included), never holding more than `max`
/// bytes. Cancel-safe: bytes already taken from the reader are in `buf`.
async fn read_line<R: AsyncBufRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<Line> {
    loop {
        let avail = r.fill_buf().await?;
        if avail.is_empty() {
            return Ok(Line::Eof);
        }
        let (take, done) = match avail.iter().position(|&b| b == b'\n') {
            Some(i) => (i, true),
            None => (avail.len(), false),
        };
        if buf.len() + take > max {
            return Ok(Line::TooLong);
        }
        buf.extend_from_slice(&avail[..take]);
        r.consume(if done { take + 1 } else { take });
        if done {
            return Ok(Line::Complete);
        }
    }
}

async fn handle(
    stream: Stream,
    current: Arc<CurrentEngine>,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    let _session = SessionGuard::new(&metrics, FRONTEND);
    let (max_line, max_attributes, idle) = {
        let engine = current.get();
        let p = &engine.config().policy;
        (p.max_line_length, p.max_attributes, p.idle_timeout.get())
    };
    let (reader, mut writer) = tokio::io::split(stream);
    let mut reader = BufReader::with_capacity(8192, reader);
    let mut decoder = Decoder::new(max_attributes);
    let mut line = Vec::with_capacity(256);
    let mut stopping = *stop.borrow();
    // Postfix sends recipient_count only at DATA and END-OF-MESSAGE, so the
    // recipients of the transaction in progress (its `instance`) are counted
    // here: one smtpd sends a whole transaction over its one connection.
    let mut transaction = Transaction::default();
    loop {
        let between_requests = decoder.is_idle() && line.is_empty();
        if stopping && between_requests {
            debug!("policy: closing a connection: mxguard is stopping");
            return;
        }
        let read = timeout(idle, read_line(&mut reader, &mut line, max_line));
        let outcome = if between_requests {
            tokio::select! {
                r = read => r,
                _ = crate::net::stopping(&mut stop) => { stopping = true; continue; }
            }
        } else {
            read.await
        };
        let error = match outcome {
            Err(_elapsed) => {
                debug!("policy: closing a connection idle for {}s", idle.as_secs());
                return;
            }
            Ok(Err(e)) => {
                debug!("policy: connection error: {e}");
                return;
            }
            Ok(Ok(Line::Eof)) if decoder.is_idle() && line.is_empty() => return,
            Ok(Ok(Line::Eof)) => ProtocolError::Truncated,
            Ok(Ok(Line::TooLong)) => ProtocolError::LineTooLong(max_line),
            Ok(Ok(Line::Complete)) => {
                let pushed = decoder.push_line(&line);
                line.clear();
                match pushed {
                    Ok(None) => continue,
                    Ok(Some(request)) => {
                        let engine = current.get();
                        let started = Instant::now();
                        let mut env = request.envelope();
                        let stage = request.stage();
                        transaction.enter(request.get("instance").unwrap_or(""));
                        env.recipient_count = env.recipient_count.max(transaction.recipients);
                        let span = info_span!(
                            "policy",
                            queue_id = show(&env.queue_id),
                            client = %env.client_addr.map_or_else(|| "-".to_owned(), |ip| ip.to_string()),
                        );
                        let decision = engine.envelope(stage, &env).instrument(span).await;
                        if stage == Stage::Rcpt && !decision.verdict.is_final() {
                            transaction.recipients += 1;
                        }
                        metrics
                            .decision_seconds
                            .with_label_values(&[FRONTEND])
                            .observe(started.elapsed().as_secs_f64());
                        metrics
                            .requests
                            .with_label_values(&[FRONTEND, decision.verdict.label()])
                            .inc();
                        if let Err(e) = writer.write_all(encode(&decision.verdict).as_bytes()).await
                        {
                            debug!("policy: cannot answer: {e}");
                            return;
                        }
                        continue;
                    }
                    Err(e) => e,
                }
            }
        };
        metrics
            .protocol_errors
            .with_label_values(&[FRONTEND, error.label()])
            .inc();
        warn!("policy: closing the connection after bad input: {error}");
        return;
    }
}
