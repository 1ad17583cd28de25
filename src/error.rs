//! The one error type of a request and its one rendering: Scaleway-shaped JSON.
//!
//! Every answer the gateway produces itself (as opposed to passing an upstream answer through)
//! is built here, so the SDKs' error parsers (which call `.json()` on every status >= 400) never
//! meet HTML or plain text. 4xx bodies say what was wrong; 5xx bodies are opaque: the response
//! carries the error ([`Failure`]) so that the one place that ends an authenticated request
//! (the proxy's pipeline) logs its cause, once.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::json;

/// Why one query or path argument was refused, in Scaleway's `details[]` shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ArgError {
    /// The argument's name as the caller sent it.
    pub argument_name: String,
    /// `required`, `format`, `constraint` or `unknown`, as Scaleway uses them.
    pub reason: &'static str,
    /// A human hint; never echoes a credential.
    pub help_message: String,
}

impl ArgError {
    /// Builds one `details[]` entry.
    pub fn new(name: impl Into<String>, reason: &'static str, help: impl Into<String>) -> Self {
        Self {
            argument_name: name.into(),
            reason,
            help_message: help.into(),
        }
    }
}

/// Which kind of credential failed, as Scaleway's 401 `method` field names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    /// A JWT, in `Authorization: Bearer` or `X-Auth-Token`.
    Jwt,
    /// A gateway key (a UUID in `X-Auth-Token`).
    ApiKey,
}

/// Why authentication failed, as Scaleway's 401 `reason` field names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthReason {
    /// Malformed, badly signed, wrong algorithm, wrong issuer or audience.
    InvalidArgument,
    /// Past `exp`.
    Expired,
    /// No credential, or an unknown gateway key.
    NotFound,
}

/// Which limit a 429 comes from: the rejection's reason in logs and metrics, so an operator can
/// tell a greedy caller from a spent upstream budget or an upstream that pushed back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Throttle {
    /// The caller went past its own per-principal rate.
    Principal,
    /// The upstream budget is spent and the wait for a turn would be too long.
    UpstreamBudget,
    /// The gateway is backing off after an upstream 429 and does not call it meanwhile.
    UpstreamBackoff,
    /// The upstream itself answered 429.
    Upstream,
    /// The caller already has as many requests in flight as one principal may.
    PrincipalInFlight,
}

