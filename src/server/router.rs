//! The route table and the layer stack, outermost first, one comment per layer; the JSON 414
//! and 431 for oversized request heads; CORS. Places in flight are taken by the handlers, once
//! the caller is known ([`crate::admission`]).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::middleware::{Next, from_fn, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Extension, Router};
use tower::util::option_layer;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::timeout::RequestBodyDeadlineLayer;

use super::ServerLimits;
use super::probes::{healthz, metrics, openapi, readyz};
use crate::admission::{Admission, Bounds};
use crate::error::Error;
use crate::proxy;
use crate::state::AppState;
use crate::telemetry;

/// The route table and every middleware layer.
pub(super) fn router(state: AppState, limits: &ServerLimits, cors_origins: &[String]) -> Router {
    // Authenticated requests take a place once their caller is known; probes and scrapes never
    // do, so a busy gateway is not mistaken for a dead one (`/readyz` says when it is full).
    let admission: Arc<Admission> = Admission::new(
        Bounds {
            max_in_flight: limits.max_in_flight,
            max_in_flight_per_principal: limits.max_in_flight_per_principal,
            max_unauthenticated: limits.max_unauthenticated,
            idle_write: limits.idle_write_timeout,
        },
        state.metrics.clone(),
    );
    let head = HeadLimits {
        max_header_bytes: limits.max_header_bytes,
        max_headers: limits.max_headers,
        max_uri_bytes: limits.max_uri_bytes,
    };
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/gateway/v1/openapi.json", get(openapi))
        .route("/gateway/v1/whoami", get(proxy::whoami))
        .route("/gateway/v1/cache", delete(proxy::purge))
        // Every Billing path, and every unknown one (answered 404 by the operation table).
        .fallback(proxy::handle)
        .method_not_allowed_fallback(|| async { Error::MethodNotAllowed.into_response() })
        .with_state(state.clone())
        // Each `.layer` wraps everything above it, so the last one listed runs first.
        // The places in flight, for the handlers and `/readyz`.
        .layer(Extension(admission))
        // Oversized request heads answer 414 or 431 before anything reads them.
        .layer(from_fn(move |req: Request, next: Next| {
            check_head(head, req, next)
        }))
        // A body must arrive whole within the deadline: slow-loris on the body is cut off too,
        // a trickle of one byte a second included (an idle timeout never fires on that).
        .layer(RequestBodyDeadlineLayer::new(limits.body_deadline))
        // Browsers: preflights answered here, before authentication (they carry no credential).
        .layer(option_layer(cors(cors_origins)))
        // Outermost: request id, the request's span, its log line and metrics.
        .layer(from_fn_with_state(state.metrics.clone(), telemetry::track))
}

/// The gateway's own bounds on a request head, answered in JSON; hyper's hard caps (bare
/// answers) are set above them in the accept loop.
#[derive(Debug, Clone, Copy)]
struct HeadLimits {
    max_header_bytes: usize,
    max_headers: usize,
    max_uri_bytes: usize,
}

/// 414 (JSON) for a request target over `max_uri_bytes`; 431 (JSON) for headers over
/// `max_header_bytes` or more than `max_headers` of them.
async fn check_head(limits: HeadLimits, req: Request, next: Next) -> Response {
    let target = req
        .uri()
        .path_and_query()
        .map_or(0, |target| target.as_str().len());
    if target > limits.max_uri_bytes {
        return Error::UriTooLong.into_response();
    }
    let headers = req.headers();
    if headers.len() > limits.max_headers {
        return Error::HeadersTooLarge.into_response();
    }
    let size: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    if size > limits.max_header_bytes {
        return Error::HeadersTooLarge.into_response();
    }
    next.run(req).await
}

/// CORS for the configured origins only: tokens travel in headers, never cookies, so
/// credentials are not allowed; the Scaleway and gateway headers a web app reads are exposed.
fn cors(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let origins: Vec<HeaderValue> = origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    Some(
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(origins))
            .allow_methods([Method::GET, Method::POST, Method::DELETE])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                HeaderName::from_static("x-auth-token"),
                HeaderName::from_static("x-request-id"),
            ])
            .expose_headers([
                HeaderName::from_static("x-request-id"),
                HeaderName::from_static("cache-status"),
                header::AGE,
                header::RETRY_AFTER,
                header::CONTENT_DISPOSITION,
            ])
            .max_age(Duration::from_secs(600)),
    )
}
