//! The gateway's own routes, listed once: the router serves them, the OpenAPI document
//! describes them and the request log labels them from this table. Every other path is a
//! Billing one (or unknown), served by [`crate::proxy::billing`].

use axum::http::Method;
use axum::routing::{MethodFilter, MethodRouter, on};

use super::probes::{healthz, metrics, openapi, readyz};
use crate::proxy::{Endpoint, PURGE, WHOAMI};
use crate::state::AppState;

/// One of the gateway's own routes.
pub(super) struct Route {
    pub path: &'static str,
    pub method: Method,
    /// Its summary in the OpenAPI document.
    pub summary: &'static str,
    pub serve: Serve,
}

/// How a route is served.
pub(super) enum Serve {
    /// Without a credential, never shed: probes, scrapes, the document.
    Open(fn(MethodFilter) -> MethodRouter<AppState>),
    /// In the same order as a Billing call.
    Authenticated(Endpoint),
}

/// Every route of the gateway's own.
pub(super) const ROUTES: &[Route] = &[
    Route {
        path: "/healthz",
        method: Method::GET,
        summary: "liveness: 200 while the process serves",
        serve: Serve::Open(|m| on(m, healthz)),
    },
    Route {
        path: "/readyz",
        method: Method::GET,
        summary: "readiness: 200 once configuration, policy and signing keys are loaded",
        serve: Serve::Open(|m| on(m, readyz)),
    },
    Route {
        path: "/metrics",
        method: Method::GET,
        summary: "Prometheus metrics",
        serve: Serve::Open(|m| on(m, metrics)),
    },
    Route {
        path: "/gateway/v1/openapi.json",
        method: Method::GET,
        summary: "this document",
        serve: Serve::Open(|m| on(m, openapi)),
    },
    Route {
        path: "/gateway/v1/whoami",
        method: Method::GET,
        summary: "the caller's subject, grants and permissions",
        serve: Serve::Authenticated(WHOAMI),
    },
    Route {
        path: "/gateway/v1/cache",
        method: Method::DELETE,
        summary: "drop every cached answer (permission cache:purge)",
        serve: Serve::Authenticated(PURGE),
    },
];

/// Whether `path` is one of the gateway's own routes (its log label is then `gateway`).
pub(super) fn is_own(path: &str) -> bool {
    ROUTES.iter().any(|route| route.path == path)
}
