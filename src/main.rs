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

fn print_error(e: &dyn Error) {
    eprintln!("mxguard: {e}");
    let mut source = e.source();
    while let Some(s) = source {
        eprintln!("  caused by: {s}");
        source = s.source();
    }
}
