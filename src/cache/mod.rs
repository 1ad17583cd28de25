//! Upstream answers kept in memory (contract §8): one upstream call per distinct query however
//! many callers ask, stale answers when the upstream fails.
//!
//! Entries are keyed by the exact upstream request (operation and canonical query, organization
//! filled in), never by caller: authorization happens before any lookup. Two moka caches share
//! each entry: `fresh` holds it until its freshness ends and coalesces concurrent misses
//! (`try_get_with` runs one fetch per key; waiters share its result, the upstream's errors
//! included, but never a refusal of the fetching caller's own: a waiter then fetches on its own
//! turn); `stale` keeps it `stale_if_error` longer, for when the upstream fails.
//!
//! A fresh entry asked for in the last tenth of its freshness is refreshed in the background
//! (when `background_refresh` is on, the default): the request that finds it there is answered
//! from it at once and is handed the one [`Refresh`] of that entry, so a key polled steadily
//! never makes a caller wait for the upstream at expiry (nginx's `proxy_cache_background_update`,
//! Varnish's grace). A key nobody asks for is never refreshed, and a refresh that fails leaves
//! the entry as it was.
//!
//! With Redis configured ([`crate::cluster`]), the replicas share a second tier (`shared.rs`,
//! its protocol in `fill.rs`): a miss here looks there, and one replica fetches for all of them
//! while the others wait for its fill (contract §11); a purge empties every replica. Without
//! it, or while Redis cannot be reached, the cache is this process's memory alone.
//!
//! The bound is on what entries really cost, not only their bodies: each is weighed as its key,
//! its body and [`ENTRY_OVERHEAD`] (both tiers' bookkeeping), bodies are stored in allocations of
//! their own size, and `fresh` never holds an entry `stale` has dropped, so the process's cache
//! memory stays within `max_bytes` plus allocator slack (`tests/memory.rs` measures it).
//!
//! One concept a file: the tiers and an entry's weight (`tiers.rs`), freshness (`freshness.rs`),
//! background refresh (`refresh.rs`), the fill across replicas (`fill.rs`) and the shared tier
//! it speaks to (`shared.rs`), purges and the generation the replicas follow (`generation.rs`).

mod fill;
mod freshness;
mod generation;
mod refresh;
mod shared;
mod tiers;

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use secrecy::SecretString;

use crate::billing::Call;
use crate::cluster::Cluster;
use crate::config::CacheConfig;
use crate::telemetry::Metrics;
use crate::upstream::SharedTurns;
pub use generation::GENERATION_POLL;
pub use refresh::{Refresh, Refreshed};
use shared::SharedTier;
use tiers::Tiers;
pub use tiers::{ENTRY_OVERHEAD, Entry};

/// While the upstream is failing, a stale answer is re-served from `fresh` for this long before
/// the next attempt, so an outage does not make every request wait for a timeout. With Redis,
/// every replica re-serves it, and a failed fill's answer reaches the replicas that waited for
/// it, for as long.
const STALE_HOLD: Duration = Duration::from_secs(5);

/// What a fetch of a missing entry produced.
pub enum Fetch<M> {
    /// A 200 body: store it (when small enough) and serve it.
    Store(Bytes),
    /// The upstream failed (5xx, timeout, refused, 429): serve a stale entry if there is one,
    /// else this.
    Failed(M),
    /// Any other answer: serve it, store nothing.
    Pass(M),
    /// The fetching caller was refused before the upstream was asked (its own backlog, the
    /// budget's turns): its own answer (or a stale entry), never another caller's. Whoever waited
    /// for this fetch asks on its own turn.
    Refused(M),
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

/// An answer served without being stored.
enum NotStored<M> {
    TooLarge(Bytes),
    Passed(Arc<M>),
    /// The filler's own refusal, or the stale entry that covers it: for the filler alone.
    Refused(Result<Arc<Entry>, Arc<M>>),
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
    /// `wait_limit` (the upstream timeout) for another replica's fill. A lookup that takes a
    /// fill lease reserves the upstream `turns` the fill needs in the same round trip. What it
    /// writes there is signed with a key derived from `secret_key` and `organization`, and only
    /// what is signed so is served (contract §11).
    pub fn shared(
        mut self,
        cluster: Arc<Cluster>,
        turns: Option<Arc<SharedTurns>>,
        wait_limit: Duration,
        secret_key: &SecretString,
        organization: uuid::Uuid,
    ) -> Cache {
        let tier = SharedTier::new(
            cluster,
            turns,
            secret_key,
            organization,
            self.metrics.clone(),
        );
        self.shared = Some(Arc::new(tier));
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
                    taken: refresh::Taken(Some(entry.clone())),
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
        // Taken by this request's own fetch; still here when it waited for another's.
        let mut fetch = Some(fetch);
        let got = loop {
            let init = async {
                let Some(fetch) = fetch.take() else {
                    unreachable!("a request runs its own fetch once: after it, it never waits");
                };
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
                // Another caller's refusal is not this one's answer: it asks on its own turn.
                Err(shared) if matches!(*shared, NotStored::Refused(_)) && fetch.is_some() => {}
                got => break got,
            }
        };
        match got {
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
                NotStored::TooLarge(body) => Outcome::TooLarge(body.clone()),
                NotStored::Passed(m) | NotStored::Refused(Err(m)) => Outcome::Passed(m.clone()),
                NotStored::Refused(Ok(stale)) => Outcome::Stale(stale.clone()),
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
    ) -> Result<Arc<Entry>, NotStored<M>> {
        match fetched {
            Fetch::Store(body) if body.len() as u64 > self.max_entry => {
                Err(NotStored::TooLarge(body))
            }
            Fetch::Store(body) => {
                let entry = Entry::new(&body, ttl, self.stale_if_error);
                tiers.stale.insert(key.clone(), entry.clone()).await;
                Ok(entry)
            }
            Fetch::Failed(m) => match self.stale_copy(tiers, key, old).await {
                Some(old) => Ok(old.held(STALE_HOLD.min(ttl))),
                None => Err(NotStored::Passed(Arc::new(m))),
            },
            // Served stale to this caller only, and held for nobody: the next caller may well
            // have its turn.
            Fetch::Refused(m) => match self.stale_copy(tiers, key, old).await {
                Some(old) => Err(NotStored::Refused(Ok(old.held(Duration::ZERO)))),
                None => Err(NotStored::Refused(Err(Arc::new(m)))),
            },
            Fetch::Pass(m) => Err(NotStored::Passed(Arc::new(m))),
        }
    }

    /// An entry of `key` still within its stale-if-error time: this replica's, or `old` from
    /// the shared tier.
    async fn stale_copy(
        &self,
        tiers: &Tiers,
        key: &Arc<str>,
        old: Option<Arc<Entry>>,
    ) -> Option<Arc<Entry>> {
        let old = tiers.stale.get(key).await.or(old)?;
        (old.stale_until > Instant::now()).then_some(old)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::billing;

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
