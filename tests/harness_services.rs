//! The harness's services checked on their own, before other tests rely on
//! them: the loopback DNS server (through the raw `query` helper, over UDP
//! and TCP), redis-server (through raw RESP), and free ports.

mod common;

use common::{
    dns::{self, DnsServer, Fault, query},
    ports::free_port,
    redis::RedisServer,
};
use hickory_proto::{
    op::{Message, MessageType, Query, ResponseCode},
    rr::{Name, RData, RecordType},
};
use std::{
    collections::HashSet,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
    time::timeout,
};

const BOTH: [bool; 2] = [false, true];

fn over(tcp: bool) -> &'static str {
    if tcp { "TCP" } else { "UDP" }
}

/// The strings of each TXT record of the answer, as sent.
fn txt_chunks(m: &Message) -> Vec<Vec<String>> {
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

/// Each TXT record of the answer, its strings joined (as readers do).
fn txt_of(m: &Message) -> Vec<String> {
    txt_chunks(m).into_iter().map(|c| c.concat()).collect()
}

/// The SOA of a negative answer, after checking it is the only authority
/// record and cacheable for 60 s.
fn negative_soa(m: &Message) -> &hickory_proto::rr::rdata::SOA {
    assert!(m.answers.is_empty(), "{m:?}");
    assert_eq!(m.authorities.len(), 1, "{m:?}");
    match &m.authorities[0].data {
        RData::SOA(soa) => {
            assert_eq!((m.authorities[0].ttl, soa.minimum), (60, 60));
            soa
        }
        other => panic!("expected an SOA in the authority section, got {other:?}"),
    }
}

fn absolute(s: &str) -> io::Result<Name> {
    Name::from_ascii(s).map_err(io::Error::other)
}

/// A query without EDNS (so the 512-byte UDP limit applies).
fn plain_query(name: &str, rtype: RecordType) -> io::Result<Message> {
    let mut m = Message::query();
    m.metadata.id = 4242;
    m.add_query(Query::query(absolute(name)?, rtype));
    Ok(m)
}

/// Waits up to 300 ms for any datagram on `s`; None if none came.
async fn datagram(s: &UdpSocket) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 4096];
    match timeout(Duration::from_millis(300), s.recv(&mut buf)).await {
        Ok(Ok(n)) => Some(buf[..n].to_vec()),
        _ => None,
    }
}

#[tokio::test]
async fn txt_a_aaaa_mx_and_ptr_are_answered_over_udp_and_tcp() -> io::Result<()> {
    let dns = DnsServer::start().await?;
    assert!(dns.addr().ip().is_loopback());
    dns.add_txt("example.org", "forward-email=alice:alice@example.net");
    dns.add_a("mx.example.org", Ipv4Addr::new(192, 0, 2, 25));
    dns.add_aaaa(
        "mx.example.org",
        "2001:db8::25".parse().map_err(io::Error::other)?,
    );
    dns.add_mx("example.org", 10, "mx.example.org");
    dns.add_ptr(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 25)), "mx.example.org");
    dns.add_ptr(
        "2001:db8::25".parse().map_err(io::Error::other)?,
        "mx6.example.org.",
    );
    for tcp in BOTH {
        let m = query(dns.addr(), "example.org", RecordType::TXT, tcp).await?;
        assert_eq!(m.metadata.message_type, MessageType::Response);
        assert!(m.metadata.authoritative, "AA over {}", over(tcp));
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert_eq!(txt_of(&m), ["forward-email=alice:alice@example.net"]);
        assert_eq!(m.answers[0].ttl, dns::DEFAULT_TTL);
        assert_eq!(m.answers[0].name, absolute("example.org.")?);

        let m = query(dns.addr(), "mx.example.org", RecordType::A, tcp).await?;
        assert!(
            matches!(&m.answers[..], [r] if r.data == RData::A(Ipv4Addr::new(192, 0, 2, 25).into())),
            "{m:?}"
        );
        let m = query(dns.addr(), "mx.example.org", RecordType::AAAA, tcp).await?;
        assert!(
            matches!(&m.answers[..], [r] if matches!(&r.data, RData::AAAA(a) if a.0.to_string() == "2001:db8::25")),
            "{m:?}"
        );
        let m = query(dns.addr(), "example.org", RecordType::MX, tcp).await?;
        assert!(
            matches!(&m.answers[..], [r] if matches!(&r.data, RData::MX(mx)
                if mx.preference == 10 && mx.exchange.to_ascii() == "mx.example.org.")),
            "{m:?}"
        );
        let m = query(dns.addr(), "25.2.0.192.in-addr.arpa", RecordType::PTR, tcp).await?;
        assert!(
            matches!(&m.answers[..], [r] if matches!(&r.data, RData::PTR(p) if p.0.to_ascii() == "mx.example.org.")),
            "{m:?}"
        );
        let v6 = "5.2.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa.";
        let m = query(dns.addr(), v6, RecordType::PTR, tcp).await?;
        assert!(
            matches!(&m.answers[..], [r] if matches!(&r.data, RData::PTR(p) if p.0.to_ascii() == "mx6.example.org.")),
            "{m:?}"
        );
    }
    Ok(())
}

