//! The route table and the layer stack, outermost first; CORS. The request layer
//! ([`super::layer`]) gives every request its id and context, sheds oversized heads and writes
//! the log line; places in flight are taken in the proxy's one order, once the caller is known
//! and allowed ([`crate::admission`]).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::response::IntoResponse;
use axum::routing::{MethodFilter, MethodRouter, on};
use axum::{Extension, Router};
use tower::ServiceBuilder;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::timeout::RequestBodyDeadlineLayer;

use super::ServerLimits;
use super::layer::{HeadLimits, RequestLayer};
use super::routes::{ROUTES, Serve};
use crate::admission::{Admission, Bounds};
use crate::error::Error;
use crate::proxy;
use crate::state::AppState;
use crate::telemetry::{AccessLog, RequestContext};

/// The route table and every middleware layer.
pub(super) fn router(
    state: AppState,
    limits: &ServerLimits,
    cors_origins: &[String],
    log: AccessLog,
) -> Router {
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
    let layers = ServiceBuilder::new()
        // Outermost: request id, context, oversized heads (JSON 414/431), the request's span,
        // its log line and metrics.
        .layer(RequestLayer::new(
            state.metrics.clone(),
            admission,
            head,
            log,
        ))
        // Browsers: preflights answered here, before authentication (they carry no credential).
        .option_layer(cors(cors_origins))
        // A body must arrive whole within the deadline: slow-loris on the body is cut off too,
        // a trickle of one byte a second included (an idle timeout never fires on that).
        .layer(RequestBodyDeadlineLayer::new(limits.body_deadline));
    let mut router = Router::new();
    for route in ROUTES {
        let method = MethodFilter::try_from(route.method.clone())
            .expect("a route's method is one axum can filter on");
        router = router.route(
            route.path,
            match route.serve {
                Serve::Open(serve) => serve(method),
                Serve::Authenticated(endpoint) => authenticated(method, endpoint),
            },
        );
    }
    router
        // Every Billing path, and every unknown one (answered 404 by the operation table).
        .fallback(proxy::billing)
        .method_not_allowed_fallback(|| async { Error::MethodNotAllowed.into_response() })
        // Handed to its route rather than fetched by it: the document reads the route table.
        .layer(Extension(Arc::new(super::openapi::document())))
        .with_state(state)
        .layer(layers)
}

/// The route of an authenticated gateway endpoint: served in the same order as a Billing call.
fn authenticated(method: MethodFilter, endpoint: proxy::Endpoint) -> MethodRouter<AppState> {
    on(
        method,
        move |state: State<AppState>,
              admission: Extension<Arc<Admission>>,
              context: RequestContext,
              request: Request| {
            proxy::gateway(endpoint, state, admission, context, request)
        },
    )
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
