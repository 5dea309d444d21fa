//! The SMTP test client and the receiving sink, checked against each other
//! (and against a scripted server for the client's hang-up handling),
//! without Postfix.

mod common;

use common::{
    sink::Sink,
    smtp::{self, Envelope, Reply, SmtpClient, Transcript},
};
use std::{io, net::SocketAddr, time::Duration};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

const WAIT: Duration = Duration::from_secs(10);

/// Connects to the sink and says EHLO.
async fn ehloed(sink: &Sink) -> io::Result<SmtpClient> {
    let (mut c, greeting) = SmtpClient::connect(sink.addr()).await?;
    assert_eq!(greeting.to_string(), "220 sink ESMTP");
    let ehlo = c.ehlo("client.test").await?;
    assert_eq!(ehlo.code, 250, "{ehlo:?}");
    Ok(c)
}

/// Reads one reply off a raw connection: its code and lines as sent.
async fn raw_reply<R: AsyncBufReadExt + Unpin>(r: &mut R) -> io::Result<(u16, Vec<String>)> {
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        let n = tokio::time::timeout(WAIT, r.read_line(&mut line))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no reply from the sink"))??;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the sink hung up after {lines:?}"),
            ));
        }
        let line = line.trim_end().to_owned();
        let last = line.as_bytes().get(3) != Some(&b'-');
        let code = line
            .get(..3)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| io::Error::other(format!("not a reply: {line:?}")))?;
        lines.push(line);
        if last {
            return Ok((code, lines));
        }
    }
}

#[tokio::test]
async fn a_message_round_trips_byte_exact_through_dot_stuffing() -> io::Result<()> {
    let sink = Sink::start().await?;
    let mut c = ehloed(&sink).await?;
    assert_eq!(c.mail_from("").await?.to_string(), "250 2.1.0 Ok");
    assert_eq!(c.rcpt_to("to@example.net").await?.code, 250);
    let message = b"Subject: dots\r\n\r\n.leading dot\r\n..two dots\r\n.\r\n \r\n.. \r\nend\r\n";
    let done = c.data(message).await?;
    assert_eq!(done.to_string(), "250 2.0.0 Ok: queued");

    // Bare LF line ends become CRLF; a missing final line end is added.
    assert_eq!(c.mail_from("a@example.com").await?.code, 250);
    assert_eq!(c.rcpt_to("to@example.net").await?.code, 250);
    assert_eq!(c.data(b"Subject: lf\n\n.x\nlast").await?.code, 250);
    c.quit().await?;

    let got = sink.wait_for(2, WAIT).await;
    assert_eq!(got[0].data, message, "dot-(un)stuffing is byte exact");
    assert_eq!(
        got[0].body(),
        b".leading dot\r\n..two dots\r\n.\r\n \r\n.. \r\nend\r\n"
    );
    assert_eq!(got[0].mail_from, "");
    assert_eq!(got[0].helo, "client.test");
    assert_eq!(got[1].data, b"Subject: lf\r\n\r\n.x\r\nlast\r\n");
    assert_eq!(got[1].mail_from, "a@example.com");
    Ok(())
}

#[tokio::test]
async fn a_rejected_recipient_gets_its_reply_and_the_others_are_accepted() -> io::Result<()> {
    let sink = Sink::start().await?;
    sink.reject_recipient("Bad@Example.NET", "550 5.1.1 No such user");
    sink.reject_recipient(
        "full@example.net",
        "452-4.2.2 Mailbox full\n452 4.2.2 Try again later",
    );
    let mut c = ehloed(&sink).await?;
    assert_eq!(c.mail_from("from@example.com").await?.code, 250);
    let good = c.rcpt_to("good@example.net").await?;
    assert_eq!(good.to_string(), "250 2.1.5 Ok");
    let bad = c.rcpt_to("bad@example.net").await?;
    assert_eq!(bad.code, 550);
    assert_eq!(bad.text(), "5.1.1 No such user");
    assert_eq!(bad.to_string(), "550 5.1.1 No such user");
    assert!(!bad.is_positive());
    let full = c.rcpt_to("full@example.net").await?;
    assert_eq!(
        full,
        Reply {
            code: 452,
            lines: vec!["4.2.2 Mailbox full".into(), "4.2.2 Try again later".into()],
        }
    );
    assert_eq!(full.text(), "4.2.2 Mailbox full\n4.2.2 Try again later");
    assert_eq!(c.rcpt_to("also@example.net").await?.code, 250);
    assert_eq!(c.data(b"Subject: x\r\n\r\nhi\r\n").await?.code, 250);
    c.quit().await?;

    let got = sink.wait_for(1, WAIT).await;
    assert_eq!(got[0].rcpt_to, ["good@example.net", "also@example.net"]);
    assert_eq!(got[0].rcpt_params, ["", ""]);
    Ok(())
}

