//! Webhooks: a forwarding target that is an http(s) URL gets the message
//! as JSON in an HTTP POST, signed with HMAC-SHA256 when a key is set.
//! Addresses on loopback and private networks are refused unless the
//! operator allows them, also when a name resolves to one (checked by the
//! resolver the client connects with, so DNS rebinding cannot slip past).

use crate::config::WebhooksConfig;
use base64::Engine as _;
use mail_parser::{MessageParser, MimeHeaders};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use serde_json::{Map, Value, json};
use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};
use tracing::info;

/// What the POST came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Delivered {
        status: u16,
    },
    /// Worth trying again later (timeouts, network, 408, 413, 429, 5xx).
    Tempfail(String),
    /// Refused for good (other statuses, a private address, a bad URL).
    Reject(String),
}

/// Facts of the message and its session that go into the JSON.
#[derive(Debug, Clone)]
pub struct Meta {
    /// Every recipient mapped to this URL; the first is the session's.
    pub recipients: Vec<String>,
    pub remote_address: Option<IpAddr>,
    pub client_hostname: Option<String>,
    pub helo: Option<String>,
    pub sender: String,
    pub mta: String,
    pub arrival: SystemTime,
    pub auth_results: Option<Value>,
}

pub struct Webhooks {
    client: reqwest::Client,
    retries: u32,
    pause: Duration,
    allow_private: bool,
    key: String,
}

/// Whether `ip` is one a webhook may not reach unless allowed: loopback,
/// private, link-local, unique-local, CGNAT, documentation, unspecified,
/// multicast, broadcast.
pub fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (64..128).contains(&o[1]))
                || (o[0] == 198 && (o[1] == 18 || o[1] == 19))
                || o[0] >= 240
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_private(IpAddr::V4(v4));
            }
            let s = v6.segments();
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] == 0x2001 && s[1] == 0x0db8)
                || (s[0] == 0x0064 && s[1] == 0xff9b)
        }
    }
}

/// Resolves with the system resolver and fails when any address is private.
struct PublicOnly;

