//! The assembled service: [`App::build`] binds the listener (port 0 allowed) and wires the
//! route table and middleware; [`App::run_until`] runs the accept loop until shutdown, finishing
//! in-flight requests within a grace period.
//!
//! The accept loop is hyper's own connection builder rather than `axum::serve`, for the bounds
//! [`ServerLimits`] puts on hostile or broken clients: header size, header read time, requests
//! in flight, connections open and idle (`connections`).

mod accept;
mod connections;
mod layer;
pub mod openapi;
mod probes;
mod router;
mod routes;
pub mod tls;

use accept::serve;
use connections::Connections;
use router::{metrics_router, router};

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;

use crate::auth::Authenticator;
use crate::cache::Cache;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::config::LogFormat;
use crate::limits::PrincipalLimits;
use crate::policy::reload::{self, LivePolicy};
use crate::server::tls::Tls;
use crate::state::{AppState, Services};
use crate::telemetry::{self, AccessLog, Metrics};
use crate::upstream::Upstream;

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
    /// The configuration cannot authenticate anyone.
    #[error("{0}")]
    Config(crate::config::Problem),
    /// The Redis link could not be set up.
    #[error("{0}")]
    Cluster(String),
    /// The access log's writer thread could not start.
    #[error("cannot start the access log: {0}")]
    AccessLog(std::io::Error),
    /// The upstream client could not be built.
    #[error("{0}")]
    Upstream(crate::error::Error),
    /// The TLS certificate or key could not be loaded.
    #[error("TLS: {0}")]
    Tls(String),
    /// The authenticator could not start.
    #[error("{0}")]
    Auth(crate::error::Error),
}

/// The bounds the server puts on clients, so a hostile or broken one cannot exhaust it.
/// [`Default`] is what `serve` runs with; [`App::with_limits`] sets others.
///
/// Request heads: the gateway answers JSON `414` past `max_uri_bytes` and JSON `431` past
/// `max_header_bytes` or `max_headers`. hyper's own, bare answers only come past hard caps set
/// well above those: a whole head over twice `max_header_bytes + max_uri_bytes` (`431`), more
/// than `max_header_bytes / 4` header fields (`431`: 8,192 by default), or a request target of
/// 64 KiB or more over HTTP/1.1 (`414`, hyper's fixed limit).
///
/// Places in flight: an authenticated request holds one from the moment its caller is known and
/// allowed until its answer is given, or, for an upstream body relayed as it comes, until the
/// client has taken it (or taken nothing for `idle_write_timeout`).
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    /// Most bytes of request headers answered normally; more is a JSON 431.
    pub max_header_bytes: usize,
    /// Most request header fields answered normally; more is a JSON 431.
    pub max_headers: usize,
    /// Most bytes of request target (path and query) answered normally; more is a JSON 414.
    pub max_uri_bytes: usize,
    /// How long a client may take to send a request head (a slow-loris defence); an idle
    /// keep-alive connection is closed after it too.
    pub header_read_timeout: Duration,
    /// How long a client may take to send a whole request body, however it paces it: a body
    /// trickled a byte at a time is cut off with a 408 as surely as one that stalls.
    pub body_deadline: Duration,
    /// Authenticated requests handled at once, relayed upstream bodies included; past it new
    /// ones are answered 503 at once rather than queued without bound, and `/readyz` is 503.
    pub max_in_flight: usize,
    /// How many of those one principal (JWT subject or gateway key) may hold; past it, 429.
    pub max_in_flight_per_principal: usize,
    /// Credential checks that may wait at once (for the identity provider's keys); past it,
    /// 503. They never take a place of `max_in_flight`.
    pub max_unauthenticated: usize,
    /// Requests one HTTP/2 connection may have open at once (`SETTINGS_MAX_CONCURRENT_STREAMS`).
    pub max_streams_per_connection: u32,
    /// How long a client may take nothing of an answer (a reader that stopped reading, a shut
    /// HTTP/2 window) before the answer is cut off, its upstream connection closed and its
    /// place given back. Applies to every write on a connection too.
    pub idle_write_timeout: Duration,
    /// How long in-flight requests (downloads included) may take to finish once shutdown begins.
    pub shutdown_grace: Duration,
    /// Most client connections open at once (`GATEWAY_MAX_CONNECTIONS`); at the bound the
    /// longest-idle ones are closed to admit new ones. Keep it below the open-files limit.
    pub max_connections: usize,
    /// How long a connection with no request in progress stays open (`GATEWAY_IDLE_TIMEOUT`),
    /// shortened as connections approach `max_connections`.
    pub idle_timeout: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            // Enough for any JWT an IdP issues, a few times over.
            max_header_bytes: 32 * 1024,
            // An SDK sends under 20; browsers and proxies add a few dozen at most.
            max_headers: 100,
            // Room for a charges query naming over 150 projects (49 bytes each).
            max_uri_bytes: 8 * 1024,
            header_read_timeout: Duration::from_secs(10),
            body_deadline: Duration::from_secs(10),
            max_in_flight: 1024,
            // Above the default principal rate's burst (50 at once), a sixteenth of the bound.
            max_in_flight_per_principal: 64,
            // Only checks waiting for the identity provider's keys hold one, for the fetch.
            max_unauthenticated: 64,
            max_streams_per_connection: 32,
            idle_write_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(30),
            max_connections: connections::default_max_connections(
                rlimit::Resource::NOFILE
                    .get()
                    .map_or(1024, |(soft, _)| soft),
            ),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// A bound, ready-to-run gateway.
