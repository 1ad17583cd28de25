//! The one test harness: the real gateway on 127.0.0.1:0 in front of a wiremock upstream (or any
//! upstream URL), built by [`TestApp::builder`].
//!
//! ```ignore
//! let app = TestApp::builder()
//!     .policy(&[("default.toml", DEFAULT_POLICY), ("team.toml", TEAM)]) // a temporary folder
//!     .limits(ServerLimits { max_in_flight: 2, ..ServerLimits::default() })
//!     .poll(Duration::from_millis(50))
//!     .config(|c| c.cache.ttl = Duration::from_millis(300))
//!     .spawn()
//!     .await;
//! ```
//!
//! Waiting: [`eventually`] polls a condition up to [`PATIENCE`] instead of sleeping for a guessed
//! time; a sleep is left only where the passing of time is what a test is about.
#![allow(dead_code, unreachable_pub, missing_docs)]

pub mod redis;
pub mod redis_cluster;
pub mod redis_tls;
pub mod relay;
pub mod served;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use billing_gateway::auth::mint_hs256;
use billing_gateway::config::{Config, LogFormat};
use billing_gateway::policy::reload::LivePolicy;
use billing_gateway::server::{App, ServerLimits};
use secrecy::SecretString;
use serde_json::{Map, Value, json};
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use wiremock::MockServer;

/// The Scaleway secret key the gateway holds: must never leave except to the upstream.
pub const SECRET_KEY: &str = "5ec7e7ca-fe00-4bad-9000-00000000beef";
pub const ORG: &str = "11111111-2222-3333-4444-555555555555";
pub const OTHER_ORG: &str = "22222222-3333-4444-5555-666666666666";
pub const HS256: &str = "test-hs256-secret-0123456789abcdef";
pub const INVOICE: &str = "7b1e9d40-3c55-4d2e-8f61-0a9b8c7d6e5f";

/// The shipped `policies/default.toml`, to put beside a test's own policy files.
pub const DEFAULT_POLICY: &str = include_str!("../../policies/default.toml");

/// Generous bound for a condition to come about; a test fails past it, it never measures it.
pub const PATIENCE: Duration = Duration::from_secs(10);

pub const SLOW: Duration = Duration::from_secs(3);

/// A running gateway and what a test needs to talk to it.
pub struct TestApp {
    /// `http://127.0.0.1:PORT` (`https://` when TLS is configured).
    pub base: String,
    /// The wiremock upstream. With [`TestAppBuilder::upstream_url`] the gateway calls that URL
    /// instead and this one stays idle.
    pub upstream: MockServer,
    /// Follows no redirects: a test sees exactly what the gateway answered.
    pub client: reqwest::Client,
    shutdown: Option<oneshot::Sender<()>>,
    /// The serving task; completes once shutdown has finished the requests in flight.
    pub handle: Option<JoinHandle<std::io::Result<()>>>,
    addr: SocketAddr,
    policy: Arc<LivePolicy>,
    policy_dir: PathBuf,
    /// The folder [`TestAppBuilder::policy`] wrote, removed when the app is dropped.
    _policy_files: Option<TempDir>,
}

/// The configuration every test starts from: the shipped policy, HS256 tokens signed with
/// [`HS256`], rates high enough never to get in the way, listening on a free port.
pub fn config(upstream: &str) -> Config {
    let mut config = Config::new(
        upstream,
        ORG.parse().expect("uuid"),
        SecretString::from(SECRET_KEY),
    );
    config.listen = "127.0.0.1:0".parse().expect("addr");
    config.policy_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("policies");
    config.auth.hs256_secret = Some(SecretString::from(HS256));
    // Generous rates: only the tests about limits set them low.
    let plenty = billing_gateway::config::Rate {
        count: 10_000,
        per: Duration::from_secs(1),
    };
    config.limits.principal_rate = plenty;
    config.upstream.rate = plenty;
    config
}

enum Policy {
    Shipped,
    Files(Vec<(String, String)>),
    Dir(PathBuf),
}

/// A change to the configuration, made before the app is built.
type ConfigEdit<'a> = Box<dyn FnOnce(&mut Config) + 'a>;

/// Where the access log goes instead of stderr: format, writer, queue capacity.
type AccessLogTo = (LogFormat, Box<dyn std::io::Write + Send>, usize);