impl Resolve for PublicOnly {
    fn resolve(&self, name: Name) -> Resolving {
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if host.eq_ignore_ascii_case("localhost") || addrs.iter().any(|a| is_private(a.ip())) {
                return Err(Box::new(PrivateAddress) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

#[derive(Debug)]
struct PrivateAddress;

impl std::fmt::Display for PrivateAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the webhook host resolves to a private address")
    }
}

impl std::error::Error for PrivateAddress {}

impl Webhooks {
    pub fn new(config: &WebhooksConfig) -> Result<Self, String> {
        let mut builder = reqwest::Client::builder()
            .timeout(config.timeout.get())
            .connect_timeout(config.timeout.get())
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(format!("mxguard/{}", crate::VERSION));
        if !config.allow_private {
            builder = builder.dns_resolver(Arc::new(PublicOnly));
        }
        let client = builder
            .build()
            .map_err(|e| format!("cannot set up the webhook client: {e}"))?;
        Ok(Self {
            client,
            retries: config.retries,
            pause: Duration::from_secs(2),
            allow_private: config.allow_private,
            key: config.key.clone(),
        })
    }

    /// The pause between attempts (2 s; shorter in tests).
    pub fn with_retry_pause(mut self, pause: Duration) -> Self {
        self.pause = pause;
        self
    }

    /// The JSON body for one URL: the message parsed (headers, addresses,
    /// text and HTML bodies, attachments in base64), the raw message, the
    /// recipients and the session. `?attachments=false` and `?raw=false`
    /// in the URL leave those out.
    pub fn payload(raw: &[u8], meta: &Meta, url: &str) -> Result<Vec<u8>, String> {
        let query = reqwest::Url::parse(url)
            .map(|u| {
                u.query_pairs()
                    .map(|(k, v)| (k.into_owned(), v.into_owned()))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        let off = |name: &str| query.iter().any(|(k, v)| k == name && v == "false");
        let mut out = Map::new();
        let header_end = find_header_end(raw);
        out.insert(
            "headers".into(),
            Value::String(String::from_utf8_lossy(&raw[..header_end]).into_owned()),
        );
        if let Some(m) = MessageParser::default().parse(raw) {
            let lines: Vec<Value> = m
                .headers_raw()
                .map(|(name, value)| {
                    json!({"key": name.to_lowercase(), "line": format!("{name}:{value}").trim_end()})
                })
                .collect();
            out.insert("headerLines".into(), Value::Array(lines));
            if let Some(s) = m.subject() {
                out.insert("subject".into(), s.into());
            }
            if let Some(d) = m.date() {
                out.insert("date".into(), d.to_rfc3339().into());
            }
            if let Some(id) = m.message_id() {
                out.insert("messageId".into(), format!("<{id}>").into());
            }
            for (key, addr) in [
                ("from", m.from()),
                ("to", m.to()),
                ("cc", m.cc()),
                ("bcc", m.bcc()),
                ("replyTo", m.reply_to()),
            ] {
                let Some(addr) = addr else { continue };
                let value: Vec<Value> = addr
                    .iter()
                    .map(|a| {
                        json!({
                            "address": a.address.as_deref().unwrap_or(""),
                            "name": a.name.as_deref().unwrap_or(""),
                        })
                    })
                    .collect();
                let text: Vec<String> = addr
                    .iter()
                    .map(|a| match (a.name.as_deref(), a.address.as_deref()) {
                        (Some(n), Some(a)) => format!("{n} <{a}>"),
                        (None, Some(a)) => a.to_owned(),
                        (Some(n), None) => n.to_owned(),
                        (None, None) => String::new(),
                    })
                    .collect();
                out.insert(key.into(), json!({"value": value, "text": text.join(", ")}));
            }
            if let Some(t) = m.body_text(0) {
                out.insert("text".into(), t.into_owned().into());
            }
            if let Some(h) = m.body_html(0) {
                out.insert("html".into(), h.into_owned().into());
            }
            if !off("attachments") {
                let attachments: Vec<Value> = m
                    .attachments()
                    .map(|part| {
                        let ctype = part.content_type().map_or_else(
                            || "application/octet-stream".to_owned(),
                            |c| match c.c_subtype.as_deref() {
                                Some(sub) => format!("{}/{sub}", c.c_type),
                                None => c.c_type.to_string(),
                            },
                        );
                        let content = part.contents();
                        json!({
                            "filename": part.attachment_name().unwrap_or(""),
                            "contentType": ctype,
                            "size": content.len(),
                            "content": base64::engine::general_purpose::STANDARD.encode(content),
                        })
                    })
                    .collect();
                out.insert("attachments".into(), Value::Array(attachments));
            }
        }
        if !off("raw") {
            out.insert(
                "raw".into(),
                String::from_utf8_lossy(raw).into_owned().into(),
            );
        }
        out.insert("recipients".into(), json!(meta.recipients));
        let arrival = meta.arrival.duration_since(UNIX_EPOCH).unwrap_or_default();
        let client = meta.client_hostname.clone().unwrap_or_else(|| {
            meta.remote_address
                .map_or_else(String::new, |ip| format!("[{ip}]"))
        });
        out.insert(
            "session".into(),
            json!({
                "recipient": meta.recipients.first().cloned().unwrap_or_default(),
                "remoteAddress": meta.remote_address.map(|ip| ip.to_string()),
                "clientHostname": client,
                "hostNameAppearsAs": meta.helo,
                "sender": meta.sender,
                "mta": meta.mta,
                "arrivalDate": rfc3339(arrival),
                "arrivalTime": u64::try_from(arrival.as_millis()).unwrap_or(u64::MAX),
            }),
        );
        if let Some(Value::Object(results)) = &meta.auth_results {
            for (k, v) in results {
                out.insert(k.clone(), v.clone());
            }
        }
        serde_json::to_vec(&Value::Object(out))
            .map_err(|e| format!("cannot encode the webhook body: {e}"))
    }

    /// POSTs `body` to `url`, trying again on temporary failures.
    /// `alias` names the recipient in reply texts (the URL never appears).
    pub async fn post(&self, url: &str, body: &[u8], alias: &str, key: Option<&str>) -> Outcome {
        let started = Instant::now();
        let parsed = match reqwest::Url::parse(url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => u,
            _ => {
                return Outcome::Reject(format!(
                    "a webhook endpoint for {alias} is not an http(s) URL"
                ));
            }
        };
        let host = parsed.host_str().unwrap_or("").to_owned();
        if !self.allow_private {
            let literal = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>()
                .ok();
            if literal.is_some_and(is_private) || host.eq_ignore_ascii_case("localhost") {
                return self.log(&host, 0, started, Outcome::Reject(private(alias)));
            }
        }
        let key = key
            .filter(|k| !k.is_empty())
            .or(Some(self.key.as_str()).filter(|k| !k.is_empty()));
        let signature = key.map(|k| {
            let tag = ring::hmac::sign(
                &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, k.as_bytes()),
                body,
            );
            tag.as_ref()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        });
        let mut attempts = 0;
        loop {
            attempts += 1;
            let mut request = self
                .client
                .post(parsed.clone())
                .header("Content-Type", "application/json")
                .body(body.to_vec());
            if let Some(s) = &signature {
                request = request.header("X-Webhook-Signature", s);
            }
            let outcome = match request.send().await {
                Ok(response) => {
                    let status = response.status();
                    let code = status.as_u16();
                    if status.is_success() {
                        Outcome::Delivered { status: code }
                    } else {
                        let text = format!(
                            "{code} {} Error for {alias}",
                            status.canonical_reason().unwrap_or("Unknown")
                        );
                        if matches!(code, 408 | 413 | 429) || status.is_server_error() {
                            Outcome::Tempfail(text)
                        } else {
                            Outcome::Reject(text)
                        }
                    }
                }
                Err(e) => transport_error(&e, alias),
            };
            match outcome {
                Outcome::Tempfail(_) if attempts <= self.retries => {
                    tokio::time::sleep(self.pause).await;
                }
                other => return self.log(&host, attempts, started, other),
            }
        }
    }

    fn log(&self, host: &str, attempts: u32, started: Instant, outcome: Outcome) -> Outcome {
        let (result, detail) = match &outcome {
            Outcome::Delivered { status } => ("delivered", status.to_string()),
            Outcome::Tempfail(t) => ("tempfail", t.clone()),
            Outcome::Reject(t) => ("reject", t.clone()),
        };
        info!(
            webhook_host = host,
            attempts,
            elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            result,
            "webhook: {detail}"
        );
        outcome
    }
}

fn private(alias: &str) -> String {
    format!("a webhook endpoint for {alias} points to a private address")
}

/// A transport error as the reference names it, never with the URL.
fn transport_error(e: &reqwest::Error, alias: &str) -> Outcome {
    let mut source: Option<&dyn std::error::Error> = Some(e);
    while let Some(s) = source {
        if s.is::<PrivateAddress>() {
            return Outcome::Reject(private(alias));
        }
        source = s.source();
    }
    let chain = format!("{e:?}").to_lowercase();
    let what = if e.is_timeout() {
        "Connection Timed Out"
    } else if chain.contains("connection refused") {
        "Connection Refused"
    } else if chain.contains("dns") || chain.contains("failed to lookup") {
        "Host Not Found"
    } else if chain.contains("reset") {
        "Connection Reset"
    } else if e.is_connect() {
        "Network Error"
    } else {
        "Request Aborted"
    };
    Outcome::Tempfail(format!("{what} for {alias}"))
}

fn find_header_end(raw: &[u8]) -> usize {
    raw.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 2)
        .or_else(|| raw.windows(2).position(|w| w == b"\n\n").map(|i| i + 1))
        .unwrap_or(raw.len())
}

/// `2023-11-14T22:13:20.000Z` from a time since the epoch.
fn rfc3339(since_epoch: Duration) -> String {
    let secs = since_epoch.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = i64::try_from(days).unwrap_or(0) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since_epoch.subsec_millis()
    )
}

#[cfg(test)]
mod tests;
