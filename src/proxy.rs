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
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::app::AppState;
use crate::auth::{Authenticator, Credential};
use crate::error::{AuthMethod, AuthReason, Error, JSON, json_response};
use crate::operations::{self, Call};
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
    state.limits.check_principal(&principal.subject)?;
    // The body is never forwarded; it is read only so an oversized one is refused, not ignored.
    axum::body::to_bytes(body, MAX_BODY)
        .await
        .map_err(|_| Error::PayloadTooLarge)?;
    policy::decide(&principal, &mut call)?;
    call.apply_organization(state.config.upstream.organization_id)?;
    if call.op.audited {
        tracing::info!(
            target: "audit",
            subject = %principal.subject,
            operation = call.op.name,
            invoice_id = call.id.map(|id| id.to_string()),
            code = call.get("code"),
            "billing action"
        );
    }
    let request_id = parts
        .extensions
        .get::<RequestId>()
        .map(|r| r.0.clone())
        .unwrap_or_else(|| Arc::from("-"));
    forward(state, &call, &request_id, info).await
}

/// The caller's identity with its grants, from its one credential.
pub async fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<Principal, Error> {
    match Authenticator::credential(headers)? {
        Credential::Jwt(token) => {
            let identity = state.auth.verify_jwt(token).await?;
            let grants = state.policy.grants_for_claims(&identity.claims);
            Ok(Principal {
                subject: identity.subject,
                grants,
            })
        }
        Credential::Key(_) => Err(Error::Unauthenticated {
            method: AuthMethod::ApiKey,
            reason: AuthReason::NotFound,
            message: "unknown gateway key",
        }),
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
    state.metrics.observe_upstream(call.op.name, elapsed);
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
                axum::http::StatusCode::OK,
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
