//! The one way out to the Billing API: a pooled reqwest client with a fixed base URL, the secret
//! key injected last, an allowlist of headers, no redirects and a whole-request timeout
//! (contract §6).
//!
//! Every call spends the shared upstream budget ([`UpstreamBudget`]), waiting calls taking turns
//! fairly between principals ([`FairQueue`]); none is made while backing off after an upstream
//! 429, and idempotent GETs are retried on connection errors, 502 and 503.
//!
//! Requests are built from a validated [`Call`] only; nothing of the caller's request (headers,
//! body, raw query) is copied. The key lives in a header value marked sensitive, so it prints as
//! `Sensitive` in any `Debug` output.

mod answer;
mod budget;
mod fair;
mod pace;
mod shared;

pub use answer::{Answer, Content, Unread};
pub use budget::{Caller, Turns, UPSTREAM_MAX_WAIT, UpstreamBudget};
pub use fair::{BacklogFull, FairQueue, Ticket};
pub use pace::{Backoff, Pace};
pub use shared::{Ask, SharedTurns, TURN_LUA};

use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use reqwest::redirect;
use secrecy::ExposeSecret;
use tokio::time::Instant;

use crate::billing::{Call, Method};
use crate::cluster::Cluster;
use crate::config::UpstreamConfig;
use crate::error::retry_after_secs;
use crate::error::{Error, Throttle};
use crate::telemetry::{Metrics, trace};

/// Retries of an idempotent GET after a connection error, a 502 or a 503 (so three attempts at
/// most). A POST (coupon redemption) is never retried: it might have been applied.
pub const MAX_RETRIES: u32 = 2;

/// The pause before the first retry; it doubles for the next, each jittered down to half so
/// that callers failing together do not retry together.
pub const RETRY_BASE: Duration = Duration::from_millis(100);

/// The upstream client. Cheap to share: one connection pool, one budget and one backoff for
/// all requests.
pub struct Upstream {
    client: reqwest::Client,
    base: String,
    key: HeaderValue,
    timeout: Duration,
    budget: UpstreamBudget,
    backoff: Arc<Backoff>,
    metrics: Arc<Metrics>,
}

static USER_AGENT: &str = concat!("billing-gateway/", env!("CARGO_PKG_VERSION"));

/// What one attempt came to, before the answer is judged.
type Attempt = Result<reqwest::Response, Error>;

