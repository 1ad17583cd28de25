//! The link through which replicas share one budget, one set of rates and one cache (contract §11).
//!
//! [`Cluster`] is this replica's link: one multiplexed command connection, one RESP3 pub/sub
//! connection on `{ns}:events` that resubscribes by itself, a replica id, and the [`Mode`]:
//! sharing while Redis answers, degraded (each replica on its own, at its share of the limits)
//! once commands fail repeatedly, until background probes succeed again. The Redis may be a
//! single server or a Redis Cluster, found by itself from any node's URL. A request never
//! waits on Redis while degraded, and never longer than the timeout in all otherwise
//! ([`deadline`]).
//!
//! This module owns the link only. Each mechanism shared through it lives beside its local twin,
//! with its own keys and scripts: the upstream budget in [`crate::upstream`], principals' rates
//! in [`crate::limits`], the cache's shared tier in [`crate::cache`]. Every shared decision is
//! one Lua script (atomic, one round trip, Redis `TIME` as the only clock) run through
//! [`Cluster::invoke`]. Every key is under the namespace (one hash tag, so a Redis Cluster keeps
//! them in one slot and every script's keys on one node), and every key but the budget's and the
//! cache generation carries a TTL, so `volatile-lru` evicts neither: an evicted budget would
//! overspend, an evicted generation would make purged entries reachable again.

pub mod deadline;
mod events;
mod link;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::{FromRedisValue, PushInfo, Script, ScriptInvocation};
use tokio::sync::{OnceCell, broadcast};
use tokio::time::Instant;

pub use events::Event;
use events::event;
pub use link::Cause;
use link::{Conn, Link, Target};

use crate::config::{Rate, RedisConfig};
use crate::telemetry::Metrics;

/// How often the background task heartbeats while connected, and checks the subscription.
pub const TICK: Duration = Duration::from_secs(1);

/// How often a degraded replica probes Redis: often enough that sharing resumes within 5 s of
/// Redis answering again (a reconnection's wait, then [`PROBES_TO_RESUME`] probes this apart).
pub const PROBE: Duration = Duration::from_millis(250);

/// Consecutive successful probes before a degraded replica shares again: a Redis that
/// answers once between failures does not make the replica switch back and forth.
pub const PROBES_TO_RESUME: u32 = 3;

/// Failed commands in a row before a replica goes on its own. One late reply is not Redis
/// failing: it costs the request it belongs to (which decides on its own) and nothing more.
/// Commands already in flight when a failure was seen count with it, so one stall of Redis
/// that fails many concurrent commands counts once: it takes failures seen one after another,
/// with no success between, to switch. Counted, not timed, because a Redis that is gone fails
/// every command (three in a row come within three round trips under load, three heartbeats
/// when idle), while one that merely answers late now and then never fails three times in a
/// row; a time window would still switch on a burst of late replies.
pub const FAILURES_TO_DEGRADE: u32 = 3;

/// How a replica keeps its limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Through Redis, with the other replicas.
    Connected,
    /// On its own since `since`, at its share of the limits, until Redis answers again.
    Degraded {
        /// When the replica went on its own.
        since: Instant,
    },
}

/// A Redis command this replica runs, by purpose: the `op` label of the Redis metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// Reserving an upstream turn.
    Budget,
    /// Noting or clearing the upstream's 429 backoff.
    Backoff,
    /// A principal's rate.
    Principal,
    /// A cache lookup that may take the fill lock.
    Fill,
    /// Storing a fill's outcome.
    Commit,
    /// Renewing or releasing a fill lock.
    Renew,
    /// A cache purge.
    Purge,
    /// Reading the cache generation.
    Generation,
    /// The heartbeat.
    Heartbeat,
    /// A probe while degraded, and the resumption after it.
    Probe,
}

impl Op {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Budget => "budget",
            Op::Backoff => "backoff",
            Op::Principal => "principal",
            Op::Fill => "fill",
            Op::Commit => "commit",
            Op::Renew => "renew",
            Op::Purge => "purge",
            Op::Generation => "generation",
            Op::Heartbeat => "heartbeat",
            Op::Probe => "probe",
        }
    }
}

/// Redis could not be asked (degraded, an error, or no answer within what was left of the
/// request's Redis time): the caller decides on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unavailable;

/// The link of this replica to the others through Redis.
pub struct Cluster {
    ns: String,
    replica: String,
    timeout: Duration,
    fallback: u32,
    /// Scripts that must succeed before this replica shares again after being on its own.
    resume: Mutex<Vec<Arc<ScriptInvocation<'static>>>>,
    /// Every script requests run, loaded into Redis before they need it ([`Cluster::preload`]).
    scripts: Mutex<Vec<&'static Script>>,
    target: Target,
    /// Made on first use (a replica starts and serves while Redis is down), then remade by the
    /// client itself when lost.
    link: OnceCell<Link>,
    events: broadcast::Sender<Event>,
    mode: Mutex<Mode>,
    failures: Mutex<Failures>,
    /// Replicas seen alive in the last heartbeat (0 before the first).
    seen: AtomicU32,
    metrics: Arc<Metrics>,
}

