//! Calls that are never cached (invoices, downloads, coupons, charges): sent upstream and
//! relayed as they come, body streamed; an error answer comes from the upstream client read
//! whole and scrubbed of the secret key.

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;

use crate::admission::Place;
use crate::billing::Call;
use crate::error::{Error, JSON};
use crate::policy::Principal;
use crate::state::AppState;
use crate::telemetry::RequestInfo;
use crate::upstream::{Answer, Content};

pub(super) async fn forward(
    state: &AppState,
    call: &Call,
    request_id: &str,
    principal: &Principal,
    info: &mut RequestInfo,
    place: Place,
) -> Result<Response, Error> {
    let upstream = super::send(state, call, request_id, principal, &mut info.upstream_ms).await?;
    relay(call, upstream, place)
}

/// The upstream's answer as the caller gets it: its status, the few headers the caller needs, and
/// its body streamed as it comes — or, for an error answer, the whole body already scrubbed of
/// the secret key.
fn relay(call: &Call, upstream: Answer, place: Place) -> Result<Response, Error> {
    let status = upstream.status;
    let mut response = Response::builder().status(status);
    let headers = response
        .headers_mut()
        .ok_or_else(|| Error::Internal("response builder failed".into()))?;
    relay_headers(call, status, &upstream.headers, headers);
    // A success streams: the place (and the upstream connection) is held while the client takes
    // the body, and given back if it stops taking it. An error answer is small, read whole and
    // scrubbed of the key upstream.
    let body = match upstream.body {
        Content::Unread(body) => place.relay(body.into_stream()),
        Content::Whole(body) => Body::from(body),
    };
    response
        .body(body)
        .map_err(|e| Error::Internal(e.to_string()))
}

/// Copies the few upstream headers a caller needs; JSON is relabelled exactly
/// `application/json` because the JS SDK compares the whole string. An error answer's length is
/// its scrubbed body's, measured again.
fn relay_headers(call: &Call, status: StatusCode, from: &HeaderMap, to: &mut HeaderMap) {
    if let Some(ct) = from.get(header::CONTENT_TYPE) {
        to.insert(header::CONTENT_TYPE, exact_json(ct.clone()));
    }
    if status.is_success()
        && let Some(v) = from.get(header::CONTENT_LENGTH)
    {
        to.insert(header::CONTENT_LENGTH, v.clone());
    }
    if is_file_download(call, status, from)
        && let Some(v) = from.get(header::CONTENT_DISPOSITION)
    {
        to.insert(header::CONTENT_DISPOSITION, v.clone());
    }
}

/// Whether an answer is a file download: the raw bytes of a file (`dl`), answered, in a type
/// other than JSON. Only a download carries the upstream's `Content-Disposition`: on a JSON
/// answer it would make a browser save the answer as a file.
fn is_file_download(call: &Call, status: StatusCode, headers: &HeaderMap) -> bool {
    status.is_success()
        && call.wants_raw_file()
        && !headers.get(header::CONTENT_TYPE).is_some_and(is_json)
}

fn is_json(content_type: &HeaderValue) -> bool {
    content_type.to_str().is_ok_and(|s| {
        s.trim_start()
            .to_ascii_lowercase()
            .starts_with("application/json")
    })
}

pub(super) fn exact_json(content_type: HeaderValue) -> HeaderValue {
    if is_json(&content_type) {
        JSON
    } else {
        content_type
    }
}
