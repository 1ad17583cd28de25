//! Each principal's own rate, checked by the proxy right after authentication, so cache hits
//! count too (the upstream budget, which only real upstream calls spend, is [`crate::upstream`]'s). Principals are keyed by their authenticated subject
//! (or gateway key name), never by address: behind a load balancer every caller shares one.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::cluster::{Cluster, SharedRates, Unavailable};
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

/// One replica's share of `rate` among `n`: its count divided (at least 1), so its burst too.
fn share(rate: Rate, n: u32) -> Rate {
    Rate {
        count: (rate.count / n.max(1)).max(1),
        per: rate.per,
    }
}

/// Each principal's own rate: the configured one, or the one its policy grants set
/// (`rate = "2/s"` on a role or key); across replicas when they share through Redis.
pub struct PrincipalLimits {
    rate: Rate,
    default: Keyed,
    /// One limiter per distinct policy rate; few exist, so the lock is brief and rare.
    overrides: Mutex<HashMap<Rate, Arc<Keyed>>>,
    checks: AtomicU64,
    shared: Option<Shared>,
}

/// The rates held in Redis, and this replica's own share of them for when Redis cannot be asked.
struct Shared {
    rates: SharedRates,
    cluster: Arc<Cluster>,
    /// Every rate divided by N, made for the N it was made with.
    alone: Mutex<Option<(u32, Arc<PrincipalLimits>)>>,
}

impl PrincipalLimits {
    /// A limiter for `rate` per principal.
    pub fn new(rate: Rate) -> PrincipalLimits {
        PrincipalLimits {
            rate,
            default: keyed(rate),
            overrides: Mutex::new(HashMap::new()),
            checks: AtomicU64::new(0),
            shared: None,
        }
    }

    /// A limiter for `rate` per principal across every replica sharing through `cluster`.
    pub fn shared(rate: Rate, cluster: Arc<Cluster>) -> PrincipalLimits {
        PrincipalLimits {
            shared: Some(Shared {
                rates: SharedRates::new(cluster.clone()),
                cluster,
                alone: Mutex::new(None),
            }),
            ..PrincipalLimits::new(rate)
        }
    }

    /// Counts one request against `subject`, at `rate` when its policy sets one; past it, a 429
    /// saying when to come back. Shared, it asks Redis once per lease of a few requests (none
    /// while the caller is refused); Redis out of reach, it counts alone at the rate divided by N.
    pub async fn check_principal(&self, subject: &str, rate: Option<Rate>) -> Result<(), Error> {
        let Some(shared) = &self.shared else {
            return self.check_here(subject, rate);
        };
        match shared.rates.check(subject, rate.unwrap_or(self.rate)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(wait)) => Err(Error::TooManyRequests {
                retry_after: retry_after_secs(wait),
                reason: Throttle::Principal,
            }),
            Err(Unavailable) => {
                let n = shared.cluster.replicas();
                let alone = {
                    let mut alone = shared.alone.lock().unwrap_or_else(|e| e.into_inner());
                    match &*alone {
                        Some((made_for, limits)) if *made_for == n => limits.clone(),
                        _ => alone
                            .insert((n, Arc::new(PrincipalLimits::new(share(self.rate, n)))))
                            .1
                            .clone(),
                    }
                };
                alone.check_here(subject, rate.map(|r| share(r, n)))
            }
        }
    }

    /// Counts one request against this process's limiters.
    fn check_here(&self, subject: &str, rate: Option<Rate>) -> Result<(), Error> {
        let own;
        let limiter = match rate {
            Some(rate) if rate != self.rate => {
                own = self
                    .overrides
                    .lock()
                    .map_err(|_| Error::Internal("rate limiter lock poisoned".into()))?
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
            .map_err(|not_until| Error::TooManyRequests {
                retry_after: retry_after_secs(not_until.wait_time_from(limiter.clock().now())),
                reason: Throttle::Principal,
            })
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
    use std::time::Duration;

    fn rate(count: u32) -> Rate {
        Rate {
            count,
            per: Duration::from_secs(1),
        }
    }

    #[test]
    fn a_principal_gets_twice_its_rate_as_a_burst_and_others_are_untouched() {
        let limits = PrincipalLimits::new(rate(5));
        let allowed = (0..30)
            .filter(|_| limits.check_here("alice", None).is_ok())
            .count();
        // The burst is 10; a test slower than one pace step may see one more.
        assert!((10..=11).contains(&allowed), "{allowed}");
        match limits.check_here("alice", None) {
            Err(Error::TooManyRequests {
                retry_after,
                reason: Throttle::Principal,
            }) => assert!(retry_after >= 1),
            other => panic!("expected a principal 429, got {other:?}"),
        }
        assert!(limits.check_here("bob", None).is_ok());
        assert_eq!(limits.tracked(), 2);
    }

    #[test]
    fn principals_back_at_a_full_burst_are_forgotten_so_the_table_stays_small() {
        // A pace of 1 µs: a principal seen once is back at a full burst a microsecond later.
        let limits = PrincipalLimits::new(rate(1_000_000));
        let passers_by = SWEEP_EVERY - 1;
        for i in 0..passers_by {
            assert!(limits.check_here(&format!("caller-{i}"), None).is_ok());
        }
        assert_eq!(limits.tracked() as u64, passers_by);
        // Not synchronisation: the passing of (many paces') time is what makes them forgettable.
        std::thread::sleep(Duration::from_millis(5));
        // The next check sweeps: only the principal just checked is left.
        assert!(limits.check_here("alice", None).is_ok());
        assert_eq!(limits.tracked(), 1);
    }
}
