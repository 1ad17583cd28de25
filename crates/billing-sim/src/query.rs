//! What a request asks, and how a bad one is refused: query-string decoding, the typed
//! parameter readers that validate as the real API does, charge page tokens, and the
//! Scaleway-shaped error answers.
//!
//! This is the upstream's parser, not the gateway's: it decodes and validates on its own (its own
//! percent-decoding, camelCase folding, timestamp, enum and range checks) and shares no code with
//! `billing_gateway::billing` (the gateway's operation table and parser), which it cannot depend
//! on. A request the gateway has already
//! validated is thus checked a second time by independent code, as the real API would check it,
//! so the simulator is an independent oracle for the gateway's own validation: keep it that way
//! rather than reusing the gateway's parser here.

use axum::{
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use base64::{Engine as _, engine::general_purpose};
use serde_json::{Value, json};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};
use uuid::Uuid;

use crate::ORGANIZATION_ID;

/// The error answers, Scaleway-shaped (`message`, `type`, ...), always JSON.
pub(crate) struct ApiError(StatusCode, Value);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        json_response(self.0, &self.1)
    }
}

pub(crate) fn invalid(argument: &str, reason: &str, help: &str) -> ApiError {
    let detail = json!({"argument_name": argument, "reason": reason, "help_message": help});
    let body =
        json!({"details": [detail], "message": "invalid argument(s)", "type": "invalid_arguments"});
    ApiError(StatusCode::BAD_REQUEST, body)
}

pub(crate) fn not_found(resource: &str, id: &str) -> ApiError {
    let body = json!({
        "message": "resource is not found", "resource": resource, "resource_id": id,
        "type": "not_found",
    });
    ApiError(StatusCode::NOT_FOUND, body)
}

/// The JS SDK only parses a body whose content type is exactly `application/json`.
pub(crate) fn json_response(status: StatusCode, body: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// Splits a raw query string into decoded pairs (`+` is a space), keeping repeated keys.
fn parse_query(raw: &str) -> Vec<(String, String)> {
    let decode = |s: &str| {
        let (b, mut out, mut i) = (s.as_bytes(), Vec::with_capacity(s.len()), 0);
        while i < b.len() {
            let hex = b
                .get(i + 1..i + 3)
                .filter(|h| h.iter().all(u8::is_ascii_hexdigit));
            let hex = hex.and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok());
            match (b[i], hex) {
                (b'%', Some(v)) => (out.push(v), i += 3),
                (b'+', _) => (out.push(b' '), i += 1),
                (c, _) => (out.push(c), i += 1),
            };
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    let pairs = raw.split('&').filter(|p| !p.is_empty());
    pairs
        .map(|p| p.split_once('=').unwrap_or((p, "")))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}

/// Query parameters, with camelCase names folded to snake_case (the API accepts both) and empty
/// values treated as absent (Go sends `organization_id=` when it has no default).
pub(crate) struct Query(Vec<(String, String)>);

impl Query {
    pub(crate) fn parse(raw: Option<&str>) -> Self {
        let snake = |k: &str| {
            let under = |c: char| {
                if c.is_ascii_uppercase() {
                    Some('_')
                } else {
                    None
                }
            };
            k.chars()
                .flat_map(|c| under(c).into_iter().chain([c.to_ascii_lowercase()]))
                .collect()
        };
        Query(
            parse_query(raw.unwrap_or(""))
                .into_iter()
                .map(|(k, v)| (snake(&k), v))
                .collect(),
        )
    }
    pub(crate) fn all<'a>(&'a self, key: &str) -> impl Iterator<Item = &'a str> {
        let wanted = move |(k, v): &&'a (String, String)| k == key && !v.is_empty();
        self.0.iter().filter(wanted).map(|(_, v)| v.as_str())
    }
    pub(crate) fn get(&self, key: &str) -> Option<&str> {
        self.all(key).next()
    }
    pub(crate) fn uuids(&self, key: &str) -> Result<Vec<Uuid>, ApiError> {
        let bad = |_| invalid(key, "format", "value must be a valid UUID");
        self.all(key)
            .map(|v| Uuid::parse_str(v).map_err(bad))
            .collect()
    }
    pub(crate) fn uuid(&self, key: &str) -> Result<Option<Uuid>, ApiError> {
        Ok(self.uuids(key)?.first().copied())
    }
    pub(crate) fn time(&self, key: &str) -> Result<Option<OffsetDateTime>, ApiError> {
        let bad = || invalid(key, "format", "value must be an RFC 3339 timestamp");
        self.get(key)
            .map(|v| parse_ts(v).ok_or_else(bad))
            .transpose()
    }
    pub(crate) fn int(&self, key: &str, min: usize, max: usize) -> Result<Option<usize>, ApiError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let n: usize = v
            .parse()
            .map_err(|_| invalid(key, "format", "value must be an integer"))?;
        let help = format!("value must be between {min} and {max}");
        if (min..=max).contains(&n) {
            Ok(Some(n))
        } else {
            Err(invalid(key, "constraint", &help))
        }
    }
    /// An enum parameter; the first allowed value is the default.
    pub(crate) fn choice<'a>(&self, key: &str, allowed: &[&'a str]) -> Result<&'a str, ApiError> {
        let Some(v) = self.get(key) else {
            return Ok(allowed[0]);
        };
        let help = format!("value must be one of {}", allowed.join(", "));
        allowed
            .iter()
            .find(|a| **a == v)
            .copied()
            .ok_or_else(|| invalid(key, "constraint", &help))
    }
    /// Only the simulated organization exists; naming another one is a permission error.
    pub(crate) fn org(&self) -> Result<(), ApiError> {
        match self.uuid("organization_id")? {
            Some(id) if id.to_string() != ORGANIZATION_ID => {
                let details = json!([{"action": "read", "resource": "billing"}]);
                let message = "insufficient permissions";
                let body =
                    json!({"details": details, "message": message, "type": "permissions_denied"});
                Err(ApiError(StatusCode::FORBIDDEN, body))
            }
            _ => Ok(()),
        }
    }
    /// `page` is 1-based; without `page_size` everything comes in one page, as the real API does.
    pub(crate) fn page<T>(&self, items: Vec<T>) -> Result<(Vec<T>, usize), ApiError> {
        let page = self.int("page", 1, i32::MAX as usize)?.unwrap_or(1);
        let total = items.len();
        let size = self.int("page_size", 1, 100)?.unwrap_or(total.max(1));
        let skip = (page - 1).saturating_mul(size);
        Ok((items.into_iter().skip(skip).take(size).collect(), total))
    }
}