/// What [`TestApp::builder`] returns; every setting is optional.
pub struct TestAppBuilder<'a> {
    limits: Option<ServerLimits>,
    policy: Policy,
    poll: Option<Duration>,
    edits: Vec<ConfigEdit<'a>>,
    upstream: Option<MockServer>,
    upstream_url: Option<String>,
    redis: Option<String>,
    access_log: Option<AccessLogTo>,
}

impl<'a> TestAppBuilder<'a> {
    /// The access log's JSON lines go to `writer` (e.g. a [`Captured`]) rather than stderr.
    /// Like any log event, lines are written only when the test's subscriber, set before the
    /// app is built (`tracing::subscriber::set_default`), lets INFO through. `TestApp::stop`
    /// waits until every line is written.
    pub fn access_log(self, writer: impl std::io::Write + Send + 'static) -> Self {
        self.access_log_as(
            LogFormat::Json,
            writer,
            billing_gateway::telemetry::access::DEFAULT_CAPACITY,
        )
    }

    /// [`Self::access_log`] in `format`, with room for `capacity` lines while `writer` is slow.
    pub fn access_log_as(
        mut self,
        format: LogFormat,
        writer: impl std::io::Write + Send + 'static,
        capacity: usize,
    ) -> Self {
        self.access_log = Some((format, Box::new(writer), capacity));
        self
    }

    /// The server's bounds on clients (header size and time, requests in flight, grace).
    pub fn limits(mut self, limits: ServerLimits) -> Self {
        self.limits = Some(limits);
        self
    }

    /// A policy folder of these `(file name, text)` pairs, written to a temporary folder that
    /// the app removes when dropped. Names may have folders (`tests/cases.toml`).
    pub fn policy(mut self, files: &[(&str, &str)]) -> Self {
        self.policy = Policy::Files(
            files
                .iter()
                .map(|(name, text)| ((*name).to_owned(), (*text).to_owned()))
                .collect(),
        );
        self
    }

    /// A policy folder the test made (and removes) itself, e.g. a symbolic link it swaps.
    pub fn policy_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.policy = Policy::Dir(dir.into());
        self
    }

    /// How often the policy folder and the TLS certificate are re-read.
    pub fn poll(mut self, every: Duration) -> Self {
        self.poll = Some(every);
        self
    }

    /// Any other change to the [`config`]; applied in order, after the settings above.
    pub fn config(mut self, edit: impl FnOnce(&mut Config) + 'a) -> Self {
        self.edits.push(Box::new(edit));
        self
    }

    /// Use this wiremock server (e.g. with mocks mounted already) rather than a fresh one.
    pub fn upstream(mut self, upstream: MockServer) -> Self {
        self.upstream = Some(upstream);
        self
    }

    /// Send upstream calls to this URL (a hand-written server wiremock cannot imitate, or a
    /// dead address); `TestApp::upstream` then stays idle.
    pub fn upstream_url(mut self, url: impl Into<String>) -> Self {
        self.upstream_url = Some(url.into());
        self
    }

    /// Share through the Redis at `url` (see [`redis::Redis`]): several apps built with the same
    /// one (and the same `upstream_url`) are replicas of one gateway.
    pub fn redis(mut self, url: impl Into<String>) -> Self {
        self.redis = Some(url.into());
        self
    }

    /// Builds the app and serves it in a task until [`TestApp::shutdown`] (or drop).
    pub async fn spawn(self) -> TestApp {
        let upstream = match self.upstream {
            Some(upstream) => upstream,
            None => MockServer::start().await,
        };
        let mut config = config(self.upstream_url.as_deref().unwrap_or(&upstream.uri()));
        let policy_files = match self.policy {
            Policy::Shipped => None,
            Policy::Dir(dir) => {
                config.policy_dir = dir;
                None
            }
            Policy::Files(files) => {
                let dir = write_policy(&files);
                config.policy_dir = dir.path().to_owned();
                Some(dir)
            }
        };
        config.redis.url = self.redis.map(SecretString::from);
        for edit in self.edits {
            edit(&mut config);
        }
        let scheme = if config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let policy_dir = config.policy_dir.clone();
        let mut app = App::build(config).await.expect("app builds");
        if let Some(limits) = self.limits {
            app = app.with_limits(limits);
        }
        if let Some(every) = self.poll {
            app = app.poll_policy_every(every);
        }
        if let Some((format, writer, capacity)) = self.access_log {
            app = app
                .with_access_log(format, writer, capacity)
                .expect("access log");
        }
        let addr = app.addr().expect("addr");
        let policy = app.policy();
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(app.run_until(async {
            let _ = rx.await;
        }));
        billing_gateway::install_crypto_provider();
        TestApp {
            base: format!("{scheme}://{addr}"),
            upstream,
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("client"),
            shutdown: Some(tx),
            handle: Some(handle),
            addr,
            policy,
            policy_dir,
            _policy_files: policy_files,
        }
    }
}

