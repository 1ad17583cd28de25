//! The budget every upstream call shares: a smooth pace with a short, bounded wait for a turn,
//! turns shared fairly between principals. Only calls that really go upstream spend it.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::fair::{FairQueue, Ticket};
use super::pace::{Backoff, Pace, period};
use super::shared::{DEAD_TIME, SharedTurns};
use crate::cluster::Cluster;
use crate::config::Rate;
use crate::error::{Error, Throttle, retry_after_secs};

/// The longest a call waits for its turn in the upstream budget before it is answered 429.
pub const UPSTREAM_MAX_WAIT: Duration = Duration::from_secs(2);

// Turns granted under one mode pass out of every window before the other mode spends any.
const _: () = assert!(DEAD_TIME.as_nanos() == UPSTREAM_MAX_WAIT.as_nanos() + 1_000_000_000);

/// Who an upstream call is for: its place in the fair queue and its label in metrics.
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    /// The principal (its subject or key name): each has its own backlog.
    pub id: &'a str,
    /// Its weight in the rotation (policy `share`, at least 1).
    pub share: u32,
    /// A label of bounded cardinality (key name or role), never a user's subject.
    pub class: &'a str,
}

/// The pace every upstream call shares: at most `count` per `per` in any window, evenly spaced
/// (a burst would spend the upstream's own allowance at once).
///
/// A call that finds the pace spent waits its turn in a [`FairQueue`]: turns go round-robin
/// over the principals with calls waiting, weighted by their share, so one principal's flood
/// delays another's call by one round at most. Each principal's backlog is bounded both in
/// length and in time ([`UPSTREAM_MAX_WAIT`]); past either, that principal's call is answered
/// 429 rather than left to pile up, and no other principal's is.
pub struct UpstreamBudget {
    turns: Turns,
    queue: FairQueue,
    /// One waiting call at a time takes the budget's next turn and hands it to whichever call
    /// the queue says is next (often another): the turn is decided by the rotation, not by who
    /// happened to wait for it.
    dispatch: tokio::sync::Mutex<()>,
    /// The most calls one principal may have waiting: as many as the budget could serve within
    /// `max_wait` if that principal had it to itself; more would be refused by the wait anyway.
    backlog: usize,
    max_wait: Duration,
}

impl UpstreamBudget {
    /// A budget of `rate` for all upstream calls together.
    ///
    /// The pace is kept 5% under the rate: the calls leave evenly spaced, but they arrive with
    /// the network's jitter, and the headroom keeps a jittered window within the budget too.
    pub fn new(rate: Rate, max_wait: Duration) -> UpstreamBudget {
        UpstreamBudget::with_turns(rate, max_wait, Turns::Local(Pace::new(period(rate))))
    }

    /// A budget of `rate` for the calls of every replica together, through `cluster`; a 429
    /// noted there is held in `backoff` (contract §11).
    pub fn shared(
        rate: Rate,
        max_wait: Duration,
        cluster: Arc<Cluster>,
        backoff: Arc<Backoff>,
    ) -> UpstreamBudget {
        let turns = SharedTurns::new(cluster, backoff, rate, period(rate), max_wait);
        UpstreamBudget::with_turns(rate, max_wait, Turns::Shared(Arc::new(turns)))
    }

    fn with_turns(rate: Rate, max_wait: Duration, turns: Turns) -> UpstreamBudget {
        let backlog = (max_wait.as_secs_f64() / period(rate).as_secs_f64()).ceil();
        UpstreamBudget {
            turns,
            queue: FairQueue::default(),
            dispatch: tokio::sync::Mutex::new(()),
            backlog: (backlog as usize).max(1),
            max_wait,
        }
    }

    /// The turns reserved in Redis, when the budget is shared.
    pub fn shared_turns(&self) -> Option<&Arc<SharedTurns>> {
        match &self.turns {
            Turns::Shared(shared) => Some(shared),
            Turns::Local(_) => None,
        }
    }

    /// Waits for this call's turn, at most `limit` (and never past [`UPSTREAM_MAX_WAIT`]);
    /// returns how long it waited. A `retry` of a call that already had a turn keeps its place
    /// at the front of its principal's backlog. Cancel-safe: a caller that goes away leaves the
    /// queue at once, and a turn it was given goes to the next call.
    pub async fn acquire(
        &self,
        caller: Caller<'_>,
        retry: bool,
        limit: Duration,
    ) -> Result<Duration, Error> {
        let started = Instant::now();
        let refused = || Error::TooManyRequests {
            retry_after: retry_after_secs(self.max_wait),
            reason: Throttle::UpstreamBudget,
        };
        // One principal's round never outlasts half the wait: a weight larger than this
        // replica's turns can serve in that time would starve everyone else on it into 429s,
        // which is what shares prevent. A replica gets 1/N of the budget's turns when all N are
        // busy (each holds about one reservation at a time, or paces itself at 1/N while
        // degraded), so the round is counted in those turns, not the budget's: the bound then
        // holds however the callers spread over the replicas.
        let round = self.backlog / (2 * self.turns.replicas() as usize);
        let share = caller
            .share
            .min(u32::try_from(round).unwrap_or(u32::MAX))
            .max(1);
        let mut ticket = self
            .queue
            .join(caller.id, share, retry, self.backlog)
            .map_err(|_| refused())?;
        tokio::time::timeout(limit.min(self.max_wait), self.turn(&mut ticket))
            .await
            .map_err(|_| refused())?
            .map_err(|none_for| Error::TooManyRequests {
                retry_after: retry_after_secs(none_for),
                reason: Throttle::UpstreamBudget,
            })?;
        ticket.used();
        Ok(started.elapsed())
    }

