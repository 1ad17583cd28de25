//! This process's own clock of the budget: an even pace of turns, and the backoff after the
//! upstream answers 429. The shared budget (`shared.rs`) keeps both too, to fall back on and
//! to remember locally what Redis decided.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::Rate;
use crate::error::{Error, Throttle, retry_after_secs};

/// The first backoff after an upstream 429 without `Retry-After`; it doubles on each further one.
pub const BACKOFF_INITIAL: Duration = Duration::from_secs(1);

/// The longest backoff, with or without `Retry-After`.
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// The time between two turns at `rate`: its pace kept 5% under the rate, because the calls
/// leave evenly spaced but arrive with the network's jitter, and the headroom keeps a jittered
/// window within the budget too. The shared budget's pace and a replica's own share alike.
pub fn period(rate: Rate) -> Duration {
    rate.pace().mul_f64(1.05)
}

/// One turn every `period`, never two closer (GCRA with a burst of one), on tokio's clock, so
/// tests with paused time see exact turns.
pub struct Pace {
    period: Duration,
    /// When the next turn is free.
    next: Mutex<Instant>,
}

impl Pace {
    /// A pace of one turn per `period`; the first is free at once.
    pub fn new(period: Duration) -> Pace {
        Pace {
            period,
            next: Mutex::new(Instant::now()),
        }
    }

    pub(super) async fn next_turn(&self) {
        loop {
            let at = {
                // A plain instant: a panic elsewhere cannot leave it half-written.
                let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
                let now = Instant::now();
                if *next <= now {
                    // A turn left unused is not saved up: no burst after a quiet spell.
                    *next = now + self.period;
                    return;
                }
                *next
            };
            tokio::time::sleep_until(at).await;
        }
    }
}

/// After an upstream 429 the gateway stops calling the upstream for everyone: for the upstream's
/// `Retry-After` when it sent one, otherwise for a backoff that starts at `BACKOFF_INITIAL` (1 s)
/// and doubles with each further 429, back to the start after any other answer.
pub struct Backoff {
    state: Mutex<BackoffState>,
}

struct BackoffState {
    until: Option<Instant>,
    next: Duration,
    /// A backoff was held since the last answer that was not a 429 (a shared one to reset).
    held: bool,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            state: Mutex::new(BackoffState {
                until: None,
                next: BACKOFF_INITIAL,
                held: false,
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
        state.hold(delay);
        delay
    }

    /// Backs off for `left` without growing the next step: a backoff every replica honours,
    /// decided in Redis, held here so that no call asks Redis again until it ends.
    pub fn hold(&self, left: Duration) {
        self.state().hold(left);
    }

    /// The upstream answered something else: the next 429 starts the backoff afresh. Whether
    /// a backoff was held since the last such answer (so a shared one has a step to reset).
    pub fn succeeded(&self) -> bool {
        let mut state = self.state();
        state.next = BACKOFF_INITIAL;
        std::mem::take(&mut state.held)
    }
}

impl BackoffState {
    fn hold(&mut self, left: Duration) {
        let until = Instant::now() + left;
        // Concurrent 429s never shorten a backoff already decided.
        self.until = Some(self.until.map_or(until, |u| u.max(until)));
        self.held = true;
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
}
