//! Distributed tracing: W3C Trace Context in and out, and OpenTelemetry export when configured.
//!
//! Every request belongs to a trace: the caller's when it sent a valid `traceparent` (its
//! `tracestate` rides along), a fresh one otherwise. A malformed `traceparent` is ignored, as
//! the W3C recommendation says, never refused: the request starts a fresh trace and the caller's
//! `tracestate` is dropped with it. The trace id is in the request's log line, and every upstream
//! call carries the trace on in its own `traceparent`: same trace id, a new parent id (the span
//! of that call), the caller's sampled flag and `tracestate`.
//!
//! With an OTLP endpoint configured, [`init`] installs the OpenTelemetry layer and the request
//! and upstream spans are exported over OTLP/HTTP (protobuf); the ids are then the exported
//! spans'. Without one nothing of OpenTelemetry runs: no layer, no span built for it, no
//! exporter thread; the ids are drawn here (a random trace id when the caller sent none, a
//! random parent id per upstream call).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId as OtelTraceId, TraceState,
    TracerProvider,
};
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{LogFormat, TracingConfig};

/// `traceparent` (W3C Trace Context), both ways.
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// `tracestate` (W3C Trace Context), passed on with a valid `traceparent`.
pub static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// The longest `tracestate` passed on; W3C asks for at least 512 characters to be propagated.
const MAX_TRACESTATE: usize = 512;

/// The longest a collector may take to accept one export.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest answer read from a collector (it answers a few bytes).
const MAX_COLLECTOR_ANSWER: usize = 1 << 20;

/// Set once [`init`] has installed the OpenTelemetry layer; read (one relaxed load) per request.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported: only then is any OpenTelemetry span built.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// A trace id, printed as 32 lowercase hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceId(pub [u8; 16]);

impl TraceId {
    /// The 32 hex digits, written into `buf`: a `&str` field costs a log line less than a
    /// `Display` one (no formatting into a growing string).
    pub fn hex<'a>(&self, buf: &'a mut [u8; 32]) -> &'a str {
        hex(&self.0, buf)
    }
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; 32];
        f.write_str(self.hex(&mut buf))
    }
}

/// Lowercase hex of `bytes` into `out` (twice as long).
fn hex<'a>(bytes: &[u8], out: &'a mut [u8]) -> &'a str {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = DIGITS[usize::from(b >> 4)];
        out[2 * i + 1] = DIGITS[usize::from(b & 0xf)];
    }
    // Only ASCII digits were written.
    std::str::from_utf8(&out[..2 * bytes.len()]).unwrap_or_default()
}

/// The trace context a caller sent, when its `traceparent` is valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    /// The caller's trace.
    pub trace_id: [u8; 16],
    /// The caller's span: the parent of the request's.
    pub parent_id: [u8; 8],
    /// The caller's trace flags (bit 0: sampled).
    pub flags: u8,
    /// The caller's `tracestate`, when it sent one short and plain enough to pass on.
    pub tracestate: Option<HeaderValue>,
}

impl Incoming {
    /// The caller's trace context, or `None` when it sent no `traceparent` or a malformed one
    /// (or several: which would be meant is unknowable).
    pub fn from_headers(headers: &HeaderMap) -> Option<Incoming> {
        let mut values = headers.get_all(&TRACEPARENT).iter();
        let (Some(value), None) = (values.next(), values.next()) else {
            return None;
        };
        let (trace_id, parent_id, flags) = parse_traceparent(value.as_bytes())?;
        Some(Incoming {
            trace_id,
            parent_id,
            flags,
            tracestate: tracestate(headers),
        })
    }
}

/// Parses a `traceparent` value (W3C Trace Context level 1): `00-` 32 hex digits of trace id,
/// `-` 16 of parent id, `-` 2 of flags, all lowercase; neither id all zeros; version `ff` is
/// invalid, and a later version may append `-` and more, which is ignored.
pub fn parse_traceparent(value: &[u8]) -> Option<([u8; 16], [u8; 8], u8)> {
    let value = value.trim_ascii();
    if value.len() < 55 || value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
        return None;
    }
    let version = unhex::<1>(&value[..2])?[0];
    match version {
        0 if value.len() != 55 => return None,
        0xff => return None,
        _ if value.len() > 55 && value[55] != b'-' => return None,
        _ => {}
    }
    let trace_id = unhex::<16>(&value[3..35])?;
    let parent_id = unhex::<8>(&value[36..52])?;
    let flags = unhex::<1>(&value[53..55])?[0];
    if trace_id == [0; 16] || parent_id == [0; 8] {
        return None;
    }
    Some((trace_id, parent_id, flags))
}

