//! Each principal's own rate held across replicas (contract §11): one GCRA per principal and
//! rate in Redis, counting every request, cache hits included. One Redis round trip per hit
//! cost more than the hit path may (issue 12: Redis on/off 0.76–0.79 of the throughput), so a
//! replica leases up to [`lease_size`] requests at once and spends them locally; and because a
//! hit that found its lease spent still waited for the next (issue 21: p99 3.6× without Redis),
//! a lease half spent is topped up in the background, with what was spent: a busy caller's hits
//! find requests in hand and never wait on Redis. A caller back after a pause spends the one
//! request kept past the lapse while its next lease is fetched (issue 21: a miss then asks
//! Redis once, for its lookup). Only a caller that outruns a top-up, or comes back with nothing
//! kept (its first request, a lease of one), waits for one; a cacheable call meanwhile sends its
//! cache lookup ([`SharedRates::begin`]). A refusal is remembered here until it ends, so a
//! throttled caller costs no Redis call either (Envoy ratelimit's local cache of over-limit
//! keys).
//!
//! The slack leasing brings, with N replicas and leases of k: every request spent was paid for
//! in Redis first, and a replica never holds more than k unspent (a top-up brings back only
//! what was spent), so no more pass than the GCRA grants, save that requests held before a
//! window may be spent in it: at most N·k more in any window. What is held lapses a second
//! (`LEASE_LIFE`) after the last lease or top-up came, all but one request, kept until spent.
//! The other way, a caller can be refused up to (N−1)·k requests early (held unspent on the
//! other replicas), and a lease that lapses unspent loses at most k − 1.
//!
//! While Redis cannot be asked, the replica counts alone ([`LocalRates`]) at its
//! [`share`](crate::cluster::share) of every rate.

use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use base64::Engine;
use redis::Script;
use sha2::{Digest, Sha256};
use tokio::sync::Notify;
use tokio::sync::futures::Notified;

use super::LocalRates;
use crate::cluster::{Cluster, Op, Unavailable, share};
use crate::config::Rate;

static GCRA: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/principal_gcra.lua")));

/// Principals held at once (lease or refusal); past it the least used are forgotten (and cost a
/// Redis call again, which decides as before).
const REMEMBERED: u64 = 10_000;

/// How long what is held may be spent after the last lease or top-up came: a caller that
/// pauses longer loses what it left but one request (paid for already), so unspent leases add
/// at most one request to a later burst.
const LEASE_LIFE: Duration = Duration::from_secs(1);

/// The most a replica leases at once. A busy caller's hits spend the half held while the
/// spent half is fetched again, so k/2 hits must outlast a Redis round trip: at 8, one caller on
/// 32 connections got half its throughput without Redis (bench/RESULTS.md); at 64 (one call per
/// 32 hits) the top-ups cost 0.74× of the throughput without Redis, at 128 0.86× (issue 21).
/// Only rates over 768/s (N = 3) reach it; below, k stays a quarter of the replica's share of
/// the burst.
const LEASE_MAX: u32 = 128;

/// k, how many requests a replica leases at once for `rate` among `replicas`: a quarter of each
/// replica's share of the burst, from 1 (a lease of one is the plain check) to 128, so the slack
/// above stays small beside the burst.
pub fn lease_size(rate: Rate, replicas: u32) -> u32 {
    let burst = rate.count.saturating_mul(2);
    (burst / replicas.max(1).saturating_mul(4)).clamp(1, LEASE_MAX)
}

/// What this replica holds for one principal and rate, and the calls waiting for a lease.
#[derive(Default)]
struct Holding {
    held: Mutex<Held>,
    /// Woken when a fetch lands.
    landed: Notify,
}

#[derive(Debug, Default)]
struct Held {
    /// Requests paid for in Redis, to spend before `until` (one of them after it too).
    left: u32,
    until: Option<Instant>,
    /// Redis refused more until then: spend what is left, then refuse without asking.
    refused: Option<Instant>,
    /// A lease or top-up is being fetched (one at a time, in its own task).
    fetching: bool,
    /// Fetches that found Redis unavailable: a call that waited on one decides alone.
    failed: u64,
}

impl Held {
    /// What is left to spend `now`: once the lease lapsed, one request of it at most, kept so
    /// that a caller back after a pause is not kept waiting on Redis for its rate (it was paid
    /// for there, so it adds nothing to the slack below).
    fn left(&mut self, now: Instant) -> u32 {
        if self.lapsed(now) {
            self.left = self.left.min(1);
        }
        self.left
    }

