//! Purges, and following the generation of the shared tier: a purge on any replica is a new
//! generation, announced; every replica drops its memory when it learns of one, by the
//! announcement or by reading the generation (an announcement may be lost).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast::error::RecvError;

use super::shared::SharedTier;
use super::{Cache, Tiers};
use crate::cluster::{Event, Unavailable};

/// How often a replica reads the shared generation, to catch a purge whose announcement it
/// missed (pub/sub delivers at most once): twice a second, so every replica's memory is purged
/// within the second the contract promises.
pub const GENERATION_POLL: Duration = Duration::from_millis(500);

impl Cache {
    /// Makes `generation` this replica's, dropping its memory when that is news.
    pub(super) fn adopt(&self, shared: &SharedTier, generation: u64, reason: &'static str) {
        if shared.adopt(generation) {
            self.flush(reason);
        }
        // The replica's own, which never goes back whatever was offered.
        self.metrics.set_cache_generation(shared.generation());
    }

    /// Drops every entry of this replica, and the tiers holding them: a fetch in flight
    /// finishes into the old tiers, which are freed when it ends.
    fn flush(&self, reason: &'static str) {
        self.tiers
            .store(Arc::new(Tiers::new(self.max_bytes, self.stale_if_error)));
        self.metrics.count_cache_flush(reason);
    }

    /// Empties the cache: this replica's memory, and with Redis every replica's (a new
    /// generation, announced). `Ok(Some((generation, replicas notified)))` with Redis,
    /// `Ok(None)` without; `Err` when Redis could not be reached: only this replica's memory
    /// was emptied.
    pub async fn purge(&self) -> Result<Option<(u64, u64)>, Unavailable> {
        let Some(shared) = &self.shared else {
            self.flush("local");
            return Ok(None);
        };
        let purged = shared.purge().await;
        self.flush("local");
        let (generation, notified) = purged?;
        shared.adopt(generation);
        self.metrics.set_cache_generation(generation);
        Ok(Some((generation, notified)))
    }

    /// Keeps this replica's memory in the generation of the shared tier, for as long as the
    /// app runs: purges announced by other replicas, and a read of the generation every
    /// [`GENERATION_POLL`] for an announcement that was lost (or a subscription that was
    /// down). Without Redis there is nothing to follow.
    pub async fn follow_purges(&self) -> Infallible {
        let Some(shared) = &self.shared else {
            return std::future::pending().await;
        };
        let mut events = shared.events();
        let mut poll = tokio::time::interval(GENERATION_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = poll.tick() => {
                    if let Ok(generation) = shared.current_generation().await {
                        self.adopt(shared, generation, "generation");
                    }
                }
                event = events.recv() => match event {
                    Ok(Event::Message(message)) => {
                        let purged = message.strip_prefix("purge ").and_then(|g| g.parse().ok());
                        if let Some(generation) = purged {
                            self.adopt(shared, generation, "message");
                        }
                    }
                    // Announcements may have been lost: look now rather than at the next tick.
                    Ok(Event::Subscribed) | Err(RecvError::Lagged(_)) => poll.reset_immediately(),
                    Ok(_) => {}
                    Err(RecvError::Closed) => return std::future::pending().await,
                },
            }
        }
    }
}