#[test]
fn reverse_names_are_written_nibble_by_nibble() -> io::Result<()> {
    assert_eq!(
        dns::reverse_name(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7))),
        "7.100.51.198.in-addr.arpa."
    );
    let v6: Ipv6Addr = "2001:db8::abc:1".parse().map_err(io::Error::other)?;
    assert_eq!(
        dns::reverse_name(IpAddr::V6(v6)),
        "1.0.0.0.c.b.a.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa."
    );
    Ok(())
}

#[tokio::test]
async fn a_long_txt_is_split_into_255_byte_strings() -> io::Result<()> {
    let dns = DnsServer::start().await?;
    let long: String = (0..600)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    dns.add_txt("long.example.org", &long);
    dns.add_txt("empty.example.org", "");
    for tcp in BOTH {
        let m = query(dns.addr(), "long.example.org", RecordType::TXT, tcp).await?;
        let chunks = txt_chunks(&m);
        let lens: Vec<usize> = chunks[0].iter().map(String::len).collect();
        assert_eq!(lens, [255, 255, 90], "over {}", over(tcp));
        assert_eq!(txt_of(&m), [long.as_str()]);
        let m = query(dns.addr(), "empty.example.org", RecordType::TXT, tcp).await?;
        assert_eq!(txt_chunks(&m), [[""]]);
    }
    Ok(())
}

#[tokio::test]
async fn several_records_and_types_live_at_one_name() -> io::Result<()> {
    let dns = DnsServer::start().await?;
    dns.add_txt("example.org", "v=spf1 -all");
    dns.add_txt("example.org", "forward-email=bob@example.net");
    dns.add_mx("example.org", 20, "mx2.example.org");
    dns.add_mx("example.org", 10, "mx1.example.org");
    dns.add_a("example.org", Ipv4Addr::new(192, 0, 2, 1));
    for tcp in BOTH {
        let m = query(dns.addr(), "example.org", RecordType::TXT, tcp).await?;
        assert_eq!(txt_of(&m), ["v=spf1 -all", "forward-email=bob@example.net"]);
        let m = query(dns.addr(), "example.org", RecordType::MX, tcp).await?;
        let mut mx: Vec<(u16, String)> = m
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::MX(mx) => Some((mx.preference, mx.exchange.to_ascii())),
                _ => None,
            })
            .collect();
        mx.sort();
        assert_eq!(
            (m.answers.len(), mx),
            (
                2,
                vec![
                    (10, "mx1.example.org.".to_owned()),
                    (20, "mx2.example.org.".to_owned())
                ]
            )
        );
        let m = query(dns.addr(), "example.org", RecordType::A, tcp).await?;
        assert_eq!(m.answers.len(), 1);
        let m = query(dns.addr(), "example.org", RecordType::ANY, tcp).await?;
        assert_eq!(m.answers.len(), 5);
    }
    Ok(())
}

