//! The one order every authenticated request is served in, a Billing call and a gateway
//! endpoint alike. [`serve`] runs it top-down:
//!
//! 1. **What is asked**, known before any credential is looked at: a Billing call resolved and
//!    validated against the operation table (unknown path 404, bad parameter 400), or one of the
//!    gateway's own [`Endpoint`]s (the router chose it).
//! 2. **Who asks**: the request's one credential, verified within the unauthenticated allowance
//!    (401, or 503 when that allowance is full).
//! 3. **Whether it may**: for a Billing call the policy's decision and the gateway's
//!    organization filled in (403); for an endpoint, the permission it needs.
//! 4. **The caller's own rate**: only a request it may make spends it (429).
//! 5. **A place in flight** (429 past the caller's share, 503 when none is free), held until the
//!    answer is given or, for a relayed upstream body, until the client has taken it.
//! 6. **The request body**, read only now and never forwarded: an oversized one is refused.
//! 7. **The audit line** of an audited Billing call.
//! 8. **The answer**: a Billing call from the cache or the upstream, streamed; an endpoint from
//!    its function.
//!
//! The operation and the caller are noted in the request's context ([`RequestContext`]) as soon
//! as they are known, so its log line names them whatever follows. Each step returns an [`Error`]
//! that renders as a Scaleway-shaped answer; a 5xx is logged here, once. Nothing reaches the
//! upstream unless every step before it succeeded.

mod cached;
mod costs;
mod forward;
mod gateway;

use cached::cached;
pub use costs::{COST_METRICS, COSTS};
use forward::forward;
pub use gateway::{PURGE, WHOAMI};

use std::sync::Arc;

use axum::Extension;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use futures_util::future::BoxFuture;
use tower_http::timeout::TimeoutError;

use crate::admission::Admission;
use crate::auth::{Authenticator, Credential};
use crate::billing::{Audit, Call, Permission};
use crate::error::{AuthMethod, AuthReason, Error, Failure};
use crate::limits::RateCheck;
use crate::policy::{self, Principal};
use crate::state::AppState;
use crate::telemetry::{RequestContext, RequestInfo};
use crate::upstream::{Answer, Caller};

/// Billing calls take their arguments in the query string; the Python SDK sends `{}` as a body.
const MAX_BODY: usize = 4 * 1024;

/// One of the gateway's own authenticated endpoints: what it requires, and what answers it once
/// every step before has passed. A new endpoint is one of these and one route.
#[derive(Clone, Copy)]
pub struct Endpoint {
    /// The permission it needs; `None`: any authenticated caller.
    pub permission: Option<Permission>,
    /// Whether a project-scoped grant of the permission will do (the answer then shows only
    /// its projects); otherwise the permission must be held organization-wide.
    pub scoped: bool,
    /// Checks the query string (step 1, before any credential is looked at).
    pub query: fn(Option<&str>) -> Result<(), Error>,
    /// The answer, given the caller.
    pub answer: for<'a> fn(Ask<'a>) -> BoxFuture<'a, Result<Response, Error>>,
}

/// What an [`Endpoint`]'s answer is given.
pub struct Ask<'a> {
    /// The app.
    pub state: &'a AppState,
    /// The caller, authenticated and allowed.
    pub principal: &'a Principal,
    /// The query string, already checked by [`Endpoint::query`].
    pub query: Option<&'a str>,
    /// This request's id, sent upstream with any call made for it.
    pub request_id: &'a str,
    /// Its log line's notes (cache result, upstream time).
    pub info: &'a mut RequestInfo,
}

/// The query check of an endpoint that takes no parameter: any is refused, as for a Billing
/// call.
pub fn no_query(query: Option<&str>) -> Result<(), Error> {
    let unknown: Vec<_> = form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .map(|(name, _)| {
            crate::error::ArgError::new(name, "unknown", "this endpoint takes no parameter")
        })
        .collect();
    if unknown.is_empty() {
        Ok(())
    } else {
        Err(Error::InvalidArguments(unknown))
    }
}

/// What an authenticated request asks for.
enum Asked {
    Billing(Call),
    Gateway(Endpoint, Option<String>),
}

/// Serves every `/billing/...` request (and answers 404 for any other unknown path, before
/// looking at any credential).
pub async fn billing(
    State(state): State<AppState>,
    Extension(admission): Extension<Arc<Admission>>,
    context: RequestContext,
    request: Request,
) -> Response {
    let uri = request.uri();
    let asked = crate::billing::parse(request.method().as_str(), uri.path(), uri.query())
        .map(Asked::Billing);
    serve(&state, &admission, &context, asked, request).await
}

/// Serves one of the gateway's own authenticated endpoints.
pub async fn gateway(
    endpoint: Endpoint,
    State(state): State<AppState>,
    Extension(admission): Extension<Arc<Admission>>,
    context: RequestContext,
    request: Request,
) -> Response {
    let query = request.uri().query();
    let asked =
        (endpoint.query)(query).map(|()| Asked::Gateway(endpoint, query.map(str::to_owned)));
    serve(&state, &admission, &context, asked, request).await
}

