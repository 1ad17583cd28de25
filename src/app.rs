//! The assembled service: [`App::build`] binds the listener (port 0 allowed) and wires the
//! route table and middleware; [`App::run_until`] serves until shutdown, finishing in-flight
//! requests.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use serde_json::json;
use tokio::net::TcpListener;

use crate::auth::Authenticator;
use crate::cache::Cache;
use crate::config::Config;
use crate::error::{Error, json_response};
use crate::policy::PolicySet;
use crate::proxy;
use crate::reload::{self, LivePolicy};
use crate::telemetry::{self, Metrics};
use crate::upstream::Upstream;

/// Everything a request handler needs, shared by all of them.
pub struct Shared {
    /// The validated configuration.
    pub config: Config,
    /// Token verification.
    pub auth: Authenticator,
    /// The policy in force, hot-reloaded from the policy folder.
    pub policy: Arc<LivePolicy>,
    /// The Billing API client.
    pub upstream: Upstream,
    /// Stored consumption and tax answers.
    pub cache: Cache,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// Set once shutdown begins: `/readyz` turns 503 so load balancers stop sending.
    pub draining: AtomicBool,
}

/// The handlers' state: one `Arc`, cloned per request.
pub type AppState = Arc<Shared>;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A policy file is broken.
    #[error("policy: {0}")]
    Policy(#[from] crate::policy::PolicyError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Anything else found while assembling.
    #[error("{0}")]
    Other(String),
}

/// A bound, ready-to-run gateway.
pub struct App {
    listener: TcpListener,
    router: Router,
    state: AppState,
    policy_poll: Duration,
}

impl App {
    /// Loads the policy folder and builds the gateway; the folder is re-read while it runs.
    pub async fn build(config: Config) -> Result<App, StartError> {
        let policy = LivePolicy::load_dir(&config.policy_dir)?;
        App::assemble(config, policy).await
    }

    /// Builds the gateway with an already loaded policy, which never changes.
    pub async fn with_policy(config: Config, policy: PolicySet) -> Result<App, StartError> {
        App::assemble(config, LivePolicy::fixed(policy)).await
    }

    async fn assemble(config: Config, policy: LivePolicy) -> Result<App, StartError> {
        let upstream =
            Upstream::new(&config.upstream).map_err(|e| StartError::Other(e.to_string()))?;
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| StartError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let state = Arc::new(Shared {
            auth: Authenticator::new(&config.auth),
            cache: Cache::new(&config.cache),
            config,
            policy: Arc::new(policy),
            upstream,
            metrics: Arc::new(Metrics::default()),
            draining: AtomicBool::new(false),
        });
        Ok(App {
            listener,
            router: router(state.clone()),
            state,
            policy_poll: reload::DEFAULT_POLL,
        })
    }

    /// How often the policy folder is re-read (default [`reload::DEFAULT_POLL`]); tests shorten it.
    pub fn poll_policy_every(mut self, every: Duration) -> App {
        self.policy_poll = every;
        self
    }

    /// The policy in force, to reload it by hand (what SIGHUP does) or inspect it.
    pub fn policy(&self) -> Arc<LivePolicy> {
        self.state.policy.clone()
    }

    /// The bound address (the real port when 0 was asked).
    pub fn addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` completes, then stops accepting and lets in-flight requests
    /// (downloads included) finish.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let state = self.state.clone();
        let signal = async move {
            shutdown.await;
            state.draining.store(true, Ordering::SeqCst);
            tracing::info!("shutting down: finishing in-flight requests");
        };
        let serve = axum::serve(self.listener, self.router).with_graceful_shutdown(signal);
        // The policy watcher lives exactly as long as the server: no task outlives the app.
        tokio::select! {
            served = serve => served,
            never = reload::watch(self.state.policy.clone(), self.policy_poll) => match never {},
        }
    }
}

/// The route table and every middleware layer, outermost last.
fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/gateway/v1/whoami", get(proxy::whoami))
        .route("/gateway/v1/cache", delete(proxy::purge))
        .route("/gateway/v1/openapi.json", get(openapi))
        // Every Billing path, and every unknown one (answered 404 by the operation table).
        .fallback(proxy::handle)
        .method_not_allowed_fallback(|| async { Error::MethodNotAllowed.into_response() })
        .with_state(state.clone())
        // Outermost: request id, the request's span, its log line and metrics.
        .layer(axum::middleware::from_fn_with_state(
            state.metrics.clone(),
            telemetry::track,
        ))
}

async fn healthz() -> Response {
    json_response(StatusCode::OK, &json!({"status": "ok"}))
}

async fn openapi() -> Response {
    json_response(StatusCode::OK, &crate::openapi::document())
}

async fn readyz(State(state): State<AppState>) -> Response {
    if state.draining.load(Ordering::SeqCst) {
        return Error::Unavailable("shutting down".into()).into_response();
    }
    if !state.auth.ready() {
        return Error::Unavailable("no signing keys".into()).into_response();
    }
    json_response(StatusCode::OK, &json!({"status": "ready"}))
}

async fn metrics(State(state): State<AppState>) -> Response {
    let (entries, bytes) = state.cache.size().await;
    state.metrics.cache_size(entries, bytes);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}
