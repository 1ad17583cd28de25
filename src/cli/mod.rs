//! The commands of contract §2, one file each; `main` only parses and dispatches here.

mod check;
mod demo;
mod key;
mod serve;
mod simulate;
mod token;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    version,
    about = "Share one Scaleway account's Billing API without sharing its key"
)]
pub struct Cli {
    #[command(subcommand)]
    /// What to do.
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the gateway against the Billing API (or whatever SCW_API_URL names).
    Serve {
        /// TOML configuration file (default: gateway.toml when present).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Run the gateway (`serve`, configured and reloaded the same way) against an embedded
    /// simulated Billing API; no Scaleway account needed.
    Demo {
        /// Where the gateway listens (default: GATEWAY_LISTEN, else 127.0.0.1:8080).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// TOML configuration file (default: gateway.toml when present); its upstream settings
        /// are replaced by the simulator's.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Serve only the simulated Billing API (for benchmarks and SDK tests): it accepts the key in
    /// SCW_SECRET_KEY.
    Simulate {
        /// Where the simulator listens.
        #[arg(long, default_value = "127.0.0.1:8081")]
        listen: SocketAddr,
    },
    /// Validate the configuration and every policy file, then run the policy test cases in the
    /// policy folder's tests/ (exit 1 when one fails).
    Check {
        /// TOML configuration file (default: gateway.toml when present).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Mint an HS256 token with the configured secret (development and tests).
    Token {
        /// Roles, comma-separated, put in the `roles` claim.
        #[arg(long, value_delimiter = ',', required = true)]
        roles: Vec<String>,
        /// The `sub` claim.
        #[arg(long, default_value = "developer")]
        sub: String,
        /// Extra claims, `key=value` (a value starting with `[` or `{` is read as JSON).
        #[arg(long = "claim")]
        claims: Vec<String>,
        /// Lifetime, e.g. 15m, 1h.
        #[arg(long, default_value = "1h")]
        ttl: String,
    },
    /// Gateway keys: credentials for scripts and unmodified SDKs (their SCW_SECRET_KEY).
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
}

#[derive(Subcommand)]
pub enum KeyCommand {
    /// Generate a key: prints it once, and the [[keys]] policy entry holding only its SHA-256.
    New {
        /// The key's name: the principal's subject in logs and audit events.
        #[arg(long)]
        name: String,
        /// Roles, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "billing-read-only")]
        roles: Vec<String>,
        /// Limit the key to these projects (UUIDs, comma-separated).
        #[arg(long, value_delimiter = ',')]
        projects: Vec<String>,
    },
}

/// Runs one command to its end.
pub async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve { config } => serve::run(config.as_deref()).await,
        Command::Check { config } => check::run(config.as_deref()),
        Command::Key {
            command:
                KeyCommand::New {
                    name,
                    roles,
                    projects,
                },
        } => key::new(&name, &roles, &projects),
        Command::Token {
            roles,
            sub,
            claims,
            ttl,
        } => token::run(&roles, &sub, &claims, &ttl),
        Command::Demo { listen, config } => demo::run(config.as_deref(), listen).await,
        Command::Simulate { listen } => simulate::run(listen).await,
    }
}

pub(crate) fn env(var: &str) -> Option<String> {
    std::env::var(var).ok()
}

pub(crate) async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { () = ctrl_c => {}, () = term => {} }
}
