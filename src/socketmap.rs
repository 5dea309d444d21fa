//! The socketmap front end: Postfix's `socketmap:` table protocol
//! (socketmap_table(5)), so `relay_domains` and `transport_maps` can follow
//! mxguard's alias sources.
//!
//! A request is the netstring `<len>:<map> <key>,`; the reply is one
//! netstring `OK <value>`, `NOTFOUND `, `TEMP <reason>` or `PERM <reason>`.
//! Maps: `domains` (is this a domain mxguard forwards for?) and `transport`
//! (the custom port of a forwarded recipient).

use crate::{
    engine::{CurrentEngine, Engine},
    metrics::{Metrics, SessionGuard},
    net::{Listener, Stream},
};
use std::sync::Arc;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::{Semaphore, watch},
    task::JoinSet,
    time::timeout,
};
use tracing::{debug, info, warn};

const FRONTEND: &str = "socketmap";
/// Longest request accepted; Postfix's keys are addresses and domains.
pub const MAX_REQUEST: usize = 10_000;

/// Why a request could not be read.
#[derive(Debug, PartialEq, Eq)]
pub enum NetstringError {
    /// Not `<digits>:<data>,`.
    Malformed,
    /// A length over [`MAX_REQUEST`].
    TooLong,
}

/// Takes one complete netstring off the front of `buf`: `Ok(None)` when
/// more bytes are needed.
pub fn take_netstring(buf: &mut Vec<u8>) -> Result<Option<Vec<u8>>, NetstringError> {
    let Some(colon) = buf.iter().position(|&b| b == b':') else {
        // Only digits so far: wait, unless there are too many of them.
        if buf.iter().all(u8::is_ascii_digit) && buf.len() <= 5 {
            return Ok(None);
        }
        return Err(if buf.iter().all(u8::is_ascii_digit) {
            NetstringError::TooLong
        } else {
            NetstringError::Malformed
        });
    };
    let digits = &buf[..colon];
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Err(NetstringError::Malformed);
    }
    if digits.len() > 5 {
        return Err(NetstringError::TooLong);
    }
    let len: usize = std::str::from_utf8(digits)
        .ok()
        .and_then(|d| d.parse().ok())
        .ok_or(NetstringError::Malformed)?;
    if len > MAX_REQUEST {
        return Err(NetstringError::TooLong);
    }
    let end = colon + 1 + len;
    if buf.len() <= end {
        return Ok(None);
    }
    if buf[end] != b',' {
        return Err(NetstringError::Malformed);
    }
    let data = buf[colon + 1..end].to_vec();
    buf.drain(..=end);
    Ok(Some(data))
}

pub fn netstring(payload: &str) -> Vec<u8> {
    format!("{}:{payload},", payload.len()).into_bytes()
}

/// The answer to one request, as `(payload, result label)`.
pub async fn answer(engine: &Engine, request: &[u8]) -> (String, &'static str) {
    let Ok(text) = std::str::from_utf8(request) else {
        return ("PERM request is not UTF-8".into(), "perm");
    };
    if text.contains('\0') || text.chars().any(char::is_control) {
        return ("PERM control character in request".into(), "perm");
    }
    let Some((map, key)) = text.split_once(' ') else {
        return ("PERM malformed request: expected `map key`".into(), "perm");
    };
    match map {
        "domains" => {
            let domain = key.rsplit_once('@').map_or(key, |(_, d)| d);
            // Postfix also asks for `.parent` forms; forwarding is per domain.
            if domain.starts_with('.') || domain.is_empty() {
                return ("NOTFOUND ".into(), "notfound");
            }
            match engine.handles_domain(domain).await {
                Ok(true) => (format!("OK {}", domain.to_lowercase()), "ok"),
                Ok(false) => ("NOTFOUND ".into(), "notfound"),
                Err(e) => (format!("TEMP {}", one_line(&e)), "temp"),
            }
        }
        "transport" => {
            let Some((_, domain)) = key.rsplit_once('@') else {
                return ("NOTFOUND ".into(), "notfound");
            };
            match engine.forwarding_port(key).await {
                Ok(Some(port)) => {
                    let transport = &engine.config().socketmap.transport;
                    (
                        format!("OK {transport}:{}:{port}", domain.to_lowercase()),
                        "ok",
                    )
                }
                Ok(None) => ("NOTFOUND ".into(), "notfound"),
                Err(e) => (format!("TEMP {}", one_line(&e)), "temp"),
            }
        }
        other => (format!("PERM unknown map {}", one_line(other)), "perm"),
    }
}

fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(500)
        .collect()
}