    fn lapsed(&self, now: Instant) -> bool {
        self.until.is_none_or(|until| now >= until)
    }

    fn refused(&self, now: Instant) -> Option<Duration> {
        self.refused
            .and_then(|until| until.checked_duration_since(now))
            .filter(|wait| !wait.is_zero())
    }
}

impl Holding {
    fn held(&self) -> MutexGuard<'_, Held> {
        // Plain values, each change made whole under the lock: a panic cannot leave them torn.
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Principals' rates kept in Redis for every replica.
pub struct SharedRates {
    cluster: Arc<Cluster>,
    /// Key → what is held for it. A fetch runs in a task of its own, so a call that leaves does
    /// not cancel what the others wait for, and a top-up keeps no call waiting.
    held: moka::sync::Cache<String, Arc<Holding>>,
    /// Every rate at this replica's share, for the N it was made with: what counts while Redis
    /// cannot be asked.
    alone: Mutex<Option<(u32, Arc<LocalRates>)>>,
}

impl SharedRates {
    /// Rates kept through `cluster`.
    pub fn new(cluster: Arc<Cluster>) -> SharedRates {
        cluster.preload(&GCRA);
        SharedRates {
            cluster,
            held: moka::sync::Cache::builder()
                .max_capacity(REMEMBERED)
                // Longer than any refusal of a sane rate; what is held past its end is ignored.
                .time_to_live(Duration::from_secs(3600))
                .build(),
            alone: Mutex::new(None),
        }
    }

    /// Counts one request of `subject` at `rate`, or at `default` when its policy sets none, as
    /// [`LocalRates::check`] does, while Redis cannot be asked: this replica alone, at its share
    /// of either rate.
    pub fn alone(&self, subject: &str, default: Rate, rate: Option<Rate>) -> Result<(), Duration> {
        let n = self.cluster.replicas();
        let alone = {
            let mut alone = self.alone.lock().unwrap_or_else(|e| e.into_inner());
            match &*alone {
                Some((made_for, local)) if *made_for == n => local.clone(),
                _ => {
                    let local = Arc::new(LocalRates::new(share(default, n)));
                    alone.insert((n, local)).1.clone()
                }
            }
        };
        alone.check(subject, rate.map(|r| share(r, n)))
    }

    /// Counts one request of `subject` at `rate` (burst: twice its count, as the local limits):
    /// `Ok(Ok(()))` allowed, `Ok(Err(wait))` refused for `wait`, or [`Unavailable`] when Redis
    /// cannot be asked (the caller limits alone). Waits for Redis only when nothing is held.
    pub async fn check(
        &self,
        subject: &str,
        rate: Rate,
    ) -> Result<Result<(), Duration>, Unavailable> {
        match self.begin(subject, rate) {
            Begun::Decided(decided) => Ok(decided),
            Begun::Landing(landing) => landing.verdict().await,
        }
    }

    /// Begins counting one request of `subject` at `rate`: decided at once from what is held,
    /// or waiting for a lease from Redis, this request's to await (it may send other Redis
    /// work meanwhile, which then shares the round trip).
    pub fn begin(&self, subject: &str, rate: Rate) -> Begun<'_> {
        let key = key(subject, rate);
        let landing = Landing {
            holding: self.held.get_with_by_ref(&key, Default::default),
            k: lease_size(rate, self.cluster.replicas()),
            rates: self,
            key,
            rate,
            failed: None,
        };
        let failed = match landing.now() {
            Ok(decided) => return Begun::Decided(decided),
            Err((_, failed)) => failed,
        };
        Begun::Landing(Landing {
            failed: Some(failed),
            ..landing
        })
    }

    /// Fetches up to `n` requests for `holding` in a task of its own, adding them to what is
    /// held (or noting the refusal, or that Redis could not be asked), then wakes the waiters.
    fn fetch(&self, held: &mut Held, holding: &Arc<Holding>, key: &str, rate: Rate, n: u32) {
        held.fetching = true;
        let (cluster, holding, key) = (self.cluster.clone(), holding.clone(), key.to_owned());
        tokio::spawn(async move {
            let fetched = lease(&cluster, &key, rate, n).await;
            let mut held = holding.held();
            let now = Instant::now();
            held.fetching = false;
            match fetched {
                Ok(Ok(granted)) => {
                    held.left = held.left(now) + granted;
                    held.until = Some(now + LEASE_LIFE);
                    held.refused = None;
                }
                Ok(Err(wait)) => held.refused = Some(now + wait),
                Err(Unavailable) => held.failed += 1,
            }
            drop(held);
            holding.landed.notify_waiters();
        });
    }

