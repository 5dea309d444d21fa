//! The `mxguard` command: parses arguments, reads the configuration, binds
//! the sockets, wires signals, and hands over to `mxguard::run`.

use clap::{Parser, Subcommand};
use mxguard::{ConfigFile, Listeners, config};
use std::{error::Error, path::PathBuf, process::ExitCode};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing_subscriber::EnvFilter;

/// Exit status for an invalid configuration (EX_CONFIG in sysexits.h).
const EXIT_CONFIG: u8 = 78;
/// Exit status when the daemon cannot start or fails while running.
const EXIT_FAILURE: u8 = 1;

#[derive(Parser)]
#[command(
    name = "mxguard",
    version,
    about = "Forwarding-MX checks and rewriting for Postfix (milter and policy service)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon in the foreground (SIGHUP reloads, SIGTERM/SIGINT stop).
    Run {
        /// Configuration file.
        #[arg(short, long, value_name = "FILE", default_value = config::DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Validate the configuration and print it with every default filled in.
    CheckConfig {
        /// Configuration file.
        #[arg(short, long, value_name = "FILE", default_value = config::DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Print, as JSON, where mail for ADDRESS goes and why.
    Resolve {
        /// Configuration file (its `domains:`; a missing default file means none).
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// A TXT record of the address's domain, standing in for its DNS (repeatable; no DNS query is sent).
        #[arg(long = "txt", value_name = "RECORD")]
        txt: Vec<String>,
        address: String,
    },
    /// Rewrite an address with the Sender Rewriting Scheme (srs: in the configuration).
    Srs {
        #[command(subcommand)]
        action: SrsAction,
        /// Configuration file (for srs:).
        #[arg(short, long, value_name = "FILE", default_value = config::DEFAULT_PATH, global = true)]
        config: PathBuf,
    },
    /// Read the membership rosters now and apply them (through http.listen).
    Roster {
        #[command(subcommand)]
        action: RosterAction,
        /// Configuration file (for http.listen).
        #[arg(short, long, value_name = "FILE", default_value = config::DEFAULT_PATH, global = true)]
        config: PathBuf,
    },
    /// Manage the run-time denylist of the running daemon (through http.listen).
    Deny {
        #[command(subcommand)]
        action: ListAction,
        /// Configuration file (for http.listen).
        #[arg(short, long, value_name = "FILE", default_value = config::DEFAULT_PATH, global = true)]
        config: PathBuf,
    },
    /// Manage the run-time allowlist of the running daemon (through http.listen).
    Allow {
        #[command(subcommand)]
        action: ListAction,
        /// Configuration file (for http.listen).
        #[arg(short, long, value_name = "FILE", default_value = config::DEFAULT_PATH, global = true)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum RosterAction {
    /// Read every roster, show what changes, and apply it.
    Sync {
        /// Show what would change, change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Apply even a sync that removes more than max_drop of the members.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum SrsAction {
    /// Print the SRS address of a sender.
    Forward { address: String },
    /// Print the original address of an SRS address (exit 1 if invalid or expired).
    Reverse { address: String },
}

#[derive(Subcommand)]
enum ListAction {
    /// Add an IP address, CIDR block, domain or e-mail address.
    Add {
        value: String,
        /// Remove it again after this long (30m, 12h, 30d, ...); default: never.
        #[arg(long = "for", value_name = "DURATION")]
        ttl: Option<String>,
        /// A note kept with the entry.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Remove an entry.
    Del { value: String },
    /// Print every entry: value, expiry (Unix time or never), reason.
    List,
    /// Say which entry, if any, matches an address, domain or e-mail address.
    Test { value: String },
}

fn roster_command(path: &std::path::Path, action: RosterAction) -> ExitCode {
    let RosterAction::Sync { dry_run, force } = action;
    let file = match ConfigFile::load(path) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("mxguard: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let Some(addr) = file.config.http.listen.clone() else {
        eprintln!(
            "mxguard: http.listen is off in {}: rosters are synced through it",
            path.display()
        );
        return ExitCode::from(EXIT_CONFIG);
    };
    let query = format!(
        "/roster/sync?dry_run={}&force={}",
        u8::from(dry_run),
        u8::from(force)
    );
    let body = match mxguard::http::request(&addr, "POST", &query) {
        Ok((200, body)) => body,
        Ok((status, body)) => {
            eprintln!("mxguard: the daemon answered {status}: {}", body.trim());
            return ExitCode::from(EXIT_FAILURE);
        }
        Err(e) => {
            eprintln!("mxguard: cannot reach the daemon at {addr}: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let reports: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap_or_default();
    let mut failed = false;
    for r in &reports {
        let domain = r["domain"].as_str().unwrap_or("?");
        let state = match (r["error"].as_str(), r["applied"].as_bool()) {
            (Some(e), _) => {
                failed = true;
                format!("not applied: {e}")
            }
            (None, Some(true)) => "applied".to_owned(),
            _ => "dry run, nothing changed".to_owned(),
        };
        println!("{domain}: {} members; {state}", r["members"]);
        for (key, mark) in [
            ("added", "+"),
            ("removed", "-"),
            ("changed", "~"),
            ("skipped", "!"),
        ] {
            for item in r[key].as_array().into_iter().flatten() {
                println!("  {mark} {}", item.as_str().unwrap_or(""));
            }
        }
    }
    if reports.is_empty() {
        println!("no domain has source: roster");
    }
    if failed {
        ExitCode::from(EXIT_FAILURE)
    } else {
        ExitCode::SUCCESS
    }
}

fn srs_command(path: &std::path::Path, action: SrsAction) -> ExitCode {
    let config = match ConfigFile::load(path) {
        Ok(f) => f.config,
        Err(e) => {
            eprintln!("mxguard: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let c = &config.srs;
    if !c.enabled() {
        eprintln!(
            "mxguard: {}: srs.domain is not set: SRS is off",
            path.display()
        );
        return ExitCode::from(EXIT_CONFIG);
    }
    let srs = match mxguard::srs::Srs::new(
        c.secrets.clone(),
        &c.domain,
        c.hash_length,
        c.max_age.get().as_secs() / 86_400,
        c.separator,
    ) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("mxguard: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let today = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400);
    let (result, address) = match &action {
        SrsAction::Forward { address } => (srs.forward_at(address, today), address),
        SrsAction::Reverse { address } => (srs.reverse_at(address, today), address),
    };
    match result {
        Ok(a) => {
            println!("{a}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mxguard: {address}: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

fn resolve_command(config: Option<PathBuf>, txt: Vec<String>, address: &str) -> ExitCode {
    let path = config
        .clone()
        .unwrap_or_else(|| PathBuf::from(config::DEFAULT_PATH));
    let loaded = if config.is_none() && !path.exists() {
        Ok(config::Config::default())
    } else {
        ConfigFile::load(&path).map(|f| f.config)
    };
    let config = match loaded {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mxguard: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mxguard: cannot start: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let answer = runtime.block_on(mxguard::aliases::explain(&config, txt, address));
    println!("{answer}");
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { config } => match ConfigFile::load(&config) {
            Ok(file) => {
                print!("{}", file.config.to_yaml());
                eprintln!("mxguard: {}: configuration OK", config.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("mxguard: {e}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Resolve {
            config,
            txt,
            address,
        } => resolve_command(config, txt, &address),
        Command::Srs { action, config } => srs_command(&config, action),
        Command::Roster { action, config } => roster_command(&config, action),
        Command::Deny { action, config } => list_command(&config, "deny", action),
        Command::Allow { action, config } => list_command(&config, "allow", action),
        Command::Run { config } => {
            let file = match ConfigFile::load(&config) {
                Ok(f) => f,
                Err(e) => {
                    eprintln!("mxguard: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let filter =
                std::env::var("MXGUARD_LOG").unwrap_or_else(|_| file.config.log.level.clone());
            let filter = match EnvFilter::try_new(&filter) {
                Ok(f) => f,
                Err(e) => {
                    eprintln!("mxguard: invalid log level `{filter}`: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            // Colours only on a terminal: journald and log files get plain text.
            let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_ansi(ansi)
                .with_writer(std::io::stderr)
                .init();
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("mxguard: cannot start the async runtime: {e}");
                    return ExitCode::from(EXIT_FAILURE);
                }
            };
            match runtime.block_on(run(file)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    print_error(e.as_ref());
                    ExitCode::from(EXIT_FAILURE)
                }
            }
        }
    }
}

async fn run(file: ConfigFile) -> Result<(), Box<dyn Error>> {
    let listeners = Listeners::bind(&file.config).await?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let (reload_tx, reload_rx) = mpsc::channel(1);
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            // A reload already queued covers this one too.
            let _ = reload_tx.try_send(());
        }
    });
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    };
    mxguard::run(listeners, file, reload_rx, shutdown).await?;
    Ok(())
}

/// One list request to the running daemon. Exit 0 on success, 1 when the
/// entry is not there (del, test) or the daemon cannot be reached.
fn list_command(config: &std::path::Path, list: &str, action: ListAction) -> ExitCode {
    let file = match ConfigFile::load(config) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("mxguard: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let Some(addr) = file.config.http.listen.clone() else {
        eprintln!(
            "mxguard: http.listen is off in {}: the lists are managed through it",
            config.display()
        );
        return ExitCode::from(EXIT_CONFIG);
    };
    let enc = mxguard::http::percent_encode;
    let (method, path) = match &action {
        ListAction::Add { value, ttl, reason } => {
            let ttl = ttl
                .as_deref()
                .map(|t| format!("&for={}", enc(t)))
                .unwrap_or_default();
            (
                "POST",
                format!(
                    "/lists/{list}/add?value={}{ttl}&reason={}",
                    enc(value),
                    enc(reason)
                ),
            )
        }
        ListAction::Del { value } => ("POST", format!("/lists/{list}/del?value={}", enc(value))),
        ListAction::List => ("GET", format!("/lists/{list}")),
        ListAction::Test { value } => ("GET", format!("/lists/{list}/test?value={}", enc(value))),
    };
    match mxguard::http::request(&addr, method, &path) {
        Ok((200, body)) => {
            print!("{body}");
            ExitCode::SUCCESS
        }
        Ok((404, body)) => {
            print!("{body}");
            ExitCode::from(EXIT_FAILURE)
        }
        Ok((code, body)) => {
            eprint!("mxguard: the daemon answered {code}: {body}");
            ExitCode::from(if code == 400 { 2 } else { EXIT_FAILURE })
        }
        Err(e) => {
            eprintln!("mxguard: cannot reach the running daemon at {addr} (http.listen): {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

fn print_error(e: &dyn Error) {
    eprintln!("mxguard: {e}");
    let mut source = e.source();
    while let Some(s) = source {
        eprintln!("  caused by: {s}");
        source = s.source();
    }
}
