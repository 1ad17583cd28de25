//! The gateway's own authenticated API: `whoami` and the cache purge (costs are `costs.rs`'s), each an [`Endpoint`]
//! served in the same order as a Billing call (see [`super`]).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::FutureExt;
use serde_json::json;

use super::{Endpoint, no_query};
use crate::billing::Permission;
use crate::cluster::Unavailable;
use crate::error::{Error, json_response};
use crate::policy::{self, Principal};
use crate::state::AppState;

/// `DELETE /gateway/v1/cache`.
pub const PURGE: Endpoint = Endpoint {
    permission: Some(Permission::CachePurge),
    scoped: false,
    query: no_query,
    answer: |ask| purge(ask.state, ask.principal).boxed(),
};

/// `GET /gateway/v1/whoami`.
pub const WHOAMI: Endpoint = Endpoint {
    permission: None,
    scoped: false,
    query: no_query,
    answer: |ask| whoami(ask.state, ask.principal).boxed(),
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
    // The budgets of the projects whose costs the caller may see.
    let budgets: Vec<_> = match policy::projects(principal, Permission::ConsumptionRead) {
        Ok(scope) => state
            .policy
            .load()
            .budgets()
            .into_iter()
            .filter(|(id, _)| scope.as_ref().is_none_or(|s| s.contains(id)))
            .map(|(id, monthly)| json!({"project_id": id, "monthly": monthly}))
            .collect(),
        Err(_) => Vec::new(),
    };
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
            "budgets": budgets,
        }),
    ))
}