/// The failures in a row (see [`FAILURES_TO_DEGRADE`]).
#[derive(Default)]
struct Failures {
    count: u32,
    /// When the last one counted was seen: commands sent before failed with it.
    last: Option<Instant>,
}

/// How one command ended.
enum Outcome<T> {
    Answered(T),
    /// Redis failed it, or did not answer within the whole timeout.
    Failed(Cause),
    /// The request's Redis time ran out first: it says nothing of Redis.
    Cut,
}

static HEARTBEAT: std::sync::LazyLock<Script> =
    std::sync::LazyLock::new(|| Script::new(include_str!("lua/heartbeat.lua")));

/// This replica's share of `rate` among `replicas` (N), for when it keeps its limits on its
/// own: ⌊count / N⌋ per the same period, at least 1 (contract §11), so N replicas together stay
/// within `rate` in every window. Shared budget and principals' rates alike.
pub fn share(rate: Rate, replicas: u32) -> Rate {
    Rate {
        count: (rate.count / replicas.max(1)).max(1),
        per: rate.per,
    }
}

impl Cluster {
    /// The link for `config` (which has a URL), without connecting: connections are made on
    /// first use and remade when lost, so a replica starts and serves while Redis is down.
    /// Fails only on a URL the client cannot use or an unusable `GATEWAY_REDIS_CA_FILE`; the
    /// message names the setting, never the URL.
    pub fn new(
        config: &RedisConfig,
        organization_id: uuid::Uuid,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Cluster>, String> {
        crate::crypto::install_crypto_provider();
        let target = Target::new(config)?;
        let (events, _) = broadcast::channel(256);
        metrics.set_redis_mode("connected");
        Ok(Arc::new(Cluster {
            ns: config.namespace(organization_id),
            replica: uuid::Uuid::new_v4().to_string(),
            timeout: config.timeout,
            fallback: config.fallback_replicas,
            resume: Mutex::new(Vec::new()),
            scripts: Mutex::new(vec![&*HEARTBEAT]),
            target,
            link: OnceCell::new(),
            events,
            mode: Mutex::new(Mode::Connected),
            failures: Mutex::new(Failures::default()),
            seen: AtomicU32::new(0),
            metrics,
        }))
    }

    /// The link, connecting first when there is none yet.
    async fn link(&self) -> redis::RedisResult<&Link> {
        self.link
            .get_or_try_init(|| {
                let sender = self.events.clone();
                self.target.connect(move |push: PushInfo| {
                    if let Some(event) = event(push) {
                        // No receiver yet is no error.
                        let _ = sender.send(event);
                    }
                    Ok::<(), std::convert::Infallible>(())
                })
            })
            .await
    }

    /// `{ns}:{suffix}`: every key and channel lives under the namespace.
    pub fn key(&self, suffix: &str) -> String {
        format!("{}:{suffix}", self.ns)
    }

    /// `GATEWAY_REDIS_TIMEOUT`: the longest a request waits on Redis, all its commands together.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// What is left of the current request's Redis time (all of the timeout outside a request).
    pub fn time_left(&self) -> Duration {
        deadline::left(self.timeout)
    }

    /// This replica's id (a random UUID per process).
    pub fn replica_id(&self) -> &str {
        &self.replica
    }

    /// How this replica keeps its limits now.
    pub fn mode(&self) -> Mode {
        *self.mode.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// N, what the limits are divided by when degraded: the replicas seen alive recently, and
    /// never fewer than `GATEWAY_REDIS_FALLBACK_REPLICAS` (an under-estimate would overspend).
    pub fn replicas(&self) -> u32 {
        self.seen.load(Ordering::Relaxed).max(self.fallback)
    }

    /// Adds `script` to what this replica runs when Redis answers again after it was on its
    /// own: it shares again only once every such script succeeded (the budget's dead time).
    pub fn on_resume(&self, script: ScriptInvocation<'static>) {
        let mut resume = self.resume.lock().unwrap_or_else(|e| e.into_inner());
        resume.push(Arc::new(script));
    }

    /// Adds `script` to those loaded into Redis when the link is made and whenever sharing
    /// resumes: a script Redis does not know costs its first request three round trips
    /// (`EVALSHA`, `SCRIPT LOAD`, `EVALSHA` again), past the timeout of a slow Redis.
    pub fn preload(&self, script: &'static Script) {
        let mut scripts = self.scripts.lock().unwrap_or_else(|e| e.into_inner());
        scripts.push(script);
    }

    /// Loads every script added by [`Cluster::preload`]; whether Redis took them all.
    async fn load_scripts(&self) -> bool {
        let scripts = self
            .scripts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let Ok(link) = self.link().await else {
            return false;
        };
        for script in scripts {
            let mut conn: Conn = link.cmd.clone();
            let loaded = tokio::time::timeout(self.timeout, script.load_async(&mut conn)).await;
            if !matches!(loaded, Ok(Ok(_))) {
                return false;
            }
        }
        true
    }

    /// Everything the pub/sub connection brings from now on.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Runs `script` for `op`: its answer, or [`Unavailable`] at once while degraded, and on an
    /// error or when no answer comes within what is left of the request's Redis time. Failures
    /// in a row make the replica degraded ([`FAILURES_TO_DEGRADE`]).
    pub async fn invoke<T: FromRedisValue>(
        &self,
        op: Op,
        script: &ScriptInvocation<'_>,
    ) -> Result<T, Unavailable> {
        if self.mode() != Mode::Connected {
            return Err(Unavailable);
        }
        let sent = Instant::now();
        match self.timed(op, script, deadline::left(self.timeout)).await {
            Outcome::Answered(value) => {
                *self.failures.lock().unwrap_or_else(|e| e.into_inner()) = Failures::default();
                Ok(value)
            }
            Outcome::Failed(cause) => {
                self.failed(sent, cause);
                Err(Unavailable)
            }
            Outcome::Cut => Err(Unavailable),
        }
    }

    /// Waits for `work` (Redis work running elsewhere, e.g. in a task of its own) no longer than
    /// the current request's Redis time allows, counting the wait against it; `None` when that
    /// time ran out first.
    pub async fn within<F: Future>(&self, work: F) -> Option<F::Output> {
        let started = Instant::now();
        let done = tokio::time::timeout(deadline::left(self.timeout), work).await;
        deadline::spend(started.elapsed());
        done.ok()
    }

    /// Counts the failure of a command sent at `sent`; the last of [`FAILURES_TO_DEGRADE`] in a
    /// row makes the replica degraded, saying why.
    fn failed(&self, sent: Instant, cause: Cause) {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if failures.last.is_some_and(|last| sent < last) {
            return;
        }
        failures.count += 1;
        failures.last = Some(Instant::now());
        if failures.count >= FAILURES_TO_DEGRADE {
            *failures = Failures::default();
            drop(failures);
            let since = Instant::now();
            self.set_mode(Mode::Degraded { since }, Some(cause));
        }
    }

    /// Runs `script` once within `limit` (never more than the timeout), and records it.
    async fn timed<T: FromRedisValue>(
        &self,
        op: Op,
        script: &ScriptInvocation<'_>,
        limit: Duration,
    ) -> Outcome<T> {
        let started = Instant::now();
        if limit.is_zero() {
            // The request's Redis time is spent: not even sent.
            self.metrics.observe_redis(op.as_str(), "skipped", 0.0);
            return Outcome::Cut;
        }
        let asked = async {
            let mut conn: Conn = self.link().await?.cmd.clone();
            script.invoke_async::<T>(&mut conn).await
        };
        let outcome = match tokio::time::timeout(limit, asked).await {
            Ok(Ok(value)) => Outcome::Answered(value),
            Ok(Err(e)) => {
                // Connection and server errors name no credential (the URL is not in them).
                tracing::debug!(op = op.as_str(), error = %e, "a Redis command failed");
                Outcome::Failed(Cause::of(&e))
            }
            // Cut short by the request's own Redis time, or while the link was still being
            // made (the heartbeat makes it, however long that takes): nothing known of Redis.
            Err(_) if limit < self.timeout || self.link.get().is_none() => Outcome::Cut,
            Err(_) => {
                tracing::debug!(
                    op = op.as_str(),
                    error = "no answer in time",
                    "a Redis command failed"
                );
                Outcome::Failed(Cause::TimedOut)
            }
        };
        let waited = started.elapsed();
        deadline::spend(waited);
        let result = match &outcome {
            Outcome::Answered(_) => "ok",
            Outcome::Failed(Cause::TimedOut) => "timeout",
            Outcome::Failed(_) => "error",
            Outcome::Cut => "deadline",
        };
        self.metrics
            .observe_redis(op.as_str(), result, waited.as_secs_f64());
        outcome
    }

    /// Switches to `to` (once: switching to the mode it is in changes nothing), logging the
    /// one warning that says so, and why when Redis failed.
    fn set_mode(&self, to: Mode, cause: Option<Cause>) {
        let mut mode = self.mode.lock().unwrap_or_else(|e| e.into_inner());
        if std::mem::discriminant(&*mode) == std::mem::discriminant(&to) {
            return;
        }
        *mode = to;
        drop(mode);
        let label = match to {
            Mode::Connected => {
                tracing::warn!("Redis answers again: sharing budget, rates and cache resumes");
                "connected"
            }
            Mode::Degraded { .. } => {
                let cause = cause.unwrap_or(Cause::Other).as_str();
                tracing::warn!(
                    replicas = self.replicas(),
                    "Redis failed ({cause}): this replica keeps its own limits, at its share, \
                     until Redis answers again"
                );
                "degraded"
            }
        };
        self.metrics.set_redis_mode(label);
        self.metrics.count_redis_mode_change(label);
    }

    /// The replica's background work, for as long as the app runs: heartbeats while connected,
    /// probes while degraded, and keeping the subscription to `{ns}:events` in place.
    pub async fn run(self: Arc<Self>) -> std::convert::Infallible {
        let (never, _) = tokio::join!(self.beat(), self.keep_subscription());
        never
    }

    /// Heartbeats (every [`TICK`]) while connected; while degraded, probes (every [`PROBE`])
    /// until [`PROBES_TO_RESUME`] in a row succeed and the resumption scripts too.
    async fn beat(&self) -> std::convert::Infallible {
        let replicas = self.key("replicas");
        let mut probes = 0;
        let mut loaded = false;
        loop {
            // Connecting may take longer than a command may wait (a TLS handshake far away):
            // done here, outside any command's timeout. A failure counts as one: commands cut
            // short while no link exists never do, so a Redis address that accepts and stays
            // silent would otherwise leave the replica "sharing" forever.
            if let Err(e) = self.link().await {
                probes = 0;
                let pause = match self.mode() {
                    Mode::Connected => {
                        self.failed(Instant::now(), Cause::of(&e));
                        TICK
                    }
                    Mode::Degraded { .. } => PROBE,
                };
                tokio::time::sleep(pause).await;
                continue;
            }
            // The heartbeat itself is the probe: a success also counts this replica.
            let mut beat = HEARTBEAT.prepare_invoke();
            beat.key(&replicas).arg(&self.replica);
            let pause = match self.mode() {
                Mode::Connected => {
                    // Scripts may be gone (a Redis restarted, failed over): loaded again
                    // whenever sharing resumes, best effort.
                    if !loaded {
                        loaded = self.load_scripts().await;
                    }
                    if let Ok(seen) = self.invoke::<u32>(Op::Heartbeat, &beat).await {
                        self.seen.store(seen, Ordering::Relaxed);
                        self.metrics.set_cluster_replicas(self.replicas());
                    }
                    TICK
                }
                Mode::Degraded { .. } => {
                    loaded = false;
                    probes = match self.timed::<u32>(Op::Probe, &beat, self.timeout).await {
                        Outcome::Answered(_) => probes + 1,
                        _ => 0,
                    };
                    if probes >= PROBES_TO_RESUME {
                        probes = 0;
                        if self.resumed().await {
                            self.set_mode(Mode::Connected, None);
                        }
                    }
                    PROBE
                }
            };
            tokio::time::sleep(pause).await;
        }
    }

    /// Runs every script added by [`Cluster::on_resume`]; whether all succeeded.
    async fn resumed(&self) -> bool {
        let scripts = self
            .resume
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for script in scripts {
            let ran = self.timed::<redis::Value>(Op::Probe, &script, self.timeout);
            if !matches!(ran.await, Outcome::Answered(_)) {
                return false;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::SecretString;

    fn link() -> Arc<Cluster> {
        let config = RedisConfig {
            url: Some(SecretString::from("redis://127.0.0.1:1".to_owned())),
            prefix: None,
            timeout: Duration::from_millis(100),
            fallback_replicas: 3,
            ca_file: None,
        };
        Cluster::new(&config, uuid::Uuid::nil(), Arc::new(Metrics::default())).expect("a link")
    }

    #[tokio::test(start_paused = true)]
    async fn commands_failing_together_count_once_and_three_failures_in_a_row_switch() {
        let cluster = link();
        // One stall fails many commands in flight together: one failure.
        let sent = Instant::now();
        tokio::time::advance(Duration::from_millis(100)).await;
        for _ in 0..10 {
            cluster.failed(sent, Cause::TimedOut);
        }
        assert_eq!(cluster.mode(), Mode::Connected);
        // Failures one after another, each of a command sent after the last was seen.
        for _ in 0..2 {
            tokio::time::advance(Duration::from_millis(1)).await;
            let sent = Instant::now();
            tokio::time::advance(Duration::from_millis(100)).await;
            assert_eq!(cluster.mode(), Mode::Connected);
            cluster.failed(sent, Cause::Refused);
        }
        assert!(matches!(cluster.mode(), Mode::Degraded { .. }));
    }
}
