//! The one way out to the Billing API: a pooled reqwest client with a fixed base URL, the secret
//! key injected last, an allowlist of headers, no redirects and a whole-request timeout
//! (contract §6).
//!
//! Requests are built from a validated [`Call`] only; nothing of the caller's request (headers,
//! body, raw query) is copied. The key lives in a header value marked sensitive, so it prints as
//! `Sensitive` in any `Debug` output.

use axum::http::{HeaderValue, StatusCode, header};
use reqwest::redirect;
use secrecy::ExposeSecret;

use crate::config::UpstreamConfig;
use crate::error::Error;
use crate::operations::{Call, Method};

/// The upstream client. Cheap to share: one connection pool for all requests.
pub struct Upstream {
    client: reqwest::Client,
    base: String,
    key: HeaderValue,
}

static USER_AGENT: &str = concat!("billing-gateway/", env!("CARGO_PKG_VERSION"));

impl Upstream {
    /// Builds the client; fails only on a key that is not a valid header value.
    pub fn new(cfg: &UpstreamConfig) -> Result<Upstream, Error> {
        let client = reqwest::Client::builder()
            .redirect(redirect::Policy::none())
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout.min(std::time::Duration::from_secs(10)))
            .pool_idle_timeout(std::time::Duration::from_secs(60))
            .user_agent(USER_AGENT)
            .build()
            .map_err(|e| Error::Internal(format!("cannot build the upstream client: {e}")))?;
        let mut key = HeaderValue::from_str(cfg.secret_key.expose_secret())
            .map_err(|_| Error::Internal("the secret key is not a valid header value".into()))?;
        key.set_sensitive(true);
        Ok(Upstream {
            client,
            base: cfg.url.clone(),
            key,
        })
    }

    /// Sends `call` and returns the upstream's answer with its body not yet read.
    ///
    /// Redirects and 429s are turned into errors here, so no caller can follow or relay them.
    pub async fn send(&self, call: &Call, request_id: &str) -> Result<reqwest::Response, Error> {
        let mut url = format!("{}{}", self.base, call.path());
        let query = call.query_string();
        if !query.is_empty() {
            url.push('?');
            url.push_str(&query);
        }
        let method = match call.op.method {
            Method::Get => reqwest::Method::GET,
            Method::Post => reqwest::Method::POST,
        };
        let accept = if call.wants_raw_file() {
            HeaderValue::from_static("*/*")
        } else {
            HeaderValue::from_static("application/json")
        };
        let mut request = self
            .client
            .request(method, url)
            .header(header::ACCEPT, accept)
            .header("x-request-id", request_id);
        // Injected last so no earlier header, however built, can displace it.
        request = request.header("x-auth-token", self.key.clone());
        let response = request.send().await.map_err(|e| {
            // reqwest's Display names the URL, never the headers: safe to log.
            if e.is_timeout() {
                Error::GatewayTimeout
            } else {
                Error::BadGateway(error_chain(&e))
            }
        })?;
        let status = response.status();
        if status.is_redirection() {
            return Err(Error::BadGateway(format!(
                "the upstream answered {status} (a redirect); redirects are never followed"
            )));
        }
        if status == StatusCode::TOO_MANY_REQUESTS {
            let retry_after = response
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(1)
                .clamp(1, 3600);
            return Err(Error::TooManyRequests { retry_after });
        }
        Ok(response)
    }
}

/// The error and its causes on one line ("connection refused" is only in the source chain).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}
