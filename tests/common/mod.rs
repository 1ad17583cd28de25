//! The test harness: the real gateway on 127.0.0.1:0 in front of a wiremock upstream.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::path::PathBuf;
use std::time::Duration;

use billing_gateway::auth::mint_hs256;
use billing_gateway::config::Config;
use billing_gateway::server::App;
use secrecy::SecretString;
use serde_json::{Map, Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use wiremock::MockServer;

/// The Scaleway secret key the gateway holds: must never leave except to the upstream.
pub const SECRET_KEY: &str = "5ec7e7ca-fe00-4bad-9000-00000000beef";
pub const ORG: &str = "11111111-2222-3333-4444-555555555555";
pub const OTHER_ORG: &str = "22222222-3333-4444-5555-666666666666";
pub const HS256: &str = "test-hs256-secret-0123456789abcdef";
pub const INVOICE: &str = "7b1e9d40-3c55-4d2e-8f61-0a9b8c7d6e5f";

pub struct TestApp {
    pub base: String,
    pub upstream: MockServer,
    pub client: reqwest::Client,
    shutdown: Option<oneshot::Sender<()>>,
    pub handle: Option<JoinHandle<std::io::Result<()>>>,
}

pub fn config(upstream: &str) -> Config {
    let mut config = Config::new(
        upstream,
        ORG.parse().expect("uuid"),
        SecretString::from(SECRET_KEY),
    );
    config.listen = "127.0.0.1:0".parse().expect("addr");
    config.policy_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("policies");
    config.auth.hs256_secret = Some(SecretString::from(HS256));
    // Generous rates: only the tests about limits set them low.
    let plenty = billing_gateway::config::Rate {
        count: 10_000,
        per: Duration::from_secs(1),
    };
    config.limits.principal_rate = plenty;
    config.upstream.rate = plenty;
    config
}

impl TestApp {
    pub async fn spawn() -> TestApp {
        TestApp::spawn_with(|_| {}).await
    }

    pub async fn spawn_with(edit: impl FnOnce(&mut Config)) -> TestApp {
        let upstream = MockServer::start().await;
        let mut config = config(&upstream.uri());
        edit(&mut config);
        let app = App::build(config).await.expect("app builds");
        let base = format!("http://{}", app.addr().expect("addr"));
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(app.run_until(async {
            let _ = rx.await;
        }));
        billing_gateway::install_crypto_provider();
        TestApp {
            base,
            upstream,
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("client"),
            shutdown: Some(tx),
            handle: Some(handle),
        }
    }

    /// Starts graceful shutdown; `handle` completes when in-flight requests are done.
    pub fn shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    pub fn token(&self, roles: &[&str]) -> String {
        let now = jsonwebtoken::get_current_timestamp();
        token_with(json!({"sub": "alice", "roles": roles, "iat": now, "exp": now + 600}))
    }

    pub fn manager(&self) -> String {
        self.token(&["billing-manager"])
    }

    pub fn reader(&self) -> String {
        self.token(&["billing-read-only"])
    }

    pub async fn get(&self, path: &str, token: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{}", self.base, path))
            .bearer_auth(token)
            .send()
            .await
            .expect("request")
    }

    /// The gateway's Prometheus exposition.
    pub async fn metrics(&self) -> String {
        self.client
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .expect("metrics request")
            .text()
            .await
            .expect("metrics text")
    }

    /// Every request wiremock received.
    pub async fn upstream_requests(&self) -> Vec<wiremock::Request> {
        self.upstream.received_requests().await.unwrap_or_default()
    }
}

pub fn token_with(claims: Value) -> String {
    let Value::Object(claims) = claims else {
        panic!("claims must be an object")
    };
    mint_hs256(&SecretString::from(HS256), &claims).expect("sign")
}

pub fn claims(extra: Value) -> Map<String, Value> {
    let now = jsonwebtoken::get_current_timestamp();
    let mut m = Map::new();
    m.insert("sub".into(), json!("alice"));
    m.insert("exp".into(), json!(now + 600));
    if let Value::Object(extra) = extra {
        m.extend(extra);
    }
    m
}

/// Asserts the body is Scaleway-shaped JSON with `type` = `kind` and exactly `application/json`.
pub async fn assert_error(response: reqwest::Response, status: u16, kind: &str) -> Value {
    assert_eq!(response.status().as_u16(), status, "status");
    assert_eq!(
        response
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap_or("")),
        Some("application/json")
    );
    let body = response.text().await.expect("body");
    assert!(!body.contains(SECRET_KEY), "secret key in an error body");
    let json: Value = serde_json::from_str(&body).expect("JSON error body");
    assert_eq!(json["type"], kind, "{json}");
    assert!(json["message"].is_string(), "{json}");
    json
}

pub const SLOW: Duration = Duration::from_secs(3);
