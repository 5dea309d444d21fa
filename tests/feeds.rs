//! Denylist and backscatter feeds: files read on an interval, through the
//! policy front end and through real Postfix.

mod common;

use common::{
    daemon::Mxguard,
    smtp::{self, Envelope},
    stack::{Stack, Wire},
};
use std::{path::Path, time::Duration};

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

#[tokio::test]
async fn listed_clients_get_421_with_the_way_to_removal() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (a, b) = (dir.path().join("a.txt"), dir.path().join("b.rbldnsd"));
    write(&a, "# plain\n198.51.100.7\n");
    write(&b, "$TTL 3600\n:127.0.0.2:listed\n192.0.2.0/24\n");
    let d = Mxguard::start(&format!(
        "denylist: {{ removal_url: \"https://mx.example.org/denylist\", feeds: [\
         {{ name: local, path: \"{}\" }}, {{ name: uceprotect, path: \"{}\" }}] }}\n\
         allowlist: {{ entries: [192.0.2.99] }}",
        a.display(),
        b.display()
    ))
    .await;
    assert_eq!(
        d.ask_rcpt("198.51.100.7", "unknown", "alice@example.org", 0)
            .await,
        "action=421 4.7.1 The IP 198.51.100.7 is listed on local; to request removal, visit \
         https://mx.example.org/denylist?q=198.51.100.7"
    );
    assert!(
        d.ask_rcpt("192.0.2.5", "unknown", "alice@example.org", 0)
            .await
            .contains("is listed on uceprotect")
    );
    assert_eq!(
        d.ask_rcpt("192.0.2.99", "unknown", "alice@example.org", 0)
            .await,
        "action=DUNNO",
        "allowlisted"
    );
    assert_eq!(
        d.ask_rcpt("203.0.113.1", "unknown", "alice@example.org", 0)
            .await,
        "action=DUNNO"
    );
    assert_eq!(
        d.metric(r#"mxguard_feed_entries{feed="uceprotect"}"#).await,
        1.0
    );
    assert_eq!(
        d.metric(
            r#"mxguard_check_decisions_total{check="denylist",mode="enforce",verdict="tempfail"}"#
        )
        .await,
        2.0
    );

    let d = Mxguard::start(&format!(
        "denylist: {{ feeds: [{{ name: local, path: \"{}\" }}] }}",
        a.display()
    ))
    .await;
    assert_eq!(
        d.ask_rcpt("198.51.100.7", "unknown", "alice@example.org", 0)
            .await,
        "action=421 4.7.1 The IP 198.51.100.7 is listed on local; to be removed, ask the maintainers of local"
    );
}

#[tokio::test]
async fn feeds_are_reread_keep_dropped_entries_for_the_grace_and_survive_a_broken_file() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = dir.path().join("feed.txt");
    write(&path, "198.51.100.7\n198.51.100.8\n");
    let d = Mxguard::start(&format!(
        "denylist: {{ feeds: [{{ name: f, path: \"{}\", refresh: 200ms, grace: 1s }}] }}",
        path.display()
    ))
    .await;
    assert!(
        d.ask_rcpt("198.51.100.8", "unknown", "a@example.org", 0)
            .await
            .starts_with("action=421")
    );
    // Truncated to nothing: the last good copy stays.
    write(&path, "");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        d.ask_rcpt("198.51.100.8", "unknown", "a@example.org", 0)
            .await
            .starts_with("action=421")
    );
    assert!(
        d.metric(r#"mxguard_feed_loads_total{feed="f",result="error"}"#)
            .await
            >= 1.0
    );
    // 198.51.100.8 drops out: listed for the grace, then not.
    write(&path, "198.51.100.7\n203.0.113.50\n");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        d.ask_rcpt("203.0.113.50", "unknown", "a@example.org", 0)
            .await
            .starts_with("action=421"),
        "new entry"
    );
    assert!(
        d.ask_rcpt("198.51.100.8", "unknown", "a@example.org", 0)
            .await
            .starts_with("action=421"),
        "in grace"
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        d.ask_rcpt("198.51.100.8", "unknown", "a@example.org", 0)
            .await,
        "action=DUNNO",
        "after the grace"
    );
}

