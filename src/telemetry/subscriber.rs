//! The process's log subscriber: the log events' format and filter, and the span exporter
//! beside them when one is configured ([`super::trace`]). Installed once, by `serve` and
//! `demo`; tests install their own.

use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use super::trace::{self, otlp};
use crate::config::{LogFormat, TracingConfig};

/// What [`init`] installed: the span exporter, when one runs. Dropping it leaves spans not yet
/// sent unsent: call [`Telemetry::shutdown`] at the end.
#[derive(Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Sends every span ended so far to the collector, waiting for it (on a blocking thread:
    /// the exporter's own thread needs the runtime's threads meanwhile).
    pub async fn flush(&self) {
        if let Some(provider) = self.provider.clone() {
            let flushed = tokio::task::spawn_blocking(move || provider.force_flush()).await;
            if let Ok(Err(e)) = flushed {
                tracing::warn!(error = %e, "cannot send the spans to the collector");
            }
        }
    }

    /// Sends the spans left and stops the exporter.
    pub async fn shutdown(self) {
        if let Some(provider) = self.provider {
            let done = tokio::task::spawn_blocking(move || provider.shutdown()).await;
            if let Ok(Err(e)) = done {
                tracing::warn!(error = %e, "cannot send the last spans to the collector");
            }
        }
    }
}

/// Installs the process's log subscriber and, when `tracing` names an OTLP endpoint, the span
/// exporter beside it (once per process: a second call finds a subscriber set, and changes
/// nothing). Needs a Tokio runtime when exporting: the exports run on it.
pub fn init(format: Option<LogFormat>, tracing: &TracingConfig) -> Result<Telemetry, String> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let format = log_format(format);
    let Some(url) = tracing.traces_url() else {
        // Exactly the subscriber of a gateway without tracing: nothing in the way of a request.
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr);
        let _ = match format {
            LogFormat::Json => builder.json().flatten_event(true).try_init(),
            LogFormat::Pretty => builder.compact().try_init(),
        };
        return Ok(Telemetry::default());
    };

    let runtime = tokio::runtime::Handle::try_current()
        .map_err(|_| "exporting spans needs a Tokio runtime".to_owned())?;
    let provider = otlp::provider(tracing, &url, runtime)?;
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = match format {
        LogFormat::Json => logs.json().flatten_event(true).boxed(),
        LogFormat::Pretty => logs.compact().boxed(),
    };
    let installed = tracing_subscriber::registry()
        .with(logs.with_filter(filter))
        .with(otlp::layer(&provider))
        .try_init();
    if installed.is_err() {
        // Another subscriber was installed first: its spans have no OpenTelemetry layer.
        let _ = provider.shutdown();
        return Err("a log subscriber is already installed: spans cannot be exported".into());
    }
    trace::start_exporting();
    tracing::info!(endpoint = %url, service = %tracing.service_name, "exporting spans over OTLP");
    Ok(Telemetry {
        provider: Some(provider),
    })
}
/// The format asked for, or by default pretty at a terminal and JSON otherwise.
pub fn log_format(format: Option<LogFormat>) -> LogFormat {
    use std::io::IsTerminal;
    format.unwrap_or(if std::io::stderr().is_terminal() {
        LogFormat::Pretty
    } else {
        LogFormat::Json
    })
}
