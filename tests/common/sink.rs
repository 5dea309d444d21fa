//! A receiving SMTP server for the tests: Postfix delivers to it, and it
//! keeps each message with its envelope. Recipients can be set to be
//! refused with a given reply (to make Postfix bounce or defer).

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, BufWriter},
    net::{TcpListener, TcpStream, tcp::OwnedReadHalf},
    sync::Notify,
    task::{JoinHandle, JoinSet},
};

/// Longest command line, and the size of the pieces message lines are read in.
const MAX_LINE: usize = 100 * 1024;
/// Largest message kept; a larger one is refused with 552 after its final dot.
const MAX_MESSAGE: usize = 64 * 1024 * 1024;

const EHLO_REPLY: &str = "250-sink\r\n\
                          250-PIPELINING\r\n\
                          250-SIZE 67108864\r\n\
                          250-8BITMIME\r\n\
                          250-DSN\r\n\
                          250-SMTPUTF8\r\n\
                          250 ENHANCEDSTATUSCODES";

/// One message as the sink received it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Delivered {
    /// The name the client gave in its last EHLO/HELO before MAIL.
    pub helo: String,
    /// The reverse path without `<>` (empty for the null sender).
    pub mail_from: String,
    /// What followed `MAIL FROM:<...>` (e.g. `SIZE=123 BODY=8BITMIME`).
    pub mail_params: String,
    /// The accepted recipients without `<>`, in order.
    pub rcpt_to: Vec<String>,
    /// What followed each accepted `RCPT TO:<...>` (e.g. `NOTIFY=NEVER`).
    pub rcpt_params: Vec<String>,
    /// The message as received: dot-unstuffed, CRLF line ends kept.
    pub data: Vec<u8>,
}

impl Delivered {
    /// The header block (without the empty line) and the body.
    fn split(&self) -> (&[u8], &[u8]) {
        let data = &self.data[..];
        let mut pos = 0;
        while pos < data.len() {
            let end = data[pos..]
                .iter()
                .position(|&b| b == b'\n')
                .map_or(data.len(), |i| pos + i);
            let line = &data[pos..end];
            if line.is_empty() || line == b"\r" {
                return (&data[..pos], data.get(end + 1..).unwrap_or(&[]));
            }
            pos = end + 1;
        }
        (data, &[])
    }

    /// Every value of a header, in order; names match case-insensitively.
    /// Values are unfolded (each line break with the whitespace after it
    /// becomes one space) and trimmed.
    pub fn headers(&self, name: &str) -> Vec<String> {
        let head = String::from_utf8_lossy(self.split().0).into_owned();
        let mut fields: Vec<(&str, String)> = Vec::new();
        for line in head.split('\n') {
            let line = line.strip_suffix('\r').unwrap_or(line);
            if line.starts_with([' ', '\t']) {
                if let Some((_, value)) = fields.last_mut() {
                    let more = line.trim();
                    if !more.is_empty() {
                        if !value.is_empty() {
                            value.push(' ');
                        }
                        value.push_str(more);
                    }
                }
            } else if let Some((n, v)) = line.split_once(':') {
                fields.push((n.trim_end(), v.trim().to_owned()));
            }
        }
        fields
            .into_iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
            .collect()
    }

    /// The first value of a header (see [`Delivered::headers`]).
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers(name).into_iter().next()
    }

    /// Everything after the empty line that ends the header block.
    pub fn body(&self) -> &[u8] {
        self.split().1
    }

    /// `from → to, to (Subject: ...)`, for failure messages.
    fn summary(&self) -> String {
        format!(
            "<{}> → {:?} (Subject: {:?}, {} bytes)",
            self.mail_from,
            self.rcpt_to,
            self.header("Subject").unwrap_or_default(),
            self.data.len()
        )
    }
}

#[derive(Default)]
struct Shared {
    messages: Mutex<Vec<Delivered>>,
    /// Lower-cased recipient → the reply its RCPT gets.
    refuse: Mutex<HashMap<String, String>>,
    arrived: Notify,
}

