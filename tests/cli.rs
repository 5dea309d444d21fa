//! The `mxguard` binary itself: arguments, exit codes, and real signals.

mod common;

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    path::Path,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

const BIN: &str = env!("CARGO_BIN_EXE_mxguard");

fn mxguard(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run mxguard: {e}"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn version_and_help() {
    let out = mxguard(&["--version"]);
    assert!(out.status.success());
    assert_eq!(text(&out.stdout), format!("mxguard {}\n", mxguard::VERSION));
    let out = mxguard(&["--help"]);
    assert!(out.status.success());
    let help = text(&out.stdout);
    assert!(
        help.contains("run") && help.contains("check-config"),
        "{help}"
    );
    let out = mxguard(&["frobnicate"]);
    assert_eq!(out.status.code(), Some(2), "usage errors exit 2");
}

#[test]
fn check_config_prints_the_effective_configuration() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("etc/mxguard.yaml");
    let out = mxguard(&["check-config", "-c", &example.display().to_string()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let printed = mxguard::config::Config::parse(&text(&out.stdout), "stdout")
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(printed, mxguard::config::Config::default());
    assert!(text(&out.stderr).contains("configuration OK"));
}

#[test]
fn check_config_errors_name_file_line_and_column_and_exit_78() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "milter:\n  listen: \"inet:127.0.0.1:8891\"\n  lisen: x\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let out = mxguard(&["check-config", "-c", &path.display().to_string()]);
    assert_eq!(out.status.code(), Some(78));
    let err = text(&out.stderr);
    assert!(
        err.starts_with(&format!(
            "mxguard: {}:3:3: milter: unknown field `lisen`",
            path.display()
        )),
        "{err}"
    );

    let out = mxguard(&["check-config", "-c", "/nonexistent/mxguard.yaml"]);
    assert_eq!(out.status.code(), Some(78));
    assert!(text(&out.stderr).contains("/nonexistent/mxguard.yaml: cannot read the configuration"));

    let out = mxguard(&["run", "-c", &path.display().to_string()]);
    assert_eq!(
        out.status.code(),
        Some(78),
        "run refuses an invalid file too"
    );
}

struct Daemon {
    child: Child,
    log: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Daemon {
    fn start(config: &Path) -> Daemon {
        let mut child = Command::new(BIN)
            .args(["run", "-c", &config.display().to_string()])
            .env("MXGUARD_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start mxguard: {e}"));
        let stderr = child.stderr.take().unwrap_or_else(|| panic!("no stderr"));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Daemon {
            child,
            log: rx,
            seen: Vec::new(),
        }
    }