/// Everything that can end a request early. Each variant maps to exactly one status.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The path names no operation the gateway serves.
    #[error("resource is not found")]
    NotFound,
    /// The path exists but not with this method; `allow` lists the methods it has, for the
    /// `Allow` header RFC 9110 requires on a 405 (`GET, HEAD`).
    #[error("method not allowed")]
    MethodNotAllowed {
        /// The `Allow` header's value; empty when the router sets the header itself.
        allow: String,
    },
    /// Query or path arguments failed validation; nothing was sent upstream.
    #[error("invalid argument(s)")]
    InvalidArguments(Vec<ArgError>),
    /// The request body is larger than any Billing call needs.
    #[error("request body too large")]
    PayloadTooLarge,
    /// The credential is missing or was refused.
    #[error("{message}")]
    Unauthenticated {
        /// Which credential kind failed.
        method: AuthMethod,
        /// Why.
        reason: AuthReason,
        /// What the caller should fix (never the credential itself).
        message: &'static str,
    },
    /// The caller is known but its grants do not cover the request.
    #[error("{message}")]
    PermissionDenied {
        /// Which permission or scope was missing.
        message: String,
        /// `read` or `write`, as Scaleway's `details[].action`.
        action: &'static str,
        /// The resource family, as Scaleway's `details[].resource`.
        resource: &'static str,
    },
    /// The request headers are larger, or more numerous, than any Billing call needs.
    #[error("request headers too large")]
    HeadersTooLarge,
    /// The request body could not be read: broken chunked encoding, or the client went away
    /// while sending it.
    #[error("malformed request body")]
    MalformedBody,
    /// The request target (path and query) is longer than any Billing call needs.
    #[error("request target too long")]
    UriTooLong,
    /// The request body trickled in too slowly: a slow-loris on the body.
    #[error("request body timed out")]
    RequestTimeout,
    /// Too many requests, from the caller or from the upstream; retry after that many seconds.
    #[error("too many requests")]
    TooManyRequests {
        /// Seconds until a retry makes sense.
        retry_after: u64,
        /// Which limit was hit.
        reason: Throttle,
    },
    /// The upstream could not be reached, or answered in a way the gateway will not relay.
    #[error("upstream unavailable: {0}")]
    BadGateway(String),
    /// The upstream did not answer within `GATEWAY_UPSTREAM_TIMEOUT`.
    #[error("upstream timed out")]
    GatewayTimeout,
    /// The gateway cannot serve right now (no signing keys, shutting down).
    #[error("service unavailable: {0}")]
    Unavailable(String),
    /// Too many requests in flight: shed at once rather than queued without bound.
    #[error("overloaded")]
    Overloaded,
    /// Too many credential checks waiting (for the identity provider's keys) at once.
    #[error("too many unauthenticated requests waiting")]
    UnauthenticatedOverload,
    /// A bug or an unexpected failure; the cause is logged, never shown.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// The HTTP status this error answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            Error::NotFound => StatusCode::NOT_FOUND,
            Error::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Error::InvalidArguments(_) | Error::MalformedBody => StatusCode::BAD_REQUEST,
            Error::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Error::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Error::UriTooLong => StatusCode::URI_TOO_LONG,
            Error::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Error::Unauthenticated { .. } => StatusCode::UNAUTHORIZED,
            Error::PermissionDenied { .. } => StatusCode::FORBIDDEN,
            Error::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            Error::BadGateway(_) => StatusCode::BAD_GATEWAY,
            Error::GatewayTimeout => StatusCode::GATEWAY_TIMEOUT,
            Error::Unavailable(_) | Error::Overloaded | Error::UnauthenticatedOverload => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A short label for logs and metrics (`reason` of a rejection).
    pub fn kind(&self) -> &'static str {
        match self {
            Error::NotFound => "not_found",
            Error::MethodNotAllowed { .. } => "method_not_allowed",
            Error::InvalidArguments(_) => "invalid_arguments",
            Error::MalformedBody => "malformed_body",
            Error::PayloadTooLarge => "payload_too_large",
            Error::HeadersTooLarge => "headers_too_large",
            Error::UriTooLong => "uri_too_long",
            Error::RequestTimeout => "request_timeout",
            // One reason per way authentication fails, so dashboards can tell expired tokens
            // (a client bug) from bad signatures (an attack or a misconfiguration), and a
            // gateway key that names no one (a revoked key still in use, or guessing) from no
            // credential at all.
            Error::Unauthenticated {
                method: AuthMethod::ApiKey,
                reason: AuthReason::NotFound,
                ..
            } => "authentication_unknown_key",
            Error::Unauthenticated { reason, .. } => match reason {
                AuthReason::InvalidArgument => "authentication_invalid",
                AuthReason::Expired => "authentication_expired",
                AuthReason::NotFound => "authentication_missing",
            },
            Error::PermissionDenied { .. } => "permissions_denied",
            Error::TooManyRequests { reason, .. } => match reason {
                Throttle::Principal => "principal_rate",
                Throttle::UpstreamBudget => "upstream_budget",
                Throttle::UpstreamBackoff => "upstream_backoff",
                Throttle::Upstream => "upstream_rate_limited",
                Throttle::PrincipalInFlight => "principal_in_flight",
            },
            Error::BadGateway(_) => "bad_gateway",
            Error::GatewayTimeout => "gateway_timeout",
            Error::Unavailable(_) => "unavailable",
            Error::Overloaded => "overloaded",
            Error::UnauthenticatedOverload => "unauthenticated_overload",
            Error::Internal(_) => "internal",
        }
    }

    /// The Scaleway-shaped body of this error's answer.
    pub(crate) fn body(&self) -> serde_json::Value {
        match self {
            Error::NotFound => json!({"message": "resource is not found", "type": "not_found"}),
            Error::MethodNotAllowed { .. } => {
                json!({"message": "method not allowed on this resource", "type": "method_not_allowed"})
            }
            Error::InvalidArguments(details) => {
                json!({"details": details, "message": "invalid argument(s)", "type": "invalid_arguments"})
            }
            // Scaleway's own shape for a request it cannot make sense of; the SDKs surface its
            // message.
            Error::MalformedBody => json!({
                "message": "the request body could not be read (malformed chunked encoding?)",
                "type": "invalid_request_error",
            }),
            Error::PayloadTooLarge => json!({
                "help_message": "Billing API calls take their arguments in the query string",
                "message": "request body too large",
                "type": "payload_too_large",
            }),
            Error::HeadersTooLarge => json!({
                "message": "request headers too large",
                "type": "request_header_fields_too_large",
            }),
            Error::UriTooLong => json!({
                "help_message": "Billing API paths and query strings are short",
                "message": "request target too long",
                "type": "uri_too_long",
            }),
            Error::RequestTimeout => json!({
                "message": "the request body did not arrive in time",
                "type": "request_timeout",
            }),
            Error::Unauthenticated {
                method,
                reason,
                message,
            } => json!({
                "message": message,
                "method": match method { AuthMethod::Jwt => "jwt", AuthMethod::ApiKey => "api_key" },
                "reason": match reason {
                    AuthReason::InvalidArgument => "invalid_argument",
                    AuthReason::Expired => "expired",
                    AuthReason::NotFound => "not_found",
                },
                "type": "denied_authentication",
            }),
            Error::PermissionDenied {
                message,
                action,
                resource,
            } => json!({
                "details": [{"action": action, "resource": resource}],
                "message": message,
                "type": "permissions_denied",
            }),
            Error::TooManyRequests { retry_after, .. } => json!({
                "help_message": format!("retry after {retry_after} s"),
                "message": "too many requests",
                "reset_seconds": retry_after,
                "type": "too_many_requests",
            }),
            // 5xx: opaque on purpose; the cause goes to the log.
            Error::BadGateway(_) => {
                json!({"message": "the Billing API could not be reached", "type": "bad_gateway"})
            }
            Error::GatewayTimeout => {
                json!({"message": "the Billing API did not answer in time", "type": "gateway_timeout"})
            }
            Error::Unavailable(_) | Error::Overloaded | Error::UnauthenticatedOverload => {
                json!({"message": "service temporarily unavailable", "type": "service_unavailable"})
            }
            Error::Internal(_) => json!({"message": "internal error", "type": "internal_error"}),
        }
    }
}

