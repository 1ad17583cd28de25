//! Upstream answers kept in memory (contract §8): one upstream call per distinct query however
//! many callers ask, stale answers when the upstream fails.
//!
//! Entries are keyed by the exact upstream request (operation and canonical query, organization
//! filled in), never by caller: authorization happens before any lookup. Two moka caches share
//! each entry: `fresh` holds it until its freshness ends and coalesces concurrent misses
//! (`try_get_with` runs one fetch per key; waiters share its result, errors included); `stale`
//! keeps it `stale_if_error` longer, for when the upstream fails.
//!
//! A fresh entry asked for in the last tenth of its freshness is refreshed in the background
//! (when `background_refresh` is on, the default): the request that finds it there is answered
//! from it at once and is handed the one [`Refresh`] of that entry, so a key polled steadily
//! never makes a caller wait for the upstream at expiry (nginx's `proxy_cache_background_update`,
//! Varnish's grace). A key nobody asks for is never refreshed, and a refresh that fails leaves
//! the entry as it was.
//!
//! The bound is on what entries really cost, not only their bodies: each is weighed as its key,
//! its body and [`ENTRY_OVERHEAD`] (both tiers' bookkeeping), bodies are stored in allocations of
//! their own size, and `fresh` never holds an entry `stale` has dropped, so the process's cache
//! memory stays within `max_bytes` plus allocator slack (`tests/memory.rs` measures it).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use moka::Expiry;
use moka::future::Cache as Moka;
use time::OffsetDateTime;

use crate::billing::Call;
use crate::config::CacheConfig;

/// What one entry costs beyond its key and body bytes, for both tiers together: two moka entries
/// (hash table slot, entry and key-hash records, access and write order nodes, timer wheel
/// node, frequency sketch counters), the shared [`Entry`] and the key's and body's allocation
/// headers. Measured at about 900 bytes (40,000 entries of a 300-byte key and a 200-byte body
/// grew a glibc test process by 56 MiB, 36 MiB beyond their keys and bodies); rounded up, it
/// makes the gauge match the gateway's own RSS: 1,779 entries counted 3.00 MiB grew it by
/// 3.4 MiB, 0.7 MiB of which it grows under the same load with nothing stored
/// (`tests/memory.rs`).
pub const ENTRY_OVERHEAD: u64 = 1024;

/// While the upstream is failing, a stale answer is re-served from `fresh` for this long before
/// the next attempt, so an outage does not make every request wait for a timeout.
const STALE_HOLD: Duration = Duration::from_secs(5);

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
    refreshing: AtomicBool,
}

