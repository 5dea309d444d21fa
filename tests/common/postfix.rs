//! A throwaway real Postfix instance on loopback, configured from the files
//! in `contrib/postfix/` (so the documented wiring is the tested wiring).
//! Stopped, and its directory removed, on drop.

use std::{
    fs,
    net::{SocketAddr, TcpStream},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant, SystemTime},
};

/// Where Postfix's milter and policy lines point. `None` leaves that front
/// end out of the configuration.
#[derive(Clone, Debug, Default)]
pub struct Wiring {
    /// e.g. `inet:127.0.0.1:40123`
    pub policy: Option<String>,
    /// e.g. `inet:127.0.0.1:40124` or `unix:/tmp/…/milter.sock`
    pub milter: Option<String>,
}

pub struct Postfix {
    dir: tempfile::TempDir,
    smtpd: SocketAddr,
}

pub fn contrib(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("contrib/postfix")
        .join(name);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Fails the test, with the way out, when Postfix cannot be run here.
pub fn preflight() {
    if !Path::new("/usr/sbin/postfix").exists() {
        panic!(
            "Postfix is not installed: run `echo 'postfix postfix/main_mailer_type select No configuration' | \
             debconf-set-selections && apt-get install -y --no-install-recommends postfix` \
             (the README's test command does this)"
        );
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!("the Postfix tests must run as root: Postfix's master process starts as root");
    }
}

impl Postfix {
    /// Starts an instance that receives on a free loopback port and delivers
    /// everything to `sink_port`. `extra` lines are appended to main.cf and
    /// win over earlier ones.
    pub fn start(sink_port: u16, wiring: &Wiring, extra: &[(&str, &str)]) -> Postfix {
        preflight();
        let dir = tempfile::Builder::new()
            .prefix("mxguard-postfix-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot make a temporary directory: {e}"));
        let root = dir.path().to_owned();
        // Postfix's daemons run as user postfix and must be able to search it.
        set_mode(&root, 0o755);
        for sub in ["etc", "queue", "data"] {
            fs::create_dir_all(root.join(sub))
                .unwrap_or_else(|e| panic!("cannot create {sub}: {e}"));
            set_mode(&root.join(sub), 0o755);
        }
        chown_postfix(&root.join("data"));

        // The port is chosen before Postfix binds it, so another listener of
        // the test process may take it first: then a new one is tried.
        let mut attempt = 0;
        let pf = loop {
            attempt += 1;
            let smtpd_port = super::ports::free_port();
            let fill = |text: String| {
                text.replace("@DIR@", &root.display().to_string())
                    .replace("@SMTPD_PORT@", &smtpd_port.to_string())
                    .replace("@SINK_PORT@", &sink_port.to_string())
            };
            let mut main_cf = fill(contrib("throwaway-main.cf"));
            main_cf.push('\n');
            main_cf.push_str(&wire(&contrib("main.cf"), wiring));
            for (k, v) in extra {
                main_cf.push_str(&format!("{k} = {v}\n"));
            }
            let etc = root.join("etc");
            write_aged(&etc.join("main.cf"), &main_cf);
            write_aged(
                &etc.join("master.cf"),
                &fill(contrib("throwaway-master.cf")),
            );
            let smtpd = SocketAddr::from(([127, 0, 0, 1], smtpd_port));
            let _ = fs::remove_file(root.join("maillog"));
            let check = Command::new("/usr/sbin/postfix")
                .arg("-c")
                .arg(&etc)
                .arg("check")
                .output()
                .unwrap_or_else(|e| panic!("cannot run postfix check: {e}"));
            if !check.status.success() {
                panic!(
                    "postfix check failed: {}",
                    String::from_utf8_lossy(&check.stderr)
                );
            }
            let out = Command::new("/usr/sbin/postfix")
                .arg("-c")
                .arg(&etc)
                .arg("start")
                .output()
                .unwrap_or_else(|e| panic!("cannot run postfix start: {e}"));
            let log = fs::read_to_string(root.join("maillog")).unwrap_or_default();
            if out.status.success() {
                break smtpd;
            }
            if attempt < 5 && log.contains("Address already in use") {
                continue;
            }
            panic!(
                "postfix start failed ({}): {}{}\nmaillog:\n{log}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
            );
        };
        let pf = Postfix { dir, smtpd: pf };
        let deadline = Instant::now() + Duration::from_secs(15);
        while TcpStream::connect(pf.smtpd).is_err() {
            if Instant::now() > deadline {
                panic!(
                    "Postfix did not open {} within 15 s; maillog:\n{}",
                    pf.smtpd,
                    pf.maillog()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        pf
    }

    pub fn smtpd_addr(&self) -> SocketAddr {
        self.smtpd
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn config_dir(&self) -> PathBuf {
        self.dir.path().join("etc")
    }

    /// Postfix's own log of this instance.
    pub fn maillog(&self) -> String {
        fs::read_to_string(self.dir.path().join("maillog")).unwrap_or_default()
    }

    /// Waits until the maillog contains `needle`; panics with the log if not.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.maillog();
            if log.contains(needle) {
                return log;
            }
            if Instant::now() > deadline {
                panic!("`{needle}` did not appear in the maillog within {timeout:?}:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn postfix(&self, args: &[&str]) {
        let out = Command::new("/usr/sbin/postfix")
            .arg("-c")
            .arg(self.config_dir())
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run postfix {args:?}: {e}"));
        if !out.status.success() {
            panic!(
                "postfix {args:?} failed ({}): {}{}\nmaillog:\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.maillog()
            );
        }
    }

    fn master_pid(&self) -> Option<i32> {
        fs::read_to_string(self.dir.path().join("queue/pid/master.pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let pid = self.master_pid();
        let _ = Command::new("/usr/sbin/postfix")
            .arg("-c")
            .arg(self.config_dir())
            .arg("stop")
            .output();
        // `postfix stop` returns before master has gone; wait for it (its
        // children follow it), so the directory can be removed.
        if let Some(pid) = pid {
            let deadline = Instant::now() + Duration::from_secs(5);
            // SAFETY: kill with signal 0 only checks that the process exists.
            while unsafe { libc::kill(pid, 0) } == 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            // SAFETY: pid is Postfix's master of this instance, read from its own pid file.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// The mxguard lines of contrib/postfix/main.cf, pointed at this test's
/// sockets.
pub fn wire(snippet: &str, wiring: &Wiring) -> String {
    const POLICY: &str = "inet:127.0.0.1:10040";
    const MILTER: &str = "unix:/run/mxguard/milter.sock";
    assert!(
        snippet.contains(POLICY) && snippet.contains(MILTER),
        "contrib/postfix/main.cf no longer names {POLICY} and {MILTER}: update tests/common/postfix.rs with it"
    );
    let mut out = String::new();
    for line in snippet.lines() {
        let line = match (&wiring.policy, &wiring.milter) {
            (None, _) if line.contains("check_policy_service") => continue,
            (_, None) if line.starts_with("smtpd_milters") => continue,
            (Some(p), _) if line.contains(POLICY) => line.replace(POLICY, p),
            (_, Some(m)) if line.contains(MILTER) => line.replace(MILTER, m),
            _ => line.to_owned(),
        };
        out.push_str(&line);
        out.push('\n');
    }
    if wiring.policy.is_none() {
        // The restriction list lost its last entry: drop the dangling comma.
        out = out.replace(
            "reject_unauth_destination,\n",
            "reject_unauth_destination\n",
        );
    }
    out
}

/// Writes a file with an mtime 10 s in the past: Postfix waits about 2 s
/// for a configuration file that has just changed.
fn write_aged(path: &Path, text: &str) {
    fs::write(path, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    let past = SystemTime::now() - Duration::from_secs(10);
    if let Ok(f) = fs::File::options().write(true).open(path) {
        let _ = f.set_modified(past);
    }
}

fn set_mode(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("cannot chmod {}: {e}", path.display()));
}

fn chown_postfix(path: &Path) {
    let status = Command::new("chown").arg("postfix").arg(path).status();
    if !matches!(status, Ok(s) if s.success()) {
        panic!(
            "cannot chown {} to user postfix: {status:?}",
            path.display()
        );
    }
}
