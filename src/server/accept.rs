//! The accept loop: hyper's own connection builder rather than `axum::serve`, for the bounds
//! [`ServerLimits`](super::ServerLimits) puts on hostile or broken clients (header size and
//! count, header read time, streams per HTTP/2 connection, a silent client, a stalled TLS
//! handshake, a client that stops reading), for the connection bound and idle timeout
//! ([`super::connections`]), and graceful shutdown. Accepting out of descriptors backs off
//! rather than spins.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};

use super::ServerLimits;
use super::connections::{CLOSE_GRACE, Close, Closed, Connections, SWEEP_EVERY, Tracked};
use crate::server::tls::Tls;

/// The accept loop: one task per connection, each admitted to `connections` (which closes idle
/// ones as it sweeps them here). Returns (and drops the listener, so nothing more is accepted)
/// as soon as `shutdown` completes.
pub(super) async fn serve(
    listener: TcpListener,
    router: Router,
    limits: &ServerLimits,
    tls: Option<Arc<Tls>>,
    connections: &Arc<Connections>,
    shutdown: impl Future<Output = ()>,
) {
    let mut http = auto::Builder::new(TokioExecutor::new());
    // hyper's own limits answer with a bare status, so they are hard caps set well above the
    // gateway's JSON 414 and 431 (`HeadLimits` in `layer.rs`): a head within twice the gateway's limits
    // reaches the router and gets its JSON answer.
    let head_cap = ((limits.max_header_bytes + limits.max_uri_bytes) * 2).max(8192);
    let head_fields = (limits.max_header_bytes / 4).max(limits.max_headers * 2);
    http.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(head_cap)
        // As many header lines as `max_header_bytes` holds at their shortest (`a:\r\n`, 4
        // bytes): thousands of fields get the gateway's JSON 431, not hyper's bare one. Not as
        // many as the whole buffer holds: hyper allocates this many slots (64 bytes each) at
        // every parse, and past 512 KiB the allocation costs microseconds per request (8,192
        // slots: 36 ns, as for 200; 20,480: 1.6-3.7 us, measured with mimalloc).
        .max_headers(head_fields);
    // HTTP/2 counts 32 bytes more per field (RFC 9113 §6.5.2): room for as many fields as
    // HTTP/1.1 takes, so h2's bare 431 is no nearer than hyper's.
    let head_list = head_cap + 32 * head_fields;
    http.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(head_list).unwrap_or(u32::MAX))
        // One connection cannot hold more than this many requests open, however it stalls them.
        .max_concurrent_streams(limits.max_streams_per_connection)
        // Request bodies are at most a few KiB: a client cannot make the gateway buffer
        // megabytes of them per connection.
        .initial_stream_window_size(REQUEST_WINDOW)
        .initial_connection_window_size(REQUEST_WINDOW * 4)
        // A peer that vanished (no FIN, no RST) is found even while a stream is open.
        .keep_alive_interval(KEEP_ALIVE)
        .keep_alive_timeout(KEEP_ALIVE);
    let mut shutdown = std::pin::pin!(shutdown);
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut closing = connections.changes();
    let mut trouble = AcceptTrouble::default();
    // A connection accepted at the bound, waiting for room: the one descriptor over the bound.
    let mut waiting: Option<TcpStream> = None;
    loop {
        if let Some(stream) = waiting.take() {
            // Idle connections are closed only for a connection that is there: at the bound it
            // waits, and the ones behind it in the listen backlog (their requests with them),
            // until one closes or a sweep finds one idle long enough to close.
            let room = connections.make_room();
            trouble.room(room, connections);
            if room {
                tokio::spawn(connection(
                    stream,
                    tls.clone(),
                    http.clone(),
                    router.clone(),
                    connections.admit(),
                    limits.header_read_timeout,
                    limits.idle_write_timeout,
                ));
            } else {
                waiting = Some(stream);
            }
        }
        tokio::select! {
            () = &mut shutdown => return,
            _ = sweep.tick() => connections.sweep(),
            _ = closing.changed(), if waiting.is_some() => {}
            accepted = listener.accept(), if waiting.is_none() => match accepted {
                Ok((stream, _)) => {
                    trouble.backoff = Duration::ZERO;
                    // A relayed answer leaves in several writes (head, then body chunks); with
                    // Nagle's algorithm the second waits for the client's delayed ACK, 40 ms
                    // per request on a kept-alive connection.
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::debug!(error = %e, "cannot set TCP_NODELAY");
                    }
                    waiting = Some(stream);
                }
                Err(e) => {
                    // Out of descriptors, usually: the connection waits in the backlog, so
                    // retrying at once would spin. Give idle connections' descriptors back, and
                    // wait a little longer each time.
                    // EMFILE, ENFILE (the same numbers on Linux and the BSDs).
                    if matches!(e.raw_os_error(), Some(24 | 23)) {
                        connections.descriptors_ran_out();
                    }
                    trouble.failed(&e, connections.shed());
                    // Woken by a close from now on, not by the admissions before.
                    closing.borrow_and_update();
                    tokio::select! {
                        () = &mut shutdown => return,
                        _ = closing.changed() => {}
                        () = tokio::time::sleep(trouble.backoff) => {}
                    }
                }
            },
        }
    }
}

