//! `demo`: `serve` in front of the embedded simulated Billing API, with ready-to-paste tokens,
//! `curl` lines and SDK settings; no Scaleway account needed.
//!
//! Everything but the upstream is `serve`'s: the configuration file and environment (CORS, TLS,
//! limits, the policy folder...), the policy folder re-read every few seconds and on SIGHUP,
//! SIGTERM and Ctrl-C for a graceful stop. The demo supplies the upstream settings (the
//! simulator's URL, key and organization) and, unless one is configured, an HS256 secret for
//! the tokens it prints. Its gateway key for the SDKs lives in memory, merged into the policy on
//! every reload.

use super::token::{pinned_claims, token};
use super::{env, shutdown_signal};
use anyhow::Context;
use billing_gateway::billing::Permission;
use billing_gateway::config::{Config, Needs};
use billing_gateway::policy::reload::LivePolicy;
use billing_gateway::policy::{PolicySet, key_sha256};
use billing_gateway::server::App;
use billing_gateway::telemetry;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The settings the demo always supplies: its upstream is the simulator, whatever the shell
/// holds (a Scaleway profile's real key must neither reach the demo nor break it).
const SIMULATED: [&str; 4] = [
    "SCW_API_URL",
    "SCW_SECRET_KEY",
    "SCW_SECRET_KEY_FILE",
    "SCW_DEFAULT_ORGANIZATION_ID",
];

/// The policy folder when none is configured; missing, the built-in default applies.
const DEFAULT_POLICY_DIR: &str = "policies";
const DEFAULT_POLICY: &str = include_str!("../../policies/default.toml");

