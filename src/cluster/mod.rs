//! The link through which replicas share one budget, one set of rates and one cache (contract §11).
//!
//! [`Cluster`] is this replica's link: one multiplexed command connection (every command
//! bounded by `GATEWAY_REDIS_TIMEOUT`), one RESP3 pub/sub connection on `{ns}:events` that
//! resubscribes by itself, a replica id, and the [`Mode`]: sharing while Redis answers,
//! degraded (each replica on its own, at its share of the limits) from the first command that
//! fails or times out until background probes succeed again. A request never waits on Redis
//! while degraded, and never longer than the timeout otherwise.
//!
//! This module owns the link only. Each mechanism shared through it lives beside its local twin,
//! with its own keys and scripts: the upstream budget in [`crate::upstream`], principals' rates
//! in [`crate::limits`], the cache's shared tier in [`crate::cache`]. Every shared decision is
//! one Lua script (atomic, one round trip, Redis `TIME` as the only clock) run through
//! [`Cluster::invoke`]. Every key is under the namespace (one hash tag, so Redis Cluster keeps
//! them in one slot), and every key but the budget's and the cache generation carries a TTL, so
//! `volatile-lru` evicts neither: an evicted budget would overspend, an evicted generation
//! would make purged entries reachable again.

mod events;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{FromRedisValue, PushInfo, Script, ScriptInvocation};
use secrecy::ExposeSecret;
use tokio::sync::broadcast;
use tokio::time::Instant;

pub use events::Event;
use events::event;

use crate::config::{Rate, RedisConfig};
use crate::telemetry::Metrics;

/// How often the background task heartbeats (connected) or probes (degraded).
pub const TICK: Duration = Duration::from_secs(1);

/// Consecutive successful probes before a degraded replica shares again.
pub const PROBES_TO_RESUME: u32 = 3;

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