/// Writes `files` into a new temporary folder.
fn write_policy(files: &[(String, String)]) -> TempDir {
    let dir = tempfile::tempdir().expect("temporary policy folder");
    for (name, text) in files {
        let file = dir.path().join(name);
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent).expect("policy subfolder");
        }
        std::fs::write(&file, text).expect("policy file");
    }
    dir
}

impl TestApp {
    /// Everything at its default: the shipped policy, a fresh wiremock upstream.
    pub fn builder<'a>() -> TestAppBuilder<'a> {
        TestAppBuilder {
            limits: None,
            policy: Policy::Shipped,
            poll: None,
            edits: Vec::new(),
            upstream: None,
            upstream_url: None,
            redis: None,
            access_log: None,
        }
    }

    pub async fn spawn() -> TestApp {
        TestApp::builder().spawn().await
    }

    /// `builder().config(edit).spawn()`.
    pub async fn spawn_with(edit: impl FnOnce(&mut Config)) -> TestApp {
        TestApp::builder().config(edit).spawn().await
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The live policy: what SIGHUP reloads, for reload tests to call and inspect.
    pub fn policy(&self) -> &Arc<LivePolicy> {
        &self.policy
    }

    /// The policy folder the gateway reads (a temporary one with [`TestAppBuilder::policy`]).
    pub fn policy_dir(&self) -> &Path {
        &self.policy_dir
    }

    /// Starts graceful shutdown; `handle` completes when in-flight requests are done.
    pub fn shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Shuts down, waits up to [`PATIENCE`] for a clean exit, and checks that no task of the
    /// app (the policy watcher, say) outlived it: nothing but this handle holds the policy.
    pub async fn stop(mut self) {
        self.shutdown();
        if let Some(handle) = self.handle.take() {
            tokio::time::timeout(PATIENCE, handle)
                .await
                .expect("the server stops")
                .expect("joined")
                .expect("clean exit");
        }
        assert_eq!(
            Arc::strong_count(&self.policy),
            1,
            "something (the policy watcher?) outlived the app"
        );
    }

    pub fn token(&self, roles: &[&str]) -> String {
        let now = jsonwebtoken::get_current_timestamp();
        token_with(json!({"sub": "alice", "roles": roles, "iat": now, "exp": now + 600}))
    }

    pub fn manager(&self) -> String {
        self.token(&["billing-manager"])
    }

    pub fn reader(&self) -> String {
        self.token(&["billing-read-only"])
    }

    pub async fn get(&self, path: &str, token: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{}", self.base, path))
            .bearer_auth(token)
            .send()
            .await
            .expect("request")
    }

    /// The gateway's Prometheus exposition.
    pub async fn metrics(&self) -> String {
        self.client
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .expect("metrics request")
            .text()
            .await
            .expect("metrics text")
    }

    /// Every request wiremock received.
    pub async fn upstream_requests(&self) -> Vec<wiremock::Request> {
        self.upstream.received_requests().await.unwrap_or_default()
    }
}

/// Polls `condition` every few milliseconds until it holds; panics, naming the caller's line,
/// if it still does not after `within` (use [`PATIENCE`]: the bound is a failure, not a
/// measurement, so it can be generous).
#[track_caller]
pub fn eventually<F, Fut>(mut condition: F, within: Duration) -> impl Future<Output = ()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let caller = std::panic::Location::caller();
    async move {
        let deadline = tokio::time::Instant::now() + within;
        while !condition().await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the condition at {caller} did not hold within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A read-only token for subject `sub`.
pub fn reader_as(sub: &str) -> String {
    token_for(sub, "billing-read-only")
}

/// A token for subject `sub` holding `role`.
pub fn token_for(sub: &str, role: &str) -> String {
    let now = jsonwebtoken::get_current_timestamp();
    token_with(json!({"sub": sub, "roles": [role], "iat": now, "exp": now + 600}))
}

/// `count` a second, burst twice that.
pub fn per_second(count: u32) -> billing_gateway::config::Rate {
    billing_gateway::config::Rate {
        count,
        per: Duration::from_secs(1),
    }
}

/// The upstream saw no more than `rate` allows since `since`, an instant taken before the first
/// of these calls was sent: the `k`th arrival (in time order) came at least `k` paces after it,
/// so at most `1 + rate × t` arrived within any `t` from `since`. Cumulative, not per window:
/// a loaded machine only delays an arrival, which this bound allows, where a window would catch
/// a delayed call bunched with the next. `burst` is how many calls may arrive at once (a budget
/// of evenly spaced slots has none); 5 ms is the clocks' granularity.
pub fn assert_paced(
    since: Instant,
    arrivals: &[Instant],
    rate: billing_gateway::config::Rate,
    burst: u32,
) {
    let mut times = arrivals.to_vec();
    times.sort();
    let gaps = || {
        times
            .iter()
            .map(|t| t.duration_since(since).as_millis())
            .collect::<Vec<_>>()
    };
    for (k, at) in times.iter().enumerate() {
        let turns = (k as u32).saturating_sub(burst);
        let earliest = (rate.pace() * turns).saturating_sub(Duration::from_millis(5));
        assert!(
            at.duration_since(since) >= earliest,
            "arrival {k} came {:?} after the start, before {earliest:?}: ms since start {:?}",
            at.duration_since(since),
            gaps()
        );
    }
}

pub fn token_with(claims: Value) -> String {
    let Value::Object(claims) = claims else {
        panic!("claims must be an object")
    };
    mint_hs256(&SecretString::from(HS256), &claims).expect("sign")
}

pub fn claims(extra: Value) -> Map<String, Value> {
    let now = jsonwebtoken::get_current_timestamp();
    let mut m = Map::new();
    m.insert("sub".into(), json!("alice"));
    m.insert("exp".into(), json!(now + 600));
    if let Value::Object(extra) = extra {
        m.extend(extra);
    }
    m
}

/// Asserts the body is Scaleway-shaped JSON with `type` = `kind` and exactly `application/json`.
pub async fn assert_error(response: reqwest::Response, status: u16, kind: &str) -> Value {
    assert_eq!(response.status().as_u16(), status, "status");
    assert_eq!(
        response
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap_or("")),
        Some("application/json")
    );
    let body = response.text().await.expect("body");
    assert!(!body.contains(SECRET_KEY), "secret key in an error body");
    let json: Value = serde_json::from_str(&body).expect("JSON error body");
    assert_eq!(json["type"], kind, "{json}");
    assert!(json["message"].is_string(), "{json}");
    json
}

/// Log lines written by a test's subscriber ([`capture_logs`]) and by the app's access log ([`TestAppBuilder::access_log`]), kept in memory to be searched.
#[derive(Clone, Default)]
pub struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Captured {
    /// Everything written so far.
    pub fn text(&self) -> String {
        String::from_utf8(self.0.lock().expect("lock").clone()).expect("utf-8")
    }

    /// The access log's lines so far, as written (JSON lines, by their target).
    pub fn access_raw(&self) -> Vec<String> {
        self.text()
            .lines()
            .filter(|l| l.contains("\"target\":\"billing_gateway::access\""))
            .map(str::to_owned)
            .collect()
    }

    /// The access log's lines so far, parsed: each must be JSON.
    pub fn access_lines(&self) -> Vec<Value> {
        self.access_raw()
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }
}

/// An app writing its access log (and every other line at `info`) to the returned capture,
/// for as long as the returned guard is held.
pub async fn app_logging() -> (Captured, LogCapture, TestApp) {
    let (captured, logs) = capture_logs("info");
    let app = TestApp::builder()
        .access_log(captured.clone())
        .spawn()
        .await;
    (captured, logs, app)
}

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Keeps the log capture of [`capture_logs`] set for this thread until dropped.
pub struct LogCapture {
    _guard: tracing::subscriber::DefaultGuard,
    _anchor: tracing::Dispatch,
}

/// Sets, for this thread, a subscriber that writes what `filter` (`EnvFilter` directives, e.g.
/// `"info"`, `"trace"`, `"info,billing_gateway::access=warn"`) lets through into the returned
/// [`Captured`] as JSON lines, fields flattened. Use a `current_thread` runtime, so that every
/// task of the app runs on this thread and is seen.
pub fn capture_logs(filter: &str) -> (Captured, LogCapture) {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(move || writer.clone())
        .finish();
    // tracing caches each log site's interest process-wide; with a single dispatcher it asks
    // the registering thread's (tokio-rs/tracing#3611), so a sibling test without a subscriber
    // would silence the site here. A second, always-interested dispatcher avoids that shortcut.
    let anchor = tracing::Dispatch::new(tracing_subscriber::registry());
    let guard = tracing::subscriber::set_default(subscriber);
    tracing::callsite::rebuild_interest_cache();
    (
        captured,
        LogCapture {
            _guard: guard,
            _anchor: anchor,
        },
    )
}

/// Reads one HTTP/1.1 request head off a raw socket, for the hand-written upstreams that
/// wiremock cannot play (slow, dropping, endless); `None` once the peer has closed.
pub async fn read_head(
    stream: &mut (impl tokio::io::AsyncRead + Unpin),
) -> std::io::Result<Option<Vec<u8>>> {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await? == 0 {
            return Ok(None);
        }
        head.push(byte[0]);
    }
    Ok(Some(head))
}

