//! The gateway's own unauthenticated endpoints: liveness, readiness, metrics, the OpenAPI
//! document. Probes and scrapes are never shed, so a busy gateway is not mistaken for a dead one.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Extension;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::admission::Admission;
use crate::error::{Error, json_response};
use crate::state::AppState;

pub(super) async fn healthz() -> Response {
    json_response(StatusCode::OK, &json!({"status": "ok"}))
}

/// The OpenAPI document, built once when the router is (see [`super::openapi`]).
pub(super) async fn openapi(Extension(document): Extension<Arc<serde_json::Value>>) -> Response {
    json_response(StatusCode::OK, &document)
}

/// Ready: configuration, policy and signing keys loaded, not shutting down, and a place in
/// flight free. The last goes beyond the contract's §9 (issue 14): a replica whose places are
/// all taken would only shed what a load balancer sends it, so it says so until one comes back.
pub(super) async fn readyz(
    State(state): State<AppState>,
    Extension(admission): Extension<Arc<Admission>>,
) -> Response {
    if state.draining.load(Ordering::SeqCst) {
        return Error::Unavailable("shutting down".into()).into_response();
    }
    if !state.auth.ready() {
        return Error::Unavailable("no signing keys".into()).into_response();
    }
    // Saturated: a load balancer should send new callers elsewhere until places come back.
    if admission.saturated() {
        return Error::Unavailable("every place in flight is taken".into()).into_response();
    }
    json_response(StatusCode::OK, &json!({"status": "ready"}))
}

pub(super) async fn metrics(State(state): State<AppState>) -> Response {
    let (entries, bytes) = state.cache.size().await;
    state.metrics.cache_size(entries, bytes);
    state
        .metrics
        .set_upstream_backoff(state.upstream.backoff_remaining().as_secs_f64());
    state
        .metrics
        .set_waiting_principals(state.upstream.waiting_principals());
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}
