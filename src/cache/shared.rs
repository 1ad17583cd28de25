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
//!
//! Redis is shared infrastructure, not trusted with answers: every entry and relayed answer
//! written there carries a MAC (HMAC-SHA256) over everything served from it and the key it is
//! stored under, keyed with a key derived from the upstream secret key and the organization.
//! One read without a valid MAC (planted, or another organization's) is a miss, and the fill
//! that follows overwrites it. The generation never goes backwards: a replica that knows a
//! higher one than Redis (restarted, failed over, restored from an older snapshot) sets it
//! back, so a restart is not taken for a purge and does not undo one.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hmac::{Hmac, KeyInit, Mac};
use redis::{Script, Value};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinHandle;

use super::Entry;
use crate::cluster::{Cluster, Event, Op, Unavailable};
use crate::telemetry::Metrics;
use crate::upstream::{SharedTurns, TURN_LUA};

/// How long a fill lease lasts unless renewed: a holder that dies holds its key up this long.
pub const LEASE: Duration = Duration::from_secs(5);

/// How often a holder renews its lease: three times per lease, so one late renewal loses none.
const RENEW_EVERY: Duration = Duration::from_millis(1700);

/// How often a replica waiting for another's fill looks again when no message woke it (a lost
/// message, a holder that died).
pub const POLL: Duration = Duration::from_millis(200);

static FILL_OR_LOCK: std::sync::LazyLock<Script> = std::sync::LazyLock::new(|| {
    Script::new(&format!(
        "{TURN_LUA}{}",
        include_str!("lua/fill_or_lock.lua")
    ))
});
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
    /// The upstream budget's turns, when shared: a lookup that takes a fill lease reserves the
    /// turn its fetch needs.
    turns: Option<Arc<SharedTurns>>,
    /// The generation this replica's memory belongs to.
    generation: AtomicU64,
    signer: Arc<Signer>,
    metrics: Arc<Metrics>,
}

/// Signs what this replica writes to Redis and checks what it reads there.
struct Signer(Hmac<Sha256>);

/// An entry's times in Redis ms, and whether it is a stale answer re-served.
struct Times {
    stored: i64,
    fresh: i64,
    stale: i64,
    x: i64,
}

impl Signer {
    /// Keyed with HMAC(secret key, "billing-gateway cache v1" || organization): only the
    /// organization's own gateways can write what its gateways serve, and the secret key itself
    /// never leaves the process.
    fn new(secret_key: &SecretString, organization: uuid::Uuid) -> Signer {
        let keyed = |key: &[u8]| {
            <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes keys of any length")
        };
        let mut derive = keyed(secret_key.expose_secret().as_bytes());
        derive.update(b"billing-gateway cache v1");
        derive.update(organization.as_bytes());
        Signer(keyed(&derive.finalize().into_bytes()))
    }

    /// The MAC of `parts`, each length-prefixed so no two lists of parts sign alike.
    fn mac(&self, parts: &[&[u8]]) -> Hmac<Sha256> {
        let mut mac = self.0.clone();
        for part in parts {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part);
        }
        mac
    }

    /// An entry stored under `key`: its times, its body, where it is.
    fn entry(&self, key: &str, t: &Times, body: &[u8]) -> Hmac<Sha256> {
        let [stored, fresh, stale, x] = [t.stored, t.fresh, t.stale, t.x].map(|n| n.to_string());
        self.mac(&[
            b"entry",
            key.as_bytes(),
            stored.as_bytes(),
            fresh.as_bytes(),
            stale.as_bytes(),
            x.as_bytes(),
            body,
        ])
    }

    /// A failed fill's answer as stored under `key`: its MAC, then the answer.
    fn seal(&self, key: &str, answer: &[u8]) -> Vec<u8> {
        let mac = self.mac(&[b"outcome", key.as_bytes(), answer]);
        [&mac.finalize().into_bytes()[..], answer].concat()
    }

    /// The answer `sealed` under `key`, when its MAC is valid.
    fn open(&self, key: &str, sealed: &Bytes) -> Option<Bytes> {
        let (mac, answer) = sealed.split_at_checked(MAC_LEN)?;
        let valid = self
            .mac(&[b"outcome", key.as_bytes(), answer])
            .verify_slice(mac);
        valid.is_ok().then(|| sealed.slice(MAC_LEN..))
    }
}