/// Runs the demo until SIGTERM or Ctrl-C.
pub(super) async fn run(file: Option<&Path>, listen: Option<SocketAddr>) -> anyhow::Result<()> {
    let sim_key = uuid::Uuid::new_v4().to_string();
    let sim = billing_sim::Simulator::new(&sim_key);
    let invoice = sim
        .invoice_ids()
        .get(1)
        .copied()
        .context("the simulator has no invoice")?;
    let sim_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let sim_url = format!("http://{}", sim_listener.local_addr()?);

    let random_secret = format!(
        "{:032x}{:032x}",
        rand::random::<u128>(),
        rand::random::<u128>()
    );
    let set = |var: &str| env(var).filter(|v| !v.is_empty());
    // `serve`'s configuration, read through an environment in which the demo supplies what it
    // must: the simulator as the upstream, `--listen`, and an HS256 secret when none is set.
    let demo_env = |var: &str| -> Option<String> {
        match var {
            "SCW_API_URL" => Some(sim_url.clone()),
            "SCW_SECRET_KEY" => Some(sim_key.clone()),
            "SCW_SECRET_KEY_FILE" => None,
            "SCW_DEFAULT_ORGANIZATION_ID" => Some(billing_sim::ORGANIZATION_ID.to_owned()),
            // One process, no dependency: the demo never shares through Redis.
            "GATEWAY_REDIS_URL" | "GATEWAY_REDIS_URL_FILE" => None,
            "GATEWAY_LISTEN" => listen.map(|l| l.to_string()).or_else(|| set(var)),
            "GATEWAY_JWT_HS256_SECRET" => set(var).or_else(|| {
                set("GATEWAY_JWT_HS256_SECRET_FILE")
                    .is_none()
                    .then(|| random_secret.clone())
            }),
            _ => set(var),
        }
    };
    let config = Config::load(file, &demo_env, Needs::Serve)?;
    let telemetry =
        telemetry::init(config.log_format, &config.tracing).map_err(anyhow::Error::msg)?;
    let ignored: Vec<&str> = SIMULATED.into_iter().filter(|v| set(v).is_some()).collect();
    if !ignored.is_empty() {
        tracing::info!(
            ignored = %ignored.join(", "),
            "the demo's upstream is its simulator: these settings are not used"
        );
    }
    let hs256 = config
        .auth
        .hs256_secret
        .clone()
        .context("the demo always has an HS256 secret")?;
    let claims = pinned_claims(&config.auth);
    let organization = config.upstream.organization_id;
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };

    // The policy folder (re-read like `serve`'s). With no `policies/` here, the built-in default
    // is written there first, so that the folder `key new` checks against and tells to edit is
    // the one in force, now and after a restart; where it cannot be written, the built-in
    // default is used as it is. Plus, on every load, one key for the official SDKs.
    let gateway_key = uuid::Uuid::new_v4();
    let sdk_key = vec![
        (
            PathBuf::from("(demo: the SDK key)"),
            sdk_key_policy(&gateway_key),
        ),
        (
            PathBuf::from("(demo: a budget)"),
            format!(
                "[[budgets]]\nproject = \"{DEMO_BUDGET_PROJECT}\"\nmonthly = \"{DEMO_BUDGET_AMOUNT}\"\n"
            ),
        ),
    ];
    let dir = config.policy_dir.clone();
    let unwritable = dir == Path::new(DEFAULT_POLICY_DIR)
        && !dir.exists()
        && match write_default_policy(&dir) {
            Ok(file) => {
                tracing::info!(
                    "no {DEFAULT_POLICY_DIR}/ folder here: wrote the built-in default policy to {}",
                    file.display()
                );
                false
            }
            Err(e) => {
                tracing::info!(
                    error = %e,
                    "no {DEFAULT_POLICY_DIR}/ folder here and none can be written: using the \
                     built-in default policy"
                );
                true
            }
        };
    let (policy, policy_line) = if unwritable {
        let sources = [
            vec![(
                PathBuf::from("(built-in) policies/default.toml"),
                DEFAULT_POLICY.to_owned(),
            )],
            sdk_key,
        ]
        .concat();
        let policy = LivePolicy::fixed(PolicySet::from_sources(&sources)?);
        let line =
            "the built-in default (no policies/ folder here, and none could be written)".to_owned();
        (policy, line)
    } else {
        let policy = LivePolicy::load_dir_with(&dir, sdk_key).context("policy")?;
        let line = format!(
            "{} (re-read every 2 s and on SIGHUP; `billing-gateway key new` prints entries for it)",
            dir.display()
        );
        (policy, line)
    };

    // The banner shows only calls that work with the policy in force: a folder that does not
    // bind the `roles` claim (policies/examples) refuses the printed tokens everything.
    let (reads, manages, downloads) = {
        let policy = policy.load();
        let may = |role: &str, target: &str| may(&policy, role, target);
        (
            may(
                "billing-read-only",
                "/billing/v2beta1/consumptions?page_size=3",
            ),
            may("billing-manager", "/billing/v2beta1/invoices?page_size=2"),
            may(
                "billing-manager",
                &format!("/billing/v2beta1/invoices/{invoice}/download?dl=1"),
            ),
        )
    };
    let app = App::with_live_policy(config, policy).await?;
    tokio::spawn(billing_sim::serve(sim_listener, sim));
    let base = format!("{scheme}://{}", app.addr()?);
    let ttl = 12 * 3600;
    let read_only = token(
        &hs256,
        "demo-reader",
        &["billing-read-only".into()],
        claims.clone(),
        ttl,
    )?;
    let manager = token(
        &hs256,
        "demo-manager",
        &["billing-manager".into()],
        claims,
        ttl,
    )?;
    let mut curls = String::new();
    if reads {
        curls += &format!(
            "curl -s -H \"Authorization: Bearer $READ_ONLY\" '{base}/billing/v2beta1/consumptions?page_size=3'\n\
             curl -s -H \"Authorization: Bearer $READ_ONLY\" '{base}/billing/v2beta1/invoices'   # 403: read-only\n"
        );
    }
    if manages {
        curls += &format!(
            "curl -s -H \"X-Auth-Token: $MANAGER\" '{base}/billing/v2beta1/invoices?page_size=2'\n"
        );
    }
    if downloads {
        curls += &format!(
            "curl -s -H \"X-Auth-Token: $MANAGER\" -o invoice.pdf '{base}/billing/v2beta1/invoices/{invoice}/download?dl=1'\n"
        );
    }
    if !(reads && manages && downloads) {
        curls += "# The policy in force does not grant READ_ONLY and MANAGER (tokens with a `roles` claim)\n\
                  # what the default does: mint tokens it binds with `billing-gateway token` (policies/README.md).\n";
    }
    println!(
        "billing-gateway demo: {base} -> simulated Billing API at {sim_url}\n\n\
         READ_ONLY={read_only}\n\
         MANAGER={manager}\n\
         GATEWAY_KEY={gateway_key}\n\n\
         {curls}\
         curl -s -H \"X-Auth-Token: $GATEWAY_KEY\" '{base}/gateway/v1/whoami'\n\
         curl -s -H \"X-Auth-Token: $GATEWAY_KEY\" '{base}/gateway/v1/costs'   # by project and category, forecast, budget\n\
         curl -s -H \"Authorization: Bearer $GATEWAY_KEY\" '{base}/gateway/v1/costs/metrics'   # the same, for Prometheus\n\n\
         # The official SDKs and the scw CLI, unmodified, with the gateway key as their secret key\n\
         # (Python Client.from_env(); JS loadProfileFromEnvironmentValues() from @scaleway/configuration-loader;\n\
         # the access key is never sent):\n\
         export SCW_ACCESS_KEY=SCWXXXXXXXXXXXXXXXXX SCW_SECRET_KEY={gateway_key} SCW_DEFAULT_ORGANIZATION_ID={organization} SCW_API_URL={base}\n\
         python3 -c 'from scaleway import Client; from scaleway.billing.v2beta1 import BillingV2Beta1API as B; print(B(Client.from_env()).list_invoices().total_count)'   # pip install scaleway\n\n\
         Policy: {policy_line}\n\
         Budget: project production ({DEMO_BUDGET_PROJECT}) at {DEMO_BUDGET_AMOUNT} a month (in memory, like the SDK key)\n\
         Ctrl-C stops it."
    );
    app.run_until(shutdown_signal()).await?;
    telemetry.shutdown().await;
    Ok(())
}

