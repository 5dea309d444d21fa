//! End-of-message checks through a real Postfix: SPF, DKIM, ARC and DMARC
//! with records served by the loopback DNS server, messages DKIM-signed
//! here with keys published there; the content rules; friendly-from; and
//! the ARC seal of forwarded mail, checked by mail-auth's own verifier.

mod common;

use base64::Engine as _;
use common::{
    smtp::{self, Envelope, Transcript},
    stack::{Stack, Wire},
};
use mail_auth::{
    AuthenticatedMessage, DkimResult,
    common::{crypto::Ed25519Key, headers::HeaderWriter},
    dkim::DkimSigner,
};
use ring::signature::KeyPair as _;
use std::time::Duration;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// A new Ed25519 key: its PKCS#8 DER and the DNS record of its public half.
fn ed25519() -> (Vec<u8>, String) {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng)
        .unwrap_or_else(|e| panic!("{e}"))
        .as_ref()
        .to_vec();
    let pair =
        ring::signature::Ed25519KeyPair::from_pkcs8(&pkcs8).unwrap_or_else(|e| panic!("{e}"));
    let record = format!(
        "v=DKIM1; k=ed25519; p={}",
        B64.encode(pair.public_key().as_ref())
    );
    (pkcs8, record)
}

fn pem(pkcs8: &[u8]) -> String {
    format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
        B64.encode(pkcs8)
    )
}