#[tokio::test]
async fn pipelined_commands_are_answered_in_order() -> io::Result<()> {
    let sink = Sink::start().await?;
    sink.reject_recipient("bad@example.net", "550 5.1.1 No such user");
    let (r, mut w) = TcpStream::connect(sink.addr()).await?.into_split();
    let mut r = BufReader::new(r);
    assert_eq!(raw_reply(&mut r).await?.0, 220);
    w.write_all(b"EHLO pipe.test\r\n").await?;
    let (code, ehlo) = raw_reply(&mut r).await?;
    assert_eq!(code, 250);
    for ext in [
        "PIPELINING",
        "8BITMIME",
        "SIZE 67108864",
        "DSN",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
    ] {
        assert!(ehlo.iter().any(|l| &l[4..] == ext), "{ext} in {ehlo:?}");
    }

    w.write_all(
        b"MAIL FROM:<a@example.com> SIZE=10 BODY=8BITMIME\r\n\
          RCPT TO:<bad@example.net>\r\n\
          RCPT TO:<b@example.net> NOTIFY=NEVER ORCPT=rfc822;b@example.net\r\n\
          NOOP\r\n\
          DATA\r\n",
    )
    .await?;
    let mut replies = Vec::new();
    for _ in 0..5 {
        replies.push(raw_reply(&mut r).await?.1.join("|"));
    }
    assert_eq!(
        replies,
        [
            "250 2.1.0 Ok",
            "550 5.1.1 No such user",
            "250 2.1.5 Ok",
            "250 2.0.0 Ok",
            "354 End data with <CR><LF>.<CR><LF>",
        ]
    );
    // The message, its end and the next commands in one write, too.
    w.write_all(b"Subject: piped\r\n\r\nhi\r\n.\r\nRSET\r\nFOO\r\nQUIT\r\n")
        .await?;
    let mut replies = Vec::new();
    for _ in 0..4 {
        replies.push(raw_reply(&mut r).await?.1.join("|"));
    }
    assert_eq!(
        replies,
        [
            "250 2.0.0 Ok: queued",
            "250 2.0.0 Ok",
            "502 5.5.2 Error: command not recognized",
            "221 2.0.0 Bye",
        ]
    );
    let mut rest = String::new();
    assert_eq!(r.read_line(&mut rest).await?, 0, "hung up after QUIT");

    let got = sink.wait_for(1, WAIT).await;
    assert_eq!(got[0].helo, "pipe.test");
    assert_eq!(got[0].mail_params, "SIZE=10 BODY=8BITMIME");
    assert_eq!(got[0].rcpt_to, ["b@example.net"]);
    assert_eq!(
        got[0].rcpt_params,
        ["NOTIFY=NEVER ORCPT=rfc822;b@example.net"]
    );
    assert_eq!(got[0].data, b"Subject: piped\r\n\r\nhi\r\n");
    Ok(())
}

