//! The one handler every Billing call goes through:
//! resolve the operation -> authenticate -> authorize -> fill the organization -> upstream ->
//! relay the answer, streamed.
//!
//! Each step returns an [`Error`] that renders as a Scaleway-shaped answer; nothing reaches the
//! upstream unless every step before it succeeded.

mod cached;
mod forward;
mod gateway;

use cached::cached;
use forward::forward;
pub use gateway::{purge, whoami};

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};

use crate::auth::{Authenticator, Credential};
use crate::error::{AuthMethod, AuthReason, Error};
use crate::policy::{self, Principal};
use crate::state::AppState;
use crate::telemetry::{RequestId, RequestInfo};
use crate::upstream::Caller;

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
    let mut call =
        crate::billing::parse(parts.method.as_str(), parts.uri.path(), parts.uri.query())?;
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
        return cached(state, &call, &request_id, &principal, info).await;
    }
    forward(state, &call, &request_id, &principal, info).await
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
