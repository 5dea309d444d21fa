//! Forwarding end to end through a real Postfix: aliases from mxguard.yaml
//! and from TXT records served by the loopback DNS server, RCPT-time
//! refusals, and the rewritten envelope and headers at the sink.

mod common;

use common::{
    dns::DnsServer,
    smtp::{self, Envelope},
    stack::{Stack, Wire},
};
use std::time::Duration;

const YAML_RULES: &str = r#"
domains:
  example.org:
    rules:
      - "alice:alice@example.net"
      - "team:a@example.net,team:b@example.net"
      - "!!!gone"
      - "!quiet"
      - "!!later"
      - "/^sales-(\\w+)$/:$1@example.net"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn yaml_aliases_are_forwarded_with_the_added_headers() {
    let s = Stack::start(YAML_RULES, Wire::Both).await;
    let t = s.send("198.51.100.20", &["Alice+News@example.org"]).await;
    assert_eq!(t.rcpts[0].code, 250, "{t:?}");
    assert_eq!(t.data.as_ref().map(|r| r.code), Some(250), "{t:?}");
    let m = &s.sink.wait_for(1, Duration::from_secs(20)).await[0];
    assert_eq!(m.rcpt_to, ["alice+News@example.net"]);
    assert_eq!(m.mail_from, "bob@example.com");
    assert_eq!(
        m.header("X-Original-To").as_deref(),
        Some("Alice+News@example.org")
    );
    assert_eq!(
        m.header("X-Mxguard-Sender").as_deref(),
        Some("rfc822; bob@example.com, mail.example.com, 198.51.100.20; by mx.mxguard.test")
    );
    assert_eq!(
        s.mxguard
            .metric(
                r#"mxguard_check_decisions_total{check="aliases",mode="enforce",verdict="forward"}"#
            )
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_disabled_aliases_are_refused_at_rcpt_and_the_rest_forwarded() {
    for wire in [Wire::Both, Wire::MilterOnly] {
        let yaml = match wire {
            Wire::Both => YAML_RULES.to_owned(),
            Wire::MilterOnly => format!("{YAML_RULES}\npolicy: {{ listen: null }}"),
        };
        let s = Stack::start(&yaml, wire).await;
        let t = s
            .send(
                "198.51.100.21",
                &[
                    "nobody@example.org",
                    "gone@example.org",
                    "later@example.org",
                    "quiet@example.org",
                    "team@example.org",
                    "sales-eu@example.org",
                ],
            )
            .await;
        let codes: Vec<u16> = t.rcpts.iter().map(|r| r.code).collect();
        assert_eq!(codes, [550, 550, 450, 250, 250, 250], "{wire:?}: {t:?}");
        for (reply, status, text) in [
            (&t.rcpts[0], "5.1.1", "nobody@example.org does not exist"),
            (&t.rcpts[1], "5.1.1", "Mailbox is disabled"),
            (&t.rcpts[2], "4.2.1", "Mailbox is disabled, try again later"),
        ] {
            let full = reply.text();
            assert!(
                full.starts_with(status) && full.ends_with(text),
                "{wire:?}: {reply}"
            );
        }
        assert_eq!(t.data.as_ref().map(|r| r.code), Some(250), "{t:?}");
        let m = &s.sink.wait_for(1, Duration::from_secs(20)).await[0];
        let mut rcpts = m.rcpt_to.clone();
        rcpts.sort();
        // quiet@ is dropped; nothing is delivered for the refused ones.
        assert_eq!(
            rcpts,
            ["a@example.net", "b@example.net", "eu@example.net"],
            "{wire:?}"
        );
        // Three recipients: no X-Original-To, but the trace.
        assert_eq!(m.header("X-Original-To"), None);
        assert!(m.header("X-Mxguard-Sender").is_some());
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(s.sink.messages().len(), 1, "{wire:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_only_for_a_discarded_alias_is_accepted_and_dropped() {
    let s = Stack::start(YAML_RULES, Wire::Both).await;
    let t = s.send("198.51.100.22", &["quiet@example.org"]).await;
    assert_eq!(t.data.as_ref().map(|r| r.code), Some(250), "{t:?}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(s.sink.messages().is_empty(), "{:?}", s.sink.messages());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mailing_list_mail_is_forwarded_with_notify_never() {
    let s = Stack::start(YAML_RULES, Wire::Both).await;
    let msg = b"From: list@lists.example.com\r\nTo: alice@example.org\r\nSubject: digest\r\n\
List-Id: <l.lists.example.com>\r\nMessage-ID: <1@lists.example.com>\r\n\r\nDigest.\r\n";
    let env = Envelope {
        client_addr: "198.51.100.23",
        client_name: "lists.example.com",
        helo: "lists.example.com",
        from: "list-bounces@lists.example.com",
        to: &["alice@example.org"],
    };
    let t = smtp::send(s.postfix.smtpd_addr(), &env, msg)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(t.data.as_ref().map(|r| r.code), Some(250), "{t:?}");
    let m = &s.sink.wait_for(1, Duration::from_secs(20)).await[0];
    assert_eq!(m.rcpt_to, ["alice@example.net"]);
    assert!(
        m.rcpt_params[0]
            .to_ascii_uppercase()
            .contains("NOTIFY=NEVER"),
        "{:?}",
        m.rcpt_params
    );
}

/// TXT rules of a domain configured for DNS: one record over 255 bytes
/// (split into character-strings on the wire) and a second record.
async fn dns_with_rules() -> DnsServer {
    let dns = DnsServer::start()
        .await
        .unwrap_or_else(|e| panic!("dns: {e}"));
    let padding: Vec<String> = (0..20).map(|i| format!("p{i}:p{i}@example.net")).collect();
    let long = format!(
        "forward-email={},world:w@example.net,hello:h@example.net",
        padding.join(",")
    );
    assert!(long.len() > 255);
    dns.add_txt("example.com", &long);
    dns.add_txt("example.com", "forward-email=!!!closed");
    dns.add_txt("example.com", "v=spf1 ?all");
    dns
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txt_aliases_from_dns_are_forwarded_through_the_milter_alone() {
    let dns = dns_with_rules().await;
    let yaml = format!(
        "domains: {{ example.com: {{ source: dns }} }}\n\
         dns: {{ nameservers: [\"{}\"] }}\n\
         policy: {{ listen: null }}",
        dns.addr()
    );
    let s = Stack::start(&yaml, Wire::MilterOnly).await;
    let t = s
        .send(
            "198.51.100.24",
            &[
                "world@example.com",
                "closed@example.com",
                "stranger@example.com",
            ],
        )
        .await;
    let codes: Vec<u16> = t.rcpts.iter().map(|r| r.code).collect();
    assert_eq!(codes, [250, 550, 550], "{t:?}");
    assert_eq!(t.data.as_ref().map(|r| r.code), Some(250), "{t:?}");
    let m = &s.sink.wait_for(1, Duration::from_secs(20)).await[0];
    assert_eq!(m.rcpt_to, ["w@example.net"]);
    // Three recipients were given, one was accepted: X-Original-To follows
    // the accepted ones.
    assert_eq!(
        m.header("X-Original-To").as_deref(),
        Some("world@example.com")
    );

    // The TXT answer is cached for its TTL: a second message asks nothing.
    let asked = dns.queries();
    let t = s.send("198.51.100.24", &["hello@example.com"]).await;
    assert_eq!(t.data.as_ref().map(|r| r.code), Some(250), "{t:?}");
    assert_eq!(dns.queries(), asked, "no new DNS query");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_trouble_tempfails_at_rcpt_through_the_policy_service() {
    let dns = dns_with_rules().await;
    dns.set_fault("example.com", common::dns::Fault::ServFail);
    let yaml = format!(
        "domains: {{ example.com: {{ source: dns }} }}\n\
         dns: {{ nameservers: [\"{}\"], timeout: 2s }}",
        dns.addr()
    );
    let s = Stack::start(&yaml, Wire::Both).await;
    let t = s.send("198.51.100.25", &["hello@example.com"]).await;
    assert_eq!(t.rcpts[0].code, 451, "{t:?}");
    assert!(t.rcpts[0].text().contains("4.4.3"), "{}", t.rcpts[0]);
    dns.clear_fault("example.com");
    let t = s.send("198.51.100.25", &["hello@example.com"]).await;
    assert_eq!(t.rcpts[0].code, 250, "{t:?}");
    let m = &s.sink.wait_for(1, Duration::from_secs(20)).await[0];
    assert_eq!(m.rcpt_to, ["h@example.net"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_mode_lets_unknown_aliases_through_unchanged() {
    for wire in [Wire::Both, Wire::MilterOnly] {
        let mut yaml = format!("{YAML_RULES}\nmode: report");
        if wire == Wire::MilterOnly {
            yaml.push_str("\npolicy: { listen: null }");
        }
        let s = Stack::start(&yaml, wire).await;
        let t = s
            .send(
                "198.51.100.26",
                &["nobody@example.org", "alice@example.org"],
            )
            .await;
        let codes: Vec<u16> = t.rcpts.iter().map(|r| r.code).collect();
        assert_eq!(codes, [250, 250], "{wire:?}: {t:?}");
        assert_eq!(
            t.data.as_ref().map(|r| r.code),
            Some(250),
            "{wire:?}: {t:?}"
        );
        let m = &s.sink.wait_for(1, Duration::from_secs(20)).await[0];
        let mut rcpts = m.rcpt_to.clone();
        rcpts.sort();
        assert_eq!(
            rcpts,
            ["alice@example.net", "nobody@example.org"],
            "{wire:?}"
        );
        assert_eq!(
            s.mxguard
                .metric(r#"mxguard_check_decisions_total{check="aliases",mode="report",verdict="reject"}"#)
                .await,
            1.0,
            "{wire:?}: counted once"
        );
    }
}