#[tokio::test]
async fn the_sink_refuses_out_of_order_and_oversized_commands() -> io::Result<()> {
    let sink = Sink::start().await?;
    let mut c = ehloed(&sink).await?;
    assert_eq!(c.rcpt_to("x@example.net").await?.code, 503);
    assert_eq!(c.command("DATA").await?.code, 503);
    assert_eq!(c.command("MAIL TO:<x>").await?.code, 501);
    assert_eq!(c.command("HELO").await?.code, 501);
    assert_eq!(c.command("VRFY root").await?.code, 502);
    let long = format!("NOOP {}", "x".repeat(200 * 1024));
    assert_eq!(
        c.command(&long).await?.to_string(),
        "500 5.5.0 Error: line too long"
    );
    assert_eq!(c.command("NOOP").await?.code, 250, "the session goes on");
    assert_eq!(c.mail_from("a@example.com").await?.code, 250);
    assert_eq!(c.mail_from("a@example.com").await?.code, 503, "nested MAIL");
    let no_rcpt = c.data(b"Subject: x\r\n\r\n").await?;
    assert_eq!(no_rcpt.code, 554, "DATA itself refused: {no_rcpt}");
    assert_eq!(c.command("RSET").await?.code, 250);
    let big = c
        .command("MAIL FROM:<a@example.com> SIZE=999999999")
        .await?;
    assert_eq!(big.code, 552);
    assert_eq!(c.command("HELO old.test").await?.to_string(), "250 sink");
    c.quit().await?;
    assert!(sink.messages().is_empty());
    Ok(())
}

#[tokio::test]
async fn headers_are_unfolded_and_matched_case_insensitively() -> io::Result<()> {
    let sink = Sink::start().await?;
    let message = b"Received: from a\r\n\tby b;\r\n  Mon, 1 Jan 2024 00:00:00 +0000\r\n\
                    Subject: folded\r\n continued\r\n\
                    received: second\r\n\
                    X-Empty:\r\n\
                    X-Tight:value\r\n\
                    \r\n\
                    Not-A-Header: body\r\n";
    let mut c = ehloed(&sink).await?;
    c.mail_from("a@example.com").await?;
    c.rcpt_to("b@example.net").await?;
    assert_eq!(c.data(message).await?.code, 250);
    c.quit().await?;

    let got = sink.wait_for(1, WAIT).await;
    let m = &got[0];
    assert_eq!(m.header("SUBJECT").as_deref(), Some("folded continued"));
    assert_eq!(
        m.headers("Received"),
        ["from a by b; Mon, 1 Jan 2024 00:00:00 +0000", "second"]
    );
    assert_eq!(m.header("x-empty").as_deref(), Some(""));
    assert_eq!(m.header("X-Tight").as_deref(), Some("value"));
    assert_eq!(m.header("Not-A-Header"), None, "the body is not headers");
    assert_eq!(m.header("Missing"), None);
    assert_eq!(m.body(), b"Not-A-Header: body\r\n");
    Ok(())
}

#[tokio::test]
async fn message_has_the_usual_headers() -> io::Result<()> {
    let one = smtp::message("a@example.com", "b@example.net", "Hi", "Hello.\r\n");
    let two = smtp::message("a@example.com", "b@example.net", "Hi", "Hello.\r\n");
    let sink = Sink::start().await?;
    for m in [&one, &two] {
        let mut c = ehloed(&sink).await?;
        c.mail_from("a@example.com").await?;
        c.rcpt_to("b@example.net").await?;
        assert_eq!(c.data(m).await?.code, 250);
        c.quit().await?;
    }
    let got = sink.wait_for(2, WAIT).await;
    assert_eq!(got[0].data, one);
    let m = &got[0];
    assert_eq!(m.header("From").as_deref(), Some("a@example.com"));
    assert_eq!(m.header("To").as_deref(), Some("b@example.net"));
    assert_eq!(m.header("Subject").as_deref(), Some("Hi"));
    assert_eq!(m.body(), b"Hello.\r\n");
    let date = m.header("Date").unwrap_or_else(|| panic!("no Date: {m:?}"));
    // e.g. "Thu, 29 Feb 2024 12:34:56 +0000"
    let parts: Vec<&str> = date.split(' ').collect();
    assert_eq!(parts.len(), 6, "{date}");
    assert!(
        parts[0].ends_with(',') && parts[2].len() == 3 && parts[5] == "+0000",
        "{date}"
    );
    assert!(parts[3].parse::<u32>().is_ok_and(|y| y >= 2024), "{date}");
    let ids: Vec<Option<String>> = got.iter().map(|m| m.header("Message-ID")).collect();
    assert!(
        ids[0]
            .as_deref()
            .is_some_and(|i| i.starts_with('<') && i.ends_with("@mxguard.test>"))
    );
    assert_ne!(ids[0], ids[1], "Message-IDs are unique");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_sessions_all_arrive_and_wait_for_wakes_up() -> io::Result<()> {
    let sink = Sink::start().await?;
    let addr = sink.addr();
    let mut clients = Vec::new();
    for i in 0..20 {
        clients.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let (mut c, _) = SmtpClient::connect(addr).await?;
            c.ehlo("many.test").await?;
            c.mail_from(&format!("s{i}@example.com")).await?;
            c.rcpt_to("to@example.net").await?;
            let r = c
                .data(&smtp::message(
                    "a@example.com",
                    "to@example.net",
                    &format!("n{i}"),
                    "x\r\n",
                ))
                .await?;
            c.quit().await?;
            io::Result::Ok(r)
        }));
    }
    let got = sink.wait_for(20, WAIT).await;
    assert_eq!(got.len(), 20);
    for c in clients {
        let r = c.await.map_err(io::Error::other)??;
        assert_eq!(r.code, 250);
    }
    let mut subjects: Vec<String> = got.iter().filter_map(|m| m.header("Subject")).collect();
    subjects.sort();
    subjects.dedup();
    assert_eq!(subjects.len(), 20);
    Ok(())
}

