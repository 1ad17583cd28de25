//! The cache's second tier, shared by the replicas through Redis (contract §11, replicas.md §3.7):
//! entries every replica can serve, the fill lease that makes concurrent misses across replicas
//! one upstream call, the answers of failed fills relayed to the replicas that waited for them,
//! and the generation that purges every replica at once.
//!
//! Every step is one script (`lua/`), with Redis `TIME` as its only clock; every key is under
//! the namespace, names the generation it belongs to, and expires (the generation itself is
//! the one exception: evicting it would make purged entries reachable again). Entries come back
//! as [`Entry`]s whose times are converted from Redis's clock to this process's, so `Age` is
//! right whatever the replicas' clocks say.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use redis::{Script, Value};
use sha2::{Digest, Sha256};
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinHandle;

use super::Entry;
use crate::cluster::{Cluster, Event, Op, Unavailable};

/// How long a fill lease lasts unless renewed: a holder that dies holds its key up this long.
pub const LEASE: Duration = Duration::from_secs(5);

/// How often a holder renews its lease: three times per lease, so one late renewal loses none.
const RENEW_EVERY: Duration = Duration::from_millis(1700);

/// How often a replica waiting for another's fill looks again when no message woke it (a lost
/// message, a holder that died).
pub const POLL: Duration = Duration::from_millis(200);

static FILL_OR_LOCK: std::sync::LazyLock<Script> =
    std::sync::LazyLock::new(|| Script::new(include_str!("lua/fill_or_lock.lua")));
static FILL_COMMIT: std::sync::LazyLock<Script> =
    std::sync::LazyLock::new(|| Script::new(include_str!("lua/fill_commit.lua")));
static LEASE_SCRIPT: std::sync::LazyLock<Script> =
    std::sync::LazyLock::new(|| Script::new(include_str!("lua/lease.lua")));
static PURGE: std::sync::LazyLock<Script> =
    std::sync::LazyLock::new(|| Script::new(include_str!("lua/purge.lua")));
static GENERATION: std::sync::LazyLock<Script> =
    std::sync::LazyLock::new(|| Script::new(include_str!("lua/generation.lua")));

/// This replica's view of the shared tier.
pub struct SharedTier {
    cluster: Arc<Cluster>,
    /// The generation this replica's memory belongs to.
    generation: AtomicU64,
}

/// What a lookup in the shared tier found.
pub enum Lookup {
    /// A purge happened since this replica last knew: this is the generation now.
    Purged(u64),
    /// An entry fresh enough (possibly a stale answer re-served while the upstream fails).
    Fresh(Arc<Entry>),
    /// The answer of a fill that failed while this replica waited for it.
    Failed(Bytes),
    /// This replica fills the key, with the lease; the old entry, if it is still within its
    /// stale-if-error time.
    Fill(Lease, Option<Arc<Entry>>),
    /// Another replica holds the lease; it lapses within this long unless renewed.
    Wait(Duration),
}

/// The key of an entry in the shared tier, and how to wait for it.
pub struct Key {
    entry: String,
    lease: String,
    outcome: String,
    /// The message that says a fill of this key ended.
    filled: String,
}

impl SharedTier {
    pub fn new(cluster: Arc<Cluster>) -> SharedTier {
        SharedTier {
            cluster,
            generation: AtomicU64::new(0),
        }
    }

    /// The generation this replica's memory belongs to.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// Makes `generation` this replica's; whether it changed (the memory must then go).
    pub fn adopt(&self, generation: u64) -> bool {
        self.generation.swap(generation, Ordering::Relaxed) != generation
    }