/// Accepts what the SDKs send: RFC 3339 (Go, JS) and Python's `2024-01-01 00:00:00+00:00`.
fn parse_ts(raw: &str) -> Option<OffsetDateTime> {
    let s = match raw.split_once(' ') {
        Some((d, t)) if d.len() == 10 => format!("{d}T{t}"),
        _ => raw.to_owned(),
    };
    // An offset's `+` sent unencoded arrives decoded as a space.
    let s = s.replace(' ', "+");
    [s.clone(), format!("{s}Z")]
        .iter()
        .find_map(|c| OffsetDateTime::parse(c, &Rfc3339).ok())
}

pub(crate) fn encode_token(offset: usize) -> String {
    general_purpose::URL_SAFE_NO_PAD.encode(format!("sim:{offset}"))
}

pub(crate) fn decode_token(token: &str) -> Option<usize> {
    let text = String::from_utf8(general_purpose::URL_SAFE_NO_PAD.decode(token).ok()?).ok()?;
    text.strip_prefix("sim:")?.parse().ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn query_strings_decode_like_form_urlencoding() {
        let q = parse_query("category_name=Managed+Databases&x=%2Fa%2fb&k=a&k=b&flag&bad=%zz%4");
        let s = |k: &str, v: &str| (k.to_owned(), v.to_owned());
        let want = [
            ("category_name", "Managed Databases"),
            ("x", "/a/b"),
            ("k", "a"),
        ];
        let want2 = [("k", "b"), ("flag", ""), ("bad", "%zz%4")];
        assert_eq!(
            q,
            want.iter()
                .chain(&want2)
                .map(|(k, v)| s(k, v))
                .collect::<Vec<_>>()
        );
        let q = Query::parse(Some("startDateAfter=2024-01-01T00:00:00Z&organization_id="));
        assert_eq!(q.get("start_date_after"), Some("2024-01-01T00:00:00Z"));
        assert_eq!(q.get("organization_id"), None);
    }

    #[test]
    fn timestamps_in_every_sdk_form() {
        let want = OffsetDateTime::from_unix_timestamp(1_704_067_200).unwrap();
        let forms = [
            "2024-01-01T00:00:00Z",
            "2024-01-01T00:00:00.000Z",
            "2024-01-01 00:00:00",
        ];
        for raw in forms
            .iter()
            .chain(&["2024-01-01 00:00:00+00:00", "2024-01-01T01:00:00 01:00"])
        {
            assert_eq!(parse_ts(raw), Some(want), "{raw}");
        }
        assert_eq!(parse_ts("2024-13-01"), None);
    }
}
