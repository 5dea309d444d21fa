//! Member provisioning: a roster served over HTTP on loopback becomes the
//! aliases of a domain; syncs add and remove; a broken roster and a
//! truncated one keep the last good set; the set survives a restart; and
//! through real Postfix a new member's address forwards and a removed one's
//! is refused at RCPT.

mod common;

use common::{
    daemon::Mxguard,
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

/// An HTTP server answering GETs with the current roster (or a status of
/// the test's choice) and recording the POSTs it gets (notifications).
struct Server {
    port: u16,
    roster: Arc<Mutex<(u16, String)>>,
    posts: Arc<Mutex<Vec<serde_json::Value>>>,
}

async fn server(roster: &str) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    let state = Arc::new(Mutex::new((200u16, roster.to_owned())));
    let posts = Arc::new(Mutex::new(Vec::new()));
    let (st, ps) = (state.clone(), posts.clone());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 8192];
            loop {
                let n = s.read(&mut chunk).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf).into_owned();
                if let Some(i) = text.find("\r\n\r\n") {
                    let len: usize = text[..i]
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    if buf.len() >= i + 4 + len {
                        break;
                    }
                }
            }
            let text = String::from_utf8_lossy(&buf).into_owned();
            let reply = if text.starts_with("POST") {
                let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
                ps.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(serde_json::from_str(body).unwrap_or_default());
                "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_owned()
            } else {
                let (status, body) = st.lock().unwrap_or_else(|p| p.into_inner()).clone();
                format!(
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
            };
            let _ = s.write_all(reply.as_bytes()).await;
        }
    });
    Server {
        port,
        roster: state,
        posts,
    }
}