/// The HTTP/2 receive window for request bodies, per stream (four times that per connection):
/// the largest body the gateway reads is 4 KiB.
const REQUEST_WINDOW: u32 = 64 * 1024;

/// HTTP/2 keep-alive: a PING after this long without a frame from the peer, and the connection
/// closed when its answer takes as long.
const KEEP_ALIVE: Duration = Duration::from_secs(20);

/// Accepting under pressure, logged at most once per [`AcceptTrouble::LOG_EVERY`] with counts
/// (the loop once logged every failure, ten lines a second while out of descriptors).
#[derive(Debug, Default)]
struct AcceptTrouble {
    /// The wait before the next accept; 0 after a success.
    backoff: Duration,
    failures: u64,
    shed: usize,
    /// Whether accepting is paused at the bound, and how often it was.
    paused: bool,
    pauses: u64,
    logged: Option<Instant>,
}

impl AcceptTrouble {
    const LOG_EVERY: Duration = Duration::from_secs(5);
    const MIN_BACKOFF: Duration = Duration::from_millis(10);
    const MAX_BACKOFF: Duration = Duration::from_secs(1);

    /// Accepting failed; `shed` idle connections were closed to give descriptors back.
    fn failed(&mut self, error: &io::Error, shed: usize) {
        self.failures += 1;
        self.shed += shed;
        self.backoff = (self.backoff * 2).clamp(Self::MIN_BACKOFF, Self::MAX_BACKOFF);
        if self.due() {
            tracing::warn!(
                error = %error,
                failures = self.failures,
                idle_closed = self.shed,
                "accepting connections failed (out of descriptors?): idle connections closed \
                 to give some back; counts since the last such line"
            );
            self.reset();
        }
    }

    /// Whether there is room for a connection: none when the bound is reached and no
    /// connection has been idle long enough to close.
    fn room(&mut self, room: bool, connections: &Connections) {
        if !room && !self.paused {
            self.pauses += 1;
            if self.due() {
                tracing::warn!(
                    open = connections.count(),
                    pauses = self.pauses,
                    "connection bound reached with no connection idle long enough to close: new \
                     connections wait to be accepted; counts since the last such line"
                );
                self.reset();
            }
        }
        self.paused = !room;
    }

    fn due(&self) -> bool {
        self.logged.is_none_or(|at| at.elapsed() >= Self::LOG_EVERY)
    }

    fn reset(&mut self) {
        self.failures = 0;
        self.shed = 0;
        self.pauses = 0;
        self.logged = Some(Instant::now());
    }
}

