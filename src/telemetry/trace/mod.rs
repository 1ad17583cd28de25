//! Distributed tracing: W3C Trace Context in and out, and OpenTelemetry export when configured.
//!
//! Every request belongs to a trace: the caller's when it sent a valid `traceparent` (its
//! `tracestate` rides along), a fresh one otherwise. A malformed `traceparent` is ignored, as
//! the W3C recommendation says, never refused: the request starts a fresh trace and the caller's
//! `tracestate` is dropped with it. The trace id is in the request's log line, and every upstream
//! call carries the trace on in its own `traceparent`: same trace id, a new parent id (the span
//! of that call), the caller's sampled flag and `tracestate`.
//!
//! With an OTLP endpoint configured, [`init`](super::init) installs the OpenTelemetry layer and
//! the request and upstream spans are exported over OTLP/HTTP (protobuf); the ids are then the
//! exported spans'. Without one nothing of OpenTelemetry runs: no layer, no span built for it, no
//! exporter thread; the ids are drawn here (a random trace id when the caller sent none, a
//! random parent id per upstream call).
//!
//! Here: the request's and upstream calls' spans and the trace they carry on; the header codec
//! is `traceparent.rs`, the exporter's adapter `otlp.rs`.

pub(super) mod otlp;
mod traceparent;

pub use traceparent::{Incoming, TRACEPARENT, TRACESTATE, TraceId, parse_traceparent, traceparent};

use std::future::Future;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::http::{HeaderMap, HeaderValue};
use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId as OtelTraceId, TraceState,
};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Set once [`init`](super::init) has installed the OpenTelemetry layer; read (one relaxed
/// load) per request.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported: only then is any OpenTelemetry span built.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// Marks spans as exported from now on: called once the OpenTelemetry layer is installed.
pub(super) fn start_exporting() {
    EXPORTING.store(true, Ordering::Relaxed);
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

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

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
