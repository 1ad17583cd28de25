//! The policy in force, and its hot reload (contract §5): the policy folder is re-read every
//! few seconds and on SIGHUP; a valid edit replaces the policy atomically (requests in flight
//! keep the one they started with), a broken edit is logged with its `file:line` and the last
//! good policy stays in force.
//!
//! Polling, not file-system events: Kubernetes updates a mounted ConfigMap by swapping a
//! `..data` symbolic link inside the folder, which inotify-style watchers easily miss, while
//! comparing the folder's `*.toml` texts every tick sees every kind of edit.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use arc_swap::{ArcSwap, Guard};

use super::load::{PolicyError, PolicySet};
use crate::telemetry::SourceHealth;

/// How often the policy folder is re-read unless the app is told otherwise.
pub const DEFAULT_POLL: Duration = Duration::from_secs(2);

/// The policy in force, swappable while requests read it.
pub struct LivePolicy {
    current: ArcSwap<PolicySet>,
    source: Option<Source>,
    /// Where reloads are reported, once the app that serves this policy has metrics.
    health: OnceLock<SourceHealth>,
}

struct Source {
    dir: PathBuf,
    /// Sources held in memory, appended to the folder's files on every load: `demo`'s key for
    /// the SDKs, which no edit of the folder removes.
    extra: Vec<(PathBuf, String)>,
    /// The texts last looked at (applied or rejected), so an edit is acted on, and logged, once.
    seen: Mutex<Seen>,
}

#[derive(Default)]
struct Seen {
    sources: Vec<(PathBuf, String)>,
    unreadable: Option<String>,
    /// The texts last seen do not load: the last good policy is in force instead.
    rejected: bool,
}

/// What one [`LivePolicy::reload`] did.
#[derive(Debug)]
pub enum Reload {
    /// The folder's policy files are as last seen (or the policy has no folder).
    Unchanged,
    /// An edit was valid and is now in force.
    Applied,
    /// An edit is broken, or the folder cannot be read; the last good policy stays.
    Rejected(PolicyError),
}

impl LivePolicy {
    /// A policy that never changes: `demo`'s, built at start from the repository's policy (or
    /// the built-in default) plus the key it prints.
    pub fn fixed(policy: PolicySet) -> LivePolicy {
        LivePolicy {
            current: ArcSwap::from_pointee(policy),
            source: None,
            health: OnceLock::new(),
        }
    }

    /// Loads `dir`, which later reloads re-read. A broken folder is an error here: the gateway
    /// does not start without a good policy.
    pub fn load_dir(dir: &Path) -> Result<LivePolicy, PolicyError> {
        LivePolicy::load_dir_with(dir, Vec::new())
    }

    /// [`LivePolicy::load_dir`] plus `extra` policy texts held in memory (each named by its
    /// path in errors), merged after the folder's files on every reload: an edit of the folder
    /// never drops them, and a folder edit that conflicts with them is rejected like any other.
    pub fn load_dir_with(
        dir: &Path,
        extra: Vec<(PathBuf, String)>,
    ) -> Result<LivePolicy, PolicyError> {
        let sources = PolicySet::read_sources(dir)?;
        let policy = PolicySet::from_sources(&merged(&sources, &extra))?;
        Ok(LivePolicy {
            current: ArcSwap::from_pointee(policy),
            source: Some(Source {
                dir: dir.to_owned(),
                extra,
                seen: Mutex::new(Seen {
                    sources,
                    unreadable: None,
                    rejected: false,
                }),
            }),
            health: OnceLock::new(),
        })
    }

    /// The policy in force now; a request holds it for its whole life.
    pub fn load(&self) -> Guard<Arc<PolicySet>> {
        self.current.load()
    }

    /// Reports every reload from now on to `health` (the app's metrics): a read that finds the
    /// folder good, and one that finds it broken or unreadable, each poll and SIGHUP. The policy
    /// was loaded good just before, so this counts as a success; a second call is ignored.
    pub fn report_to(&self, health: SourceHealth) {
        health.succeeded();
        let _ = self.health.set(health);
    }