#[tokio::test]
#[should_panic(expected = "the sink got 0 of 1 messages within 200ms")]
async fn wait_for_times_out_saying_how_many_arrived() {
    let sink = Sink::start().await.unwrap_or_else(|e| panic!("sink: {e}"));
    sink.wait_for(1, Duration::from_millis(200)).await;
}

#[tokio::test]
#[should_panic(
    expected = "the sink got 1 of 2 messages within 200ms; arrived: [\"<a@example.com> → [\\\"b@example.net\\\"] (Subject: \\\"only\\\""
)]
async fn wait_for_times_out_listing_what_arrived() {
    let sink = Sink::start().await.unwrap_or_else(|e| panic!("sink: {e}"));
    let result: io::Result<()> = async {
        let mut c = ehloed(&sink).await?;
        c.mail_from("a@example.com").await?;
        c.rcpt_to("b@example.net").await?;
        c.data(b"Subject: only\r\n\r\n").await?;
        c.quit().await
    }
    .await;
    if let Err(e) = result {
        panic!("sending the one message failed: {e}");
    }
    sink.wait_for(2, Duration::from_millis(200)).await;
}

// `send` against the sink, which has no XCLIENT: it stops there, politely.
#[tokio::test]
async fn send_stops_at_a_refused_xclient() -> io::Result<()> {
    let sink = Sink::start().await?;
    let t = smtp::send(
        sink.addr(),
        &envelope(&["a@example.net"]),
        b"Subject: x\r\n\r\n",
    )
    .await?;
    assert_eq!(t.greeting.code, 220);
    assert_eq!(t.xclient.code, 502);
    assert!(!Transcript::reached(&t.mail));
    assert!(t.rcpts.is_empty());
    assert!(t.data.is_none());
    Ok(())
}

fn envelope<'a>(to: &'a [&'a str]) -> Envelope<'a> {
    Envelope {
        client_addr: "192.0.2.1",
        client_name: "mail.example.com",
        helo: "mail.example.com",
        from: "bob@example.com",
        to,
    }
}

/// A one-connection server that greets with `greeting`, then answers each
/// command line with the next reply of `replies` (hanging up after a 421 or
/// when the replies run out). Yields the commands it got.
async fn scripted(
    greeting: &'static str,
    replies: &'static [&'static str],
) -> io::Result<(SocketAddr, JoinHandle<io::Result<Vec<String>>>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let (s, _) = listener.accept().await?;
        let (r, mut w) = s.into_split();
        let mut r = BufReader::new(r);
        w.write_all(format!("{greeting}\r\n").as_bytes()).await?;
        let mut got = Vec::new();
        if greeting.starts_with("421") {
            return Ok(got);
        }
        let mut in_data = false;
        for reply in replies {
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).await? == 0 {
                    return Ok(got);
                }
                let line = line.trim_end().to_owned();
                let end_of_data = in_data && line == ".";
                if !in_data || end_of_data {
                    got.push(line);
                    break;
                }
            }
            w.write_all(format!("{reply}\r\n").as_bytes()).await?;
            in_data = reply.starts_with("354");
            if reply.starts_with("421") {
                break;
            }
        }
        Ok(got)
    });
    Ok((addr, task))
}

