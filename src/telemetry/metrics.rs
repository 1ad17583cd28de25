//! The gateway's Prometheus metrics, in a per-app registry (not a process-wide recorder), so
//! tests can run many apps in one process and read each one's numbers.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::error::{Error, Throttle};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    operation: &'static str,
    status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    operation: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabels {
    mode: &'static str,
}

/// How a source the gateway re-reads while it runs (the policy folder, the identity provider's
/// keys) is doing: when it was last read and found good, and how many reads failed. The alerts
/// on a source that stopped refreshing are written against these two series.
#[derive(Debug, Clone, Default)]
pub struct SourceHealth {
    last_success: Gauge<f64, std::sync::atomic::AtomicU64>,
    failures: Counter,
}

impl SourceHealth {
    /// The source was read and found good just now.
    pub fn succeeded(&self) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        self.last_success.set(now.as_secs_f64());
    }

    /// A read of the source failed (what was held before stays in force).
    pub fn failed(&self) {
        self.failures.inc();
    }

    fn register(&self, registry: &mut Registry, name: &str, what: &str) {
        registry.register_with_unit(
            format!("{name}_last_success_timestamp"),
            format!("When {what} was last read and found good (Unix time; 0: never)"),
            prometheus_client::registry::Unit::Seconds,
            self.last_success.clone(),
        );
        registry.register(
            format!("{name}_failures"),
            format!("Reads of {what} that failed; what was held before stays in force"),
            self.failures.clone(),
        );
    }
}

type HistogramFamily = Family<OperationLabels, Histogram, fn() -> Histogram>;

/// The gateway's Prometheus metrics.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    rejections: Family<ReasonLabels, Counter>,
    upstream_duration: HistogramFamily,
    upstream_calls: Family<RequestLabels, Counter>,
    cache_results: Family<ResultLabels, Counter>,
    cache_entries: Gauge,
    cache_bytes: Gauge,
    upstream_retries: Family<OperationLabels, Counter>,
    budget_wait: Histogram,
    backoff: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Requests being handled, streaming answers included; the load-shedding bound applies to it.
    pub(crate) in_flight: Gauge,
    budget_rate: Gauge<f64, std::sync::atomic::AtomicU64>,
    policy_reload: SourceHealth,
    jwks_fetch: SourceHealth,
    redis_configured: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("billing_gateway");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by Billing operation (or gateway endpoint) and status",
            requests.clone(),
        );
        let rejections = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "rejections",
            "Requests the gateway answered itself with an error, by reason",
            rejections.clone(),
        );
        let upstream_calls = Family::<RequestLabels, Counter>::default();
        registry.register(
            "upstream_calls",
            "Calls sent to the Billing API (retries included), by operation and answer status; \
             status 0: no answer (timeout, connection refused)",
            upstream_calls.clone(),
        );
        let upstream_duration: HistogramFamily =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.005, 2.0, 12)));
        registry.register_with_unit(
            "upstream_duration",
            "Time to the upstream's response headers, by operation",
            prometheus_client::registry::Unit::Seconds,
            upstream_duration.clone(),
        );
        let cache_results = Family::<ResultLabels, Counter>::default();
        registry.register(
            "cache_requests",
            "Cacheable requests by how the cache answered: hit, stored, coalesced (waited for \
             another request's fetch), stale (served while the upstream failed), miss (not stored)",
            cache_results.clone(),
        );
        let cache_entries = Gauge::default();
        registry.register(
            "cache_entries",
            "Answers held in the cache",
            cache_entries.clone(),
        );
        let cache_bytes = Gauge::default();
        registry.register_with_unit(
            "cache_size",
            "Body and key bytes held in the cache",
            prometheus_client::registry::Unit::Bytes,
            cache_bytes.clone(),
        );
        let upstream_retries = Family::<OperationLabels, Counter>::default();
        registry.register(
            "upstream_retries",
            "Upstream calls retried after a connection error, 502 or 503, by operation",
            upstream_retries.clone(),
        );
        let budget_wait = Histogram::new(exponential_buckets(0.001, 2.0, 12));
        registry.register_with_unit(
            "upstream_budget_wait",
            "Time upstream calls waited for their turn in the upstream budget",
            prometheus_client::registry::Unit::Seconds,
            budget_wait.clone(),
        );
        let backoff = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register_with_unit(
            "upstream_backoff",
            "Time left before the upstream is called again after it answered 429 (0: not backing off)",
            prometheus_client::registry::Unit::Seconds,
            backoff.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "requests_in_flight",
            "Billing and whoami requests being handled, streaming answers included",
            in_flight.clone(),
        );
        let budget_rate = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "upstream_budget_calls_per_second",
            "The upstream budget: calls per second all callers together may send upstream \
             (GATEWAY_UPSTREAM_RATE)",
            budget_rate.clone(),
        );
        let policy_reload = SourceHealth::default();
        policy_reload.register(
            &mut registry,
            "policy_reload",
            "the policy folder (every poll and SIGHUP)",
        );
        let jwks_fetch = SourceHealth::default();
        jwks_fetch.register(
            &mut registry,
            "jwks_fetch",
            "the identity provider's keys (JWKS)",
        );
        let redis_configured = Gauge::default();
        registry.register(
            "redis_configured",
            "1 when GATEWAY_REDIS_URL is set: the replicas are meant to share limits and cache",
            redis_configured.clone(),
        );
        let sharing_mode = Family::<ModeLabels, Gauge>::default();
        registry.register(
            "sharing_mode",
            "1 for how this replica keeps its limits and cache: `local` (its own memory; \
             sharing through Redis is not implemented yet)",
            sharing_mode.clone(),
        );
        sharing_mode
            .get_or_create(&ModeLabels { mode: "local" })
            .set(1);
        // The refusals and cache answers the shipped alerts and dashboard watch start at 0: a
        // series born at 1 shows no `increase()`, so a first refusal would go unseen.
        for reason in [
            Throttle::Principal,
            Throttle::UpstreamBudget,
            Throttle::UpstreamBackoff,
            Throttle::Upstream,
        ]
        .map(|reason| Error::TooManyRequests {
            retry_after: 0,
            reason,
        })
        .iter()
        .chain([&Error::Overloaded])
        .map(Error::kind)
        {
            let _ = rejections.get_or_create(&ReasonLabels { reason });
        }
        for result in ["hit", "stored", "coalesced", "stale", "miss"] {
            let _ = cache_results.get_or_create(&ResultLabels { result });
        }
        Metrics {
            registry,
            requests,
            rejections,
            upstream_duration,
            upstream_calls,
            cache_results,
            cache_entries,
            cache_bytes,
            upstream_retries,
            budget_wait,
            backoff,
            in_flight,
            budget_rate,
            policy_reload,
            jwks_fetch,
            redis_configured,
        }
    }
}

