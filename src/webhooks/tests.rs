//! Webhooks against a small HTTP server on loopback that answers a
//! scripted sequence of statuses and records what it was sent.

use super::*;
use std::sync::Mutex;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

#[derive(Clone, Debug)]
struct Request {
    head: String,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    }
}

struct Server {
    port: u16,
    seen: Arc<Mutex<Vec<Request>>>,
}

/// Answers each request with the next status (the last one repeats);
/// status 0 never answers.
async fn server(statuses: &[u16]) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let statuses = statuses.to_vec();
    let record = seen.clone();
    tokio::spawn(async move {
        let mut n = 0;
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let status = statuses[n.min(statuses.len() - 1)];
            n += 1;
            let record = record.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                let (head, body) = loop {
                    let Ok(k) = s.read(&mut chunk).await else {
                        return;
                    };
                    if k == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..k]);
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..i]).into_owned();
                        let len: usize = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        while buf.len() < i + 4 + len {
                            let Ok(k) = s.read(&mut chunk).await else {
                                return;
                            };
                            if k == 0 {
                                return;
                            }
                            buf.extend_from_slice(&chunk[..k]);
                        }
                        break (head, buf[i + 4..i + 4 + len].to_vec());
                    }
                };
                record.lock().unwrap().push(Request { head, body });
                if status == 0 {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    return;
                }
                let extra = if status == 301 {
                    "Location: http://127.0.0.1:9/\r\n"
                } else {
                    ""
                };
                let reply = format!(
                    "HTTP/1.1 {status} X\r\n{extra}Content-Length: 2\r\nConnection: close\r\n\r\nok"
                );
                let _ = s.write_all(reply.as_bytes()).await;
            });
        }
    });
    Server { port, seen }
}

fn config(allow_private: bool, retries: u32, key: &str) -> WebhooksConfig {
    WebhooksConfig {
        timeout: crate::config::Duration::from_secs(1),
        retries,
        allow_private,
        key: key.into(),
        ..WebhooksConfig::default()
    }
}

fn hooks(allow_private: bool, retries: u32, key: &str) -> Webhooks {
    Webhooks::new(&config(allow_private, retries, key))
        .unwrap()
        .with_retry_pause(Duration::from_millis(10))
}

fn meta() -> Meta {
    Meta {
        recipients: vec!["a@example.org".into(), "b@example.org".into()],
        remote_address: "192.0.2.1".parse().ok(),
        client_hostname: None,
        helo: Some("mail.example.net".into()),
        sender: "bob@example.net".into(),
        mta: "mx.example.org".into(),
        arrival: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        auth_results: Some(json!({"spf": {"result": "pass"}})),
    }
}

const MULTIPART: &[u8] = b"From: Bob <bob@example.net>\r\nTo: a@example.org, \"B\" <b@example.org>\r\n\
Subject: Report\r\nMessage-ID: <m1@example.net>\r\nDate: Tue, 14 Nov 2023 22:13:20 +0000\r\n\
MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n\
--b1\r\nContent-Type: multipart/alternative; boundary=\"b2\"\r\n\r\n\
--b2\r\nContent-Type: text/plain\r\n\r\nHello text.\r\n\
--b2\r\nContent-Type: text/html\r\n\r\n<p>Hello html.</p>\r\n--b2--\r\n\
--b1\r\nContent-Type: application/pdf; name=\"r.pdf\"\r\nContent-Disposition: attachment; filename=\"r.pdf\"\r\n\
Content-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQ=\r\n--b1--\r\n";

#[test]
fn payload_has_the_parsed_message_and_the_session() {
    let body = Webhooks::payload(MULTIPART, &meta(), "https://h.example.org/in").unwrap();
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["subject"], "Report");
    assert_eq!(v["messageId"], "<m1@example.net>");
    assert_eq!(v["date"], "2023-11-14T22:13:20Z");
    assert_eq!(v["from"]["value"][0]["address"], "bob@example.net");
    assert_eq!(v["from"]["text"], "Bob <bob@example.net>");
    assert_eq!(v["to"]["value"][1]["name"], "B");
    assert_eq!(v["text"].as_str().map(str::trim), Some("Hello text."));
    assert_eq!(
        v["html"].as_str().map(str::trim),
        Some("<p>Hello html.</p>")
    );
    assert_eq!(v["attachments"][0]["filename"], "r.pdf");
    assert_eq!(v["attachments"][0]["contentType"], "application/pdf");
    assert_eq!(v["attachments"][0]["content"], "JVBERi0xLjQ=");
    assert_eq!(v["attachments"][0]["size"], 8);
    assert!(v["headers"].as_str().unwrap().starts_with("From: Bob"));
    assert!(
        v["headers"]
            .as_str()
            .unwrap()
            .ends_with("boundary=\"b1\"\r\n")
    );
    assert_eq!(v["headerLines"][2]["key"], "subject");
    assert_eq!(v["raw"].as_str().map(str::as_bytes), Some(MULTIPART));
    assert_eq!(v["recipients"], json!(["a@example.org", "b@example.org"]));
    assert_eq!(v["session"]["recipient"], "a@example.org");
    assert_eq!(v["session"]["clientHostname"], "[192.0.2.1]");
    assert_eq!(v["session"]["remoteAddress"], "192.0.2.1");
    assert_eq!(v["session"]["hostNameAppearsAs"], "mail.example.net");
    assert_eq!(v["session"]["sender"], "bob@example.net");
    assert_eq!(v["session"]["mta"], "mx.example.org");
    assert_eq!(v["session"]["arrivalDate"], "2023-11-14T22:13:20.000Z");
    assert_eq!(v["session"]["arrivalTime"], 1_700_000_000_000u64);
    assert_eq!(v["spf"]["result"], "pass");

    let body = Webhooks::payload(
        MULTIPART,
        &meta(),
        "https://h.example.org/in?attachments=false&raw=false",
    )
    .unwrap();
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert!(v.get("attachments").is_none() && v.get("raw").is_none());
    assert_eq!(v["subject"], "Report");
}

