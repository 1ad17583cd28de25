//! Client connections (contract §13): the table of those open, which of them are idle, and the
//! one way any of them is closed.
//!
//! A connection is *busy* while a request on it is in progress — from the moment hyper hands
//! the request to the service until its answer's body is dropped, so a relayed download counts
//! to its last byte — and *idle* otherwise: HTTP/1.1 between requests, HTTP/2 with no open
//! stream, a TCP connection that has said nothing or only the HTTP/2 preface.
//!
//! Idle connections are closed after the idle timeout, which shrinks as the table approaches its
//! bound ([`idle_timeout_at`], after Envoy's overload manager `reduce_timeouts`); at the bound the
//! longest-idle ones are closed at once to make room (as nginx reuses keep-alive connections
//! under `worker_connections`) when a new one is waiting; while connections that never carried a
//! request are open, only they are, so a flood of connections opened only to be held cannot push
//! out a caller between two requests. A connection is never closed for room before it has been
//! idle for [`EVICT_AFTER`]: however fast a flood of new connections, each gets that long to
//! send its request, and while none can be closed the accept loop leaves new connections waiting
//! in the listen backlog rather than refusing them.
//! The bound sits below the open-files limit, which the gateway raises to the hard limit at start
//! ([`open_files_limit`]), so accepting never takes the descriptors upstream, Redis and JWKS
//! calls need. Shutdown closes every connection the same way, gracefully.

use std::collections::HashMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tower::ServiceExt;

use crate::telemetry::ConnectionCounts;

/// The idle timeout at the bound, however long the configured one (unless it is shorter).
const MIN_IDLE_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a connection told to close gracefully (HTTP/2: GOAWAY sent) may stay open while
/// nothing is in progress on it: a client that never closes its side is closed after this.
pub(super) const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// How often idle connections are looked for (a tenth of the shortest idle timeout), and room
/// made again while the table is full.
pub(super) const SWEEP_EVERY: Duration = Duration::from_millis(100);

/// The shortest idle time after which a connection may be closed to make room: a client whose
/// connection waited in the backlog has sent its request by then (it arrives with the
/// connection), so a flood of new connections cannot push out a caller's before it is served.
const EVICT_AFTER: Duration = Duration::from_millis(100);

/// Most connections closed in one go at the bound (nginx drains its keep-alive queue 32 at a
/// time): one look over the table pays for this many admissions.
const EVICT_BATCH: usize = 32;

/// The idle timeout with `open` of `max` connections open: `base` up to half the bound, then
/// shrinking in step with the room left, down to [`MIN_IDLE_TIMEOUT`] at the bound (or `base`
/// when that is shorter).
pub(super) fn idle_timeout_at(base: Duration, open: usize, max: usize) -> Duration {
    let floor = base.min(MIN_IDLE_TIMEOUT);
    let half = max / 2;
    if open <= half {
        return base;
    }
    if open >= max {
        return floor;
    }
    // `open` is strictly between `half` and `max`: the span above the floor, scaled by the room
    // left as a share of the upper half of the bound.
    let span = (base - floor).as_nanos() * (max - open) as u128 / (max - half) as u128;
    floor + Duration::from_nanos(u64::try_from(span).unwrap_or(u64::MAX))
}

/// The connection bound when `GATEWAY_MAX_CONNECTIONS` is not set, for an open-files limit of
/// `open_files`: a quarter of the limit (at least 64 descriptors) is kept for everything else —
/// upstream, Redis and JWKS connections, policy and TLS files, the runtime's own — and the bound
/// is at most [`DEFAULT_MAX_CONNECTIONS`], whatever the limit.
pub(super) fn default_max_connections(open_files: u64) -> usize {
    let reserve = (open_files / 4).max(64);
    usize::try_from(open_files.saturating_sub(reserve))
        .unwrap_or(usize::MAX)
        .clamp(1, DEFAULT_MAX_CONNECTIONS)
}

/// The largest default bound. Hard limits run to 524,288 descriptors (systemd, containerd) and
/// beyond, while an idle HTTP connection costs about 18 KiB (an HTTP/2 preface alone 16, a silent
/// one 4): 4,096 of them take about 72 MiB, within the shipped manifest's 256 MiB beside the
/// cache's 64.
const DEFAULT_MAX_CONNECTIONS: usize = 4096;

