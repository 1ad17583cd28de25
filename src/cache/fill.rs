//! The fill protocol across replicas (contract §11): a miss here looks in the shared tier, and
//! one replica fetches for all of them (it holds the key's fill lease) while the others wait
//! for its fill, take over when its lease lapses, or relay the answer of a fill that failed.

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use super::shared::{self, Commit, Lookup, SharedTier};
use super::{Cache, Entry, Fetch, NotStored, STALE_HOLD, Shareable, Tiers, Via};

/// Purges seen by one lookup before the replica stops looking in the shared tier and fetches
/// on its own: purges in a storm must not keep a request waiting.
const MAX_PURGES_SEEN: u32 = 3;

impl Cache {
    /// A miss with the shared tier: its entry, or the fill lease (this replica fetches for all
    /// and shares what it got), or a wait for the replica that holds the lease. Redis out of
    /// reach, purges in a storm or a wait past `wait_limit`: this replica fetches on its own.
    pub(super) async fn fill_shared<M, F, Fut>(
        &self,
        shared: &SharedTier,
        tiers: &Tiers,
        key: &Arc<str>,
        ttl: Duration,
        fetch: F,
        via: &OnceLock<Via>,
    ) -> Result<Arc<Entry>, NotStored<M>>
    where
        M: Shareable,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Fetch<M>>,
    {
        // Subscribed before the first look, so the end of a fill cannot slip in between.
        let mut events = shared.events();
        let started = Instant::now();
        let (mut waited, mut purges) = (false, 0);
        let got = |waited: bool, how: Via| {
            if waited {
                self.metrics
                    .observe_cache_fill_wait(started.elapsed().as_secs_f64());
            }
            let _ = via.set(how);
        };
        loop {
            let shared_key = shared.key(key);
            match shared.lookup(&shared_key, Duration::ZERO, waited).await {
                Ok(Lookup::Purged(generation)) if purges < MAX_PURGES_SEEN => {
                    purges += 1;
                    self.adopt(shared, generation, "generation");
                }
                Ok(Lookup::Fresh(entry)) => {
                    got(waited, if waited { Via::Remote } else { Via::Shared });
                    if !entry.stale {
                        tiers.stale.insert(key.clone(), entry.clone()).await;
                    }
                    return Ok(entry);
                }
                Ok(Lookup::Failed(answer)) => match M::from_shared(&answer) {
                    Some(answer) => {
                        got(waited, Via::Remote);
                        return Err(NotStored::Passed(Arc::new(answer)));
                    }
                    None => break,
                },
                Ok(Lookup::Fill(lease, old)) => {
                    got(waited, if waited { Via::TakenOver } else { Via::Stored });
                    let filled = self.fill(tiers, key, ttl, fetch().await, old).await;
                    let answer = match &filled {
                        Err(NotStored::Passed(m)) => m.to_shared(),
                        _ => None,
                    };
                    let commit = match (&filled, &answer) {
                        (Ok(entry), _) => Commit::Entry(entry),
                        (Err(_), Some(answer)) => Commit::Failed(answer, STALE_HOLD),
                        (Err(_), None) => Commit::Nothing,
                    };
                    lease.commit(commit).await;
                    return filled;
                }
                Ok(Lookup::Wait(left)) if started.elapsed() < self.wait_limit => {
                    waited = true;
                    let poll = left.clamp(Duration::from_millis(1), shared::POLL);
                    SharedTier::wait(&mut events, &shared_key, poll).await;
                }
                _ => break,
            }
        }
        got(waited, Via::Stored);
        self.fill(tiers, key, ttl, fetch().await, None).await
    }
}