impl Upstream {
    /// Builds the client, its budget and backoff shared with the other replicas through
    /// `cluster` when there is one; fails only on a key that is not a valid header value.
    pub fn new(
        cfg: &UpstreamConfig,
        metrics: Arc<Metrics>,
        cluster: Option<Arc<Cluster>>,
    ) -> Result<Upstream, Error> {
        crate::crypto::install_crypto_provider();
        let client = reqwest::Client::builder()
            // The key goes to the configured upstream and nowhere else: no proxy from the
            // environment (HTTP_PROXY, ALL_PROXY) sees it.
            .no_proxy()
            .redirect(redirect::Policy::none())
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout.min(std::time::Duration::from_secs(10)))
            .pool_idle_timeout(std::time::Duration::from_secs(60))
            .user_agent(USER_AGENT)
            .build()
            .map_err(|e| Error::Internal(format!("cannot build the upstream client: {e}")))?;
        let mut key = HeaderValue::from_str(cfg.secret_key.expose_secret())
            .map_err(|_| Error::Internal("the secret key is not a valid header value".into()))?;
        key.set_sensitive(true);
        let backoff = Arc::new(Backoff::default());
        let budget = match cluster {
            Some(cluster) => {
                UpstreamBudget::shared(cfg.rate, UPSTREAM_MAX_WAIT, cluster, backoff.clone())
            }
            None => UpstreamBudget::new(cfg.rate, UPSTREAM_MAX_WAIT),
        };
        Ok(Upstream {
            client,
            base: cfg.url.clone(),
            key,
            timeout: cfg.timeout,
            budget,
            backoff,
            metrics,
        })
    }

    /// Time left before the upstream is called again after a 429 (zero when not backing off).
    pub fn backoff_remaining(&self) -> Duration {
        self.backoff.remaining()
    }

    /// The calls per second this replica allows itself while it cannot share through Redis (0
    /// while it shares, or runs alone by configuration).
    pub fn degraded_rate(&self) -> f64 {
        self.budget
            .shared_turns()
            .map_or(0.0, |turns| turns.degraded_rate())
    }

    /// The budget's turns when they are shared: a cache lookup may reserve one with its fill
    /// lease.
    pub fn shared_turns(&self) -> Option<Arc<SharedTurns>> {
        self.budget.shared_turns().cloned()
    }

    /// How many principals have calls waiting for a turn in the budget.
    pub fn waiting_principals(&self) -> usize {
        self.budget.waiting_principals()
    }

    /// Sends `call` for `caller` and returns the upstream's answer.
    ///
    /// Every attempt waits its turn in the upstream budget, taking turns with other principals'
    /// calls (a retry keeps its place at the front of its principal's backlog); none is made while backing off after
    /// an upstream 429 (both answer 429 with `Retry-After`, which a cache may answer with a stale
    /// entry instead). A GET is retried on a connection error, a 502 or a 503, within the
    /// request's timeout. Redirects and 429s are turned into errors here, so no caller can
    /// follow or relay them. An error answer comes back read whole (bounded) and scrubbed of the
    /// secret key ([`Answer`]), which never leaves this module otherwise.
    pub async fn send(
        &self,
        call: &Call,
        request_id: &str,
        caller: Caller<'_>,
    ) -> Result<Answer, Error> {
        let response = self.exchange(call, request_id, caller).await?;
        Answer::new(response, self.key.as_bytes()).await
    }

    /// The attempts of [`Upstream::send`], up to the judged answer with its body unread.
    async fn exchange(
        &self,
        call: &Call,
        request_id: &str,
        caller: Caller<'_>,
    ) -> Result<reqwest::Response, Error> {
        let deadline = Instant::now() + self.timeout;
        let retries = if call.op.method == Method::Get {
            MAX_RETRIES
        } else {
            0
        };
        let mut last: Option<Attempt> = None;
        for attempt in 0..=retries {
            if attempt > 0 {
                let pause = RETRY_BASE
                    .saturating_mul(1 << (attempt - 1))
                    .mul_f64(rand::random_range(0.5..1.0));
                if Instant::now() + pause >= deadline {
                    break;
                }
                tokio::time::sleep(pause).await;
            }
            let waited = match self.take_turn(deadline, caller, attempt > 0).await {
                Ok(waited) => waited,
                // A retry that cannot have its turn gives the caller the answer already had.
                Err(e) => return self.judge(last.unwrap_or(Err(e))).await,
            };
            self.metrics
                .observe_budget_wait(caller.class, waited.as_secs_f64());
            if attempt > 0 {
                self.metrics.count_retry(call.op.name);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let outcome = self.attempt(call, request_id, caller.class, left).await;
            let retryable = match &outcome {
                Ok(response) => matches!(
                    response.status(),
                    StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE
                ),
                Err(e) => matches!(e, Error::BadGateway(_)),
            };
            last = Some(outcome);
            if !retryable {
                break;
            }
        }
        self.judge(last.unwrap_or(Err(Error::GatewayTimeout))).await
    }

    /// Waits for this call's turn in the budget, unless the gateway is backing off (checked
    /// again after the wait: a 429 may have come back meanwhile).
    async fn take_turn(
        &self,
        deadline: Instant,
        caller: Caller<'_>,
        retry: bool,
    ) -> Result<Duration, Error> {
        self.backoff.check()?;
        let left = deadline.saturating_duration_since(Instant::now());
        let class = caller.class;
        let waited = self
            .budget
            .acquire(caller, retry, left)
            .await
            .inspect_err(|_| {
                self.metrics.count_class_refusal("upstream_budget", class);
            })?;
        self.backoff.check()?;
        Ok(waited)
    }

    /// One request to the upstream for a caller of `class`, within `timeout`.
    async fn attempt(
        &self,
        call: &Call,
        request_id: &str,
        class: &str,
        timeout: Duration,
    ) -> Attempt {
        if timeout.is_zero() {
            return Err(Error::GatewayTimeout);
        }
        let mut url = format!("{}{}", self.base, call.path());
        if !call.query.is_empty() {
            url.push('?');
            call.write_query(&mut url);
        }
        let method = match call.op.method {
            Method::Get => reqwest::Method::GET,
            Method::Post => reqwest::Method::POST,
        };
        let accept = if call.wants_raw_file() {
            HeaderValue::from_static("*/*")
        } else {
            HeaderValue::from_static("application/json")
        };
        let span = trace::upstream_span(call.op.name, method.as_str());
        let mut request = self
            .client
            .request(method, url)
            .timeout(timeout)
            .header(header::ACCEPT, accept)
            .header("x-request-id", request_id);
        // The request's trace, with this call as the parent (telemetry::trace).
        if let Some((traceparent, tracestate)) = trace::outgoing(&span) {
            request = request.header(&trace::TRACEPARENT, traceparent);
            if let Some(tracestate) = tracestate {
                request = request.header(&trace::TRACESTATE, tracestate);
            }
        }
        // Injected last so no earlier header, however built, can displace it.
        request = request.header("x-auth-token", self.key.clone());
        let started = Instant::now();
        self.metrics.count_class_call(class);
        let outcome = request.send().await;
        let status = outcome.as_ref().map_or(0, |r| r.status().as_u16());
        trace::record_upstream(&span, status);
        // Per attempt, without the budget wait: what the upstream itself takes.
        self.metrics
            .observe_upstream(call.op.name, status, started.elapsed().as_secs_f64());
        outcome.map_err(|e| {
            // reqwest's Display names the URL, never the headers: safe to log.
            // A connect timeout is unreachable (502, retried), not slow (504).
            if e.is_timeout() && !e.is_connect() {
                Error::GatewayTimeout
            } else {
                Error::BadGateway(error_chain(&e.without_url()))
            }
        })
    }

    /// Turns the last attempt into the caller's answer, and lets a 429 start the backoff.
    async fn judge(&self, outcome: Attempt) -> Result<reqwest::Response, Error> {
        let response = outcome?;
        let status = response.status();
        if status == StatusCode::TOO_MANY_REQUESTS {
            let retry_after = response
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(|s| Duration::from_secs(s.max(1)));
            // Every replica backs off (alone when Redis cannot be asked).
            let shared = match self.budget.shared_turns() {
                Some(shared) => shared.note_backoff(retry_after).await,
                None => None,
            };
            let delay = match shared {
                Some(delay) => delay,
                None => self.backoff.rate_limited(retry_after),
            };
            tracing::warn!(
                backoff_ms = delay.as_millis() as u64,
                "the upstream answered 429: not calling it meanwhile"
            );
            return Err(Error::TooManyRequests {
                retry_after: retry_after_secs(delay),
                reason: Throttle::Upstream,
            });
        }
        if self.backoff.succeeded()
            && let Some(shared) = self.budget.shared_turns()
        {
            shared.reset_backoff().await;
        }
        if status.is_redirection() {
            return Err(Error::BadGateway(format!(
                "the upstream answered {status} (a redirect); redirects are never followed"
            )));
        }
        Ok(response)
    }
}

/// The error and its causes on one line ("connection refused" is only in the source chain).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}
