//! One request's Redis time: `GATEWAY_REDIS_TIMEOUT` bounds all of a request's Redis commands
//! together, not each one (contract §11), so a slow Redis adds at most one timeout to a request
//! however many round trips it makes. The request's pipeline runs inside [`request`]; every
//! command [`Cluster::invoke`](super::Cluster::invoke) runs within it waits at most what is
//! left, so call sites need not pass anything. Work outside any request (the heartbeat, tasks
//! spawned to finish in the background) has the whole timeout for each command.

use std::cell::Cell;
use std::time::Duration;

tokio::task_local! {
    /// The Redis time the current request has spent so far.
    static SPENT: Cell<Duration>;
}

/// Runs `request` with its own Redis time, all of `GATEWAY_REDIS_TIMEOUT`.
pub async fn request<F: Future>(request: F) -> F::Output {
    SPENT.scope(Cell::new(Duration::ZERO), request).await
}

/// Runs `work` done for more than the current request (a reservation of the shared budget,
/// whose turn goes to whichever call the queue grants it) with Redis time of its own: what the
/// request spent must not refuse the turn the queue behind it needs. (A fill's store, for every
/// replica, runs in a task of its own.)
pub async fn own_time<F: Future>(work: F) -> F::Output {
    SPENT.scope(Cell::new(Duration::ZERO), work).await
}

/// What is left of `timeout` for the current request (all of it outside a request).
pub(super) fn left(timeout: Duration) -> Duration {
    SPENT
        .try_with(|spent| timeout.saturating_sub(spent.get()))
        .unwrap_or(timeout)
}

/// Counts `waited` against the current request's Redis time.
pub(super) fn spend(waited: Duration) {
    let _ = SPENT.try_with(|spent| spent.set(spent.get() + waited));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_request_shares_one_timeout_among_its_commands_and_the_rest_has_its_own() {
        let timeout = Duration::from_millis(100);
        assert_eq!(
            left(timeout),
            timeout,
            "outside a request: the whole timeout"
        );
        request(async {
            spend(Duration::from_millis(60));
            assert_eq!(left(timeout), Duration::from_millis(40));
            spend(Duration::from_millis(60));
            assert_eq!(left(timeout), Duration::ZERO);
            // A task spawned by the request is not the request.
            let spawned = tokio::spawn(async move { left(timeout) }).await;
            assert_eq!(spawned.ok(), Some(timeout));
        })
        .await;
        request(async { assert_eq!(left(timeout), timeout, "each request its own") }).await;
    }
}
