//! The one handler every Billing call goes through:
//! resolve the operation -> authenticate -> authorize -> fill the organization -> upstream ->
//! relay the answer, streamed.
//!
//! Each step returns an [`Error`] that renders as a Scaleway-shaped answer; nothing reaches the
//! upstream unless every step before it succeeded.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::json;
use time::OffsetDateTime;

use crate::app::AppState;
use crate::auth::{Authenticator, Credential};
use crate::cache::{Cache, Entry, Fetch, Outcome};
use crate::error::{AuthMethod, AuthReason, Error, JSON, json_response};
use crate::operations::{self, Call, Permission};
use crate::policy::{self, Principal};
use crate::telemetry::{RequestId, RequestInfo};

/// Billing calls take their arguments in the query string; the Python SDK sends `{}` as a body.
const MAX_BODY: usize = 4 * 1024;

/// Serves every `/billing/...` request (and answers 404 for any other unknown path).
pub async fn handle(State(state): State<AppState>, req: Request) -> Response {
    let mut info = RequestInfo::default();
    let result = serve(&state, req, &mut info).await;
    let mut response = result.unwrap_or_else(|e| {
        if e.status().is_server_error() {
            tracing::error!(error = %e, operation = info.operation, "request failed");
        }
        e.into_response()
    });
    response.extensions_mut().insert(info);
    response
}

async fn serve(state: &AppState, req: Request, info: &mut RequestInfo) -> Result<Response, Error> {
    let (parts, body) = req.into_parts();
    let mut call = operations::parse(parts.method.as_str(), parts.uri.path(), parts.uri.query())?;
    info.operation = Some(call.op.name);
    let principal = authenticate(state, &parts.headers).await?;
    info.subject = Some(principal.subject.clone());
    state
        .limits
        .check_principal(&principal.subject, principal.rate())?;
    // The body is never forwarded; it is read only so an oversized one is refused, not ignored
    // (and a trickled one is cut off by the body timeout layer). Most calls are GETs without
    // one: nothing to read then.
    if !http_body::Body::is_end_stream(&body) {
        axum::body::to_bytes(body, MAX_BODY).await.map_err(|e| {
            let too_large =
                std::iter::successors(Some(&e as &dyn std::error::Error), |e| e.source())
                    .any(|e| e.is::<http_body_util::LengthLimitError>());
            if too_large {
                Error::PayloadTooLarge
            } else {
                Error::RequestTimeout
            }
        })?;
    }
    policy::decide(&principal, &mut call)?;
    call.apply_organization(state.config.upstream.organization_id)?;
    if call.op.audited {
        tracing::info!(
            target: "audit",
            subject = %principal.subject,
            operation = call.op.name,
            invoice_id = call.id.map(|id| id.to_string()),
            // Enough of a coupon code to tell redemptions apart; not enough to redeem it again.
            code_prefix = call.get("code").map(|c| c.chars().take(4).collect::<String>()),
            "billing action"
        );
    }
    let request_id = parts
        .extensions
        .get::<RequestId>()
        .map(|r| r.0.clone())
        .unwrap_or_else(|| Arc::from("-"));
    if call.op.cacheable {
        return cached(state, &call, &request_id, info).await;
    }
    forward(state, &call, &request_id, info).await
}

/// The caller's identity with its grants, from its one credential.
pub async fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<Principal, Error> {
    match Authenticator::credential(headers)? {
        Credential::Jwt(token) => {
            let identity = state.auth.verify_jwt(token).await?;
            Ok(state
                .policy
                .load()
                .principal_for_claims(identity.subject, &identity.claims))
        }
        Credential::Key(key) => {
            state
                .policy
                .load()
                .principal_for_key(&key)
                .ok_or(Error::Unauthenticated {
                    method: AuthMethod::ApiKey,
                    reason: AuthReason::NotFound,
                    message: "unknown gateway key",
                })
        }
    }
}

async fn forward(
    state: &AppState,
    call: &Call,
    request_id: &str,
    info: &mut RequestInfo,
) -> Result<Response, Error> {
    let started = Instant::now();
    let result = state.upstream.send(call, request_id).await;
    let elapsed = started.elapsed().as_secs_f64();
    info.upstream_ms = Some(elapsed * 1000.0);
    let upstream = result?;

    let mut response = Response::builder().status(upstream.status());
    let headers = response
        .headers_mut()
        .ok_or_else(|| Error::Internal("response builder failed".into()))?;
    relay_headers(upstream.headers(), headers);
    response
        .body(Body::from_stream(upstream.bytes_stream()))
        .map_err(|e| Error::Internal(e.to_string()))
}

/// An upstream answer the cache does not store, shared by every request that waited for it.
enum Uncached {
    Answer {
        status: StatusCode,
        content_type: Option<HeaderValue>,
        body: Bytes,
    },
    Failed(Error),
}

