//! The test harness checks itself: the DNS server, redis-server, the SMTP
//! client and sink, and the Postfix wiring, before other tests rely on them.

mod common;

use common::{
    dns::{DnsServer, Fault, query},
    postfix::{Wiring, contrib, wire},
    redis::RedisServer,
    sink::Sink,
    smtp::{self, Envelope, SmtpClient},
};
use hickory_proto::{
    op::ResponseCode,
    rr::{RData, RecordType},
};
use std::{net::IpAddr, time::Duration};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

fn txt_of(m: &hickory_proto::op::Message) -> Vec<String> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::TXT(t) => Some(
                t.txt_data
                    .iter()
                    .map(|c| String::from_utf8_lossy(c).into_owned())
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn dns_serves_records_over_udp_and_tcp() -> std::io::Result<()> {
    let dns = DnsServer::start().await?;
    let long = "v=spf1 ".to_owned() + &"ip4:192.0.2.1 ".repeat(40) + "-all";
    dns.add_txt("Example.ORG", "forward-email=alice:alice@example.net");
    dns.add_txt("example.org.", &long);
    dns.add_a(
        "mx.example.org",
        "192.0.2.25".parse().map_err(std::io::Error::other)?,
    );
    dns.add_aaaa(
        "mx.example.org",
        "2001:db8::25".parse().map_err(std::io::Error::other)?,
    );
    dns.add_mx("example.org", 10, "mx.example.org");
    let v4: IpAddr = "192.0.2.25".parse().map_err(std::io::Error::other)?;
    let v6: IpAddr = "2001:db8::25".parse().map_err(std::io::Error::other)?;
    dns.add_ptr(v4, "mx.example.org");
    dns.add_ptr(v6, "mx6.example.org");
    for tcp in [false, true] {
        let m = query(dns.addr(), "example.org", RecordType::TXT, tcp).await?;
        assert!(m.metadata.authoritative);
        let mut txt = txt_of(&m);
        txt.sort();
        assert_eq!(
            txt,
            vec![
                "forward-email=alice:alice@example.net".to_owned(),
                long.clone()
            ]
        );
        assert_eq!(m.answers[0].ttl, 300);
        let m = query(dns.addr(), "mx.example.org", RecordType::A, tcp).await?;
        assert!(matches!(&m.answers[0].data, RData::A(a) if a.0.to_string() == "192.0.2.25"));
        let m = query(dns.addr(), "mx.example.org", RecordType::AAAA, tcp).await?;
        assert!(matches!(&m.answers[0].data, RData::AAAA(a) if a.0.to_string() == "2001:db8::25"));
        let m = query(dns.addr(), "example.org", RecordType::MX, tcp).await?;
        assert!(
            matches!(&m.answers[0].data, RData::MX(mx) if mx.exchange.to_ascii() == "mx.example.org.")
        );
        let m = query(dns.addr(), "25.2.0.192.in-addr.arpa", RecordType::PTR, tcp).await?;
        assert!(matches!(&m.answers[0].data, RData::PTR(p) if p.0.to_ascii() == "mx.example.org."));
        let m = query(
            dns.addr(),
            &common::dns::reverse_name(v6),
            RecordType::PTR,
            tcp,
        )
        .await?;
        assert!(
            matches!(&m.answers[0].data, RData::PTR(p) if p.0.to_ascii() == "mx6.example.org.")
        );
        // NODATA: the name exists, not the type; NXDOMAIN: it does not.
        let m = query(dns.addr(), "mx.example.org", RecordType::TXT, tcp).await?;
        assert_eq!(
            (m.metadata.response_code, m.answers.len()),
            (ResponseCode::NoError, 0)
        );
        assert!(matches!(&m.authorities[0].data, RData::SOA(_)));
        let m = query(dns.addr(), "nowhere.example.org", RecordType::TXT, tcp).await?;
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        assert!(matches!(&m.authorities[0].data, RData::SOA(_)));
    }
    // Records added later are served; a new TTL applies.
    dns.set_ttl(5);
    dns.add_txt("late.example.org", "hello");
    let m = query(dns.addr(), "late.example.org", RecordType::TXT, false).await?;
    assert_eq!(
        (txt_of(&m), m.answers[0].ttl),
        (vec!["hello".to_owned()], 5)
    );
    assert_eq!(dns.queries(), 17);
    Ok(())
}

#[tokio::test]
async fn dns_faults() -> std::io::Result<()> {
    let dns = DnsServer::start().await?;
    dns.add_txt("t.example.org", "x");
    dns.set_fault("servfail.example.org", Fault::ServFail);
    dns.set_fault("refused.example.org", Fault::Refused);
    dns.set_fault("silent.example.org", Fault::Timeout);
    dns.set_fault("t.example.org", Fault::Truncate);
    let m = query(dns.addr(), "servfail.example.org", RecordType::TXT, false).await?;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    let m = query(dns.addr(), "refused.example.org", RecordType::TXT, false).await?;
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    let silent = tokio::time::timeout(
        Duration::from_millis(500),
        query(dns.addr(), "silent.example.org", RecordType::TXT, false),
    )
    .await;
    assert!(silent.is_err(), "a Timeout fault gives no answer");
    let m = query(dns.addr(), "t.example.org", RecordType::TXT, false).await?;
    assert!(m.metadata.truncation && m.answers.is_empty());
    let m = query(dns.addr(), "t.example.org", RecordType::TXT, true).await?;
    assert_eq!(txt_of(&m), vec!["x".to_owned()]);
    dns.clear();
    let m = query(dns.addr(), "t.example.org", RecordType::TXT, true).await?;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    // Garbage does not stop the server.
    let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    s.send_to(b"\x00\x01garbage", dns.addr()).await?;
    dns.add_txt("after.example.org", "ok");
    assert_eq!(
        txt_of(&query(dns.addr(), "after.example.org", RecordType::TXT, false).await?),
        vec!["ok".to_owned()]
    );
    Ok(())
}

#[test]
fn redis_starts_stops_and_restarts_on_its_port() -> std::io::Result<()> {
    let mut redis = RedisServer::start()?;
    assert_eq!(redis.command(&["PING"])?, "+PONG\r\n");
    assert_eq!(redis.command(&["SET", "k", "v"])?, "+OK\r\n");
    assert_eq!(redis.command(&["GET", "k"])?, "$1\r\nv\r\n");
    let port = redis.port();
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{port}/"));
    redis.stop();
    assert!(
        redis.command(&["PING"]).is_err(),
        "a stopped server refuses connections"
    );
    redis.restart()?;
    assert_eq!(redis.port(), port);
    assert_eq!(redis.command(&["PING"])?, "+PONG\r\n");
    Ok(())
}

#[tokio::test]
async fn sink_and_client_round_trip_a_message() -> std::io::Result<()> {
    let sink = Sink::start().await?;
    sink.reject_recipient("bad@example.net", "550 5.1.1 No such user");
    let (mut c, greeting) = SmtpClient::connect(sink.addr()).await?;
    assert_eq!(greeting.code, 220);
    let ehlo = c.ehlo("client.test").await?;
    assert!(ehlo.lines.iter().any(|l| l == "PIPELINING"), "{ehlo:?}");
    assert_eq!(c.mail_from("").await?.code, 250);
    assert_eq!(c.rcpt_to("good@example.net").await?.code, 250);
    let bad = c.rcpt_to("bad@example.net").await?;
    assert_eq!(
        (bad.code, bad.text()),
        (550, "5.1.1 No such user".to_owned())
    );
    let body = b"Subject: folded\r\n continued\r\nX-A: 1\r\n\r\n.leading dot\r\n..two\r\nend\r\n";
    assert_eq!(c.data(body).await?.code, 250);
    c.quit().await?;
    let got = sink.wait_for(1, Duration::from_secs(5)).await;
    assert_eq!(got[0].mail_from, "");
    assert_eq!(got[0].rcpt_to, ["good@example.net"]);
    assert_eq!(got[0].data, body, "dot-stuffing round-trips byte for byte");
    assert_eq!(
        got[0].header("subject").as_deref(),
        Some("folded continued")
    );
    assert_eq!(got[0].body(), b".leading dot\r\n..two\r\nend\r\n");
    Ok(())
}

#[tokio::test]
async fn sink_answers_pipelined_commands_in_order() -> std::io::Result<()> {
    let sink = Sink::start().await?;
    let s = tokio::net::TcpStream::connect(sink.addr()).await?;
    let (r, mut w) = s.into_split();
    let mut r = BufReader::new(r);
    let mut line = String::new();
    r.read_line(&mut line).await?;
    w.write_all(b"EHLO x\r\nMAIL FROM:<a@example.com> SIZE=10\r\nRCPT TO:<b@example.net> NOTIFY=NEVER\r\nDATA\r\n").await?;
    let mut codes = Vec::new();
    while codes.len() < 4 {
        line.clear();
        r.read_line(&mut line).await?;
        if line.as_bytes().get(3) == Some(&b' ') {
            codes.push(line[..3].to_owned());
        }
    }
    assert_eq!(codes, ["250", "250", "250", "354"]);
    w.write_all(b"Subject: x\r\n\r\nhi\r\n.\r\nQUIT\r\n")
        .await?;
    let got = sink.wait_for(1, Duration::from_secs(5)).await;
    assert_eq!(
        (got[0].mail_params.as_str(), got[0].rcpt_params[0].as_str()),
        ("SIZE=10", "NOTIFY=NEVER")
    );
    Ok(())
}

#[tokio::test]
#[should_panic(expected = "the sink got 0 of 1 messages")]
async fn sink_wait_for_says_how_many_arrived() {
    let sink = Sink::start().await.unwrap_or_else(|e| panic!("{e}"));
    sink.wait_for(1, Duration::from_millis(100)).await;
}

#[tokio::test]
async fn send_stops_at_a_421_without_error() -> std::io::Result<()> {
    let sink = Sink::start().await?;
    sink.reject_recipient("a@example.net", "421 4.7.0 go away");
    // The sink has no XCLIENT: `send` reports the refusal and stops.
    let t = smtp::send(
        sink.addr(),
        &Envelope {
            client_addr: "192.0.2.1",
            client_name: "x",
            helo: "x",
            from: "b@example.com",
            to: &["a@example.net"],
        },
        b"Subject: x\r\n\r\n",
    )
    .await?;
    assert_eq!(t.xclient.code, 502);
    assert!(t.data.is_none());
    Ok(())
}

#[test]
fn postfix_wiring_without_the_policy_service_keeps_a_valid_list() {
    let out = wire(
        &contrib("main.cf"),
        &Wiring {
            policy: None,
            milter: Some("inet:127.0.0.1:1".into()),
        },
    );
    assert!(!out.contains("check_policy_service"));
    assert!(out.contains("    reject_unauth_destination\n"));
    assert!(out.contains("smtpd_milters = inet:127.0.0.1:1"));
    let out = wire(
        &contrib("main.cf"),
        &Wiring {
            policy: Some("inet:127.0.0.1:2".into()),
            milter: None,
        },
    );
    assert!(out.contains("check_policy_service { inet:127.0.0.1:2,"));
    assert!(!out.lines().any(|l| l.starts_with("smtpd_milters")));
}
