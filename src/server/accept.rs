//! The accept loop: hyper's own connection builder rather than `axum::serve`, for the bounds
//! [`ServerLimits`](super::ServerLimits) puts on hostile or broken clients (header size, header
//! read time, a silent client, a stalled TLS handshake), and graceful shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};

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
    // The hard cap on a request head; the JSON 431 below it is `check_headers`'s.
    let head_cap = (limits.max_header_bytes * 2).max(8192);
    http.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(head_cap);
    http.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(head_cap).unwrap_or(u32::MAX));
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
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
        ));
    }
}

/// Serves one connection until it closes (or shutdown closes it once its requests are done).
async fn connection(
    stream: TcpStream,
    tls: Option<Arc<Tls>>,
    http: auto::Builder<TokioExecutor>,
    router: Router,
    watcher: Watcher,
    first_byte_timeout: Duration,
) {
    // hyper's header timeout starts once it knows the protocol, which needs the first bytes:
    // a client that connects and says nothing is dropped here.
    let mut probe = [0u8; 1];
    match tokio::time::timeout(first_byte_timeout, stream.peek(&mut probe)).await {
        Ok(Ok(n)) if n > 0 => {}
        _ => return,
    }
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
