//! The `billing-gateway` command: parse, load configuration, run (contract §2).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, anyhow, bail};
use billing_gateway::app::App;
use billing_gateway::auth::mint_hs256;
use billing_gateway::config::{Config, parse_duration, parse_rate};
use billing_gateway::policy::{self, PolicySet, cases, key_sha256};
use billing_gateway::telemetry;
use billing_sim::{ORGANIZATION_ID, Simulator};
use clap::{Parser, Subcommand};
use secrecy::SecretString;
use serde_json::{Map, Value, json};

/// Faster than glibc malloc on the request path's many small allocations (bench/RESULTS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
enum KeyCommand {
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
        Command::Check { config } => check(config.as_deref())?,
        Command::Key {
            command:
                KeyCommand::New {
                    name,
                    roles,
                    projects,
                },
        } => new_key(&name, &roles, &projects)?,
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
            // Tokens the configured gateway accepts: with an issuer or audience pinned, carry them.
            let mut extra = Map::new();
            if let Some(iss) = &config.auth.issuer {
                extra.insert("iss".into(), json!(iss));
            }
            if let Some(aud) = &config.auth.audience {
                extra.insert("aud".into(), json!(aud));
            }
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
        Command::Simulate { listen } => {
            let key = env("SCW_SECRET_KEY")
                .filter(|k| uuid::Uuid::try_parse(k).is_ok())
                .context("SCW_SECRET_KEY must hold the key (a UUID) the simulator will accept")?;
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            println!("simulated Billing API at http://{}", listener.local_addr()?);
            tokio::select! {
                served = billing_sim::serve(listener, Simulator::new(&key)) => served?,
                () = shutdown_signal() => {}
            }
        }
    }
    Ok(())
}

fn check(config: Option<&std::path::Path>) -> anyhow::Result<()> {
    let config = Config::load(config, &env, false)?;
    let policy = PolicySet::load_dir(&config.policy_dir)?;
    let tests = config.policy_dir.join("tests");
    let files = cases::load_dir(&tests)?;
    // With no organization configured (a CI run), a fixed placeholder is filled in: the nil UUID.
    let report = cases::run(&policy, &files, config.upstream.organization_id);
    for failure in &report.failures {
        eprintln!("{failure}");
    }
    if !report.failures.is_empty() {
        bail!(
            "{} of {} policy test cases failed",
            report.failures.len(),
            report.total
        );
    }
    let roles: Vec<_> = policy.role_names().collect();
    println!(
        "ok: configuration valid; policy {} ({}); {} policy test cases passed ({})",
        policy.summary(),
        roles.join(", "),
        report.total,
        tests.display()
    );
    Ok(())
}

