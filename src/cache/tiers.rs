//! The cache's two in-memory tiers and what an entry weighs against the bound: `fresh` holds an
//! entry until its freshness ends (and coalesces concurrent misses), `stale` keeps it
//! `stale_if_error` longer and carries the bound, so whatever `stale` drops leaves `fresh` too.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use bytes::Bytes;
use moka::Expiry;
use moka::future::Cache as Moka;

/// What one entry costs beyond its key and body bytes, for both tiers together: two moka entries
/// (hash table slot, entry and key-hash records, access and write order nodes, timer wheel
/// node, frequency sketch counters), the shared [`Entry`] and the key's and body's allocation
/// headers. Measured at about 900 bytes (40,000 entries of a 300-byte key and a 200-byte body
/// grew a glibc test process by 56 MiB, 36 MiB beyond their keys and bodies); rounded up, it
/// makes the gauge match the gateway's own RSS: 1,779 entries counted 3.00 MiB grew it by
/// 3.4 MiB, 0.7 MiB of which it grows under the same load with nothing stored
/// (`tests/memory.rs`).
pub const ENTRY_OVERHEAD: u64 = 1024;

/// One stored answer: the body as the upstream sent it (always JSON; only 200s are stored).
#[derive(Debug)]
pub struct Entry {
    /// Shared, never copied on a hit.
    pub body: Bytes,
    /// When the upstream produced it (for `Age`).
    pub stored_at: Instant,
    /// Until when it may be served as fresh.
    pub fresh_until: Instant,
    /// Until when it may be served when the upstream fails.
    pub stale_until: Instant,
    /// Whether this is an old answer re-served because the upstream failed.
    pub stale: bool,
    /// Set by the one request that takes this entry's background refresh: one per entry, so
    /// one per key at a time, and a failed one is not retried on every later hit (the entry
    /// then expires as usual, and stale-if-error covers a failing upstream).
    pub(super) refreshing: AtomicBool,
}

impl Entry {
    pub(super) fn new(body: &[u8], ttl: Duration, stale_if_error: Duration) -> Arc<Entry> {
        let now = Instant::now();
        Arc::new(Entry {
            // Its own allocation of its own size: a body read from the network is often a
            // slice of a much larger read buffer (hyper's is 8 KiB or more), which a stored
            // slice would keep alive whole.
            body: Bytes::copy_from_slice(body),
            stored_at: now,
            fresh_until: now + ttl,
            stale_until: now + ttl + stale_if_error,
            stale: false,
            refreshing: AtomicBool::new(false),
        })
    }

    /// This entry re-served as stale for `hold`, while the upstream fails.
    pub(super) fn held(&self, hold: Duration) -> Arc<Entry> {
        Arc::new(Entry {
            body: self.body.clone(),
            stored_at: self.stored_at,
            fresh_until: Instant::now() + hold,
            stale_until: self.stale_until,
            stale: true,
            refreshing: AtomicBool::new(false),
        })
    }
}

/// Expires an entry at its `fresh_until` plus `extra`.
struct ExpireAt {
    extra: Duration,
}

impl Expiry<Arc<str>, Arc<Entry>> for ExpireAt {
    fn expire_after_create(&self, _: &Arc<str>, e: &Arc<Entry>, now: Instant) -> Option<Duration> {
        Some((e.fresh_until + self.extra).saturating_duration_since(now))
    }

    fn expire_after_update(
        &self,
        key: &Arc<str>,
        e: &Arc<Entry>,
        now: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        self.expire_after_create(key, e, now)
    }
}

/// The two tiers. A purge replaces them whole: everything they held (entries, hash tables,
/// frequency sketches) is freed at once, when the last request using them ends.
pub(super) struct Tiers {
    pub(super) fresh: Moka<Arc<str>, Arc<Entry>>,
    pub(super) stale: Moka<Arc<str>, Arc<Entry>>,
}

impl Tiers {
    pub(super) fn new(max_bytes: u64, stale_if_error: Duration) -> Tiers {
        let builder = |extra| {
            Moka::builder()
                .max_capacity(max_bytes)
                .weigher(|k: &Arc<str>, e: &Arc<Entry>| {
                    u32::try_from(weight(k, e)).unwrap_or(u32::MAX)
                })
                .expire_after(ExpireAt { extra })
        };
        let fresh: Moka<Arc<str>, Arc<Entry>> = builder(Duration::ZERO).build();
        // `stale` holds every stored entry and is the one the bound is kept on: whatever it
        // drops (refused or evicted under the bound, or expired) leaves `fresh` too, so the two
        // tiers never hold more than `stale` counts. A replaced entry stays: its key has a
        // newer one.
        let evicted_from = fresh.clone();
        let stale = builder(stale_if_error)
            .async_eviction_listener(move |key, _, cause| {
                let fresh = evicted_from.clone();
                Box::pin(async move {
                    if cause.was_evicted() {
                        fresh.invalidate(&**key).await;
                    }
                })
            })
            .build();
        Tiers { fresh, stale }
    }
}

/// What an entry costs against the bound: key, body and bookkeeping (the key and body are
/// shared by both tiers and counted once).
fn weight(key: &str, entry: &Entry) -> u64 {
    key.len() as u64 + entry.body.len() as u64 + ENTRY_OVERHEAD
}