/// `Content-Type: application/json`, exactly: the JS SDK compares the whole string.
pub const JSON: HeaderValue = HeaderValue::from_static("application/json");

/// A JSON answer with the exact content type every SDK accepts.
pub fn json_response(status: StatusCode, body: &serde_json::Value) -> Response {
    (status, [(header::CONTENT_TYPE, JSON)], body.to_string()).into_response()
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let mut response = json_response(self.status(), &self.body());
        let headers = response.headers_mut();
        match &self {
            Error::Unauthenticated { .. } => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(r#"Bearer realm="billing-gateway""#),
                );
            }
            Error::TooManyRequests { retry_after, .. } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after));
            }
            Error::Unavailable(_) | Error::Overloaded | Error::UnauthenticatedOverload => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(1u64));
            }
            Error::MethodNotAllowed { allow } if !allow.is_empty() => {
                if let Ok(allow) = HeaderValue::from_str(allow) {
                    headers.insert(header::ALLOW, allow);
                }
            }
            _ => {}
        }
        response.extensions_mut().insert(ErrorKind(self.kind()));
        if self.status().is_server_error() {
            response.extensions_mut().insert(Failure(self));
        }
        response
    }
}

/// Left on a 5xx response built from an [`Error`]: the cause its opaque body hides, for the log.
#[derive(Debug, Clone)]
pub struct Failure(pub Error);