    /// Waits until the queue gives `ticket` a turn, taking the dispatcher's part meanwhile when
    /// no other waiting call has it; or, when the turns say none is to be had within the
    /// wait, how long until one is.
    async fn turn(&self, ticket: &mut Ticket<'_>) -> Result<(), Duration> {
        loop {
            let dispatching = tokio::select! {
                biased;
                () = ticket.granted() => return Ok(()),
                dispatching = self.dispatch.lock() => dispatching,
            };
            if ticket.try_granted() {
                return Ok(());
            }
            // Cancel-safe: a dispatcher that goes away before the turn takes none, and the
            // next waiting call takes its part. One that learns there is no turn within the
            // wait leaves at once, and so does each waiting call after it.
            self.turns.next_turn().await?;
            // Nobody to grant only when every waiting call left, this one included (it was
            // handed a turn another call left unused): the turn goes unused, an under-spend.
            self.queue.grant_next();
            drop(dispatching);
        }
    }

    /// How many principals have calls waiting for a turn.
    pub fn waiting_principals(&self) -> usize {
        self.queue.waiting_principals()
    }
}

/// Where the budget's turns come from: a pace kept in this process, or reservations on one
/// timeline in Redis for every replica (contract §11). Either way the fair queue stays local and
/// only decides whose call takes each turn this replica gets.
pub enum Turns {
    /// This process's own pace.
    Local(Pace),
    /// Reserved in Redis (or, Redis out of reach, this replica's share alone).
    Shared(Arc<SharedTurns>),
}

impl Turns {
    /// N, the replicas whose calls draw on these turns: each busy one gets at least 1/N of them.
    fn replicas(&self) -> u32 {
        match self {
            Turns::Local(_) => 1,
            Turns::Shared(shared) => shared.replicas(),
        }
    }

