//! Each principal's own rate, checked by the proxy right after authentication (or, for a
//! cacheable call whose lease is on its way from Redis, decided with its cache lookup and before
//! anything is served), so cache hits count too (the upstream budget, which only real upstream
//! calls spend, is [`crate::upstream`]'s). Principals are keyed by their authenticated subject
//! (or gateway key name), never by address: behind a load balancer every caller shares one.
//!
//! The rates are counted in this process ([`LocalRates`]), or, when replicas share through
//! Redis, for all of them together ([`SharedRates`], `shared.rs`); both answer the same
//! question the same way: allowed, or refused for how long.

mod shared;

pub use shared::{Begun, Landing, SharedRates, lease_size};

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::cluster::Cluster;
use crate::config::Rate;
use crate::error::{Error, Throttle, retry_after_secs};

/// Forget principals idle long enough to be back at a full burst every this many checks, so
/// the table stays as small as the set of active callers.
const SWEEP_EVERY: u64 = 4096;

type Keyed = DefaultKeyedRateLimiter<String>;

/// A per-principal limiter for `rate`, with a burst of twice `count` because the SDKs fetch
/// pages concurrently.
fn keyed(rate: Rate) -> Keyed {
    let burst = NonZeroU32::new(rate.count.saturating_mul(2)).unwrap_or(NonZeroU32::MIN);
    let quota = Quota::with_period(rate.pace())
        .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
        .allow_burst(burst);
    RateLimiter::keyed(quota)
}

/// Each principal's own rate: the configured one, or the one its policy grants set
/// (`rate = "2/s"` on a role or key); across replicas when they share through Redis.
pub struct PrincipalLimits {
    rate: Rate,
    rates: Rates,
}

/// Where the requests are counted.
enum Rates {
    /// In this process.
    Local(LocalRates),
    /// In Redis for every replica (or, out of reach, at this replica's share).
    Shared(SharedRates),
}

impl PrincipalLimits {
    /// A limiter for `rate` per principal.
    pub fn new(rate: Rate) -> PrincipalLimits {
        PrincipalLimits {
            rate,
            rates: Rates::Local(LocalRates::new(rate)),
        }
    }

    /// A limiter for `rate` per principal across every replica sharing through `cluster`.
    pub fn shared(rate: Rate, cluster: Arc<Cluster>) -> PrincipalLimits {
        PrincipalLimits {
            rate,
            rates: Rates::Shared(SharedRates::new(cluster)),
        }
    }

    /// Counts one request against `subject`, at `rate` when its policy sets one; past it, a 429
    /// saying when to come back. Shared, it asks Redis for a few requests at a time, ahead of need
    /// (none while the caller is refused); Redis out of reach, it counts alone at the rate divided
    /// by N.
    pub async fn check_principal(&self, subject: &str, rate: Option<Rate>) -> Result<(), Error> {
        self.begin_principal(subject, rate).decided().await
    }

    /// Begins [`check_principal`](Self::check_principal): decided at once from what is held,
    /// or landing (a lease is on its way from Redis). The caller may send other Redis work
    /// before awaiting [`RateCheck::decided`] (a miss's cache lookup then shares the round
    /// trip), and serves nothing before.
    pub fn begin_principal<'a>(&'a self, subject: &'a str, rate: Option<Rate>) -> RateCheck<'a> {
        let shared = match &self.rates {
            Rates::Local(local) => return RateCheck::Decided(refusal(local.check(subject, rate))),
            Rates::Shared(shared) => shared,
        };
        match shared.begin(subject, rate.unwrap_or(self.rate)) {
            Begun::Decided(decided) => RateCheck::Decided(refusal(decided)),
            Begun::Landing(landing) => RateCheck::Landing(Box::new(Pending {
                shared,
                default: self.rate,
                subject,
                rate,
                landing,
            })),
        }
    }
}

/// A request counted against its principal's rate, or being counted.
pub enum RateCheck<'a> {
    /// Allowed, or refused.
    Decided(Result<(), Error>),
    /// Waiting for a lease from Redis.
    Landing(Box<Pending<'a>>),
}