/// Accepts connections until `stop` turns true, then lets the open ones
/// finish the request they are in.
pub async fn serve(
    listener: Listener,
    current: Arc<CurrentEngine>,
    metrics: Arc<Metrics>,
    stop: watch::Receiver<bool>,
) {
    let limit = Arc::new(Semaphore::new(
        current.get().config().socketmap.max_connections,
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
                        warn!("socketmap: connection refused: too many connections open");
                        continue;
                    };
                    let (current, metrics, stop) = (current.clone(), metrics.clone(), stop.clone());
                    connections.spawn(async move {
                        handle(stream, current, metrics, stop).await;
                        drop(permit);
                    });
                }
                Err(e) => {
                    warn!("socketmap: accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

async fn handle(
    mut stream: Stream,
    current: Arc<CurrentEngine>,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    let _session = SessionGuard::new(&metrics, FRONTEND);
    let idle = current.get().config().socketmap.idle_timeout.get();
    let mut buf: Vec<u8> = Vec::with_capacity(512);
    let mut chunk = [0u8; 4096];
    loop {
        // Answer every complete request already read.
        loop {
            match take_netstring(&mut buf) {
                Ok(Some(request)) => {
                    let engine = current.get();
                    let (payload, result) = answer(&engine, &request).await;
                    let map = std::str::from_utf8(&request)
                        .ok()
                        .and_then(|r| r.split(' ').next())
                        .filter(|m| ["domains", "transport"].contains(m))
                        .unwrap_or("other");
                    metrics
                        .socketmap_requests
                        .with_label_values(&[map, result])
                        .inc();
                    if result == "temp" || result == "perm" {
                        info!(map, answer = %payload, "socketmap: {}", String::from_utf8_lossy(&request));
                    } else {
                        debug!(map, answer = %payload, "socketmap: {}", String::from_utf8_lossy(&request));
                    }
                    if let Err(e) = stream.write_all(&netstring(&payload)).await {
                        debug!("socketmap: cannot answer: {e}");
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let label = match e {
                        NetstringError::Malformed => "malformed",
                        NetstringError::TooLong => "too_long",
                    };
                    metrics
                        .protocol_errors
                        .with_label_values(&[FRONTEND, label])
                        .inc();
                    metrics
                        .socketmap_requests
                        .with_label_values(&["other", "perm"])
                        .inc();
                    warn!("socketmap: closing the connection after bad input ({label})");
                    let _ = stream.write_all(&netstring("PERM malformed request")).await;
                    return;
                }
            }
        }
        if *stop.borrow() && buf.is_empty() {
            return;
        }
        let read = timeout(idle, stream.read(&mut chunk));
        let n = if buf.is_empty() {
            tokio::select! {
                r = read => r,
                _ = crate::net::stopping(&mut stop) => return,
            }
        } else {
            read.await
        };
        match n {
            Err(_) => {
                debug!(
                    "socketmap: closing a connection idle for {}s",
                    idle.as_secs()
                );
                return;
            }
            Ok(Ok(0)) => return,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => {
                debug!("socketmap: connection error: {e}");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn take(input: &[u8]) -> (Result<Option<Vec<u8>>, NetstringError>, Vec<u8>) {
        let mut buf = input.to_vec();
        let r = take_netstring(&mut buf);
        (r, buf)
    }

    #[test]
    fn netstrings() {
        assert_eq!(
            take(b"17:domains a.example,rest"),
            (Ok(Some(b"domains a.example".to_vec())), b"rest".to_vec())
        );
        assert_eq!(take(b"17:domains a.ex").0, Ok(None));
        assert_eq!(take(b"15").0, Ok(None));
        assert_eq!(take(b"").0, Ok(None));
        assert_eq!(take(b"0:,").0, Ok(Some(Vec::new())));
        assert_eq!(take(b"abc:").0, Err(NetstringError::Malformed));
        assert_eq!(take(b":x,").0, Err(NetstringError::Malformed));
        assert_eq!(take(b"2:ab;").0, Err(NetstringError::Malformed));
        assert_eq!(take(b"5:ab,").0, Ok(None));
        assert_eq!(
            take(b"99999999999999999999:").0,
            Err(NetstringError::TooLong)
        );
        assert_eq!(take(b"999999").0, Err(NetstringError::TooLong));
        assert_eq!(take(b"10001:").0, Err(NetstringError::TooLong));
        let mut two = b"3:a b,3:c d,".to_vec();
        assert_eq!(take_netstring(&mut two), Ok(Some(b"a b".to_vec())));
        assert_eq!(take_netstring(&mut two), Ok(Some(b"c d".to_vec())));
        assert!(two.is_empty());
        assert_eq!(netstring("NOTFOUND "), b"9:NOTFOUND ,");
    }
}