#[test]
fn a_broken_message_still_makes_valid_json() {
    let raw = b"no header separator \xff\xfe and \0 bytes";
    let body = Webhooks::payload(raw, &meta(), "http://h.example.org/").unwrap();
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert!(v["raw"].as_str().is_some());
    assert_eq!(v["recipients"][0], "a@example.org");
}

#[tokio::test]
async fn signatures_are_hmac_sha256_of_the_body() {
    let s = server(&[200]).await;
    let url = format!("http://127.0.0.1:{}/in", s.port);
    let out = hooks(true, 0, "config-key")
        .post(&url, b"{\"x\":1}", "a@b", Some("domain-key"))
        .await;
    assert_eq!(out, Outcome::Delivered { status: 200 });
    let out = hooks(true, 0, "").post(&url, b"{}", "a@b", None).await;
    assert_eq!(out, Outcome::Delivered { status: 200 });
    let seen = s.seen.lock().unwrap().clone();
    let expected = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"domain-key"),
        b"{\"x\":1}",
    );
    let hex: String = expected
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(seen[0].header("X-Webhook-Signature"), Some(hex));
    assert_eq!(
        seen[0].header("Content-Type").as_deref(),
        Some("application/json")
    );
    assert_eq!(
        seen[0].header("User-Agent"),
        Some(format!("mxguard/{}", crate::VERSION))
    );
    assert!(seen[0].head.starts_with("POST /in "));
    assert_eq!(seen[0].body, b"{\"x\":1}");
    assert_eq!(seen[1].header("X-Webhook-Signature"), None);
}

#[tokio::test]
async fn statuses_map_to_outcomes_with_retries() {
    for (statuses, retries, want, requests) in [
        (vec![204], 3, Outcome::Delivered { status: 204 }, 1),
        (
            vec![500, 500, 200],
            3,
            Outcome::Delivered { status: 200 },
            3,
        ),
        (
            vec![503],
            2,
            Outcome::Tempfail("503 Service Unavailable Error for a@b".into()),
            3,
        ),
        (vec![429, 200], 1, Outcome::Delivered { status: 200 }, 2),
        (
            vec![404],
            3,
            Outcome::Reject("404 Not Found Error for a@b".into()),
            1,
        ),
        (
            vec![301],
            3,
            Outcome::Reject("301 Moved Permanently Error for a@b".into()),
            1,
        ),
        (
            vec![0],
            0,
            Outcome::Tempfail("Connection Timed Out for a@b".into()),
            1,
        ),
    ] {
        let s = server(&statuses).await;
        let url = format!("http://127.0.0.1:{}/", s.port);
        let out = hooks(true, retries, "")
            .post(&url, b"{}", "a@b", None)
            .await;
        assert_eq!(out, want, "{statuses:?}");
        assert_eq!(s.seen.lock().unwrap().len(), requests, "{statuses:?}");
    }
}

#[tokio::test]
async fn refused_connections_are_a_tempfail() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap().port()
    };
    let out = hooks(true, 1, "")
        .post(&format!("http://127.0.0.1:{port}/"), b"{}", "a@b", None)
        .await;
    assert_eq!(out, Outcome::Tempfail("Connection Refused for a@b".into()));
}

#[tokio::test]
async fn private_addresses_are_refused_unless_allowed() {
    let s = server(&[200]).await;
    for url in [
        format!("http://127.0.0.1:{}/", s.port),
        format!("http://localhost:{}/", s.port),
        format!("http://[::1]:{}/", s.port),
    ] {
        let out = hooks(false, 3, "").post(&url, b"{}", "a@b", None).await;
        assert_eq!(
            out,
            Outcome::Reject("a webhook endpoint for a@b points to a private address".into()),
            "{url}"
        );
    }
    assert!(s.seen.lock().unwrap().is_empty(), "nothing may be sent");
    for bad in ["ftp://h.example.org/", "not a url", "http://"] {
        assert!(
            matches!(
                hooks(false, 0, "").post(bad, b"{}", "a@b", None).await,
                Outcome::Reject(_)
            ),
            "{bad}"
        );
    }
}

#[test]
fn private_ranges() {
    for ip in [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.1.1",
        "100.64.0.1",
        "192.0.2.1",
        "0.0.0.0",
        "255.255.255.255",
        "::1",
        "::",
        "fc00::1",
        "fd12::1",
        "fe80::1",
        "::ffff:10.0.0.1",
        "2001:db8::1",
    ] {
        assert!(is_private(ip.parse().unwrap()), "{ip}");
    }
    for ip in [
        "8.8.8.8",
        "93.184.216.34",
        "2606:4700::1111",
        "::ffff:8.8.8.8",
    ] {
        assert!(!is_private(ip.parse().unwrap()), "{ip}");
    }
}

#[test]
fn dates() {
    assert_eq!(rfc3339(Duration::from_secs(0)), "1970-01-01T00:00:00.000Z");
    assert_eq!(
        rfc3339(Duration::from_millis(1_700_000_000_123)),
        "2023-11-14T22:13:20.123Z"
    );
    assert_eq!(
        rfc3339(Duration::from_secs(951_782_400)),
        "2000-02-29T00:00:00.000Z"
    );
}