    /// Every message and connection event of the pub/sub connection from now on.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.cluster.events()
    }

    /// The keys of `key` (a canonical upstream request) in the current generation: hashed, so
    /// no query reaches Redis's key space, and short.
    pub fn key(&self, key: &str) -> Key {
        let digest = Sha256::digest(key.as_bytes());
        let hash: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        let generation = self.generation();
        Key {
            entry: self.cluster.key(&format!("c:{generation}:{hash}")),
            lease: self.cluster.key(&format!("l:{generation}:{hash}")),
            outcome: self.cluster.key(&format!("o:{generation}:{hash}")),
            filled: format!("filled {generation} {hash}"),
        }
    }

    /// Looks `key` up, taking the fill lease when nobody holds it. An entry with less than
    /// `min_fresh` freshness left counts as missing (a refresh looks for a newer one);
    /// `waited` says this replica already waited for a fill, so a failed fill's answer is
    /// for it.
    pub async fn lookup(
        &self,
        key: &Key,
        min_fresh: Duration,
        waited: bool,
    ) -> Result<Lookup, Unavailable> {
        let token = format!("{}:{}", self.cluster.replica_id(), uuid::Uuid::new_v4());
        let mut script = FILL_OR_LOCK.prepare_invoke();
        script
            .key(self.cluster.key("gen"))
            .key(&key.entry)
            .key(&key.lease)
            .key(&key.outcome)
            .arg(self.generation())
            .arg(&token)
            .arg(LEASE.as_millis() as u64)
            .arg(min_fresh.as_millis() as u64)
            .arg(u8::from(waited));
        let reply: Vec<Value> = self.cluster.invoke(Op::Fill, &script).await?;
        let mut reply = reply.into_iter();
        let what = reply.next().as_ref().and_then(int);
        let second = reply.next();
        let malformed = || {
            tracing::warn!("the shared cache answered a lookup in an unexpected form");
            Unavailable
        };
        Ok(match what {
            Some(-9) => {
                let generation = second.as_ref().and_then(int).unwrap_or(-1);
                Lookup::Purged(u64::try_from(generation).map_err(|_| malformed())?)
            }
            Some(1) => {
                let now = second.as_ref().and_then(int).ok_or_else(malformed)?;
                Lookup::Fresh(entry(now, reply).ok_or_else(malformed)?)
            }
            Some(3) => Lookup::Failed(second.and_then(bulk).ok_or_else(malformed)?),
            Some(2) => {
                let now = second.as_ref().and_then(int).ok_or_else(malformed)?;
                let lease = Lease::hold(self.cluster.clone(), key, token);
                Lookup::Fill(lease, entry(now, reply))
            }
            Some(0) => {
                let left = second.as_ref().and_then(int).unwrap_or(0);
                Lookup::Wait(Duration::from_millis(left.max(0) as u64))
            }
            _ => return Err(malformed()),
        })
    }

    /// Waits until a fill of `key` ends (its message), `within` passes, or messages were lost.
    pub async fn wait(events: &mut broadcast::Receiver<Event>, key: &Key, within: Duration) {
        let woken = async {
            loop {
                match events.recv().await {
                    Ok(Event::Message(m)) if m == key.filled => return,
                    Ok(_) => {}
                    Err(RecvError::Lagged(_)) => return,
                    Err(RecvError::Closed) => std::future::pending().await,
                }
            }
        };
        let _ = tokio::time::timeout(within, woken).await;
    }

    /// Purges every replica: a new generation, announced. Returns it and how many replicas'
    /// subscriptions heard the announcement.
    pub async fn purge(&self) -> Result<(u64, u64), Unavailable> {
        let mut script = PURGE.prepare_invoke();
        script
            .key(self.cluster.key("gen"))
            .arg(self.cluster.key("events"));
        self.cluster.invoke(Op::Purge, &script).await
    }

    /// The generation in Redis now.
    pub async fn current_generation(&self) -> Result<u64, Unavailable> {
        let mut script = GENERATION.prepare_invoke();
        script.key(self.cluster.key("gen"));
        let generation: Value = self.cluster.invoke(Op::Generation, &script).await?;
        int(&generation)
            .and_then(|g| u64::try_from(g).ok())
            .ok_or(Unavailable)
    }
}

/// What a fill came to, for the other replicas.
pub enum Commit<'a> {
    /// A new entry: this body, fresh for `ttl`, kept `stale_if_error` longer.
    Store {
        body: &'a [u8],
        ttl: Duration,
        stale_if_error: Duration,
    },
    /// The upstream failed: the old entry is re-served as stale for this long.
    Stale(Duration),
    /// A failed fill's answer, relayed to the replicas that waited, for this long.
    Failed(&'a [u8], Duration),
    /// Nothing to share (an answer too long to store): whoever waits fetches its own.
    Nothing,
}

