//! Cacheable calls (`consumptions`, `taxes`): answered from the cache, or fetched once for
//! every concurrent caller, or covered by a stale entry while the upstream fails; `Cache-Status`
//! and `Age` say which. An answer is read only up to what the cache stores: a longer one is
//! relayed as it streams and not stored.

use std::sync::Mutex;
use std::time::Instant;

use axum::body::Body;
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use time::OffsetDateTime;
use tracing::Instrument;

use super::forward::{exact_json, forward};
use crate::admission::Place;
use crate::billing::Call;
use crate::cache::{Cache, Entry, Fetch, Outcome, Refresh, Refreshed, Shareable};
use crate::error::{Error, ErrorKind, JSON, Throttle};
use crate::limits::RateCheck;
use crate::policy::Principal;
use crate::state::AppState;
use crate::telemetry::RequestInfo;
use crate::upstream::{Content, Unread};

/// An upstream answer the cache does not store, shared by every request that waited for it.
enum Uncached {
    Answer {
        status: StatusCode,
        content_type: Option<HeaderValue>,
        /// Only on an error answer the gateway made itself, relayed from another replica.
        retry_after: Option<HeaderValue>,
        /// The reason of a 429 the gateway made itself (another replica's), for the log line
        /// and metrics of every request it is relayed to.
        rejection: Option<&'static str>,
        body: Bytes,
    },
    /// An answer longer than the cache stores: relayed as it streams, to one request only (it
    /// can be read once); the others that waited for it fetch their own.
    TooLong {
        status: StatusCode,
        content_type: Option<HeaderValue>,
        body: Mutex<Option<Unread>>,
    },
    Failed(Error),
}

impl Uncached {
    /// What went wrong, for the log line of a background refresh that kept its entry.
    fn describe(&self) -> String {
        match self {
            Uncached::Answer { status, .. } => format!("the upstream answered {status}"),
            Uncached::TooLong { .. } => "the answer is too long to store".to_owned(),
            Uncached::Failed(e) => e.to_string(),
        }
    }
}

/// Shared with the other replicas as `status`, `content-type`, `retry-after` and rejection
/// reason lines, then the body; an error of this gateway's own becomes the answer it renders to.
impl Shareable for Uncached {
    fn to_shared(&self) -> Option<Vec<u8>> {
        let (status, content_type, retry_after, rejection, body) = match self {
            Uncached::Answer {
                status,
                content_type,
                retry_after,
                rejection,
                body,
            } => (
                *status,
                content_type.clone(),
                retry_after.clone(),
                *rejection,
                body.to_vec(),
            ),
            Uncached::Failed(e) => {
                let response = e.clone().into_response();
                let retry_after = response.headers().get(header::RETRY_AFTER).cloned();
                (
                    e.status(),
                    Some(JSON),
                    retry_after,
                    Some(e.kind()),
                    e.body().to_string().into_bytes(),
                )
            }
            // Its body streams to one request only.
            Uncached::TooLong { .. } => return None,
        };
        let value =
            |v: &Option<HeaderValue>| v.as_ref().map_or(&b""[..], |v| v.as_bytes()).to_vec();
        let mut shared = format!("{}\n", status.as_u16()).into_bytes();
        let rejection = rejection.unwrap_or_default().as_bytes().to_vec();
        for line in [value(&content_type), value(&retry_after), rejection] {
            shared.extend(line);
            shared.push(b'\n');
        }
        shared.extend(body);
        Some(shared)
    }

    fn from_shared(bytes: &[u8]) -> Option<Uncached> {
        let mut parts = bytes.splitn(5, |b| *b == b'\n');
        let status = StatusCode::from_bytes(parts.next()?).ok()?;
        let header = |v: &[u8]| {
            (!v.is_empty())
                .then(|| HeaderValue::from_bytes(v).ok())
                .flatten()
        };
        let content_type = header(parts.next()?);
        let retry_after = header(parts.next()?);
        let rejection = throttle(parts.next()?);
        Some(Uncached::Answer {
            status,
            content_type,
            retry_after,
            rejection,
            body: Bytes::copy_from_slice(parts.next()?),
        })
    }
}

/// The reason of a 429 named `kind` by the replica that refused (only a known reason: it is a
/// metric label).
fn throttle(kind: &[u8]) -> Option<&'static str> {
    use Throttle::*;
    [
        Principal,
        UpstreamBudget,
        UpstreamBackoff,
        Upstream,
        PrincipalInFlight,
    ]
    .map(|reason| {
        Error::TooManyRequests {
            retry_after: 0,
            reason,
        }
        .kind()
    })
    .into_iter()
    .find(|known| known.as_bytes() == kind)
}