fn new_key(name: &str, roles: &[String], projects: &[String]) -> anyhow::Result<()> {
    if !policy::is_key_name(name) {
        bail!("--name `{name}`: use letters, digits, `.`, `_` and `-` (at most 64)");
    }
    let roles: Vec<&str> = roles
        .iter()
        .map(|r| r.trim())
        .filter(|r| !r.is_empty())
        .collect();
    if roles.is_empty() {
        bail!("--roles: name at least one role");
    }
    let projects = projects
        .iter()
        .map(|p| {
            uuid::Uuid::try_parse(p.trim())
                .map(|p| p.to_string())
                .map_err(|_| anyhow!("--projects: `{p}` is not a project id (a UUID)"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let list = |items: &[&str]| -> anyhow::Result<String> {
        let quoted = items
            .iter()
            .map(serde_json::to_string)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(format!("[{}]", quoted.join(", ")))
    };
    let key = uuid::Uuid::new_v4();
    let mut entry = format!(
        "[[keys]]\nname = \"{name}\"\nsha256 = \"{}\"\nroles = {}\n",
        policy::key_sha256(&key),
        list(&roles)?
    );
    if !projects.is_empty() {
        let projects: Vec<&str> = projects.iter().map(String::as_str).collect();
        entry += &format!("projects = {}\n", list(&projects)?);
    }
    // Checked against the policy folder when there is one: roles must exist, names be unique.
    let config = Config::load(None, &env, false)?;
    match PolicySet::read_sources(&config.policy_dir) {
        Ok(mut sources) => {
            sources.push(("(the new entry)".into(), entry.clone()));
            PolicySet::from_sources(&sources)?;
        }
        Err(e) => eprintln!("note: the entry is not checked against a policy folder: {e}"),
    }
    println!(
        "gateway key `{name}` (shown once: the policy stores only its SHA-256):\n\n    {key}\n\n\
         Give it to the caller as its SCW_SECRET_KEY (X-Auth-Token), and paste this entry into a\n\
         *.toml in the policy folder ({}):\n\n{entry}",
        config.policy_dir.display()
    );
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
    let sim = Simulator::new(&key);
    let invoice = sim
        .invoice_ids()
        .get(1)
        .copied()
        .context("the simulator has no invoice")?;
    let sim_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let sim_url = format!("http://{}", sim_listener.local_addr()?);
    tokio::spawn(billing_sim::serve(sim_listener, sim));

    let org = ORGANIZATION_ID.parse()?;
    let mut config = Config::new(&sim_url, org, SecretString::from(key));
    let hs256 = SecretString::from(format!(
        "{:032x}{:032x}",
        rand::random::<u128>(),
        rand::random::<u128>()
    ));
    config.auth.hs256_secret = Some(hs256.clone());
    config.listen = listen;
    // The demo's limits are the defaults unless asked otherwise (load runs raise them).
    for (var, rate) in [
        ("GATEWAY_PRINCIPAL_RATE", &mut config.limits.principal_rate),
        ("GATEWAY_UPSTREAM_RATE", &mut config.upstream.rate),
    ] {
        if let Some(v) = env(var) {
            *rate = parse_rate(&v).map_err(|e| anyhow!("{var}: {e}"))?;
        }
    }
    // The repository's policy (or the built-in default) plus one manager key, so the official
    // SDKs can be tried unmodified with it as their SCW_SECRET_KEY.
    let mut sources = match PolicySet::read_sources(&config.policy_dir) {
        Ok(sources) => sources,
        Err(e) if !config.policy_dir.exists() => {
            tracing::info!("{e}; using the built-in default policy");
            vec![("policies/default.toml".into(), DEFAULT_POLICY.into())]
        }
        Err(e) => bail!(e),
    };
    let gateway_key = uuid::Uuid::new_v4();
    sources.push((
        "demo-key.toml".into(),
        format!(
            "[[keys]]\nname = \"demo-sdk\"\nsha256 = \"{}\"\nroles = [\"billing-manager\"]\n",
            key_sha256(&gateway_key)
        ),
    ));
    let app = App::with_policy(config, PolicySet::from_sources(&sources)?).await?;
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
         MANAGER={manager}\n\
         GATEWAY_KEY={gateway_key}\n\n\
         curl -s -H \"Authorization: Bearer $READ_ONLY\" '{base}/billing/v2beta1/consumptions?page_size=3'\n\
         curl -s -H \"Authorization: Bearer $READ_ONLY\" '{base}/billing/v2beta1/invoices'   # 403: read-only\n\
         curl -s -H \"X-Auth-Token: $MANAGER\" '{base}/billing/v2beta1/invoices?page_size=2'\n\
         curl -s -H \"X-Auth-Token: $MANAGER\" -o invoice.pdf '{base}/billing/v2beta1/invoices/{invoice}/download?dl=1'\n\
         curl -s -H \"X-Auth-Token: $MANAGER\" '{base}/gateway/v1/whoami'\n\
         SCW_SECRET_KEY=$GATEWAY_KEY SCW_API_URL={base} ...   # the official SDKs, unmodified\n\n\
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