    /// Takes up to `k` requests of `subject` at `rate` from Redis: how many were granted (at
    /// least one), or how long until one would be.
    pub async fn lease(
        &self,
        subject: &str,
        rate: Rate,
        k: u32,
    ) -> Result<Result<u32, Duration>, Unavailable> {
        lease(&self.cluster, &key(subject, rate), rate, k).await
    }
}

/// How a count began.
pub enum Begun<'a> {
    /// From what this replica holds.
    Decided(Result<(), Duration>),
    /// Nothing held: a lease is on its way from Redis.
    Landing(Landing<'a>),
}

/// A count waiting for a lease from Redis.
pub struct Landing<'a> {
    rates: &'a SharedRates,
    key: String,
    holding: Arc<Holding>,
    rate: Rate,
    k: u32,
    /// The failed fetches when the count began: one more, and Redis cannot be asked.
    failed: Option<u64>,
}

impl Landing<'_> {
    /// The count decided from what is held now; or, nothing held, the landing to wait for (a
    /// fetch started when none is in flight) and the failed fetches so far.
    fn now(&self) -> Result<Result<(), Duration>, (Notified<'_>, u64)> {
        let (rates, holding, k) = (self.rates, &self.holding, self.k);
        let mut held = holding.held();
        let now = Instant::now();
        let lapsed = held.lapsed(now);
        let left = held.left(now);
        if left > 0 {
            held.left -= 1;
            // Half spent: the spent half is fetched again while the rest is spent. Not
            // with nothing left (k = 1): a request paid for ahead that never comes would
            // refuse one early, where a lease of one is meant as the plain check. The
            // one kept past a lapse starts a lease, so the requests after it find one.
            let half_spent = (1..=k / 2).contains(&held.left);
            if (half_spent || lapsed) && !held.fetching && held.refused(now).is_none() {
                let top_up = k.saturating_sub(held.left).max(1);
                rates.fetch(&mut held, holding, &self.key, self.rate, top_up);
            }
            return Ok(Ok(()));
        }
        if let Some(wait) = held.refused(now) {
            return Ok(Err(wait));
        }
        // A fetch that failed since this count began is its answer: none started again.
        if !held.fetching && self.failed.is_none_or(|f| f == held.failed) {
            rates.fetch(&mut held, holding, &self.key, self.rate, k);
        }
        // Made under the lock, so the landing cannot slip in before it listens.
        Err((holding.landed.notified(), held.failed))
    }

    /// Waits for the lease (no longer than the request's Redis time) and decides: allowed,
    /// refused for how long, or [`Unavailable`].
    pub async fn verdict(self) -> Result<Result<(), Duration>, Unavailable> {
        loop {
            let (landed, failed) = match self.now() {
                Ok(decided) => return Ok(decided),
                Err(landed) => landed,
            };
            if self.failed.is_some_and(|before| before != failed)
                || self.rates.cluster.within(landed).await.is_none()
                || self.holding.held().failed != failed
            {
                return Err(Unavailable);
            }
        }
    }
}

/// [`SharedRates::lease`], for the principal's `key`.
async fn lease(
    cluster: &Cluster,
    key: &str,
    rate: Rate,
    k: u32,
) -> Result<Result<u32, Duration>, Unavailable> {
    let mut gcra = GCRA.prepare_invoke();
    gcra.key(cluster.key(key))
        .arg(u64::try_from(rate.pace().as_micros()).unwrap_or(u64::MAX))
        .arg(rate.count.saturating_mul(2).max(1))
        .arg(k.max(1));
    match cluster.invoke::<(u32, u64)>(Op::Principal, &gcra).await? {
        (0, wait) => Ok(Err(Duration::from_micros(wait))),
        (granted, _) => Ok(Ok(granted)),
    }
}

/// `p:{count}/{per ms}:{subject hashed}`: one key per principal and rate (policy rates apart
/// from the default), with no user's name in Redis.
fn key(subject: &str, rate: Rate) -> String {
    let hash = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(subject));
    format!("p:{}/{}:{}", rate.count, rate.per.as_millis(), &hash[..22])
}
