//! The gateway's Prometheus metrics, in a per-app registry (not a process-wide recorder), so
//! tests can run many apps in one process and read each one's numbers.
//!
//! [`Metrics`] is one registry; each group of families registers itself and records in a file
//! of its own: the requests here, the upstream and its budget in `upstream`, the cache in
//! `cache`, sharing through Redis in `redis`, sources re-read while running in `source`.

mod cache;
mod redis;
mod source;
mod upstream;

pub use source::SourceHealth;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Metric, Registry, Unit};

use crate::error::{Error, Throttle};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    operation: &'static str,
    status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// Registers `metric` under `name` and hands it back, for the field that records into it.
fn add<M: Metric + Clone>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M {
    registry.register(name, help, metric.clone());
    metric
}

/// [`add`], for a metric measured in `unit`.
fn add_in<M: Metric + Clone>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    unit: Unit,
    metric: M,
) -> M {
    registry.register_with_unit(name, help, unit, metric.clone());
    metric
}

/// The gateway's Prometheus metrics.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    rejections: Family<ReasonLabels, Counter>,
    /// Places of the in-flight bound held: authenticated requests being handled, relayed upstream
    /// bodies included; the load-shedding bound applies to it.
    pub(crate) in_flight: Gauge,
    stalled_answers: Counter,
    log_lines_dropped: Counter,
    upstream: upstream::UpstreamMetrics,
    cache: cache::CacheMetrics,
    policy_reload: SourceHealth,
    jwks_fetch: SourceHealth,
    redis: redis::RedisMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("billing_gateway");
        let r = &mut registry;
        let requests = add(
            r,
            "requests",
            "Requests answered, by Billing operation (or gateway endpoint) and status",
            Family::default(),
        );
        let rejections = add(
            r,
            "rejections",
            "Requests the gateway answered itself with an error, by reason",
            Family::default(),
        );
        let in_flight = add(
            r,
            "requests_in_flight",
            "Authenticated requests being handled, relayed upstream bodies included (the places \
             of the in-flight bound)",
            Gauge::default(),
        );
        let stalled_answers = add(
            r,
            "stalled_answers",
            "Relayed answers cut off because the client took nothing for the idle write time",
            Counter::default(),
        );
        let log_lines_dropped = add(
            r,
            "log_lines_dropped",
            "Access log lines dropped because the log sink was slower than the requests (its \
             queue was full)",
            Counter::default(),
        );
        // The refusals the shipped alerts and dashboard watch start at 0: a series born at 1
        // shows no `increase()`, so a first refusal would go unseen.
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
        let upstream = upstream::UpstreamMetrics::register(r);
        let cache = cache::CacheMetrics::register(r);
        let policy_reload = SourceHealth::register(
            r,
            "policy_reload",
            "the policy folder (every poll and SIGHUP)",
        );
        let jwks_fetch =
            SourceHealth::register(r, "jwks_fetch", "the identity provider's keys (JWKS)");
        let redis = redis::RedisMetrics::register(r);
        Metrics {
            registry,
            requests,
            rejections,
            in_flight,
            stalled_answers,
            log_lines_dropped,
            upstream,
            cache,
            policy_reload,
            jwks_fetch,
            redis,
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

    /// Counts one relayed answer cut off because its client stopped taking it.
    pub fn count_stalled_answer(&self) {
        self.stalled_answers.inc();
    }

    /// The counter of access log lines dropped, for the access log to count in.
    pub fn log_lines_dropped(&self) -> Counter {
        self.log_lines_dropped.clone()
    }

    /// Where the policy folder's reloads are reported.
    pub fn policy_reload(&self) -> SourceHealth {
        self.policy_reload.clone()
    }

    /// Where the identity provider's key fetches are reported.
    pub fn jwks_fetch(&self) -> SourceHealth {
        self.jwks_fetch.clone()
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