/// Left on a response built from an [`Error`], so the request log can name the rejection.
#[derive(Debug, Clone, Copy)]
pub struct ErrorKind(pub &'static str);

/// Seconds for a `Retry-After` header: whole, rounded up, at least 1 (0 would invite a retry
/// storm).
pub fn retry_after_secs(wait: std::time::Duration) -> u64 {
    wait.as_secs()
        .saturating_add(u64::from(wait.subsec_nanos() > 0))
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_secs(std::time::Duration::ZERO), 1);
        assert_eq!(retry_after_secs(std::time::Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(std::time::Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(std::time::Duration::from_secs(3)), 3);
    }

    #[test]
    fn every_error_maps_to_its_status_and_a_scaleway_type() {
        let cases: Vec<(Error, u16, &str)> = vec![
            (Error::NotFound, 404, "not_found"),
            (
                Error::MethodNotAllowed {
                    allow: "GET, HEAD".into(),
                },
                405,
                "method_not_allowed",
            ),
            (Error::InvalidArguments(vec![]), 400, "invalid_arguments"),
            (Error::MalformedBody, 400, "invalid_request_error"),
            (Error::PayloadTooLarge, 413, "payload_too_large"),
            (
                Error::HeadersTooLarge,
                431,
                "request_header_fields_too_large",
            ),
            (Error::RequestTimeout, 408, "request_timeout"),
            (
                Error::Unauthenticated {
                    method: AuthMethod::Jwt,
                    reason: AuthReason::Expired,
                    message: "token expired",
                },
                401,
                "denied_authentication",
            ),
            (
                Error::PermissionDenied {
                    message: "no".into(),
                    action: "read",
                    resource: "invoices",
                },
                403,
                "permissions_denied",
            ),
            (
                Error::TooManyRequests {
                    retry_after: 3,
                    reason: Throttle::Principal,
                },
                429,
                "too_many_requests",
            ),
            (Error::BadGateway("refused".into()), 502, "bad_gateway"),
            (Error::GatewayTimeout, 504, "gateway_timeout"),
            (
                Error::Unavailable("keys".into()),
                503,
                "service_unavailable",
            ),
            (Error::Overloaded, 503, "service_unavailable"),
            (Error::UnauthenticatedOverload, 503, "service_unavailable"),
            (Error::UriTooLong, 414, "uri_too_long"),
            (Error::Internal("bug".into()), 500, "internal_error"),
        ];
        for (error, status, kind) in cases {
            assert_eq!(error.status().as_u16(), status, "{error:?}");
            let body = error.body();
            assert_eq!(body["type"], kind, "{error:?}");
            assert!(body["message"].is_string(), "{error:?}");
        }
    }

    #[test]
    fn server_errors_do_not_reveal_their_cause() {
        for error in [
            Error::BadGateway("connect to 10.0.0.1 refused".into()),
            Error::Internal("secret detail".into()),
        ] {
            let body = error.body().to_string();
            assert!(!body.contains("10.0.0.1") && !body.contains("secret detail"));
        }
    }

    #[test]
    fn unauthenticated_carries_method_reason_and_challenge() {
        let response = Error::Unauthenticated {
            method: AuthMethod::ApiKey,
            reason: AuthReason::NotFound,
            message: "unknown gateway key",
        }
        .into_response();
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
        assert!(response.headers().contains_key(header::WWW_AUTHENTICATE));
        let body = Error::Unauthenticated {
            method: AuthMethod::ApiKey,
            reason: AuthReason::NotFound,
            message: "unknown gateway key",
        }
        .body();
        assert_eq!(body["method"], "api_key");
        assert_eq!(body["reason"], "not_found");
    }

    #[test]
    fn each_throttle_is_a_429_with_retry_after_and_its_own_reason() {
        let reasons = [
            (Throttle::Principal, "principal_rate"),
            (Throttle::UpstreamBudget, "upstream_budget"),
            (Throttle::UpstreamBackoff, "upstream_backoff"),
            (Throttle::Upstream, "upstream_rate_limited"),
            (Throttle::PrincipalInFlight, "principal_in_flight"),
        ];
        for (reason, kind) in reasons {
            let response = Error::TooManyRequests {
                retry_after: 2,
                reason,
            }
            .into_response();
            assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
            assert_eq!(response.headers()[header::RETRY_AFTER], "2");
            assert_eq!(
                response.extensions().get::<ErrorKind>().map(|k| k.0),
                Some(kind)
            );
        }
        let shed = Error::Overloaded.into_response();
        assert_eq!(shed.headers()[header::RETRY_AFTER], "1");
        assert_eq!(
            shed.extensions().get::<ErrorKind>().map(|k| k.0),
            Some("overloaded")
        );
    }
}
