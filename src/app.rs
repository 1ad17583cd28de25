//! The assembled service: [`App::build`] binds the listener (port 0 allowed) and wires the
//! route table and middleware; [`App::run_until`] runs the accept loop until shutdown, finishing
//! in-flight requests within a grace period.
//!
//! The accept loop is hyper's own connection builder rather than `axum::serve`, for the bounds
//! [`ServerLimits`] puts on hostile or broken clients: header size, header read time, requests
//! in flight.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::middleware::{Next, from_fn, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tower::util::option_layer;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::timeout::RequestBodyTimeoutLayer;

use crate::auth::Authenticator;
use crate::cache::Cache;
use crate::config::Config;
use crate::error::{Error, json_response};
use crate::limits::PrincipalLimits;
use crate::policy::PolicySet;
use crate::proxy;
use crate::reload::{self, LivePolicy};
use crate::telemetry::{self, Metrics};
use crate::tls::Tls;
use crate::upstream::Upstream;

/// Everything a request handler needs, shared by all of them.
pub struct Shared {
    /// The validated configuration.
    pub config: Config,
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

/// The bounds the server puts on clients, so a hostile or broken one cannot exhaust it.
/// [`Default`] is what the gateway runs with; tests shrink them.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    /// Most bytes of request headers answered normally; more is a 431. Twice this is a hard cap
    /// on the whole request head, past which the connection is answered a bare 431 and closed.
    pub max_header_bytes: usize,
    /// How long a client may take to send a request head (a slow-loris defence); an idle
    /// keep-alive connection is closed after it too.
    pub header_read_timeout: Duration,
    /// Billing requests handled at once, streaming answers included; past it new ones are
    /// answered 503 at once rather than queued without bound.
    pub max_in_flight: usize,
    /// How long in-flight requests (downloads included) may take to finish once shutdown begins.
    pub shutdown_grace: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            // Enough for any JWT an IdP issues, a few times over.
            max_header_bytes: 32 * 1024,
            header_read_timeout: Duration::from_secs(10),
            max_in_flight: 1024,
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// A bound, ready-to-run gateway.
pub struct App {
    listener: TcpListener,
    state: AppState,
    policy_poll: Duration,
    limits: ServerLimits,
    tls: Option<Arc<Tls>>,
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
        let jwt_enabled = config.auth.hs256_secret.is_some() || config.auth.key_source().is_some();
        if !jwt_enabled && !policy.load().has_keys() {
            return Err(StartError::Other(
                "no way to authenticate callers: set GATEWAY_JWKS_URL, GATEWAY_JWT_ISSUER (OIDC \
                 discovery) or GATEWAY_JWT_HS256_SECRET (or its _FILE variant), or define \
                 [[keys]] in the policy"
                    .into(),
            ));
        }
        let metrics = Arc::new(Metrics::default());
        let upstream = Upstream::new(&config.upstream, metrics.clone())
            .map_err(|e| StartError::Other(e.to_string()))?;
        let tls = match &config.tls {
            Some(files) => Some(Arc::new(
                Tls::load(&files.cert, &files.key)
                    .map_err(|e| StartError::Other(format!("TLS: {e}")))?,
            )),
            None => None,
        };
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
            cache: Cache::new(&config.cache),
            limits: PrincipalLimits::new(config.limits.principal_rate),
            config,
            policy: Arc::new(policy),
            upstream,
            metrics,
            draining: AtomicBool::new(false),
        });
        Ok(App {
            listener,
            state,
            policy_poll: reload::DEFAULT_POLL,
            limits: ServerLimits::default(),
            tls,
        })
    }

    /// How often the policy folder (and the TLS certificate) is re-read (default
    /// [`reload::DEFAULT_POLL`]); tests shorten it.
    pub fn poll_policy_every(mut self, every: Duration) -> App {
        self.policy_poll = every;
        self
    }

    /// The policy in force, to reload it by hand (what SIGHUP does) or inspect it.
    pub fn policy(&self) -> Arc<LivePolicy> {
        self.state.policy.clone()
    }

    /// Replaces the server's bounds on clients.
    pub fn with_limits(mut self, limits: ServerLimits) -> App {
        self.limits = limits;
        self
    }

    /// The bound address (the real port when 0 was asked).
    pub fn addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` completes, then stops accepting, turns `/readyz` 503 and lets
    /// in-flight requests (downloads included) finish within the grace period.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let App {
            listener,
            state,
            policy_poll,
            limits,
            tls,
        } = self;
        let router = router(state.clone(), &limits);
        let graceful = GracefulShutdown::new();
        let certificate = async {
            match &tls {
                Some(tls) => tls.watch(policy_poll).await,
                None => std::future::pending().await,
            }
        };
        // The watchers live exactly as long as the accept loop: no task outlives the app.
        tokio::select! {
            () = serve(listener, router, &limits, tls.clone(), &graceful, shutdown) => {}
            never = reload::watch(state.policy.clone(), policy_poll) => match never {},
            never = certificate => match never {},
        }

        state.draining.store(true, Ordering::SeqCst);
        tracing::info!(
            connections = graceful.count(),
            "shutting down: finishing in-flight requests"
        );
        tokio::select! {
            () = graceful.shutdown() => tracing::info!("all requests finished"),
            () = tokio::time::sleep(limits.shutdown_grace) => {
                tracing::warn!("grace period over: closing the connections still open");
            }
        }
        Ok(())
    }
}

/// The accept loop: one task per connection, each watched for graceful shutdown. Returns (and
/// drops the listener, so nothing more is accepted) as soon as `shutdown` completes.
async fn serve(
    listener: TcpListener,
    router: Router,
    limits: &ServerLimits,
    tls: Option<Arc<Tls>>,
    graceful: &GracefulShutdown,
    shutdown: impl Future<Output = ()>,
) {
    let mut http = auto::Builder::new(TokioExecutor::new());
    // The hard cap on a request head; the JSON 431 below it is `check_headers`'s.
    let head_cap = (limits.max_header_bytes * 2).max(8192);
    http.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(head_cap);
    http.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(head_cap).unwrap_or(u32::MAX));
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, usually: pause rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        tokio::spawn(connection(
            stream,
            tls.clone(),
            http.clone(),
            router.clone(),
            graceful.watcher(),
            limits.header_read_timeout,
        ));
    }
}

/// Serves one connection until it closes (or shutdown closes it once its requests are done).
async fn connection(
    stream: TcpStream,
    tls: Option<Arc<Tls>>,
    http: auto::Builder<TokioExecutor>,
    router: Router,
    watcher: Watcher,
    first_byte_timeout: Duration,
) {
    // hyper's header timeout starts once it knows the protocol, which needs the first bytes:
    // a client that connects and says nothing is dropped here.
    let mut probe = [0u8; 1];
    match tokio::time::timeout(first_byte_timeout, stream.peek(&mut probe)).await {
        Ok(Ok(n)) if n > 0 => {}
        _ => return,
    }
    match tls {
        // A handshake that stalls is a slow-loris too.
        Some(tls) => {
            match tokio::time::timeout(first_byte_timeout, tls.acceptor().accept(stream)).await {
                Ok(Ok(stream)) => serve_connection(stream, http, router, watcher).await,
                Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!("TLS handshake timed out"),
            }
        }
        None => serve_connection(stream, http, router, watcher).await,
    }
}

async fn serve_connection<I>(
    io: I,
    http: auto::Builder<TokioExecutor>,
    router: Router,
    watcher: Watcher,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = TowerToHyperService::new(router);
    let conn = http
        .serve_connection(TokioIo::new(io), service)
        .into_owned();
    if let Err(e) = watcher.watch(conn).await {
        // Clients going away mid-answer, timeouts: routine, not the operator's concern.
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// The route table and every middleware layer.
fn router(state: AppState, limits: &ServerLimits) -> Router {
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
        // A body must arrive as promptly as a head: slow-loris on the body is cut off too.
        .layer(RequestBodyTimeoutLayer::new(limits.header_read_timeout))
        // Browsers: preflights answered here, before authentication (they carry no credential).
        .layer(option_layer(cors(&state.config.cors_origins)))
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
    state
        .metrics
        .set_upstream_backoff(state.upstream.backoff_remaining().as_secs_f64());
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}