/// Writes the built-in default policy into the new folder `dir`; the file written.
fn write_default_policy(dir: &Path) -> std::io::Result<PathBuf> {
    std::fs::create_dir(dir)?;
    let file = dir.join("default.toml");
    std::fs::write(&file, DEFAULT_POLICY)?;
    Ok(file)
}

/// Whether `policy` lets a token whose `roles` claim holds `role` make the `GET` `target` names.
fn may(policy: &PolicySet, role: &str, target: &str) -> bool {
    let (path, query) = target
        .split_once('?')
        .map_or((target, None), |(path, query)| (path, Some(query)));
    let claims = serde_json::Map::from_iter([("roles".to_owned(), serde_json::json!([role]))]);
    let principal = policy.principal_for_claims("demo".to_owned(), &claims);
    billing_gateway::billing::parse("GET", path, query)
        .and_then(|mut call| billing_gateway::policy::decide(&principal, &mut call))
        .is_ok()
}

/// The simulated organization's `production` project, and the budget the demo gives it so
/// `costs` shows budgets and ratios.
const DEMO_BUDGET_PROJECT: &str = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee";
const DEMO_BUDGET_AMOUNT: &str = "250.00 EUR";

/// The demo's gateway key (`demo-sdk`), with a role of its own holding every permission, so it
/// does not depend on what the policy folder defines.
fn sdk_key_policy(key: &uuid::Uuid) -> String {
    let permissions: Vec<String> = Permission::ALL
        .iter()
        .map(|p| format!("\"{}\"", p.name()))
        .collect();
    format!(
        "[roles.demo-sdk]\n\
         description = \"The demo's key for the official SDKs: every permission\"\n\
         permissions = [{}]\n\n\
         [[keys]]\n\
         name = \"demo-sdk\"\n\
         sha256 = \"{}\"\n\
         roles = [\"demo-sdk\"]\n",
        permissions.join(", "),
        key_sha256(key)
    )
}
