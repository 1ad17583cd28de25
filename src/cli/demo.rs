//! `demo`: the gateway in front of the embedded simulated Billing API, with ready-to-paste
//! tokens and `curl` lines; no Scaleway account needed.

use super::token::token;
use super::{env, shutdown_signal};
use anyhow::{Context, bail};
use billing_gateway::config::Config;
use billing_gateway::policy::{PolicySet, key_sha256};
use billing_gateway::server::App;
use billing_gateway::telemetry;
use secrecy::SecretString;
use serde_json::Map;
use std::net::SocketAddr;

/// Runs the demo until Ctrl-C.
pub(super) async fn run(listen: SocketAddr) -> anyhow::Result<()> {
    telemetry::init_logging(None);
    let key = uuid::Uuid::new_v4().to_string();
    let sim = billing_sim::Simulator::new(&key);
    let invoice = sim
        .invoice_ids()
        .get(1)
        .copied()
        .context("the simulator has no invoice")?;
    let sim_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let sim_url = format!("http://{}", sim_listener.local_addr()?);
    tokio::spawn(billing_sim::serve(sim_listener, sim));

    let org = billing_sim::ORGANIZATION_ID.parse()?;
    let mut config = Config::new(&sim_url, org, SecretString::from(key));
    let hs256 = SecretString::from(format!(
        "{:032x}{:032x}",
        rand::random::<u128>(),
        rand::random::<u128>()
    ));
    config.auth.hs256_secret = Some(hs256.clone());
    config.listen = listen;
    // The demo's limits are the defaults unless asked otherwise (load runs raise them).
    config.apply_env(&["GATEWAY_PRINCIPAL_RATE", "GATEWAY_UPSTREAM_RATE"], &env)?;
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

const DEFAULT_POLICY: &str = include_str!("../../policies/default.toml");
