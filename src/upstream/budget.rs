//! The budget every upstream call shares (a smooth pace with a short, bounded wait for a turn)
//! and the backoff after the upstream answers 429. Only calls that really go upstream spend it.

use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::config::Rate;
use crate::error::{Error, Throttle, retry_after_secs};

/// The longest a call waits for its turn in the upstream budget before it is answered 429.
pub const UPSTREAM_MAX_WAIT: Duration = Duration::from_secs(2);

/// The first backoff after an upstream 429 without `Retry-After`; it doubles on each further one.
pub const BACKOFF_INITIAL: Duration = Duration::from_secs(1);

/// The longest backoff, with or without `Retry-After`.
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// The pace every upstream call shares: at most `count` per `per` in any window, evenly spaced
/// (a burst would spend the upstream's own allowance at once).
///
/// A call that finds the pace spent waits its turn, first come first served, in a queue bounded
/// both in length and in time ([`UPSTREAM_MAX_WAIT`]); past that it is answered 429 rather than
/// left to pile up.
pub struct UpstreamBudget {
    limiter: DefaultDirectRateLimiter,
    /// Bounds the queue's length: one permit per waiting (or sending) call.
    places: Semaphore,
    /// First come, first served: only the head of the queue asks the limiter, so no newcomer
    /// takes a turn from a call that has been waiting.
    turn: tokio::sync::Mutex<()>,
    max_wait: Duration,
}

impl UpstreamBudget {
    /// A budget of `rate` for all upstream calls together.
    ///
    /// The pace is kept 5% under the rate: the calls leave evenly spaced, but they arrive with
    /// the network's jitter, and the headroom keeps a jittered window within the budget too.
    pub fn new(rate: Rate, max_wait: Duration) -> UpstreamBudget {
        let period = rate.pace().mul_f64(1.05);
        let quota =
            Quota::with_period(period).unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN));
        let places = (max_wait.as_secs_f64() / period.as_secs_f64()).ceil() as usize;
        UpstreamBudget {
            limiter: RateLimiter::direct(quota),
            places: Semaphore::new(places.clamp(1, Semaphore::MAX_PERMITS)),
            turn: tokio::sync::Mutex::new(()),
            max_wait,
        }
    }

    /// Waits for this call's turn, at most `limit` (and never past the queue's own bound);
    /// returns how long it waited. Cancel-safe: a caller that goes away leaves the queue.
    pub async fn acquire(&self, limit: Duration) -> Result<Duration, Error> {
        let started = Instant::now();
        let refused = || Error::TooManyRequests {
            retry_after: retry_after_secs(self.max_wait),
            reason: Throttle::UpstreamBudget,
        };
        let Ok(_place) = self.places.try_acquire() else {
            return Err(refused());
        };
        let wait = async {
            let _turn = self.turn.lock().await;
            self.limiter.until_ready().await;
        };
        tokio::time::timeout(limit.min(self.max_wait), wait)
            .await
            .map_err(|_| refused())?;
        Ok(started.elapsed())
    }
}

/// After an upstream 429 the gateway stops calling the upstream for everyone: for the upstream's
/// `Retry-After` when it sent one, otherwise for a backoff that starts at [`BACKOFF_INITIAL`]
/// and doubles with each further 429, back to the start after any other answer.
pub struct Backoff {
    state: Mutex<BackoffState>,
}

struct BackoffState {
    until: Option<Instant>,
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            state: Mutex::new(BackoffState {
                until: None,
                next: BACKOFF_INITIAL,
            }),
        }
    }
}

impl Backoff {
    fn state(&self) -> std::sync::MutexGuard<'_, BackoffState> {
        // The state is two plain values: a panic elsewhere cannot leave it half-written.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Time left before the upstream may be called again (zero when not backing off).
    pub fn remaining(&self) -> Duration {
        self.state().until.map_or(Duration::ZERO, |until| {
            until.saturating_duration_since(Instant::now())
        })
    }

    /// Refuses a call while backing off, with a 429 saying when to come back.
    pub fn check(&self) -> Result<(), Error> {
        let remaining = self.remaining();
        if remaining.is_zero() {
            return Ok(());
        }
        Err(Error::TooManyRequests {
            retry_after: retry_after_secs(remaining),
            reason: Throttle::UpstreamBackoff,
        })
    }

    /// The upstream answered 429: back off for `retry_after` or the next growing step. Returns
    /// how long.
    pub fn rate_limited(&self, retry_after: Option<Duration>) -> Duration {
        let mut state = self.state();
        let delay = retry_after.unwrap_or(state.next).min(BACKOFF_MAX);
        state.next = (state.next * 2).min(BACKOFF_MAX);
        let until = Instant::now() + delay;
        // Concurrent 429s never shorten a backoff already decided.
        state.until = Some(state.until.map_or(until, |u| u.max(until)));
        delay
    }

    /// The upstream answered something else: the next 429 starts the backoff afresh.
    pub fn succeeded(&self) {
        let mut state = self.state();
        state.next = BACKOFF_INITIAL;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn backoff_grows_from_one_second_honours_retry_after_and_resets_on_success() {
        let backoff = Backoff::default();
        assert!(backoff.check().is_ok());
        assert_eq!(backoff.rate_limited(None), Duration::from_secs(1));
        assert!(matches!(
            backoff.check(),
            Err(Error::TooManyRequests {
                reason: Throttle::UpstreamBackoff,
                ..
            })
        ));
        tokio::time::advance(Duration::from_millis(1001)).await;
        assert!(backoff.check().is_ok());
        assert_eq!(backoff.rate_limited(None), Duration::from_secs(2));
        assert_eq!(backoff.rate_limited(None), Duration::from_secs(4));
        assert_eq!(
            backoff.rate_limited(Some(Duration::from_secs(7))),
            Duration::from_secs(7)
        );
        backoff.succeeded();
        tokio::time::advance(Duration::from_secs(8)).await;
        assert_eq!(backoff.rate_limited(None), Duration::from_secs(1));
        assert_eq!(
            backoff.rate_limited(Some(Duration::from_secs(86_400))),
            BACKOFF_MAX
        );
    }

    #[tokio::test]
    async fn the_budget_queue_is_bounded_in_length() {
        // One call a minute with a two-minute wait: two places in the queue.
        let slow = Rate {
            count: 1,
            per: Duration::from_secs(60),
        };
        let budget = std::sync::Arc::new(UpstreamBudget::new(slow, Duration::from_secs(120)));
        assert!(budget.acquire(Duration::from_secs(120)).await.is_ok());
        let waiting: Vec<_> = (0..2)
            .map(|_| {
                let budget = budget.clone();
                tokio::spawn(async move { budget.acquire(Duration::from_secs(120)).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        match budget.acquire(Duration::from_secs(120)).await {
            Err(Error::TooManyRequests {
                reason: Throttle::UpstreamBudget,
                retry_after,
            }) => assert_eq!(retry_after, 120),
            other => panic!("expected a budget 429, got {other:?}"),
        }
        for w in waiting {
            w.abort();
        }
    }
}
