//! The one handler every Billing call goes through:
//! resolve the operation ([`Operation`]) -> authenticate ([`Authenticated`]) -> authorize ->
//! fill the organization -> take a place in flight -> upstream -> relay the answer, streamed.
//!
//! The operation and the caller are extractors: they note what they find in the request's
//! context ([`RequestContext`]), so its log line names them whatever the handler does.
//!
//! Each step returns an [`Error`] that renders as a Scaleway-shaped answer; nothing reaches the
//! upstream unless every step before it succeeded.

mod body;
mod cached;
mod forward;
mod gateway;

use cached::cached;
use forward::forward;
pub use gateway::{purge, whoami};

use std::sync::Arc;

use axum::Extension;
use axum::body::Body;
use axum::extract::{FromRequestParts, State};
use axum::http::HeaderMap;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use tower_http::timeout::TimeoutError;

use crate::admission::Admission;
use crate::auth::{Authenticator, Credential};
use crate::billing::{Audit, Call};
use crate::error::{AuthMethod, AuthReason, Error};
use crate::policy::{self, Principal};
use crate::state::AppState;
use crate::telemetry::{RequestContext, RequestInfo};
use crate::upstream::Caller;

/// Billing calls take their arguments in the query string; the Python SDK sends `{}` as a body.
const MAX_BODY: usize = 4 * 1024;

/// Serves every `/billing/...` request (and answers 404 for any other unknown path, before
/// looking at any credential).
pub async fn handle(
    State(state): State<AppState>,
    Extension(admission): Extension<Arc<Admission>>,
    context: RequestContext,
    Operation(call): Operation,
    Authenticated(principal): Authenticated,
    body: Body,
) -> Response {
    let mut info = context.fill();
    let request_id = context.request_id();
    serve(
        &state, &admission, call, &principal, body, request_id, &mut info,
    )
    .await
    .unwrap_or_else(|e| {
        if e.status().is_server_error() {
            tracing::error!(error = %e, operation = info.operation, "request failed");
        }
        e.into_response()
    })
}

async fn serve(
    state: &AppState,
    admission: &Arc<Admission>,
    mut call: Call,
    principal: &Principal,
    body: Body,
    request_id: &str,
    info: &mut RequestInfo,
) -> Result<Response, Error> {
    policy::decide(principal, &mut call)?;
    call.apply_organization(state.organization_id)?;
    // From here on the request holds a place: until this handler returns, or for a relayed
    // upstream body until the client has taken it (see `forward`). Refused requests never take
    // one.
    let slot = admission.admit(&principal.subject)?;
    // The body is never forwarded; it is read only so an oversized one is refused, not ignored
    // (and a slow one is cut off by the body deadline layer). Most calls are GETs without one:
    // nothing to read then. Read only once the caller is known and allowed: hyper answers
    // `Expect: 100-continue` when the body is first read, and a refused caller must not be
    // invited to send it.
    // A declared length over the limit is refused before any read, so a client that asked
    // `Expect: 100-continue` is answered 413 without being invited to send the body.
    if http_body::Body::size_hint(&body).lower() > MAX_BODY as u64 {
        return Err(Error::PayloadTooLarge);
    }
    if !http_body::Body::is_end_stream(&body) {
        axum::body::to_bytes(body, MAX_BODY).await.map_err(|e| {
            let caused_by = |is: fn(&(dyn std::error::Error + 'static)) -> bool| {
                std::iter::successors(Some(&e as &dyn std::error::Error), |e| e.source()).any(is)
            };
            if caused_by(|e| e.is::<TimeoutError>()) {
                Error::RequestTimeout
            } else if caused_by(|e| e.is::<http_body_util::LengthLimitError>()) {
                Error::PayloadTooLarge
            } else {
                // Broken chunked encoding, or a client gone mid-body.
                Error::MalformedBody
            }
        })?;
    }
    if call.op.audit != Audit::None {
        // The parameter the table audits, cut short: enough to tell calls apart, not to repeat one.
        let (param, prefix) = call.audit_prefix().unzip();
        tracing::info!(
            target: "audit",
            subject = %principal.subject,
            operation = call.op.name,
            invoice_id = call.id.map(|id| id.to_string()),
            param,
            param_prefix = prefix,
            "billing action"
        );
    }
    if call.op.cacheable {
        // Cached answers are whole in memory: the place goes back when the handler returns,
        // not when a slow reader has taken the body (an answer too long to store streams, and
        // keeps it like any relayed body).
        return cached(state, &call, request_id, principal, info, slot).await;
    }
    forward(state, &call, request_id, principal, info, slot).await
}

/// The Billing call the method, path and query name, validated against the operation table
/// (404 for an unknown path, 400 for a bad parameter); noted in the request's context.
pub struct Operation(pub Call);

impl FromRequestParts<AppState> for Operation {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, _: &AppState) -> Result<Operation, Error> {
        let call =
            crate::billing::parse(parts.method.as_str(), parts.uri.path(), parts.uri.query())?;
        if let Some(context) = parts.extensions.get::<RequestContext>() {
            context.record(|info| info.operation = Some(call.op.name));
        }
        Ok(Operation(call))
    }
}

/// The caller: authenticated from its one credential within the unauthenticated allowance
/// ([`Admission::authenticate`]), noted in the request's context, and counted against its own
/// rate. It takes no place in flight: a handler does, once it has refused what it refuses.
pub struct Authenticated(pub Principal);

impl FromRequestParts<AppState> for Authenticated {
    type Rejection = Error;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Authenticated, Error> {
        let admission = parts
            .extensions
            .get::<Arc<Admission>>()
            .ok_or_else(|| Error::Internal("no admission on the request".into()))?;
        let principal = admission
            .authenticate(authenticate(state, &parts.headers))
            .await
            .inspect_err(|e| {
                if e.status().is_server_error() {
                    tracing::error!(error = %e, "authentication failed");
                }
            })?;
        if let Some(context) = parts.extensions.get::<RequestContext>() {
            context.record(|info| info.subject = Some(principal.subject.clone()));
        }
        check_rate(state, &principal).await?;
        Ok(Authenticated(principal))
    }
}

/// Counts a request against its principal's own rate; a refusal is counted by class too.
async fn check_rate(state: &AppState, principal: &Principal) -> Result<(), Error> {
    state
        .limits
        .check_principal(&principal.subject, principal.rate())
        .await
        .inspect_err(|_| {
            state
                .metrics
                .count_class_refusal("principal_rate", principal.class());
        })
}

/// Sends `call` upstream for `principal`, noting the time to the answer's headers for the
/// request's log line.
async fn send(
    state: &AppState,
    call: &Call,
    request_id: &str,
    principal: &Principal,
    upstream_ms: &mut Option<f64>,
) -> Result<reqwest::Response, Error> {
    let started = std::time::Instant::now();
    let result = state
        .upstream
        .send(call, request_id, caller(principal))
        .await;
    *upstream_ms = Some(started.elapsed().as_secs_f64() * 1000.0);
    result
}

/// Who an upstream call is for, in the fair queue and in metrics. Built only when a call goes
/// upstream: a cache hit never asks.
fn caller(principal: &Principal) -> Caller<'_> {
    Caller {
        id: &principal.subject,
        share: principal.share(),
        class: principal.class(),
    }
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
