//! Admission: how many requests the gateway works on at once, and who may hold those places
//! in flight. Relaying an upstream body while holding a place is [`relay`]'s.
//!
//! One rule: **a request holds a place while the gateway works on it or holds an upstream
//! connection for it** — from the moment its caller is authenticated until the handler returns,
//! and, for an upstream body relayed as it comes, until its last byte is taken by the client (or
//! the client stops taking bytes for [`Admission::idle_write`], see [`Place::relay`]). An answer
//! already in memory (every error, a cache hit) holds no place while it waits for a slow or
//! silent reader: it costs a few kilobytes at most, and the server's per-connection stream cap
//! bounds how many one connection can leave unread.
//!
//! Three bounds, all answered at once rather than queued:
//!
//! - **global** (`max_in_flight`): places shared by every caller, protecting the upstream and
//!   the gateway; past it `503` (reason `overloaded`), and `/readyz` answers `503` while none is
//!   free.
//! - **per principal** (`max_in_flight_per_principal`): how many of those one authenticated
//!   subject (or gateway key) may hold; past it `429` (reason `principal_in_flight`), so one
//!   caller cannot take every place however many connections it opens.
//! - **unauthenticated** (`max_unauthenticated`): a credential check that has to wait (for the
//!   identity provider's keys) takes a place of its own from this small allowance, never a
//!   global one; past it `503` (reason `unauthenticated_overload`). A check that completes at
//!   once (an HS256 token, a token verified before, a gateway key, a missing or malformed
//!   credential) needs no place, so callers with good credentials are never refused because
//!   others' checks are waiting. Unknown paths (404) and refused credentials (401) never hold a
//!   global place.
//!
//! Callers are told apart by their authenticated subject, never by address: behind a load
//! balancer every caller shares one.

mod relay;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::{Error, Throttle};
use crate::telemetry::Metrics;

/// The bounds, as [`crate::server::ServerLimits`] sets them.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Places shared by every caller.
    pub max_in_flight: usize,
    /// Places one principal may hold at once.
    pub max_in_flight_per_principal: usize,
    /// Credential checks that may wait at once.
    pub max_unauthenticated: usize,
    /// How long a relayed body may wait for the client to take its next frame.
    pub idle_write: Duration,
}

/// The gateway's places; one per app, shared by the router and the handlers.
pub struct Admission {
    global: Arc<Semaphore>,
    unauthenticated: Arc<Semaphore>,
    /// Places held per principal; a principal with none is not in the table.
    principals: Mutex<HashMap<Arc<str>, usize>>,
    per_principal: usize,
    idle_write: Duration,
    metrics: Arc<Metrics>,
}

impl Admission {
    /// The places for `bounds`, counted in `metrics` (`requests_in_flight`).
    pub fn new(bounds: Bounds, metrics: Arc<Metrics>) -> Arc<Admission> {
        Arc::new(Admission {
            global: Arc::new(Semaphore::new(bounds.max_in_flight)),
            unauthenticated: Arc::new(Semaphore::new(bounds.max_unauthenticated)),
            principals: Mutex::new(HashMap::new()),
            per_principal: bounds.max_in_flight_per_principal,
            idle_write: bounds.idle_write,
            metrics,
        })
    }

    /// Whether every global place is taken (`/readyz` answers 503 meanwhile).
    pub fn saturated(&self) -> bool {
        self.global.available_permits() == 0
    }

    /// Runs a credential check. If it completes at once it needs nothing; if it has to wait, it
    /// waits holding a place of the unauthenticated allowance, or is refused (503) when none is
    /// free.
    pub async fn authenticate<F, T>(&self, check: F) -> Result<T, Error>
    where
        F: Future<Output = Result<T, Error>>,
    {
        let mut check = std::pin::pin!(check);
        // Polled with the task's own waker, so nothing is lost when it is pending.
        let first = std::future::poll_fn(|cx| Poll::Ready(check.as_mut().poll(cx))).await;
        if let Poll::Ready(done) = first {
            return done;
        }
        let Ok(_place) = self.unauthenticated.clone().try_acquire_owned() else {
            return Err(Error::UnauthenticatedOverload);
        };
        check.await
    }

    /// A place for one request of `subject`: 429 past the principal's own share, 503 when every
    /// place is taken.
    pub fn admit(self: &Arc<Self>, subject: &str) -> Result<Place, Error> {
        let principal = {
            let mut held = self
                .principals
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let (key, holding) = match held.get_key_value(subject) {
                Some((key, &n)) => (key.clone(), n),
                None => (Arc::from(subject), 0),
            };
            if holding >= self.per_principal {
                return Err(Error::TooManyRequests {
                    retry_after: 1,
                    reason: Throttle::PrincipalInFlight,
                });
            }
            held.insert(key.clone(), holding + 1);
            key
        };
        let Ok(permit) = self.global.clone().try_acquire_owned() else {
            self.release(&principal);
            return Err(Error::Overloaded);
        };
        self.metrics.in_flight.inc();
        Ok(Place {
            admission: self.clone(),
            principal,
            _permit: permit,
        })
    }

