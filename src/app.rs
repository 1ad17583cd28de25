//! The assembled service: [`App::build`] binds the listener (port 0 allowed) and wires the
//! route table and middleware; [`App::run_until`] serves until shutdown, finishing in-flight
//! requests.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use tokio::net::TcpListener;

use crate::auth::Authenticator;
use crate::config::Config;
use crate::error::{Error, json_response};
use crate::policy::PolicySet;
use crate::proxy;
use crate::telemetry::{self, Metrics};
use crate::upstream::Upstream;

/// Everything a request handler needs, shared by all of them.
pub struct Shared {
    /// The validated configuration.
    pub config: Config,
    /// Token verification.
    pub auth: Authenticator,
    /// The policy in force.
    pub policy: PolicySet,
    /// The Billing API client.
    pub upstream: Upstream,
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
}

impl App {
    /// Loads the policy folder and builds the gateway.
    pub async fn build(config: Config) -> Result<App, StartError> {
        let policy = PolicySet::load_dir(&config.policy_dir)?;
        App::with_policy(config, policy).await
    }

    /// Builds the gateway with an already loaded policy.
    pub async fn with_policy(config: Config, policy: PolicySet) -> Result<App, StartError> {
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
            auth: Authenticator::start(&config.auth)
                .await
                .map_err(|e| StartError::Other(e.to_string()))?,
            config,
            policy,
            upstream,
            metrics: Arc::new(Metrics::default()),
            draining: AtomicBool::new(false),
        });
        Ok(App {
            listener,
            router: router(state.clone()),
            state,
        })
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
        axum::serve(self.listener, self.router)
            .with_graceful_shutdown(signal)
            .await
    }
}

/// The route table and every middleware layer, outermost last.
fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/gateway/v1/whoami", get(proxy::whoami))
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
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}
