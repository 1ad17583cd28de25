//! A TCP relay in front of a `redis-server` that delays every reply: a Redis that answers, but
//! slowly. Requests pass at once; each chunk of reply bytes is held `delay` after it arrived
//! (every `late_every`-th one `late` longer), in order, so delays shift replies and never add up.
//! It runs on a thread of its own, so the gateway's load does not stretch its delays.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// How the relay delays, changeable while it runs (milliseconds).
#[derive(Default)]
pub struct Delays {
    pub delay_ms: AtomicU64,
    pub late_ms: AtomicU64,
    /// Every this many reply chunks (over all connections) one is late; 0: none.
    pub late_every: AtomicU64,
    chunks: AtomicU64,
}

pub struct Relay {
    pub port: u16,
    pub delays: Arc<Delays>,
}

impl Relay {
    /// A relay to `127.0.0.1:target` on a free port.
    pub fn start(target: u16) -> Relay {
        let delays = Arc::new(Delays::default());
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        let port = std_listener.local_addr().expect("its address").port();
        std_listener.set_nonblocking(true).expect("nonblocking");
        let shared = delays.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(async move {
                let listener = TcpListener::from_std(std_listener).expect("a listener");
                while let Ok((client, _)) = listener.accept().await {
                    let delays = shared.clone();
                    tokio::spawn(async move {
                        if let Ok(server) = TcpStream::connect(("127.0.0.1", target)).await {
                            relay(client, server, delays).await;
                        }
                    });
                }
            });
        });
        Relay { port, delays }
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Every reply `delay` late, and every `every`-th one `late` more (0: none).
    pub fn set(&self, delay: Duration, every: u64, late: Duration) {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        self.delays.delay_ms.store(ms(delay), Ordering::SeqCst);
        self.delays.late_ms.store(ms(late), Ordering::SeqCst);
        self.delays.late_every.store(every, Ordering::SeqCst);
    }
}

async fn relay(client: TcpStream, server: TcpStream, delays: Arc<Delays>) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let up = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
    });
    let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match server_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let mut due = Instant::now()
                        + Duration::from_millis(delays.delay_ms.load(Ordering::SeqCst));
                    let every = delays.late_every.load(Ordering::SeqCst);
                    let chunk = delays.chunks.fetch_add(1, Ordering::SeqCst) + 1;
                    if every > 0 && chunk.is_multiple_of(every) {
                        due += Duration::from_millis(delays.late_ms.load(Ordering::SeqCst));
                    }
                    if sender.send((due, buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            }
        }
    });
    while let Some((due, bytes)) = receiver.recv().await {
        tokio::time::sleep_until(due).await;
        if client_write.write_all(&bytes).await.is_err() {
            break;
        }
    }
    up.abort();
    reader.abort();
}
