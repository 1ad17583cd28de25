//! Calls that are never cached (invoices, downloads, coupons, charges): sent upstream and
//! relayed as they come, body streamed.

use std::time::Instant;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::Response;

use crate::billing::Call;
use crate::error::{Error, JSON};
use crate::policy::Principal;
use crate::state::AppState;
use crate::telemetry::RequestInfo;

pub(super) async fn forward(
    state: &AppState,
    call: &Call,
    request_id: &str,
    principal: &Principal,
    info: &mut RequestInfo,
) -> Result<Response, Error> {
    let started = Instant::now();
    let result = state
        .upstream
        .send(call, request_id, super::caller(principal))
        .await;
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

pub(super) fn exact_json(content_type: HeaderValue) -> HeaderValue {
    let is_json = content_type.to_str().is_ok_and(|s| {
        s.trim_start()
            .to_ascii_lowercase()
            .starts_with("application/json")
    });
    if is_json { JSON } else { content_type }
}
