//! The state every handler shares: one [`Services`] per app, built by [`crate::server::App`] and
//! handed to the proxy's handlers and the probes as one `Arc`. It lives apart from both so the
//! server (which wires handlers) and the proxy (which uses the state) never import each other.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use crate::auth::Authenticator;
use crate::cache::Cache;
use crate::cluster::Cluster;
use crate::limits::PrincipalLimits;
use crate::policy::reload::LivePolicy;
use crate::telemetry::Metrics;
use crate::upstream::Upstream;
use uuid::Uuid;

/// Everything a request handler needs, shared by all of them.
pub struct Services {
    /// The one organization this gateway serves (`SCW_DEFAULT_ORGANIZATION_ID`).
    ///
    /// Not the whole [`crate::config::Config`]: that holds the secret key, whose one long-lived
    /// copy is the upstream client's header value, and the HS256 secret, whose one copy is the
    /// authenticator's key. Handlers need neither.
    pub organization_id: Uuid,
    /// Token verification.
    pub auth: Authenticator,
    /// The policy in force, hot-reloaded from the policy folder.
    pub policy: Arc<LivePolicy>,
    /// The Billing API client, with the upstream budget and backoff.
    pub upstream: Upstream,
    /// Stored consumption and tax answers.
    pub cache: Cache,
    /// Each principal's own rate, checked on every authenticated Billing request.
    pub limits: PrincipalLimits,
    /// The link to the other replicas through Redis; `None` without `GATEWAY_REDIS_URL`.
    pub cluster: Option<Arc<Cluster>>,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// Set once shutdown begins: `/readyz` turns 503 so load balancers stop sending.
    pub draining: AtomicBool,
}

/// The handlers' state: one `Arc`, cloned per request.
pub type AppState = Arc<Services>;
