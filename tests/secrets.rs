//! The secret key never appears in logs, whatever happens to the request.

mod common;

use common::*;
use serde_json::json;
use wiremock::matchers::{any, path};
use wiremock::{Mock, ResponseTemplate};

/// Single-threaded runtime: the subscriber set for this thread sees every task of the app,
/// including reqwest's and hyper's own trace events.
#[tokio::test(flavor = "current_thread")]
async fn the_secret_key_is_absent_from_every_log_line_at_trace_level() {
    let (captured, _logs) = capture_logs("trace");

    let app = TestApp::builder()
        .access_log(captured.clone())
        .spawn()
        .await;
    Mock::given(path("/billing/v2beta1/taxes"))
        .respond_with(ok_json(json!({"taxes": []})))
        .mount(&app.upstream)
        .await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(500).set_body_raw(
            r#"{"message":"boom","type":"internal_error"}"#,
            "application/json",
        ))
        .mount(&app.upstream)
        .await;
    let manager = app.manager();
    for p in [
        "/billing/v2beta1/taxes".to_owned(),
        "/billing/v2beta1/invoices".to_owned(),
        format!("/billing/v2beta1/invoices/{INVOICE}/download"),
        "/billing/v2beta1/invoices?evil=1".to_owned(),
    ] {
        let body = app.get(&p, &manager).await.text().await.expect("body");
        assert!(!body.contains(SECRET_KEY));
    }
    let response = app
        .client
        .post(format!(
            "{}/billing/v2beta1/redeem-coupon?code=WELCOME",
            app.base
        ))
        .header("x-auth-token", &manager)
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 500);
    // Stopping writes every access log line still queued.
    app.stop().await;

    let logs = captured.text();
    assert!(
        logs.contains("\"message\":\"request\""),
        "no request log line was captured"
    );
    assert!(
        logs.contains("\"target\":\"audit\""),
        "no audit event for the download and coupon"
    );
    assert!(
        logs.contains("\"param\":\"code\",\"param_prefix\":\"WELC\""),
        "the coupon's audit event names the first characters of its code"
    );
    assert!(!logs.contains(SECRET_KEY), "the secret key was logged");
    assert!(!logs.contains(&manager), "a caller's token was logged");
}
