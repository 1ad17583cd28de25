//! The upstream budget and backoff shared by every replica through Redis (contract §11).
//!
//! Turns are reserved on one timeline in Redis, one pace apart cluster-wide; the fair queue of
//! each replica still decides whose call takes a turn it gets. A replica holds one reservation
//! at a time (its queue has one dispatcher), so the timeline holds about N turns ahead and a
//! principal's call waits for its own rotation plus about N paces. A replica whose queue is
//! idle reserves that one turn with the cache lookup that takes a fill lease
//! ([`SharedTurns::ask`]), so a miss makes one round trip before its upstream call; should a
//! dispatcher reserve at the same moment, one of the two turns goes unused (an under-spend). While Redis is
//! out of reach, each replica paces itself at its [`share`] of the rate, after a dead time long
//! enough for the turns granted while shared to pass out of every window; when Redis answers
//! again, every replica pauses for as long (`lua/resume.lua`, run by the link before it shares
//! again).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use redis::{Script, ScriptInvocation};
use tokio::time::Instant;

use super::pace::{BACKOFF_INITIAL, BACKOFF_MAX, Backoff, Pace, period};
use crate::cluster::{Cluster, Mode, Op, share};
use crate::config::Rate;

/// The reservation of a turn, which scripts that reserve one begin with.
pub const TURN_LUA: &str = include_str!("lua/turn.lua");

static RESERVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{TURN_LUA}{}",
        include_str!("lua/budget_reserve.lua")
    ))
});
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
    held: Mutex<Option<Turn>>,
    /// A dispatcher is reserving a turn (a round trip of its own).
    reserving: AtomicBool,
    /// A cache lookup is reserving one with its fill lease ([`SharedTurns::ask`]).
    asking: AtomicBool,
}

/// A turn reserved: when it may be taken, and the latest it still may (a turn taken later would
/// crowd the ones after it on the timeline).
#[derive(Debug, Clone, Copy)]
struct Turn {
    at: Instant,
    until: Instant,
}

/// A turn asked for with a cache lookup that takes a fill lease: the miss then makes one round
/// trip before its upstream call, not two (issue 21). At most one is asked at a time.
pub struct Ask<'a> {
    turns: &'a SharedTurns,
    _asking: Raised<'a>,
}

impl Ask<'_> {
    /// Adds the budget's keys (after the lookup's own) and arguments (pace and longest wait,
    /// µs) to `script`.
    pub fn add_to(&self, script: &mut ScriptInvocation<'_>) {
        self.turns.add_turn(script);
    }

    /// What Redis answered (as `turn.lua` returns it): a turn, held for the next dispatcher
    /// (the fill's own call, or whichever the queue grants it to), or why there is none.
    pub fn answered(self, reply: (i64, i64)) {
        let turns = self.turns;
        if let Ok(Some(at)) = turns.take(reply) {
            // Taken by the fill's own call in a moment; at most a Redis timeout late, as a
            // reply to the dispatcher's own reservation may come.
            let until = at + turns.cluster.timeout();
            let mut held = turns.held.lock().unwrap_or_else(|e| e.into_inner());
            // Held already (a dispatcher reserved meanwhile): this one goes unused.
            if held.is_none_or(|turn| turn.until < Instant::now()) {
                *held = Some(Turn { at, until });
            }
        }
    }
}

/// A flag raised while it lives.
struct Raised<'a>(&'a AtomicBool);