/// The length of an HMAC-SHA256.
const MAC_LEN: usize = 32;

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
    /// The tier shared through `cluster` (reserving upstream `turns` with fill leases), signed
    /// with a key derived from `secret_key` and `organization`.
    pub fn new(
        cluster: Arc<Cluster>,
        turns: Option<Arc<SharedTurns>>,
        secret_key: &SecretString,
        organization: uuid::Uuid,
        metrics: Arc<Metrics>,
    ) -> SharedTier {
        for script in [
            &FILL_OR_LOCK,
            &FILL_COMMIT,
            &LEASE_SCRIPT,
            &PURGE,
            &GENERATION,
        ] {
            cluster.preload(script);
        }
        SharedTier {
            cluster,
            turns,
            generation: AtomicU64::new(0),
            signer: Arc::new(Signer::new(secret_key, organization)),
            metrics,
        }
    }

    /// The generation this replica's memory belongs to.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// Makes `generation` this replica's when it is higher; whether it was (a purge: the
    /// memory must go). A lower one is Redis's past (a restart, a restore), never news.
    pub fn adopt(&self, generation: u64) -> bool {
        self.generation.fetch_max(generation, Ordering::Relaxed) < generation
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
    /// for it. What Redis holds without a valid MAC is never served: it is looked up again as
    /// missing.
    pub async fn lookup(
        &self,
        key: &Key,
        min_fresh: Duration,
        waited: bool,
    ) -> Result<Lookup, Unavailable> {
        match self.look(key, min_fresh, waited, false).await? {
            Some(found) => Ok(found),
            None => {
                self.untrusted();
                // Ignored this time, so never `None`.
                self.look(key, min_fresh, waited, true)
                    .await?
                    .ok_or(Unavailable)
            }
        }
    }

    /// One lookup; `None` when it found an entry or answer without a valid MAC. With
    /// `distrust`, what is stored under `key` is ignored.
    async fn look(
        &self,
        key: &Key,
        min_fresh: Duration,
        waited: bool,
        distrust: bool,
    ) -> Result<Option<Lookup>, Unavailable> {
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
            .arg(u8::from(waited))
            .arg(u8::from(distrust));
        let ask = self.turns.as_deref().and_then(SharedTurns::ask);
        match &ask {
            Some(ask) => ask.add_to(&mut script),
            None => {
                script.arg(0).arg(0);
            }
        }
        let mut unclaimed = Unclaimed {
            cluster: self.cluster.clone(),
            lease: key.lease.clone(),
            token,
            // A lookup left no Redis time is not sent: nothing to give up.
            armed: !self.cluster.time_left().is_zero(),
        };
        let reply: Vec<Value> = self.cluster.invoke(Op::Fill, &script).await?;
        let mut reply = reply.into_iter();
        let what = reply.next().as_ref().and_then(int);
        if what != Some(2) {
            unclaimed.armed = false;
        }
        let second = reply.next();
        let malformed = || {
            tracing::warn!("the shared cache answered a lookup in an unexpected form");
            Unavailable
        };
        Ok(Some(match what {
            Some(-9) => {
                let generation = second.as_ref().and_then(int).unwrap_or(-1);
                Lookup::Purged(u64::try_from(generation).map_err(|_| malformed())?)
            }
            Some(1) => {
                let now = second.as_ref().and_then(int).ok_or_else(malformed)?;
                match self.entry(&key.entry, now, reply) {
                    Some(entry) => Lookup::Fresh(entry),
                    None => return Ok(None),
                }
            }
            Some(3) => {
                let sealed = second.and_then(bulk).ok_or_else(malformed)?;
                match self.signer.open(&key.outcome, &sealed) {
                    Some(answer) => Lookup::Failed(answer),
                    None => return Ok(None),
                }
            }
            Some(2) => {
                let now = second.as_ref().and_then(int).ok_or_else(malformed)?;
                let mut turn = || reply.next().as_ref().and_then(int).ok_or_else(malformed);
                let turn = (turn()?, turn()?);
                if let Some(ask) = ask.filter(|_| turn.0 != 1) {
                    ask.answered(turn);
                }
                let old = match reply.len() {
                    0 => None,
                    _ => self.entry(&key.entry, now, reply).or_else(|| {
                        self.untrusted();
                        None
                    }),
                };
                let lease = Lease::hold(self, key, unclaimed.claim(), now);
                Lookup::Fill(lease, old)
            }
            Some(0) => {
                let left = second.as_ref().and_then(int).unwrap_or(0);
                Lookup::Wait(Duration::from_millis(left.max(0) as u64))
            }
            _ => return Err(malformed()),
        }))
    }

    /// Counts (and notes at debug) an entry or answer in Redis without a valid MAC.
    fn untrusted(&self) {
        self.metrics.count_cache_untrusted();
        tracing::debug!("the shared cache holds an entry without a valid MAC: a miss, not served");
    }

    /// An entry as the scripts return it under `key` (`stored, fresh, stale, x, body, mac`,
    /// Redis ms), in this process's clock (`now` is Redis's); `None` unless its MAC is valid.
    fn entry(
        &self,
        key: &str,
        now: i64,
        mut fields: impl Iterator<Item = Value>,
    ) -> Option<Arc<Entry>> {
        let mut time = || fields.next().as_ref().and_then(int);
        let t = Times {
            stored: time()?,
            fresh: time()?,
            stale: time()?,
            x: time()?,
        };
        let body = fields.next().and_then(bulk)?;
        let mac = fields.next().and_then(bulk)?;
        self.signer.entry(key, &t, &body).verify_slice(&mac).ok()?;
        let here = Instant::now();
        let ago = |t: i64| Duration::from_millis((now - t).max(0) as u64);
        let ahead = |t: i64| Duration::from_millis((t - now).max(0) as u64);
        Some(Arc::new(Entry {
            body,
            stored_at: here.checked_sub(ago(t.stored)).unwrap_or(here),
            fresh_until: here + ahead(t.fresh),
            stale_until: here + ahead(t.stale),
            stale: t.x == 1,
            refreshing: AtomicBool::new(false),
        }))
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
            .arg(self.cluster.key("events"))
            .arg(self.generation());
        self.cluster.invoke(Op::Purge, &script).await
    }

    /// The generation in Redis now, set back to this replica's when Redis has a lower one.
    pub async fn current_generation(&self) -> Result<u64, Unavailable> {
        let mut script = GENERATION.prepare_invoke();
        script.key(self.cluster.key("gen")).arg(self.generation());
        let generation: Value = self.cluster.invoke(Op::Generation, &script).await?;
        int(&generation)
            .and_then(|g| u64::try_from(g).ok())
            .ok_or(Unavailable)
    }
}

