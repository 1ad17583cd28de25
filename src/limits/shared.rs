//! Each principal's own rate held across replicas (contract §11): one GCRA per principal and
//! rate in Redis, counting every request, cache hits included. One Redis round trip per hit
//! cost more than the hit path may (issue 12: Redis on/off 0.76–0.79 of the throughput), so a
//! replica leases up to [`lease_size`] requests at once and spends them locally. A refusal is
//! remembered here until it ends, so a throttled caller costs no Redis call either (Envoy
//! ratelimit's local cache of over-limit keys).
//!
//! The slack leasing brings, with N replicas and leases of k: every request spent was paid for
//! in Redis first, so no more pass than the GCRA grants, save that a lease taken before a
//! window may be spent in it: at most N·k more in any window, and none older than a second
//! (`LEASE_LIFE`). The other way, a caller can be refused up to (N−1)·k requests early (held
//! unspent on the other replicas), and a lease that dies unspent loses at most k.
//!
//! While Redis cannot be asked, the replica counts alone ([`LocalRates`]) at its
//! [`share`](crate::cluster::share) of every rate.

use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use base64::Engine;
use redis::Script;
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

use super::LocalRates;
use crate::cluster::{Cluster, Op, Unavailable, share};
use crate::config::Rate;

static GCRA: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/principal_gcra.lua")));

/// Principals held at once (lease or refusal); past it the least used are forgotten (and cost a
/// Redis call again, which decides as before).
const REMEMBERED: u64 = 10_000;

/// How long a lease may be spent: a caller that pauses longer loses what it left, so unspent
/// leases never add to a later burst.
const LEASE_LIFE: Duration = Duration::from_secs(1);

/// The most a replica leases at once. One principal's hits on a replica wait for each other
/// while a lease is fetched, so they are held to `k` per Redis round trip: at 8, one caller on
/// 32 connections got half its throughput without Redis (bench/RESULTS.md); at 64 the round
/// trip no longer bounds it, and the slack stays a quarter of the burst.
const LEASE_MAX: u32 = 64;

/// k, how many requests a replica leases at once for `rate` among `replicas`: a quarter of each
/// replica's share of the burst, from 1 (a lease of one is the plain check) to 64, so the slack
/// above stays small beside the burst.
pub fn lease_size(rate: Rate, replicas: u32) -> u32 {
    let burst = rate.count.saturating_mul(2);
    (burst / replicas.max(1).saturating_mul(4)).clamp(1, LEASE_MAX)
}

/// What this replica holds for one principal and rate.
#[derive(Debug, Clone, Copy)]
enum Held {
    /// `left` requests paid for in Redis, to spend before `until`.
    Lease { left: u32, until: Instant },
    /// Refused by Redis until then.
    Refused { until: Instant },
}

/// Principals' rates kept in Redis for every replica.
pub struct SharedRates {
    cluster: Arc<Cluster>,
    /// Key → what is held for it; its lock makes one Redis call at a time per principal, the
    /// other hits waiting for it and then spending from its lease.
    held: moka::sync::Cache<String, Arc<Mutex<Option<Held>>>>,
    /// Every rate at this replica's share, for the N it was made with: what counts while Redis
    /// cannot be asked.
    alone: std::sync::Mutex<Option<(u32, Arc<LocalRates>)>>,
}

impl SharedRates {
    /// Rates kept through `cluster`.
    pub fn new(cluster: Arc<Cluster>) -> SharedRates {
        SharedRates {
            cluster,
            held: moka::sync::Cache::builder()
                .max_capacity(REMEMBERED)
                // Longer than any refusal of a sane rate; what is held past its end is ignored.
                .time_to_live(Duration::from_secs(3600))
                .build(),
            alone: std::sync::Mutex::new(None),
        }
    }

    /// Counts one request of `subject` at `rate`, or at `default` when its policy sets none, as
    /// [`LocalRates::check`] does: allowed, or refused for how long. Redis out of reach, it
    /// counts alone, at this replica's share of either rate.
    pub async fn count(
        &self,
        subject: &str,
        default: Rate,
        rate: Option<Rate>,
    ) -> Result<(), Duration> {
        match self.check(subject, rate.unwrap_or(default)).await {
            Ok(decided) => decided,
            Err(Unavailable) => {
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
        }
    }

    /// Counts one request of `subject` at `rate` (burst: twice its count, as the local limits):
    /// `Ok(Ok(()))` allowed, `Ok(Err(wait))` refused for `wait`, or [`Unavailable`] when Redis
    /// cannot be asked (the caller limits alone).
    pub async fn check(
        &self,
        subject: &str,
        rate: Rate,
    ) -> Result<Result<(), Duration>, Unavailable> {
        let key = key(subject, rate);
        let entry = self.held.get_with_by_ref(&key, Default::default);
        let mut held = entry.lock().await;
        // After the wait for the lock: what the call before this one brought is what counts.
        let now = Instant::now();
        match &mut *held {
            Some(Held::Lease { left, until }) if *left > 0 && now < *until => {
                *left -= 1;
                return Ok(Ok(()));
            }
            Some(Held::Refused { until }) if now < *until => return Ok(Err(*until - now)),
            _ => {}
        }
        let k = lease_size(rate, self.cluster.replicas());
        match self.lease(subject, rate, k).await? {
            Ok(granted) => {
                *held = Some(Held::Lease {
                    left: granted - 1,
                    until: now + LEASE_LIFE,
                });
                Ok(Ok(()))
            }
            Err(wait) => {
                *held = Some(Held::Refused { until: now + wait });
                Ok(Err(wait))
            }
        }
    }

    /// Takes up to `k` requests of `subject` at `rate` from Redis: how many were granted (at
    /// least one), or how long until one would be.
    pub async fn lease(
        &self,
        subject: &str,
        rate: Rate,
        k: u32,
    ) -> Result<Result<u32, Duration>, Unavailable> {
        let mut gcra = GCRA.prepare_invoke();
        gcra.key(self.cluster.key(&key(subject, rate)))
            .arg(u64::try_from(rate.pace().as_micros()).unwrap_or(u64::MAX))
            .arg(rate.count.saturating_mul(2).max(1))
            .arg(k.max(1));
        match self
            .cluster
            .invoke::<(u32, u64)>(Op::Principal, &gcra)
            .await?
        {
            (0, wait) => Ok(Err(Duration::from_micros(wait))),
            (granted, _) => Ok(Ok(granted)),
        }
    }
}

/// `p:{count}/{per ms}:{subject hashed}`: one key per principal and rate (policy rates apart
/// from the default), with no user's name in Redis.
fn key(subject: &str, rate: Rate) -> String {
    let hash = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(subject));
    format!("p:{}/{}:{}", rate.count, rate.per.as_millis(), &hash[..22])
}
