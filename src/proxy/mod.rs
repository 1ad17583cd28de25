//! The one handler every Billing call goes through:
//! resolve the operation -> authenticate -> take a place in flight -> authorize -> fill the
//! organization -> upstream -> relay the answer, streamed.
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
use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use tower_http::timeout::TimeoutError;

use crate::admission::{Admission, Slot};
use crate::auth::{Authenticator, Credential};
use crate::billing::{Audit, Call};
use crate::error::{AuthMethod, AuthReason, Error};
use crate::policy::{self, Principal};
use crate::state::AppState;
use crate::telemetry::{RequestId, RequestInfo};
use crate::upstream::Caller;

/// Billing calls take their arguments in the query string; the Python SDK sends `{}` as a body.
const MAX_BODY: usize = 4 * 1024;

/// Serves every `/billing/...` request (and answers 404 for any other unknown path).
pub async fn handle(
    State(state): State<AppState>,
    Extension(admission): Extension<Arc<Admission>>,
    req: Request,
) -> Response {
    let mut info = RequestInfo::default();
    let result = serve(&state, &admission, req, &mut info).await;
    let mut response = result.unwrap_or_else(|e| {
        if e.status().is_server_error() {
            tracing::error!(error = %e, operation = info.operation, "request failed");
        }
        e.into_response()
    });
    response.extensions_mut().insert(info);
    response
}

async fn serve(
    state: &AppState,
    admission: &Arc<Admission>,
    req: Request,
    info: &mut RequestInfo,
) -> Result<Response, Error> {
    let (parts, body) = req.into_parts();
    let mut call =
        crate::billing::parse(parts.method.as_str(), parts.uri.path(), parts.uri.query())?;
    info.operation = Some(call.op.name);
    let principal = admission
        .authenticate(authenticate(state, &parts.headers))
        .await?;
    info.subject = Some(principal.subject.clone());
    check_rate(state, &principal).await?;
    policy::decide(&principal, &mut call)?;
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
    let request_id = parts
        .extensions
        .get::<RequestId>()
        .map(|r| r.0.clone())
        .unwrap_or_else(|| Arc::from("-"));
    if call.op.cacheable {
        // Cached answers are whole in memory: the place goes back when the handler returns,
        // not when a slow reader has taken the body (an answer too long to store streams, and
        // keeps it like any relayed body).
        return cached(state, &call, &request_id, &principal, info, slot).await;
    }
    forward(state, &call, &request_id, &principal, info, slot).await
}

/// The caller of a gateway endpoint (whoami, purge), authenticated within the unauthenticated
/// allowance, counted against its own rate like any Billing call, and its place in flight.
pub(crate) async fn admit(
    state: &AppState,
    admission: &Arc<Admission>,
    headers: &HeaderMap,
) -> Result<(Principal, Slot), Error> {
    let principal = admission.authenticate(authenticate(state, headers)).await?;
    check_rate(state, &principal).await?;
    let slot = admission.admit(&principal.subject)?;
    Ok((principal, slot))
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