/// What a fill came to, for the other replicas.
pub enum Commit<'a> {
    /// An entry as this replica serves it: a new answer, or the old one re-served as stale
    /// while the upstream fails.
    Entry(&'a Entry),
    /// A failed fill's answer, relayed to the replicas that waited, for this long.
    Failed(&'a [u8], Duration),
    /// Nothing to share (an answer too long to store, a refusal of the filler's own): whoever
    /// waits fetches on its own.
    Nothing,
}

/// The fill lease of one key: renewed in the background while held, given up when dropped
/// without a [`commit`](Lease::commit) (a cancelled request, a panic) so no replica waits for it
/// to lapse.
pub struct Lease {
    cluster: Arc<Cluster>,
    signer: Arc<Signer>,
    entry: String,
    lease: String,
    outcome: String,
    filled: String,
    token: String,
    /// Redis's time when the lease was taken, and this process's then: an entry's times are
    /// written in Redis's clock.
    taken: (i64, Instant),
    renewal: JoinHandle<()>,
    committed: bool,
}

impl Lease {
    fn hold(tier: &SharedTier, key: &Key, token: String, redis_now: i64) -> Lease {
        let cluster = tier.cluster.clone();
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
            signer: tier.signer.clone(),
            entry: key.entry.clone(),
            lease: key.lease.clone(),
            outcome: key.outcome.clone(),
            filled: key.filled.clone(),
            token,
            taken: (redis_now, Instant::now()),
            renewal,
            committed: false,
        }
    }

    /// `t` in Redis's clock, ms.
    fn redis_ms(&self, t: Instant) -> i64 {
        let (redis_now, here) = self.taken;
        let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 2);
        match t.checked_duration_since(here) {
            Some(after) => redis_now + ms(after),
            None => redis_now - ms(here - t),
        }
    }

    /// Shares what the fill came to, gives the lease up and wakes the replicas waiting.
    pub async fn commit(mut self, commit: Commit<'_>) {
        self.renewal.abort();
        let mut script = FILL_COMMIT.prepare_invoke();
        script
            .key(&self.entry)
            .key(&self.lease)
            .key(&self.outcome)
            .arg(&self.token);
        match commit {
            Commit::Entry(entry) => {
                let t = Times {
                    stored: self.redis_ms(entry.stored_at),
                    fresh: self.redis_ms(entry.fresh_until),
                    stale: self.redis_ms(entry.stale_until),
                    x: i64::from(entry.stale),
                };
                let mac = self.signer.entry(&self.entry, &t, &entry.body);
                script
                    .arg("store")
                    .arg(self.cluster.key("events"))
                    .arg(&self.filled)
                    .arg(t.stored)
                    .arg(t.fresh)
                    .arg(t.stale)
                    .arg(t.x)
                    .arg(&entry.body[..])
                    .arg(&mac.finalize().into_bytes()[..]);
            }
            Commit::Failed(answer, hold) => {
                script
                    .arg("outcome")
                    .arg(self.cluster.key("events"))
                    .arg(&self.filled)
                    .arg(hold.as_millis() as u64)
                    .arg(self.signer.seal(&self.outcome, answer));
            }
            Commit::Nothing => {
                script
                    .arg("release")
                    .arg(self.cluster.key("events"))
                    .arg(&self.filled);
            }
        }
        // Committed even when Redis does not take it: the lease then lapses by itself.
        self.committed = true;
        // The store is for every replica, and runs to its end in a task of its own (with the
        // whole timeout); the request waits for it only while its own Redis time lasts.
        let cluster = self.cluster.clone();
        let store = tokio::spawn(async move {
            let _ = cluster.invoke::<i64>(Op::Commit, &script).await;
        });
        let _ = self.cluster.within(store).await;
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renewal.abort();
        if self.committed {
            return;
        }
        release(
            self.cluster.clone(),
            std::mem::take(&mut self.lease),
            std::mem::take(&mut self.token),
        );
    }
}

