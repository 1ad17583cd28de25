//! The relayed-body pump: an upstream body handed to the client frame by frame while the
//! request keeps its [`Place`], cut off when the client stops taking it.

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use axum::body::Body;
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use tokio::sync::mpsc;
use tracing::Instrument;

use super::Place;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Place {
    /// Relays an upstream body to the client, holding this place (and the upstream connection)
    /// only while the client keeps taking it.
    ///
    /// A task reads the upstream and hands each frame over a one-frame channel; when the client
    /// (hyper) has not taken the previous frame within the idle write time — a reader that
    /// stopped reading, or an HTTP/2 stream whose flow-control window stays shut — the task
    /// stops: the upstream body is dropped (closing its connection), the place is given back,
    /// the frame waiting in the channel is freed, and the body ends with an error whenever hyper
    /// next asks for a frame, so hyper resets the stream or closes the connection instead of
    /// ending the answer as if it were complete. The timer runs in the task, so it fires even
    /// when hyper never polls the body again.
    pub fn relay<S, E>(self, upstream: S) -> Body
    where
        S: Stream<Item = Result<Bytes, E>> + Send + 'static,
        E: Into<BoxError> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel::<Result<Bytes, BoxError>>(1);
        let link = Arc::new(Mutex::new(Link {
            rx: Some(rx),
            waker: None,
        }));
        let client = link.clone();
        let idle = self.admission.idle_write;
        let pump = async move {
            let place = self;
            let mut upstream = Box::pin(upstream);
            loop {
                let next = tokio::select! {
                    next = upstream.next() => next,
                    // The client left: stop reading the upstream at once.
                    () = tx.closed() => break,
                };
                let Some(frame) = next else { break };
                let last = frame.is_err();
                match tokio::time::timeout(idle, tx.send(frame.map_err(Into::into))).await {
                    Ok(Ok(())) if !last => {}
                    Ok(_) => break,
                    Err(_) => {
                        place.admission.metrics.count_stalled_answer();
                        tracing::info!(
                            idle_ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX),
                            "the client took nothing for the idle write time: answer cut off"
                        );
                        Link::cut(&link);
                        break;
                    }
                }
            }
            // The upstream body goes first (its connection closes), then the place.
            drop(upstream);
            drop(place);
        };
        tokio::spawn(pump.instrument(tracing::Span::current()));
        Body::from_stream(Relayed {
            link: client,
            done: false,
        })
    }
}

/// What the relay task and the client's body share: the channel's receiving end (gone once the
/// relay is cut) and the waker of a client waiting on it.
struct Link {
    rx: Option<mpsc::Receiver<Result<Bytes, BoxError>>>,
    waker: Option<std::task::Waker>,
}

impl Link {
    fn lock(link: &Mutex<Link>) -> std::sync::MutexGuard<'_, Link> {
        link.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Drops the receiving end (and the frame it holds) and wakes a client waiting on it.
    fn cut(link: &Mutex<Link>) {
        let (rx, waker) = {
            let mut shared = Link::lock(link);
            (shared.rx.take(), shared.waker.take())
        };
        drop(rx);
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// The client's side of [`Place::relay`]: the frames, then an error if the relay was cut.
struct Relayed {
    link: Arc<Mutex<Link>>,
    done: bool,
}

impl Stream for Relayed {
    type Item = Result<Bytes, BoxError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        let polled = {
            let mut shared = Link::lock(&self.link);
            match shared.rx.as_mut() {
                None => None,
                Some(rx) => match rx.poll_recv(cx) {
                    Poll::Pending => {
                        shared.waker = Some(cx.waker().clone());
                        Some(Poll::Pending)
                    }
                    ready => Some(ready),
                },
            }
        };
        match polled {
            Some(Poll::Ready(None)) => {
                self.done = true;
                Poll::Ready(None)
            }
            Some(other) => other,
            None => {
                self.done = true;
                Poll::Ready(Some(Err(
                    "the client took nothing for the idle write time".into()
                )))
            }
        }
    }
}

impl Drop for Relayed {
    /// The client left (or hyper dropped the answer): the receiving end goes, so the relay task
    /// sees it at once and stops reading the upstream.
    fn drop(&mut self) {
        Link::cut(&self.link);
    }
}