/// Cacheable operations: authorization has already happened, so the entry is shared only with
/// callers allowed to make this exact upstream request.
pub(super) async fn cached(
    state: &AppState,
    call: &Call,
    request_id: &str,
    principal: &Principal,
    rate: Option<RateCheck<'_>>,
    info: &mut RequestInfo,
    place: Place,
) -> Result<Response, Error> {
    let ttl = state.cache.ttl_for(call, OffsetDateTime::now_utc());
    let key = Cache::key(call);
    let rate = Verdict {
        state,
        principal,
        // Decided already (the usual case): a hit takes no lock to learn it.
        decided: tokio::sync::OnceCell::new_with(rate.is_none().then_some(Ok(()))),
        pending: Mutex::new(rate),
    };
    // Only a miss that fetches spends a turn; coalesced waiters and hits never get here. The
    // fetch is built on a miss only: a hit never carries its long future. A caller whose rate
    // is still being decided is refused before the upstream is asked, its own refusal.
    let upstream_ms = &mut info.upstream_ms;
    let lookup = state.cache.get_or_fetch(&key, ttl, || async {
        if let Err(refused) = rate.decided().await {
            return Fetch::Refused(Uncached::Failed(refused));
        }
        fetch(state, call, request_id, principal, upstream_ms).await
    });
    let outcome = lookup.await;
    // Nothing served, nor refreshed, before the caller's rate is decided.
    rate.decided().await?;
    let (result, response) = match outcome {
        Outcome::Hit(entry) => ("hit", from_entry(&entry, "billing-gateway; hit")),
        Outcome::Refreshing(entry, refresh) => {
            refresh_in_background(state, call, request_id, principal, refresh);
            (
                "hit",
                from_entry(&entry, "billing-gateway; hit; detail=refreshing"),
            )
        }
        // RFC 9211 `detail`: the entry came from the tier the replicas share.
        Outcome::SharedHit(entry) => (
            "hit_shared",
            from_entry(&entry, "billing-gateway; hit; detail=shared"),
        ),
        Outcome::Stored(entry) => (
            "stored",
            from_entry(&entry, "billing-gateway; fwd=miss; stored"),
        ),
        Outcome::TakenOver(entry) => (
            "lock_takeover",
            from_entry(&entry, "billing-gateway; fwd=miss; stored; detail=takeover"),
        ),
        // RFC 9211 `collapsed`: this request waited for another's identical fetch.
        Outcome::Coalesced(entry) => (
            "coalesced",
            from_entry(&entry, "billing-gateway; fwd=miss; collapsed"),
        ),
        Outcome::CoalescedRemote(entry) => (
            "coalesced_remote",
            from_entry(
                &entry,
                "billing-gateway; fwd=miss; collapsed; detail=shared",
            ),
        ),
        Outcome::Stale(entry) => ("stale", from_entry(&entry, "billing-gateway; fwd=stale")),
        Outcome::TooLarge(body) => ("miss", answer(StatusCode::OK, Some(JSON), body)),
        Outcome::Passed(uncached) => match &*uncached {
            Uncached::Answer {
                status,
                content_type,
                retry_after,
                rejection,
                body,
            } => {
                let mut response = answer(*status, content_type.clone(), body.clone());
                if let Some(retry_after) = retry_after {
                    response
                        .headers_mut()
                        .insert(header::RETRY_AFTER, retry_after.clone());
                }
                // Logged and counted with its reason, as on the replica that refused.
                if let Some(rejection) = rejection {
                    response.extensions_mut().insert(ErrorKind(rejection));
                }
                ("miss", response)
            }
            Uncached::TooLong {
                status,
                content_type,
                body,
            } => {
                let taken = body.lock().map(|mut body| body.take()).unwrap_or(None);
                // Streamed, so held and cut like any relayed body (see `forward`).
                let mut response = match taken {
                    Some(body) => {
                        let mut response = Response::new(place.relay(body.into_stream()));
                        *response.status_mut() = *status;
                        if let Some(ct) = content_type {
                            response
                                .headers_mut()
                                .insert(header::CONTENT_TYPE, exact_json(ct.clone()));
                        }
                        response
                    }
                    // Another request is relaying that answer: this one asks for its own.
                    None => forward(state, call, request_id, principal, info, place)
                        .await
                        .unwrap_or_else(IntoResponse::into_response),
                };
                let headers = response.headers_mut();
                headers.insert(
                    &CACHE_STATUS,
                    HeaderValue::from_static("billing-gateway; fwd=miss"),
                );
                headers.insert(header::CACHE_CONTROL, cache_control(0));
                ("miss", response)
            }
            Uncached::Failed(e) => {
                let mut response = e.clone().into_response();
                response.headers_mut().insert(
                    &CACHE_STATUS,
                    HeaderValue::from_static("billing-gateway; fwd=miss"),
                );
                ("miss", response)
            }
        },
    };
    info.cache = Some(result);
    state.metrics.cache_result(result);
    Ok(response)
}

