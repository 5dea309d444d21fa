//! Allowlist, recipient limit and rate limit, through the policy front end
//! and through real Postfix wired both ways.

mod common;

use common::{
    daemon::Mxguard,
    stack::{Stack, Wire},
};
use std::time::Duration;

#[tokio::test]
async fn message_101_from_one_client_to_one_recipient_in_an_hour_gets_421() {
    let d = Mxguard::start("").await;
    for n in 1..=100 {
        assert_eq!(
            d.ask_rcpt("198.51.100.7", "mx.example.com", "alice@example.org", 0)
                .await,
            "action=DUNNO",
            "message {n}"
        );
    }
    assert_eq!(
        d.ask_rcpt("198.51.100.8", "mx2.example.com", "alice@example.org", 0)
            .await,
        "action=421 4.7.0 Rate limit exceeded: more than 100 messages in 1h from example.com to this recipient; \
         please try again later",
        "hosts of one organisation count together"
    );
    assert_eq!(
        d.ask_rcpt("198.51.100.7", "mx.example.com", "bob@example.org", 0)
            .await,
        "action=DUNNO"
    );
    assert_eq!(
        d.metric(
            r#"mxguard_check_decisions_total{check="ratelimit",mode="enforce",verdict="tempfail"}"#
        )
        .await,
        1.0
    );
}

#[tokio::test]
async fn the_51st_recipient_of_a_message_gets_452() {
    let d = Mxguard::start("").await;
    assert_eq!(
        d.ask_rcpt("198.51.100.7", "unknown", "r49@example.org", 49)
            .await,
        "action=DUNNO"
    );
    assert_eq!(
        d.ask_rcpt("198.51.100.7", "unknown", "r50@example.org", 50)
            .await,
        "action=452 4.5.3 Too many recipients: at most 50 per message; send the others in another message"
    );
    let d = Mxguard::start("ratelimit: { max_recipients: 2 }").await;
    assert!(
        d.ask_rcpt("198.51.100.7", "unknown", "r@example.org", 2)
            .await
            .starts_with("action=452 4.5.3 ")
    );
}

#[tokio::test]
async fn allowlisted_clients_skip_greylisting_and_rate_limits_forged_names_do_not() {
    let d = Mxguard::start(
        "greylist: { enabled: true }\nratelimit: { messages_per_recipient: 1 }\n\
         allowlist: { entries: [192.0.2.0/24, example.com] }\nlocal_domains: [example.net]",
    )
    .await;
    for _ in 0..3 {
        assert_eq!(
            d.ask_rcpt("192.0.2.10", "unknown", "a@example.org", 0)
                .await,
            "action=DUNNO"
        );
        assert_eq!(
            d.ask_rcpt("198.51.100.1", "mx.example.com", "a@example.org", 0)
                .await,
            "action=DUNNO"
        );
        assert_eq!(
            d.ask_rcpt("198.51.100.2", "mx.example.net", "a@example.org", 0)
                .await,
            "action=DUNNO"
        );
    }
    // The same domain, but only claimed (no verified name): greylisted.
    assert!(
        d.ask_rcpt("203.0.113.1", "unknown", "a@example.org", 0)
            .await
            .starts_with("action=450 4.7.1 ")
    );
    // The recipient limit applies to everyone.
    assert!(
        d.ask_rcpt("192.0.2.10", "unknown", "a@example.org", 50)
            .await
            .starts_with("action=452 4.5.3 ")
    );
    assert_eq!(
        d.metric(
            r#"mxguard_check_decisions_total{check="allowlist",mode="enforce",verdict="accept"}"#
        )
        .await,
        10.0
    );
}

