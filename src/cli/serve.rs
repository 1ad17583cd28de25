//! `serve`: the gateway in production, against the real Billing API.

use super::check::{Validated, refuse, validate};
use super::shutdown_signal;
use billing_gateway::server::App;
use billing_gateway::telemetry;
use std::path::Path;

/// `serve`: the gateway against the Billing API, until SIGTERM or Ctrl-C.
pub(super) async fn run(file: Option<&Path>) -> anyhow::Result<()> {
    // `check`'s validation, word for word: every problem at once, the same lines.
    let Validated {
        config, problems, ..
    } = validate(file);
    if !problems.is_empty() {
        return Err(refuse(&problems));
    }
    let telemetry =
        telemetry::init(config.log_format, &config.tracing).map_err(anyhow::Error::msg)?;
    if let Some(warning) = billing_gateway::auth::audience_warning(&config.auth) {
        tracing::warn!("{warning}");
    }
    let app = App::build(config).await?;
    match app.metrics_addr() {
        Some(metrics) => {
            tracing::info!(addr = %app.addr()?, %metrics, "billing-gateway listening");
        }
        None => tracing::info!(addr = %app.addr()?, "billing-gateway listening"),
    }
    app.run_until(shutdown_signal()).await?;
    telemetry.shutdown().await;
    Ok(())
}
