//! A deliberately small HTTP/1.x listener for `/metrics` (Prometheus text
//! format) and `/healthz`. One request per connection, bounded in size and
//! time; anything else gets a plain error status.

use crate::{metrics::Metrics, net::Listener};
use std::{sync::Arc, time::Duration};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::watch,
    task::JoinSet,
};
use tracing::{debug, warn};

const MAX_REQUEST: usize = 8192;
const TIMEOUT: Duration = Duration::from_secs(10);
const MAX_CONNECTIONS: usize = 64;

pub async fn serve(listener: Listener, metrics: Arc<Metrics>, stop: watch::Receiver<bool>) {
    let mut connections = JoinSet::new();
    let mut stop_wait = stop.clone();
    loop {
        tokio::select! {
            _ = crate::net::stopping(&mut stop_wait) => break,
            accepted = listener.accept() => match accepted {
                Ok(mut stream) if connections.len() < MAX_CONNECTIONS => {
                    let metrics = metrics.clone();
                    connections.spawn(async move {
                        if tokio::time::timeout(TIMEOUT, respond(&mut stream, &metrics)).await.is_err() {
                            debug!("http: request timed out");
                        }
                    });
                }
                Ok(_) => warn!("http: connection refused: {MAX_CONNECTIONS} requests already in progress"),
                Err(e) => {
                    warn!("http: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn respond(stream: &mut crate::net::Stream, metrics: &Metrics) {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n").or_else(|| find(&buf, b"\n\n")) {
            break i;
        }
        if buf.len() >= MAX_REQUEST {
            let _ = write(
                stream,
                "431 Request Header Fields Too Large",
                "text/plain",
                "request too large\n",
                false,
            )
            .await;
            return;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]);
    let mut parts = head.lines().next().unwrap_or("").split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let head_only = method == "HEAD";
    let result = match (method, path) {
        ("GET" | "HEAD", "/metrics") => {
            write(
                stream,
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                &metrics.render(),
                head_only,
            )
            .await
        }
        ("GET" | "HEAD", "/healthz") => {
            write(stream, "200 OK", "text/plain", "ok\n", head_only).await
        }
        ("GET" | "HEAD", _) => {
            write(
                stream,
                "404 Not Found",
                "text/plain",
                "not found: try /metrics or /healthz\n",
                head_only,
            )
            .await
        }
        _ => {
            write(
                stream,
                "405 Method Not Allowed",
                "text/plain",
                "only GET is served\n",
                false,
            )
            .await
        }
    };
    if let Err(e) = result {
        debug!("http: cannot answer: {e}");
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

async fn write(
    stream: &mut crate::net::Stream,
    status: &str,
    content_type: &str,
    body: &str,
    head_only: bool,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    if !head_only {
        stream.write_all(body.as_bytes()).await?;
    }
    stream.shutdown().await
}