impl Server {
    fn set(&self, status: u16, body: &str) {
        *self.roster.lock().unwrap_or_else(|p| p.into_inner()) = (status, body.to_owned());
    }
    fn posts(&self) -> Vec<serde_json::Value> {
        self.posts.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

fn roster(members: &[(&str, &str, bool)]) -> String {
    let list: Vec<serde_json::Value> = members
        .iter()
        .map(|(u, f, valid)| serde_json::json!({"username": u, "forward": f, "is_valid": valid, "teams": ["core"]}))
        .collect();
    serde_json::json!({ "members": list }).to_string()
}

fn yaml(port: u16, extra: &str) -> String {
    format!(
        "domains:\n  example.org:\n    source: roster\n    roster:\n      url: \"http://127.0.0.1:{port}/members.json\"\n      \
         require: {{ is_valid: \"true\", teams: core }}\n      banned: [mallory]\n      refresh: 1h\n      \
         notify_webhook: \"http://127.0.0.1:{port}/notify\"\n  alumni.example.org:\n    source: roster\n    roster:\n      \
         url: \"http://127.0.0.1:{port}/members.json\"\n      refresh: 1h\n{extra}"
    )
}

async fn sync(d: &Mxguard, query: &str) -> Vec<serde_json::Value> {
    let addr = mxguard::config::ListenAddr::Inet {
        host: "127.0.0.1".into(),
        port: d.http_addr().port(),
    };
    let path = format!("/roster/sync{query}");
    let (status, body) =
        tokio::task::spawn_blocking(move || mxguard::http::request(&addr, "POST", &path))
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

async fn verdict(d: &Mxguard, rcpt: &str) -> String {
    d.ask_rcpt("198.51.100.70", "mail.example.com", rcpt, 0)
        .await
}

async fn wait_synced(d: &Mxguard) {
    for _ in 0..50 {
        if d.metric(r#"mxguard_roster_syncs_total{domain="example.org",result="ok"}"#)
            .await
            >= 1.0
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the first sync did not happen");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rosters_provision_sync_and_keep_the_last_good_set() {
    let members = [
        ("alice", "alice@example.net", true),
        ("Bob", "bob@example.net", true),
        ("carol", "carol@example.net", false),
        ("mallory", "m@example.net", true),
        ("dave", "dave@example.net", true),
        ("erin", "erin@example.net", true),
    ];
    let srv = server(&roster(&members)).await;
    let store_dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let extra = format!(
        "store: {{ path: \"{}/state.db\" }}\n",
        store_dir.path().display()
    );
    let d = Mxguard::start(&yaml(srv.port, &extra)).await;
    wait_synced(&d).await;

    // Eligible members forward (one roster, two domains); the rest do not exist.
    assert_eq!(verdict(&d, "alice@example.org").await, "action=DUNNO");
    assert_eq!(verdict(&d, "bob@example.org").await, "action=DUNNO");
    assert_eq!(
        verdict(&d, "carol@alumni.example.org").await,
        "action=DUNNO",
        "no requirement there"
    );
    for nobody in [
        "carol@example.org",
        "mallory@example.org",
        "zed@example.org",
    ] {
        let v = verdict(&d, nobody).await;
        assert!(
            v.starts_with("action=550 5.1.1") && v.ends_with("does not exist"),
            "{nobody}: {v}"
        );
    }
    // The admins heard of the new addresses. The notification is sent once
    // the sync is applied, so it may land a moment after the answers above.
    let heard = |posts: &[serde_json::Value]| {
        posts.iter().any(|p| {
            p["domain"] == "example.org" && p["added"].as_array().is_some_and(|a| a.len() == 4)
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !heard(&srv.posts()) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let posts = srv.posts();
    assert!(heard(&posts), "{posts:?}");

    // A dry run shows the diff and changes nothing.
    srv.set(
        200,
        &roster(&[
            ("alice", "alice@new.example", true),
            ("bob", "bob@example.net", true),
            ("carol", "carol@example.net", false),
            ("mallory", "m@example.net", true),
            ("dave", "dave@example.net", true),
            ("erin", "erin@example.net", true),
            ("frank", "frank@example.net", true),
        ]),
    );
    let r = sync(&d, "?dry_run=1").await;
    let org = r
        .iter()
        .find(|x| x["domain"] == "example.org")
        .unwrap_or_else(|| panic!("{r:?}"));
    assert_eq!(org["added"], serde_json::json!(["frank@example.org"]));
    assert_eq!(
        org["changed"],
        serde_json::json!(["alice@example.org: alice@example.net -> alice@new.example"])
    );
    assert_eq!(org["applied"], false);
    assert!(
        verdict(&d, "frank@example.org")
            .await
            .starts_with("action=550")
    );
    // Applied.
    let r = sync(&d, "").await;
    assert!(r.iter().all(|x| x["applied"] == true), "{r:?}");
    assert_eq!(verdict(&d, "frank@example.org").await, "action=DUNNO");

    // A broken roster keeps the last good set.
    srv.set(500, "oops");
    let r = sync(&d, "").await;
    assert!(
        r.iter()
            .all(|x| x["error"].is_string() && x["applied"] == false),
        "{r:?}"
    );
    assert_eq!(verdict(&d, "frank@example.org").await, "action=DUNNO");
    srv.set(200, "{\"members\": 3}");
    let r = sync(&d, "").await;
    assert!(r.iter().all(|x| x["applied"] == false), "{r:?}");

    // A truncated roster (4 of 5 gone) is refused unless forced.
    srv.set(200, &roster(&[("alice", "alice@new.example", true)]));
    let r = sync(&d, "").await;
    let org = r
        .iter()
        .find(|x| x["domain"] == "example.org")
        .unwrap_or_else(|| panic!("{r:?}"));
    assert!(
        org["error"]
            .as_str()
            .is_some_and(|e| e.contains("max_drop")),
        "{org}"
    );
    assert_eq!(verdict(&d, "bob@example.org").await, "action=DUNNO");
    assert_eq!(
        d.metric(r#"mxguard_roster_syncs_total{domain="example.org",result="refused"}"#)
            .await,
        1.0
    );
    let r = sync(&d, "?force=1").await;
    assert!(r.iter().all(|x| x["applied"] == true), "{r:?}");
    assert!(
        verdict(&d, "bob@example.org")
            .await
            .starts_with("action=550")
    );
    assert_eq!(
        d.metric(r#"mxguard_roster_members{domain="example.org"}"#)
            .await,
        1.0
    );

    // A restart starts from the saved set, even with the roster down.
    d.stop().await.unwrap_or_else(|e| panic!("{e}"));
    srv.set(503, "down");
    let d = Mxguard::start(&yaml(srv.port, &extra)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(verdict(&d, "alice@example.org").await, "action=DUNNO");
    assert!(
        verdict(&d, "bob@example.org")
            .await
            .starts_with("action=550")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_postfix_new_members_forward_and_removed_ones_are_refused() {
    let srv = server(&roster(&[
        ("alice", "alice@example.net", true),
        ("bob", "bob@example.net", true),
    ]))
    .await;
    let s = Stack::start(&yaml(srv.port, ""), Wire::Both).await;
    wait_synced(&s.mxguard).await;
    srv.set(
        200,
        &roster(&[
            ("alice", "alice@example.net", true),
            ("carol", "carol@example.net", true),
        ]),
    );
    let r = sync(&s.mxguard, "?force=1").await;
    assert!(r.iter().all(|x| x["applied"] == true), "{r:?}");
    let t = s
        .send("198.51.100.71", &["carol@example.org", "bob@example.org"])
        .await;
    assert_eq!(t.rcpts[0].code, 250, "{t:?}");
    assert_eq!(t.rcpts[1].code, 550, "{t:?}");
    assert!(
        t.rcpts[1].text().contains("bob@example.org does not exist"),
        "{}",
        t.rcpts[1]
    );
    let m = &s.sink.wait_for(1, Duration::from_secs(20)).await[0];
    assert_eq!(m.rcpt_to, ["carol@example.net"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_shows_the_diff_and_applies_it() {
    let srv = server(&roster(&[("alice", "alice@example.net", true)])).await;
    let d = Mxguard::start(&yaml(srv.port, "")).await;
    wait_synced(&d).await;
    srv.set(
        200,
        &roster(&[
            ("alice", "alice@example.net", true),
            ("bob", "bob@example.net", true),
            ("postmaster", "p@example.net", true),
        ]),
    );
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let config = dir.path().join("mxguard.yaml");
    std::fs::write(
        &config,
        format!("http: {{ listen: \"{}\" }}\n", d.http_addr()),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let run = |args: &'static [&'static str]| {
        let config = config.clone();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_mxguard"))
                .args(["roster", "sync", "-c"])
                .arg(&config)
                .args(args)
                .output()
                .unwrap_or_else(|e| panic!("{e}"))
        })
    };
    let out = run(&["--dry-run"]).await.unwrap_or_else(|e| panic!("{e}"));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("example.org: 2 members; dry run, nothing changed"),
        "{text}"
    );
    assert!(text.contains("  + bob@example.org"), "{text}");
    assert!(text.contains("  ! postmaster: a reserved name"), "{text}");
    assert!(
        verdict(&d, "bob@example.org")
            .await
            .starts_with("action=550")
    );
    let out = run(&[]).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(String::from_utf8_lossy(&out.stdout).contains("applied"));
    assert_eq!(verdict(&d, "bob@example.org").await, "action=DUNNO");
    assert!(
        verdict(&d, "postmaster@example.org")
            .await
            .starts_with("action=550")
    );
    // mxguard resolve shows where a provisioned address goes.
    let full = dir.path().join("full.yaml");
    std::fs::write(&full, yaml(srv.port, "")).unwrap_or_else(|e| panic!("{e}"));
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_mxguard"))
            .args(["resolve", "-c"])
            .arg(&full)
            .arg("Bob@example.org")
            .output()
            .unwrap_or_else(|e| panic!("{e}"))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let json: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        json["targets"],
        serde_json::json!(["bob@example.net"]),
        "{json}"
    );
}