/// `N` bytes from `2N` lowercase hex digits.
fn unhex<const N: usize>(digits: &[u8]) -> Option<[u8; N]> {
    fn digit(d: u8) -> Option<u8> {
        match d {
            b'0'..=b'9' => Some(d - b'0'),
            b'a'..=b'f' => Some(d - b'a' + 10),
            _ => None,
        }
    }
    if digits.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, pair) in digits.chunks_exact(2).enumerate() {
        out[i] = (digit(pair[0])? << 4) | digit(pair[1])?;
    }
    Some(out)
}

/// The caller's `tracestate` headers as one list, when short and plain enough to pass on.
fn tracestate(headers: &HeaderMap) -> Option<HeaderValue> {
    let mut values = headers.get_all(&TRACESTATE).iter();
    let first = values.next()?;
    let Some(second) = values.next() else {
        return plain_tracestate(first.as_bytes()).then(|| first.clone());
    };
    // Several headers are one list (RFC 9110 §5.3).
    let mut joined = Vec::with_capacity(first.len() + second.len() + 1);
    for value in [first, second].into_iter().chain(values) {
        if !joined.is_empty() {
            joined.push(b',');
        }
        joined.extend_from_slice(value.as_bytes());
    }
    if !plain_tracestate(&joined) {
        return None;
    }
    HeaderValue::from_bytes(&joined).ok()
}

fn plain_tracestate(value: &[u8]) -> bool {
    !value.is_empty()
        && value.len() <= MAX_TRACESTATE
        && value.iter().all(|b| (b' '..=b'~').contains(b))
}

/// The request's trace, as the upstream calls made for it carry it on.
#[derive(Debug, Clone)]
pub struct Trace {
    /// The trace the request belongs to.
    pub trace_id: TraceId,
    /// The sampled flag to pass on (bit 0).
    pub flags: u8,
    /// The caller's `tracestate`, passed on unchanged.
    pub tracestate: Option<HeaderValue>,
}

tokio::task_local! {
    /// The trace of the request this task is handling, for its upstream calls.
    static CURRENT: Trace;
}

/// The request's span, continued from the caller's trace when it sent one, and its trace.
///
/// Without export the span is the plain `request` span it always was and the trace is the
/// caller's or a random one; with export the span also gets the caller's context as its remote
/// parent and the trace is that of the span OpenTelemetry started.
pub(crate) fn request_span(request_id: &str, headers: &HeaderMap) -> (Span, Trace) {
    let incoming = Incoming::from_headers(headers);
    if exporting() {
        let span = tracing::info_span!(
            "request",
            request_id,
            otel.kind = "server",
            operation = tracing::field::Empty,
            http.response.status_code = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        if let Some(trace) = start_exported(&span, incoming.as_ref()) {
            return (span, trace);
        }
        return (span, own_trace(incoming));
    }
    let span = tracing::info_span!("request", request_id = %request_id);
    (span, own_trace(incoming))
}

fn own_trace(incoming: Option<Incoming>) -> Trace {
    match incoming {
        Some(incoming) => Trace {
            trace_id: TraceId(incoming.trace_id),
            flags: incoming.flags & 0x01,
            tracestate: incoming.tracestate,
        },
        None => Trace {
            // Never all zeros (invalid): the odds are 2^-128, the guard is one compare.
            trace_id: TraceId(rand::random::<u128>().max(1).to_be_bytes()),
            flags: 0,
            tracestate: None,
        },
    }
}

/// Gives `span` the caller's context as its remote parent and starts it; its trace.
fn start_exported(span: &Span, incoming: Option<&Incoming>) -> Option<Trace> {
    if let Some(incoming) = incoming {
        let state = incoming
            .tracestate
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| TraceState::from_str(v).ok())
            .unwrap_or_default();
        let remote = SpanContext::new(
            OtelTraceId::from_bytes(incoming.trace_id),
            SpanId::from_bytes(incoming.parent_id),
            TraceFlags::new(incoming.flags & 0x01),
            true,
            state,
        );
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
    }
    let context = span.context();
    let started = context.span().span_context().clone();
    started.is_valid().then(|| Trace {
        trace_id: TraceId(started.trace_id().to_bytes()),
        flags: started.trace_flags().to_u8() & 0x01,
        tracestate: incoming.and_then(|i| i.tracestate.clone()),
    })
}

