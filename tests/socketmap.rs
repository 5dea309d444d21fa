//! The socketmap front end: the protocol over TCP, and Postfix itself
//! looking domains up (postmap) and routing a forwarded copy to a custom
//! port through transport_maps.

mod common;

use common::{
    daemon::Mxguard,
    postfix::{Postfix, Wiring},
    sink::Sink,
    smtp::{self, Envelope},
};
use std::{process::Command, time::Duration};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const YAML: &str = r#"
domains:
  example.org: { rules: ["alice:alice@example.net", "hello:127.0.0.1"], port: 0 }
"#;

fn netstring(s: &str) -> String {
    format!("{}:{s},", s.len())
}

async fn ask(stream: &mut TcpStream, requests: &[&str]) -> Vec<String> {
    let wire: String = requests.iter().map(|r| netstring(r)).collect();
    stream
        .write_all(wire.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut answers = Vec::new();
    let mut buf = Vec::new();
    while answers.len() < requests.len() {
        let mut chunk = [0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk))
            .await
            .unwrap_or_else(|_| panic!("no answer; got {answers:?}"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(n > 0, "closed early; got {answers:?}");
        buf.extend_from_slice(&chunk[..n]);
        while let Some(colon) = buf.iter().position(|&b| b == b':') {
            let len: usize = String::from_utf8_lossy(&buf[..colon]).parse().unwrap_or(0);
            if buf.len() < colon + len + 2 {
                break;
            }
            assert_eq!(buf[colon + 1 + len], b',');
            answers.push(String::from_utf8_lossy(&buf[colon + 1..colon + 1 + len]).into_owned());
            buf.drain(..colon + len + 2);
        }
    }
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domains_and_transport_maps_are_answered_in_order() {
    let d = Mxguard::start(&YAML.replace(", port: 0", "")).await;
    let mut s = TcpStream::connect(d.socketmap_addr())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let answers = ask(
        &mut s,
        &[
            "domains example.org",
            "domains EXAMPLE.ORG",
            "domains example.com",
            "domains .example.org",
            "domains alice@example.org",
            "transport alice@example.net",
            "transport example.net",
            "nosuch x",
        ],
    )
    .await;
    assert_eq!(
        answers,
        [
            "OK example.org",
            "OK example.org",
            "NOTFOUND ",
            "NOTFOUND ",
            "OK example.org",
            "NOTFOUND ",
            "NOTFOUND ",
            "PERM unknown map nosuch"
        ]
    );
    assert_eq!(
        d.metric(r#"mxguard_socketmap_requests_total{map="domains",result="ok"}"#)
            .await,
        3.0
    );
    // Malformed input: a PERM answer, then the connection is closed.
    s.write_all(b"abc:x,")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    assert_eq!(
        String::from_utf8_lossy(&rest),
        netstring("PERM malformed request")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postfix_looks_domains_up_and_routes_a_custom_port() {
    // The custom port is the second sink's.
    let custom = Sink::start().await.unwrap_or_else(|e| panic!("{e}"));
    let yaml = YAML.replace("port: 0", &format!("port: {}", custom.addr().port()));
    let d = Mxguard::start(&yaml).await;
    let sink = Sink::start().await.unwrap_or_else(|e| panic!("{e}"));
    let map = format!("socketmap:inet:{}", d.socketmap_addr());
    let wiring = Wiring {
        policy: Some(d.policy_wiring()),
        milter: Some(d.milter_wiring()),
    };
    let pf = Postfix::start(
        sink.addr().port(),
        &wiring,
        &[
            ("relay_domains", &format!("{map}:domains")),
            ("transport_maps", &format!("{map}:transport")),
        ],
    );
    let postmap = |key: &str| {
        Command::new("postmap")
            .arg("-c")
            .arg(pf.config_dir())
            .args(["-q", key, &format!("{map}:domains")])
            .output()
            .unwrap_or_else(|e| panic!("postmap: {e}"))
    };
    let found = postmap("example.org");
    assert_eq!(found.status.code(), Some(0), "{found:?}");
    assert_eq!(String::from_utf8_lossy(&found.stdout).trim(), "example.org");
    assert_eq!(postmap("example.com").status.code(), Some(1));

    // Relayed because the socketmap says so; forwarded to hello@[127.0.0.1]
    // on the custom port, whatever relay_transport says.
    let msg = smtp::message("bob@example.com", "hello@example.org", "port", "Hi.\r\n");
    let env = Envelope {
        client_addr: "198.51.100.30",
        client_name: "mail.example.com",
        helo: "mail.example.com",
        from: "bob@example.com",
        to: &["hello@example.org", "nobody@example.com"],
    };
    let t = smtp::send(pf.smtpd_addr(), &env, &msg)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(t.rcpts[0].code, 250, "{t:?}");
    // example.com is not relayed: Postfix refuses it itself.
    assert_eq!(t.rcpts[1].code, 454, "{t:?}");
    let m = &custom.wait_for(1, Duration::from_secs(20)).await[0];
    assert_eq!(m.rcpt_to, ["hello@[127.0.0.1]"]);
    assert!(sink.messages().is_empty());
}