/// Cacheable operations: authorization has already happened, so the entry is shared only with
/// callers allowed to make this exact upstream request.
async fn cached(
    state: &AppState,
    call: &Call,
    request_id: &str,
    info: &mut RequestInfo,
) -> Result<Response, Error> {
    let ttl = state.cache.ttl_for(call, OffsetDateTime::now_utc());
    let upstream_ms = &mut info.upstream_ms;
    let fetch = async {
        let started = Instant::now();
        let result = state.upstream.send(call, request_id).await;
        let elapsed = started.elapsed().as_secs_f64();
        *upstream_ms = Some(elapsed * 1000.0);
        let upstream = match result {
            Ok(upstream) => upstream,
            Err(e) => return Fetch::Failed(Uncached::Failed(e)),
        };
        let status = upstream.status();
        let content_type = upstream.headers().get(header::CONTENT_TYPE).cloned();
        let body = match upstream.bytes().await {
            Ok(body) => body,
            Err(e) => return Fetch::Failed(Uncached::Failed(Error::BadGateway(e.to_string()))),
        };
        match status {
            StatusCode::OK => Fetch::Store(body),
            s if s.is_server_error() => Fetch::Failed(Uncached::Answer {
                status,
                content_type,
                body,
            }),
            _ => Fetch::Pass(Uncached::Answer {
                status,
                content_type,
                body,
            }),
        }
    };
    let (result, response) = match state
        .cache
        .get_or_fetch(&Cache::key(call), ttl, fetch)
        .await
    {
        Outcome::Hit(entry) => ("hit", from_entry(&entry, "billing-gateway; hit")),
        Outcome::Stored(entry) => (
            "stored",
            from_entry(&entry, "billing-gateway; fwd=miss; stored"),
        ),
        // RFC 9211 `collapsed`: this request waited for another's identical fetch.
        Outcome::Coalesced(entry) => (
            "coalesced",
            from_entry(&entry, "billing-gateway; fwd=miss; collapsed"),
        ),
        Outcome::Stale(entry) => ("stale", from_entry(&entry, "billing-gateway; fwd=stale")),
        Outcome::TooLarge(body) => ("miss", answer(StatusCode::OK, Some(JSON), body)),
        Outcome::Passed(uncached) => match &*uncached {
            Uncached::Answer {
                status,
                content_type,
                body,
            } => ("miss", answer(*status, content_type.clone(), body.clone())),
            Uncached::Failed(e) => {
                if e.status().is_server_error() {
                    tracing::error!(error = %e, operation = call.op.name, "upstream failed, no stale answer to serve");
                }
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

/// `DELETE /gateway/v1/cache`: empties the cache (`cache:purge`, organization-wide).
pub async fn purge(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let mut info = RequestInfo::default();
    let result = async {
        let principal = authenticate(&state, &headers).await?;
        info.subject = Some(principal.subject.clone());
        policy::require(&principal, Permission::CachePurge)?;
        state.cache.purge();
        tracing::info!(target: "audit", subject = %principal.subject, "cache purged");
        Ok::<_, Error>(StatusCode::NO_CONTENT.into_response())
    }
    .await;
    let mut response = result.unwrap_or_else(IntoResponse::into_response);
    response.extensions_mut().insert(info);
    response
}

/// Copies the few upstream headers a caller needs; JSON is relabelled exactly
/// `application/json` because the JS SDK compares the whole string.
fn relay_headers(from: &HeaderMap, to: &mut HeaderMap) {
    if let Some(ct) = from.get(header::CONTENT_TYPE) {
        let is_json = ct.to_str().is_ok_and(|s| {
            s.trim_start()
                .to_ascii_lowercase()
                .starts_with("application/json")
        });
        to.insert(
            header::CONTENT_TYPE,
            if is_json { JSON } else { ct.clone() },
        );
    }
    for name in [header::CONTENT_LENGTH, header::CONTENT_DISPOSITION] {
        if let Some(v) = from.get(&name) {
            to.insert(name, v.clone());
        }
    }
}

fn exact_json(content_type: HeaderValue) -> HeaderValue {
    let is_json = content_type.to_str().is_ok_and(|s| {
        s.trim_start()
            .to_ascii_lowercase()
            .starts_with("application/json")
    });
    if is_json { JSON } else { content_type }
}

/// `GET /gateway/v1/whoami`: the caller as the gateway sees it.
pub async fn whoami(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let mut info = RequestInfo::default();
    let mut response = match authenticate(&state, &headers).await {
        Ok(principal) => {
            info.subject = Some(principal.subject.clone());
            let grants: Vec<_> = principal
                .grants
                .iter()
                .map(|g| {
                    json!({
                        "roles": g.roles.as_ref(),
                        "permissions": g.permissions.iter().map(|p| p.name()).collect::<Vec<_>>(),
                        "projects": g.projects.as_deref(),
                    })
                })
                .collect();
            let permissions: Vec<_> = principal.permissions().iter().map(|p| p.name()).collect();
            json_response(
                StatusCode::OK,
                &json!({
                    "subject": principal.subject,
                    "organization_id": state.config.upstream.organization_id,
                    "grants": grants,
                    "permissions": permissions,
                }),
            )
        }
        Err(e) => e.into_response(),
    };
    response.extensions_mut().insert(info);
    response
}
