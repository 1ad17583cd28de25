//! The request layer: the one middleware every request goes through, outermost.
//!
//! In order, for each request:
//!
//! 1. **Request id**: the caller's `X-Request-Id` when short and plain, else a fresh UUID;
//!    echoed on the answer, whatever answers.
//! 2. **Context**: the request's [`RequestContext`], put in its extensions beside the
//!    [`Admission`] (places in flight, taken by the handlers once the caller is known), for the
//!    extractors and handlers to fill in.
//! 3. **Shedding oversized heads**: a target over `max_uri_bytes` is a JSON 414, headers over
//!    `max_header_bytes` or more than `max_headers` of them a JSON 431, before anything reads
//!    them (hyper's hard caps, bare answers, sit above these in the accept loop).
//! 4. **Trace**: the rest runs in the request's span and trace ([`trace`]), continuing the
//!    caller's.
//! 5. **Log line and metrics**, once the answer's head is ready: from the context, the status
//!    and the refusal's reason, one access log line ([`crate::telemetry::access`]) and the
//!    request counters.
//!
//! A hand-written [`Service`]: one boxed future per request, no per-layer clone of the stack.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use tower::{Layer, Service};
use tracing::Instrument;

use crate::admission::Admission;
use crate::error::{Error, ErrorKind};
use crate::telemetry::access::{AccessEntry, AccessLog};
use crate::telemetry::{
    Metrics, REQUEST_ID, RequestContext, loggable_path, new_request_id, sane_request_id, trace,
};

/// The gateway's own bounds on a request head, answered in JSON; hyper's hard caps (bare
/// answers) are set above them in the accept loop.
#[derive(Debug, Clone, Copy)]
pub(super) struct HeadLimits {
    pub(super) max_header_bytes: usize,
    pub(super) max_headers: usize,
    pub(super) max_uri_bytes: usize,
}

impl HeadLimits {
    fn check(&self, req: &Request) -> Result<(), Error> {
        let target = req
            .uri()
            .path_and_query()
            .map_or(0, |target| target.as_str().len());
        if target > self.max_uri_bytes {
            return Err(Error::UriTooLong);
        }
        let headers = req.headers();
        if headers.len() > self.max_headers {
            return Err(Error::HeadersTooLarge);
        }
        let size: usize = headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 4)
            .sum();
        if size > self.max_header_bytes {
            return Err(Error::HeadersTooLarge);
        }
        Ok(())
    }
}

/// See the [module](self).
#[derive(Clone)]
pub(super) struct RequestLayer(Arc<LayerState>);

struct LayerState {
    metrics: Arc<Metrics>,
    admission: Arc<Admission>,
    head: HeadLimits,
    log: AccessLog,
}

impl RequestLayer {
    pub(super) fn new(
        metrics: Arc<Metrics>,
        admission: Arc<Admission>,
        head: HeadLimits,
        log: AccessLog,
    ) -> RequestLayer {
        RequestLayer(Arc::new(LayerState {
            metrics,
            admission,
            head,
            log,
        }))
    }
}

impl<S> Layer<S> for RequestLayer {
    type Service = RequestService<S>;

    fn layer(&self, inner: S) -> RequestService<S> {
        RequestService {
            inner,
            shared: self.0.clone(),
        }
    }
}

/// The [`RequestLayer`] around the rest of the stack.
#[derive(Clone)]
pub(super) struct RequestService<S> {
    inner: S,
    shared: Arc<LayerState>,
}

impl<S> Service<Request> for RequestService<S>
where
    S: Service<Request, Error = Infallible> + Clone + Send + 'static,
    S::Response: IntoResponse,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        // The service polled ready is the one called; its clone waits for the next request.
        let ready = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, ready);
        let shared = self.shared.clone();
        Box::pin(async move { Ok(shared.serve(req, inner).await) })
    }
}

impl LayerState {
    async fn serve<S>(&self, mut req: Request, mut inner: S) -> Response
    where
        S: Service<Request, Error = Infallible>,
        S::Response: IntoResponse,
    {
        let start = Instant::now();
        let id = match req.headers().get(&REQUEST_ID) {
            Some(id) if sane_request_id(id) => id.clone(),
            _ => new_request_id(),
        };
        let context = RequestContext::new(id);
        let method = req.method().clone();
        // A `Uri` shares hyper's buffer: cloning it copies no bytes.
        let uri = req.uri().clone();
        let (span, trace) = trace::request_span(context.request_id(), req.headers());
        let trace_id = trace.trace_id;
        // Only an exported span is kept for its outcome: without export the span is dropped.
        let exported = trace::exporting().then(|| span.clone());
        let mut response = match self.head.check(&req) {
            Err(e) => e.into_response(),
            Ok(()) => {
                let extensions = req.extensions_mut();
                extensions.insert(context.clone());
                extensions.insert(self.admission.clone());
                match trace::scope(trace, inner.call(req).instrument(span)).await {
                    Ok(response) => response.into_response(),
                    Err(never) => match never {},
                }
            }
        };
        response
            .headers_mut()
            .insert(REQUEST_ID.clone(), context.request_id_header().clone());

        let info = context.take();
        let path = uri.path();
        let status = response.status().as_u16();
        let operation = info.operation.unwrap_or(if super::routes::is_own(path) {
            "gateway"
        } else {
            "unknown"
        });
        let rejection = response.extensions().get::<ErrorKind>().map(|k| k.0);
        self.metrics.request_done(operation, status, rejection);
        if let Some(span) = exported {
            trace::record_outcome(&span, operation, status);
        }
        let mut trace_hex = [0u8; 32];
        self.log.log(&AccessEntry {
            request_id: context.request_id(),
            trace_id: trace_id.hex(&mut trace_hex),
            method: method.as_str(),
            path: &loggable_path(path),
            operation,
            subject: info.subject.as_deref().unwrap_or("-"),
            status,
            rejection: rejection.unwrap_or("-"),
            cache: info.cache.unwrap_or("-"),
            upstream_ms: info.upstream_ms,
            duration: start.elapsed(),
        });
        response
    }
}
