//! The gateway's own authenticated API: `whoami` and the cache purge, each an [`Endpoint`]
//! served in the same order as a Billing call (see [`super`]).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::FutureExt;
use serde_json::json;

use super::Endpoint;
use crate::billing::Permission;
use crate::cluster::Unavailable;
use crate::error::{Error, json_response};
use crate::policy::Principal;
use crate::state::AppState;

/// `DELETE /gateway/v1/cache`.
pub const PURGE: Endpoint = Endpoint {
    permission: Some(Permission::CachePurge),
    answer: |state, principal| purge(state, principal).boxed(),
};

/// `GET /gateway/v1/whoami`.
pub const WHOAMI: Endpoint = Endpoint {
    permission: None,
    answer: |state, principal| whoami(state, principal).boxed(),
};

/// `DELETE /gateway/v1/cache`: empties the cache (`cache:purge`, organization-wide): with Redis,
/// every replica's; `503` when Redis cannot be reached, after emptying this replica's.
async fn purge(state: &AppState, principal: &Principal) -> Result<Response, Error> {
    let subject = &principal.subject;
    Ok(match state.cache.purge().await {
        Ok(None) => {
            tracing::info!(target: "audit", %subject, "cache purged");
            StatusCode::NO_CONTENT.into_response()
        }
        Ok(Some((generation, replicas_notified))) => {
            tracing::info!(target: "audit", %subject, generation, replicas_notified, "cache purged");
            StatusCode::NO_CONTENT.into_response()
        }
        // An organization-wide promise that cannot be kept says so (contract §11).
        Err(Unavailable) => {
            tracing::warn!(target: "audit", %subject, "cache purged on this replica only: Redis cannot be reached");
            let mut response = json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({
                    "message": "purged on this replica only; the shared cache is unreachable",
                    "type": "service_unavailable",
                }),
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(1u64));
            response
        }
    })
}

/// `GET /gateway/v1/whoami`: the caller as the gateway sees it.
async fn whoami(state: &AppState, principal: &Principal) -> Result<Response, Error> {
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
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "subject": principal.subject,
            "organization_id": state.organization_id,
            "grants": grants,
            "permissions": permissions,
            // Its weight in the fair queue for upstream turns, and the class metrics count its
            // upstream calls under.
            "share": principal.share(),
            "class": principal.class(),
        }),
    ))
}
