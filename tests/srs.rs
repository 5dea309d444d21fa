//! SRS: interop with Debian's postsrsd in both directions, and through a
//! real Postfix the forward rewrite, the reverse path, a bounce Postfix
//! makes itself coming back to the original sender, and bounces that are
//! not relayed.

mod common;

use common::{
    daemon::Mxguard,
    postfix::{Postfix, Wiring},
    postsrsd::Postsrsd,
    sink::Sink,
    smtp::{self, Envelope},
};
use mxguard::srs::Srs;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const SECRET: &str = "interop-secret";
const SRS_DOMAIN: &str = "srs.mxguard.test";

fn today() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400)
}

fn ours() -> Srs {
    Srs::new(vec![SECRET.as_bytes().to_vec()], SRS_DOMAIN, 4, 21, '=')
        .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn postsrsd_and_mxguard_make_and_reverse_the_same_addresses() {
    let theirs = Postsrsd::start(SECRET, SRS_DOMAIN);
    let srs = ours();
    for sender in [
        "John.Doe@example.com",
        "alice+tag@example.net",
        "x@sub.example.org",
        "SRS0=abcd=RN=orig.example=alice@hop1.example",
    ] {
        let from_them = theirs
            .forward(sender)
            .unwrap_or_else(|e| panic!("{sender}: {e}"));
        let from_us = srs
            .forward_at(sender, today())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(from_us, from_them, "{sender}");
        // Each reverses the other's, also lowercased (as some MTAs send it).
        assert_eq!(srs.reverse_at(&from_them, today()).as_deref(), Ok(sender));
        assert_eq!(theirs.reverse(&from_us).as_deref(), Ok(sender));
        let lower = from_us.to_lowercase();
        assert_eq!(
            srs.reverse_at(&lower, today()).map(|a| a.to_lowercase()),
            Ok(sender.to_lowercase())
        );
        assert_eq!(
            theirs.reverse(&lower).map(|a| a.to_lowercase()),
            Ok(sender.to_lowercase())
        );
    }
    // A forged address is refused by both.
    let forged = "SRS0=AAAA=AA=example.com=john@srs.mxguard.test";
    assert!(theirs.reverse(forged).is_err());
    assert!(srs.reverse_at(forged, today()).is_err());
}

struct Setup {
    mxguard: Mxguard,
    sink: Sink,
    postfix: Postfix,
}

async fn setup(extra: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let secret = dir.path().join("srs.secret");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap_or_else(|e| panic!("{e}"));
    let yaml = format!(
        "domains: {{ example.org: {{ rules: [\"alice:alice@example.net\"] }} }}\n\
         local_domains: [mxguard.test]\n\
         srs: {{ domain: {SRS_DOMAIN}, secrets_file: \"{}\" }}\n{extra}",
        secret.display()
    );
    let mxguard = Mxguard::start(&yaml).await;
    // The secret is read at start; the directory may go.
    drop(dir);
    let sink = Sink::start().await.unwrap_or_else(|e| panic!("{e}"));
    let milter = mxguard.milter_wiring();
    let wiring = Wiring {
        policy: Some(mxguard.policy_wiring()),
        milter: Some(milter.clone()),
    };
    let postfix = Postfix::start(
        sink.addr().port(),
        &wiring,
        &[
            (
                "relay_domains",
                &format!("example.org example.net example.com mxguard.test {SRS_DOMAIN}"),
            ),
            // Bounces Postfix makes itself go through mxguard too, so they
            // can find the way back through the SRS address.
            ("non_smtpd_milters", &milter),
            ("internal_mail_filter_classes", "bounce"),
        ],
    );
    Setup {
        mxguard,
        sink,
        postfix,
    }
}

async fn send(pf: &Postfix, from: &str, to: &[&str], msg: &[u8]) -> smtp::Transcript {
    let env = Envelope {
        client_addr: "198.51.100.50",
        client_name: "mail.example.com",
        helo: "mail.example.com",
        from,
        to,
    };
    smtp::send(pf.smtpd_addr(), &env, msg)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_mail_leaves_with_an_srs_sender_and_its_bounce_comes_back() {
    let s = setup("").await;
    // The target refuses: Postfix bounces to the SRS sender, and the bounce
    // is rewritten back to the original sender.
    s.sink
        .reject_recipient("alice@example.net", "550 5.1.1 No such user here");
    let msg = smtp::message("bob@example.com", "alice@example.org", "hi", "Hello.\r\n");
    let t = send(&s.postfix, "bob@example.com", &["alice@example.org"], &msg).await;
    assert_eq!(t.data.as_ref().map(|r| r.code), Some(250), "{t:?}");
    let m = &s.sink.wait_for(1, Duration::from_secs(30)).await[0];
    assert_eq!(m.mail_from, "", "the bounce: {m:?}");
    assert_eq!(m.rcpt_to, ["bob@example.com"]);
    let body = String::from_utf8_lossy(&m.data);
    assert!(body.contains("No such user here"), "{body}");
    // The SRS sender the forwarded copy had is in the bounce's report.
    let srs = ours();
    let expected = srs
        .forward_at("bob@example.com", today())
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        s.postfix.maillog().contains(&format!("from=<{expected}>")),
        "{}",
        s.postfix.maillog()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_forwarded_mail_is_rewritten() {
    let s = setup("").await;
    let msg = smtp::message("bob@example.com", "alice@example.org", "hi", "Hello.\r\n");
    let t = send(&s.postfix, "bob@example.com", &["alice@example.org"], &msg).await;
    assert_eq!(t.data.as_ref().map(|r| r.code), Some(250), "{t:?}");
    let m = &s.sink.wait_for(1, Duration::from_secs(20)).await[0];
    let expected = ours()
        .forward_at("bob@example.com", today())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(m.mail_from, expected);
    assert_eq!(m.rcpt_to, ["alice@example.net"]);

    // Not forwarded (a domain mxguard does not forward for): unchanged.
    let msg = smtp::message("bob@example.com", "carol@example.net", "hi", "Hello.\r\n");
    let t = send(&s.postfix, "bob@example.com", &["carol@example.net"], &msg).await;
    assert_eq!(t.data.as_ref().map(|r| r.code), Some(250), "{t:?}");
    // A sender of the operator's own domains: unchanged.
    let msg = smtp::message("me@mxguard.test", "alice@example.org", "hi", "Hello.\r\n");
    let t = send(&s.postfix, "me@mxguard.test", &["alice@example.org"], &msg).await;
    assert_eq!(t.data.as_ref().map(|r| r.code), Some(250), "{t:?}");
    // The null sender: unchanged.
    let msg = smtp::message(
        "mailer-daemon@example.com",
        "alice@example.org",
        "hi",
        "Hello.\r\n",
    );
    let t = send(&s.postfix, "", &["alice@example.org"], &msg).await;
    assert_eq!(t.data.as_ref().map(|r| r.code), Some(250), "{t:?}");
    let all = s.sink.wait_for(4, Duration::from_secs(20)).await;
    let mut senders: Vec<&str> = all[1..].iter().map(|m| m.mail_from.as_str()).collect();
    senders.sort_unstable();
    assert_eq!(senders, ["", "bob@example.com", "me@mxguard.test"]);
}

/// A delivery status notification for `original` (the forwarded message's
/// headers inside), as a remote MTA would send it to the SRS address.
fn dsn(srs_address: &str, original_headers: &str) -> Vec<u8> {
    format!(
        "From: MAILER-DAEMON@mx.example.net\r\nTo: {srs_address}\r\nSubject: Undelivered Mail\r\n\
         Message-ID: <dsn-{n}@mx.example.net>\r\nMIME-Version: 1.0\r\n\
         Content-Type: multipart/report; report-type=delivery-status; boundary=\"B\"\r\n\r\n\
         --B\r\nContent-Type: text/plain\r\n\r\nYour message could not be delivered.\r\n\
         --B\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.example.net\r\n\r\n\
         Final-Recipient: rfc822; alice@example.net\r\nAction: failed\r\nStatus: 5.1.1\r\n\r\n\
         --B\r\nContent-Type: text/rfc822-headers\r\n\r\n{original_headers}\r\n--B--\r\n",
        n = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos())
    )
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reverse_path_relays_bounces_once_and_never_for_auto_submitted_mail() {
    let s = setup("").await;
    let srs_address = ours()
        .forward_at("bob@example.com", today())
        .unwrap_or_else(|e| panic!("{e}"));

    // A forged or broken SRS address is refused at RCPT.
    let forged = "SRS0=AAAA=AA=example.com=bob@srs.mxguard.test";
    let t = send(
        &s.postfix,
        "",
        &[forged],
        &dsn(forged, "From: bob@example.com\r\n"),
    )
    .await;
    assert_eq!(t.rcpts[0].code, 550, "{t:?}");
    assert!(t.rcpts[0].text().contains("5.1.1"), "{}", t.rcpts[0]);
    assert!(
        t.rcpts[0].text().contains("is not a valid bounce address"),
        "{}",
        t.rcpts[0]
    );

    // An ordinary bounce: relayed to the original sender.
    let original = "From: bob@example.com\r\nTo: alice@example.org\r\nSubject: hi\r\n\
                    Message-ID: <orig-1@example.com>\r\nDate: Tue, 14 Nov 2023 22:13:20 +0000";
    let bounce = dsn(&srs_address, original);
    let t = send(&s.postfix, "", &[&srs_address], &bounce).await;
    assert_eq!(t.rcpts[0].code, 250, "{t:?}");
    assert_eq!(t.data.as_ref().map(|r| r.code), Some(250), "{t:?}");
    let m = &s.sink.wait_for(1, Duration::from_secs(20)).await[0];
    assert_eq!(
        (m.mail_from.as_str(), m.rcpt_to.clone()),
        ("", vec!["bob@example.com".to_owned()])
    );

    // The same bounce again: accepted, not relayed.
    let t = send(
        &s.postfix,
        "",
        &[&srs_address],
        &dsn(&srs_address, original),
    )
    .await;
    assert_eq!(t.data.as_ref().map(|r| r.code), Some(250), "{t:?}");
    // A bounce for an auto-submitted message: accepted, not relayed.
    let auto = format!("{original}\r\nAuto-Submitted: auto-replied").replace("orig-1", "orig-2");
    let t = send(&s.postfix, "", &[&srs_address], &dsn(&srs_address, &auto)).await;
    assert_eq!(t.data.as_ref().map(|r| r.code), Some(250), "{t:?}");
    // A bounce for a no-reply sender: accepted, not relayed.
    let noreply = ours()
        .forward_at("news-noreply@example.com", today())
        .unwrap_or_else(|e| panic!("{e}"));
    let t = send(&s.postfix, "", &[&noreply], &dsn(&noreply, original)).await;
    assert_eq!(t.data.as_ref().map(|r| r.code), Some(250), "{t:?}");

    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(s.sink.messages().len(), 1, "{:?}", s.sink.messages());
    let d = &s.mxguard;
    assert_eq!(
        d.metric(
            r#"mxguard_check_decisions_total{check="srs_bounce",mode="enforce",verdict="discard"}"#
        )
        .await,
        3.0
    );
    assert_eq!(
        d.metric(r#"mxguard_check_decisions_total{check="srs",mode="enforce",verdict="reject"}"#)
            .await,
        1.0
    );

    // A reply (not a bounce) to the SRS address goes back too.
    let msg = smtp::message("carol@example.net", &srs_address, "re: hi", "Thanks.\r\n");
    let t = send(&s.postfix, "carol@example.net", &[&srs_address], &msg).await;
    assert_eq!(t.data.as_ref().map(|r| r.code), Some(250), "{t:?}");
    let all = s.sink.wait_for(2, Duration::from_secs(20)).await;
    assert_eq!(all[1].rcpt_to, ["bob@example.com"]);
}

#[test]
fn the_cli_forwards_and_reverses() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let secret = dir.path().join("s");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap_or_else(|e| panic!("{e}"));
    let config = dir.path().join("mxguard.yaml");
    std::fs::write(
        &config,
        format!(
            "srs: {{ domain: {SRS_DOMAIN}, secrets_file: \"{}\" }}\n",
            secret.display()
        ),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_mxguard"))
            .arg("srs")
            .arg("-c")
            .arg(&config)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let out = run(&["forward", "bob@example.com"]);
    assert!(out.status.success());
    let address = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert_eq!(
        Ok(address.clone()),
        ours().forward_at("bob@example.com", today())
    );
    let out = run(&["reverse", &address]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "bob@example.com"
    );
    let out = run(&["reverse", "SRS0=AAAA=AA=example.com=bob@srs.mxguard.test"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("signature does not match"));
    assert_eq!(run(&["reverse"]).status.code(), Some(2));
    std::fs::write(&config, "srs: {}\n").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(run(&["forward", "a@b.example"]).status.code(), Some(78));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_copy_of_list_mail_makes_no_bounce_at_all() {
    let s = setup("").await;
    s.sink
        .reject_recipient("alice@example.net", "550 5.1.1 No such user here");
    let msg = b"From: list@lists.example.com\r\nTo: alice@example.org\r\nSubject: digest\r\n\
List-Id: <l.lists.example.com>\r\nMessage-ID: <list-1@lists.example.com>\r\n\r\nDigest.\r\n";
    let t = send(
        &s.postfix,
        "list-bounces@lists.example.com",
        &["alice@example.org"],
        msg,
    )
    .await;
    assert_eq!(t.data.as_ref().map(|r| r.code), Some(250), "{t:?}");
    // Postfix tried, was refused, and (NOTIFY=NEVER) sent no bounce.
    s.postfix
        .wait_for_log("No such user here", Duration::from_secs(20));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(s.sink.messages().is_empty(), "{:?}", s.sink.messages());
    assert!(
        !s.postfix
            .maillog()
            .contains("sender non-delivery notification")
    );
}