/// The connection bound: `configured`, or derived from the open-files limit, which is raised to
/// the hard limit first; logs the limit and the bound, and warns of a bound the limit cannot hold.
pub(super) fn bound(configured: Option<usize>) -> usize {
    let open_files = open_files_limit();
    let max = configured.unwrap_or_else(|| default_max_connections(open_files));
    let reserve = u64::try_from(max).map_or(0, |max| open_files.saturating_sub(max));
    if configured.is_some() && reserve < 64 {
        tracing::warn!(
            max_connections = max,
            open_files,
            "GATEWAY_MAX_CONNECTIONS leaves fewer than 64 descriptors for upstream, Redis, JWKS \
             and files: accepting will fail before the bound is reached"
        );
    }
    tracing::info!(max_connections = max, open_files, "connection bound");
    max
}

/// Raises the soft open-files limit to the hard one, logs both, and returns the soft limit in
/// force (the descriptors the process may hold).
fn open_files_limit() -> u64 {
    let (soft, hard) = match rlimit::Resource::NOFILE.get() {
        Ok(limits) => limits,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the open-files limit");
            return rlimit::INFINITY;
        }
    };
    let raised = match rlimit::increase_nofile_limit(hard) {
        Ok(raised) => raised,
        Err(e) => {
            tracing::warn!(soft, hard, error = %e, "cannot raise the open-files limit");
            soft
        }
    };
    tracing::info!(was = soft, soft = raised, hard, "open-files limit");
    raised
}

/// Why a connection was closed: the `reason` of `billing_gateway_connections_closed_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum Closed {
    /// The client closed it, or broke the protocol (TLS included).
    Client = 1,
    /// A slow client: no first byte, head or TLS handshake in time, or an answer it stopped
    /// taking.
    Timeout,
    /// Idle for the idle timeout (as it stood then).
    Idle,
    /// Idle, and closed to make room: at the bound, or when accepting failed.
    Evicted,
    /// The gateway is shutting down.
    Shutdown,
}

impl Closed {
    const ALL: [Closed; 5] = [
        Closed::Client,
        Closed::Timeout,
        Closed::Idle,
        Closed::Evicted,
        Closed::Shutdown,
    ];

    fn label(self) -> &'static str {
        match self {
            Closed::Client => "client",
            Closed::Timeout => "timeout",
            Closed::Idle => "idle",
            Closed::Evicted => "evicted",
            Closed::Shutdown => "shutdown",
        }
    }

    fn from_u8(n: u8) -> Option<Closed> {
        Closed::ALL.into_iter().find(|c| *c as u8 == n)
    }
}

/// How far a connection has been told to close.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Close {
    /// Keep serving.
    No,
    /// Finish what is in progress, take nothing new (HTTP/2: GOAWAY), then close.
    Gracefully,
    /// Drop it now: nothing is in progress on it.
    Now,
}

/// One connection, as the table and its task both see it.
#[derive(Debug)]
struct Entry {
    /// Requests in progress.
    busy: AtomicUsize,
    /// Whether it has carried a request: at the bound, those that never did go first.
    used: AtomicBool,
    /// When it last became idle, in milliseconds since the table's epoch.
    idle_since: AtomicU64,
    /// A [`Close`], as told.
    close: AtomicU8,
    /// The first [`Closed`] reason given (0: none yet).
    reason: AtomicU8,
    /// Wakes the connection's task when it is told to close.
    told: Notify,
}

impl Entry {
    fn close(&self) -> Close {
        match self.close.load(Ordering::Acquire) {
            0 => Close::No,
            1 => Close::Gracefully,
            _ => Close::Now,
        }
    }

