//! The gateway's Prometheus metrics, in a per-app registry (not a process-wide recorder), so
//! tests can run many apps in one process and read each one's numbers.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::billing::{Method, OPERATIONS};
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

/// A principal class: a gateway key's name or a token's highest role, never a user's subject,
/// so there are no more series than the policy has keys and roles.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabels {
    class: String,
}

/// A refusal's reason and the refused principal's class (bounded, as for [`ClassLabels`]).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    reason: &'static str,
    class: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabels {
    mode: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ToLabels {
    to: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    op: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpResultLabels {
    op: &'static str,
    result: &'static str,
}

/// How a replica keeps its limits: its own memory (no Redis), shared through Redis, or on its
/// own at its share because Redis failed.
const REDIS_MODES: [&str; 3] = ["local", "connected", "degraded"];

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
type ClassHistogramFamily = Family<ClassLabels, Histogram, fn() -> Histogram>;

/// The gateway's Prometheus metrics.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    rejections: Family<ReasonLabels, Counter>,
    upstream_duration: HistogramFamily,
    upstream_calls: Family<RequestLabels, Counter>,
    cache_results: Family<ResultLabels, Counter>,
    cache_refreshes: Family<ResultLabels, Counter>,
    cache_fill_wait: Histogram,
    cache_generation: Gauge,
    cache_flushes: Family<ReasonLabels, Counter>,
    cache_entries: Gauge,
    cache_bytes: Gauge,
    upstream_retries: Family<OperationLabels, Counter>,
    budget_wait: Histogram,
    class_calls: Family<ClassLabels, Counter>,
    class_refusals: Family<RefusalLabels, Counter>,
    class_budget_wait: ClassHistogramFamily,
    waiting_principals: Gauge,
    backoff: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Places of the in-flight bound held: authenticated requests being handled, relayed upstream
    /// bodies included; the load-shedding bound applies to it.
    pub(crate) in_flight: Gauge,
    stalled_answers: Counter,
    log_lines_dropped: Counter,
    budget_rate: Gauge<f64, std::sync::atomic::AtomicU64>,
    policy_reload: SourceHealth,
    jwks_fetch: SourceHealth,
    redis_mode: Family<ModeLabels, Gauge>,
    redis_mode_changes: Family<ToLabels, Counter>,
    redis_commands: Family<OpResultLabels, Counter>,
    redis_duration: Family<OpLabels, Histogram, fn() -> Histogram>,
    cluster_replicas: Gauge,
    budget_degraded_rate: Gauge<f64, std::sync::atomic::AtomicU64>,
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
             another request's fetch), stale (served while the upstream failed), miss (not stored); \
             with Redis also hit_shared (from the replicas' shared tier), coalesced_remote (waited \
             for another replica's fetch), lock_takeover (fetched after the replica filling it \
             went silent)",
            cache_results.clone(),
        );
        let cache_refreshes = Family::<ResultLabels, Counter>::default();
        registry.register(
            "cache_refreshes",
            "Background refreshes of entries asked for in the last tenth of their freshness: \
             stored (a new answer replaced the entry), kept (the refresh failed; the entry stays), \
             shared (another replica refreshed it)",
            cache_refreshes.clone(),
        );
        let cache_fill_wait = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        registry.register_with_unit(
            "cache_fill_wait",
            "Time requests waited for another replica's fetch of the same answer",
            prometheus_client::registry::Unit::Seconds,
            cache_fill_wait.clone(),
        );
        let cache_generation = Gauge::default();
        registry.register(
            "cache_generation",
            "The shared cache's generation this replica's memory belongs to (each purge adds one)",
            cache_generation.clone(),
        );
        let cache_flushes = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "cache_l1_flushes",
            "Times this replica emptied its own memory of answers: local (a purge here), message \
             (another replica's purge, announced), generation (a purge found by reading the \
             shared generation: a lost announcement, or a Redis restart)",
            cache_flushes.clone(),
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
            "What the cache's entries cost, as counted against its bound: keys, bodies and per-entry bookkeeping",
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
        let class_calls = Family::<ClassLabels, Counter>::default();
        registry.register(
            "upstream_calls_by_class",
            "Calls sent to the Billing API (retries included), by principal class: the gateway \
             key's name or the token's highest role",
            class_calls.clone(),
        );
        let class_refusals = Family::<RefusalLabels, Counter>::default();
        registry.register(
            "refusals_by_class",
            "Requests refused for the caller's own rate (`principal_rate`) or a full upstream \
             budget (`upstream_budget`), by principal class",
            class_refusals.clone(),
        );
        let class_budget_wait: ClassHistogramFamily =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.001, 2.0, 12)));
        registry.register_with_unit(
            "upstream_budget_wait_by_class",
            "Time upstream calls waited for their turn in the upstream budget, by principal class",
            prometheus_client::registry::Unit::Seconds,
            class_budget_wait.clone(),
        );
        let waiting_principals = Gauge::default();
        registry.register(
            "upstream_budget_waiting_principals",
            "Principals with calls waiting for a turn in the upstream budget (turns go round-robin \
             between them)",
            waiting_principals.clone(),
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
            "Authenticated requests being handled, relayed upstream bodies included (the places \
             of the in-flight bound)",
            in_flight.clone(),
        );
        let stalled_answers = Counter::default();
        registry.register(
            "stalled_answers",
            "Relayed answers cut off because the client took nothing for the idle write time",
            stalled_answers.clone(),
        );
        let log_lines_dropped = Counter::default();
        registry.register(
            "log_lines_dropped",
            "Access log lines dropped because the log sink was slower than the requests (its \
             queue was full)",
            log_lines_dropped.clone(),
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
        let redis_mode = Family::<ModeLabels, Gauge>::default();
        registry.register(
            "redis_mode",
            "1 for how this replica keeps its limits and cache: `local` (no GATEWAY_REDIS_URL: its \
             own memory), `connected` (shared through Redis), `degraded` (Redis failed: on its \
             own, at its share, until Redis answers again)",
            redis_mode.clone(),
        );
        for mode in REDIS_MODES {
            redis_mode
                .get_or_create(&ModeLabels { mode })
                .set(i64::from(mode == "local"));
        }
        let redis_mode_changes = Family::<ToLabels, Counter>::default();
        registry.register(
            "redis_mode_changes",
            "Switches between sharing through Redis and keeping limits alone, by the mode entered",
            redis_mode_changes.clone(),
        );
        for to in ["connected", "degraded"] {
            let _ = redis_mode_changes.get_or_create(&ToLabels { to });
        }
        let redis_commands = Family::<OpResultLabels, Counter>::default();
        registry.register(
            "redis_commands",
            "Redis commands (scripts) run, by purpose and result (ok, error, timeout)",
            redis_commands.clone(),
        );
        let redis_duration: Family<OpLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.000_1, 2.0, 14)));
        registry.register_with_unit(
            "redis_duration",
            "Round trip of Redis commands as this replica sees it, by purpose",
            prometheus_client::registry::Unit::Seconds,
            redis_duration.clone(),
        );
        let cluster_replicas = Gauge::default();
        registry.register(
            "cluster_replicas",
            "Replicas seen alive through Redis in the last 6 s, never fewer than \
             GATEWAY_REDIS_FALLBACK_REPLICAS: what the limits are divided by when degraded",
            cluster_replicas.clone(),
        );
        let budget_degraded_rate = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "upstream_budget_degraded_rate",
            "Upstream calls per second this replica allows itself while degraded (0 otherwise)",
            budget_degraded_rate.clone(),
        );
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
        for result in [
            "hit",
            "stored",
            "coalesced",
            "stale",
            "miss",
            "hit_shared",
            "coalesced_remote",
            "lock_takeover",
        ] {
            let _ = cache_results.get_or_create(&ResultLabels { result });
        }
        for reason in ["local", "message", "generation"] {
            let _ = cache_flushes.get_or_create(&ReasonLabels { reason });
        }
        for result in ["stored", "kept", "shared"] {
            let _ = cache_refreshes.get_or_create(&ResultLabels { result });
        }
        // Only reads are retried; their retries start at 0, so the dashboard's panel has data
        // before the first one.
        for op in OPERATIONS.iter().filter(|op| op.method == Method::Get) {
            let _ = upstream_retries.get_or_create(&OperationLabels { operation: op.name });
        }
        Metrics {
            registry,
            requests,
            rejections,
            upstream_duration,
            upstream_calls,
            cache_results,
            cache_refreshes,
            cache_fill_wait,
            cache_generation,
            cache_flushes,
            cache_entries,
            cache_bytes,
            upstream_retries,
            budget_wait,
            class_calls,
            class_refusals,
            class_budget_wait,
            waiting_principals,
            backoff,
            in_flight,
            stalled_answers,
            log_lines_dropped,
            budget_rate,
            policy_reload,
            jwks_fetch,
            redis_mode,
            redis_mode_changes,
            redis_commands,
            redis_duration,
            cluster_replicas,
            budget_degraded_rate,
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

    /// Counts one background refresh by its result (`stored` or `kept`).
    pub fn cache_refresh(&self, result: &'static str) {
        self.cache_refreshes
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// Records how long a request waited for another replica's fetch.
    pub fn observe_cache_fill_wait(&self, seconds: f64) {
        self.cache_fill_wait.observe(seconds);
    }

    /// Records the shared cache generation this replica follows.
    pub fn set_cache_generation(&self, generation: u64) {
        self.cache_generation
            .set(i64::try_from(generation).unwrap_or(i64::MAX));
    }

    /// Counts one emptying of this replica's memory, by `reason`.
    pub fn count_cache_flush(&self, reason: &'static str) {
        self.cache_flushes
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Records what the cache holds (read when metrics are scraped).
    pub fn cache_size(&self, entries: u64, bytes: u64) {
        self.cache_entries
            .set(i64::try_from(entries).unwrap_or(i64::MAX));
        self.cache_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// Records how long an upstream call of a principal of `class` waited for its turn in the
    /// budget (0 when it had it at once), so operators see the budget binding, and whom it
    /// delays, before callers see 429s.
    pub fn observe_budget_wait(&self, class: &str, seconds: f64) {
        self.budget_wait.observe(seconds);
        self.class_budget_wait
            .get_or_create(&ClassLabels {
                class: class.to_owned(),
            })
            .observe(seconds);
    }

    /// Counts one refusal of a principal of `class` (`reason`: `principal_rate` or
    /// `upstream_budget`), so a dashboard can tell which caller is throttled without a label per
    /// user.
    pub fn count_class_refusal(&self, reason: &'static str, class: &str) {
        self.class_refusals
            .get_or_create(&RefusalLabels {
                reason,
                class: class.to_owned(),
            })
            .inc();
    }

    /// Counts one call sent upstream for a principal of `class`.
    pub fn count_class_call(&self, class: &str) {
        self.class_calls
            .get_or_create(&ClassLabels {
                class: class.to_owned(),
            })
            .inc();
    }

    /// Sets the gauge of principals waiting for a turn (read at scrape time).
    pub fn set_waiting_principals(&self, principals: usize) {
        self.waiting_principals
            .set(i64::try_from(principals).unwrap_or(i64::MAX));
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

    /// Counts one relayed answer cut off because its client stopped taking it.
    pub fn count_stalled_answer(&self) {
        self.stalled_answers.inc();
    }

    /// The counter of access log lines dropped, for the access log to count in.
    pub fn log_lines_dropped(&self) -> Counter {
        self.log_lines_dropped.clone()
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

    /// Records the mode this replica keeps its limits in (`local`, `connected`, `degraded`).
    pub fn set_redis_mode(&self, mode: &'static str) {
        for each in REDIS_MODES {
            self.redis_mode
                .get_or_create(&ModeLabels { mode: each })
                .set(i64::from(each == mode));
        }
    }

    /// Counts one switch into `to`.
    pub fn count_redis_mode_change(&self, to: &'static str) {
        self.redis_mode_changes
            .get_or_create(&ToLabels { to })
            .inc();
    }

    /// Records one Redis command for `op`: how it ended and how long it took.
    pub fn observe_redis(&self, op: &'static str, result: &'static str, seconds: f64) {
        self.redis_commands
            .get_or_create(&OpResultLabels { op, result })
            .inc();
        self.redis_duration
            .get_or_create(&OpLabels { op })
            .observe(seconds);
    }

    /// Records N, the replicas the limits are divided by when degraded.
    pub fn set_cluster_replicas(&self, replicas: u32) {
        self.cluster_replicas.set(i64::from(replicas));
    }

    /// Records the calls per second this replica allows itself while degraded (0: sharing).
    pub fn set_budget_degraded_rate(&self, calls_per_second: f64) {
        self.budget_degraded_rate.set(calls_per_second);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