pub struct App {
    listener: TcpListener,
    /// `/metrics`'s own listener, when `GATEWAY_METRICS_LISTEN` is set.
    metrics_listener: Option<TcpListener>,
    state: AppState,
    policy_poll: Duration,
    limits: ServerLimits,
    tls: Option<Arc<Tls>>,
    cors_origins: Vec<String>,
    /// Where each request's log line goes (stderr unless [`App::with_access_log`] says).
    log: AccessLog,
    /// Taken when the app is built, so SIGHUP never ends a gateway that has announced itself.
    hangup: reload::Hangup,
}

impl App {
    /// Loads the policy folder and builds the gateway; the folder is re-read while it runs.
    pub async fn build(config: Config) -> Result<App, StartError> {
        let policy = LivePolicy::load_dir(&config.policy_dir)?;
        App::assemble(config, policy).await
    }

    /// Builds the gateway with a policy loaded by the caller, reloaded as it says (`demo`: the
    /// folder plus its in-memory SDK key).
    pub async fn with_live_policy(config: Config, policy: LivePolicy) -> Result<App, StartError> {
        App::assemble(config, policy).await
    }

    /// Takes the configuration by value and keeps none of it whole: the secret key ends up only
    /// in the upstream client, the HS256 secret only in the authenticator, and `config` (with
    /// its `SecretString`s) is dropped when this returns.
    async fn assemble(config: Config, policy: LivePolicy) -> Result<App, StartError> {
        config
            .require_authentication(policy.load().has_keys())
            .map_err(StartError::Config)?;
        let metrics = Arc::new(Metrics::default());
        metrics.set_upstream_budget(1.0 / config.upstream.rate.pace().as_secs_f64());
        let cluster = match config.redis.url {
            Some(_) => Some(
                Cluster::new(
                    &config.redis,
                    config.upstream.organization_id,
                    metrics.clone(),
                )
                .map_err(StartError::Cluster)?,
            ),
            None => None,
        };
        policy.report_to(metrics.policy_reload());
        let log = AccessLog::spawn(
            telemetry::log_format(config.log_format),
            std::io::stderr(),
            telemetry::access::DEFAULT_CAPACITY,
            metrics.log_lines_dropped(),
        )
        .map_err(StartError::AccessLog)?;
        let upstream = Upstream::new(&config.upstream, metrics.clone(), cluster.clone())
            .map_err(StartError::Upstream)?;
        let tls = match &config.tls {
            Some(files) => Some(Arc::new(
                Tls::load(&files.cert, &files.key).map_err(StartError::Tls)?,
            )),
            None => None,
        };
        let listener = listen(config.listen).map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
        let metrics_listener = match config.metrics_listen {
            Some(addr) => Some(listen(addr).map_err(|source| StartError::Bind { addr, source })?),
            None => None,
        };
        let state = Arc::new(Services {
            auth: Authenticator::start_reporting(&config.auth, metrics.jwks_fetch())
                .await
                .map_err(StartError::Auth)?,
            cache: {
                let cache = Cache::new(&config.cache, metrics.clone());
                match &cluster {
                    Some(cluster) => cache.shared(
                        cluster.clone(),
                        upstream.shared_turns(),
                        config.upstream.timeout,
                        &config.upstream.secret_key,
                        config.upstream.organization_id,
                    ),
                    None => cache,
                }
            },
            limits: match &cluster {
                Some(cluster) => {
                    PrincipalLimits::shared(config.limits.principal_rate, cluster.clone())
                }
                None => PrincipalLimits::new(config.limits.principal_rate),
            },
            organization_id: config.upstream.organization_id,
            policy: Arc::new(policy),
            upstream,
            cluster,
            metrics,
            draining: AtomicBool::new(false),
        });
        Ok(App {
            listener,
            metrics_listener,
            state,
            policy_poll: reload::DEFAULT_POLL,
            limits: ServerLimits {
                max_connections: connections::bound(config.limits.max_connections),
                idle_timeout: config.limits.idle_timeout,
                ..ServerLimits::default()
            },
            tls,
            cors_origins: config.cors_origins,
            log,
            hangup: reload::Hangup::listen(),
        })
    }

    /// How often the policy folder and the TLS certificate files are re-read: the longest an
    /// edit waits to take effect (SIGHUP applies one at once whatever this is). The default,
    /// [`reload::DEFAULT_POLL`], is what `serve` runs with; a program embedding the gateway that
    /// needs edits seen sooner, or fewer reads of a slow volume, sets its own.
    pub fn poll_policy_every(mut self, every: Duration) -> App {
        self.policy_poll = every;
        self
    }

