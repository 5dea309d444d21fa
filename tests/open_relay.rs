//! mxguard never makes Postfix an open relay: with the documented wiring
//! (relay_domains from mxguard's socketmap, the policy service and the
//! milter), a remote client gets mail forwarded only for the domains the
//! operator configured or DNS-enabled. A domain whose owner publishes
//! `forward-email=` records in its own DNS is not relayed, and address
//! tricks (percent hack, bang path, source route, foreign SRS) do not turn
//! a handled domain into a relay. The socketmap is asked too: it must not
//! answer OK for a domain that is not handled.

mod common;

use common::{
    daemon::Mxguard,
    postfix::{Postfix, Wiring},
    sink::Sink,
    smtp::{self, Envelope},
};
use std::time::Duration;

const YAML: &str = r#"
domains:
  example.org: { rules: ["alice:alice@example.net"] }
  forwarded.test: { source: dns }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_configured_and_dns_enabled_domains_are_relayed() {
    let d = Mxguard::start(YAML).await;
    // The operator enabled DNS rules for forwarded.test; attacker.test
    // publishes the same kind of record but was never enabled.
    d.dns
        .add_txt("forwarded.test", "forward-email=bob@example.net");
    d.dns
        .add_txt("attacker.test", "forward-email=victim@example.net");
    let sink = Sink::start().await.unwrap_or_else(|e| panic!("{e}"));
    let map = format!("socketmap:inet:{}:domains", d.socketmap_addr());
    let wiring = Wiring {
        policy: Some(d.policy_wiring()),
        milter: Some(d.milter_wiring()),
    };
    let pf = Postfix::start(sink.addr().port(), &wiring, &[("relay_domains", &map)]);

    let rcpts = [
        // Forwarded: configured, and DNS-enabled.
        "alice@example.org",
        "anyone@forwarded.test",
        // Not handled: refused by Postfix itself (relay access denied).
        "someone@attacker.test",
        "victim@example.net",
        "SRS0=abcd=TT=attacker.test=victim@attacker.test",
        // Sender-specified routing through a handled domain: Postfix's
        // allow_untrusted_routing = no refuses it before mxguard is asked.
        "victim%attacker.test@example.org",
        "attacker.test!victim@example.org",
        // A source route: Postfix drops the route and sees attacker.test.
        "@example.org:victim@attacker.test",
    ];
    let msg = smtp::message(
        "spammer@example.com",
        "alice@example.org",
        "relay",
        "Hi.\r\n",
    );
    let env = Envelope {
        client_addr: "203.0.113.9",
        client_name: "mail.attacker.test",
        helo: "mail.attacker.test",
        from: "spammer@example.com",
        to: &rcpts,
    };
    let t = smtp::send(pf.smtpd_addr(), &env, &msg)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let codes: Vec<(&str, u16)> = rcpts
        .iter()
        .zip(&t.rcpts)
        .map(|(r, reply)| (*r, reply.code))
        .collect();
    assert_eq!(
        codes,
        [
            ("alice@example.org", 250),
            ("anyone@forwarded.test", 250),
            ("someone@attacker.test", 454),
            ("victim@example.net", 454),
            ("SRS0=abcd=TT=attacker.test=victim@attacker.test", 454),
            ("victim%attacker.test@example.org", 454),
            ("attacker.test!victim@example.org", 454),
            ("@example.org:victim@attacker.test", 454),
        ],
        "{t:?}"
    );
    for r in &t.rcpts[2..] {
        assert!(r.text().contains("Relay access denied"), "{r:?}");
    }
    assert_eq!(t.data.as_ref().map(|r| r.code), Some(250), "{t:?}");
    // What Postfix's relay_domains lookup gets from mxguard.
    for (domain, found) in [
        ("example.org", true),
        ("forwarded.test", true),
        ("attacker.test", false),
        ("example.net", false),
    ] {
        let out = std::process::Command::new("postmap")
            .arg("-c")
            .arg(pf.config_dir())
            .args(["-q", domain, &map])
            .output()
            .unwrap_or_else(|e| panic!("postmap: {e}"));
        assert_eq!(
            out.status.code(),
            Some(if found { 0 } else { 1 }),
            "{domain}: {out:?}"
        );
    }

    // One copy, to the two forwarding targets and nobody else.
    let got = sink.wait_for(1, Duration::from_secs(20)).await;
    let mut to: Vec<String> = got.iter().flat_map(|m| m.rcpt_to.clone()).collect();
    to.sort();
    assert_eq!(to, ["alice@example.net", "bob@example.net"]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(sink.messages().len(), got.len());
}
