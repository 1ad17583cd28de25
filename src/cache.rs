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
//! With Redis configured ([`crate::cluster`]), the replicas share a second tier
//! (`cache/shared.rs`): a miss here looks there, and one replica fetches for all of them while
//! the others wait for its fill (contract §11); a purge empties every replica. Without it, or
//! while Redis cannot be reached, the cache is this process's memory alone.
//!
//! The bound is on what entries really cost, not only their bodies: each is weighed as its key,
//! its body and [`ENTRY_OVERHEAD`] (both tiers' bookkeeping), bodies are stored in allocations of
//! their own size, and `fresh` never holds an entry `stale` has dropped, so the process's cache
//! memory stays within `max_bytes` plus allocator slack (`tests/memory.rs` measures it).

mod shared;

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use moka::Expiry;
use moka::future::Cache as Moka;
use time::OffsetDateTime;
use tokio::sync::broadcast::error::RecvError;

use crate::billing::Call;
use crate::cluster::{Cluster, Event, Unavailable};
use crate::config::CacheConfig;
use crate::telemetry::Metrics;
use shared::{Commit, Lookup, SharedTier};

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
/// the next attempt, so an outage does not make every request wait for a timeout. With Redis,
/// every replica re-serves it, and a failed fill's answer reaches the replicas that waited for
/// it, for as long.
const STALE_HOLD: Duration = Duration::from_secs(5);

/// How often a replica reads the shared generation, to catch a purge whose announcement it
/// missed (pub/sub delivers at most once): twice a second, so every replica's memory is purged
/// within the second the contract promises.
pub const GENERATION_POLL: Duration = Duration::from_millis(500);