#[tokio::test]
async fn names_match_in_any_case_with_or_without_the_trailing_dot() -> io::Result<()> {
    let dns = DnsServer::start().await?;
    dns.add_txt("Example.ORG.", "one");
    dns.add_txt("example.org", "two");
    for asked in ["example.org", "EXAMPLE.org.", "eXaMpLe.OrG"] {
        let m = query(dns.addr(), asked, RecordType::TXT, false).await?;
        assert_eq!(txt_of(&m), ["one", "two"], "asked {asked}");
        // The owner comes back as asked (resolvers that randomise the case check it).
        let mut expected = asked.to_owned();
        if !expected.ends_with('.') {
            expected.push('.');
        }
        assert_eq!(m.answers[0].name.to_ascii(), expected);
        assert_eq!(m.queries[0].name().to_ascii(), expected);
    }
    Ok(())
}

#[tokio::test]
async fn unknown_names_get_nxdomain_and_other_types_nodata_with_an_soa() -> io::Result<()> {
    let dns = DnsServer::start().await?;
    dns.add_a("mx.example.org", Ipv4Addr::new(192, 0, 2, 25));
    dns.add_txt("_dmarc.deep.example.com", "v=DMARC1; p=none");
    for tcp in BOTH {
        let m = query(dns.addr(), "nowhere.example.org", RecordType::TXT, tcp).await?;
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        assert!(m.metadata.authoritative);
        let soa = negative_soa(&m);
        assert_eq!(soa.mname.to_ascii(), "ns.test.");
        assert_eq!(m.authorities[0].name.to_ascii(), "example.org.");

        // NODATA: the name exists, with records of another type only.
        let m = query(dns.addr(), "mx.example.org", RecordType::TXT, tcp).await?;
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.metadata.authoritative);
        negative_soa(&m);

        // A name with only names below it exists too (no NXDOMAIN).
        let m = query(dns.addr(), "deep.example.com", RecordType::TXT, tcp).await?;
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        negative_soa(&m);
        // But a name that merely ends the same way does not.
        let m = query(dns.addr(), "ep.example.com", RecordType::TXT, tcp).await?;
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    }
    Ok(())
}

#[tokio::test]
async fn records_added_while_running_are_served_with_the_current_ttl() -> io::Result<()> {
    let dns = DnsServer::start().await?;
    let m = query(dns.addr(), "late.example.org", RecordType::TXT, false).await?;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    dns.add_txt("late.example.org", "hello");
    dns.set_ttl(5);
    for tcp in BOTH {
        let m = query(dns.addr(), "late.example.org", RecordType::TXT, tcp).await?;
        assert_eq!(txt_of(&m), ["hello"]);
        assert_eq!(m.answers[0].ttl, 5);
    }
    dns.clear();
    let m = query(dns.addr(), "late.example.org", RecordType::TXT, true).await?;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    // Negative answers keep their own TTL.
    negative_soa(&m);
    Ok(())
}

#[tokio::test]
async fn faults_fail_as_asked_over_udp_and_tcp() -> io::Result<()> {
    let dns = DnsServer::start().await?;
    for name in ["servfail", "refused", "silent", "truncated"] {
        dns.add_txt(&format!("{name}.example.org"), "x");
    }
    dns.add_txt("fine.example.org", "ok");
    dns.set_fault("servfail.example.org", Fault::ServFail);
    dns.set_fault("REFUSED.example.org.", Fault::Refused);
    dns.set_fault("silent.example.org", Fault::Timeout);
    dns.set_fault("truncated.example.org", Fault::Truncate);
    for tcp in BOTH {
        let m = query(dns.addr(), "servfail.example.org", RecordType::TXT, tcp).await?;
        assert_eq!(
            (m.metadata.response_code, m.answers.len()),
            (ResponseCode::ServFail, 0)
        );
        let m = query(dns.addr(), "refused.example.org", RecordType::MX, tcp).await?;
        assert_eq!(
            (m.metadata.response_code, m.answers.len()),
            (ResponseCode::Refused, 0)
        );
        let silent = timeout(
            Duration::from_millis(500),
            query(dns.addr(), "silent.example.org", RecordType::TXT, tcp),
        )
        .await;
        assert!(silent.is_err(), "no answer over {}: {silent:?}", over(tcp));
        let m = query(dns.addr(), "truncated.example.org", RecordType::TXT, tcp).await?;
        if tcp {
            assert!(!m.metadata.truncation);
            assert_eq!(txt_of(&m), ["x"]);
        } else {
            assert!(m.metadata.truncation && m.answers.is_empty(), "{m:?}");
        }
        // Other names are not affected.
        let m = query(dns.addr(), "fine.example.org", RecordType::TXT, tcp).await?;
        assert_eq!(txt_of(&m), ["ok"]);
    }
    dns.clear_fault("silent.example.org");
    let m = query(dns.addr(), "silent.example.org", RecordType::TXT, false).await?;
    assert_eq!(txt_of(&m), ["x"]);
    // A fault also applies to a name without records.
    dns.set_fault("ghost.example.org", Fault::ServFail);
    let m = query(dns.addr(), "ghost.example.org", RecordType::A, false).await?;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    Ok(())
}