/// Runs `handler` with `trace` as the trace its upstream calls carry on.
pub(crate) fn scope<F: Future>(trace: Trace, handler: F) -> impl Future<Output = F::Output> {
    CURRENT.scope(trace, handler)
}

/// Records what came of the request on its span (exported spans only).
pub(crate) fn record_outcome(span: &Span, operation: &'static str, status: u16) {
    span.record("operation", operation);
    // As a signed integer: OpenTelemetry has no unsigned one (an unsigned field is sent as text).
    span.record("http.response.status_code", i64::from(status));
    if status >= 500 {
        span.record("otel.status_code", "ERROR");
    }
}

/// The span of one upstream call: a child of the request's, exported; [`Span::none`] without
/// export.
pub(crate) fn upstream_span(operation: &'static str, method: &str) -> Span {
    if !exporting() {
        return Span::none();
    }
    tracing::info_span!(
        "upstream",
        otel.kind = "client",
        operation,
        http.request.method = method,
        http.response.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    )
}

/// Records the upstream's answer (0: none) on an upstream call's span.
pub(crate) fn record_upstream(span: &Span, status: u16) {
    if span.is_none() {
        return;
    }
    if status != 0 {
        span.record("http.response.status_code", i64::from(status));
    }
    if status == 0 || status >= 500 {
        span.record("otel.status_code", "ERROR");
    }
}

/// The `traceparent` (and `tracestate`) an upstream call sends: the request's trace, with the
/// id of `span` (exported) or a random one as the parent id. `None` outside a request.
pub(crate) fn outgoing(span: &Span) -> Option<(HeaderValue, Option<HeaderValue>)> {
    if !span.is_none() {
        let context = span.context();
        let started = context.span().span_context().clone();
        if started.is_valid() {
            let state = started.trace_state().header();
            return Some((
                traceparent(
                    started.trace_id().to_bytes(),
                    started.span_id().to_bytes(),
                    started.trace_flags().to_u8() & 0x01,
                ),
                (!state.is_empty())
                    .then(|| HeaderValue::from_str(&state).ok())
                    .flatten(),
            ));
        }
    }
    CURRENT
        .try_with(|trace| {
            // Never all zeros (invalid).
            let parent = rand::random::<u64>().max(1).to_be_bytes();
            (
                traceparent(trace.trace_id.0, parent, trace.flags),
                trace.tracestate.clone(),
            )
        })
        .ok()
}

