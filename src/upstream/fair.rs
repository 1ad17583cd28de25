//! The fair queue in front of the upstream budget (contract §10): when calls wait for a turn,
//! turns go round-robin over the principals that have calls waiting, weighted by their `share`
//! (deficit round robin, one call costing one turn), so a principal flooding the gateway with
//! uncached queries delays another's next call by at most its own share of turns.
//!
//! The queue only decides *whose* call takes the next turn; the turns themselves come from the
//! budget ([`super::budget::Turns`]): this process's pace, or reservations shared with the other
//! replicas through Redis. The queue is local to the process either way, and never waits: every
//! method takes the lock for a few hash and deque operations.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::oneshot;

/// Calls waiting for a turn, one backlog per principal, served by deficit round robin.
#[derive(Default)]
pub struct FairQueue {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    backlogs: HashMap<Arc<str>, Backlog>,
    /// The principals with calls waiting, in round-robin order: the front one is served next.
    ring: VecDeque<Arc<str>>,
    next_ticket: u64,
}

/// One principal's waiting calls, oldest first.
struct Backlog {
    calls: VecDeque<Waiter>,
    share: u32,
    /// Turns left in this principal's current round; refilled to `share` when it comes round.
    deficit: u32,
}

struct Waiter {
    ticket: u64,
    turn: oneshot::Sender<()>,
}

/// The principal's backlog is full: the call is refused (only this principal's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BacklogFull;

impl FairQueue {
    fn state(&self) -> MutexGuard<'_, State> {
        // Every change below completes before the lock is released: a panic elsewhere cannot
        // leave the queue half-changed.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues a call of `principal` (weighted by `share`). A first attempt goes to the back of
    /// its principal's backlog and is refused when `bound` calls already wait there; a retry
    /// keeps its place: it goes to the front, and past the bound (it was admitted once).
    pub fn join(
        &self,
        principal: &str,
        share: u32,
        retry: bool,
        bound: usize,
    ) -> Result<Ticket<'_>, BacklogFull> {
        let mut state = self.state();
        let state = &mut *state;
        let key = match state.backlogs.get_key_value(principal) {
            Some((_, backlog)) if !retry && backlog.calls.len() >= bound => {
                return Err(BacklogFull);
            }
            Some((key, _)) => key.clone(),
            None => {
                let key: Arc<str> = Arc::from(principal);
                state.ring.push_back(key.clone());
                state.backlogs.insert(
                    key.clone(),
                    Backlog {
                        calls: VecDeque::new(),
                        share,
                        deficit: 0,
                    },
                );
                key
            }
        };
        let ticket = state.next_ticket;
        state.next_ticket += 1;
        let (tx, rx) = oneshot::channel();
        let waiter = Waiter { ticket, turn: tx };
        if let Some(backlog) = state.backlogs.get_mut(&key) {
            // A policy reload may have changed it; the latest call says what holds now.
            backlog.share = share.max(1);
            if retry {
                backlog.calls.push_front(waiter);
            } else {
                backlog.calls.push_back(waiter);
            }
        }
        Ok(Ticket {
            queue: self,
            principal: key,
            ticket,
            turn: rx,
            used: false,
        })
    }

    /// Gives one turn (one the budget has just granted) to the next call in the rotation.
    /// Returns `false` when no call is waiting.
    pub fn grant_next(&self) -> bool {
        self.state().grant_next()
    }

    /// How many principals have calls waiting (a gauge for operators).
    pub fn waiting_principals(&self) -> usize {
        self.state().backlogs.len()
    }
}

impl State {
    fn grant_next(&mut self) -> bool {
        while let Some(waiter) = self.pick() {
            // Sent under the lock, so a ticket leaving sees either "still queued" or "granted".
            // A waiter whose receiver is gone cannot take the turn: the next one does.
            if waiter.turn.send(()).is_ok() {
                return true;
            }
        }
        false
    }

    /// Deficit round robin with a cost of one per call: the front principal is served while its
    /// round lasts (`share` calls), then goes to the back of the ring.
    fn pick(&mut self) -> Option<Waiter> {
        loop {
            let key = self.ring.front()?.clone();
            let Some(backlog) = self.backlogs.get_mut(&key) else {
                // Not reachable (the ring holds exactly the backlogs' keys); heal rather than spin.
                self.ring.pop_front();
                continue;
            };
            if backlog.deficit == 0 {
                backlog.deficit = backlog.share;
            }
            let Some(waiter) = backlog.calls.pop_front() else {
                self.backlogs.remove(&key);
                self.ring.pop_front();
                continue;
            };
            backlog.deficit -= 1;
            if backlog.calls.is_empty() {
                // Nothing more waits: the principal leaves the rotation (and its deficit with it,
                // as in DRR: an idle principal saves up no turns).
                self.backlogs.remove(&key);
                self.ring.pop_front();
            } else if backlog.deficit == 0 {
                self.ring.rotate_left(1);
            }
            return Some(waiter);
        }
    }

    /// Takes a call out of the queue; `false` when it is no longer there (it had its turn).
    fn remove(&mut self, principal: &Arc<str>, ticket: u64) -> bool {
        let Some(backlog) = self.backlogs.get_mut(principal) else {
            return false;
        };
        let Some(at) = backlog.calls.iter().position(|w| w.ticket == ticket) else {
            return false;
        };
        backlog.calls.remove(at);
        if backlog.calls.is_empty() {
            self.backlogs.remove(principal);
            if let Some(at) = self.ring.iter().position(|k| k == principal) {
                self.ring.remove(at);
            }
        }
        true
    }
}

