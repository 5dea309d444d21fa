//! A receiving SMTP server for the tests: Postfix delivers to it, and it
//! keeps each message with its envelope. Recipients can be set to be
//! refused with a given reply (to make Postfix bounce).

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
    sync::Notify,
    task::JoinHandle,
};

const MAX_LINE: usize = 100 * 1024;
const MAX_MESSAGE: usize = 64 * 1024 * 1024;

#[derive(Clone, Debug, Default)]
pub struct Delivered {
    pub helo: String,
    pub mail_from: String,
    pub mail_params: String,
    pub rcpt_to: Vec<String>,
    pub rcpt_params: Vec<String>,
    /// The message as received: dot-unstuffed, CRLF line ends kept.
    pub data: Vec<u8>,
}

impl Delivered {
    fn header_block(&self) -> &[u8] {
        let end = find(&self.data, b"\r\n\r\n").map_or(self.data.len(), |i| i + 2);
        &self.data[..end]
    }

    /// Every value of a header (case-insensitive name), unfolded and trimmed.
    pub fn headers(&self, name: &str) -> Vec<String> {
        let text = String::from_utf8_lossy(self.header_block()).into_owned();
        let mut fields: Vec<(String, String)> = Vec::new();
        for line in text.split("\r\n") {
            if line.starts_with([' ', '\t']) {
                if let Some((_, v)) = fields.last_mut() {
                    v.push(' ');
                    v.push_str(line.trim());
                }
            } else if let Some((n, v)) = line.split_once(':') {
                fields.push((n.to_owned(), v.trim().to_owned()));
            }
        }
        fields
            .into_iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
            .collect()
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers(name).into_iter().next()
    }

    pub fn body(&self) -> &[u8] {
        find(&self.data, b"\r\n\r\n").map_or(&[][..], |i| &self.data[i + 4..])
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[derive(Default)]
struct Shared {
    messages: Mutex<Vec<Delivered>>,
    refuse: Mutex<HashMap<String, String>>,
    arrived: Notify,
}

pub struct Sink {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Sink {
    pub async fn start() -> io::Result<Sink> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        let task = tokio::spawn(async move {
            let mut sessions = tokio::task::JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let s = s.clone();
                sessions.spawn(async move {
                    let _ = session(stream, &s).await;
                });
            }
        });
        Ok(Sink { addr, shared, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// RCPT TO:<addr> gets `reply` (e.g. "550 5.1.1 No such user").
    pub fn reject_recipient(&self, addr: &str, reply: &str) {
        lock(&self.shared.refuse).insert(addr.to_ascii_lowercase(), reply.to_owned());
    }

    pub fn messages(&self) -> Vec<Delivered> {
        lock(&self.shared.messages).clone()
    }

    /// Waits until at least `n` messages have arrived.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Delivered> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.shared.arrived.notified();
            let got = self.messages();
            if got.len() >= n {
                return got;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!(
                    "the sink got {} of {n} messages within {timeout:?}: {got:?}",
                    self.messages().len()
                );
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Strips `<…>` from a MAIL/RCPT argument and splits off its parameters.
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

async fn session(stream: TcpStream, shared: &Shared) -> io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    w.write_all(b"220 sink ESMTP\r\n").await?;
    let mut current = Delivered::default();
    let mut helo = String::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = (&mut r)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&line)
            .trim_end_matches(['\r', '\n'])
            .to_owned();
        let upper = text.to_ascii_uppercase();
        let reply: String = if upper.starts_with("EHLO") || upper.starts_with("HELO") {
            helo = text.get(5..).unwrap_or("").trim().to_owned();
            if upper.starts_with("EHLO") {
                "250-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SIZE 104857600\r\n250-DSN\r\n250-SMTPUTF8\r\n250 ENHANCEDSTATUSCODES".into()
            } else {
                "250 sink".into()
            }
        } else if upper.starts_with("MAIL FROM:") {
            let (p, params) = path_and_params(&text[10..]);
            current = Delivered {
                helo: helo.clone(),
                mail_from: p,
                mail_params: params,
                ..Delivered::default()
            };
            "250 2.1.0 Ok".into()
        } else if upper.starts_with("RCPT TO:") {
            let (p, params) = path_and_params(&text[8..]);
            match lock(&shared.refuse).get(&p.to_ascii_lowercase()) {
                Some(refusal) => refusal.clone(),
                None => {
                    current.rcpt_to.push(p);
                    current.rcpt_params.push(params);
                    "250 2.1.5 Ok".into()
                }
            }
        } else if upper == "DATA" {
            if current.rcpt_to.is_empty() {
                "554 5.5.1 No valid recipients".into()
            } else {
                w.write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    .await?;
                let mut data = Vec::new();
                loop {
                    line.clear();
                    let n = (&mut r)
                        .take(MAX_LINE as u64)
                        .read_until(b'\n', &mut line)
                        .await?;
                    if n == 0 {
                        return Ok(());
                    }
                    if line == b".\r\n" || line == b".\n" {
                        break;
                    }
                    let content = if line.starts_with(b".") {
                        &line[1..]
                    } else {
                        &line[..]
                    };
                    if data.len() + content.len() <= MAX_MESSAGE {
                        data.extend_from_slice(content);
                    }
                }
                let mut done = std::mem::take(&mut current);
                done.data = data;
                lock(&shared.messages).push(done);
                shared.arrived.notify_waiters();
                "250 2.0.0 Ok: queued".into()
            }
        } else if upper == "RSET" {
            current = Delivered::default();
            "250 2.0.0 Ok".into()
        } else if upper == "NOOP" {
            "250 2.0.0 Ok".into()
        } else if upper == "QUIT" {
            w.write_all(b"221 2.0.0 Bye\r\n").await?;
            return Ok(());
        } else {
            "502 5.5.2 Command not recognized".into()
        };
        w.write_all(reply.as_bytes()).await?;
        w.write_all(b"\r\n").await?;
    }
}
