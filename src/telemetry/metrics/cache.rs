//! The cache's families: how each cacheable request was answered, background refreshes, waits
//! for another replica's fetch, the shared generation followed, flushes, and the size held.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use super::{Metrics, ReasonLabels, add, add_in};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

pub(super) struct CacheMetrics {
    results: Family<ResultLabels, Counter>,
    refreshes: Family<ResultLabels, Counter>,
    fill_wait: Histogram,
    generation: Gauge,
    flushes: Family<ReasonLabels, Counter>,
    untrusted: Counter,
    entries: Gauge,
    bytes: Gauge,
}

impl CacheMetrics {
    pub(super) fn register(r: &mut Registry) -> CacheMetrics {
        let cache = CacheMetrics {
            results: add(
                r,
                "cache_requests",
                "Cacheable requests by how the cache answered: hit, stored, coalesced (waited \
                 for another request's fetch), stale (served while the upstream failed), miss \
                 (not stored); with Redis also hit_shared (from the replicas' shared tier), \
                 coalesced_remote (waited for another replica's fetch), lock_takeover (fetched \
                 after the replica filling it went silent)",
                Family::default(),
            ),
            refreshes: add(
                r,
                "cache_refreshes",
                "Background refreshes of entries asked for in the last tenth of their \
                 freshness: stored (a new answer replaced the entry), kept (the refresh failed; \
                 the entry stays), shared (another replica refreshed it)",
                Family::default(),
            ),
            fill_wait: add_in(
                r,
                "cache_fill_wait",
                "Time requests waited for another replica's fetch of the same answer",
                Unit::Seconds,
                Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            ),
            generation: add(
                r,
                "cache_generation",
                "The shared cache's generation this replica's memory belongs to (each purge \
                 adds one)",
                Gauge::default(),
            ),
            flushes: add(
                r,
                "cache_l1_flushes",
                "Times this replica emptied its own memory of answers: local (a purge here), \
                 message (another replica's purge, announced), generation (a purge found by \
                 reading the shared generation: a lost announcement). A Redis restart, failover or \
                 restore is no purge and flushes nothing",
                Family::default(),
            ),
            untrusted: add(
                r,
                "cache_untrusted_entries",
                "Entries (or relayed answers) read from the shared cache without a valid MAC: \
                 planted, or written by a gateway of another organization; each is a miss, never \
                 served",
                Counter::default(),
            ),
            entries: add(
                r,
                "cache_entries",
                "Answers held in the cache",
                Gauge::default(),
            ),
            bytes: add_in(
                r,
                "cache_size",
                "What the cache's entries cost, as counted against its bound: keys, bodies and \
                 per-entry bookkeeping",
                Unit::Bytes,
                Gauge::default(),
            ),
        };
        // The answers the shipped alerts and dashboard watch start at 0: a series born at 1
        // shows no `increase()`.
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
            let _ = cache.results.get_or_create(&ResultLabels { result });
        }
        for reason in ["local", "message", "generation"] {
            let _ = cache.flushes.get_or_create(&ReasonLabels { reason });
        }
        for result in ["stored", "kept", "shared"] {
            let _ = cache.refreshes.get_or_create(&ResultLabels { result });
        }
        cache
    }
}

impl Metrics {
    /// Counts one cacheable request by how the cache answered it.
    pub fn cache_result(&self, result: &'static str) {
        self.cache
            .results
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// Counts one background refresh by its result (`stored` or `kept`).
    pub fn cache_refresh(&self, result: &'static str) {
        self.cache
            .refreshes
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// Records how long a request waited for another replica's fetch.
    pub fn observe_cache_fill_wait(&self, seconds: f64) {
        self.cache.fill_wait.observe(seconds);
    }

    /// Records the shared cache generation this replica follows.
    pub fn set_cache_generation(&self, generation: u64) {
        self.cache
            .generation
            .set(i64::try_from(generation).unwrap_or(i64::MAX));
    }

    /// Counts one emptying of this replica's memory, by `reason`.
    pub fn count_cache_flush(&self, reason: &'static str) {
        self.cache
            .flushes
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Counts one entry (or relayed answer) read from Redis without a valid MAC: not served.
    pub fn count_cache_untrusted(&self) {
        self.cache.untrusted.inc();
    }

    /// Records what the cache holds (read when metrics are scraped).
    pub fn cache_size(&self, entries: u64, bytes: u64) {
        self.cache
            .entries
            .set(i64::try_from(entries).unwrap_or(i64::MAX));
        self.cache
            .bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }
}