/// `00-{trace id}-{parent id}-{flags}`.
pub fn traceparent(trace_id: [u8; 16], parent_id: [u8; 8], flags: u8) -> HeaderValue {
    let mut buf = [0u8; 55];
    buf[..3].copy_from_slice(b"00-");
    hex(&trace_id, &mut buf[3..35]);
    buf[35] = b'-';
    hex(&parent_id, &mut buf[36..52]);
    buf[52] = b'-';
    hex(&[flags], &mut buf[53..55]);
    // Only ASCII digits and dashes.
    HeaderValue::from_bytes(&buf).unwrap_or_else(|_| HeaderValue::from_static(""))
}

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
    let format = super::log_format(format);
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
        .with_endpoint(url.clone())
        .build()
        .map_err(|e| format!("cannot build the OTLP exporter for {url}: {e}"))?;
    let resource = Resource::builder()
        .with_service_name(tracing.service_name.clone())
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ))
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build();
    // The gateway's own spans only (`request`, `upstream`): no event, so no log line's fields,
    // and nothing of the libraries underneath.
    let spans = tracing_subscriber::filter::filter_fn(|meta| {
        meta.is_span() && meta.target().starts_with("billing_gateway")
    });
    let otel = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("billing-gateway"))
        .with_filter(spans);
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = match format {
        LogFormat::Json => logs.json().flatten_event(true).boxed(),
        LogFormat::Pretty => logs.compact().boxed(),
    };
    let installed = tracing_subscriber::registry()
        .with(logs.with_filter(filter))
        .with(otel)
        .try_init();
    if installed.is_err() {
        // Another subscriber was installed first: its spans have no OpenTelemetry layer.
        let _ = provider.shutdown();
        return Err("a log subscriber is already installed: spans cannot be exported".into());
    }
    EXPORTING.store(true, Ordering::Relaxed);
    tracing::info!(endpoint = %url, service = %tracing.service_name, "exporting spans over OTLP");
    Ok(Telemetry {
        provider: Some(provider),
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_is_read_and_written_back_alike() {
        let (trace, parent, flags) = parse_traceparent(VALID.as_bytes()).expect("valid");
        assert_eq!(flags, 1);
        assert_eq!(traceparent(trace, parent, flags), VALID);
        assert_eq!(
            TraceId(trace).to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        // Surrounding blanks are tolerated; a later version's extra fields are ignored.
        assert!(parse_traceparent(format!(" {VALID} ").as_bytes()).is_some());
        assert!(
            parse_traceparent(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra")
                .is_some()
        );
    }

    #[test]
    fn malformed_traceparents_are_ignored() {
        for bad in [
            "",
            "garbage",
            // Uppercase hex, all-zero ids, version ff, a short id, extra text on version 00.
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
        ] {
            assert_eq!(parse_traceparent(bad.as_bytes()), None, "{bad}");
        }
    }

    #[test]
    fn tracestate_travels_only_with_a_valid_traceparent_and_within_bounds() {
        let mut headers = HeaderMap::new();
        headers.insert(&TRACEPARENT, HeaderValue::from_static(VALID));
        headers.append(&TRACESTATE, HeaderValue::from_static("a=1"));
        headers.append(&TRACESTATE, HeaderValue::from_static("b=2"));
        let incoming = Incoming::from_headers(&headers).expect("valid");
        assert_eq!(
            incoming.tracestate.as_ref().map(|v| v.as_bytes()),
            Some(&b"a=1,b=2"[..])
        );
        headers.insert(
            &TRACESTATE,
            HeaderValue::from_str(&"x".repeat(MAX_TRACESTATE + 1)).expect("value"),
        );
        assert_eq!(
            Incoming::from_headers(&headers).expect("valid").tracestate,
            None
        );
        headers.insert(&TRACEPARENT, HeaderValue::from_static("00-nonsense"));
        assert_eq!(Incoming::from_headers(&headers), None);
        // Two traceparents: which one was meant is unknowable.
        headers.insert(&TRACEPARENT, HeaderValue::from_static(VALID));
        headers.append(&TRACEPARENT, HeaderValue::from_static(VALID));
        assert_eq!(Incoming::from_headers(&headers), None);
    }

    #[tokio::test]
    async fn upstream_calls_carry_the_trace_with_a_new_parent_each() {
        let (trace, parent, _) = parse_traceparent(VALID.as_bytes()).expect("valid");
        assert!(outgoing(&Span::none()).is_none(), "outside a request");
        let trace = Trace {
            trace_id: TraceId(trace),
            flags: 1,
            tracestate: Some(HeaderValue::from_static("a=1")),
        };
        let (first, second) = scope(trace, async {
            (
                outgoing(&Span::none()).expect("in a request"),
                outgoing(&Span::none()).expect("in a request"),
            )
        })
        .await;
        for (header, state) in [&first, &second] {
            let (t, p, f) = parse_traceparent(header.as_bytes()).expect("valid");
            assert_eq!(
                (t, f),
                (parse_traceparent(VALID.as_bytes()).expect("v").0, 1)
            );
            assert_ne!(p, parent, "a new parent id");
            assert_eq!(state.as_ref().map(|v| v.as_bytes()), Some(&b"a=1"[..]));
        }
        assert_ne!(first.0, second.0, "each call its own parent id");
    }
}
