//! The upstream budget and backoff shared by every replica through Redis (contract §11).
//!
//! Turns are reserved on one timeline in Redis, one pace apart cluster-wide; the fair queue of
//! each replica still decides whose call takes a turn it gets. A replica holds one reservation
//! at a time (its queue has one dispatcher), so the timeline never holds more than N turns
//! ahead and a principal's call waits for its own rotation plus at most N paces. While Redis is
//! out of reach, each replica paces itself at its [`share`] of the rate, after a dead time long
//! enough for the turns granted while shared to pass out of every window; when Redis answers
//! again, every replica pauses for as long (`lua/resume.lua`, run by the link before it shares
//! again).

use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use redis::Script;
use tokio::time::Instant;

use super::pace::{BACKOFF_INITIAL, BACKOFF_MAX, Backoff, Pace, period};
use crate::cluster::{Cluster, Mode, Op, share};
use crate::config::Rate;

static RESERVE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/budget_reserve.lua")));
static NOTE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/backoff_note.lua")));
static RESET: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/backoff_reset.lua")));
static RESUME: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/resume.lua")));

/// How long no replica takes an upstream turn around a switch of mode: the longest wait for a
/// turn ([`UPSTREAM_MAX_WAIT`](super::UPSTREAM_MAX_WAIT)) plus the one-second window, so turns
/// granted under one mode pass out of every window before the other mode spends any (the budget
/// checks the sum when it compiles).
pub const DEAD_TIME: Duration = Duration::from_secs(3);

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn from_micros(us: i64) -> Duration {
    Duration::from_micros(u64::try_from(us).unwrap_or(0))
}

/// The budget's turns, reserved in Redis (or taken alone at this replica's share).
pub struct SharedTurns {
    cluster: Arc<Cluster>,
    backoff: Arc<Backoff>,
    rate: Rate,
    period: Duration,
    max_wait: Duration,
    tat: String,
    until: String,
    paused: String,
    /// This replica's own pace while degraded, made on entering (N may have changed since).
    alone: Mutex<Option<Arc<Pace>>>,
    /// No turn to be had before this.
    closed: Mutex<Option<Instant>>,
    /// The one turn this replica has reserved and not yet spent.
    held: Mutex<Option<Instant>>,
}

impl SharedTurns {
    /// Turns one `period` apart across the cluster, never booked more than `max_wait` ahead.
    pub fn new(
        cluster: Arc<Cluster>,
        backoff: Arc<Backoff>,
        rate: Rate,
        period: Duration,
        max_wait: Duration,
    ) -> SharedTurns {
        let paused = cluster.key("budget:paused_until");
        let mut resume = RESUME.prepare_invoke();
        resume.key(&paused).arg(micros(DEAD_TIME));
        cluster.on_resume(resume);
        SharedTurns {
            tat: cluster.key("budget:tat"),
            until: cluster.key("budget:backoff_until"),
            paused,
            cluster,
            backoff,
            rate,
            period,
            max_wait,
            alone: Mutex::new(None),
            closed: Mutex::new(None),
            held: Mutex::new(None),
        }
    }

