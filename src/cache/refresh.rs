//! Background refresh (nginx's `proxy_cache_background_update`, Varnish's grace): a fresh entry
//! asked for in the last tenth of its freshness is served at once, and the one request that
//! found it there is handed its [`Refresh`], so a key polled steadily never makes a caller wait
//! for the upstream at expiry. With Redis, a refresh another replica did or is doing is taken
//! rather than repeated.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::shared::{self, Commit, Lookup, SharedTier};
use super::{Entry, Fetch, Tiers};
use crate::cluster::Unavailable;

impl Entry {
    /// Whether the caller at `now` takes this entry's background refresh: a fresh (not
    /// re-served stale) entry in the last tenth of its freshness whose refresh nobody took yet.
    pub(super) fn take_refresh(&self, now: Instant) -> bool {
        let tenth = self.fresh_until.saturating_duration_since(self.stored_at) / 10;
        !self.stale
            && now + tenth >= self.fresh_until
            && !self.refreshing.load(Ordering::Relaxed)
            && !self.refreshing.swap(true, Ordering::Relaxed)
    }
}

/// What a background refresh came to.
pub enum Refreshed<M> {
    /// A new answer replaced the entry.
    Stored,
    /// Another replica refreshed the entry, or is refreshing it: its answer is or will be in
    /// the shared tier.
    Shared,
    /// The refresh failed (or its answer is too long to store): the entry stays as it was.
    Kept(Fetch<M>),
}

/// The right to refresh one entry, handed to the one request that found it in the last tenth
/// of its freshness: fetch the key again (in the background) and [`run`](Refresh::run) it.
/// It refreshes the tiers the entry was read from, so a purge meanwhile is not undone.
pub struct Refresh {
    pub(super) tiers: Arc<Tiers>,
    pub(super) key: Arc<str>,
    pub(super) ttl: Duration,
    pub(super) stale_if_error: Duration,
    pub(super) max_entry: u64,
    pub(super) shared: Option<Arc<SharedTier>>,
    pub(super) taken: Taken,
}

/// The entry a [`Refresh`] was taken from: its refresh is given back when the refresh is
/// dropped without running (its request refused, or gone), so the next request takes it
/// rather than the entry expiring unrefreshed.
pub(super) struct Taken(pub(super) Option<Arc<Entry>>);

impl Drop for Taken {
    fn drop(&mut self) {
        if let Some(entry) = self.0.take() {
            entry.refreshing.store(false, Ordering::Relaxed);
        }
    }
}

impl Refresh {
    /// Refreshes the entry with what `fetch` brings, unless another replica has refreshed it
    /// already or is doing so (then that answer is taken, or left to it). Anything but a 200
    /// small enough to store leaves the entry as it is.
    pub async fn run<M, F>(mut self, fetch: F) -> Refreshed<M>
    where
        F: Future<Output = Fetch<M>>,
    {
        self.taken.0 = None;
        let Some(shared) = self.shared.clone() else {
            return self.store(fetch.await, None).await;
        };
        let key = shared.key(&self.key);
        match shared.lookup(&key, self.ttl / 10, false).await {
            Ok(Lookup::Fresh(entry)) => {
                self.insert(entry).await;
                Refreshed::Shared
            }
            Ok(Lookup::Fill(lease, _)) => self.store(fetch.await, Some(lease)).await,
            Ok(_) => Refreshed::Shared,
            // This replica on its own: it refreshes its own memory.
            Err(Unavailable) => self.store(fetch.await, None).await,
        }
    }

    async fn store<M>(self, fetched: Fetch<M>, lease: Option<shared::Lease>) -> Refreshed<M> {
        let body = match fetched {
            Fetch::Store(body) if body.len() as u64 <= self.max_entry => body,
            kept => {
                if let Some(lease) = lease {
                    lease.commit(Commit::Nothing).await;
                }
                return Refreshed::Kept(kept);
            }
        };
        let entry = Entry::new(&body, self.ttl, self.stale_if_error);
        if let Some(lease) = lease {
            lease.commit(Commit::Entry(&entry)).await;
        }
        self.insert(entry).await;
        Refreshed::Stored
    }

    async fn insert(self, entry: Arc<Entry>) {
        self.tiers
            .stale
            .insert(self.key.clone(), entry.clone())
            .await;
        self.tiers.fresh.insert(self.key, entry).await;
    }
}