/// A caller's rate still being decided when its cached call began (see `check_rate`): decided
/// once, by the first of its fetch and its answer to need it.
struct Verdict<'a> {
    state: &'a AppState,
    principal: &'a Principal,
    pending: Mutex<Option<RateCheck<'a>>>,
    decided: tokio::sync::OnceCell<Result<(), Error>>,
}

impl Verdict<'_> {
    async fn decided(&self) -> Result<(), Error> {
        let decide = async {
            let pending = self
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            match pending {
                Some(check) => {
                    super::rate_decided(self.state, self.principal, check.decided().await)
                }
                None => Ok(()),
            }
        };
        self.decided.get_or_init(|| decide).await.clone()
    }
}

/// The 200 body of a cacheable `call`, for an answer the gateway computes from it (costs):
/// through the same cache, coalesced fill, budget and stale cover as [`cached`], with its
/// `Cache-Status` result; any other answer is an error.
pub(super) async fn cached_body(
    state: &AppState,
    call: &Call,
    request_id: &str,
    principal: &Principal,
    info: &mut RequestInfo,
) -> Result<(Bytes, &'static str), Error> {
    let ttl = state.cache.ttl_for(call, OffsetDateTime::now_utc());
    let key = Cache::key(call);
    let lookup = state.cache.get_or_fetch(&key, ttl, || {
        fetch(state, call, request_id, principal, &mut info.upstream_ms)
    });
    let (result, body) = match lookup.await {
        Outcome::Hit(entry) => ("hit", Ok(entry.body.clone())),
        Outcome::Refreshing(entry, refresh) => {
            refresh_in_background(state, call, request_id, principal, refresh);
            ("hit", Ok(entry.body.clone()))
        }
        Outcome::SharedHit(entry) => ("hit_shared", Ok(entry.body.clone())),
        Outcome::Stored(entry) => ("stored", Ok(entry.body.clone())),
        Outcome::TakenOver(entry) => ("lock_takeover", Ok(entry.body.clone())),
        Outcome::Coalesced(entry) => ("coalesced", Ok(entry.body.clone())),
        Outcome::CoalescedRemote(entry) => ("coalesced_remote", Ok(entry.body.clone())),
        Outcome::Stale(entry) => ("stale", Ok(entry.body.clone())),
        Outcome::TooLarge(body) => ("miss", Ok(body)),
        Outcome::Passed(uncached) => (
            "miss",
            Err(match &*uncached {
                Uncached::Failed(e) => e.clone(),
                other => Error::BadGateway(format!("{}: {}", call.op.name, other.describe())),
            }),
        ),
    };
    info.cache = Some(result);
    state.metrics.cache_result(result);
    Ok((body?, result))
}

/// Refreshes an entry near the end of its freshness: through the budget and its fair queue as
/// this caller's call, but not in its place in flight (the caller has its answer already).
fn refresh_in_background(
    state: &AppState,
    call: &Call,
    request_id: &str,
    principal: &Principal,
    refresh: Refresh,
) {
    let (state, call, request_id, principal) = (
        state.clone(),
        call.clone(),
        request_id.to_owned(),
        principal.clone(),
    );
    let task = async move {
        let mut upstream_ms = None;
        let fetch = fetch(&state, &call, &request_id, &principal, &mut upstream_ms);
        let result = match refresh.run(fetch).await {
            Refreshed::Stored => "stored",
            Refreshed::Shared => "shared",
            Refreshed::Kept(fetched) => {
                if let Fetch::Failed(failure) | Fetch::Pass(failure) | Fetch::Refused(failure) =
                    &fetched
                {
                    let error = failure.describe();
                    tracing::warn!(
                        operation = call.op.name,
                        error,
                        "background refresh failed, the entry is kept"
                    );
                }
                "kept"
            }
        };
        state.metrics.cache_refresh(result);
    };
    tokio::spawn(task.in_current_span());
}