    /// Waits for the next turn and takes it, or says how long until one can be had when none
    /// can within the wait (only shared turns: a dead time, a booked timeline). Cancel-safe: a
    /// caller that goes away before it returns takes no turn.
    pub async fn next_turn(&self) -> Result<(), Duration> {
        match self {
            Turns::Local(pace) => {
                pace.next_turn().await;
                Ok(())
            }
            Turns::Shared(shared) => shared.next_turn().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(id: &str) -> Caller<'_> {
        Caller {
            id,
            share: 1,
            class: "test",
        }
    }

    #[tokio::test(start_paused = true)]
    async fn each_principals_backlog_is_bounded_and_only_its_own_calls_are_refused() {
        // One call a minute with a two-minute wait: two places in each principal's backlog.
        let slow = Rate {
            count: 1,
            per: Duration::from_secs(60),
        };
        let budget = std::sync::Arc::new(UpstreamBudget::new(slow, Duration::from_secs(120)));
        assert!(budget.acquire(caller("a"), false, LONG).await.is_ok());
        let waiting: Vec<_> = (0..2)
            .map(|_| {
                let budget = budget.clone();
                tokio::spawn(async move { budget.acquire(caller("a"), false, LONG).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        match budget.acquire(caller("a"), false, LONG).await {
            Err(Error::TooManyRequests {
                reason: Throttle::UpstreamBudget,
                retry_after,
            }) => assert_eq!(retry_after, 120),
            other => panic!("expected a budget 429, got {other:?}"),
        }
        // Another principal still has its place, and a retry of `a`'s keeps its own.
        let other = {
            let budget = budget.clone();
            tokio::spawn(async move { budget.acquire(caller("b"), false, LONG).await })
        };
        let retry = {
            let budget = budget.clone();
            tokio::spawn(async move { budget.acquire(caller("a"), true, LONG).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!other.is_finished() && !retry.is_finished(), "both wait");
        assert_eq!(budget.waiting_principals(), 2);
        for w in waiting.into_iter().chain([other, retry]) {
            w.abort();
        }
    }

    const LONG: Duration = Duration::from_secs(3600);

    #[tokio::test(start_paused = true)]
    async fn a_share_larger_than_the_wait_can_serve_still_leaves_others_a_turn_within_it() {
        // 20/s: 39 calls fit in the 2 s wait. A share of 100 would serve its holder 100 turns in
        // a row; capped at half the wait, another principal's call is served within it.
        let budget = std::sync::Arc::new(UpstreamBudget::new(
            Rate {
                count: 20,
                per: Duration::from_secs(1),
            },
            UPSTREAM_MAX_WAIT,
        ));
        let heavy = |_| {
            let budget = budget.clone();
            tokio::spawn(async move {
                let who = Caller {
                    id: "heavy",
                    share: 100,
                    class: "test",
                };
                budget.acquire(who, false, LONG).await
            })
        };
        let flood: Vec<_> = (0..39).map(heavy).collect();
        tokio::time::sleep(Duration::from_millis(1)).await;
        let light = budget.acquire(caller("light"), false, LONG).await;
        let waited = light.expect("the light principal gets a turn within the wait");
        // At most half the backlog (19 turns of 52.5 ms) plus the one in progress.
        assert!(waited <= Duration::from_millis(21 * 53), "{waited:?}");
        for f in flood {
            f.abort();
        }
    }

    /// Queues `calls` in order behind one call that has just taken a turn, and returns the order
    /// (and the times, from the first turn) in which they got theirs.
    async fn turns(rate: u32, calls: &[(&'static str, u32)]) -> Vec<(String, Duration)> {
        let budget = std::sync::Arc::new(UpstreamBudget::new(
            Rate {
                count: rate,
                per: Duration::from_secs(1),
            },
            LONG,
        ));
        let start = Instant::now();
        budget
            .acquire(caller("first"), false, LONG)
            .await
            .expect("the first turn is free");
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut counts = std::collections::HashMap::<&str, usize>::new();
        for &(who, share) in calls {
            let n = counts.entry(who).or_default();
            *n += 1;
            let name = format!("{who}{n}");
            let (budget, tx) = (budget.clone(), tx.clone());
            tokio::spawn(async move {
                let me = Caller {
                    id: who,
                    share,
                    class: who,
                };
                budget.acquire(me, false, LONG).await.expect("a turn");
                let _ = tx.send((name, start.elapsed()));
            });
            // Lets the call queue before the next one is made: arrival order is pinned.
            tokio::task::yield_now().await;
        }
        drop(tx);
        let mut order = Vec::new();
        while let Some(turn) = rx.recv().await {
            order.push(turn);
        }
        order
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_calls_take_turns_round_robin_one_pace_apart() {
        // 10/s paced 5% under: a turn every 105 ms.
        let order = turns(10, &[("A", 1), ("A", 1), ("A", 1), ("B", 1)]).await;
        let names: Vec<&str> = order.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["A1", "B1", "A2", "A3"]);
        let times: Vec<u128> = order.iter().map(|(_, t)| t.as_millis()).collect();
        assert_eq!(times, [105, 210, 315, 420]);
    }

    #[tokio::test(start_paused = true)]
    async fn shares_weight_the_turns() {
        let mut calls = vec![("H", 3); 7];
        calls.extend([("L", 1); 3]);
        let order = turns(10, &calls).await;
        let names: Vec<&str> = order.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            ["H1", "H2", "H3", "L1", "H4", "H5", "H6", "L2", "H7", "L3"]
        );
        let last = order.last().expect("turns").1;
        assert_eq!(
            last,
            Duration::from_millis(1050),
            "one turn per pace, none lost"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_that_goes_away_leaves_no_ghost_turn() {
        let budget = std::sync::Arc::new(UpstreamBudget::new(
            Rate {
                count: 10,
                per: Duration::from_secs(1),
            },
            LONG,
        ));
        let start = Instant::now();
        budget
            .acquire(caller("first"), false, LONG)
            .await
            .expect("free");
        // Five of A's calls wait (the first of them holds the dispatcher's part); B's after.
        let gone: Vec<_> = (0..5)
            .map(|_| {
                let budget = budget.clone();
                tokio::spawn(async move { budget.acquire(caller("A"), false, LONG).await })
            })
            .collect();
        tokio::task::yield_now().await;
        let b = {
            let budget = budget.clone();
            tokio::spawn(async move {
                budget
                    .acquire(caller("B"), false, LONG)
                    .await
                    .expect("a turn");
                start.elapsed()
            })
        };
        tokio::task::yield_now().await;
        assert_eq!(budget.waiting_principals(), 2);
        for task in &gone {
            task.abort();
        }
        tokio::task::yield_now().await;
        assert_eq!(budget.waiting_principals(), 1, "A's calls left at once");
        // B takes the very next turn: none goes to A's departed calls.
        assert_eq!(b.await.expect("task"), Duration::from_millis(105));
        assert_eq!(budget.waiting_principals(), 0);
    }
}