/// The sink; it stops (and drops every session) when dropped.
pub struct Sink {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Drop for Sink {
    fn drop(&mut self) {
        // Dropping the accept task drops its JoinSet, which aborts the sessions.
        self.task.abort();
    }
}

impl Sink {
    /// Listens on 127.0.0.1 at a port the OS picks.
    pub async fn start() -> io::Result<Sink> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let task = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(Sink { addr, shared, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `RCPT TO:<addr>` (any case) gets `reply`, e.g. `"550 5.1.1 No such
    /// user"`. Give a multi-line reply as its lines joined with `\n`, each
    /// with its own `NNN-`/`NNN ` prefix. After a 421 the sink hangs up.
    /// Panics if a line lacks a reply code.
    pub fn reject_recipient(&self, addr: &str, reply: &str) {
        let ok_code = |l: &str| l.len() >= 3 && l.as_bytes()[..3].iter().all(u8::is_ascii_digit);
        if !reply.lines().all(ok_code) || reply.trim().is_empty() {
            panic!("Sink::reject_recipient({addr:?}, {reply:?}): each line needs an SMTP code");
        }
        let reply = reply.lines().collect::<Vec<_>>().join("\r\n");
        lock(&self.shared.refuse).insert(addr.to_ascii_lowercase(), reply);
    }

    /// The messages received so far, in order of arrival.
    pub fn messages(&self) -> Vec<Delivered> {
        lock(&self.shared.messages).clone()
    }

    /// Waits until at least `n` messages have arrived and returns them all;
    /// panics, saying how many arrived, after `timeout`.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Delivered> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.shared.arrived.notified();
            tokio::pin!(notified);
            // Registered before looking, so an arrival in between is not missed.
            notified.as_mut().enable();
            let got = self.messages();
            if got.len() >= n {
                return got;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let got = self.messages();
                if got.len() >= n {
                    return got;
                }
                let list: Vec<String> = got.iter().map(Delivered::summary).collect();
                panic!(
                    "the sink got {} of {n} messages within {timeout:?}; arrived: {list:?}",
                    got.len()
                );
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut sessions = JoinSet::new();
    loop {
        while sessions.try_join_next().is_some() {}
        match listener.accept().await {
            Ok((stream, _)) => {
                let shared = shared.clone();
                sessions.spawn(async move {
                    // A session that fails (the peer reset it) just ends.
                    let _ = session(stream, &shared).await;
                });
            }
            // Out of file descriptors and the like: try again shortly.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// `<path> params` → (path, params); tolerates a missing `<>`.
fn path_and_params(arg: &str) -> (String, String) {
    let arg = arg.trim();
    match arg.strip_prefix('<').and_then(|a| a.split_once('>')) {
        Some((path, rest)) => (path.to_owned(), rest.trim().to_owned()),
        None => {
            let (p, rest) = arg.split_once(' ').unwrap_or((arg, ""));
            (p.to_owned(), rest.trim().to_owned())
        }
    }
}

/// `arg` without a leading `keyword` (ASCII, any case), then trimmed.
fn strip_keyword<'a>(arg: &'a str, keyword: &str) -> Option<&'a str> {
    let head = arg.get(..keyword.len())?;
    head.eq_ignore_ascii_case(keyword)
        .then(|| arg[keyword.len()..].trim())
}

/// The `SIZE=` parameter of MAIL, if any.
fn declared_size(params: &str) -> Option<u64> {
    params
        .split_ascii_whitespace()
        .find_map(|p| strip_keyword(p, "SIZE="))
        .and_then(|v| v.parse().ok())
}

enum Line {
    Complete,
    TooLong,
    Eof,
}

/// Reads one command line into `buf`; a longer line than [`MAX_LINE`] is
/// read to its end and dropped.
async fn read_command(r: &mut BufReader<OwnedReadHalf>, buf: &mut Vec<u8>) -> io::Result<Line> {
    buf.clear();
    let n = (&mut *r)
        .take(MAX_LINE as u64)
        .read_until(b'\n', buf)
        .await?;
    if n == 0 || (!buf.ends_with(b"\n") && n < MAX_LINE) {
        return Ok(Line::Eof);
    }
    if buf.ends_with(b"\n") {
        return Ok(Line::Complete);
    }
    loop {
        buf.clear();
        let n = (&mut *r)
            .take(MAX_LINE as u64)
            .read_until(b'\n', buf)
            .await?;
        if n == 0 {
            return Ok(Line::Eof);
        }
        if buf.ends_with(b"\n") {
            buf.clear();
            return Ok(Line::TooLong);
        }
    }
}

/// Reads message data up to CRLF.CRLF, dot-unstuffed. `None` if the client
/// hung up first; `Some(None)` if the message was larger than [`MAX_MESSAGE`].
async fn read_data(r: &mut BufReader<OwnedReadHalf>) -> io::Result<Option<Option<Vec<u8>>>> {
    let mut data = Some(Vec::new());
    let mut piece = Vec::new();
    let mut line_start = true;
    loop {
        piece.clear();
        let n = (&mut *r)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut piece)
            .await?;
        if n == 0 {
            return Ok(None);
        }
        let mut content = &piece[..];
        if line_start {
            if piece == b".\r\n" {
                return Ok(Some(data));
            }
            if piece.starts_with(b".") {
                content = &piece[1..];
            }
        }
        line_start = piece.ends_with(b"\n");
        if let Some(d) = &mut data {
            if d.len() + content.len() > MAX_MESSAGE {
                data = None;
            } else {
                d.extend_from_slice(content);
            }
        }
    }
}

async fn session(stream: TcpStream, shared: &Shared) -> io::Result<()> {
    let (r, w) = stream.into_split();
    let mut r = BufReader::new(r);
    let mut w = BufWriter::new(w);
    w.write_all(b"220 sink ESMTP\r\n").await?;
    w.flush().await?;
    let mut helo = String::new();
    let mut current: Option<Delivered> = None;
    let mut buf = Vec::new();
    loop {
        let reply: String = match read_command(&mut r, &mut buf).await? {
            Line::Eof => return Ok(()),
            Line::TooLong => "500 5.5.0 Error: line too long".into(),
            Line::Complete => {
                let text = String::from_utf8_lossy(&buf);
                let text = text.trim_end_matches(['\r', '\n']);
                let (verb, arg) = text.split_once(' ').unwrap_or((text, ""));
                let arg = arg.trim();
                match verb.to_ascii_uppercase().as_str() {
                    "EHLO" | "HELO" if arg.is_empty() => {
                        format!("501 5.5.4 Syntax: {verb} hostname")
                    }
                    v @ ("EHLO" | "HELO") => {
                        helo = arg.to_owned();
                        current = None;
                        if v == "EHLO" {
                            EHLO_REPLY.into()
                        } else {
                            "250 sink".into()
                        }
                    }
                    "MAIL" => match strip_keyword(arg, "FROM:") {
                        None => "501 5.5.4 Syntax: MAIL FROM:<address>".into(),
                        Some(_) if current.is_some() => {
                            "503 5.5.1 Error: nested MAIL command".into()
                        }
                        Some(rest) => {
                            let (mail_from, mail_params) = path_and_params(rest);
                            if declared_size(&mail_params).is_some_and(|s| s > MAX_MESSAGE as u64) {
                                "552 5.3.4 Message size exceeds fixed limit".into()
                            } else {
                                current = Some(Delivered {
                                    helo: helo.clone(),
                                    mail_from,
                                    mail_params,
                                    ..Delivered::default()
                                });
                                "250 2.1.0 Ok".into()
                            }
                        }
                    },
                    "RCPT" => match (strip_keyword(arg, "TO:"), &mut current) {
                        (None, _) => "501 5.5.4 Syntax: RCPT TO:<address>".into(),
                        (Some(_), None) => "503 5.5.1 Error: need MAIL command".into(),
                        (Some(rest), Some(m)) => {
                            let (to, params) = path_and_params(rest);
                            let refusal =
                                lock(&shared.refuse).get(&to.to_ascii_lowercase()).cloned();
                            match refusal {
                                Some(refusal) => refusal,
                                None => {
                                    m.rcpt_to.push(to);
                                    m.rcpt_params.push(params);
                                    "250 2.1.5 Ok".into()
                                }
                            }
                        }
                    },
                    "DATA" if !arg.is_empty() => "501 5.5.4 Syntax: DATA".into(),
                    "DATA" => match &current {
                        None => "503 5.5.1 Error: need RCPT command".into(),
                        Some(m) if m.rcpt_to.is_empty() => {
                            "554 5.5.1 Error: no valid recipients".into()
                        }
                        Some(_) => {
                            w.write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                                .await?;
                            if r.buffer().is_empty() {
                                w.flush().await?;
                            }
                            match read_data(&mut r).await? {
                                None => return Ok(()),
                                Some(None) => {
                                    current = None;
                                    "552 5.3.4 Message size exceeds fixed limit".into()
                                }
                                Some(Some(data)) => {
                                    if let Some(mut done) = current.take() {
                                        done.data = data;
                                        lock(&shared.messages).push(done);
                                        shared.arrived.notify_waiters();
                                    }
                                    "250 2.0.0 Ok: queued".into()
                                }
                            }
                        }
                    },
                    "RSET" => {
                        current = None;
                        "250 2.0.0 Ok".into()
                    }
                    "NOOP" => "250 2.0.0 Ok".into(),
                    "QUIT" => "221 2.0.0 Bye".into(),
                    _ => "502 5.5.2 Error: command not recognized".into(),
                }
            }
        };
        w.write_all(reply.as_bytes()).await?;
        w.write_all(b"\r\n").await?;
        // After QUIT or a 421 the sink hangs up.
        if reply.starts_with("221") || reply.starts_with("421") {
            w.flush().await?;
            return w.shutdown().await;
        }
        // Answers to pipelined commands go out together, once all are read.
        if r.buffer().is_empty() {
            w.flush().await?;
        }
    }
}