const POSTFIX_START: [&str; 4] = [
    "250-mx.test\r\n250 PIPELINING",
    "220 mx.test ESMTP",
    "250-mx.test\r\n250 PIPELINING",
    "250 2.1.0 Ok",
];

#[tokio::test]
async fn send_records_a_421_at_rcpt_and_returns_after_the_hang_up() -> io::Result<()> {
    static REPLIES: [&str; 6] = [
        POSTFIX_START[0],
        POSTFIX_START[1],
        POSTFIX_START[2],
        POSTFIX_START[3],
        "250 2.1.5 Ok",
        "421 4.7.0 mx.test Error: too many messages",
    ];
    let (addr, server) = scripted("220 mx.test ESMTP", &REPLIES).await?;
    let t = smtp::send(
        addr,
        &envelope(&["a@example.net", "b@example.net", "c@example.net"]),
        b"x",
    )
    .await?;
    assert_eq!(t.xclient.code, 220);
    assert_eq!(t.mail.code, 250);
    let codes: Vec<u16> = t.rcpts.iter().map(|r| r.code).collect();
    assert_eq!(codes, [250, 421], "{t:?}");
    assert_eq!(t.rcpts[1].text(), "4.7.0 mx.test Error: too many messages");
    assert!(t.data.is_none(), "no DATA after the 421");
    let got = server.await.map_err(io::Error::other)??;
    assert_eq!(
        got,
        [
            "EHLO localhost",
            "XCLIENT ADDR=192.0.2.1 NAME=mail.example.com HELO=mail.example.com",
            "EHLO mail.example.com",
            "MAIL FROM:<bob@example.com>",
            "RCPT TO:<a@example.net>",
            "RCPT TO:<b@example.net>",
        ]
    );
    Ok(())
}

#[tokio::test]
async fn send_returns_what_it_got_when_the_server_just_hangs_up() -> io::Result<()> {
    // The server hangs up without a 421 right after MAIL (its replies run out).
    let (addr, server) = scripted("220 mx.test ESMTP", &POSTFIX_START).await?;
    let t = smtp::send(addr, &envelope(&["a@example.net"]), b"x").await?;
    assert_eq!(t.mail.code, 250);
    assert!(t.rcpts.is_empty() && t.data.is_none(), "{t:?}");
    server.await.map_err(io::Error::other)??;

    // A 421 greeting: nothing more is sent.
    let (addr, server) = scripted("421 4.3.2 mx.test Service not available", &[]).await?;
    let t = smtp::send(addr, &envelope(&["a@example.net"]), b"x").await?;
    assert_eq!(t.greeting.code, 421);
    assert!(!Transcript::reached(&t.xclient));
    assert!(server.await.map_err(io::Error::other)??.is_empty());
    Ok(())
}

#[tokio::test]
async fn send_sends_data_when_a_recipient_was_accepted() -> io::Result<()> {
    static REPLIES: [&str; 9] = [
        POSTFIX_START[0],
        POSTFIX_START[1],
        POSTFIX_START[2],
        POSTFIX_START[3],
        "550 5.1.1 <a@example.net>: Recipient address rejected",
        "250 2.1.5 Ok",
        "354 End data with <CR><LF>.<CR><LF>",
        "421 4.7.0 mx.test Error: daily budget spent",
        "221 2.0.0 Bye",
    ];
    let (addr, server) = scripted("220 mx.test ESMTP", &REPLIES).await?;
    let t = smtp::send(
        addr,
        &envelope(&["a@example.net", "b@example.net"]),
        b"Subject: x\r\n\r\nhi\r\n",
    )
    .await?;
    let codes: Vec<u16> = t.rcpts.iter().map(|r| r.code).collect();
    assert_eq!(codes, [550, 250]);
    let data = t.data.unwrap_or_else(|| panic!("no DATA reply"));
    assert_eq!(
        data.to_string(),
        "421 4.7.0 mx.test Error: daily budget spent"
    );
    let got = server.await.map_err(io::Error::other)??;
    assert_eq!(got[got.len() - 2..], ["DATA", "."], "no QUIT after the 421");
    Ok(())
}
