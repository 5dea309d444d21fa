//! mxguard run in-process through `mxguard::run`, on free loopback ports,
//! with a configuration file of the test's own (so reloads read a real file).

use super::dns::DnsServer;
use mxguard::{ConfigFile, Listeners, config::ListenAddr};
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Once,
    time::Duration,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::{mpsc, oneshot},
    task::JoinHandle,
};

pub struct Mxguard {
    pub milter: Option<ListenAddr>,
    pub policy: Option<ListenAddr>,
    pub socketmap: Option<ListenAddr>,
    pub http: Option<ListenAddr>,
    /// The loopback DNS server the daemon asks (unless the test's YAML
    /// names another).
    pub dns: DnsServer,
    config_path: PathBuf,
    reload: mpsc::Sender<()>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), mxguard::RunError>>>,
    dir: tempfile::TempDir,
}

static LOG: Once = Once::new();

/// Logs of the daemon under test: `MXGUARD_TEST_LOG=debug cargo test …`.
pub fn init_log() {
    LOG.call_once(|| {
        let filter = std::env::var("MXGUARD_TEST_LOG").unwrap_or_else(|_| "warn".into());
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}

/// Every front end on a free loopback port, the store in the test's
/// directory; `extra` (YAML) is merged over it, key by key.
pub fn config_yaml(dir: &Path, dns: SocketAddr, extra: &str) -> String {
    let base = format!(
        "milter: {{ listen: \"inet:127.0.0.1:0\" }}\n\
         policy: {{ listen: \"inet:127.0.0.1:0\" }}\n\
         socketmap: {{ listen: \"inet:127.0.0.1:0\" }}\n\
         http: {{ listen: \"127.0.0.1:0\" }}\n\
         store: {{ path: \"{}/state.db\" }}\n\
         hostname: mx.mxguard.test\n\
         greylist: {{ enabled: false }}\n\
         shutdown_timeout: 5s\n\
         dns: {{ nameservers: [\"{dns}\"], timeout: 2s }}\n",
        dir.display()
    );
    let mut value: serde_yaml::Value =
        serde_yaml::from_str(&base).unwrap_or_else(|e| panic!("base test config: {e}"));
    let extra: serde_yaml::Value =
        serde_yaml::from_str(extra).unwrap_or_else(|e| panic!("test config: {e}"));
    merge(&mut value, extra);
    serde_yaml::to_string(&value).unwrap_or_else(|e| panic!("test config: {e}"))
}

fn merge(base: &mut serde_yaml::Value, extra: serde_yaml::Value) {
    match (base, extra) {
        (serde_yaml::Value::Mapping(b), serde_yaml::Value::Mapping(e)) => {
            for (k, v) in e {
                match b.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, v) if !v.is_null() || !slot.is_mapping() => *slot = v,
        _ => {}
    }
}

impl Mxguard {
    /// Starts mxguard with the test configuration plus `extra` (YAML).
    pub async fn start(extra: &str) -> Mxguard {
        init_log();
        let dir = tempfile::Builder::new()
            .prefix("mxguard-daemon-")
            .tempdir()
            .unwrap_or_else(|e| panic!("temporary directory: {e}"));
        let config_path = dir.path().join("mxguard.yaml");
        // Every lookup of the daemon (SPF, DKIM, DMARC, TXT rules) goes to
        // this loopback server: NXDOMAIN unless a test adds records.
        let dns = DnsServer::start()
            .await
            .unwrap_or_else(|e| panic!("test DNS server: {e}"));
        std::fs::write(&config_path, config_yaml(dir.path(), dns.addr(), extra))
            .unwrap_or_else(|e| panic!("cannot write the test config: {e}"));
        let file =
            ConfigFile::load(&config_path).unwrap_or_else(|e| panic!("test config rejected: {e}"));
        let listeners = Listeners::bind(&file.config)
            .await
            .unwrap_or_else(|e| panic!("cannot bind: {e}"));
        let (milter, policy, socketmap, http) = (
            listeners.milter_addr(),
            listeners.policy_addr(),
            listeners.socketmap_addr(),
            listeners.http_addr(),
        );
        let (reload_tx, reload_rx) = mpsc::channel(1);
        let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(mxguard::run(listeners, file, reload_rx, async {
            let _ = shutdown_rx.await;
        }));
        Mxguard {
            milter,
            policy,
            socketmap,
            http,
            dns,
            config_path,
            reload: reload_tx,
            shutdown: Some(shutdown_tx),
            task: Some(task),
            dir,
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The milter socket as Postfix writes it (`inet:127.0.0.1:PORT`).
    pub fn milter_wiring(&self) -> String {
        self.milter
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_else(|| panic!("milter is off"))
    }

    pub fn policy_wiring(&self) -> String {
        self.policy
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_else(|| panic!("policy is off"))
    }

    pub fn policy_addr(&self) -> SocketAddr {
        socket_addr(self.policy.as_ref())
    }

    pub fn milter_addr(&self) -> SocketAddr {
        socket_addr(self.milter.as_ref())
    }

    pub fn socketmap_addr(&self) -> SocketAddr {
        socket_addr(self.socketmap.as_ref())
    }

    pub fn http_addr(&self) -> SocketAddr {
        socket_addr(self.http.as_ref())
    }

    /// Rewrites the configuration file (test base plus `extra`) and asks
    /// the daemon to reload it, as SIGHUP does.
    pub async fn reconfigure(&self, extra: &str) {
        self.write_config(&config_yaml(self.dir.path(), self.dns.addr(), extra));
        self.reload().await;
    }

    pub fn write_config(&self, text: &str) {
        std::fs::write(&self.config_path, text)
            .unwrap_or_else(|e| panic!("cannot write the test config: {e}"));
    }

    pub async fn reload(&self) {
        self.reload
            .send(())
            .await
            .unwrap_or_else(|e| panic!("daemon gone: {e}"));
        // The reload runs on the daemon's task; give it a moment.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    /// Stops the daemon as SIGTERM does and returns what `run` returned.
    pub async fn stop(mut self) -> Result<(), mxguard::RunError> {
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(());
        }
        match self.task.take() {
            Some(t) => tokio::time::timeout(Duration::from_secs(15), t)
                .await
                .unwrap_or_else(|_| panic!("mxguard did not stop within 15 s"))
                .unwrap_or_else(|e| panic!("mxguard's task failed: {e}")),
            None => Ok(()),
        }
    }

    /// One RCPT-stage policy request from `client` (verified name `name`,
    /// or `unknown`) and bob@example.com, on a connection of its own; the
    /// `action=` line.
    pub async fn ask_rcpt(&self, client: &str, name: &str, rcpt: &str, count: u32) -> String {
        self.ask_rcpt_from(client, name, "bob@example.com", rcpt, count)
            .await
    }

    /// The same with a sender of the test's choice (empty: the null sender).
    pub async fn ask_rcpt_from(
        &self,
        client: &str,
        name: &str,
        sender: &str,
        rcpt: &str,
        count: u32,
    ) -> String {
        use tokio::io::{AsyncBufReadExt, BufReader};
        let s = TcpStream::connect(self.policy_addr())
            .await
            .unwrap_or_else(|e| panic!("connect: {e}"));
        let mut s = BufReader::new(s);
        let req = format!(
            "request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address={client}\nclient_name={name}\n\
             helo_name=mx.example.com\nsender={sender}\nrecipient={rcpt}\nrecipient_count={count}\n\n"
        );
        s.get_mut()
            .write_all(req.as_bytes())
            .await
            .unwrap_or_else(|e| panic!("write: {e}"));
        let mut line = String::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_line(&mut line))
            .await
            .unwrap_or_else(|_| panic!("no answer within 10 s"))
            .unwrap_or_else(|e| panic!("read: {e}"));
        line.trim_end().to_owned()
    }

    /// GET a path from the HTTP listener: (status line, body).
    pub async fn http_get(&self, path: &str) -> (String, String) {
        http_get(self.http_addr(), path).await
    }

    /// The value of one metric series, e.g.
    /// `mxguard_requests_total{frontend="policy",verdict="reject"}`; 0 if absent.
    pub async fn metric(&self, series: &str) -> f64 {
        let (_, body) = self.http_get("/metrics").await;
        body.lines()
            .find_map(|l| {
                l.strip_prefix(series)
                    .and_then(|rest| rest.trim().parse().ok())
            })
            .unwrap_or(0.0)
    }
}

impl Drop for Mxguard {
    fn drop(&mut self) {
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(());
        }
    }
}

pub fn socket_addr(a: Option<&ListenAddr>) -> SocketAddr {
    match a {
        Some(ListenAddr::Inet { host, port }) => format!("{host}:{port}")
            .parse()
            .unwrap_or_else(|e| panic!("{host}:{port}: {e}")),
        other => panic!("not an inet socket: {other:?}"),
    }
}

pub async fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    http_request(addr, &format!("GET {path} HTTP/1.1\r\nHost: test\r\n")).await
}

/// One request: `head` is its request line and header lines, each ended
/// by CRLF; the empty line after them is added. (status line, body).
pub async fn http_request(addr: SocketAddr, head: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("http connect {addr}: {e}"));
    s.write_all(format!("{head}Connection: close\r\n\r\n").as_bytes())
        .await
        .unwrap_or_else(|e| panic!("http write: {e}"));
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)
        .await
        .unwrap_or_else(|e| panic!("http read: {e}"));
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (
        head.lines().next().unwrap_or("").to_owned(),
        body.to_owned(),
    )
}
