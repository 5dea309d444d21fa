//! A deliberately small HTTP/1.x listener for `/metrics` (Prometheus text
//! format), `/healthz`, and the operator's list requests of `mxguard
//! deny|allow` (`/lists/...`, from loopback clients only). One request per
//! connection, bounded in size and time; anything else gets a plain error
//! status.

use crate::{
    config::Duration as ConfigDuration,
    engine::{List, Services},
    metrics::Metrics,
    net::{Listener, Stream},
};
use std::time::Duration;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::watch,
    task::JoinSet,
};
use tracing::{debug, warn};

const MAX_REQUEST: usize = 8192;
const TIMEOUT: Duration = Duration::from_secs(10);
const MAX_CONNECTIONS: usize = 64;

pub async fn serve(listener: Listener, services: Services, stop: watch::Receiver<bool>) {
    let mut connections = JoinSet::new();
    let mut stop_wait = stop.clone();
    loop {
        tokio::select! {
            _ = crate::net::stopping(&mut stop_wait) => break,
            accepted = listener.accept() => match accepted {
                Ok(mut stream) if connections.len() < MAX_CONNECTIONS => {
                    let services = services.clone();
                    connections.spawn(async move {
                        if tokio::time::timeout(TIMEOUT, respond(&mut stream, &services)).await.is_err() {
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

async fn respond(stream: &mut Stream, services: &Services) {
    let metrics: &Metrics = &services.metrics;
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
            // A load balancer sends mail elsewhere while the state store
            // refuses changes, which the checks would answer with 451.
            match Box::pin(services.store.health()).await {
                Ok(()) => write(stream, "200 OK", "text/plain", "ok\n", head_only).await,
                Err(e) => {
                    let body = format!("state store: {e}\n");
                    write(
                        stream,
                        "503 Service Unavailable",
                        "text/plain",
                        &body,
                        head_only,
                    )
                    .await
                }
            }
        }
        (_, p) if p.starts_with("/lists/") => {
            let refusal = operator_refusal(stream, &head);
            let (status, body) = if refusal.is_none() {
                // Boxed: the store's future types nest deep enough to overflow
                // the compiler's layout queries for the connection tasks.
                Box::pin(lists(
                    services,
                    method,
                    p,
                    target.split_once('?').map_or("", |(_, q)| q),
                ))
                .await
            } else {
                ("403 Forbidden", refusal.unwrap_or_default().to_owned())
            };
            write(stream, status, "text/plain; charset=utf-8", &body, false).await
        }
        ("POST", "/roster/sync") => {
            let refusal = operator_refusal(stream, &head);
            if refusal.is_none() {
                let query = target.split_once('?').map_or("", |(_, q)| q);
                let flag = |name: &str| {
                    query.split('&').any(|kv| {
                        kv == name || kv == format!("{name}=1") || kv == format!("{name}=true")
                    })
                };
                let reports = Box::pin(services.rosters.sync(flag("dry_run"), flag("force"))).await;
                let body = serde_json::to_string_pretty(&reports).unwrap_or_else(|_| "[]".into());
                write(
                    stream,
                    "200 OK",
                    "application/json",
                    &format!("{body}\n"),
                    false,
                )
                .await
            } else {
                write(
                    stream,
                    "403 Forbidden",
                    "text/plain",
                    refusal.unwrap_or_default(),
                    false,
                )
                .await
            }
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

/// The header the `mxguard` command sends with operator requests
/// (`/lists/...`, `/roster/sync`). A web page cannot add it to a request to
/// another site without a CORS preflight, which this server never grants,
/// and mxguard's own webhook client never sends it: neither a page in a
/// browser on this host nor an alias pointed at this listener can change
/// the lists.
pub const OPERATOR_HEADER: &str = "X-Mxguard-Operator";

/// Why an operator request is refused (403), if it is.
fn operator_refusal(stream: &Stream, head: &str) -> Option<&'static str> {
    if !from_loopback(stream) {
        return Some("operator requests are taken from loopback clients only\n");
    }
    let header = |name: &str| {
        head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    };
    // A page of another site whose name was made to resolve to 127.0.0.1
    // (DNS rebinding) still sends that name as its Host.
    if matches!(stream, Stream::Tcp(_)) && !header("Host").is_some_and(is_loopback_host) {
        return Some(
            "operator requests must name a loopback Host (127.0.0.1, [::1] or localhost)\n",
        );
    }
    if header(OPERATOR_HEADER) != Some("1") {
        return Some(
            "operator requests need the header X-Mxguard-Operator: 1, which the mxguard command sends\n",
        );
    }
    None
}

/// Whether a Host header names this host by a loopback address or
/// `localhost`, with or without a port.
fn is_loopback_host(host: &str) -> bool {
    let name = if host.parse::<std::net::IpAddr>().is_ok() {
        host
    } else if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        match host.rsplit_once(':') {
            Some((h, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => host,
        }
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn from_loopback(stream: &Stream) -> bool {
    match stream {
        Stream::Tcp(s) => s.peer_addr().is_ok_and(|a| a.ip().is_loopback()),
        Stream::Unix(_) => true,
    }
}

/// `GET /lists/NAME`, `POST /lists/NAME/add?value=V[&for=30d][&reason=R]`,
/// `POST /lists/NAME/del?value=V`, `GET /lists/NAME/test?value=V`.
async fn lists(
    services: &Services,
    method: &str,
    path: &str,
    query: &str,
) -> (&'static str, String) {
    let mut parts = path.trim_start_matches("/lists/").splitn(2, '/');
    let list = match parts.next() {
        Some("deny") => List::Deny,
        Some("allow") => List::Allow,
        _ => {
            return (
                "404 Not Found",
                "no such list: try /lists/deny or /lists/allow\n".to_owned(),
            );
        }
    };
    let params: Vec<(String, String)> = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (percent_decode(k), percent_decode(v)))
        .collect();
    let param = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let value = param("value").unwrap_or("");
    let result = match (method, parts.next().unwrap_or("")) {
        ("GET", "") => services.list_entries(list).await.map(|entries| {
            let lines: String = entries.iter().map(|e| e.line() + "\n").collect();
            ("200 OK", lines)
        }),
        ("POST", "add") => {
            let ttl = match param("for").map(str::parse::<ConfigDuration>).transpose() {
                Ok(t) => t.map(ConfigDuration::get),
                Err(e) => return ("400 Bad Request", format!("{e}\n")),
            };
            let reason = param("reason").unwrap_or("");
            services
                .list_add(list, value, ttl, reason)
                .await
                .map(|e| ("200 OK", format!("added {}\n", e.line())))
        }
        ("POST", "del") => services.list_remove(list, value).await.map(|removed| {
            if removed {
                ("200 OK", format!("removed {value}\n"))
            } else {
                (
                    "404 Not Found",
                    format!("{value} is not on the {} list\n", list.name()),
                )
            }
        }),
        ("GET", "test") => services.list_test(list, value).await.map(|hit| match hit {
            Some(e) => ("200 OK", format!("{value} matches {}\n", e.line())),
            None => (
                "404 Not Found",
                format!("no entry of the {} list matches {value}\n", list.name()),
            ),
        }),
        _ => {
            return (
                "405 Method Not Allowed",
                "unknown list request\n".to_owned(),
            );
        }
    };
    result.unwrap_or_else(|e| {
        let status = if e.starts_with('`') {
            "400 Bad Request"
        } else {
            "503 Service Unavailable"
        };
        (status, format!("{e}\n"))
    })
}

/// `%41` → `A`, `+` → space; invalid escapes are kept as they are.
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h * 16 + l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(c: u8) -> Option<u8> {
    (c as char).to_digit(16).and_then(|d| u8::try_from(d).ok())
}

/// The inverse, for the CLI: every byte but unreserved ones escaped.
pub fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

async fn write(
    stream: &mut Stream,
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

/// The client side of the list requests, for `mxguard deny|allow`: one
/// request to the daemon's HTTP listener; (status code, body).
pub fn request(
    addr: &crate::config::ListenAddr,
    method: &str,
    path: &str,
) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let crate::config::ListenAddr::Inet { host, port } = addr else {
        return Err(std::io::Error::other("http.listen must be inet:HOST:PORT"));
    };
    let mut s = std::net::TcpStream::connect((host.as_str(), *port))?;
    s.set_read_timeout(Some(TIMEOUT))?;
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.clone()
    };
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\n{OPERATOR_HEADER}: 1\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((code, body.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::{is_loopback_host, percent_decode, percent_encode};

    #[test]
    fn only_loopback_names_are_loopback_hosts() {
        for h in [
            "127.0.0.1",
            "127.0.0.1:9190",
            "127.5.6.7",
            "::1",
            "[::1]",
            "[::1]:9190",
            "localhost",
            "LOCALHOST:9190",
        ] {
            assert!(is_loopback_host(h), "{h}");
        }
        for h in [
            "",
            "attacker.example",
            "attacker.example:9190",
            "localhost.attacker.example",
            "127.0.0.1.attacker.example",
            "192.0.2.1",
            "[2001:db8::1]",
            "127.0.0.1:x",
        ] {
            assert!(!is_loopback_host(h), "{h}");
        }
    }

    #[test]
    fn percent_coding_round_trips() {
        for s in [
            "a@b.example",
            "spam run: 30% off+more",
            "é/?&=#",
            "%zz",
            "%4",
            "",
        ] {
            assert_eq!(percent_decode(&percent_encode(s)), s, "{s}");
        }
        assert_eq!(percent_decode("a%40b+c%zz%4"), "a@b c%zz%4");
    }
}
