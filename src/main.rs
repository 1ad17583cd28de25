//! The `billing-gateway` command: parse, load configuration, run (contract §2).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, anyhow, bail};
use billing_gateway::app::App;
use billing_gateway::auth::mint_hs256;
use billing_gateway::config::{Config, parse_duration};
use billing_gateway::policy::PolicySet;
use billing_gateway::{simulator, telemetry};
use clap::{Parser, Subcommand};
use secrecy::SecretString;
use serde_json::{Map, Value, json};

#[derive(Parser)]
#[command(
    version,
    about = "Share one Scaleway account's Billing API without sharing its key"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway against the Billing API (or whatever SCW_API_URL names).
    Serve {
        /// TOML configuration file (default: gateway.toml when present).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Run the gateway against an embedded simulated Billing API; no Scaleway account needed.
    Demo {
        /// Where the gateway listens.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
    },
    /// Validate the configuration and every policy file.
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
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse().command).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn env(var: &str) -> Option<String> {
    std::env::var(var).ok()
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve { config } => {
            let config = Config::load(config.as_deref(), &env, true)?;
            telemetry::init_logging(config.log_format);
            let app = App::build(config).await?;
            tracing::info!(addr = %app.addr()?, "billing-gateway listening");
            app.run_until(shutdown_signal()).await?;
        }
        Command::Check { config } => {
            let config = Config::load(config.as_deref(), &env, false)?;
            let policy = PolicySet::load_dir(&config.policy_dir)?;
            let roles: Vec<_> = policy.role_names().collect();
            println!("ok: configuration valid; roles: {}", roles.join(", "));
        }
        Command::Token {
            roles,
            sub,
            claims,
            ttl,
        } => {
            let config = Config::load(None, &env, false)?;
            let secret = config.auth.hs256_secret.ok_or_else(|| {
                anyhow!("GATEWAY_JWT_HS256_SECRET (or _FILE) is needed to sign tokens")
            })?;
            let ttl = parse_duration(&ttl).map_err(|e| anyhow!("--ttl: {e}"))?;
            let mut extra = Map::new();
            for claim in claims {
                let (k, v) = claim
                    .split_once('=')
                    .with_context(|| format!("--claim `{claim}` is not key=value"))?;
                let value = if v.starts_with(['[', '{']) {
                    serde_json::from_str(v).with_context(|| format!("--claim {k}: bad JSON"))?
                } else {
                    Value::String(v.to_owned())
                };
                extra.insert(k.to_owned(), value);
            }
            println!("{}", token(&secret, &sub, &roles, extra, ttl.as_secs())?);
        }
        Command::Demo { listen } => demo(listen).await?,
    }
    Ok(())
}

fn token(
    secret: &SecretString,
    sub: &str,
    roles: &[String],
    extra: Map<String, Value>,
    ttl: u64,
) -> anyhow::Result<String> {
    let now = jsonwebtoken::get_current_timestamp();
    let mut claims = extra;
    claims.insert("sub".into(), json!(sub));
    claims.insert("roles".into(), json!(roles));
    claims.insert("iat".into(), json!(now));
    claims.insert("exp".into(), json!(now + ttl));
    Ok(mint_hs256(secret, &claims)?)
}

async fn demo(listen: SocketAddr) -> anyhow::Result<()> {
    telemetry::init_logging(None);
    let key = uuid::Uuid::new_v4().to_string();
    let sim = simulator::Simulator::new(&key);
    let invoice = sim
        .invoice_ids()
        .first()
        .copied()
        .context("the simulator has no invoice")?;
    let sim_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let sim_url = format!("http://{}", sim_listener.local_addr()?);
    tokio::spawn(simulator::serve(sim_listener, sim));

    let org = simulator::ORGANIZATION_ID.parse()?;
    let mut config = Config::new(&sim_url, org, SecretString::from(key));
    let hs256 = SecretString::from(format!(
        "{:032x}{:032x}",
        rand::random::<u128>(),
        rand::random::<u128>()
    ));
    config.auth.hs256_secret = Some(hs256.clone());
    config.listen = listen;
    let policy = match PolicySet::load_dir(&config.policy_dir) {
        Ok(policy) => policy,
        Err(e) if !config.policy_dir.exists() => {
            tracing::info!("{e}; using the built-in default policy");
            PolicySet::from_sources(&[("policies/default.toml".into(), DEFAULT_POLICY.into())])?
        }
        Err(e) => bail!(e),
    };
    let app = App::with_policy(config, policy).await?;
    let base = format!("http://{}", app.addr()?);
    let ttl = 12 * 3600;
    let read_only = token(
        &hs256,
        "demo-reader",
        &["billing-read-only".into()],
        Map::new(),
        ttl,
    )?;
    let manager = token(
        &hs256,
        "demo-manager",
        &["billing-manager".into()],
        Map::new(),
        ttl,
    )?;
    println!(
        "billing-gateway demo: {base} -> simulated Billing API at {sim_url}\n\n\
         READ_ONLY={read_only}\n\
         MANAGER={manager}\n\n\
         curl -s -H \"Authorization: Bearer $READ_ONLY\" '{base}/billing/v2beta1/consumptions?page_size=3'\n\
         curl -s -H \"Authorization: Bearer $READ_ONLY\" '{base}/billing/v2beta1/invoices'   # 403: read-only\n\
         curl -s -H \"X-Auth-Token: $MANAGER\" '{base}/billing/v2beta1/invoices?page_size=2'\n\
         curl -s -H \"X-Auth-Token: $MANAGER\" -o invoice.pdf '{base}/billing/v2beta1/invoices/{invoice}/download?dl=1'\n\
         curl -s -H \"X-Auth-Token: $MANAGER\" '{base}/gateway/v1/whoami'\n\n\
         Ctrl-C stops it."
    );
    app.run_until(shutdown_signal()).await?;
    Ok(())
}

const DEFAULT_POLICY: &str = include_str!("../policies/default.toml");

async fn shutdown_signal() {
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