#[tokio::test]
async fn one_check_can_report_while_the_others_enforce() {
    let d = Mxguard::start(
        "greylist: { enabled: true, mode: report }\nratelimit: { messages_per_recipient: 1 }",
    )
    .await;
    assert_eq!(
        d.ask_rcpt("198.51.100.7", "unknown", "a@example.org", 0)
            .await,
        "action=DUNNO"
    );
    assert!(
        d.ask_rcpt("198.51.100.7", "unknown", "a@example.org", 0)
            .await
            .starts_with("action=421 4.7.0 Rate limit")
    );
    assert_eq!(
        d.metric(
            r#"mxguard_check_decisions_total{check="greylist",mode="report",verdict="tempfail"}"#
        )
        .await,
        2.0
    );
    // And the other way round: everything reported but greylisting.
    let d = Mxguard::start("mode: report\ngreylist: { enabled: true, mode: enforce }").await;
    assert!(
        d.ask_rcpt("198.51.100.7", "unknown", "a@example.org", 50)
            .await
            .starts_with("action=450 4.7.1 ")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_postfix_limits_and_allowlist_give_their_codes() {
    for wire in [Wire::Both, Wire::MilterOnly] {
        let policy_off = if wire == Wire::MilterOnly {
            "policy: { listen: null }\n"
        } else {
            ""
        };
        let s = Stack::start(
            &format!(
                "{policy_off}greylist: {{ enabled: true }}\n\
                 ratelimit: {{ max_recipients: 3, messages_per_recipient: 2 }}\nallowlist: {{ entries: [192.0.2.0/24] }}"
            ),
            wire,
        )
        .await;
        let prefix = |rcpt: &str| match wire {
            Wire::Both => format!("<{rcpt}>: Recipient address rejected: "),
            Wire::MilterOnly => String::new(),
        };
        // Allowlisted: not greylisted; the 4th recipient gets 452.
        let rcpts = [
            "a@example.org",
            "b@example.org",
            "c@example.org",
            "d@example.org",
        ];
        let t = s.send("192.0.2.10", &rcpts).await;
        let codes: Vec<u16> = t.rcpts.iter().map(|r| r.code).collect();
        assert_eq!(codes, [250, 250, 250, 452], "{wire:?}: {t:?}");
        assert_eq!(
            t.rcpts[3].text(),
            format!(
                "4.5.3 {}Too many recipients: at most 3 per message; send the others in another message",
                prefix("d@example.org")
            ),
            "{wire:?}"
        );
        assert_eq!(t.data.as_ref().map(|r| r.code), Some(250), "{wire:?}");
        s.sink.wait_for(1, Duration::from_secs(20)).await;

        // Not allowlisted: greylisted.
        let t = s.send("198.51.100.50", &["a@example.org"]).await;
        assert_eq!(t.rcpts[0].code, 450, "{wire:?}: {t:?}");

        // The rate limit, with the default 100 an hour: message 101 from one
        // client to one recipient gets 421 and the session ends.
        let s = Stack::start(policy_off, wire).await;
        for n in 1..=100 {
            let t = s.send("198.51.100.60", &["a@example.org"]).await;
            assert_eq!(t.rcpts[0].code, 250, "{wire:?}: message {n}: {t:?}");
        }
        let t = s.send("198.51.100.60", &["a@example.org"]).await;
        assert_eq!(t.rcpts[0].code, 421, "{wire:?}: {t:?}");
        assert!(
            t.rcpts[0]
                .text()
                .contains("Rate limit exceeded: more than 100 messages in 1h from example.com"),
            "{t:?}"
        );
        assert!(t.data.is_none());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_postfix_a_third_concurrent_connection_gets_421() {
    use common::smtp::SmtpClient;
    let s = Stack::start("ratelimit: { concurrent_connections: 2 }", Wire::Both).await;
    let mut open = Vec::new();
    let mut last = None;
    for _ in 0..3 {
        let (mut c, _) = SmtpClient::connect(s.postfix.smtpd_addr())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        c.ehlo("localhost").await.unwrap_or_else(|e| panic!("{e}"));
        let x = c
            .xclient(&[("ADDR", "198.51.100.1"), ("NAME", "[UNAVAILABLE]")])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        // Postfix runs the milter's connect stage again for the posed client.
        last = Some(match c.ehlo("mx.example.com").await {
            Ok(r) if x.code == 220 => r,
            Ok(_) | Err(_) => x,
        });
        open.push(c);
    }
    let last = last.unwrap_or_else(|| panic!("no reply"));
    // At the connect stage Postfix sends its own text with the milter's 421.
    assert_eq!(last.code, 421, "{last}");
    let series =
        r#"mxguard_check_decisions_total{check="concurrency",mode="enforce",verdict="tempfail"}"#;
    assert_eq!(s.mxguard.metric(series).await, 1.0);
    drop(open);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_postfix_a_message_past_the_daily_budget_gets_421_at_end_of_data() {
    let s = Stack::start("ratelimit: { daily_messages: 1 }", Wire::Both).await;
    let t = s.send("198.51.100.70", &["alice@example.org"]).await;
    assert_eq!(t.data.as_ref().map(|r| r.code), Some(250), "{t:?}");
    let t = s.send("198.51.100.70", &["alice@example.org"]).await;
    let data = t.data.unwrap_or_else(|| panic!("no DATA reply"));
    assert_eq!(data.code, 421, "{data:?}");
    assert_eq!(
        data.text(),
        "4.7.0 Daily limit reached: more than 1 message today from example.com; please try again tomorrow"
    );
    s.sink.wait_for(1, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(s.sink.messages().len(), 1);
}

#[tokio::test]
async fn an_allowlisted_sender_domain_counts_only_with_an_spf_pass() {
    let dns = common::dns::DnsServer::start()
        .await
        .unwrap_or_else(|e| panic!("dns: {e}"));
    dns.add_txt("example.com", "v=spf1 ip4:198.51.100.0/24 -all");
    let d = Mxguard::start(&format!(
        "dns: {{ nameservers: [\"{}\"], timeout: 2s }}\ngreylist: {{ enabled: true }}\n\
         allowlist: {{ entries: [example.com] }}",
        dns.addr()
    ))
    .await;
    // SPF passes for example.com from 198.51.100.7: allowlisted, not greylisted.
    assert_eq!(
        d.ask_rcpt_from(
            "198.51.100.7",
            "unknown",
            "bob@example.com",
            "a@example.org",
            0
        )
        .await,
        "action=DUNNO"
    );
    // The same sender from elsewhere (SPF fails): a forgery, greylisted.
    assert!(
        d.ask_rcpt_from(
            "203.0.113.7",
            "unknown",
            "bob@example.com",
            "a@example.org",
            0
        )
        .await
        .starts_with("action=450 4.7.1 ")
    );
    // A sender domain that no entry covers is not even looked up.
    assert!(
        d.ask_rcpt_from(
            "198.51.100.8",
            "unknown",
            "bob@mail.example.net",
            "a@example.org",
            0
        )
        .await
        .starts_with("action=450 4.7.1 ")
    );
    assert!(
        dns.queries() >= 1,
        "SPF was looked up through the configured name server"
    );
}