#[tokio::test]
async fn slow_answers_come_late_and_a_truncated_one_can_go_unanswered_over_tcp() -> io::Result<()> {
    let dns = DnsServer::start().await?;
    dns.add_txt("slow.example.org", "late");
    dns.add_txt("fine.example.org", "ok");
    dns.add_txt("cut.example.org", "x");
    dns.set_fault("slow.example.org", Fault::Slow(Duration::from_millis(400)));
    dns.set_fault("cut.example.org", Fault::TruncateTcpSilent);
    for tcp in BOTH {
        let t = std::time::Instant::now();
        let m = query(dns.addr(), "slow.example.org", RecordType::TXT, tcp).await?;
        assert_eq!(txt_of(&m), ["late"]);
        assert!(
            t.elapsed() >= Duration::from_millis(400),
            "{:?}",
            t.elapsed()
        );
    }
    // Over UDP a slow answer holds up no other.
    let slow = query(dns.addr(), "slow.example.org", RecordType::TXT, false);
    let fine = async {
        let t = std::time::Instant::now();
        let m = query(dns.addr(), "fine.example.org", RecordType::TXT, false).await;
        (m, t.elapsed())
    };
    let (slow, (fine, took)) = tokio::join!(slow, fine);
    assert_eq!(txt_of(&slow?), ["late"]);
    assert_eq!(txt_of(&fine?), ["ok"]);
    assert!(took < Duration::from_millis(200), "{took:?}");
    let m = query(dns.addr(), "cut.example.org", RecordType::TXT, false).await?;
    assert!(m.metadata.truncation && m.answers.is_empty(), "{m:?}");
    let over_tcp = timeout(
        Duration::from_millis(500),
        query(dns.addr(), "cut.example.org", RecordType::TXT, true),
    )
    .await;
    assert!(over_tcp.is_err(), "no answer over TCP: {over_tcp:?}");
    Ok(())
}

#[tokio::test]
async fn udp_answers_too_large_for_the_asker_are_truncated() -> io::Result<()> {
    let dns = DnsServer::start().await?;
    dns.add_txt("spf.example.org", &"x".repeat(600));
    for i in 0..5 {
        dns.add_txt("big.example.org", &format!("{i}{}", "y".repeat(299)));
    }
    // Without EDNS, 512 bytes at most over UDP.
    let m = dns::exchange(
        dns.addr(),
        &plain_query("spf.example.org.", RecordType::TXT)?,
        false,
    )
    .await?;
    assert!(m.metadata.truncation && m.answers.is_empty(), "{m:?}");
    assert_eq!(m.queries.len(), 1);
    let m = dns::exchange(
        dns.addr(),
        &plain_query("spf.example.org.", RecordType::TXT)?,
        true,
    )
    .await?;
    assert_eq!((m.metadata.truncation, txt_of(&m).len()), (false, 1));
    // With EDNS (1232 bytes, as `query` sends) the 600 bytes fit, 1500 do not.
    let m = query(dns.addr(), "spf.example.org", RecordType::TXT, false).await?;
    assert_eq!((m.metadata.truncation, txt_of(&m).len()), (false, 1));
    assert!(m.edns.is_some(), "EDNS is answered with EDNS");
    let m = query(dns.addr(), "big.example.org", RecordType::TXT, false).await?;
    assert!(m.metadata.truncation && m.answers.is_empty(), "{m:?}");
    let m = query(dns.addr(), "big.example.org", RecordType::TXT, true).await?;
    assert_eq!((m.metadata.truncation, txt_of(&m).len()), (false, 5));
    Ok(())
}

