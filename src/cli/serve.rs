//! `serve`: the gateway in production, against the real Billing API.

use super::{env, shutdown_signal};
use billing_gateway::config::{Config, Needs};
use billing_gateway::server::App;
use billing_gateway::telemetry;
use std::path::Path;

/// `serve`: the gateway against the Billing API, until SIGTERM or Ctrl-C.
pub(super) async fn run(config: Option<&Path>) -> anyhow::Result<()> {
    let config = Config::load(config, &env, Needs::Serve)?;
    let telemetry =
        telemetry::init(config.log_format, &config.tracing).map_err(anyhow::Error::msg)?;
    if let Some(warning) = billing_gateway::auth::audience_warning(&config.auth) {
        tracing::warn!("{warning}");
    }
    let app = App::build(config).await?;
    tracing::info!(addr = %app.addr()?, "billing-gateway listening");
    app.run_until(shutdown_signal()).await?;
    telemetry.shutdown().await;
    Ok(())
}