impl Metrics {
    /// Records one answered request, and why it was refused when it was.
    pub fn request_done(
        &self,
        operation: &'static str,
        status: u16,
        rejection: Option<&'static str>,
    ) {
        self.requests
            .get_or_create(&RequestLabels { operation, status })
            .inc();
        if let Some(reason) = rejection {
            self.rejections
                .get_or_create(&ReasonLabels { reason })
                .inc();
        }
    }

    /// Records one upstream call: its answer's status (0: none — timeout, refused) and the time
    /// to its response headers.
    pub fn observe_upstream(&self, operation: &'static str, status: u16, seconds: f64) {
        self.upstream_calls
            .get_or_create(&RequestLabels { operation, status })
            .inc();
        self.upstream_duration
            .get_or_create(&OperationLabels { operation })
            .observe(seconds);
    }

    /// Counts one cacheable request by how the cache answered it.
    pub fn cache_result(&self, result: &'static str) {
        self.cache_results
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// Records what the cache holds (read when metrics are scraped).
    pub fn cache_size(&self, entries: u64, bytes: u64) {
        self.cache_entries
            .set(i64::try_from(entries).unwrap_or(i64::MAX));
        self.cache_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// Records how long an upstream call waited for its turn in the budget (0 when it had it at
    /// once), so operators see the budget binding before callers see 429s.
    pub fn observe_budget_wait(&self, seconds: f64) {
        self.budget_wait.observe(seconds);
    }

    /// Counts one retry of an upstream call.
    pub fn count_retry(&self, operation: &'static str) {
        self.upstream_retries
            .get_or_create(&OperationLabels { operation })
            .inc();
    }

    /// Sets the backoff gauge (read at scrape time: the backoff ends without any event).
    pub fn set_upstream_backoff(&self, seconds: f64) {
        self.backoff.set(seconds);
    }

    /// Records the upstream budget in calls per second, for dashboards to draw the calls against.
    pub fn set_upstream_budget(&self, calls_per_second: f64) {
        self.budget_rate.set(calls_per_second);
    }

    /// Where the policy folder's reloads are reported.
    pub fn policy_reload(&self) -> SourceHealth {
        self.policy_reload.clone()
    }

    /// Where the identity provider's key fetches are reported.
    pub fn jwks_fetch(&self) -> SourceHealth {
        self.jwks_fetch.clone()
    }

    /// Records whether Redis is configured (GATEWAY_REDIS_URL): the alert on a replica running
    /// local while Redis is configured compares it with `sharing_mode`.
    pub fn set_redis_configured(&self, configured: bool) {
        self.redis_configured.set(i64::from(configured));
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