    /// Waits for a log line containing `needle`.
    fn expect_log(&mut self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.seen.iter().any(|l| l.contains(needle)) {
                return;
            }
            if let Ok(l) = self.log.recv_timeout(Duration::from_millis(100)) {
                self.seen.push(l);
            }
        }
        panic!(
            "no log line with `{needle}`; seen:\n{}",
            self.seen.join("\n")
        );
    }

    fn signal(&self, sig: i32) {
        let pid = i32::try_from(self.child.id()).unwrap_or_else(|e| panic!("{e}"));
        // SAFETY: sends a signal to our own child process.
        unsafe { libc::kill(pid, sig) };
    }

    fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn policy_answer(port: u16, client: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap_or_else(|e| panic!("connect: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap_or_else(|e| panic!("{e}"));
    write!(s, "request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address={client}\nrecipient=a@example.org\n\n")
        .unwrap_or_else(|e| panic!("write: {e}"));
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).unwrap_or_else(|e| panic!("read: {e}"));
    text(&buf[..n])
}

fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "mxguard did not open port {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn sighup_reloads_and_sigterm_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (policy, http) = (common::ports::free_port(), common::ports::free_port());
    let sock = dir.path().join("run/milter.sock");
    let config = |extra: &str| {
        format!(
            "milter: {{ listen: \"unix:{}\" }}\npolicy: {{ listen: \"inet:127.0.0.1:{policy}\"{extra} }}\n\
             http: {{ listen: \"127.0.0.1:{http}\" }}\nstore: {{ path: \"{}/state.db\" }}\n\
             greylist: {{ enabled: false }}\n",
            sock.display(),
            dir.path().display()
        )
    };
    let path = dir.path().join("mxguard.yaml");
    std::fs::write(&path, config("")).unwrap_or_else(|e| panic!("{e}"));
    let mut d = Daemon::start(&path);
    wait_for_port(policy);
    d.expect_log("mxguard started");
    assert!(
        sock.exists(),
        "the milter socket (and its directory) are created"
    );
    assert_eq!(policy_answer(policy, "192.0.2.1"), "action=DUNNO\n\n");

    // A broken file: logged, and the running configuration stays.
    std::fs::write(&path, "policy: [this is not a map\n").unwrap_or_else(|e| panic!("{e}"));
    d.signal(libc::SIGHUP);
    d.expect_log("configuration not reloaded, the running one stays");
    assert_eq!(policy_answer(policy, "192.0.2.1"), "action=DUNNO\n\n");

    // A good one is put in force.
    std::fs::write(&path, config(", reject_clients: [192.0.2.1]"))
        .unwrap_or_else(|e| panic!("{e}"));
    d.signal(libc::SIGHUP);
    d.expect_log("configuration reloaded");
    assert!(policy_answer(policy, "192.0.2.1").starts_with("action=REJECT 5.7.1 "));

    // A value that needs a restart is kept, with a warning.
    std::fs::write(
        &path,
        config(", reject_clients: [192.0.2.1], max_connections: 5"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    d.signal(libc::SIGHUP);
    d.expect_log("new value for policy.max_connections not loaded: restart needed");

    d.signal(libc::SIGTERM);
    assert_eq!(d.wait(Duration::from_secs(10)), Some(0), "SIGTERM exits 0");
    d.expect_log("mxguard stopped");
    assert!(!sock.exists(), "the milter socket is removed on stop");
}

#[test]
fn a_busy_port_is_a_clear_start_failure() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
    let port = taken.local_addr().unwrap_or_else(|e| panic!("{e}")).port();
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = dir.path().join("mxguard.yaml");
    std::fs::write(
        &path,
        format!("milter: {{ listen: null }}\npolicy: {{ listen: \"inet:127.0.0.1:{port}\" }}\nhttp: {{ listen: null }}\n"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let out = mxguard(&["run", "-c", &path.display().to_string()]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!("cannot listen on inet:127.0.0.1:{port}")),
        "{err}"
    );
}

#[test]
fn a_state_store_that_cannot_be_opened_is_a_clear_start_failure() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = dir.path().join("mxguard.yaml");
    // A regular file where the store's directory should be: no one, root
    // included, can create the store there.
    let blocker = dir.path().join("not-a-directory");
    std::fs::write(&blocker, "x").unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(
        &path,
        format!(
            "milter: {{ listen: null }}\npolicy: {{ listen: \"inet:127.0.0.1:0\" }}\nhttp: {{ listen: null }}\n\
             store: {{ path: \"{}/state.db\" }}\n",
            blocker.display()
        ),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let out = mxguard(&["run", "-c", &path.display().to_string()]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("cannot open the state store"), "{err}");
    assert!(
        err.contains("not-a-directory"),
        "the error names the path: {err}"
    );
}

#[test]
fn logs_to_a_pipe_carry_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let port = common::ports::free_port();
    let path = dir.path().join("mxguard.yaml");
    std::fs::write(
        &path,
        format!(
            "milter: {{ listen: null }}\npolicy: {{ listen: \"inet:127.0.0.1:{port}\" }}\nhttp: {{ listen: null }}\n\
             store: {{ path: \"{}/state.db\" }}\n",
            dir.path().display()
        ),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mut d = Daemon::start(&path);
    d.expect_log("mxguard started");
    assert!(d.seen.iter().all(|l| !l.contains('\u{1b}')), "{:?}", d.seen);
}

#[test]
fn deny_and_allow_lists_are_managed_on_the_running_daemon() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (policy, http) = (common::ports::free_port(), common::ports::free_port());
    let path = dir.path().join("mxguard.yaml");
    std::fs::write(
        &path,
        format!(
            "milter: {{ listen: null }}\npolicy: {{ listen: \"inet:127.0.0.1:{policy}\" }}\n\
             http: {{ listen: \"127.0.0.1:{http}\" }}\nstore: {{ path: \"{}/state.db\" }}\ngreylist: {{ enabled: false }}\n",
            dir.path().display()
        ),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let cfg = path.display().to_string();
    let run = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["-c", &cfg]);
        mxguard(&all)
    };
    // No daemon yet: a clear failure.
    let out = run(&["deny", "list"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("cannot reach the running daemon"),
        "{}",
        text(&out.stderr)
    );

    let mut d = Daemon::start(&path);
    wait_for_port(policy);
    wait_for_port(http);
    d.expect_log("mxguard started");

    let out = run(&[
        "deny",
        "add",
        "198.51.100.7",
        "--for",
        "30d",
        "--reason",
        "spam run",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with("added 198.51.100.7\t"),
        "{}",
        text(&out.stdout)
    );
    assert!(
        run(&["deny", "add", "Spammer@Example.NET"])
            .status
            .success()
    );
    assert_eq!(
        policy_answer(policy, "198.51.100.7"),
        "action=421 4.7.1 198.51.100.7 is on this server's denylist; \
         contact the postmaster of the recipient's domain by other means\n\n"
    );
    let listed = text(&run(&["deny", "list"]).stdout);
    assert!(
        listed.contains("198.51.100.7\t") && listed.contains("spam run"),
        "{listed}"
    );
    assert!(listed.contains("spammer@example.net\tnever\t"), "{listed}");
    assert!(run(&["deny", "test", "198.51.100.7"]).status.success());
    assert_eq!(run(&["deny", "test", "203.0.113.1"]).status.code(), Some(1));
    assert_eq!(run(&["deny", "add", "not valid!"]).status.code(), Some(2));
    assert_eq!(
        run(&["deny", "add", "192.0.2.1", "--for", "soon"])
            .status
            .code(),
        Some(2)
    );

    // The allowlist wins over the denylist.
    assert!(run(&["allow", "add", "198.51.100.0/24"]).status.success());
    assert_eq!(policy_answer(policy, "198.51.100.7"), "action=DUNNO\n\n");
    assert!(run(&["allow", "del", "198.51.100.0/24"]).status.success());
    assert!(run(&["deny", "del", "198.51.100.7"]).status.success());
    assert_eq!(run(&["deny", "del", "198.51.100.7"]).status.code(), Some(1));
    assert_eq!(policy_answer(policy, "198.51.100.7"), "action=DUNNO\n\n");
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait(Duration::from_secs(10)), Some(0));
}

fn resolve(args: &[&str]) -> (Option<i32>, serde_json::Value) {
    let mut all = vec!["resolve"];
    all.extend_from_slice(args);
    let out = mxguard(&all);
    let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {} / {}",
            text(&out.stdout),
            text(&out.stderr)
        )
    });
    (out.status.code(), json)
}