/// The fill lease a lookup may take in Redis, until a [`Lease`] holds it: given up if the lookup
/// ends otherwise (cut short, failed, answered in an unexpected form, or dropped with its
/// request), so no other replica waits for it to lapse. Sent after the lookup on the same
/// connection, the release runs after it.
struct Unclaimed {
    cluster: Arc<Cluster>,
    lease: String,
    token: String,
    armed: bool,
}

impl Unclaimed {
    /// The token, for the [`Lease`] that holds the lease from now on.
    fn claim(&mut self) -> String {
        self.armed = false;
        std::mem::take(&mut self.token)
    }
}

impl Drop for Unclaimed {
    fn drop(&mut self) {
        if self.armed {
            let lease = std::mem::take(&mut self.lease);
            release(self.cluster.clone(), lease, std::mem::take(&mut self.token));
        }
    }
}

/// Gives up the fill lease `lease` if `token` still holds it, in a task of its own.
fn release(cluster: Arc<Cluster>, lease: String, token: String) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(async move {
            let mut script = LEASE_SCRIPT.prepare_invoke();
            script.key(&lease).arg(&token).arg(0);
            let _ = cluster.invoke::<i64>(Op::Renew, &script).await;
        });
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    const ORG: &str = "11111111-2222-3333-4444-555555555555";

    fn signer(secret: &str, organization: &str) -> Signer {
        Signer::new(
            &SecretString::from(secret),
            organization.parse().expect("uuid"),
        )
    }

    /// Any served field, the key it is under, another organization or another secret key: the
    /// MAC no longer holds.
    #[test]
    fn an_entry_verifies_only_as_written_by_this_organizations_gateways() {
        let ours = signer("secret", ORG);
        let times = || Times {
            stored: 1,
            fresh: 2,
            stale: 3,
            x: 0,
        };
        let mac = ours
            .entry("ns:c:1:ab", &times(), b"{}")
            .finalize()
            .into_bytes();
        assert!(
            ours.entry("ns:c:1:ab", &times(), b"{}")
                .verify_slice(&mac)
                .is_ok()
        );
        let longer = Times {
            fresh: 9,
            ..times()
        };
        let stale = Times { x: 1, ..times() };
        for (signer, key, t, body) in [
            (&ours, "ns:c:1:ab", times(), &b"<script>"[..]),
            (&ours, "ns:c:0:ab", times(), b"{}"),
            (&ours, "ns:c:1:ab", longer, b"{}"),
            (&ours, "ns:c:1:ab", stale, b"{}"),
            (
                &signer("secret", "22222222-3333-4444-5555-666666666666"),
                "ns:c:1:ab",
                times(),
                b"{}",
            ),
            (&signer("other", ORG), "ns:c:1:ab", times(), b"{}"),
        ] {
            assert!(signer.entry(key, &t, body).verify_slice(&mac).is_err());
        }
    }

    #[test]
    fn a_sealed_answer_opens_only_unchanged_and_under_its_key() {
        let ours = signer("secret", ORG);
        let sealed = Bytes::from(ours.seal("ns:o:1:ab", b"429\n\n\n\n{}"));
        assert_eq!(
            ours.open("ns:o:1:ab", &sealed).as_deref(),
            Some(&b"429\n\n\n\n{}"[..])
        );
        assert!(ours.open("ns:o:2:ab", &sealed).is_none());
        let mut changed = sealed.to_vec();
        *changed.last_mut().expect("a byte") ^= 1;
        assert!(ours.open("ns:o:1:ab", &Bytes::from(changed)).is_none());
        assert!(
            ours.open("ns:o:1:ab", &Bytes::from_static(b"302\n"))
                .is_none()
        );
    }
}
