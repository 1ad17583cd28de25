//! What the gateway tells its operators: request ids and each request's context (here), one
//! log line per request ([`access`]), audit events, Prometheus metrics ([`Metrics`]) and traces
//! ([`trace`]), and the process's log subscriber that writes the events ([`init`]).
//!
//! Metrics live in a per-app registry (not a process-wide recorder), so tests can run many apps
//! in one process and read each one's numbers. Log lines carry ids, names and numbers only: never
//! a token, a key, a query string or a body.

pub mod access;
mod metrics;
mod subscriber;
pub mod trace;

pub use access::AccessLog;
pub use metrics::{Metrics, SourceHealth};
pub use subscriber::{Telemetry, init, log_format};

use std::convert::Infallible;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, PoisonError};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderName, HeaderValue};

/// `X-Request-Id`, both ways.
pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// What the handlers learn about a request, for its log line and metrics.
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

/// One request's context: made by the request layer ([`crate::server`]) with the request's id,
/// filled in by the extractors and handlers that learn something, and read back by the same
/// layer for the log line and the metrics once the answer is ready. Every route gets one; no
/// handler has to hand anything back.
///
/// An extractor: a handler takes it as an argument.
#[derive(Debug, Clone)]
pub struct RequestContext(Arc<Context>);

#[derive(Debug)]
struct Context {
    id: HeaderValue,
    info: Mutex<RequestInfo>,
}

impl RequestContext {
    /// A context for the request with this id (a [`sane_request_id`] or a fresh one).
    pub fn new(id: HeaderValue) -> RequestContext {
        RequestContext(Arc::new(Context {
            id,
            info: Mutex::default(),
        }))
    }

    /// The request id, as echoed to the caller and sent upstream.
    pub fn request_id(&self) -> &str {
        // Only ids of plain characters are ever made.
        self.0.id.to_str().unwrap_or("-")
    }

    /// The request id as a header value.
    pub fn request_id_header(&self) -> &HeaderValue {
        &self.0.id
    }

    /// Notes something learned about the request.
    pub fn record(&self, note: impl FnOnce(&mut RequestInfo)) {
        note(&mut self.lock());
    }

    /// The request's info for a handler to fill in as it goes (across awaits, which a lock
    /// cannot be held over): taken out now, put back when the handler drops it.
    pub fn fill(&self) -> Filling<'_> {
        Filling {
            info: std::mem::take(&mut *self.lock()),
            context: self,
        }
    }

    /// What was learned, once the handler is done.
    pub fn take(&self) -> RequestInfo {
        std::mem::take(&mut *self.lock())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RequestInfo> {
        self.0.info.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The request's info while a handler fills it in; back in the context when dropped, however
/// the handler ends.
#[derive(Debug)]
pub struct Filling<'a> {
    info: RequestInfo,
    context: &'a RequestContext,
}

impl Deref for Filling<'_> {
    type Target = RequestInfo;
    fn deref(&self) -> &RequestInfo {
        &self.info
    }
}

impl DerefMut for Filling<'_> {
    fn deref_mut(&mut self) -> &mut RequestInfo {
        &mut self.info
    }
}

impl Drop for Filling<'_> {
    fn drop(&mut self) {
        *self.context.lock() = std::mem::take(&mut self.info);
    }
}

impl<S: Send + Sync> FromRequestParts<S> for RequestContext {
    type Rejection = Infallible;

    /// The layer's context; a detached one (recorded nowhere) on a router built without it.
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Infallible> {
        Ok(parts
            .extensions
            .get::<RequestContext>()
            .cloned()
            .unwrap_or_else(|| RequestContext::new(HeaderValue::from_static("-"))))
    }
}

/// The caller's request id when it is short and plain, so it is safe in logs and headers.
pub fn sane_request_id(v: &HeaderValue) -> bool {
    (1..=128).contains(&v.len())
        && v.as_bytes()
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// A fresh request id: a random UUID.
pub fn new_request_id() -> HeaderValue {
    let mut buf = uuid::Uuid::encode_buffer();
    let id = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf);
    // Hex digits and dashes only.
    HeaderValue::from_str(id).unwrap_or_else(|_| HeaderValue::from_static("-"))
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