    fn release(&self, principal: &Arc<str>) {
        let mut held = self
            .principals
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = held.get_mut(principal) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.remove(principal);
            }
        }
    }

    /// How many principals hold a place now: the table forgets idle ones.
    #[cfg(test)]
    fn principals_holding(&self) -> usize {
        self.principals
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// One request's place (global and its principal's); given back when dropped.
pub struct Place {
    admission: Arc<Admission>,
    principal: Arc<str>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.admission.metrics.in_flight.dec();
        self.admission.release(&self.principal);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn admission(global: usize, per_principal: usize) -> Arc<Admission> {
        Admission::new(
            Bounds {
                max_in_flight: global,
                max_in_flight_per_principal: per_principal,
                max_unauthenticated: 1,
                idle_write: Duration::from_secs(30),
            },
            Arc::new(Metrics::default()),
        )
    }

    fn reason(result: Result<Place, Error>) -> &'static str {
        match result {
            Ok(_) => "admitted",
            Err(e) => e.kind(),
        }
    }

    #[test]
    fn a_principal_holds_at_most_its_share_and_the_table_forgets_it() {
        let a = admission(10, 2);
        let one = a.admit("alice").expect("first");
        let two = a.admit("alice").expect("second");
        assert_eq!(reason(a.admit("alice")), "principal_in_flight");
        let bob = a.admit("bob").expect("another principal");
        assert_eq!(a.principals_holding(), 2);
        drop(one);
        let three = a.admit("alice").expect("a place came back");
        drop((two, three, bob));
        assert_eq!(a.principals_holding(), 0);
    }

    #[test]
    fn past_the_global_bound_everyone_is_shed_and_nothing_leaks() {
        let a = admission(2, 5);
        let held = (a.admit("alice").expect("1"), a.admit("bob").expect("2"));
        assert!(a.saturated());
        assert_eq!(reason(a.admit("carol")), "overloaded");
        // The refused request took no principal place either.
        assert_eq!(a.principals_holding(), 2);
        drop(held);
        assert!(!a.saturated());
        assert_eq!(a.principals_holding(), 0);
    }

    #[tokio::test]
    async fn only_a_check_that_waits_takes_an_unauthenticated_place() {
        let a = admission(1, 1);
        // Completing at once needs no place, however many run.
        for _ in 0..3 {
            assert_eq!(a.authenticate(async { Ok(1) }).await.expect("ok"), 1);
        }
        let (release, wait) = tokio::sync::oneshot::channel::<()>();
        let waiting = {
            let a = a.clone();
            tokio::spawn(async move {
                a.authenticate(async {
                    let _ = wait.await;
                    Ok(2)
                })
                .await
            })
        };
        // The waiting check holds the one place: a second one that waits is refused at once,
        // one that does not wait is not.
        tokio::time::timeout(Duration::from_secs(5), async {
            while a.unauthenticated.available_permits() > 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the waiting check took the place");
        let refused = a
            .authenticate(std::future::pending::<Result<(), Error>>())
            .await;
        assert!(matches!(refused, Err(Error::UnauthenticatedOverload)));
        assert_eq!(a.authenticate(async { Ok(3) }).await.expect("ok"), 3);
        let _ = release.send(());
        assert_eq!(waiting.await.expect("join").expect("ok"), 2);
        assert_eq!(a.unauthenticated.available_permits(), 1);
    }

    #[tokio::test]
    async fn a_relay_nobody_reads_is_cut_and_gives_its_place_back() {
        let metrics = Arc::new(Metrics::default());
        let a = Admission::new(
            Bounds {
                max_in_flight: 1,
                max_in_flight_per_principal: 1,
                max_unauthenticated: 1,
                idle_write: Duration::from_millis(50),
            },
            metrics,
        );
        let place = a.admit("alice").expect("place");
        let upstream = futures_util::stream::iter(
            (0..10).map(|_| Ok::<_, std::io::Error>(Bytes::from_static(b"0123456789"))),
        );
        let body = place.relay(upstream);
        tokio::time::timeout(Duration::from_secs(5), async {
            while a.saturated() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the place came back");
        // What was handed over before the cut is readable, then an error, not a clean end.
        let read = axum::body::to_bytes(body, usize::MAX).await;
        assert!(read.is_err(), "a cut relay must not look complete");
    }

    #[tokio::test]
    async fn a_relay_read_to_the_end_is_complete() {
        let a = admission(1, 1);
        let place = a.admit("alice").expect("place");
        let upstream = futures_util::stream::iter(
            (0..10).map(|i| Ok::<_, std::io::Error>(Bytes::from(vec![i; 1000]))),
        );
        let body = axum::body::to_bytes(place.relay(upstream), usize::MAX)
            .await
            .expect("complete");
        assert_eq!(body.len(), 10_000);
        tokio::time::timeout(Duration::from_secs(5), async {
            while a.saturated() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the place came back");
    }
}