fn message(from: &str, subject: &str, extra_headers: &str, body: &str) -> Vec<u8> {
    format!(
        "From: {from}\r\nTo: alice@example.org\r\nSubject: {subject}\r\n\
         Date: Sun, 22 Nov 2026 12:00:00 +0000\r\nMessage-ID: <{}.{subject}@example.com>\r\n{extra_headers}\r\n{body}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    )
    .into_bytes()
}

fn signed(pkcs8: &[u8], domain: &str, msg: &[u8]) -> Vec<u8> {
    let key = Ed25519Key::from_pkcs8_der(pkcs8).unwrap_or_else(|e| panic!("{e}"));
    let sig = DkimSigner::from_key(key)
        .domain(domain)
        .selector("sel")
        .headers(["From", "To", "Subject", "Date", "Message-ID"])
        .sign(msg)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut out = sig.to_header().into_bytes();
    out.extend_from_slice(msg);
    out
}

async fn send(s: &Stack, from: &str, msg: &[u8]) -> Transcript {
    let env = Envelope {
        client_addr: "198.51.100.60",
        client_name: "mail.example.com",
        helo: "mail.example.com",
        from,
        to: &["alice@example.org"],
    };
    smtp::send(s.postfix.smtpd_addr(), &env, msg)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

fn data(t: &Transcript) -> (u16, String) {
    let r = t
        .data
        .clone()
        .unwrap_or_else(|| panic!("no DATA reply: {t:?}"));
    (r.code, r.text())
}

struct Setup {
    stack: Stack,
    dkim_key: Vec<u8>,
    _dir: tempfile::TempDir,
}

/// mxguard forwarding alice@example.org to alice@example.net, sealing
/// with its own key; example.com (DMARC reject), quarantine.example and
/// none.example publish SPF for 198.51.100.60 only in example.com's case.
async fn setup(extra: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (arc_key, arc_record) = ed25519();
    let key_path = dir.path().join("arc.pem");
    std::fs::write(&key_path, pem(&arc_key)).unwrap_or_else(|e| panic!("{e}"));
    let yaml = format!(
        "domains: {{ example.org: {{ rules: [\"alice:alice@example.net\"] }} }}\n\
         arc: {{ domain: mxguard.test, selector: arc, key_file: \"{}\" }}\n\
         {extra}",
        key_path.display()
    );
    let stack = Stack::start(&yaml, Wire::Both).await;
    let dns = &stack.mxguard.dns;
    let (dkim_key, dkim_record) = ed25519();
    dns.add_txt("arc._domainkey.mxguard.test", &arc_record);
    for domain in ["example.com", "quarantine.example", "none.example"] {
        dns.add_txt(&format!("sel._domainkey.{domain}"), &dkim_record);
    }
    dns.add_txt("example.com", "v=spf1 ip4:198.51.100.60 -all");
    dns.add_txt("_dmarc.example.com", "v=DMARC1; p=reject");
    dns.add_txt("quarantine.example", "v=spf1 -all");
    dns.add_txt("_dmarc.quarantine.example", "v=DMARC1; p=quarantine");
    dns.add_txt("none.example", "v=spf1 ?all");
    dns.add_txt("_dmarc.none.example", "v=DMARC1; p=none");
    dns.add_txt("hardfail.example", "v=spf1 -all");
    Setup {
        stack,
        dkim_key,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_message_is_forwarded_with_results_and_a_valid_arc_seal() {
    let s = setup("auth: { authserv_id: mx.mxguard.test }").await;
    let msg = message("Bob <bob@example.com>", "signed", "", "Hello.\r\n");
    let msg = signed(&s.dkim_key, "example.com", &msg);
    let t = send(&s.stack, "bob@example.com", &msg).await;
    assert_eq!(data(&t).0, 250, "{t:?}");
    let m = &s.stack.sink.wait_for(1, Duration::from_secs(20)).await[0];
    assert_eq!(m.rcpt_to, ["alice@example.net"]);
    let ar = m.header("Authentication-Results").unwrap_or_default();
    assert!(ar.starts_with("mx.mxguard.test;"), "{ar}");
    for part in ["dkim=pass", "spf=pass", "dmarc=pass"] {
        assert!(ar.contains(part), "{part} in {ar}");
    }
    // Not rewritten: DKIM is aligned.
    assert_eq!(m.header("From").as_deref(), Some("Bob <bob@example.com>"));
    // The seal verifies with mail-auth's own ARC verifier.
    let resolver = mxguard::dns::authenticator(&mxguard::config::DnsConfig {
        nameservers: vec![s.stack.mxguard.dns.addr().to_string()],
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let delivered = AuthenticatedMessage::parse(&m.data).unwrap_or_else(|| panic!("parse"));
    let arc = resolver.verify_arc(&delivered).await;
    assert_eq!(
        arc.result(),
        &DkimResult::Pass,
        "{:?}",
        String::from_utf8_lossy(&m.data)
    );
    assert_eq!(arc.sets().len(), 1);
    assert_eq!(arc.sets()[0].seal.header.d, "mxguard.test");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dmarc_and_spf_failures_get_their_replies() {
    let s = setup("auth: { authserv_id: mx.mxguard.test }").await;
    // Spoofed: From example.com (p=reject), unsigned, from an address its SPF
    // does not list.
    let env = Envelope {
        client_addr: "203.0.113.9",
        client_name: "spoofer.example.net",
        helo: "spoofer.example.net",
        from: "bob@example.com",
        to: &["alice@example.org"],
    };
    let msg = message("bob@example.com", "spoof", "", "Pay now.\r\n");
    let t = smtp::send(s.stack.postfix.smtpd_addr(), &env, &msg)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (code, text) = data(&t);
    assert_eq!(code, 550, "{t:?}");
    assert_eq!(
        text,
        "5.7.1 The email sent has failed DMARC validation and is rejected due to the DMARC policy of example.com"
    );
    // SPF -all, no DMARC record, unsigned: 550 5.7.23.
    let msg = message("carol@hardfail.example", "hard", "", "Hi.\r\n");
    let t = send(&s.stack, "carol@hardfail.example", &msg).await;
    let (code, text) = data(&t);
    assert_eq!(code, 550, "{t:?}");
    assert!(
        text.starts_with("5.7.23 The email sent has failed SPF validation"),
        "{text}"
    );
    // p=quarantine and p=none failures are accepted and say so.
    for from in ["q@quarantine.example", "n@none.example"] {
        let msg = message(from, "soft", "", "Hi.\r\n");
        let t = send(&s.stack, from, &msg).await;
        assert_eq!(data(&t).0, 250, "{from}: {t:?}");
    }
    let all = s.stack.sink.wait_for(2, Duration::from_secs(20)).await;
    for m in &all {
        let ar = m.header("Authentication-Results").unwrap_or_default();
        assert!(ar.contains("dmarc=fail"), "{ar}");
    }
    // quarantine.example: friendly-from (p=quarantine, no aligned DKIM).
    let q = all
        .iter()
        .find(|m| m.header("X-Original-From").is_some())
        .unwrap_or_else(|| panic!("no friendly-from: {all:?}"));
    assert_eq!(
        q.header("X-Original-From").as_deref(),
        Some("q@quarantine.example")
    );
    assert_eq!(
        q.header("Reply-To").as_deref(),
        Some("q@quarantine.example")
    );
    assert_eq!(
        q.header("From").as_deref(),
        Some("\"q@quarantine.example\" <noreply@mx.mxguard.test>")
    );
    // none.example (p=none): From left alone.
    let n = all
        .iter()
        .find(|m| m.header("X-Original-From").is_none())
        .unwrap_or_else(|| panic!("{all:?}"));
    assert_eq!(n.header("From").as_deref(), Some("n@none.example"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_trouble_is_a_tempfail_and_forged_results_are_removed() {
    let s = setup("auth: { authserv_id: mx.mxguard.test }").await;
    s.stack
        .mxguard
        .dns
        .set_fault("_dmarc.none.example", common::dns::Fault::ServFail);
    let msg = message("n@none.example", "servfail", "", "Hi.\r\n");
    let t = send(&s.stack, "n@none.example", &msg).await;
    let (code, text) = data(&t);
    assert_eq!(code, 451, "{t:?}");
    assert!(text.starts_with("4.4.3"), "{text}");
    // A lookup that times out (dns.timeout is 2 s in the tests) as well.
    s.stack
        .mxguard
        .dns
        .set_fault("_dmarc.none.example", common::dns::Fault::Timeout);
    let msg = message("n@none.example", "timeout", "", "Hi.\r\n");
    let (code, text) = data(&send(&s.stack, "n@none.example", &msg).await);
    assert_eq!((code, &text[..5]), (451, "4.4.3"), "{text}");
    s.stack.mxguard.dns.clear_fault("_dmarc.none.example");

    let forged = "Authentication-Results: mx.mxguard.test; dkim=pass header.d=bank.example\r\n\
                  Authentication-Results: other.example; spf=pass\r\n";
    let msg = message("n@none.example", "forged", forged, "Hi.\r\n");
    let t = send(&s.stack, "n@none.example", &msg).await;
    assert_eq!(data(&t).0, 250, "{t:?}");
    let m = &s.stack.sink.wait_for(1, Duration::from_secs(20)).await[0];
    let ars = m.headers("Authentication-Results");
    assert_eq!(ars.len(), 2, "{ars:?}");
    assert!(ars.iter().all(|a| !a.contains("bank.example")), "{ars:?}");
    assert!(
        ars.iter().any(|a| a.starts_with("other.example;")),
        "{ars:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_content_rule_has_its_reply() {
    let s = setup(
        "auth: { authserv_id: mx.mxguard.test }\ncontent: { max_message_size: 20KB, max_retry_period: 1s }",
    )
    .await;
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (
            b"To: alice@example.org\r\nSubject: no from\r\n\r\nHi.\r\n".to_vec(),
            550,
            "5.7.1 Your message is not RFC 5322 compliant, please include a valid \"From\" header",
        ),
        (
            message("a@none.example, b@none.example", "two", "", "Hi.\r\n"),
            550,
            "5.7.1 Your message must contain one valid email address in the \"From\" header",
        ),
        (
            message(
                "n@none.example",
                "loop",
                &"Received: from x by y; Sun, 22 Nov 2026 12:00:00 +0000\r\n".repeat(26),
                "Hi.\r\n",
            ),
            550,
            "5.4.6 Message was stuck in a redirect loop",
        ),
        (
            message(
                "n@none.example",
                "gtube",
                "",
                "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X\r\n",
            ),
            554,
            "5.7.1 Message detected as spam (it contains the GTUBE test string)",
        ),
        (
            message("n@none.example", "I recorded you", "", "Hi.\r\n"),
            554,
            "5.7.1 Message detected as spam (its subject matches a known extortion or phishing pattern)",
        ),
        (
            message("n@none.example", "big", "", &"x".repeat(80).repeat(300)),
            552,
            "5.3.4 Message size exceeds the limit of 20480 bytes",
        ),
    ];
    for (msg, code, text) in &cases {
        let t = send(&s.stack, "n@none.example", msg).await;
        assert_eq!(data(&t), (*code, (*text).to_owned()), "{t:?}");
    }
    // The same message retried past max_retry_period (1 s here).
    let msg = message("n@none.example", "retried", "", "Hi.\r\n");
    assert_eq!(data(&send(&s.stack, "n@none.example", &msg).await).0, 250);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (code, text) = data(&send(&s.stack, "n@none.example", &msg).await);
    assert_eq!(code, 550);
    assert!(
        text.starts_with("5.4.7 This message has been retried"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_mode_logs_a_dmarc_reject_and_lets_the_message_through() {
    let s = setup("auth: { authserv_id: mx.mxguard.test, mode: report }").await;
    let env = Envelope {
        client_addr: "203.0.113.9",
        client_name: "spoofer.example.net",
        helo: "spoofer.example.net",
        from: "bob@example.com",
        to: &["alice@example.org"],
    };
    let msg = message("bob@example.com", "spoof", "", "Pay now.\r\n");
    let t = smtp::send(s.stack.postfix.smtpd_addr(), &env, &msg)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(data(&t).0, 250, "{t:?}");
    assert_eq!(
        s.stack
            .mxguard
            .metric(r#"mxguard_check_decisions_total{check="auth",mode="report",verdict="reject"}"#)
            .await,
        1.0
    );
    let m = &s.stack.sink.wait_for(1, Duration::from_secs(20)).await[0];
    assert!(
        m.header("Authentication-Results")
            .unwrap_or_default()
            .contains("dmarc=fail")
    );
}

/// Every header mxguard writes carries client data (the HELO name, the
/// From display name and address) without letting it start a header line
/// of its own or a result of its own in Authentication-Results.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_mxguard_writes_cannot_be_injected_into() {
    let s = setup("auth: { authserv_id: mx.mxguard.test }").await;
    let helo = "evil.example;dkim=pass";
    let env = Envelope {
        client_addr: "198.51.100.60",
        client_name: "mail.example.com",
        helo,
        from: "q@quarantine.example",
        to: &["alice@example.org"],
    };
    // A folded From whose display name holds header-like lines: it passes
    // Postfix as one header, and friendly-from copies it into three.
    let from = "\"Pay now\r\n Bcc: victim@example.net\r\n X-Evil: 1\" <q@quarantine.example>";
    let msg = message(from, "inject", "", "Hi.\r\n");
    let t = smtp::send(s.stack.postfix.smtpd_addr(), &env, &msg)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(data(&t).0, 250, "{t:?}");
    let m = &s.stack.sink.wait_for(1, Duration::from_secs(20)).await[0];
    let text = String::from_utf8_lossy(&m.data).into_owned();
    let head = text.split("\r\n\r\n").next().unwrap_or_default();
    // No line of the header block starts a header that nobody wrote.
    for line in head.split("\r\n") {
        assert!(
            !line.starts_with("Bcc:") && !line.starts_with("X-Evil:"),
            "{head}"
        );
    }
    // The values mxguard wrote are single lines.
    for name in ["From", "X-Original-From", "Reply-To"] {
        let v = m
            .header(name)
            .unwrap_or_else(|| panic!("no {name}: {head}"));
        assert!(!v.contains(['\r', '\n']), "{name}: {v:?}");
    }
    // Unfolded into one line, as the original value.
    assert_eq!(
        m.header("X-Original-From").as_deref(),
        Some("\"Pay now Bcc: victim@example.net X-Evil: 1\" <q@quarantine.example>")
    );
    // The HELO name's `;` cannot open a result of its own.
    let ar = m.header("Authentication-Results").unwrap_or_default();
    let results: Vec<&str> = ar.split(';').map(str::trim).collect();
    assert!(!results.iter().any(|r| r.starts_with("dkim=pass")), "{ar}");
    // What is not allowed in a value is dropped.
    assert!(ar.contains(" smtp.helo=evil.exampledkimpass;"), "{ar}");
}