/// Serves one connection until it closes, it is told to, or it is too slow.
async fn connection(
    stream: TcpStream,
    tls: Option<Arc<Tls>>,
    http: auto::Builder<TokioExecutor>,
    router: Router,
    tracked: Tracked,
    first_byte_timeout: Duration,
    idle_write: Duration,
) {
    // hyper's header timeout starts once it knows the protocol, which needs the first bytes:
    // a client that connects and says nothing is dropped here. Nothing is in progress before
    // the first request, so being told to close, however gently, closes at once.
    let opened = async {
        let mut probe = [0u8; 1];
        match tokio::time::timeout(first_byte_timeout, stream.peek(&mut probe)).await {
            Ok(Ok(n)) if n > 0 => {}
            Ok(_) => return Err(Closed::Client),
            Err(_) => return Err(Closed::Timeout),
        }
        let stream = WriteStall::new(stream, idle_write);
        match tls {
            // A handshake that stalls is a slow-loris too.
            Some(tls) => {
                match tokio::time::timeout(first_byte_timeout, tls.acceptor().accept(stream)).await
                {
                    Ok(Ok(stream)) => Ok(Either::Tls(Box::new(stream))),
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "TLS handshake failed");
                        Err(Closed::Client)
                    }
                    Err(_) => {
                        tracing::debug!("TLS handshake timed out");
                        Err(Closed::Timeout)
                    }
                }
            }
            None => Ok(Either::Plain(stream)),
        }
    };
    let opened = tokio::select! {
        opened = opened => opened,
        _ = tracked.told(Close::Gracefully) => return,
    };
    match opened {
        Ok(Either::Plain(io)) => serve_connection(io, http, router, &tracked).await,
        Ok(Either::Tls(io)) => serve_connection(io, http, router, &tracked).await,
        Err(reason) => tracked.ended(reason),
    }
}

/// A connection past its first bytes: plain, or TLS once the handshake is done.
enum Either {
    Plain(WriteStall<TcpStream>),
    Tls(Box<tokio_rustls::server::TlsStream<WriteStall<TcpStream>>>),
}

async fn serve_connection<I>(
    io: I,
    http: auto::Builder<TokioExecutor>,
    router: Router,
    tracked: &Tracked,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let conn = http.serve_connection(TokioIo::new(io), tracked.serve(router));
    let mut conn = std::pin::pin!(conn);
    let outcome = tokio::select! {
        outcome = conn.as_mut() => outcome,
        close = tracked.told(Close::Gracefully) => {
            if close == Close::Now {
                return;
            }
            // What is in progress finishes (HTTP/2: GOAWAY); a client that then neither sends
            // nor closes is closed once nothing is in progress.
            conn.as_mut().graceful_shutdown();
            loop {
                tokio::select! {
                    outcome = conn.as_mut() => break outcome,
                    _ = tracked.told(Close::Now) => return,
                    () = tokio::time::sleep(CLOSE_GRACE) => if !tracked.is_busy() {
                        return;
                    },
                }
            }
        }
    };
    match outcome {
        Ok(()) => tracked.ended(Closed::Client),
        Err(e) => {
            tracked.ended(if timed_out(&*e) {
                Closed::Timeout
            } else {
                Closed::Client
            });
            // Clients going away mid-answer, timeouts: routine, not the operator's concern.
            tracing::debug!(error = %e, "connection ended with an error");
        }
    }
}

/// Whether a connection ended because its client was too slow: hyper's header timeout, or a
/// write that stalled ([`WriteStall`]), however deep in the error's sources.
fn timed_out(e: &(dyn std::error::Error + 'static)) -> bool {
    std::iter::successors(Some(e), |e| e.source()).any(|e| {
        e.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_timeout)
            || e.downcast_ref::<io::Error>()
                .is_some_and(|e| e.kind() == io::ErrorKind::TimedOut)
    })
}

/// A socket whose writes fail once one has made no progress for `idle`: a client that stops
/// reading (its receive window and the kernel's buffers full) has its connection closed, which
/// drops its answers and gives back what they held. Reads are untouched (hyper times the head;
/// the router times the body).
struct WriteStall<I> {
    io: I,
    idle: Duration,
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<I> WriteStall<I> {
    fn new(io: I, idle: Duration) -> WriteStall<I> {
        WriteStall {
            io,
            idle,
            stalled: None,
        }
    }

    /// Passes a write's outcome through, timing how long it has been pending.
    fn watch<T>(
        &mut self,
        cx: &mut Context<'_>,
        outcome: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if outcome.is_ready() {
            self.stalled = None;
            return outcome;
        }
        let idle = self.idle;
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
        if timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client took nothing for the idle write time",
            )));
        }
        Poll::Pending
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for WriteStall<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for WriteStall<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let outcome = Pin::new(&mut self.io).poll_write(cx, buf);
        self.watch(cx, outcome)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let outcome = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.watch(cx, outcome)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let outcome = Pin::new(&mut self.io).poll_flush(cx);
        self.watch(cx, outcome)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
