//! An SMTP client for tests that keeps every reply, so tests can assert on
//! exact codes and texts. It can pose as any remote client through Postfix's
//! XCLIENT.

use std::{
    fmt, io,
    net::SocketAddr,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
};

/// How long one reply (all of its lines) may take.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest reply line accepted (RFC 5321 allows 512 octets; be generous).
const MAX_REPLY_LINE: usize = 64 * 1024;

/// One SMTP reply: its code and its lines without the `NNN-`/`NNN ` prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl Reply {
    /// The lines joined with `'\n'`.
    pub fn text(&self) -> String {
        self.lines.join("\n")
    }

    /// 2xx or 3xx.
    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }
}

/// `550 5.1.1 text`: the code and the first line.
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
    /// Connects and reads the greeting.
    pub async fn connect(addr: SocketAddr) -> io::Result<(SmtpClient, Reply)> {
        let stream = TcpStream::connect(addr).await?;
        let (r, w) = stream.into_split();
        let mut client = SmtpClient {
            reader: BufReader::new(r),
            writer: w,
        };
        let greeting = client.read_reply("the greeting").await?;
        Ok((client, greeting))
    }

    /// Reads one (possibly multi-line) reply within [`REPLY_TIMEOUT`]. A
    /// server that hangs up in the middle of a multi-line reply leaves the
    /// lines it sent; one that hangs up before any line is an
    /// `UnexpectedEof` error.
    async fn read_reply(&mut self, what: &str) -> io::Result<Reply> {
        match tokio::time::timeout(REPLY_TIMEOUT, self.read_reply_lines(what)).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no reply to {what} within {} s", REPLY_TIMEOUT.as_secs()),
            )),
        }
    }

    async fn read_reply_lines(&mut self, what: &str) -> io::Result<Reply> {
        let mut code = 0;
        let mut lines = Vec::new();
        let mut raw = Vec::new();
        loop {
            raw.clear();
            let n = (&mut self.reader)
                .take(MAX_REPLY_LINE as u64)
                .read_until(b'\n', &mut raw)
                .await?;
            if n == 0 {
                if lines.is_empty() {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("connection closed while waiting for the reply to {what}"),
                    ));
                }
                return Ok(Reply { code, lines });
            }
            if !raw.ends_with(b"\n") && n == MAX_REPLY_LINE {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("a reply line to {what} is longer than {MAX_REPLY_LINE} bytes"),
                ));
            }
            let text = String::from_utf8_lossy(&raw);
            let line = text.trim_end_matches(['\r', '\n']);
            let parsed: Option<u16> = line
                .get(..3)
                .filter(|c| c.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|c| c.parse().ok());
            let Some(this_code) = parsed else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("not an SMTP reply to {what}: {line:?}"),
                ));
            };
            if lines.is_empty() {
                code = this_code;
            }
            let more = line.as_bytes().get(3) == Some(&b'-');
            lines.push(line.get(4..).unwrap_or("").to_owned());
            if !more {
                return Ok(Reply { code, lines });
            }
        }
    }

    /// Sends one command line (CRLF added) and reads its reply.
    pub async fn command(&mut self, line: &str) -> io::Result<Reply> {
        self.writer
            .write_all(format!("{line}\r\n").as_bytes())
            .await?;
        self.read_reply(line).await
    }

    pub async fn ehlo(&mut self, name: &str) -> io::Result<Reply> {
        self.command(&format!("EHLO {name}")).await
    }

    /// `XCLIENT NAME=value ...`. Postfix answers a successful XCLIENT with a
    /// new 220 greeting; the caller must EHLO again.
    pub async fn xclient(&mut self, attrs: &[(&str, &str)]) -> io::Result<Reply> {
        let args: Vec<String> = attrs.iter().map(|(k, v)| format!("{k}={v}")).collect();
        self.command(&format!("XCLIENT {}", args.join(" "))).await
    }

    /// `MAIL FROM:<addr>`; an empty `addr` is the null sender `<>`.
    pub async fn mail_from(&mut self, addr: &str) -> io::Result<Reply> {
        self.command(&format!("MAIL FROM:<{addr}>")).await
    }

    pub async fn rcpt_to(&mut self, addr: &str) -> io::Result<Reply> {
        self.command(&format!("RCPT TO:<{addr}>")).await
    }

    /// DATA; on 354 the message (line ends made CRLF, dot-stuffed) and the
    /// final dot, returning the reply to the end of data. If DATA itself is
    /// refused, returns that reply.
    pub async fn data(&mut self, message: &[u8]) -> io::Result<Reply> {
        let go = self.command("DATA").await?;
        if go.code != 354 {
            return Ok(go);
        }
        let mut payload = dot_stuff(message);
        payload.extend_from_slice(b".\r\n");
        self.writer.write_all(&payload).await?;
        self.read_reply("the end of the message data").await
    }

    /// QUIT, ignoring its reply and a server that already hung up.
    pub async fn quit(mut self) -> io::Result<()> {
        match self.command("QUIT").await {
            Ok(_) => Ok(()),
            Err(e) if is_hangup(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// The message with CRLF line ends, a leading dot of each line doubled, and
/// a final CRLF if it lacked one. An empty message stays empty.
fn dot_stuff(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + message.len() / 32 + 2);
    if message.is_empty() {
        return out;
    }
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

/// Errors that mean the server hung up (as Postfix does after a 421).
fn is_hangup(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}

/// `Ok(None)` when the server hung up.
fn or_closed(r: io::Result<Reply>) -> io::Result<Option<Reply>> {
    match r {
        Ok(r) => Ok(Some(r)),
        Err(e) if is_hangup(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// One message from a posed remote client.
pub struct Envelope<'a> {
    pub client_addr: &'a str,
    pub client_name: &'a str,
    pub helo: &'a str,
    pub from: &'a str,
    pub to: &'a [&'a str],
}

/// Every reply of one [`send`] session.
///
/// A step that was never reached holds a placeholder reply with code 0 (see
/// [`Transcript::reached`]). A refusal before XCLIENT (of the greeting or the
/// first EHLO) stands in `xclient`; a refusal of the EHLO after XCLIENT (where
/// Postfix runs the milter's connect stage again) stands in `mail`.
#[derive(Clone, Debug)]
pub struct Transcript {
    pub greeting: Reply,
    pub xclient: Reply,
    pub mail: Reply,
    /// One reply per recipient tried; fewer than asked if the session ended.
    pub rcpts: Vec<Reply>,
    /// None when no recipient was accepted, or the session was cut.
    pub data: Option<Reply>,
}

impl Transcript {
    /// Whether a reply in this transcript came from the server (not a
    /// placeholder for a step the session never reached).
    pub fn reached(reply: &Reply) -> bool {
        reply.code != 0
    }
}

fn not_reached() -> Reply {
    Reply {
        code: 0,
        lines: vec!["(not reached: the session ended earlier)".into()],
    }
}

/// A 421 (or a hang-up) ends the session.
fn ends_session(r: &Reply) -> bool {
    r.code == 421
}

/// Connects, `EHLO localhost`, `XCLIENT ADDR= NAME= HELO=`, `EHLO <helo>`,
/// MAIL, each RCPT, DATA if a recipient was accepted, QUIT. Stops early at a
/// refusal that makes the rest pointless (greeting, XCLIENT, EHLO, MAIL) or a
/// 421, and returns what it got when the server hangs up; only other I/O
/// failures (and timeouts) are errors.
pub async fn send(addr: SocketAddr, env: &Envelope<'_>, message: &[u8]) -> io::Result<Transcript> {
    let (mut c, greeting) = SmtpClient::connect(addr).await?;
    let mut t = Transcript {
        greeting,
        xclient: not_reached(),
        mail: not_reached(),
        rcpts: Vec::new(),
        data: None,
    };
    if !t.greeting.is_positive() {
        return finish(c, t.greeting.code, t).await;
    }
    let Some(ehlo) = or_closed(c.ehlo("localhost").await)? else {
        return Ok(t);
    };
    if !ehlo.is_positive() {
        t.xclient = ehlo;
        return finish(c, t.xclient.code, t).await;
    }
    let Some(xclient) = or_closed(
        c.xclient(&[
            ("ADDR", env.client_addr),
            ("NAME", env.client_name),
            ("HELO", env.helo),
        ])
        .await,
    )?
    else {
        return Ok(t);
    };
    t.xclient = xclient;
    if t.xclient.code != 220 {
        return finish(c, t.xclient.code, t).await;
    }
    let Some(ehlo) = or_closed(c.ehlo(env.helo).await)? else {
        return Ok(t);
    };
    if !ehlo.is_positive() {
        t.mail = ehlo;
        return finish(c, t.mail.code, t).await;
    }
    let Some(mail) = or_closed(c.mail_from(env.from).await)? else {
        return Ok(t);
    };
    t.mail = mail;
    if !t.mail.is_positive() {
        return finish(c, t.mail.code, t).await;
    }
    let mut accepted = 0;
    for rcpt in env.to {
        let Some(r) = or_closed(c.rcpt_to(rcpt).await)? else {
            return Ok(t);
        };
        accepted += usize::from(r.is_positive());
        let end = ends_session(&r);
        t.rcpts.push(r);
        if end {
            return Ok(t);
        }
    }
    if accepted > 0 {
        let Some(d) = or_closed(c.data(message).await)? else {
            return Ok(t);
        };
        let end = ends_session(&d);
        t.data = Some(d);
        if end {
            return Ok(t);
        }
    }
    c.quit().await?;
    Ok(t)
}

/// Ends a session after a reply with code `last`: QUIT unless it was a 421
/// (after which the server has hung up).
async fn finish(c: SmtpClient, last: u16, t: Transcript) -> io::Result<Transcript> {
    if last != 421 {
        c.quit().await?;
    }
    Ok(t)
}

/// A simple RFC 5322 message: Date (now), a unique Message-ID, From, To,
/// Subject, a text/plain body. Line ends are CRLF; `body` is used as given.
pub fn message(from: &str, to: &str, subject: &str, body: &str) -> Vec<u8> {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    format!(
        "Date: {date}\r\n\
         Message-ID: <{nanos}.{pid}.{n}@mxguard.test>\r\n\
         From: {from}\r\n\
         To: {to}\r\n\
         Subject: {subject}\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\
         \r\n\
         {body}",
        date = rfc5322_date(now.as_secs()),
        nanos = now.as_nanos(),
        pid = std::process::id(),
    )
    .into_bytes()
}

/// `Thu, 01 Jan 1970 00:00:00 +0000` for seconds since the epoch (UTC).
fn rfc5322_date(secs: u64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{}, {d:02} {} {y} {:02}:{:02}:{:02} +0000",
        DAYS[(days % 7) as usize],
        MONTHS[(m - 1) as usize],
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Year, month (1-12) and day of the month of a day count since 1970-01-01
/// (Howard Hinnant's `civil_from_days`, for non-negative counts).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}