impl Entry {
    fn new(body: &[u8], ttl: Duration, stale_if_error: Duration) -> Arc<Entry> {
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

    /// Whether the caller at `now` takes this entry's background refresh: a fresh (not
    /// re-served stale) entry in the last tenth of its freshness whose refresh nobody took yet.
    fn take_refresh(&self, now: Instant) -> bool {
        let tenth = self.fresh_until.saturating_duration_since(self.stored_at) / 10;
        !self.stale
            && now + tenth >= self.fresh_until
            && !self.refreshing.load(Ordering::Relaxed)
            && !self.refreshing.swap(true, Ordering::Relaxed)
    }
}

/// What a fetch of a missing entry produced.
pub enum Fetch<M> {
    /// A 200 body: store it (when small enough) and serve it.
    Store(Bytes),
    /// The upstream failed (5xx, timeout, refused, 429): serve a stale entry if there is one,
    /// else this.
    Failed(M),
    /// Any other answer: serve it, store nothing.
    Pass(M),
}

/// How a request was answered, for `Cache-Status` and metrics.
pub enum Outcome<M> {
    /// Served from a fresh entry.
    Hit(Arc<Entry>),
    /// Served from a fresh entry near the end of its freshness; this request refreshes it.
    Refreshing(Arc<Entry>, Refresh),
    /// This request fetched and stored the entry.
    Stored(Arc<Entry>),
    /// Another request was fetching the same key; this one waited and shares its entry.
    Coalesced(Arc<Entry>),
    /// The upstream failed and an entry within `stale_if_error` was served.
    Stale(Arc<Entry>),
    /// A 200 too large to store (more than a tenth of the bound).
    TooLarge(Bytes),
    /// An answer that is not stored (shared with coalesced waiters).
    Passed(Arc<M>),
}

/// The right to refresh one entry, handed to the one request that found it in the last tenth
/// of its freshness: fetch the key again (in the background) and [`finish`](Refresh::finish).
/// It refreshes the tiers the entry was read from, so a purge meanwhile is not undone.
pub struct Refresh {
    tiers: Arc<Tiers>,
    key: Arc<str>,
    ttl: Duration,
    stale_if_error: Duration,
    max_entry: u64,
}

impl Refresh {
    /// Stores a refreshed 200 answer in place of the entry; any other outcome (a failure, an
    /// answer too large to store) leaves the entry as it is. Returns whether it stored.
    pub async fn finish<M>(self, fetched: Fetch<M>) -> bool {
        let body = match fetched {
            Fetch::Store(body) if body.len() as u64 <= self.max_entry => body,
            _ => return false,
        };
        let entry = Entry::new(&body, self.ttl, self.stale_if_error);
        self.tiers
            .stale
            .insert(self.key.clone(), entry.clone())
            .await;
        self.tiers.fresh.insert(self.key, entry).await;
        true
    }
}

enum Uncached<M> {
    TooLarge(Bytes),
    Passed(Arc<M>),
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
struct Tiers {
    fresh: Moka<Arc<str>, Arc<Entry>>,
    stale: Moka<Arc<str>, Arc<Entry>>,
}

impl Tiers {
    fn new(max_bytes: u64, stale_if_error: Duration) -> Tiers {
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

/// The answer cache of one gateway.
pub struct Cache {
    tiers: ArcSwap<Tiers>,
    max_bytes: u64,
    ttl: Duration,
    closed_ttl: Duration,
    stale_if_error: Duration,
    max_entry: u64,
    background_refresh: bool,
}

impl Cache {
    /// An empty cache bounded as configured.
    pub fn new(cfg: &CacheConfig) -> Cache {
        Cache {
            tiers: ArcSwap::from_pointee(Tiers::new(cfg.max_bytes, cfg.stale_if_error)),
            max_bytes: cfg.max_bytes,
            ttl: cfg.ttl,
            closed_ttl: cfg.closed_ttl,
            stale_if_error: cfg.stale_if_error,
            max_entry: cfg.max_bytes / 10,
            background_refresh: cfg.background_refresh,
        }
    }

    /// The key of a call: the exact upstream request (contract §8), the operation and its
    /// canonical query, never the caller. Built in one allocation: it is built on every
    /// cacheable request, hits included.
    ///
    /// ```
    /// use billing_gateway::billing::parse;
    /// use billing_gateway::cache::Cache;
    ///
    /// let org = "11111111-2222-3333-4444-555555555555".parse().expect("uuid");
    /// let key = |query: &str| {
    ///     let mut call = parse("GET", "/billing/v2beta1/consumptions", Some(query)).expect("valid");
    ///     call.apply_organization(org).expect("our organization");
    ///     Cache::key(&call)
    /// };
    /// // The organization filled in, the query canonical: equivalent requests share one entry.
    /// assert_eq!(
    ///     key("page=1&billing_period=2026-07"),
    ///     "consumptions?billing_period=2026-07&organization_id=11111111-2222-3333-4444-555555555555&page=1"
    /// );
    /// assert_eq!(key("billing_period=2026-07&pageSize=10"), key("page_size=10&billing_period=2026-07"));
    /// // Another period, or one project's consumption, is another upstream request.
    /// assert_ne!(key("billing_period=2026-06"), key("billing_period=2026-07"));
    /// assert_eq!(
    ///     key("project_id=aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"),
    ///     "consumptions?project_id=aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
    /// );
    /// ```
    pub fn key(call: &Call) -> String {
        let query_len: usize = call
            .query
            .iter()
            .map(|(name, value)| name.len() + value.len() + 2)
            .sum();
        let mut key = String::with_capacity(call.op.name.len() + 1 + query_len);
        key.push_str(call.op.name);
        key.push('?');
        call.write_query(&mut key);
        key
    }

    /// Freshness: closed billing periods change rarely; the current one (or none named) often.
    /// Last month counts as current until its invoice is issued (seen up to the 7th). The period
    /// is read from the operation's [`period`](crate::billing::Operation::period) parameter.
    pub fn ttl_for(&self, call: &Call, now: OffsetDateTime) -> Duration {
        // Last month stays open until the 7th; a validated period is `YYYY-MM`, compared as
        // numbers with no string built.
        let (mut year, mut month) = (now.year(), u8::from(now.month()));
        if now.day() <= 7 {
            (year, month) = if month == 1 {
                (year - 1, 12)
            } else {
                (year, month - 1)
            };
        }
        let closed = call
            .op
            .period
            .and_then(|param| call.get(param))
            .and_then(|period| {
                let (year, month) = period.split_once('-')?;
                Some((year.parse::<i32>().ok()?, month.parse::<u8>().ok()?))
            })
            .is_some_and(|period| period < (year, month));
        if closed { self.closed_ttl } else { self.ttl }
    }

    /// Serves `key` from memory, or runs `fetch` once for every concurrent request that misses.
    /// A hit near the end of the entry's freshness may come with the entry's [`Refresh`].
    pub async fn get_or_fetch<M, F>(&self, key: &str, ttl: Duration, fetch: F) -> Outcome<M>
    where
        M: Send + Sync + 'static,
        F: Future<Output = Fetch<M>>,
    {
        let tiers = self.tiers.load_full();
        if let Some(entry) = tiers.fresh.get(key).await {
            if entry.stale {
                return Outcome::Stale(entry);
            }
            if self.background_refresh && entry.take_refresh(Instant::now()) {
                let refresh = Refresh {
                    tiers,
                    key: Arc::from(key),
                    ttl,
                    stale_if_error: self.stale_if_error,
                    max_entry: self.max_entry,
                };
                return Outcome::Refreshing(entry, refresh);
            }
            return Outcome::Hit(entry);
        }
        // Owned only on a miss: a hit looks the key up as it was built.
        let key: Arc<str> = Arc::from(key);
        let fetched_here = AtomicBool::new(false);
        let init = async {
            fetched_here.store(true, Ordering::Relaxed);
            match fetch.await {
                Fetch::Store(body) if body.len() as u64 > self.max_entry => {
                    Err(Uncached::TooLarge(body))
                }
                Fetch::Store(body) => {
                    let entry = Entry::new(&body, ttl, self.stale_if_error);
                    tiers.stale.insert(key.clone(), entry.clone()).await;
                    Ok(entry)
                }
                Fetch::Failed(m) => match tiers.stale.get(&key).await {
                    Some(old) if old.stale_until > Instant::now() => Ok(Arc::new(Entry {
                        body: old.body.clone(),
                        stored_at: old.stored_at,
                        fresh_until: Instant::now() + STALE_HOLD.min(ttl),
                        stale_until: old.stale_until,
                        stale: true,
                        refreshing: AtomicBool::new(false),
                    })),
                    _ => Err(Uncached::Passed(Arc::new(m))),
                },
                Fetch::Pass(m) => Err(Uncached::Passed(Arc::new(m))),
            }
        };
        match tiers.fresh.try_get_with(key.clone(), init).await {
            Ok(entry) if entry.stale => Outcome::Stale(entry),
            Ok(entry) if fetched_here.load(Ordering::Relaxed) => {
                // `stale` may have refused the entry (its admission policy, under the bound)
                // before `fresh` held it, when dropping it from `fresh` found nothing to drop.
                if !tiers.stale.contains_key(&key) {
                    tiers.fresh.invalidate(&key).await;
                }
                Outcome::Stored(entry)
            }
            Ok(entry) => Outcome::Coalesced(entry),
            Err(shared) => match &*shared {
                Uncached::TooLarge(body) => Outcome::TooLarge(body.clone()),
                Uncached::Passed(m) => Outcome::Passed(m.clone()),
            },
        }
    }

    /// Drops every entry, and the tiers holding them: a fetch in flight finishes into the old
    /// tiers, which are freed when it ends.
    pub fn purge(&self) {
        self.tiers
            .store(Arc::new(Tiers::new(self.max_bytes, self.stale_if_error)));
    }

    /// The largest body stored: a tenth of the bound. A longer answer is served, not stored.
    pub fn store_limit(&self) -> u64 {
        self.max_entry
    }

    /// `(entries, bytes)` held, for metrics: what the entries cost as weighed against the bound
    /// (keys, bodies and [`ENTRY_OVERHEAD`] each); `stale` holds every stored entry.
    pub async fn size(&self) -> (u64, u64) {
        let tiers = self.tiers.load_full();
        tiers.stale.run_pending_tasks().await;
        (tiers.stale.entry_count(), tiers.stale.weighted_size())
    }
}

/// What an entry costs against the bound: key, body and bookkeeping (the key and body are
/// shared by both tiers and counted once).
fn weight(key: &str, entry: &Entry) -> u64 {
    key.len() as u64 + entry.body.len() as u64 + ENTRY_OVERHEAD
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::billing;
    use crate::config::Config;
    use secrecy::SecretString;
    use time::macros::datetime;

    #[test]
    fn closed_periods_are_those_whose_invoice_is_out() {
        let cache =
            Cache::new(&Config::new("http://x", uuid::Uuid::nil(), SecretString::from("")).cache);
        let ttl_at = |period: &str, now| {
            let call = billing::parse(
                "GET",
                "/billing/v2beta1/consumptions",
                Some(&format!("billing_period={period}")),
            )
            .expect("valid");
            cache.ttl_for(&call, now)
        };
        let (open, closed) = (cache.ttl, cache.closed_ttl);
        assert_eq!(ttl_at("2026-07", datetime!(2026-07-20 12:00 UTC)), open);
        assert_eq!(ttl_at("2026-06", datetime!(2026-07-20 12:00 UTC)), closed);
        assert_eq!(
            ttl_at("2026-06", datetime!(2026-07-03 12:00 UTC)),
            open,
            "invoice not out yet"
        );
        assert_eq!(
            ttl_at("2025-12", datetime!(2026-01-05 12:00 UTC)),
            open,
            "across a year"
        );
        assert_eq!(ttl_at("2025-11", datetime!(2026-01-05 12:00 UTC)), closed);
    }

    #[test]
    fn closed_billing_periods_get_the_closed_ttl() {
        let cache = Cache::new(&CacheConfig {
            ttl: Duration::from_secs(300),
            closed_ttl: Duration::from_secs(86_400),
            stale_if_error: Duration::from_secs(3600),
            max_bytes: 1 << 20,
            background_refresh: true,
        });
        let now = datetime!(2026-03-15 12:00 UTC);
        let ttl = |query: &str| {
            let call =
                billing::parse("GET", "/billing/v2beta1/consumptions", Some(query)).expect("valid");
            cache.ttl_for(&call, now).as_secs()
        };
        assert_eq!(ttl("billing_period=2026-02"), 86_400);
        assert_eq!(ttl("billing_period=2025-12"), 86_400);
        assert_eq!(ttl("billing_period=2026-03"), 300, "the current period");
        assert_eq!(ttl("billing_period=2026-04"), 300, "a future period");
        assert_eq!(ttl("page=1"), 300, "no period: the current one");
    }

    /// The cache reads the period parameter from the table: an operation without one is
    /// always about the current period, and naming another parameter moves freshness with it.
    #[test]
    fn the_period_parameter_comes_from_the_table() {
        let cache = Cache::new(&CacheConfig {
            ttl: Duration::from_secs(300),
            closed_ttl: Duration::from_secs(86_400),
            stale_if_error: Duration::from_secs(3600),
            max_bytes: 1 << 20,
            background_refresh: true,
        });
        let now = datetime!(2026-03-15 12:00 UTC);
        let consumptions = billing::by_name("consumptions").expect("consumptions");
        let ttl = |period: Option<&'static str>| {
            let op: &'static billing::Operation = Box::leak(Box::new(billing::Operation {
                period,
                ..consumptions.clone()
            }));
            let call = billing::Call {
                op,
                id: None,
                query: vec![
                    ("billing_period", "2026-01".to_owned()),
                    ("category_name", "2026-02".to_owned()),
                ],
            };
            cache.ttl_for(&call, now).as_secs()
        };
        assert_eq!(ttl(consumptions.period), 86_400);
        assert_eq!(ttl(None), 300, "no period parameter: the current period");
        assert_eq!(ttl(Some("category_name")), 86_400);
        assert_eq!(ttl(Some("order_by")), 300, "not given: the current period");
        for op in billing::OPERATIONS.iter().filter(|op| op.cacheable) {
            assert_eq!(op.period, Some("billing_period"), "{}", op.name);
        }
    }

    #[test]
    fn the_key_is_the_operation_and_the_canonical_query() {
        let call = billing::parse(
            "GET",
            "/billing/v2beta1/consumptions",
            Some("pageSize=10&category_name=Object+Storage&billing_period=2026-02"),
        )
        .expect("valid");
        assert_eq!(
            Cache::key(&call),
            "consumptions?billing_period=2026-02&category_name=Object+Storage&page_size=10"
        );
    }
}