/// The fill lease of one key: renewed in the background while held, given up when dropped
/// without a [`commit`](Lease::commit) (a cancelled request, a panic) so no replica waits for it
/// to lapse.
pub struct Lease {
    cluster: Arc<Cluster>,
    entry: String,
    lease: String,
    outcome: String,
    filled: String,
    token: String,
    renewal: JoinHandle<()>,
    committed: bool,
}

impl Lease {
    fn hold(cluster: Arc<Cluster>, key: &Key, token: String) -> Lease {
        let renewal = {
            let (cluster, lease, token) = (cluster.clone(), key.lease.clone(), token.clone());
            tokio::spawn(async move {
                let mut every = tokio::time::interval(RENEW_EVERY);
                every.tick().await;
                loop {
                    every.tick().await;
                    let mut script = LEASE_SCRIPT.prepare_invoke();
                    script.key(&lease).arg(&token).arg(LEASE.as_millis() as u64);
                    // A renewal Redis could not take: the lease may lapse and another replica
                    // fetch too; one more upstream call at most, never a failed request.
                    let _ = cluster.invoke::<i64>(Op::Renew, &script).await;
                }
            })
        };
        Lease {
            cluster,
            entry: key.entry.clone(),
            lease: key.lease.clone(),
            outcome: key.outcome.clone(),
            filled: key.filled.clone(),
            token,
            renewal,
            committed: false,
        }
    }

    /// Shares what the fill came to, gives the lease up and wakes the replicas waiting.
    pub async fn commit(mut self, commit: Commit<'_>) {
        self.renewal.abort();
        let (mode, fresh, stale, payload): (&str, Duration, Duration, &[u8]) = match commit {
            Commit::Store {
                body,
                ttl,
                stale_if_error,
            } => ("store", ttl, stale_if_error, body),
            Commit::Stale(hold) => ("stale", hold, Duration::ZERO, b""),
            Commit::Failed(answer, hold) => ("outcome", hold, Duration::ZERO, answer),
            Commit::Nothing => ("release", Duration::ZERO, Duration::ZERO, b""),
        };
        let mut script = FILL_COMMIT.prepare_invoke();
        script
            .key(&self.entry)
            .key(&self.lease)
            .key(&self.outcome)
            .arg(&self.token)
            .arg(mode)
            .arg(fresh.as_millis() as u64)
            .arg(stale.as_millis() as u64)
            .arg(payload)
            .arg(self.cluster.key("events"))
            .arg(&self.filled);
        // Committed even when Redis does not take it: the lease then lapses by itself.
        self.committed = true;
        let _ = self.cluster.invoke::<i64>(Op::Commit, &script).await;
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renewal.abort();
        if self.committed {
            return;
        }
        let (cluster, lease, token) = (
            self.cluster.clone(),
            std::mem::take(&mut self.lease),
            std::mem::take(&mut self.token),
        );
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let mut script = LEASE_SCRIPT.prepare_invoke();
                script.key(&lease).arg(&token).arg(0);
                let _ = cluster.invoke::<i64>(Op::Renew, &script).await;
            });
        }
    }
}

/// An entry as the scripts return it (`now, stored, fresh, stale, x, body`, Redis ms), in this
/// process's clock.
fn entry(now: i64, mut fields: impl Iterator<Item = Value>) -> Option<Arc<Entry>> {
    let mut time = || fields.next().as_ref().and_then(int);
    let (stored, fresh, stale, x) = (time()?, time()?, time()?, time()?);
    let body = fields.next().and_then(bulk)?;
    let here = Instant::now();
    let ago = |t: i64| Duration::from_millis((now - t).max(0) as u64);
    let ahead = |t: i64| Duration::from_millis((t - now).max(0) as u64);
    Some(Arc::new(Entry {
        body,
        stored_at: here.checked_sub(ago(stored)).unwrap_or(here),
        fresh_until: here + ahead(fresh),
        stale_until: here + ahead(stale),
        stale: x == 1,
        refreshing: AtomicBool::new(false),
    }))
}

fn int(value: &Value) -> Option<i64> {
    match value {
        Value::Int(i) => Some(*i),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

fn bulk(value: Value) -> Option<Bytes> {
    match value {
        Value::BulkString(b) => Some(Bytes::from(b)),
        _ => None,
    }
}
