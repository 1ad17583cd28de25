//! Where the gateway meets browsers and TLS: CORS for configured origins, HTTPS with HTTP/2,
//! and a certificate that follows its files.

mod common;

use std::path::Path;
use std::time::Duration;

use billing_gateway::config::TlsFiles;
use billing_gateway::server::App;
use common::*;
use serde_json::json;
use wiremock::matchers::any;
use wiremock::{Mock, MockServer};

const APP_ORIGIN: &str = "https://costs.example.com";

#[tokio::test]
async fn preflights_are_answered_without_credentials_for_configured_origins_only() {
    let app = TestApp::spawn_with(|c| c.cors_origins = vec![APP_ORIGIN.into()]).await;
    Mock::given(any())
        .respond_with(ok_json(json!({"charges": []})))
        .expect(1)
        .mount(&app.upstream)
        .await;
    let preflight = |origin: &'static str| {
        app.client
            .request(
                reqwest::Method::OPTIONS,
                format!("{}/billing/v2beta1/charges", app.base),
            )
            .header("origin", origin)
            .header("access-control-request-method", "GET")
            .header("access-control-request-headers", "x-auth-token")
            .send()
    };
    let ok = preflight(APP_ORIGIN).await.expect("preflight");
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.headers()["access-control-allow-origin"], APP_ORIGIN);
    assert!(
        ok.headers()["access-control-allow-headers"]
            .to_str()
            .unwrap_or("")
            .contains("x-auth-token")
    );
    assert!(
        ok.headers()
            .get("access-control-allow-credentials")
            .is_none()
    );
    let other = preflight("https://evil.example").await.expect("preflight");
    assert!(other.headers().get("access-control-allow-origin").is_none());

    let response = app
        .client
        .get(format!("{}/billing/v2beta1/charges", app.base))
        .header("origin", APP_ORIGIN)
        .bearer_auth(app.reader())
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["access-control-allow-origin"],
        APP_ORIGIN
    );
    let exposed = response.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap_or("")
        .to_owned();
    assert!(
        exposed.contains("x-request-id") && exposed.contains("cache-status"),
        "{exposed}"
    );
    // Preflights never reach the upstream; the one real call did.
    assert_eq!(app.upstream_requests().await.len(), 1);
}

#[tokio::test]
async fn without_configured_origins_no_cors_headers_are_sent() {
    let app = TestApp::spawn().await;
    let r = app
        .client
        .get(format!("{}/healthz", app.base))
        .header("origin", APP_ORIGIN)
        .send()
        .await
        .expect("request");
    assert!(r.headers().get("access-control-allow-origin").is_none());
}

struct Pair {
    cert_pem: String,
    key_pem: String,
}

fn self_signed() -> Pair {
    let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
    Pair {
        cert_pem: generated.cert.pem(),
        key_pem: generated.signing_key.serialize_pem(),
    }
}

fn write(dir: &Path, pair: &Pair) {
    // Key first, then certificate: the order a rotation writes them in.
    std::fs::write(dir.join("tls.key"), &pair.key_pem).expect("key");
    std::fs::write(dir.join("tls.crt"), &pair.cert_pem).expect("cert");
}

fn client_trusting(pair: &Pair, addr: std::net::SocketAddr) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(pair.cert_pem.as_bytes()).expect("pem")])
        .resolve("localhost", addr)
        .build()
        .expect("client")
}

/// How often the certificate files are re-read in these tests.
const POLL: Duration = Duration::from_millis(50);

#[tokio::test]
async fn https_offers_http2_and_follows_a_rotated_certificate() {
    let dir = tempfile::tempdir().expect("tmp");
    let dir = dir.path();
    let (first, second) = (self_signed(), self_signed());
    write(dir, &first);
    let app = TestApp::builder()
        .poll(POLL)
        .config(|c| {
            c.tls = Some(TlsFiles {
                cert: dir.join("tls.crt"),
                key: dir.join("tls.key"),
            })
        })
        .spawn()
        .await;
    let addr = app.addr();
    let url = format!("https://localhost:{}/healthz", addr.port());

    let response = client_trusting(&first, addr)
        .get(&url)
        .send()
        .await
        .expect("https");
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    // Plain HTTP on the TLS port is refused.
    let plain = reqwest::get(format!("http://{addr}/healthz")).await;
    assert!(!plain.is_ok_and(|r| r.status().is_success()));

    write(dir, &second);
    eventually(
        || async {
            client_trusting(&second, addr)
                .get(&url)
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        },
        PATIENCE,
    )
    .await;
    assert!(
        client_trusting(&first, addr)
            .get(&url)
            .send()
            .await
            .is_err(),
        "old certificate still served"
    );

    // A broken rotation keeps the last good certificate.
    std::fs::write(dir.join("tls.crt"), "not a certificate").expect("write");
    // Not synchronisation: nothing observable happens when a broken file is ignored, so the
    // test lets several polls go by in which the good certificate must stay.
    tokio::time::sleep(POLL * 4).await;
    assert_eq!(
        client_trusting(&second, addr)
            .get(&url)
            .send()
            .await
            .expect("https")
            .status(),
        200
    );

    app.stop().await;
}

#[tokio::test]
async fn unreadable_tls_files_are_a_startup_error() {
    let upstream = MockServer::start().await;
    let mut config = config(&upstream.uri());
    config.tls = Some(TlsFiles {
        cert: "/nonexistent/tls.crt".into(),
        key: "/nonexistent/tls.key".into(),
    });
    let error = App::build(config).await.err().expect("refused").to_string();
    assert!(error.contains("/nonexistent/tls.crt"), "{error}");
}