    /// Re-reads the folder and applies it when it changed and is valid. What SIGHUP and every
    /// poll tick run; logs what it did.
    pub fn reload(&self) -> Reload {
        let Some(source) = &self.source else {
            return Reload::Unchanged;
        };
        let (outcome, good) = self.reload_from(source);
        if let (Some(health), Some(good)) = (self.health.get(), good) {
            if good {
                health.succeeded();
            } else {
                health.failed();
            }
        }
        outcome
    }

    /// [`LivePolicy::reload`], and whether the folder was found good (`None`: not decided,
    /// when it read differently twice in a row).
    fn reload_from(&self, source: &Source) -> (Reload, Option<bool>) {
        let mut seen = source.seen.lock().unwrap_or_else(PoisonError::into_inner);
        let sources = match PolicySet::read_sources(&source.dir) {
            Ok(sources) => sources,
            Err(e) => {
                let message = e.to_string();
                if seen.unreadable.as_ref() != Some(&message) {
                    tracing::error!(error = %e, "cannot re-read the policy folder; the last good policy stays in force");
                    seen.unreadable = Some(message);
                }
                return (Reload::Rejected(e), Some(false));
            }
        };
        seen.unreadable = None;
        if sources == seen.sources {
            // A broken edit still in place fails every read until it is fixed.
            return (Reload::Unchanged, Some(!seen.rejected));
        }
        // Files read while an editor or Kubernetes was halfway through replacing them may mix
        // two versions: act only on a folder that reads the same twice.
        if PolicySet::read_sources(&source.dir).ok().as_ref() != Some(&sources) {
            return (Reload::Unchanged, None);
        }
        let result = PolicySet::from_sources(&merged(&sources, &source.extra));
        seen.sources = sources;
        seen.rejected = result.is_err();
        match result {
            Ok(policy) => {
                tracing::info!(
                    dir = %source.dir.display(),
                    policy = %policy.summary(),
                    "policy reloaded"
                );
                self.current.store(Arc::new(policy));
                (Reload::Applied, Some(true))
            }
            Err(e) => {
                tracing::error!(error = %e, "policy edit rejected; the last good policy stays in force");
                (Reload::Rejected(e), Some(false))
            }
        }
    }
}

/// The folder's files, then the in-memory ones.
fn merged(folder: &[(PathBuf, String)], extra: &[(PathBuf, String)]) -> Vec<(PathBuf, String)> {
    folder.iter().chain(extra).cloned().collect()
}

/// Reloads every `every` and on SIGHUP (received through `hangup`), forever; the app runs it
/// alongside its server, so it stops when the server does. A fixed policy is never re-read, but
/// SIGHUP is still taken (and logged) rather than ending the process.
pub async fn watch(policy: Arc<LivePolicy>, every: Duration, mut hangup: Hangup) -> Infallible {
    if policy.source.is_none() {
        loop {
            hangup.recv().await;
            tracing::info!("SIGHUP: this policy is fixed (no policy folder); nothing to re-read");
        }
    }
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = hangup.recv() => tracing::info!("SIGHUP: re-reading the policy folder"),
        }
        policy.reload();
    }
}

/// SIGHUP where there is such a thing. Created when the app is built, before it announces
/// itself: from then on SIGHUP reloads the policy instead of ending the process (its default),
/// even before the watcher runs.
pub struct Hangup {
    #[cfg(unix)]
    signal: Option<tokio::signal::unix::Signal>,
}

impl Hangup {
    /// Takes SIGHUP over from its default action; needs a Tokio runtime.
    pub fn listen() -> Hangup {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let signal = signal(SignalKind::hangup())
                .map_err(|e| tracing::warn!(error = %e, "SIGHUP will not reload the policy"))
                .ok();
            Hangup { signal }
        }
        #[cfg(not(unix))]
        Hangup {}
    }

    async fn recv(&mut self) {
        #[cfg(unix)]
        if let Some(signal) = &mut self.signal {
            if signal.recv().await.is_some() {
                return;
            }
            self.signal = None;
        }
        std::future::pending().await
    }
}