/// The order, once; the answer or the error's rendering, a 5xx logged with its cause.
async fn serve(
    state: &AppState,
    admission: &Arc<Admission>,
    context: &RequestContext,
    asked: Result<Asked, Error>,
    request: Request,
) -> Response {
    let (parts, body) = request.into_parts();
    let mut info = context.fill();
    // All of the request's Redis work shares one GATEWAY_REDIS_TIMEOUT (contract §11).
    let response = crate::cluster::deadline::request(steps(
        state,
        admission,
        context,
        asked,
        &parts.headers,
        body,
        &mut info,
    ))
    .await
    .unwrap_or_else(IntoResponse::into_response);
    if let Some(Failure(e)) = response.extensions().get::<Failure>() {
        tracing::error!(error = %e, operation = info.operation, "request failed");
    }
    response
}

async fn steps(
    state: &AppState,
    admission: &Arc<Admission>,
    context: &RequestContext,
    asked: Result<Asked, Error>,
    headers: &HeaderMap,
    body: Body,
    info: &mut RequestInfo,
) -> Result<Response, Error> {
    // 1. What is asked.
    let mut asked = asked?;
    if let Asked::Billing(call) = &asked {
        info.operation = Some(call.op.name);
    }
    // 2. Who asks.
    let principal = admission.authenticate(authenticate(state, headers)).await?;
    info.subject = Some(principal.subject.clone());
    // 3. Whether it may.
    match &mut asked {
        Asked::Billing(call) => {
            policy::decide(&principal, call)?;
            call.apply_organization(state.organization_id)?;
        }
        Asked::Gateway(endpoint, _) => match endpoint.permission {
            Some(permission) if endpoint.scoped => {
                policy::projects(&principal, permission)?;
            }
            Some(permission) => policy::require(&principal, permission)?,
            None => {}
        },
    }
    // 4. The caller's own rate. A cacheable call whose principal's lease is on its way from
    // Redis goes on meanwhile (it takes its place in flight): its cache lookup shares the round
    // trip, and nothing is served, nor fetched, before the rate is decided (see `cached`).
    let cacheable = matches!(&asked, Asked::Billing(call) if call.op.cacheable);
    let rate = check_rate(state, &principal, cacheable).await?;
    // 5. A place in flight, until this function returns or a relayed body has been taken
    // (see `forward`).
    let place = admission.admit(&principal.subject)?;
    // 6. The body is read only so an oversized one is refused, not ignored (and a slow one is
    // cut off by the body deadline layer); most calls are GETs without one. Only once the
    // caller is known and allowed: hyper answers `Expect: 100-continue` when the body is first
    // read, and a refused caller must not be invited to send it.
    let rate = match rate {
        // A caller still being counted is decided before its body is read.
        Some(check) if !http_body::Body::is_end_stream(&body) => {
            rate_decided(state, &principal, check.decided().await)?;
            None
        }
        rate => rate,
    };
    read_body(body).await?;
    let request_id = context.request_id();
    let call = match asked {
        // 8. An endpoint's answer.
        Asked::Gateway(endpoint, query) => {
            let ask = Ask {
                state,
                principal: &principal,
                query: query.as_deref(),
                request_id,
                info,
            };
            return (endpoint.answer)(ask).await;
        }
        Asked::Billing(call) => call,
    };
    // 7. The audit line.
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
    // 8. A Billing call's answer.
    if call.op.cacheable {
        // Cached answers are whole in memory: the place goes back when this returns, not when a
        // slow reader has taken the body (an answer too long to store streams, and keeps it
        // like any relayed body).
        return cached(state, &call, request_id, &principal, rate, info, place).await;
    }
    forward(state, &call, request_id, &principal, info, place).await
}

/// Reads a request body to its end, refusing one that is too large, too slow or broken.
async fn read_body(body: Body) -> Result<(), Error> {
    if http_body::Body::is_end_stream(&body) {
        return Ok(());
    }
    // A declared length over the limit is refused before any read, so a client that asked
    // `Expect: 100-continue` is answered 413 without being invited to send the body.
    if http_body::Body::size_hint(&body).lower() > MAX_BODY as u64 {
        return Err(Error::PayloadTooLarge);
    }
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
    Ok(())
}

/// Counts a request against its principal's own rate. With `defer`, a count waiting for a lease
/// from Redis is returned undecided, for [`rate_decided`].
async fn check_rate<'a>(
    state: &'a AppState,
    principal: &'a Principal,
    defer: bool,
) -> Result<Option<RateCheck<'a>>, Error> {
    let check = state
        .limits
        .begin_principal(&principal.subject, principal.rate());
    match check {
        RateCheck::Landing(_) if defer => Ok(Some(check)),
        check => rate_decided(state, principal, check.decided().await).map(|()| None),
    }
}

/// A principal's rate decided: a refusal is counted by class too.
fn rate_decided(
    state: &AppState,
    principal: &Principal,
    decided: Result<(), Error>,
) -> Result<(), Error> {
    decided.inspect_err(|_| {
        state
            .metrics
            .count_class_refusal("principal_rate", principal.class());
    })
}

/// Sends `call` upstream for `principal`, noting the time to the answer (its headers, or its
/// whole body for an error answer) for the request's log line.
async fn send(
    state: &AppState,
    call: &Call,
    request_id: &str,
    principal: &Principal,
    upstream_ms: &mut Option<f64>,
) -> Result<Answer, Error> {
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
async fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<Principal, Error> {
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