#[tokio::test]
async fn queries_counts_the_answers_given() -> io::Result<()> {
    let dns = DnsServer::start().await?;
    dns.add_txt("example.org", "x");
    dns.set_fault("silent.example.org", Fault::Timeout);
    assert_eq!(dns.queries(), 0);
    query(dns.addr(), "example.org", RecordType::TXT, false).await?;
    query(dns.addr(), "example.org", RecordType::TXT, true).await?;
    query(dns.addr(), "nowhere.example.org", RecordType::TXT, false).await?;
    let _ = timeout(
        Duration::from_millis(200),
        query(dns.addr(), "silent.example.org", RecordType::TXT, false),
    )
    .await;
    assert_eq!(dns.queries(), 3, "an unanswered query does not count");
    Ok(())
}

#[tokio::test]
async fn tcp_uses_length_framing_and_serves_several_queries_per_connection() -> io::Result<()> {
    let dns = DnsServer::start().await?;
    dns.add_txt("a.example.org", "first");
    dns.add_txt("b.example.org", "second");
    let mut framed = Vec::new();
    for (id, name) in [(1u16, "a.example.org."), (2, "b.example.org.")] {
        let mut m = plain_query(name, RecordType::TXT)?;
        m.metadata.id = id;
        let packet = m.to_vec().map_err(io::Error::other)?;
        framed.extend_from_slice(
            &u16::try_from(packet.len())
                .map_err(io::Error::other)?
                .to_be_bytes(),
        );
        framed.extend_from_slice(&packet);
    }
    let mut s = TcpStream::connect(dns.addr()).await?;
    // Both queries in one write: the server must split them by their lengths.
    s.write_all(&framed).await?;
    for (id, text) in [(1, "first"), (2, "second")] {
        let mut len = [0u8; 2];
        s.read_exact(&mut len).await?;
        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
        s.read_exact(&mut buf).await?;
        let m = Message::from_vec(&buf).map_err(io::Error::other)?;
        assert_eq!((m.metadata.id, txt_of(&m)), (id, vec![text.to_owned()]));
    }
    Ok(())
}

#[tokio::test]
async fn malformed_packets_and_stray_answers_are_ignored() -> io::Result<()> {
    let dns = DnsServer::start().await?;
    dns.add_txt("example.org", "still here");
    let s = UdpSocket::bind("127.0.0.1:0").await?;
    s.connect(dns.addr()).await?;
    // Garbage, an empty datagram, a header cut short: no answer, no crash.
    for junk in [&b"\x00\x01garbage"[..], b"", b"\x12\x34\x01"] {
        s.send(junk).await?;
        assert_eq!(datagram(&s).await, None, "answered {junk:?}");
    }
    // An answer is not a query: answering it could loop between servers.
    let mut stray = plain_query("example.org.", RecordType::TXT)?;
    stray.metadata.message_type = MessageType::Response;
    s.send(&stray.to_vec().map_err(io::Error::other)?).await?;
    assert_eq!(datagram(&s).await, None, "answered an answer");
    // Over TCP, a garbage frame is skipped and the connection goes on.
    let mut t = TcpStream::connect(dns.addr()).await?;
    t.write_all(b"\x00\x03abc").await?;
    let good = plain_query("example.org.", RecordType::TXT)?
        .to_vec()
        .map_err(io::Error::other)?;
    t.write_all(
        &u16::try_from(good.len())
            .map_err(io::Error::other)?
            .to_be_bytes(),
    )
    .await?;
    t.write_all(&good).await?;
    let mut len = [0u8; 2];
    timeout(Duration::from_secs(5), t.read_exact(&mut len)).await??;
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    t.read_exact(&mut buf).await?;
    let m = Message::from_vec(&buf).map_err(io::Error::other)?;
    assert_eq!(txt_of(&m), ["still here"]);
    // And UDP still answers.
    let m = query(dns.addr(), "example.org", RecordType::TXT, false).await?;
    assert_eq!(txt_of(&m), ["still here"]);
    Ok(())
}

