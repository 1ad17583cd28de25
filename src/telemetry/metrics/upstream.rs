//! The families of the upstream calls and of the budget they wait in: calls and their time,
//! retries, turns and refusals by principal class, backoff, and the budget's rate.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use super::{Metrics, RequestLabels, add, add_in};
use crate::billing::{Method, OPERATIONS};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    operation: &'static str,
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

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;
type Rate = Gauge<f64, std::sync::atomic::AtomicU64>;

pub(super) struct UpstreamMetrics {
    calls: Family<RequestLabels, Counter>,
    duration: Histograms<OperationLabels>,
    retries: Family<OperationLabels, Counter>,
    budget_wait: Histogram,
    class_calls: Family<ClassLabels, Counter>,
    class_refusals: Family<RefusalLabels, Counter>,
    class_budget_wait: Histograms<ClassLabels>,
    waiting_principals: Gauge,
    backoff: Rate,
    budget_rate: Rate,
    budget_degraded_rate: Rate,
}

impl UpstreamMetrics {
    pub(super) fn register(r: &mut Registry) -> UpstreamMetrics {
        let upstream = UpstreamMetrics {
            calls: add(
                r,
                "upstream_calls",
                "Calls sent to the Billing API (retries included), by operation and answer \
                 status; status 0: no answer (timeout, connection refused)",
                Family::default(),
            ),
            duration: add_in(
                r,
                "upstream_duration",
                "Time to the upstream's response headers, by operation",
                Unit::Seconds,
                Family::new_with_constructor(|| {
                    Histogram::new(exponential_buckets(0.005, 2.0, 12))
                }),
            ),
            retries: add(
                r,
                "upstream_retries",
                "Upstream calls retried after a connection error, 502 or 503, by operation",
                Family::default(),
            ),
            budget_wait: add_in(
                r,
                "upstream_budget_wait",
                "Time upstream calls waited for their turn in the upstream budget",
                Unit::Seconds,
                Histogram::new(exponential_buckets(0.001, 2.0, 12)),
            ),
            class_calls: add(
                r,
                "upstream_calls_by_class",
                "Calls sent to the Billing API (retries included), by principal class: the \
                 gateway key's name or the token's highest role",
                Family::default(),
            ),
            class_refusals: add(
                r,
                "refusals_by_class",
                "Requests refused for the caller's own rate (`principal_rate`) or a full \
                 upstream budget (`upstream_budget`), by principal class",
                Family::default(),
            ),
            class_budget_wait: add_in(
                r,
                "upstream_budget_wait_by_class",
                "Time upstream calls waited for their turn in the upstream budget, by principal \
                 class",
                Unit::Seconds,
                Family::new_with_constructor(|| {
                    Histogram::new(exponential_buckets(0.001, 2.0, 12))
                }),
            ),
            waiting_principals: add(
                r,
                "upstream_budget_waiting_principals",
                "Principals with calls waiting for a turn in the upstream budget (turns go \
                 round-robin between them)",
                Gauge::default(),
            ),
            backoff: add_in(
                r,
                "upstream_backoff",
                "Time left before the upstream is called again after it answered 429 (0: not \
                 backing off)",
                Unit::Seconds,
                Rate::default(),
            ),
            budget_rate: add(
                r,
                "upstream_budget_calls_per_second",
                "The upstream budget: calls per second all callers together may send upstream \
                 (GATEWAY_UPSTREAM_RATE)",
                Rate::default(),
            ),
            budget_degraded_rate: add(
                r,
                "upstream_budget_degraded_rate",
                "Upstream calls per second this replica allows itself while degraded (0 \
                 otherwise)",
                Rate::default(),
            ),
        };
        // Only reads are retried; their retries start at 0, so the dashboard's panel has data
        // before the first one.
        for op in OPERATIONS.iter().filter(|op| op.method == Method::Get) {
            let _ = upstream
                .retries
                .get_or_create(&OperationLabels { operation: op.name });
        }
        upstream
    }
}

impl Metrics {
    /// Records one upstream call: its answer's status (0: none — timeout, refused) and the time
    /// to its response headers.
    pub fn observe_upstream(&self, operation: &'static str, status: u16, seconds: f64) {
        self.upstream
            .calls
            .get_or_create(&RequestLabels { operation, status })
            .inc();
        self.upstream
            .duration
            .get_or_create(&OperationLabels { operation })
            .observe(seconds);
    }

    /// Records how long an upstream call of a principal of `class` waited for its turn in the
    /// budget (0 when it had it at once), so operators see the budget binding, and whom it
    /// delays, before callers see 429s.
    pub fn observe_budget_wait(&self, class: &str, seconds: f64) {
        self.upstream.budget_wait.observe(seconds);
        self.upstream
            .class_budget_wait
            .get_or_create(&ClassLabels {
                class: class.to_owned(),
            })
            .observe(seconds);
    }

    /// Counts one refusal of a principal of `class` (`reason`: `principal_rate` or
    /// `upstream_budget`), so a dashboard can tell which caller is throttled without a label per
    /// user.
    pub fn count_class_refusal(&self, reason: &'static str, class: &str) {
        self.upstream
            .class_refusals
            .get_or_create(&RefusalLabels {
                reason,
                class: class.to_owned(),
            })
            .inc();
    }

    /// Counts one call sent upstream for a principal of `class`.
    pub fn count_class_call(&self, class: &str) {
        self.upstream
            .class_calls
            .get_or_create(&ClassLabels {
                class: class.to_owned(),
            })
            .inc();
    }

    /// Sets the gauge of principals waiting for a turn (read at scrape time).
    pub fn set_waiting_principals(&self, principals: usize) {
        self.upstream
            .waiting_principals
            .set(i64::try_from(principals).unwrap_or(i64::MAX));
    }

    /// Counts one retry of an upstream call.
    pub fn count_retry(&self, operation: &'static str) {
        self.upstream
            .retries
            .get_or_create(&OperationLabels { operation })
            .inc();
    }

    /// Sets the backoff gauge (read at scrape time: the backoff ends without any event).
    pub fn set_upstream_backoff(&self, seconds: f64) {
        self.upstream.backoff.set(seconds);
    }

    /// Records the upstream budget in calls per second, for dashboards to draw the calls against.
    pub fn set_upstream_budget(&self, calls_per_second: f64) {
        self.upstream.budget_rate.set(calls_per_second);
    }

    /// Records the calls per second this replica allows itself while degraded (0: sharing).
    pub fn set_budget_degraded_rate(&self, calls_per_second: f64) {
        self.upstream.budget_degraded_rate.set(calls_per_second);
    }
}
