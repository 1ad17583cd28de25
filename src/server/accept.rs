//! The accept loop: hyper's own connection builder rather than `axum::serve`, for the bounds
//! [`ServerLimits`](super::ServerLimits) puts on hostile or broken clients (header size and
//! count, header read time, streams per HTTP/2 connection, a silent client, a stalled TLS
//! handshake, a client that stops reading), and graceful shutdown.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;

use super::ServerLimits;
use crate::server::tls::Tls;

/// The accept loop: one task per connection, each watched for graceful shutdown. Returns (and
/// drops the listener, so nothing more is accepted) as soon as `shutdown` completes.
pub(super) async fn serve(
    listener: TcpListener,
    router: Router,
    limits: &ServerLimits,
    tls: Option<Arc<Tls>>,
    graceful: &GracefulShutdown,
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
        .initial_connection_window_size(REQUEST_WINDOW * 4);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    // A relayed answer leaves in several writes (head, then body chunks); with
                    // Nagle's algorithm the second waits for the client's delayed ACK, 40 ms
                    // per request on a kept-alive connection.
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::debug!(error = %e, "cannot set TCP_NODELAY");
                    }
                    stream
                }
                Err(e) => {
                    // Out of file descriptors, usually: pause rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        tokio::spawn(connection(
            stream,
            tls.clone(),
            http.clone(),
            router.clone(),
            graceful.watcher(),
            limits.header_read_timeout,
            limits.idle_write_timeout,
        ));
    }
}

/// The HTTP/2 receive window for request bodies, per stream (four times that per connection):
/// the largest body the gateway reads is 4 KiB.
const REQUEST_WINDOW: u32 = 64 * 1024;

/// Serves one connection until it closes (or shutdown closes it once its requests are done).
async fn connection(
    stream: TcpStream,
    tls: Option<Arc<Tls>>,
    http: auto::Builder<TokioExecutor>,
    router: Router,
    watcher: Watcher,
    first_byte_timeout: Duration,
    idle_write: Duration,
) {
    // hyper's header timeout starts once it knows the protocol, which needs the first bytes:
    // a client that connects and says nothing is dropped here.
    let mut probe = [0u8; 1];
    match tokio::time::timeout(first_byte_timeout, stream.peek(&mut probe)).await {
        Ok(Ok(n)) if n > 0 => {}
        _ => return,
    }
    let stream = WriteStall::new(stream, idle_write);
    match tls {
        // A handshake that stalls is a slow-loris too.
        Some(tls) => {
            match tokio::time::timeout(first_byte_timeout, tls.acceptor().accept(stream)).await {
                Ok(Ok(stream)) => serve_connection(stream, http, router, watcher).await,
                Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!("TLS handshake timed out"),
            }
        }
        None => serve_connection(stream, http, router, watcher).await,
    }
}

async fn serve_connection<I>(
    io: I,
    http: auto::Builder<TokioExecutor>,
    router: Router,
    watcher: Watcher,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = TowerToHyperService::new(router);
    let conn = http
        .serve_connection(TokioIo::new(io), service)
        .into_owned();
    if let Err(e) = watcher.watch(conn).await {
        // Clients going away mid-answer, timeouts: routine, not the operator's concern.
        tracing::debug!(error = %e, "connection ended with an error");
    }
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
