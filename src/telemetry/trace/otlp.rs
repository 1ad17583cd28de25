//! The OTLP adapter: the span exporter of the process, sending over the process's own reqwest
//! client (rustls on ring) rather than an HTTP stack of the exporter's, and the
//! `tracing-opentelemetry` layer that feeds it the gateway's spans.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use opentelemetry::trace::TracerProvider;
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::Layer;
use tracing_subscriber::registry::LookupSpan;

use crate::config::TracingConfig;

/// The longest a collector may take to accept one export.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest answer read from a collector (it answers a few bytes).
const MAX_COLLECTOR_ANSWER: usize = 1 << 20;

/// The span exporter sending to `url`, batching on a thread of its own, its requests run on
/// `runtime`.
pub(crate) fn provider(
    tracing: &TracingConfig,
    url: &str,
    runtime: tokio::runtime::Handle,
) -> Result<SdkTracerProvider, String> {
    crate::crypto::install_crypto_provider();
    let client = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(EXPORT_TIMEOUT)
        .user_agent(concat!("billing-gateway/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("cannot build the OTLP client: {e}"))?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(Collector { client, runtime })
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(url)
        .build()
        .map_err(|e| format!("cannot build the OTLP exporter for {url}: {e}"))?;
    let resource = Resource::builder()
        .with_service_name(tracing.service_name.clone())
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ))
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// The layer turning spans into OpenTelemetry ones for `provider`: the gateway's own spans
/// only (`request`, `upstream`), no event, so no log line's fields, and nothing of the libraries
/// underneath.
pub(crate) fn layer<S>(provider: &SdkTracerProvider) -> impl Layer<S>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    let spans = tracing_subscriber::filter::filter_fn(|meta| {
        meta.is_span() && meta.target().starts_with("billing_gateway")
    });
    tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("billing-gateway"))
        .with_filter(spans)
}

/// The exporter's HTTP client: the process's reqwest (rustls on ring, like every other client
/// of the gateway), its requests run on the Tokio runtime. The SDK's batch exporter runs on a
/// thread of its own, outside the runtime, and awaits the answer from there.
#[derive(Debug)]
struct Collector {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

type Answer = Result<Response<Bytes>, HttpError>;

impl HttpClient for Collector {
    fn send_bytes<'a, 'b>(
        &'a self,
        request: Request<Bytes>,
    ) -> Pin<Box<dyn Future<Output = Answer> + Send + 'b>>
    where
        'a: 'b,
        Self: 'b,
    {
        let client = self.client.clone();
        let task = self.runtime.spawn(async move {
            let (parts, body) = request.into_parts();
            let mut response = client
                .request(parts.method, parts.uri.to_string())
                .headers(parts.headers)
                .body(body)
                .send()
                .await?;
            let mut body = Vec::new();
            while let Some(chunk) = response.chunk().await? {
                if body.len() + chunk.len() > MAX_COLLECTOR_ANSWER {
                    return Err("the collector's answer is too large".into());
                }
                body.extend_from_slice(&chunk);
            }
            let mut answer = Response::new(Bytes::from(body));
            *answer.status_mut() = response.status();
            *answer.headers_mut() = response.headers().clone();
            Ok::<_, HttpError>(answer)
        });
        Box::pin(async move { task.await? })
    }
}