/// A count waiting for its lease, and what it falls back on.
pub struct Pending<'a> {
    shared: &'a SharedRates,
    default: Rate,
    subject: &'a str,
    rate: Option<Rate>,
    landing: Landing<'a>,
}

impl RateCheck<'_> {
    /// Allowed, or the 429 saying when to come back. Redis out of reach, counted alone.
    pub async fn decided(self) -> Result<(), Error> {
        match self {
            RateCheck::Decided(decided) => decided,
            RateCheck::Landing(pending) => {
                let Pending {
                    shared,
                    default,
                    subject,
                    rate,
                    landing,
                } = *pending;
                let counted = landing.verdict().await;
                refusal(counted.unwrap_or_else(|_| shared.alone(subject, default, rate)))
            }
        }
    }
}

fn refusal(counted: Result<(), Duration>) -> Result<(), Error> {
    counted.map_err(|wait| Error::TooManyRequests {
        retry_after: retry_after_secs(wait),
        reason: Throttle::Principal,
    })
}

/// Principals' rates counted in this process: one governor table for the default rate, one per
/// distinct policy rate.
pub struct LocalRates {
    rate: Rate,
    default: Keyed,
    /// One limiter per distinct policy rate; few exist, so the lock is brief and rare.
    overrides: Mutex<HashMap<Rate, Arc<Keyed>>>,
    checks: AtomicU64,
}

impl LocalRates {
    /// Every principal at `rate` unless its policy sets another.
    pub fn new(rate: Rate) -> LocalRates {
        LocalRates {
            rate,
            default: keyed(rate),
            overrides: Mutex::new(HashMap::new()),
            checks: AtomicU64::new(0),
        }
    }

    /// Counts one request of `subject` at `rate` (the default one when `None`): allowed, or
    /// refused for how long.
    pub fn check(&self, subject: &str, rate: Option<Rate>) -> Result<(), Duration> {
        let own;
        let limiter = match rate {
            Some(rate) if rate != self.rate => {
                // The map holds whole limiters only: a panic elsewhere cannot leave it torn.
                own = self
                    .overrides
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(rate)
                    .or_insert_with(|| Arc::new(keyed(rate)))
                    .clone();
                &*own
            }
            _ => &self.default,
        };
        if self.checks.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
        limiter
            .check_key(&subject.to_owned())
            .map_err(|not_until| not_until.wait_time_from(limiter.clock().now()))
    }

    /// How many principals the default table holds.
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.default.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(count: u32) -> Rate {
        Rate {
            count,
            per: Duration::from_secs(1),
        }
    }

    #[tokio::test]
    async fn a_principal_gets_twice_its_rate_as_a_burst_and_others_are_untouched() {
        let limits = PrincipalLimits::new(rate(5));
        let mut allowed = 0;
        for _ in 0..30 {
            allowed += usize::from(limits.check_principal("alice", None).await.is_ok());
        }
        // The burst is 10; a test slower than one pace step may see one more.
        assert!((10..=11).contains(&allowed), "{allowed}");
        match limits.check_principal("alice", None).await {
            Err(Error::TooManyRequests {
                retry_after,
                reason: Throttle::Principal,
            }) => assert!(retry_after >= 1),
            other => panic!("expected a principal 429, got {other:?}"),
        }
        assert!(limits.check_principal("bob", None).await.is_ok());
        let Rates::Local(local) = &limits.rates else {
            panic!("counted in this process")
        };
        assert_eq!(local.tracked(), 2);
    }

    #[test]
    fn principals_back_at_a_full_burst_are_forgotten_so_the_table_stays_small() {
        // A pace of 1 µs: a principal seen once is back at a full burst a microsecond later.
        let limits = LocalRates::new(rate(1_000_000));
        let passers_by = SWEEP_EVERY - 1;
        for i in 0..passers_by {
            assert!(limits.check(&format!("caller-{i}"), None).is_ok());
        }
        assert_eq!(limits.tracked() as u64, passers_by);
        // Not synchronisation: the passing of (many paces') time is what makes them forgettable.
        std::thread::sleep(Duration::from_millis(5));
        // The next check sweeps: only the principal just checked is left.
        assert!(limits.check("alice", None).is_ok());
        assert_eq!(limits.tracked(), 1);
    }
}