#[test]
fn resolve_answers_the_reference_examples_offline() {
    // TXT records, address, verdict, code, targets, port.
    type Case<'a> = (&'a [&'a str], &'a str, &'a str, u16, &'a [&'a str], u16);
    let cases: &[Case] = &[
        (
            &["forward-email=user@gmail.com"],
            "Hello+News@example.com",
            "forward",
            250,
            &["user+News@gmail.com"],
            25,
        ),
        (
            &["forward-email=hello:user@gmail.com"],
            "other@example.com",
            "reject",
            550,
            &[],
            25,
        ),
        (
            &[r"forward-email=/^([a-z]+)\.([a-z]+)$/:$1.$2@company.com"],
            "John.Smith@example.com",
            "forward",
            250,
            &["john.smith@company.com"],
            25,
        ),
        (
            &["forward-email=!alias,user@gmail.com"],
            "alias@example.com",
            "discard",
            250,
            &[],
            25,
        ),
        (
            &["forward-email=!!alias"],
            "alias@example.com",
            "tempfail",
            450,
            &[],
            25,
        ),
        (
            &["forward-email=!!!alias:user@gmail.com"],
            "alias@example.com",
            "reject",
            550,
            &[],
            25,
        ),
        (
            &["forward-email-port=1337", "forward-email=user@gmail.com"],
            "hello@example.com",
            "forward",
            250,
            &["user@gmail.com"],
            1337,
        ),
        (
            &["forward-email=hello:https://hooks.example.org/in"],
            "hello@example.com",
            "forward",
            250,
            &["https://hooks.example.org/in"],
            25,
        ),
    ];
    for (records, address, verdict, code, targets, port) in cases {
        let mut args: Vec<&str> = Vec::new();
        for r in *records {
            args.push("--txt");
            args.push(r);
        }
        args.push(address);
        let (status, json) = resolve(&args);
        assert_eq!(status, Some(0), "{json}");
        assert_eq!(json["address"], *address, "{json}");
        assert_eq!(json["verdict"], *verdict, "{json}");
        assert_eq!(json["code"], *code, "{json}");
        assert_eq!(json["targets"], serde_json::json!(targets), "{json}");
        assert_eq!(json["port"], *port, "{json}");
        assert!(
            json["reason"].as_str().is_some_and(|r| !r.is_empty()),
            "{json}"
        );
    }
    let (_, json) = resolve(&[
        "--txt",
        "forward-email=hello:user@gmail.com",
        "other@example.com",
    ]);
    assert_eq!(
        json["reason"],
        "5.1.1 other@example.com does not exist (no alias matches and there is no catch-all)"
    );
}

#[test]
fn resolve_uses_the_configured_domains_and_reports_usage_errors() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = dir.path().join("mxguard.yaml");
    std::fs::write(
        &path,
        "domains: { example.org: { rules: [\"team:a@example.net,team:b@example.net\"] } }\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let config = path.display().to_string();
    let (status, json) = resolve(&["-c", &config, "team@example.org"]);
    assert_eq!(status, Some(0));
    assert_eq!(
        json["targets"],
        serde_json::json!(["a@example.net", "b@example.net"])
    );
    let (_, json) = resolve(&["-c", &config, "x@elsewhere.example"]);
    assert_eq!(json["verdict"], "reject");
    assert_eq!(
        json["reason"],
        "elsewhere.example is not a domain this server forwards for"
    );
    assert_eq!(mxguard(&["resolve"]).status.code(), Some(2));
    std::fs::write(
        &path,
        "domains: { example.org: { rules: [\"a:not-an-address\"] } }\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let out = mxguard(&["resolve", "-c", &config, "a@example.org"]);
    assert_eq!(out.status.code(), Some(78), "{}", text(&out.stderr));
}