/// Fetches `call` for `principal` and judges the answer for the cache: a 200 is stored, a
/// failure may be covered by a stale entry, anything else is relayed and not stored.
async fn fetch(
    state: &AppState,
    call: &Call,
    request_id: &str,
    principal: &Principal,
    upstream_ms: &mut Option<f64>,
) -> Fetch<Uncached> {
    let result = super::send(state, call, request_id, principal, upstream_ms).await;
    let upstream = match result {
        Ok(upstream) => upstream,
        // Refused before the upstream was asked (this principal's backlog, the budget's turns):
        // this caller's own answer, not one for the callers waiting on this fetch.
        Err(e @ Error::TooManyRequests { reason, .. }) if reason != Throttle::Upstream => {
            return Fetch::Refused(Uncached::Failed(e));
        }
        Err(e) => return Fetch::Failed(Uncached::Failed(e)),
    };
    let status = upstream.status;
    let content_type = upstream.headers.get(header::CONTENT_TYPE).cloned();
    // Never more than the cache would store: a longer answer is relayed, not held. An error
    // answer comes read whole and scrubbed of the key.
    let read = match upstream.body {
        Content::Unread(body) => body.read_at_most(state.cache.store_limit()).await,
        whole => Ok(whole),
    };
    let body = match read {
        Ok(Content::Whole(body)) => body,
        Ok(Content::Unread(body)) => {
            return Fetch::Pass(Uncached::TooLong {
                status,
                content_type,
                body: Mutex::new(Some(body)),
            });
        }
        Err(e) => return Fetch::Failed(Uncached::Failed(e)),
    };
    match status {
        StatusCode::OK => Fetch::Store(body),
        s if s.is_server_error() => Fetch::Failed(Uncached::Answer {
            status,
            content_type,
            retry_after: None,
            rejection: None,
            body,
        }),
        _ => Fetch::Pass(Uncached::Answer {
            status,
            content_type,
            retry_after: None,
            rejection: None,
            body,
        }),
    }
}

/// A stored answer: headers built here, the body shared, never re-parsed. Only `Age` and
/// `Cache-Control` are computed; the rest are static values.
fn from_entry(entry: &Entry, cache_status: &'static str) -> Response {
    let now = Instant::now();
    let max_age = if entry.stale {
        0
    } else {
        entry.fresh_until.saturating_duration_since(now).as_secs()
    };
    let mut response = Response::new(Body::from(entry.body.clone()));
    let headers = response.headers_mut();
    headers.reserve(4);
    headers.insert(header::CONTENT_TYPE, JSON);
    headers.insert(&CACHE_STATUS, HeaderValue::from_static(cache_status));
    headers.insert(
        header::AGE,
        HeaderValue::from(now.saturating_duration_since(entry.stored_at).as_secs()),
    );
    headers.insert(header::CACHE_CONTROL, cache_control(max_age));
    response
}

fn answer(status: StatusCode, content_type: Option<HeaderValue>, body: Bytes) -> Response {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    if let Some(ct) = content_type {
        headers.insert(header::CONTENT_TYPE, exact_json(ct));
    }
    headers.insert(
        &CACHE_STATUS,
        HeaderValue::from_static("billing-gateway; fwd=miss"),
    );
    headers.insert(header::CACHE_CONTROL, cache_control(0));
    response
}

/// `private`: answers are per organization and only for callers allowed to see them, so no
/// shared cache downstream may keep them.
fn cache_control(max_age: u64) -> HeaderValue {
    if max_age == 0 {
        return HeaderValue::from_static("private, max-age=0");
    }
    HeaderValue::try_from(format!("private, max-age={max_age}"))
        .unwrap_or(HeaderValue::from_static("private, no-store"))
}

static CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Throttle;

    /// What a replica relays of a failed fill is what its own caller got: status, content type,
    /// `Retry-After` and the Scaleway-shaped body.
    #[test]
    fn a_failed_fill_crosses_to_other_replicas_whole() {
        let relayed = |uncached: Uncached| {
            let shared = uncached.to_shared().expect("shareable");
            match Uncached::from_shared(&shared).expect("readable") {
                Uncached::Answer {
                    status,
                    content_type,
                    retry_after,
                    rejection,
                    body,
                } => (status, content_type, retry_after, rejection, body),
                _ => panic!("relayed as an answer"),
            }
        };
        let (status, content_type, retry_after, rejection, body) =
            relayed(Uncached::Failed(Error::TooManyRequests {
                retry_after: 3,
                reason: Throttle::Upstream,
            }));
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(content_type, Some(JSON));
        assert_eq!(retry_after, Some(HeaderValue::from(3u64)));
        // So the replica it is relayed to logs why, too.
        assert_eq!(rejection, Some("upstream_rate_limited"));
        let body: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(body["type"], "too_many_requests");

        let upstream = Bytes::from_static(b"{\"message\":\"line\\none\"}\n");
        let (status, content_type, retry_after, rejection, body) = relayed(Uncached::Answer {
            status: StatusCode::NOT_FOUND,
            content_type: None,
            retry_after: None,
            rejection: None,
            body: upstream.clone(),
        });
        assert_eq!(
            (status, content_type, retry_after, rejection, body),
            (StatusCode::NOT_FOUND, None, None, None, upstream)
        );
        let long = Uncached::TooLong {
            status: StatusCode::OK,
            content_type: None,
            body: Mutex::new(None),
        };
        assert!(long.to_shared().is_none(), "it streams to one request only");
        assert!(Uncached::from_shared(b"not a status\n\n\n\n").is_none());
    }
}