#[tokio::test]
async fn a_dropped_server_closes_its_port() -> io::Result<()> {
    let dns = DnsServer::start().await?;
    let addr: SocketAddr = dns.addr();
    TcpStream::connect(addr).await?;
    drop(dns);
    // The aborted tasks drop their sockets when the runtime next runs them.
    for _ in 0..100 {
        match TcpStream::connect(addr).await {
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => return Ok(()),
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    panic!("{addr} still accepts connections a second after the server was dropped");
}

#[tokio::test]
async fn two_servers_run_side_by_side() -> io::Result<()> {
    let (one, two) = (DnsServer::start().await?, DnsServer::start().await?);
    assert_ne!(one.addr(), two.addr());
    one.add_txt("example.org", "one");
    two.add_txt("example.org", "two");
    assert_eq!(
        txt_of(&query(two.addr(), "example.org", RecordType::TXT, false).await?),
        ["two"]
    );
    assert_eq!(
        txt_of(&query(one.addr(), "example.org", RecordType::TXT, true).await?),
        ["one"]
    );
    Ok(())
}

#[test]
fn free_ports_are_not_handed_out_twice() {
    let ports: HashSet<u16> = (0..50).map(|_| free_port()).collect();
    assert_eq!(ports.len(), 50);
    assert!(!ports.contains(&0));
}

#[test]
fn redis_answers_ping_and_keeps_values() -> io::Result<()> {
    let redis = RedisServer::start()?;
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{}/", redis.port()));
    assert_eq!(redis.command(&["PING"])?, "+PONG\r\n");
    assert_eq!(
        redis.command(&["SET", "greeting", "hello world"])?,
        "+OK\r\n"
    );
    assert_eq!(
        redis.command(&["GET", "greeting"])?,
        "$11\r\nhello world\r\n"
    );
    assert_eq!(redis.command(&["GET", "missing"])?, "$-1\r\n");
    assert_eq!(redis.command(&["INCR", "n"])?, ":1\r\n");
    assert!(redis.command(&["NOSUCHCOMMAND"])?.starts_with("-ERR"));
    // A reply larger than one read, and an array, come back whole.
    let big = "z".repeat(100_000);
    assert_eq!(redis.command(&["SET", "big", &big])?, "+OK\r\n");
    assert_eq!(
        redis.command(&["GET", "big"])?,
        format!("$100000\r\n{big}\r\n")
    );
    redis.command(&["RPUSH", "list", "a", "bc"])?;
    assert_eq!(
        redis.command(&["LRANGE", "list", "0", "-1"])?,
        "*2\r\n$1\r\na\r\n$2\r\nbc\r\n"
    );
    Ok(())
}

#[test]
fn redis_stops_and_comes_back_empty_on_its_port() -> io::Result<()> {
    let mut redis = RedisServer::start()?;
    let port = redis.port();
    redis.command(&["SET", "k", "v"])?;
    redis.stop();
    assert!(!redis.is_running());
    let refused = std::net::TcpStream::connect(("127.0.0.1", port));
    assert!(
        matches!(&refused, Err(e) if e.kind() == io::ErrorKind::ConnectionRefused),
        "a stopped server refuses connections: {refused:?}"
    );
    assert!(redis.command(&["PING"]).is_err());
    redis.stop(); // Stopping twice is harmless.
    redis.restart()?;
    assert!(redis.is_running());
    assert_eq!(redis.port(), port);
    assert_eq!(redis.command(&["PING"])?, "+PONG\r\n");
    assert_eq!(
        redis.command(&["GET", "k"])?,
        "$-1\r\n",
        "nothing was saved"
    );
    // Restarting a running server works too.
    redis.restart()?;
    assert_eq!(redis.command(&["PING"])?, "+PONG\r\n");
    Ok(())
}

#[test]
fn a_dropped_redis_is_gone_and_two_run_side_by_side() -> io::Result<()> {
    let one = RedisServer::start()?;
    let two = RedisServer::start()?;
    assert_ne!(one.port(), two.port());
    one.command(&["SET", "k", "one"])?;
    assert_eq!(two.command(&["GET", "k"])?, "$-1\r\n");
    let port = one.port();
    drop(one);
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    assert_eq!(two.command(&["PING"])?, "+PONG\r\n");
    Ok(())
}