    /// The policy in force, shared with the running app: [`LivePolicy::reload`] on it re-reads
    /// the folder at once, exactly as SIGHUP does, for a program embedding the gateway that
    /// triggers reloads its own way (a deploy hook, an admin command); [`LivePolicy::load`]
    /// shows what is being enforced.
    pub fn policy(&self) -> Arc<LivePolicy> {
        self.state.policy.clone()
    }

    /// Replaces the server's bounds on clients (default: [`ServerLimits::default`]).
    pub fn with_limits(mut self, limits: ServerLimits) -> App {
        self.limits = limits;
        self
    }

    /// Writes the access log to `writer` instead of stderr, in `format`, with room for
    /// `capacity` lines waiting while the writer is slow (past that, lines are dropped and
    /// counted).
    pub fn with_access_log(
        mut self,
        format: LogFormat,
        writer: impl std::io::Write + Send + 'static,
        capacity: usize,
    ) -> std::io::Result<App> {
        self.log = AccessLog::spawn(
            format,
            writer,
            capacity,
            self.state.metrics.log_lines_dropped(),
        )?;
        Ok(self)
    }

    /// The bound address (the real port when 0 was asked).
    pub fn addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Where `/metrics` is served when it has a listener of its own (the real port when 0 was
    /// asked); `None`: on the main listener.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// Serves until `shutdown` completes, then stops accepting, turns `/readyz` 503 and lets
    /// in-flight requests (downloads included) finish within the grace period.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let App {
            listener,
            metrics_listener,
            state,
            policy_poll,
            limits,
            tls,
            cors_origins,
            log,
            hangup,
        } = self;
        let router = router(
            state.clone(),
            &limits,
            &cors_origins,
            log.clone(),
            metrics_listener.is_none(),
        );
        let connections = Arc::new(Connections::new(
            limits.max_connections,
            limits.idle_timeout,
            state.metrics.connections(),
        ));
        // The metrics listener is for Prometheus inside the pod network: plain axum, outside the
        // client connection bound.
        let scrapes = async {
            match metrics_listener {
                Some(listener) => {
                    if let Err(e) = axum::serve(listener, metrics_router(state.clone())).await {
                        tracing::error!(error = %e, "the metrics listener stopped");
                    }
                    std::future::pending().await
                }
                None => std::future::pending().await,
            }
        };
        let certificate = async {
            match &tls {
                Some(tls) => tls.watch(policy_poll).await,
                None => std::future::pending().await,
            }
        };
        let cluster = async {
            match &state.cluster {
                Some(cluster) => cluster.clone().run().await,
                None => std::future::pending().await,
            }
        };
        // The watchers live exactly as long as the accept loop: no task outlives the app.
        tokio::select! {
            () = serve(listener, router, &limits, tls.clone(), &connections, shutdown) => {}
            never = reload::watch(state.policy.clone(), policy_poll, hangup) => match never {},
            never = certificate => match never {},
            never = cluster => match never {},
            never = state.cache.follow_purges() => match never {},
            never = scrapes => match never {},
        }

        state.draining.store(true, Ordering::SeqCst);
        tracing::info!(
            connections = connections.count(),
            "shutting down: finishing in-flight requests"
        );
        tokio::select! {
            () = connections.shutdown() => tracing::info!("all requests finished"),
            () = tokio::time::sleep(limits.shutdown_grace) => {
                tracing::warn!("grace period over: closing the connections still open");
            }
        }
        log.flush().await;
        Ok(())
    }
}

/// Connections the kernel completes and queues while the accept loop catches up (its cap is
/// `net.core.somaxconn`). The standard library's and tokio's 128 overflowed under a flood of
/// connections: past it the kernel drops handshakes, and a fresh caller's connection waited
/// for its SYN to be retransmitted (1, 3, 7, 15 s) in a lottery against the flood's, up to 20 s
/// in the connection tests. Queued, it is accepted in turn, as fast as room is made.
const BACKLOG: u32 = 1024;

/// A listener on `addr` with a listen backlog of [`BACKLOG`].
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    // As `TcpListener::bind`: a restarted gateway binds at once, whatever is in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Past its backlog the kernel drops handshakes: with the usual 128, the 130th connection
    /// to a listener that accepts nothing hangs. With [`BACKLOG`], 300 are all queued.
    #[tokio::test]
    async fn the_listen_backlog_queues_a_flood_the_usual_128_would_drop() {
        let listener = listen(SocketAddr::from(([127, 0, 0, 1], 0))).expect("a listener");
        let addr = listener.local_addr().expect("its address");
        let mut queued = Vec::new();
        for _ in 0..300 {
            // A guard, not a measure: a dropped handshake is retried after a second.
            let connect = tokio::net::TcpStream::connect(addr);
            match tokio::time::timeout(Duration::from_secs(3), connect).await {
                Ok(Ok(stream)) => queued.push(stream),
                _ => break,
            }
        }
        assert_eq!(queued.len(), 300);
    }
}
