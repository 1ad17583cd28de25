//! The gateway's own authenticated API: `whoami` and the cache purge.

use std::sync::Arc;

use axum::Extension;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::Authenticated;
use crate::admission::Admission;
use crate::billing::Permission;
use crate::cluster::Unavailable;
use crate::error::{Error, json_response};
use crate::policy::{self};
use crate::state::AppState;

/// `DELETE /gateway/v1/cache`: empties the cache (`cache:purge`, organization-wide): with Redis,
/// every replica's; `503` when Redis cannot be reached, after emptying this replica's.
pub async fn purge(
    State(state): State<AppState>,
    Extension(admission): Extension<Arc<Admission>>,
    Authenticated(principal): Authenticated,
) -> Result<Response, Error> {
    let _slot = admission.admit(&principal.subject)?;
    policy::require(&principal, Permission::CachePurge)?;
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
pub async fn whoami(
    State(state): State<AppState>,
    Extension(admission): Extension<Arc<Admission>>,
    Authenticated(principal): Authenticated,
) -> Result<Response, Error> {
    let _slot = admission.admit(&principal.subject)?;
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
