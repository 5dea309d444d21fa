//! Webhook targets end to end: Postfix → milter → an HTTP server on
//! loopback receiving the JSON POST; failures as SMTP replies; a client's
//! retry of a delivered message is not posted twice.

mod common;

use common::{
    smtp::{self, Envelope},
    stack::{Stack, Wire},
};
use std::{
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

#[derive(Clone, Debug)]
struct Post {
    path: String,
    signature: Option<String>,
    body: Vec<u8>,
    json: serde_json::Value,
}

/// An HTTP server answering the given statuses in turn (the last repeats).
async fn http(statuses: &[u16]) -> (u16, Arc<Mutex<Vec<Post>>>) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    let posts = Arc::new(Mutex::new(Vec::new()));
    let (record, statuses) = (posts.clone(), statuses.to_vec());
    tokio::spawn(async move {
        let mut n = 0;
        while let Ok((mut s, _)) = listener.accept().await {
            let status = statuses[n.min(statuses.len() - 1)];
            n += 1;
            let mut buf = Vec::new();
            let mut chunk = [0u8; 16384];
            let (head, body) = loop {
                let k = s.read(&mut chunk).await.unwrap_or(0);
                if k == 0 {
                    break (String::new(), Vec::new());
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
                        let k = s.read(&mut chunk).await.unwrap_or(0);
                        if k == 0 {
                            break;
                        }
                        buf.extend_from_slice(&chunk[..k]);
                    }
                    let end = (i + 4 + len).min(buf.len());
                    break (head, buf[i + 4..end].to_vec());
                }
            };
            let header = |name: &str| {
                head.lines().find_map(|l| {
                    let (n, v) = l.split_once(':')?;
                    n.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
                })
            };
            record.lock().unwrap_or_else(|p| p.into_inner()).push(Post {
                path: head.split(' ').nth(1).unwrap_or("").to_owned(),
                signature: header("X-Webhook-Signature"),
                json: serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
                body,
            });
            let reply =
                format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            let _ = s.write_all(reply.as_bytes()).await;
        }
    });
    (port, posts)
}

fn posts(p: &Arc<Mutex<Vec<Post>>>) -> Vec<Post> {
    p.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_targets_get_the_message_as_signed_json() {
    let (ok, ok_posts) = http(&[200]).await;
    let (gone, _) = http(&[404]).await;
    let (busy, busy_posts) = http(&[503, 200]).await;
    let yaml = format!(
        r#"
domains:
  example.org:
    rules:
      - "hook:http://127.0.0.1:{ok}/in"
      - "both:a@example.net,both:http://127.0.0.1:{ok}/both"
      - "gone:http://127.0.0.1:{gone}/"
      - "busy:http://127.0.0.1:{busy}/"
    webhook_key: s3cret
webhooks: {{ allow_private: true, retries: 0, timeout: 5s }}
"#
    );
    let s = Stack::start(&yaml, Wire::Both).await;

    let t = s.send("198.51.100.40", &["hook@example.org"]).await;
    assert_eq!(t.data.as_ref().map(|r| r.code), Some(250), "{t:?}");
    let p = posts(&ok_posts);
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].path, "/in");
    assert_eq!(
        p[0].json["recipients"],
        serde_json::json!(["hook@example.org"])
    );
    assert_eq!(p[0].json["subject"], "hello");
    assert_eq!(p[0].json["session"]["sender"], "bob@example.com");
    assert_eq!(p[0].json["session"]["remoteAddress"], "198.51.100.40");
    assert_eq!(p[0].json["text"].as_str().map(str::trim), Some("Hello."));
    assert!(
        p[0].json["raw"]
            .as_str()
            .is_some_and(|r| r.contains("Subject: hello"))
    );
    // Signed with the domain's key over the body as sent.
    let tag = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"s3cret"),
        &p[0].body,
    );
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(p[0].signature.as_deref(), Some(hex.as_str()));

    // A webhook plus an address: both get it.
    let t = s.send("198.51.100.40", &["both@example.org"]).await;
    assert_eq!(t.data.as_ref().map(|r| r.code), Some(250), "{t:?}");
    let m = &s.sink.wait_for(1, Duration::from_secs(20)).await[0];
    assert_eq!(m.rcpt_to, ["a@example.net"]);
    assert_eq!(posts(&ok_posts).len(), 2);
    // The webhook-only message left nothing for the sink.
    assert_eq!(s.sink.messages().len(), 1);

    // Refused for good, nothing else to deliver: 550 at the end of DATA.
    let t = s.send("198.51.100.40", &["gone@example.org"]).await;
    let data = t.data.clone().unwrap_or_else(|| panic!("{t:?}"));
    assert_eq!(data.code, 550, "{data}");
    assert!(
        data.text()
            .contains("5.7.1 404 Not Found Error for gone@example.org"),
        "{data}"
    );

    // 503: tempfailed; the retry is posted; a third copy is not.
    let msg = smtp::message(
        "bob@example.com",
        "busy@example.org",
        "retry me",
        "Again.\r\n",
    );
    let env = Envelope {
        client_addr: "198.51.100.41",
        client_name: "mail.example.com",
        helo: "mail.example.com",
        from: "bob@example.com",
        to: &["busy@example.org"],
    };
    let send = || smtp::send(s.postfix.smtpd_addr(), &env, &msg);
    let t = send().await.unwrap_or_else(|e| panic!("{e}"));
    let data = t.data.clone().unwrap_or_else(|| panic!("{t:?}"));
    assert_eq!(data.code, 421, "{data}");
    assert!(
        data.text()
            .contains("4.3.0 503 Service Unavailable Error for busy@example.org"),
        "{data}"
    );
    let t = send().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(t.data.as_ref().map(|r| r.code), Some(250), "{t:?}");
    let t = send().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(t.data.as_ref().map(|r| r.code), Some(250), "{t:?}");
    assert_eq!(
        posts(&busy_posts).len(),
        2,
        "the third copy is not posted again"
    );
    for (result, n) in [
        ("delivered", 3.0),
        ("reject", 1.0),
        ("tempfail", 1.0),
        ("duplicate", 1.0),
    ] {
        let name = format!("mxguard_webhook_posts_total{{result=\"{result}\"}}");
        assert_eq!(s.mxguard.metric(&name).await, n, "{name}");
    }
}