/// Redis could not be asked (degraded, an error, or no answer within the timeout): the caller
/// decides on its own.
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
    cmd: ConnectionManager,
    sub: ConnectionManager,
    events: broadcast::Sender<Event>,
    mode: Mutex<Mode>,
    /// Replicas seen alive in the last heartbeat (0 before the first).
    seen: AtomicU32,
    metrics: Arc<Metrics>,
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
    /// Fails only on a URL the client cannot use; the message never repeats it.
    pub fn new(
        config: &RedisConfig,
        organization_id: uuid::Uuid,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Cluster>, String> {
        let url = config.url.as_ref().ok_or("GATEWAY_REDIS_URL is not set")?;
        crate::crypto::install_crypto_provider();
        // Checked by the configuration already; the client's own message may quote the URL.
        let unusable = |_| "GATEWAY_REDIS_URL: the Redis client cannot use this URL".to_owned();
        let url = crate::config::parse_redis_url(url.expose_secret())?;
        let info = redis::IntoConnectionInfo::into_connection_info(url).map_err(unusable)?;
        // RESP3: pub/sub messages arrive as pushes on a connection that also takes commands.
        let settings = info
            .redis_settings()
            .clone()
            .set_protocol(redis::ProtocolVersion::RESP3);
        let client = redis::Client::open(info.set_redis_settings(settings)).map_err(unusable)?;
        let reconnect = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_max_delay(Duration::from_secs(1));
        let cmd = ConnectionManager::new_lazy_with_config(
            client.clone(),
            // redis-rs waits 500 ms by default: too long for a request to wait.
            reconnect.clone().set_response_timeout(Some(config.timeout)),
        )
        .map_err(unusable)?;
        let (events, _) = broadcast::channel(256);
        let sender = events.clone();
        let sub = ConnectionManager::new_lazy_with_config(
            client,
            reconnect
                .set_response_timeout(Some(Duration::from_secs(1)))
                .set_push_sender(move |push: PushInfo| {
                    if let Some(event) = event(push) {
                        // No receiver yet is no error.
                        let _ = sender.send(event);
                    }
                    Ok::<(), std::convert::Infallible>(())
                })
                .set_automatic_resubscription(),
        )
        .map_err(unusable)?;
        metrics.set_redis_mode("connected");
        Ok(Arc::new(Cluster {
            ns: config.namespace(organization_id),
            replica: uuid::Uuid::new_v4().to_string(),
            timeout: config.timeout,
            fallback: config.fallback_replicas,
            resume: Mutex::new(Vec::new()),
            cmd,
            sub,
            events,
            mode: Mutex::new(Mode::Connected),
            seen: AtomicU32::new(0),
            metrics,
        }))
    }

    /// `{ns}:{suffix}`: every key and channel lives under the namespace.
    pub fn key(&self, suffix: &str) -> String {
        format!("{}:{suffix}", self.ns)
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

    /// Everything the pub/sub connection brings from now on.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Runs `script` for `op`: its answer, or [`Unavailable`] at once while degraded, and on an
    /// error or past the timeout (which makes the replica degraded).
    pub async fn invoke<T: FromRedisValue>(
        &self,
        op: Op,
        script: &ScriptInvocation<'_>,
    ) -> Result<T, Unavailable> {
        if self.mode() != Mode::Connected {
            return Err(Unavailable);
        }
        self.timed(op, script).await.inspect_err(|_| self.degrade())
    }

    /// Runs `script` once within the timeout, and records it.
    async fn timed<T: FromRedisValue>(
        &self,
        op: Op,
        script: &ScriptInvocation<'_>,
    ) -> Result<T, Unavailable> {
        let started = Instant::now();
        let mut conn = self.cmd.clone();
        let outcome = tokio::time::timeout(self.timeout, script.invoke_async(&mut conn)).await;
        let result = match &outcome {
            Ok(Ok(_)) => "ok",
            Ok(Err(e)) if e.is_timeout() => "timeout",
            Ok(Err(_)) => "error",
            Err(_) => "timeout",
        };
        self.metrics
            .observe_redis(op.as_str(), result, started.elapsed().as_secs_f64());
        match outcome {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => {
                // Connection and server errors name no credential (the URL is not in them).
                tracing::debug!(op = op.as_str(), error = %e, "a Redis command failed");
                Err(Unavailable)
            }
            Err(_) => {
                tracing::debug!(
                    op = op.as_str(),
                    error = "no answer in time",
                    "a Redis command failed"
                );
                Err(Unavailable)
            }
        }
    }

    fn set_mode(&self, to: Mode) {
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
                tracing::warn!(
                    replicas = self.replicas(),
                    "Redis failed or is too slow: this replica keeps its own limits, at its share, \
                     until Redis answers again"
                );
                "degraded"
            }
        };
        self.metrics.set_redis_mode(label);
        self.metrics.count_redis_mode_change(label);
    }

    /// Goes on its own (once; later failures change nothing).
    fn degrade(&self) {
        self.set_mode(Mode::Degraded {
            since: Instant::now(),
        });
    }

    /// The replica's background work, for as long as the app runs: heartbeats while connected,
    /// probes while degraded, and keeping the subscription to `{ns}:events` in place.
    pub async fn run(self: Arc<Self>) -> std::convert::Infallible {
        let channel = self.key("events");
        let replicas = self.key("replicas");
        let mut subscribed = false;
        let mut probes = 0;
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            subscribed = self.keep_subscribed(&channel, subscribed).await;
            match self.mode() {
                Mode::Connected => {
                    let mut beat = HEARTBEAT.prepare_invoke();
                    beat.key(&replicas).arg(&self.replica);
                    if let Ok(seen) = self.invoke::<u32>(Op::Heartbeat, &beat).await {
                        self.seen.store(seen, Ordering::Relaxed);
                        self.metrics.set_cluster_replicas(self.replicas());
                    }
                }
                Mode::Degraded { .. } => {
                    // The heartbeat itself is the probe: a success also counts this replica.
                    let mut beat = HEARTBEAT.prepare_invoke();
                    beat.key(&replicas).arg(&self.replica);
                    probes = match self.timed::<u32>(Op::Probe, &beat).await {
                        Ok(_) => probes + 1,
                        Err(_) => 0,
                    };
                    if probes >= PROBES_TO_RESUME {
                        probes = 0;
                        if self.resumed().await {
                            self.set_mode(Mode::Connected);
                        }
                    }
                }
            }
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
            if self
                .timed::<redis::Value>(Op::Probe, &script)
                .await
                .is_err()
            {
                return false;
            }
        }
        true
    }
}
