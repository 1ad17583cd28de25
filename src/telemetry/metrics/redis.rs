//! The families of sharing through Redis: the mode a replica keeps its limits in and its
//! switches, the commands run and their round trips, and the replicas seen alive.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use super::{Metrics, add, add_in};

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

pub(super) struct RedisMetrics {
    mode: Family<ModeLabels, Gauge>,
    mode_changes: Family<ToLabels, Counter>,
    commands: Family<OpResultLabels, Counter>,
    duration: Family<OpLabels, Histogram, fn() -> Histogram>,
    cluster_replicas: Gauge,
}

impl RedisMetrics {
    pub(super) fn register(r: &mut Registry) -> RedisMetrics {
        let redis = RedisMetrics {
            mode: add(
                r,
                "redis_mode",
                "1 for how this replica keeps its limits and cache: `local` (no \
                 GATEWAY_REDIS_URL: its own memory), `connected` (shared through Redis), \
                 `degraded` (Redis failed: on its own, at its share, until Redis answers again)",
                Family::default(),
            ),
            mode_changes: add(
                r,
                "redis_mode_changes",
                "Switches between sharing through Redis and keeping limits alone, by the mode \
                 entered",
                Family::default(),
            ),
            commands: add(
                r,
                "redis_commands",
                "Redis commands (scripts) run, by purpose and result: ok, error, timeout (no \
                 answer within GATEWAY_REDIS_TIMEOUT), deadline (the request's share of it \
                 ran out first: at most one command per request waits that long), skipped (not \
                 sent: the request's share was spent)",
                Family::default(),
            ),
            duration: add_in(
                r,
                "redis_duration",
                "Round trip of Redis commands as this replica sees it, by purpose",
                Unit::Seconds,
                Family::new_with_constructor(|| {
                    Histogram::new(exponential_buckets(0.000_1, 2.0, 14))
                }),
            ),
            cluster_replicas: add(
                r,
                "cluster_replicas",
                "Replicas seen alive through Redis in the last 6 s, never fewer than \
                 GATEWAY_REDIS_FALLBACK_REPLICAS: what the limits are divided by when degraded",
                Gauge::default(),
            ),
        };
        redis.set_mode("local");
        for to in ["connected", "degraded"] {
            let _ = redis.mode_changes.get_or_create(&ToLabels { to });
        }
        redis
    }

    /// 1 for `mode`, 0 for the others: every mode has its series from the start.
    fn set_mode(&self, mode: &str) {
        for each in REDIS_MODES {
            self.mode
                .get_or_create(&ModeLabels { mode: each })
                .set(i64::from(each == mode));
        }
    }
}

impl Metrics {
    /// Records the mode this replica keeps its limits in (`local`, `connected`, `degraded`).
    pub fn set_redis_mode(&self, mode: &'static str) {
        self.redis.set_mode(mode);
    }

    /// Counts one switch into `to`.
    pub fn count_redis_mode_change(&self, to: &'static str) {
        self.redis
            .mode_changes
            .get_or_create(&ToLabels { to })
            .inc();
    }

    /// Records one Redis command for `op`: how it ended and how long it took.
    pub fn observe_redis(&self, op: &'static str, result: &'static str, seconds: f64) {
        self.redis
            .commands
            .get_or_create(&OpResultLabels { op, result })
            .inc();
        self.redis
            .duration
            .get_or_create(&OpLabels { op })
            .observe(seconds);
    }

    /// Records N, the replicas the limits are divided by when degraded.
    pub fn set_cluster_replicas(&self, replicas: u32) {
        self.redis.cluster_replicas.set(i64::from(replicas));
    }
}
