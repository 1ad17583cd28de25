//! The route table and the layer stack, outermost first, one comment per layer; load shedding
//! of the Billing routes; the JSON 431 for oversized headers; CORS.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::middleware::{Next, from_fn, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use tokio::sync::Semaphore;
use tower::util::option_layer;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::timeout::RequestBodyDeadlineLayer;

use super::ServerLimits;
use super::probes::{healthz, metrics, openapi, readyz};
use crate::error::Error;
use crate::proxy;
use crate::state::AppState;
use crate::telemetry::{self, Metrics};

/// The route table and every middleware layer.
pub(super) fn router(state: AppState, limits: &ServerLimits, cors_origins: &[String]) -> Router {
    let in_flight = InFlight {
        permits: Arc::new(Semaphore::new(limits.max_in_flight)),
        metrics: state.metrics.clone(),
    };
    // Billing calls (and whoami) are shed past the concurrency bound; probes and scrapes are
    // not, so a busy gateway is not mistaken for a dead one.
    let billing = Router::new()
        .route("/gateway/v1/whoami", get(proxy::whoami))
        .route("/gateway/v1/cache", delete(proxy::purge))
        // Every Billing path, and every unknown one (answered 404 by the operation table).
        .fallback(proxy::handle)
        .layer(from_fn_with_state(in_flight, shed));
    let max_header_bytes = limits.max_header_bytes;
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/gateway/v1/openapi.json", get(openapi))
        .merge(billing)
        .method_not_allowed_fallback(|| async { Error::MethodNotAllowed.into_response() })
        .with_state(state.clone())
        // Each `.layer` wraps everything above it, so the last one listed runs first.
        // Oversized headers answer 431 before anything reads them.
        .layer(from_fn(move |req: Request, next: Next| {
            check_headers(max_header_bytes, req, next)
        }))
        // A body must arrive whole within the deadline: slow-loris on the body is cut off too,
        // a trickle of one byte a second included (an idle timeout never fires on that).
        .layer(RequestBodyDeadlineLayer::new(limits.body_deadline))
        // Browsers: preflights answered here, before authentication (they carry no credential).
        .layer(option_layer(cors(cors_origins)))
        // Outermost: request id, the request's span, its log line and metrics.
        .layer(from_fn_with_state(state.metrics.clone(), telemetry::track))
}

/// The concurrency bound of the Billing routes.
#[derive(Clone)]
struct InFlight {
    permits: Arc<Semaphore>,
    metrics: Arc<Metrics>,
}

/// Holds one place in the bound until the answer's last byte has left (or the client left).
struct Place {
    _permit: tokio::sync::OwnedSemaphorePermit,
    gauge: prometheus_client::metrics::gauge::Gauge,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// Load shedding: past `max_in_flight`, a 503 at once, so an overload shows as fast refusals
/// instead of a queue that grows until everything times out.
async fn shed(State(in_flight): State<InFlight>, req: Request, next: Next) -> Response {
    let Ok(permit) = in_flight.permits.try_acquire_owned() else {
        return Error::Overloaded.into_response();
    };
    in_flight.metrics.in_flight.inc();
    let place = Place {
        _permit: permit,
        gauge: in_flight.metrics.in_flight.clone(),
    };
    let response = next.run(req).await;
    // The place rides on the body, so a streaming download counts until it is done or dropped.
    response.map(|body| {
        Body::new(Holding {
            body,
            _place: place,
        })
    })
}

/// A body that holds its request's place in the bound until it is dropped. Size hint and end of
/// stream pass through, so `Content-Length` answers keep their length.
struct Holding {
    body: Body,
    _place: Place,
}

impl http_body::Body for Holding {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// 431 (JSON) for requests whose headers exceed `max` bytes.
async fn check_headers(max: usize, req: Request, next: Next) -> Response {
    let size: usize = req
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    if size > max {
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