    /// Records `reason` unless one already was.
    fn because(&self, reason: Closed) {
        let _ = self
            .reason
            .compare_exchange(0, reason as u8, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Tells the connection to close (never less than it was told before).
    fn tell(&self, close: Close, reason: Closed) {
        self.because(reason);
        self.close.fetch_max(close as u8, Ordering::AcqRel);
        self.told.notify_one();
    }
}

#[derive(Debug, Default)]
struct Table {
    next_id: u64,
    open: HashMap<u64, Arc<Entry>>,
    /// Entries told to close [`Close::Now`] whose task has not dropped them yet: they still hold
    /// their descriptor, but need not be evicted again.
    doomed: usize,
}

/// The gateway's client connections: admits, watches and closes them.
#[derive(Debug)]
pub(super) struct Connections {
    table: Mutex<Table>,
    max: usize,
    /// Connections open when the descriptors last ran out: the bound they really hold, which
    /// idle timeouts shrink toward as they do toward `max`, until fewer than half are open.
    held_when_full: AtomicUsize,
    idle_timeout: Duration,
    epoch: Instant,
    counts: ConnectionCounts,
    /// How many are open, for shutdown to wait on.
    open: watch::Sender<usize>,
}

impl Connections {
    /// A table of at most `max` connections (at least 1), idle ones closed after `idle_timeout`.
    pub(super) fn new(max: usize, idle_timeout: Duration, counts: ConnectionCounts) -> Connections {
        for reason in Closed::ALL {
            counts.expect(reason.label());
        }
        Connections {
            table: Mutex::new(Table::default()),
            max: max.max(1),
            held_when_full: AtomicUsize::new(usize::MAX),
            idle_timeout,
            epoch: Instant::now(),
            counts,
            open: watch::Sender::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        // The table is consistent between statements: a panic elsewhere leaves it usable.
        self.table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether one more connection may be admitted. At the bound, up to [`EVICT_BATCH`] of the
    /// longest-idle ones are told to close first, unless enough already are; the room is there
    /// once their tasks have dropped them, so the table never holds more than the bound. Only
    /// [`Connections::admit`] adds connections: a `true` holds until the caller admits one.
    pub(super) fn make_room(&self) -> bool {
        let mut table = self.lock();
        if table.open.len() - table.doomed >= self.max {
            self.evict(&mut table);
        }
        table.open.len() < self.max
    }

    /// The number of connections open, to wait on while there is no room: a connection closing
    /// makes some.
    pub(super) fn changes(&self) -> watch::Receiver<usize> {
        self.open.subscribe()
    }

    /// Takes in a connection just accepted (after [`Connections::make_room`]).
    pub(super) fn admit(self: &Arc<Self>) -> Tracked {
        self.counts.opened();
        let mut table = self.lock();
        let entry = Arc::new(Entry {
            busy: AtomicUsize::new(0),
            used: AtomicBool::new(false),
            idle_since: AtomicU64::new(self.now()),
            close: AtomicU8::new(Close::No as u8),
            reason: AtomicU8::new(0),
            told: Notify::new(),
        });
        let id = table.next_id;
        table.next_id += 1;
        table.open.insert(id, entry.clone());
        self.open.send_replace(table.open.len());
        Tracked {
            id,
            entry,
            connections: self.clone(),
        }
    }

    /// Closes at once up to [`EVICT_BATCH`] of the longest-idle connections (when accepting
    /// fails, to give back descriptors); how many.
    pub(super) fn shed(&self) -> usize {
        self.evict(&mut self.lock())
    }

    /// Accepting failed for want of descriptors: the connections open now are all they hold.
    pub(super) fn descriptors_ran_out(&self) {
        let open = self.lock().open.len();
        self.held_when_full.store(open.max(1), Ordering::Relaxed);
    }

    fn evict(&self, table: &mut Table) -> usize {
        // In the process's first 100 ms nothing has been idle that long.
        let evict_after = u64::try_from(EVICT_AFTER.as_millis()).unwrap_or(u64::MAX);
        let Some(before) = self.now().checked_sub(evict_after) else {
            return 0;
        };
        let idle: Vec<&Arc<Entry>> = table
            .open
            .values()
            .filter(|s| s.busy.load(Ordering::Acquire) == 0 && s.close() != Close::Now)
            .collect();
        // While any connection that never carried a request (silent, an HTTP/2 preface) is
        // open, only those are closed for room, however young: a caller between two requests
        // outlasts a flood of connections opened only to be held.
        let unused = idle.iter().any(|s| !s.used.load(Ordering::Acquire));
        let mut idle: Vec<(u64, &Arc<Entry>)> = idle
            .into_iter()
            .filter(|s| !(unused && s.used.load(Ordering::Acquire)))
            .map(|s| (s.idle_since.load(Ordering::Acquire), s))
            .filter(|(since, _)| *since <= before)
            .collect();
        let batch = EVICT_BATCH.min(idle.len());
        if batch < idle.len() {
            idle.select_nth_unstable_by_key(batch, |(since, _)| *since);
        }
        for (_, entry) in &idle[..batch] {
            entry.tell(Close::Now, Closed::Evicted);
        }
        table.doomed += batch;
        batch
    }

    /// Tells every connection idle for longer than the idle timeout (as shrunk by how full the
    /// table is) to close; run every [`SWEEP_EVERY`].
    pub(super) fn sweep(&self) {
        let table = self.lock();
        let open = table.open.len() - table.doomed;
        let mut max = self.max.min(self.held_when_full.load(Ordering::Relaxed));
        if open < max / 2 {
            // The flood is over: the configured bound again.
            self.held_when_full.store(usize::MAX, Ordering::Relaxed);
            max = self.max;
        }
        let timeout = idle_timeout_at(self.idle_timeout, open, max);
        let timeout = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        let now = self.now();
        for entry in table.open.values() {
            if entry.busy.load(Ordering::Acquire) == 0
                && entry.close() == Close::No
                && now.saturating_sub(entry.idle_since.load(Ordering::Acquire)) >= timeout
            {
                entry.tell(Close::Gracefully, Closed::Idle);
            }
        }
    }

    /// Connections open.
    pub(super) fn count(&self) -> usize {
        *self.open.borrow()
    }

    /// Tells every connection to close gracefully (requests in progress finish, downloads
    /// included) and returns once all are closed.
    pub(super) async fn shutdown(&self) {
        for entry in self.lock().open.values() {
            entry.tell(Close::Gracefully, Closed::Shutdown);
        }
        let _ = self.open.subscribe().wait_for(|open| *open == 0).await;
    }
}

/// One admitted connection: its task holds it, and dropping it takes the connection off the
/// table and counts why it closed.
#[derive(Debug)]
pub(super) struct Tracked {
    id: u64,
    entry: Arc<Entry>,
    connections: Arc<Connections>,
}

impl Tracked {
    /// Resolves once the connection has been told to close at least `at_least`, with how far.
    pub(super) async fn told(&self, at_least: Close) -> Close {
        loop {
            let close = self.entry.close();
            if close >= at_least {
                return close;
            }
            // A tell between the check and here left a permit: this returns at once.
            self.entry.told.notified().await;
        }
    }

    /// Whether a request is in progress.
    pub(super) fn is_busy(&self) -> bool {
        self.entry.busy.load(Ordering::Acquire) > 0
    }

    /// Records why the connection ended, unless it was told to close (that reason stands).
    pub(super) fn ended(&self, reason: Closed) {
        self.entry.because(reason);
    }

    /// `router`, counting each request in progress on this connection until its answer's body
    /// is dropped.
    pub(super) fn serve(
        &self,
        router: Router,
    ) -> impl hyper::service::Service<
        hyper::Request<Incoming>,
        Response = hyper::Response<Held>,
        Error = Infallible,
        Future: Send + 'static,
    > + use<> {
        let entry = self.entry.clone();
        let epoch = self.connections.epoch;
        hyper::service::service_fn(move |request| {
            let busy = Busy::start(entry.clone(), epoch);
            let answer = router.clone().oneshot(request);
            async move {
                let answer = answer.await?;
                Ok(answer.map(|body| Held { body, _busy: busy }))
            }
        })
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        let mut table = self.connections.lock();
        table.open.remove(&self.id);
        if self.entry.close() == Close::Now {
            table.doomed -= 1;
        }
        self.connections.open.send_replace(table.open.len());
        drop(table);
        let reason =
            Closed::from_u8(self.entry.reason.load(Ordering::Acquire)).unwrap_or(Closed::Client);
        self.connections.counts.closed(reason.label());
    }
}

/// A request in progress on a connection.
#[derive(Debug)]
struct Busy {
    entry: Arc<Entry>,
    epoch: Instant,
}

impl Busy {
    fn start(entry: Arc<Entry>, epoch: Instant) -> Busy {
        entry.busy.fetch_add(1, Ordering::AcqRel);
        entry.used.store(true, Ordering::Release);
        Busy { entry, epoch }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        // Idle from now, written before the count can say idle, so a sweep never finds it idle
        // since long ago; harmless while other requests are still in progress (read only when
        // none is).
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.entry.idle_since.store(now, Ordering::Release);
        self.entry.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An answer's body that keeps its connection busy until dropped (sent whole, or abandoned).
#[derive(Debug)]
pub(super) struct Held {
    body: Body,
    _busy: Busy,
}

impl http_body::Body for Held {
    type Data = <Body as http_body::Body>::Data;
    type Error = <Body as http_body::Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    #[test]
    fn the_idle_timeout_holds_up_to_half_the_bound_then_shrinks_to_the_floor_at_it() {
        assert_eq!(idle_timeout_at(MINUTE, 0, 1000), MINUTE);
        assert_eq!(idle_timeout_at(MINUTE, 500, 1000), MINUTE);
        // Three quarters full: half the room above half the bound is left, so half-way
        // between the floor (1 s) and the configured minute.
        assert_eq!(
            idle_timeout_at(MINUTE, 750, 1000),
            Duration::from_millis(30_500)
        );
        assert_eq!(
            idle_timeout_at(MINUTE, 900, 1000),
            Duration::from_millis(12_800)
        );
        assert_eq!(
            idle_timeout_at(MINUTE, 999, 1000),
            Duration::from_millis(1_118)
        );
        assert_eq!(idle_timeout_at(MINUTE, 1000, 1000), MIN_IDLE_TIMEOUT);
        assert_eq!(idle_timeout_at(MINUTE, 1500, 1000), MIN_IDLE_TIMEOUT);
    }

    /// The gateway held 4 connections when its descriptors ran out: its idle
    /// timeouts shrink toward 4, not toward the configured 1,000, so idle connections are
    /// closed after 1 s there and descriptors come back; where accepting never failed, the
    /// same connections are left to the whole timeout.
    #[test]
    fn once_accepting_failed_idle_timeouts_shrink_toward_the_connections_held_then() {
        let failed = Arc::new(Connections::new(1000, MINUTE, ConnectionCounts::default()));
        let never = Arc::new(Connections::new(1000, MINUTE, ConnectionCounts::default()));
        let held: Vec<Tracked> = [&failed, &never]
            .iter()
            .flat_map(|c| (0..4).map(|_| c.admit()).collect::<Vec<_>>())
            .collect();
        failed.descriptors_ran_out();
        std::thread::sleep(MIN_IDLE_TIMEOUT + Duration::from_millis(100));
        failed.sweep();
        never.sweep();
        let told: Vec<Close> = held.iter().map(|t| t.entry.close()).collect();
        assert_eq!(told[..4], [Close::Gracefully; 4]);
        assert_eq!(told[4..], [Close::No; 4]);
        // Fewer than half open again: the configured bound is back.
        drop(held);
        let one = failed.admit();
        failed.sweep();
        assert_eq!(failed.held_when_full.load(Ordering::Relaxed), usize::MAX);
        assert_eq!(one.entry.close(), Close::No);
    }

    #[test]
    fn the_idle_timeout_only_shrinks() {
        let mut last = MINUTE;
        for open in 0..=300 {
            let timeout = idle_timeout_at(MINUTE, open, 256);
            assert!(timeout <= last, "{open}: {timeout:?} after {last:?}");
            assert!(timeout >= MIN_IDLE_TIMEOUT, "{open}: {timeout:?}");
            last = timeout;
        }
        assert_eq!(last, MIN_IDLE_TIMEOUT);
    }

    #[test]
    fn a_timeout_shorter_than_the_floor_is_kept_and_tiny_bounds_work() {
        let short = Duration::from_millis(300);
        for open in [0, 1, 2, 5] {
            assert_eq!(idle_timeout_at(short, open, 2), short, "{open}");
        }
        assert_eq!(idle_timeout_at(MINUTE, 0, 1), MINUTE);
        assert_eq!(idle_timeout_at(MINUTE, 1, 1), MIN_IDLE_TIMEOUT);
    }

    #[test]
    fn the_default_bound_keeps_a_quarter_of_the_descriptors_and_at_most_4096_connections() {
        assert_eq!(default_max_connections(256), 192);
        assert_eq!(default_max_connections(1024), 768);
        assert_eq!(default_max_connections(100), 36);
        assert_eq!(default_max_connections(64), 1);
        assert_eq!(default_max_connections(5460), 4095);
        assert_eq!(default_max_connections(5461), 4096);
        assert_eq!(default_max_connections(524_288), 4096);
        assert_eq!(default_max_connections(rlimit::INFINITY), 4096);
    }
}