    /// Waits for this replica's next turn and takes it; or, when none can be had within the
    /// wait (a dead time, a timeline booked further ahead), says how long until one can, so
    /// that waiting calls are refused at once rather than after the whole wait. A turn that
    /// comes with a backoff is handed on at once: the backoff, now noted here, refuses the call
    /// it goes to without a Redis call. Cancel-safe: a reservation whose waiter goes away goes
    /// unused (an under-spend).
    pub async fn next_turn(&self) -> Result<(), Duration> {
        let closed = *self.closed.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(left) = closed.and_then(|until| until.checked_duration_since(Instant::now())) {
            return Err(left);
        }
        match self.cluster.mode() {
            Mode::Connected => {
                self.alone_pace(false);
                // A reservation whose dispatcher went away is the next one's; one past due
                // would crowd the turn after it, so it goes unused.
                let held = self.held.lock().unwrap_or_else(|e| e.into_inner()).take();
                if let Some(at) = held.filter(|at| Instant::now() <= *at) {
                    self.spend(at).await;
                    return Ok(());
                }
                let mut reserve = RESERVE.prepare_invoke();
                reserve
                    .key(&self.tat)
                    .key(&self.until)
                    .key(&self.paused)
                    .arg(micros(self.period))
                    .arg(micros(self.max_wait));
                // The turn serves whichever call the queue grants it to, not only this one.
                let reserved = self.cluster.invoke::<(i64, i64)>(Op::Budget, &reserve);
                match crate::cluster::deadline::own_time(reserved).await {
                    Ok((0, wait)) => {
                        self.spend(Instant::now() + from_micros(wait)).await;
                        Ok(())
                    }
                    Ok((-2, left)) => {
                        self.backoff.hold(from_micros(left));
                        Ok(())
                    }
                    Ok((_, left)) => Err(self.close_for(from_micros(left))),
                    // Degraded from now on: a dead time first, for every call.
                    Err(_) if self.cluster.mode() != Mode::Connected => {
                        Err(self.close_for(DEAD_TIME))
                    }
                    // Still sharing (one late reply): this call has no turn, and the next
                    // dispatcher asks Redis again.
                    Err(_) => Err(self.period),
                }
            }
            Mode::Degraded { since } => {
                // Turns other replicas reserved before Redis went away are still being spent:
                // none alone until they are out of every window.
                let dead = (since + DEAD_TIME).saturating_duration_since(Instant::now());
                if !dead.is_zero() {
                    return Err(self.close_for(dead));
                }
                match self.alone_pace(true) {
                    Some(pace) => pace.next_turn().await,
                    // Connected again meanwhile: resuming paused the budget for a dead time.
                    None => return Err(self.close_for(DEAD_TIME)),
                }
                Ok(())
            }
        }
    }

    /// Waits for the turn reserved at `at` and takes it; cancelled, the turn stays held for the
    /// next dispatcher.
    async fn spend(&self, at: Instant) {
        *self.held.lock().unwrap_or_else(|e| e.into_inner()) = Some(at);
        tokio::time::sleep_until(at).await;
        self.held.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    /// No turn for `left`: noted, so the calls waiting behind are refused without asking Redis.
    fn close_for(&self, left: Duration) -> Duration {
        let left = left.max(Duration::from_millis(1));
        *self.closed.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now() + left);
        left
    }

    /// N, the replicas sharing the budget (never fewer than the fallback count): when all are
    /// busy, each gets 1/N of the turns, connected or not.
    pub fn replicas(&self) -> u32 {
        self.cluster.replicas().max(1)
    }

    /// What `upstream_budget_degraded_rate` shows: the calls per second this replica allows
    /// itself while not sharing (its share of the budget), 0 while it shares. Read at scrape
    /// time, so a degraded replica says so before its first upstream call.
    pub fn degraded_rate(&self) -> f64 {
        if self.cluster.mode() == Mode::Connected {
            return 0.0;
        }
        let share = share(self.rate, self.cluster.replicas());
        f64::from(share.count) / share.per.as_secs_f64()
    }

    /// The pace alone while degraded (made when `degraded` and none is), or, connected, none:
    /// returns the one dropped.
    fn alone_pace(&self, degraded: bool) -> Option<Arc<Pace>> {
        let mut alone = self.alone.lock().unwrap_or_else(|e| e.into_inner());
        if !degraded {
            return alone.take();
        }
        if self.cluster.mode() == Mode::Connected {
            return None;
        }
        let pace = alone.get_or_insert_with(|| {
            Arc::new(Pace::new(period(share(self.rate, self.cluster.replicas()))))
        });
        Some(pace.clone())
    }

    /// The upstream answered 429: notes the backoff for every replica; how long it lasts, or
    /// `None` when Redis could not be asked (the caller backs off alone).
    pub async fn note_backoff(&self, retry_after: Option<Duration>) -> Option<Duration> {
        let mut note = NOTE.prepare_invoke();
        note.key(&self.until)
            .key(self.cluster.key("budget:backoff_next"))
            .key(&self.tat)
            .arg(retry_after.map_or(0, micros))
            .arg(micros(BACKOFF_INITIAL))
            .arg(micros(BACKOFF_MAX));
        let left = self.cluster.invoke::<i64>(Op::Backoff, &note).await.ok()?;
        let left = from_micros(left);
        self.backoff.hold(left);
        Some(left)
    }

    /// The upstream answered something else after a backoff: the next 429 starts afresh.
    pub async fn reset_backoff(&self) {
        let mut reset = RESET.prepare_invoke();
        reset.key(self.cluster.key("budget:backoff_next"));
        // Not reset: the next backoff is longer than it needed to be, which is safe.
        let _ = self.cluster.invoke::<i64>(Op::Backoff, &reset).await;
    }
}
