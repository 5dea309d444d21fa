//! A real redis-server on a free loopback port, as a child process of the
//! test; killed on drop. It can be stopped and started again on the same
//! port, to test Redis going away and coming back.
//!
//! tests/store_conformance.rs includes this file on its own (with ports.rs
//! beside it as `super::ports`): it must not use the other harness modules.

use std::{
    io::{self, Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

const BINARY: &str = "/usr/bin/redis-server";
const NOT_INSTALLED: &str = "redis-server is not installed: run `apt-get install -y redis-server` (the README's test command does this)";
/// How long a (re)start may take until it answers PING.
const START_TIMEOUT: Duration = Duration::from_secs(10);

pub struct RedisServer {
    port: u16,
    /// Its working directory (nothing is saved there) and its log.
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts redis-server on a free port of 127.0.0.1 and waits until it
    /// answers PING.
    pub fn start() -> io::Result<RedisServer> {
        if !Path::new(BINARY).exists() {
            return Err(io::Error::new(io::ErrorKind::NotFound, NOT_INSTALLED));
        }
        let mut last = None;
        // The port was free when picked; something else may take it before
        // redis binds it, so try a few.
        for _ in 0..5 {
            let dir = tempfile::Builder::new()
                .prefix("mxguard-redis-")
                .tempdir()?;
            let mut server = RedisServer {
                port: super::ports::free_port(),
                dir,
                child: None,
            };
            match server.restart() {
                Ok(()) => return Ok(server),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("redis-server did not start")))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT/`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Whether the child process is running (it may not answer yet).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Kills the server (as a crash would: no save, no goodbye); its port
    /// refuses connections when this returns. Nothing if it is not running.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server (again, empty) on the same port and waits until it
    /// answers PING; stops it first if it runs.
    pub fn restart(&mut self) -> io::Result<()> {
        self.stop();
        let child = Command::new(BINARY)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--protected-mode", "no", "--daemonize", "no"])
            .args(["--loglevel", "warning"])
            .arg("--logfile")
            .arg(self.log_path())
            .arg("--dir")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => io::Error::new(io::ErrorKind::NotFound, NOT_INSTALLED),
                _ => io::Error::new(e.kind(), format!("cannot run {BINARY}: {e}")),
            })?;
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if self.command(&["PING"]).is_ok_and(|r| r == "+PONG\r\n") {
                return Ok(());
            }
            if !self.is_running() {
                let status = self.child.take().and_then(|mut c| c.wait().ok());
                return Err(io::Error::other(format!(
                    "redis-server on port {} exited at start ({}); its log: {}",
                    self.port,
                    status.map_or_else(|| "status unknown".to_owned(), |s| s.to_string()),
                    self.log_tail()
                )));
            }
            if Instant::now() > deadline {
                self.stop();
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "redis-server on port {} did not answer PING within {START_TIMEOUT:?}; its log: {}",
                        self.port,
                        self.log_tail()
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends one command in RESP on a new connection and returns the whole
    /// raw reply, e.g. `+PONG\r\n` or `$1\r\nv\r\n`.
    pub fn command(&self, args: &[&str]) -> io::Result<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        s.write_all(req.as_bytes())?;
        let mut reply = Vec::new();
        let mut buf = [0u8; 4096];
        while reply_len(&reply).is_none() {
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "redis closed the connection after {:?}",
                        String::from_utf8_lossy(&reply)
                    ),
                ));
            }
            reply.extend_from_slice(&buf[..n]);
        }
        Ok(String::from_utf8_lossy(&reply).into_owned())
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    /// The end of the server's log, for error messages.
    fn log_tail(&self) -> String {
        match std::fs::read_to_string(self.log_path()) {
            Ok(log) => {
                let lines: Vec<&str> = log.lines().collect();
                lines[lines.len().saturating_sub(5)..].join(" | ")
            }
            Err(e) => format!("(unreadable: {e})"),
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The length of the complete RESP reply at the start of `buf`, if it is all
/// there.
fn reply_len(buf: &[u8]) -> Option<usize> {
    let line_end = buf.windows(2).position(|w| w == b"\r\n")?;
    let after_line = line_end + 2;
    let count = || -> Option<i64> { std::str::from_utf8(&buf[1..line_end]).ok()?.parse().ok() };
    match buf.first()? {
        b'$' => match usize::try_from(count()?) {
            // A bulk string: its bytes and a CRLF; $-1 is nil.
            Ok(n) => (buf.len() >= after_line + n + 2).then_some(after_line + n + 2),
            Err(_) => Some(after_line),
        },
        b'*' => {
            // An array: so many replies in a row; *-1 is nil.
            let mut end = after_line;
            for _ in 0..count()?.max(0) {
                end += reply_len(&buf[end..])?;
            }
            Some(end)
        }
        // Simple strings, errors, integers: one line.
        _ => Some(after_line),
    }
}
