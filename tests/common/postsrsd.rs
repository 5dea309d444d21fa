//! Debian's postsrsd (1.x), started on free loopback ports with a given
//! secret and SRS domain, asked through its Postfix tcp_table protocol
//! (`get ADDRESS` → `200 RESULT`). Stopped on drop.

use std::{
    io::{BufRead, BufReader, Write},
    net::TcpStream,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

pub struct Postsrsd {
    child: Child,
    forward_port: u16,
    reverse_port: u16,
    _dir: tempfile::TempDir,
}

const BIN: &str = "/usr/sbin/postsrsd";

impl Postsrsd {
    pub fn start(secret: &str, domain: &str) -> Postsrsd {
        if !Path::new(BIN).exists() {
            panic!(
                "postsrsd is not installed: run `apt-get install -y --no-install-recommends postsrsd` \
                 (the README's test command does this)"
            );
        }
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let secrets = dir.path().join("secret");
        std::fs::write(&secrets, format!("{secret}\n")).unwrap_or_else(|e| panic!("{e}"));
        let (forward_port, reverse_port) = (super::ports::free_port(), super::ports::free_port());
        let child = Command::new(BIN)
            .arg(format!("-s{}", secrets.display()))
            .arg(format!("-d{domain}"))
            .arg("-l127.0.0.1")
            .arg("-4")
            .arg(format!("-f{forward_port}"))
            .arg(format!("-r{reverse_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start postsrsd: {e}"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", reverse_port)).is_err() {
            if Instant::now() > deadline {
                panic!("postsrsd did not open port {reverse_port}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Postsrsd {
            child,
            forward_port,
            reverse_port,
            _dir: dir,
        }
    }

    fn ask(port: u16, address: &str) -> Result<String, String> {
        let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
        s.write_all(format!("get {address}\n").as_bytes())
            .map_err(|e| e.to_string())?;
        let mut line = String::new();
        BufReader::new(s)
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        let line = line.trim_end();
        match line.split_once(' ') {
            Some(("200", result)) => Ok(result.to_owned()),
            _ => Err(line.to_owned()),
        }
    }

    /// The tcp_table ports (forward, reverse), for Postfix's canonical maps.
    pub fn ports(&self) -> (u16, u16) {
        (self.forward_port, self.reverse_port)
    }

    /// postsrsd's SRS address for `address` (or its error line).
    pub fn forward(&self, address: &str) -> Result<String, String> {
        Self::ask(self.forward_port, address)
    }

    /// postsrsd's original address for an SRS address (or its error line).
    pub fn reverse(&self, address: &str) -> Result<String, String> {
        Self::ask(self.reverse_port, address)
    }
}

impl Drop for Postsrsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