impl<'a> Raised<'a> {
    /// Raises `flag`; `None` when it was up already.
    fn raise(flag: &'a AtomicBool) -> Option<Raised<'a>> {
        (!flag.swap(true, Ordering::AcqRel)).then_some(Raised(flag))
    }
}

impl Drop for Raised<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
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
        for script in [&*RESERVE, &*NOTE, &*RESET] {
            cluster.preload(script);
        }
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
            reserving: AtomicBool::new(false),
            asking: AtomicBool::new(false),
        }
    }

    /// A turn to reserve with a cache lookup that may take a fill lease, when the budget here
    /// is idle (sharing, no turn held or being reserved, none asked, not closed or backing off):
    /// a busy queue's dispatcher reserves its own, paced anyway.
    pub fn ask(&self) -> Option<Ask<'_>> {
        let held = *self.held.lock().unwrap_or_else(|e| e.into_inner());
        let busy = self.reserving.load(Ordering::Acquire)
            || held.is_some_and(|turn| Instant::now() <= turn.until)
            || self.closed_for().is_some()
            || !self.backoff.remaining().is_zero()
            || self.cluster.mode() != Mode::Connected;
        if busy {
            return None;
        }
        Some(Ask {
            turns: self,
            _asking: Raised::raise(&self.asking)?,
        })
    }

    /// The keys and arguments of `reserve_turn` (`turn.lua`), added to `script`.
    fn add_turn(&self, script: &mut ScriptInvocation<'_>) {
        script
            .key(&self.tat)
            .key(&self.until)
            .key(&self.paused)
            .arg(micros(self.period))
            .arg(micros(self.max_wait));
    }

    /// How long no turn is to be had, when none is.
    fn closed_for(&self) -> Option<Duration> {
        let closed = *self.closed.lock().unwrap_or_else(|e| e.into_inner());
        closed.and_then(|until| until.checked_duration_since(Instant::now()))
    }

    /// A reservation's answer (`turn.lua`): the turn's time, none (it came with a backoff, now
    /// noted here: the call it goes to is refused without a Redis call), or how long until one
    /// can be had.
    fn take(&self, (what, us): (i64, i64)) -> Result<Option<Instant>, Duration> {
        match what {
            0 => Ok(Some(Instant::now() + from_micros(us))),
            -2 => {
                self.backoff.hold(from_micros(us));
                Ok(None)
            }
            _ => Err(self.close_for(from_micros(us))),
        }
    }

    /// Waits for this replica's next turn and takes it; or, when none can be had within the
    /// wait (a dead time, a timeline booked further ahead), says how long until one can, so
    /// that waiting calls are refused at once rather than after the whole wait. A turn that
    /// comes with a backoff is handed on at once: the backoff, now noted here, refuses the call
    /// it goes to without a Redis call. Cancel-safe: a reservation whose waiter goes away goes
    /// unused (an under-spend).
    pub async fn next_turn(&self) -> Result<(), Duration> {
        if let Some(left) = self.closed_for() {
            return Err(left);
        }
        match self.cluster.mode() {
            Mode::Connected => {
                self.alone_pace(false);
                // A reservation whose dispatcher went away (or a lookup made) is the next
                // one's; one past due would crowd the turn after it, so it goes unused.
                let held = self.held.lock().unwrap_or_else(|e| e.into_inner()).take();
                if let Some(turn) = held.filter(|turn| Instant::now() <= turn.until) {
                    self.spend(turn).await;
                    return Ok(());
                }
                // One dispatcher at a time: the flag is never up here.
                let _reserving = Raised::raise(&self.reserving);
                let mut reserve = RESERVE.prepare_invoke();
                self.add_turn(&mut reserve);
                // The turn serves whichever call the queue grants it to, not only this one.
                let reserved = self.cluster.invoke::<(i64, i64)>(Op::Budget, &reserve);
                match crate::cluster::deadline::own_time(reserved).await {
                    Ok(reply) => {
                        if let Some(at) = self.take(reply)? {
                            self.spend(Turn { at, until: at }).await;
                        }
                        Ok(())
                    }
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

    /// Waits for `turn` and takes it; cancelled, the turn stays held for the next dispatcher.
    async fn spend(&self, turn: Turn) {
        *self.held.lock().unwrap_or_else(|e| e.into_inner()) = Some(turn);
        tokio::time::sleep_until(turn.at).await;
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