/// Purges seen by one lookup before the replica stops looking in the shared tier and fetches
/// on its own: purges in a storm must not keep a request waiting.
const MAX_PURGES_SEEN: u32 = 3;

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

    /// This entry re-served as stale for `hold`, while the upstream fails.
    fn held(&self, hold: Duration) -> Arc<Entry> {
        Arc::new(Entry {
            body: self.body.clone(),
            stored_at: self.stored_at,
            fresh_until: Instant::now() + hold,
            stale_until: self.stale_until,
            stale: true,
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

/// An answer the cache does not store but relays to every request that waited for it: with
/// Redis, to the requests on other replicas too, so it must go through Redis as bytes.
pub trait Shareable: Sized {
    /// The answer as bytes for the other replicas, or `None` when it cannot be shared (then
    /// they fetch their own).
    fn to_shared(&self) -> Option<Vec<u8>>;
    /// An answer another replica shared.
    fn from_shared(bytes: &[u8]) -> Option<Self>;
}

/// How a request was answered, for `Cache-Status` and metrics.
pub enum Outcome<M> {
    /// Served from a fresh entry.
    Hit(Arc<Entry>),
    /// Served from a fresh entry near the end of its freshness; this request refreshes it.
    Refreshing(Arc<Entry>, Refresh),
    /// Served from an entry another replica stored (the shared tier).
    SharedHit(Arc<Entry>),
    /// This request fetched and stored the entry.
    Stored(Arc<Entry>),
    /// This request fetched and stored the entry after the replica filling it went silent
    /// (its lease lapsed).
    TakenOver(Arc<Entry>),
    /// Another request was fetching the same key; this one waited and shares its entry.
    Coalesced(Arc<Entry>),
    /// Another replica was fetching the same key; this one waited and shares its entry.
    CoalescedRemote(Arc<Entry>),
    /// The upstream failed and an entry within `stale_if_error` was served.
    Stale(Arc<Entry>),
    /// A 200 too large to store (more than a tenth of the bound).
    TooLarge(Bytes),
    /// An answer that is not stored (shared with coalesced waiters).
    Passed(Arc<M>),
}

/// Where the entry a request got came from, when its own task produced it.
#[derive(Clone, Copy)]
enum Via {
    Stored,
    TakenOver,
    Shared,
    Remote,
}

/// What a background refresh came to.
pub enum Refreshed<M> {
    /// A new answer replaced the entry.
    Stored,
    /// Another replica refreshed the entry, or is refreshing it: its answer is or will be in
    /// the shared tier.
    Shared,
    /// The refresh failed (or its answer is too long to store): the entry stays as it was.
    Kept(Fetch<M>),
}

/// The right to refresh one entry, handed to the one request that found it in the last tenth
/// of its freshness: fetch the key again (in the background) and [`run`](Refresh::run) it.
/// It refreshes the tiers the entry was read from, so a purge meanwhile is not undone.
pub struct Refresh {
    tiers: Arc<Tiers>,
    key: Arc<str>,
    ttl: Duration,
    stale_if_error: Duration,
    max_entry: u64,
    shared: Option<Arc<SharedTier>>,
}

impl Refresh {
    /// Refreshes the entry with what `fetch` brings, unless another replica has refreshed it
    /// already or is doing so (then that answer is taken, or left to it). Anything but a 200
    /// small enough to store leaves the entry as it is.
    pub async fn run<M, F>(self, fetch: F) -> Refreshed<M>
    where
        F: Future<Output = Fetch<M>>,
    {
        let Some(shared) = self.shared.clone() else {
            return self.store(fetch.await, None).await;
        };
        let key = shared.key(&self.key);
        match shared.lookup(&key, self.ttl / 10, false).await {
            Ok(Lookup::Fresh(entry)) => {
                self.insert(entry).await;
                Refreshed::Shared
            }
            Ok(Lookup::Fill(lease, _)) => self.store(fetch.await, Some(lease)).await,
            Ok(_) => Refreshed::Shared,
            // This replica on its own: it refreshes its own memory.
            Err(Unavailable) => self.store(fetch.await, None).await,
        }
    }

    async fn store<M>(self, fetched: Fetch<M>, lease: Option<shared::Lease>) -> Refreshed<M> {
        let body = match fetched {
            Fetch::Store(body) if body.len() as u64 <= self.max_entry => body,
            kept => {
                if let Some(lease) = lease {
                    lease.commit(Commit::Nothing).await;
                }
                return Refreshed::Kept(kept);
            }
        };
        let entry = Entry::new(&body, self.ttl, self.stale_if_error);
        if let Some(lease) = lease {
            lease
                .commit(Commit::Store {
                    body: &body,
                    ttl: self.ttl,
                    stale_if_error: self.stale_if_error,
                })
                .await;
        }
        self.insert(entry).await;
        Refreshed::Stored
    }

    async fn insert(self, entry: Arc<Entry>) {
        self.tiers
            .stale
            .insert(self.key.clone(), entry.clone())
            .await;
        self.tiers.fresh.insert(self.key, entry).await;
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
    /// The tier the replicas share, with Redis.
    shared: Option<Arc<SharedTier>>,
    /// The longest a request waits for another replica's fill before fetching on its own: as
    /// long as that replica's own fetch may take.
    wait_limit: Duration,
    metrics: Arc<Metrics>,
}

impl Cache {
    /// An empty cache bounded as configured, in this process's memory alone.
    pub fn new(cfg: &CacheConfig, metrics: Arc<Metrics>) -> Cache {
        Cache {
            tiers: ArcSwap::from_pointee(Tiers::new(cfg.max_bytes, cfg.stale_if_error)),
            max_bytes: cfg.max_bytes,
            ttl: cfg.ttl,
            closed_ttl: cfg.closed_ttl,
            stale_if_error: cfg.stale_if_error,
            max_entry: cfg.max_bytes / 10,
            background_refresh: cfg.background_refresh,
            shared: None,
            wait_limit: Duration::ZERO,
            metrics,
        }
    }

    /// The same, with the tier the replicas share through `cluster`; a request waits at most
    /// `wait_limit` (the upstream timeout) for another replica's fill.
    pub fn shared(mut self, cluster: Arc<Cluster>, wait_limit: Duration) -> Cache {
        self.shared = Some(Arc::new(SharedTier::new(cluster)));
        self.wait_limit = wait_limit;
        self
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

    /// Serves `key` from memory, or runs the fetch `fetch` builds once for every concurrent
    /// request that misses (with Redis, for every replica's); a hit never calls `fetch`. A hit
    /// near the end of the entry's freshness may come with the entry's [`Refresh`].
    pub async fn get_or_fetch<M, F, Fut>(&self, key: &str, ttl: Duration, fetch: F) -> Outcome<M>
    where
        M: Shareable + Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Fetch<M>>,
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
                    shared: self.shared.clone(),
                };
                return Outcome::Refreshing(entry, refresh);
            }
            return Outcome::Hit(entry);
        }
        // A miss's future (the upstream call, the shared tier's wait) is kilobytes long, and
        // every future around this one would be as long, copied at each move: boxed, a hit
        // never builds or moves it.
        Box::pin(self.miss(tiers, key, ttl, fetch)).await
    }

    /// A miss: one fetch for every concurrent request (and, with Redis, every replica).
    async fn miss<M, F, Fut>(
        &self,
        tiers: Arc<Tiers>,
        key: &str,
        ttl: Duration,
        fetch: F,
    ) -> Outcome<M>
    where
        M: Shareable + Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Fetch<M>>,
    {
        // Owned only on a miss: a hit looks the key up as it was built.
        let key: Arc<str> = Arc::from(key);
        let via = OnceLock::new();
        let init = async {
            match &self.shared {
                Some(shared) => {
                    self.fill_shared(shared, &tiers, &key, ttl, fetch, &via)
                        .await
                }
                None => {
                    let _ = via.set(Via::Stored);
                    self.fill(&tiers, &key, ttl, fetch().await, None).await
                }
            }
        };
        match tiers.fresh.try_get_with(key.clone(), init).await {
            Ok(entry) if entry.stale => Outcome::Stale(entry),
            Ok(entry) => match via.get() {
                None => Outcome::Coalesced(entry),
                Some(Via::Shared) => Outcome::SharedHit(entry),
                Some(Via::Remote) => Outcome::CoalescedRemote(entry),
                Some(via @ (Via::Stored | Via::TakenOver)) => {
                    // `stale` may have refused the entry (its admission policy, under the
                    // bound) before `fresh` held it, when dropping it from `fresh` found
                    // nothing to drop.
                    if !tiers.stale.contains_key(&key) {
                        tiers.fresh.invalidate(&key).await;
                    }
                    match via {
                        Via::TakenOver => Outcome::TakenOver(entry),
                        _ => Outcome::Stored(entry),
                    }
                }
            },
            Err(shared) => match &*shared {
                Uncached::TooLarge(body) => Outcome::TooLarge(body.clone()),
                Uncached::Passed(m) => Outcome::Passed(m.clone()),
            },
        }
    }

    /// What a fetch brings, made an entry (stored in `stale`, for `fresh` to hold), a stale
    /// entry re-served (this replica's old copy, or `old` from the shared tier), or an answer
    /// that is not stored.
    async fn fill<M>(
        &self,
        tiers: &Tiers,
        key: &Arc<str>,
        ttl: Duration,
        fetched: Fetch<M>,
        old: Option<Arc<Entry>>,
    ) -> Result<Arc<Entry>, Uncached<M>> {
        match fetched {
            Fetch::Store(body) if body.len() as u64 > self.max_entry => {
                Err(Uncached::TooLarge(body))
            }
            Fetch::Store(body) => {
                let entry = Entry::new(&body, ttl, self.stale_if_error);
                tiers.stale.insert(key.clone(), entry.clone()).await;
                Ok(entry)
            }
            Fetch::Failed(m) => {
                let now = Instant::now();
                let old = tiers.stale.get(key).await.or(old);
                match old {
                    Some(old) if old.stale_until > now => Ok(old.held(STALE_HOLD.min(ttl))),
                    _ => Err(Uncached::Passed(Arc::new(m))),
                }
            }
            Fetch::Pass(m) => Err(Uncached::Passed(Arc::new(m))),
        }
    }

    /// A miss with the shared tier: its entry, or the fill lease (this replica fetches for all
    /// and shares what it got), or a wait for the replica that holds the lease. Redis out of
    /// reach, purges in a storm or a wait past `wait_limit`: this replica fetches on its own.
    async fn fill_shared<M, F, Fut>(
        &self,
        shared: &SharedTier,
        tiers: &Tiers,
        key: &Arc<str>,
        ttl: Duration,
        fetch: F,
        via: &OnceLock<Via>,
    ) -> Result<Arc<Entry>, Uncached<M>>
    where
        M: Shareable,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Fetch<M>>,
    {
        // Subscribed before the first look, so the end of a fill cannot slip in between.
        let mut events = shared.events();
        let started = Instant::now();
        let (mut waited, mut purges) = (false, 0);
        let got = |waited: bool, how: Via| {
            if waited {
                self.metrics
                    .observe_cache_fill_wait(started.elapsed().as_secs_f64());
            }
            let _ = via.set(how);
        };
        loop {
            let shared_key = shared.key(key);
            match shared.lookup(&shared_key, Duration::ZERO, waited).await {
                Ok(Lookup::Purged(generation)) if purges < MAX_PURGES_SEEN => {
                    purges += 1;
                    self.adopt(shared, generation, "generation");
                }
                Ok(Lookup::Fresh(entry)) => {
                    got(waited, if waited { Via::Remote } else { Via::Shared });
                    if !entry.stale {
                        tiers.stale.insert(key.clone(), entry.clone()).await;
                    }
                    return Ok(entry);
                }
                Ok(Lookup::Failed(answer)) => match M::from_shared(&answer) {
                    Some(answer) => {
                        got(waited, Via::Remote);
                        return Err(Uncached::Passed(Arc::new(answer)));
                    }
                    None => break,
                },
                Ok(Lookup::Fill(lease, old)) => {
                    got(waited, if waited { Via::TakenOver } else { Via::Stored });
                    let filled = self.fill(tiers, key, ttl, fetch().await, old).await;
                    let answer = match &filled {
                        Err(Uncached::Passed(m)) => m.to_shared(),
                        _ => None,
                    };
                    let commit = match (&filled, &answer) {
                        (Ok(entry), _) if entry.stale => Commit::Stale(STALE_HOLD.min(ttl)),
                        (Ok(entry), _) => Commit::Store {
                            body: &entry.body,
                            ttl,
                            stale_if_error: self.stale_if_error,
                        },
                        (Err(_), Some(answer)) => Commit::Failed(answer, STALE_HOLD),
                        (Err(_), None) => Commit::Nothing,
                    };
                    lease.commit(commit).await;
                    return filled;
                }
                Ok(Lookup::Wait(left)) if started.elapsed() < self.wait_limit => {
                    waited = true;
                    let poll = left.clamp(Duration::from_millis(1), shared::POLL);
                    SharedTier::wait(&mut events, &shared_key, poll).await;
                }
                _ => break,
            }
        }
        got(waited, Via::Stored);
        self.fill(tiers, key, ttl, fetch().await, None).await
    }

    /// Makes `generation` this replica's, dropping its memory when that is news.
    fn adopt(&self, shared: &SharedTier, generation: u64, reason: &'static str) {
        if shared.adopt(generation) {
            self.flush(reason);
        }
        self.metrics.set_cache_generation(generation);
    }

    /// Drops every entry of this replica, and the tiers holding them: a fetch in flight
    /// finishes into the old tiers, which are freed when it ends.
    fn flush(&self, reason: &'static str) {
        self.tiers
            .store(Arc::new(Tiers::new(self.max_bytes, self.stale_if_error)));
        self.metrics.count_cache_flush(reason);
    }

    /// Empties the cache: this replica's memory, and with Redis every replica's (a new
    /// generation, announced). `Ok(Some((generation, replicas notified)))` with Redis,
    /// `Ok(None)` without; `Err` when Redis could not be reached: only this replica's memory
    /// was emptied.
    pub async fn purge(&self) -> Result<Option<(u64, u64)>, Unavailable> {
        let Some(shared) = &self.shared else {
            self.flush("local");
            return Ok(None);
        };
        let purged = shared.purge().await;
        self.flush("local");
        let (generation, notified) = purged?;
        shared.adopt(generation);
        self.metrics.set_cache_generation(generation);
        Ok(Some((generation, notified)))
    }

    /// Keeps this replica's memory in the generation of the shared tier, for as long as the
    /// app runs: purges announced by other replicas, and a read of the generation every
    /// [`GENERATION_POLL`] for an announcement that was lost (or a subscription that was
    /// down). Without Redis there is nothing to follow.
    pub async fn follow_purges(&self) -> Infallible {
        let Some(shared) = &self.shared else {
            return std::future::pending().await;
        };
        let mut events = shared.events();
        let mut poll = tokio::time::interval(GENERATION_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = poll.tick() => {
                    if let Ok(generation) = shared.current_generation().await {
                        self.adopt(shared, generation, "generation");
                    }
                }
                event = events.recv() => match event {
                    Ok(Event::Message(message)) => {
                        let purged = message.strip_prefix("purge ").and_then(|g| g.parse().ok());
                        if let Some(generation) = purged {
                            self.adopt(shared, generation, "message");
                        }
                    }
                    // Announcements may have been lost: look now rather than at the next tick.
                    Ok(Event::Subscribed) | Err(RecvError::Lagged(_)) => poll.reset_immediately(),
                    Ok(_) => {}
                    Err(RecvError::Closed) => return std::future::pending().await,
                },
            }
        }
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
        let cache = Cache::new(
            &Config::new("http://x", uuid::Uuid::nil(), SecretString::from("")).cache,
            Arc::default(),
        );
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
        let cache = Cache::new(
            &CacheConfig {
                ttl: Duration::from_secs(300),
                closed_ttl: Duration::from_secs(86_400),
                stale_if_error: Duration::from_secs(3600),
                max_bytes: 1 << 20,
                background_refresh: true,
            },
            Arc::default(),
        );
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
        let cache = Cache::new(
            &CacheConfig {
                ttl: Duration::from_secs(300),
                closed_ttl: Duration::from_secs(86_400),
                stale_if_error: Duration::from_secs(3600),
                max_bytes: 1 << 20,
                background_refresh: true,
            },
            Arc::default(),
        );
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
