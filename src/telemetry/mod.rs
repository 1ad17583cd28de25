//! What the gateway tells its operators: request ids, one log line per request, audit events,
//! Prometheus metrics and traces ([`trace`]).
//!
//! Metrics live in a per-app registry (not a process-wide recorder), so tests can run many apps
//! in one process and read each one's numbers. Log lines carry ids, names and numbers only: never
//! a token, a key, a query string or a body.

mod metrics;
pub mod trace;

pub use metrics::{Metrics, SourceHealth};
pub use trace::{Telemetry, init};

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;

use crate::config::LogFormat;
use crate::error::ErrorKind;

/// `X-Request-Id`, both ways.
pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The request's id, as echoed to the caller and sent upstream.
#[derive(Debug, Clone)]
pub struct RequestId(pub Arc<str>);

/// What the handler learned about a request, left on the response for the request log.
#[derive(Debug, Clone, Default)]
pub struct RequestInfo {
    /// The Billing operation, when the path named one.
    pub operation: Option<&'static str>,
    /// The authenticated subject, when authentication succeeded.
    pub subject: Option<String>,
    /// Time to the upstream's response headers, when the upstream was called.
    pub upstream_ms: Option<f64>,
    /// How the cache answered (`hit`, `stored`, `coalesced`, `stale`, `miss`), for cacheable calls.
    pub cache: Option<&'static str>,
}

/// Accepts a caller's request id when it is short and plain, so it is safe in logs and headers.
fn sane_request_id(v: &HeaderValue) -> Option<&str> {
    let s = v.to_str().ok()?;
    let ok = (1..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
    ok.then_some(s)
}

/// Most bytes of a request path written to the log: an unknown path is logged, and a caller
/// without a credential must not be able to make each log line as long as the request.
pub const LOGGED_PATH_MAX: usize = 256;

/// The path as logged: whole when short, else its first [`LOGGED_PATH_MAX`] bytes (at a
/// character boundary) and how long it was.
pub fn loggable_path(path: &str) -> std::borrow::Cow<'_, str> {
    if path.len() <= LOGGED_PATH_MAX {
        return path.into();
    }
    let mut end = LOGGED_PATH_MAX;
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...[truncated: {} bytes]", &path[..end], path.len()).into()
}

/// Outermost middleware: assigns the request id, runs the request in its span (continuing the
/// caller's trace, [`trace`]), then writes the request's one log line and its metrics.
pub async fn track(State(metrics): State<Arc<Metrics>>, mut req: Request, next: Next) -> Response {
    let start = Instant::now();
    let id: Arc<str> = match req.headers().get(&REQUEST_ID).and_then(sane_request_id) {
        Some(id) => id.into(),
        None => {
            let mut buf = uuid::Uuid::encode_buffer();
            (&*uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf)).into()
        }
    };
    req.extensions_mut().insert(RequestId(id.clone()));
    let method = req.method().clone();
    // A `Uri` shares hyper's buffer: cloning it copies no bytes.
    let uri = req.uri().clone();
    let path = uri.path();
    let (span, trace) = trace::request_span(&id, req.headers());
    let trace_id = trace.trace_id;
    // Only an exported span is kept for its outcome: without export the span is dropped as before.
    let exported = trace::exporting().then(|| span.clone());
    let mut response = trace::scope(trace, next.run(req).instrument(span)).await;

    if let Ok(v) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID.clone(), v);
    }
    let info = response
        .extensions_mut()
        .remove::<RequestInfo>()
        .unwrap_or_default();
    let status = response.status().as_u16();
    let operation = info.operation.unwrap_or(match path {
        p if p == "/healthz" || p == "/readyz" || p == "/metrics" || p.starts_with("/gateway/") => {
            "gateway"
        }
        _ => "unknown",
    });
    let rejection = response.extensions().get::<ErrorKind>().map(|k| k.0);
    metrics.request_done(operation, status, rejection);
    if let Some(span) = exported {
        trace::record_outcome(&span, operation, status);
    }
    let mut trace_hex = [0u8; 32];
    tracing::info!(
        request_id = %id,
        trace_id = trace_id.hex(&mut trace_hex),
        %method,
        path = %loggable_path(path),
        operation,
        subject = info.subject.as_deref().unwrap_or("-"),
        status,
        rejection = rejection.unwrap_or("-"),
        cache = info.cache.unwrap_or("-"),
        upstream_ms = info.upstream_ms,
        duration_ms = start.elapsed().as_secs_f64() * 1000.0,
        "request"
    );
    response
}

/// Installs the process's log subscriber, without span export ([`init`] is the one that can
/// export). A second call finds a subscriber already set; that is fine.
pub fn init_logging(format: Option<LogFormat>) {
    let none = crate::config::TracingConfig {
        otlp_endpoint: None,
        otlp_traces_endpoint: None,
        service_name: String::new(),
        disabled: true,
    };
    let _ = init(format, &none);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_paths_are_logged_truncated_at_a_character_boundary() {
        assert_eq!(
            loggable_path("/billing/v2beta1/taxes"),
            "/billing/v2beta1/taxes"
        );
        let exact = "a".repeat(LOGGED_PATH_MAX);
        assert_eq!(loggable_path(&exact), exact);
        let long = format!("/{}", "x".repeat(64 * 1024));
        let logged = loggable_path(&long);
        assert!(logged.len() < LOGGED_PATH_MAX + 40, "{}", logged.len());
        assert!(logged.ends_with("...[truncated: 65537 bytes]"), "{logged}");
        // A multi-byte character straddling the cut is left out whole.
        let wide = format!("{}é{}", "a".repeat(LOGGED_PATH_MAX - 1), "b".repeat(10));
        assert!(loggable_path(&wide).starts_with(&"a".repeat(LOGGED_PATH_MAX - 1)));
        assert!(!loggable_path(&wide).contains('é'));
    }
}