/// The value of the series `name{labels}` in a Prometheus exposition.
pub fn value(exposition: &str, name: &str, labels: &str) -> Option<f64> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            l.split([' ', '{']).next() == Some(name)
                && l.split(' ')
                    .next()
                    .is_some_and(|head| head.contains(labels))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A 200 with `body` as its JSON, the way the upstream answers.
pub fn ok_json(body: Value) -> wiremock::ResponseTemplate {
    wiremock::ResponseTemplate::new(200).set_body_raw(body.to_string(), "application/json")
}

/// A consumption list whose one product is named `marker`, so a test tells answers apart.
pub fn consumptions(marker: &str) -> wiremock::ResponseTemplate {
    ok_json(json!({"consumptions": [{"product_name": marker}], "total_count": 1}))
}

/// A response header as text (empty when absent).
pub fn header(r: &reqwest::Response, name: &str) -> String {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

/// Sends distinct (uncached) queries to `app` as `token`, one every `every`, each in its own
/// task (so a waiting call does not slow the driver), until `stop`: the statuses answered.
pub fn drive(
    app: &TestApp,
    token: String,
    every: Duration,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<Vec<u16>> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let (client, base) = (app.client.clone(), app.base.clone());
    tokio::spawn(async move {
        let mut calls = Vec::new();
        let mut tick = tokio::time::interval(every);
        while !stop.load(Ordering::SeqCst) {
            tick.tick().await;
            let n = NEXT.fetch_add(1, Ordering::SeqCst);
            let request = client
                .get(format!("{base}/billing/v2beta1/charges?page_token={n}"))
                .bearer_auth(token.clone());
            calls.push(tokio::spawn(async move {
                request.send().await.expect("request").status().as_u16()
            }));
        }
        let mut statuses = Vec::new();
        for call in calls {
            statuses.push(call.await.expect("call"));
        }
        statuses
    })
}

/// Sends a request head announcing a 2-byte body with `Expect: 100-continue`, and the body only
/// if the gateway answers `100 Continue`. Returns the status lines received, in order.
pub async fn expect_continue(base: &str, verb: &str, target: &str, auth: &str) -> Vec<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "{verb} {target} HTTP/1.1\r\nHost: {addr}\r\n{auth}\r\nContent-Type: application/json\r\n\
         Content-Length: 2\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.expect("write");
    let mut statuses = Vec::new();
    let mut received = Vec::new();
    loop {
        // Up to the end of one answer's head.
        while !received.windows(4).any(|w| w == b"\r\n\r\n") {
            let mut buf = [0u8; 1024];
            let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
                .await
                .expect("the gateway answers")
                .expect("read");
            assert!(n > 0, "closed without an answer after {statuses:?}");
            received.extend_from_slice(&buf[..n]);
        }
        let end = received
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a head")
            + 4;
        let head = String::from_utf8_lossy(&received[..end]).into_owned();
        received.drain(..end);
        statuses.push(head.lines().next().unwrap_or("").to_owned());
        if head.starts_with("HTTP/1.1 100") {
            stream.write_all(b"{}").await.expect("write the body");
        } else {
            return statuses;
        }
    }
}