#[tokio::test]
async fn bounces_from_backscatter_sources_get_554() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = dir.path().join("backscatter.txt");
    write(&path, "203.0.113.9\n");
    let d = Mxguard::start(&format!(
        "backscatter: {{ feed: {{ name: backscatterer.org, path: \"{}\" }} }}",
        path.display()
    ))
    .await;
    let refused = "action=REJECT 5.7.1 The IP 203.0.113.9 is listed on backscatterer.org, a list of servers that send \
                   misdirected bounces; this server does not take bounces from it";
    assert_eq!(
        d.ask_rcpt_from("203.0.113.9", "unknown", "", "alice@example.org", 0)
            .await,
        refused
    );
    assert_eq!(
        d.ask_rcpt_from(
            "203.0.113.9",
            "unknown",
            "MAILER-DAEMON@example.com",
            "alice@example.org",
            0
        )
        .await,
        refused
    );
    assert_eq!(
        d.ask_rcpt_from(
            "203.0.113.9",
            "unknown",
            "alice@example.com",
            "alice@example.org",
            0
        )
        .await,
        "action=DUNNO",
        "not a bounce"
    );
    assert_eq!(
        d.ask_rcpt_from("198.51.100.1", "unknown", "", "alice@example.org", 0)
            .await,
        "action=DUNNO",
        "not listed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_postfix_denylisted_get_421_and_backscatter_554() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (deny, bs) = (dir.path().join("deny.txt"), dir.path().join("bs.txt"));
    write(&deny, "198.51.100.66\n");
    write(&bs, "203.0.113.9\n");
    for wire in [Wire::Both, Wire::MilterOnly] {
        let policy_off = if wire == Wire::MilterOnly {
            "policy: { listen: null }\n"
        } else {
            ""
        };
        let s = Stack::start(
            &format!(
                "{policy_off}denylist: {{ feeds: [{{ name: dl, path: \"{}\" }}] }}\n\
                 backscatter: {{ feed: {{ name: bs, path: \"{}\" }} }}",
                deny.display(),
                bs.display()
            ),
            wire,
        )
        .await;
        let t = s.send("198.51.100.66", &["alice@example.org"]).await;
        assert_eq!(t.rcpts[0].code, 421, "{wire:?}: {t:?}");
        assert!(t.rcpts[0].text().ends_with(
            "The IP 198.51.100.66 is listed on dl; to be removed, ask the maintainers of dl"
        ));
        let bounce = Envelope {
            client_addr: "203.0.113.9",
            client_name: "bounces.example.net",
            helo: "bounces.example.net",
            from: "",
            to: &["alice@example.org"],
        };
        let msg = smtp::message(
            "MAILER-DAEMON@example.net",
            "alice@example.org",
            "Undelivered",
            "Bounce.\r\n",
        );
        let t = smtp::send(s.postfix.smtpd_addr(), &bounce, &msg)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.rcpts[0].code, 554, "{wire:?}: {t:?}");
        assert!(t.rcpts[0].text().starts_with("5.7.1 "), "{t:?}");
        assert!(
            t.rcpts[0]
                .text()
                .contains("The IP 203.0.113.9 is listed on bs"),
            "{t:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(s.sink.messages().is_empty(), "{wire:?}");
    }
}

/// A one-route HTTP server for feeds: serves whatever `body` holds now, or
/// 404 when it is empty.
async fn feed_server(body: std::sync::Arc<std::sync::Mutex<Vec<u8>>>) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let mut buf = [0u8; 2048];
            let _ = s.read(&mut buf).await;
            let now = body.lock().map(|b| b.clone()).unwrap_or_default();
            let head = if now.is_empty() {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    .to_owned()
            } else {
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    now.len()
                )
            };
            let _ = s.write_all(head.as_bytes()).await;
            let _ = s.write_all(&now).await;
        }
    });
    addr
}

#[tokio::test]
async fn feeds_are_fetched_from_urls_gzipped_or_not() {
    use std::io::Write;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(b"# rbldnsd\n:127.0.0.2:listed\n198.51.100.7\n")
        .unwrap_or_else(|e| panic!("{e}"));
    let body = std::sync::Arc::new(std::sync::Mutex::new(
        gz.finish().unwrap_or_else(|e| panic!("{e}")),
    ));
    let addr = feed_server(body.clone()).await;
    let d = Mxguard::start(&format!(
        "denylist: {{ feeds: [{{ name: web, url: \"http://{addr}/dnsbl.gz\", refresh: 300ms }}] }}"
    ))
    .await;
    assert!(
        d.ask_rcpt("198.51.100.7", "unknown", "a@example.org", 0)
            .await
            .contains("is listed on web")
    );
    // The server fails: the last good copy stays.
    if let Ok(mut b) = body.lock() {
        b.clear();
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        d.ask_rcpt("198.51.100.7", "unknown", "a@example.org", 0)
            .await
            .contains("is listed on web")
    );
    assert!(
        d.metric(r#"mxguard_feed_loads_total{feed="web",result="error"}"#)
            .await
            >= 1.0
    );
    // Plain text works too.
    if let Ok(mut b) = body.lock() {
        *b = b"203.0.113.77\n".to_vec();
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        d.ask_rcpt("203.0.113.77", "unknown", "a@example.org", 0)
            .await
            .contains("is listed on web")
    );
}