/// One call's place in the queue. Dropping it before its turn was used (the caller went away,
/// or its wait ran out) takes the call out of the queue at once; a turn it was given but did
/// not use goes to the next call in the rotation, so no turn is lost to a call that left.
pub struct Ticket<'q> {
    queue: &'q FairQueue,
    principal: Arc<str>,
    ticket: u64,
    turn: oneshot::Receiver<()>,
    used: bool,
}

impl Ticket<'_> {
    /// Resolves once this call has been given a turn. Cancel-safe.
    pub async fn granted(&mut self) {
        if (&mut self.turn).await.is_err() {
            // The sender is only dropped after sending or with the ticket removed, neither of
            // which leaves this future waiting; should it happen, never go without a turn.
            std::future::pending::<()>().await;
        }
    }

    /// Whether a turn has been given and not yet taken (without waiting).
    pub fn try_granted(&mut self) -> bool {
        self.turn.try_recv().is_ok()
    }

    /// The call takes its turn (and sends): dropping the ticket no longer passes it on.
    pub fn used(mut self) {
        self.used = true;
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if self.used {
            return;
        }
        let mut state = self.queue.state();
        if state.remove(&self.principal, self.ticket) {
            return;
        }
        // Not queued any more: it was given a turn. Unless it already took it (`try_granted`
        // then `used`), the turn goes to the next call rather than being wasted.
        if self.turn.try_recv().is_ok() {
            state.grant_next();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Grants turns one by one and names whose ticket got each, until the queue is empty.
    fn order(queue: &FairQueue, tickets: &mut Vec<(String, Ticket<'_>)>) -> Vec<String> {
        let mut served = Vec::new();
        while queue.grant_next() {
            let at = tickets
                .iter_mut()
                .position(|(_, t)| t.try_granted())
                .expect("one ticket was granted");
            let (name, ticket) = tickets.remove(at);
            ticket.used();
            served.push(name);
        }
        served
    }

    fn queue_up<'q>(queue: &'q FairQueue, calls: &[(&str, u32)]) -> Vec<(String, Ticket<'q>)> {
        let mut counts: HashMap<&str, usize> = HashMap::new();
        calls
            .iter()
            .map(|(who, share)| {
                let n = counts.entry(who).or_default();
                *n += 1;
                let ticket = queue.join(who, *share, false, 100).expect("room");
                (format!("{who}{n}"), ticket)
            })
            .collect()
    }

    #[test]
    fn turns_alternate_between_principals_whatever_the_arrival_order() {
        let queue = FairQueue::default();
        let mut tickets = queue_up(&queue, &[("A", 1), ("A", 1), ("A", 1), ("B", 1)]);
        assert_eq!(queue.waiting_principals(), 2);
        assert_eq!(order(&queue, &mut tickets), ["A1", "B1", "A2", "A3"]);
        assert_eq!(queue.waiting_principals(), 0);
    }

    #[test]
    fn shares_weight_the_rotation() {
        let queue = FairQueue::default();
        let heavy = [("H", 3); 7];
        let light = [("L", 1); 3];
        let mut tickets = queue_up(&queue, &[&heavy[..], &light[..]].concat());
        assert_eq!(
            order(&queue, &mut tickets),
            ["H1", "H2", "H3", "L1", "H4", "H5", "H6", "L2", "H7", "L3"]
        );
    }

    #[test]
    fn the_backlog_bound_refuses_only_its_principal_and_never_a_retry() {
        let queue = FairQueue::default();
        let _a: Vec<_> = (0..2)
            .map(|_| queue.join("A", 1, false, 2).expect("room"))
            .collect();
        assert_eq!(queue.join("A", 1, false, 2).err(), Some(BacklogFull));
        let b = queue
            .join("B", 1, false, 2)
            .expect("another principal has room");
        // A retry keeps its place: at the front of its principal's backlog, bound or not.
        let mut retry = queue
            .join("A", 1, true, 2)
            .expect("a retry is never refused");
        assert!(queue.grant_next());
        assert!(retry.try_granted(), "the retry went first");
        retry.used();
        drop(b);
    }

    #[test]
    fn a_call_that_leaves_gives_up_its_place_and_any_turn_it_was_given() {
        let queue = FairQueue::default();
        let mut tickets = queue_up(&queue, &[("A", 1), ("A", 1), ("B", 1), ("B", 1)]);
        // A1 leaves while queued: A2 takes A's place in the rotation.
        drop(tickets.remove(0));
        // A2 is given the turn but leaves before taking it: the turn goes on to B1.
        assert!(queue.grant_next());
        let (name, a2) = tickets.remove(0);
        assert_eq!(name, "A2");
        drop(a2);
        let (name, mut b1) = tickets.remove(0);
        assert_eq!(name, "B1");
        assert!(b1.try_granted(), "the turn A2 left went to B1");
        b1.used();
        assert_eq!(order(&queue, &mut tickets), ["B2"]);
        assert_eq!(queue.waiting_principals(), 0);
        assert!(!queue.grant_next());
    }
}
