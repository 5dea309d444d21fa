//! An SMTP client for tests that keeps every reply, so tests can assert on
//! exact codes and texts. It can pose as any remote client through Postfix's
//! XCLIENT.

use std::{fmt, io, net::SocketAddr, time::Duration};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
};

const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// One SMTP reply: its code and its lines without the `NNN-`/`NNN ` prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl Reply {
    pub fn text(&self) -> String {
        self.lines.join("\n")
    }

    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}",
            self.code,
            self.lines.first().map(String::as_str).unwrap_or("")
        )
    }
}

pub struct SmtpClient {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl SmtpClient {
    pub async fn connect(addr: SocketAddr) -> io::Result<(SmtpClient, Reply)> {
        let stream = TcpStream::connect(addr).await?;
        let (r, w) = stream.into_split();
        let mut client = SmtpClient {
            reader: BufReader::new(r),
            writer: w,
        };
        let greeting = client.read_reply("greeting").await?;
        Ok((client, greeting))
    }

    async fn read_reply(&mut self, what: &str) -> io::Result<Reply> {
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(REPLY_TIMEOUT, self.reader.read_line(&mut line))
                .await
                .map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no reply to {what} within 30 s"),
                    )
                })??;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("connection closed while waiting for the reply to {what}"),
                ));
            }
            let line = line.trim_end_matches(['\r', '\n']);
            let code: u16 = line.get(..3).and_then(|c| c.parse().ok()).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("not an SMTP reply to {what}: {line:?}"),
                )
            })?;
            let more = line.as_bytes().get(3) == Some(&b'-');
            lines.push(line.get(4..).unwrap_or("").to_owned());
            if !more {
                return Ok(Reply { code, lines });
            }
        }
    }

    /// Sends one command line and reads its reply.
    pub async fn command(&mut self, line: &str) -> io::Result<Reply> {
        self.writer
            .write_all(format!("{line}\r\n").as_bytes())
            .await?;
        self.read_reply(line).await
    }

    pub async fn ehlo(&mut self, name: &str) -> io::Result<Reply> {
        self.command(&format!("EHLO {name}")).await
    }

    /// Postfix answers a successful XCLIENT with a new 220 greeting; the
    /// caller must EHLO again.
    pub async fn xclient(&mut self, attrs: &[(&str, &str)]) -> io::Result<Reply> {
        let args: Vec<String> = attrs.iter().map(|(k, v)| format!("{k}={v}")).collect();
        self.command(&format!("XCLIENT {}", args.join(" "))).await
    }

    pub async fn mail_from(&mut self, addr: &str) -> io::Result<Reply> {
        self.command(&format!("MAIL FROM:<{addr}>")).await
    }

    pub async fn rcpt_to(&mut self, addr: &str) -> io::Result<Reply> {
        self.command(&format!("RCPT TO:<{addr}>")).await
    }

    /// DATA, then the message (CRLF line ends, dot-stuffed) and the final
    /// dot; returns DATA's own reply if it refused.
    pub async fn data(&mut self, message: &[u8]) -> io::Result<Reply> {
        let go = self.command("DATA").await?;
        if go.code != 354 {
            return Ok(go);
        }
        self.writer.write_all(&dot_stuff(message)).await?;
        self.writer.write_all(b".\r\n").await?;
        self.read_reply("the end of the message").await
    }

    pub async fn quit(mut self) -> io::Result<()> {
        let _ = self.command("QUIT").await;
        Ok(())
    }
}

/// CRLF line ends, a leading dot doubled, and a final CRLF.
fn dot_stuff(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 64);
    let text = message
        .strip_suffix(b"\r\n")
        .or_else(|| message.strip_suffix(b"\n"))
        .unwrap_or(message);
    for line in text.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.first() == Some(&b'.') {
            out.push(b'.');
        }
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// One message from a posed remote client.
pub struct Envelope<'a> {
    pub client_addr: &'a str,
    pub client_name: &'a str,
    pub helo: &'a str,
    pub from: &'a str,
    pub to: &'a [&'a str],
}

/// Every reply of one session. A server that hangs up (after a 421) leaves
/// the later replies out.
#[derive(Clone, Debug)]
pub struct Transcript {
    pub greeting: Reply,
    pub xclient: Reply,
    pub mail: Reply,
    pub rcpts: Vec<Reply>,
    /// None when no recipient was accepted, or the session was cut.
    pub data: Option<Reply>,
}

fn closed() -> Reply {
    Reply {
        code: 0,
        lines: vec!["(connection closed)".into()],
    }
}

fn or_closed(r: io::Result<Reply>) -> io::Result<Option<Reply>> {
    match r {
        Ok(r) => Ok(Some(r)),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::UnexpectedEof
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::BrokenPipe
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

pub async fn send(addr: SocketAddr, env: &Envelope<'_>, message: &[u8]) -> io::Result<Transcript> {
    let (mut c, greeting) = SmtpClient::connect(addr).await?;
    let mut t = Transcript {
        greeting,
        xclient: closed(),
        mail: closed(),
        rcpts: Vec::new(),
        data: None,
    };
    c.ehlo("localhost").await?;
    t.xclient = c
        .xclient(&[
            ("ADDR", env.client_addr),
            ("NAME", env.client_name),
            ("HELO", env.helo),
        ])
        .await?;
    if t.xclient.code != 220 {
        return Ok(t);
    }
    let Some(ehlo) = or_closed(c.ehlo(env.helo).await)? else {
        return Ok(t);
    };
    if !ehlo.is_positive() {
        t.mail = ehlo;
        return Ok(t);
    }
    let Some(mail) = or_closed(c.mail_from(env.from).await)? else {
        return Ok(t);
    };
    t.mail = mail;
    if t.mail.code == 421 || !t.mail.is_positive() {
        return Ok(t);
    }
    let mut accepted = 0;
    for rcpt in env.to {
        let Some(r) = or_closed(c.rcpt_to(rcpt).await)? else {
            return Ok(t);
        };
        let stop = r.code == 421;
        accepted += usize::from(r.is_positive());
        t.rcpts.push(r);
        if stop {
            return Ok(t);
        }
    }
    if accepted > 0 {
        let Some(d) = or_closed(c.data(message).await)? else {
            return Ok(t);
        };
        t.data = Some(d);
    }
    let _ = c.quit().await;
    Ok(t)
}

/// A plain RFC 5322 message.
pub fn message(from: &str, to: &str, subject: &str, body: &str) -> Vec<u8> {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "Date: Sun, 22 Nov 2026 12:00:00 +0000\r\nMessage-ID: <{nanos}.{n}@mxguard.test>\r\nFrom: {from}\r\n\
         To: {to}\r\nSubject: {subject}\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{body}"
    )
    .into_bytes()
}
