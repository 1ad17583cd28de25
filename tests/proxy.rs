//! The proxy path end to end: what callers get back and what reaches the upstream.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use wiremock::matchers::{any, header, method, path, query_param};
use wiremock::{Mock, ResponseTemplate};

/// An app whose upstream answers `{}` to anything, and must be asked `calls` times.
async fn answering_empty(calls: impl Into<wiremock::Times>) -> TestApp {
    let app = TestApp::spawn().await;
    Mock::given(any())
        .respond_with(ok_json(json!({})))
        .expect(calls)
        .mount(&app.upstream)
        .await;
    app
}

#[tokio::test]
async fn consumption_is_forwarded_with_the_key_injected_and_the_callers_token_absent() {
    let app = TestApp::spawn().await;
    Mock::given(method("GET"))
        .and(path("/billing/v2beta1/consumptions"))
        .and(query_param("organization_id", ORG))
        .and(query_param("billing_period", "2026-07"))
        .and(header("x-auth-token", SECRET_KEY))
        .respond_with(ok_json(json!({"consumptions": [], "total_count": 0})))
        .expect(1)
        .mount(&app.upstream)
        .await;
    let token = app.reader();
    let response = app
        .get(
            "/billing/v2beta1/consumptions?billing_period=2026-07",
            &token,
        )
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .expect("id")
        .to_owned();
    assert_eq!(
        response.json::<Value>().await.expect("json")["total_count"],
        0
    );

    let sent = app.upstream_requests().await;
    assert_eq!(sent.len(), 1);
    let h = &sent[0].headers;
    assert_eq!(
        h.get("x-auth-token").map(|v| v.as_bytes()),
        Some(SECRET_KEY.as_bytes())
    );
    assert_eq!(h.get_all("x-auth-token").iter().count(), 1);
    assert!(
        h.get("authorization").is_none(),
        "caller's credential passed on"
    );
    assert!(
        !format!("{h:?}").contains(&token),
        "caller's token passed on"
    );
    assert_eq!(
        h.get("x-request-id").map(|v| v.to_str().unwrap_or("")),
        Some(request_id.as_str())
    );
    assert!(
        h["user-agent"]
            .to_str()
            .unwrap_or("")
            .starts_with("billing-gateway/")
    );
}

#[tokio::test]
async fn every_operation_reaches_its_path_with_validated_and_normalised_parameters() {
    let app = answering_empty(0..).await;
    let project = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee";
    let cases: Vec<(&str, String, String)> = vec![
        (
            "GET",
            "/billing/v2beta1/consumptions?project_id=AAAAAAAA-BBBB-CCCC-DDDD-EEEEEEEEEEEE&page=2&page_size=50".into(),
            format!("/billing/v2beta1/consumptions?page=2&page_size=50&project_id={project}"),
        ),
        (
            "GET",
            "/billing/v2beta1/taxes?billing_period=2026-06&order_by=updated_at_asc".into(),
            format!("/billing/v2beta1/taxes?billing_period=2026-06&order_by=updated_at_asc&organization_id={ORG}"),
        ),
        (
            "GET",
            "/billing/v2beta1/invoices?billing_period_start_after=2024-01-01+00%3A00%3A00%2B00%3A00&invoice_type=unknown_type".into(),
            format!("/billing/v2beta1/invoices?billing_period_start_after=2024-01-01T00%3A00%3A00Z&invoice_type=unknown_type&organization_id={ORG}"),
        ),
        (
            "GET",
            "/billing/v2beta1/export-invoices?file_type=csv&dl=1".into(),
            format!("/billing/v2beta1/export-invoices?dl=1&file_type=csv&organization_id={ORG}"),
        ),
        (
            "GET",
            format!("/billing/v2beta1/invoices/{INVOICE}"),
            format!("/billing/v2beta1/invoices/{INVOICE}"),
        ),
        (
            "GET",
            format!("/billing/v2beta1/invoices/{INVOICE}/download?file_type=pdf"),
            format!("/billing/v2beta1/invoices/{INVOICE}/download?file_type=pdf"),
        ),
        (
            "GET",
            "/billing/v2beta1/discounts?organization_id=".into(),
            format!("/billing/v2beta1/discounts?organization_id={ORG}"),
        ),
        (
            "POST",
            "/billing/v2beta1/redeem-coupon?code=WELCOME100".into(),
            format!("/billing/v2beta1/redeem-coupon?code=WELCOME100&organization_id={ORG}"),
        ),
        (
            "GET",
            "/billing/v2beta1/charges?skus=%2Fcompute%2Fa&skus=b&clamp_to_time_range=True&startDateAfter=2026-07-01T00:00:00.000Z".into(),
            format!("/billing/v2beta1/charges?clamp_to_time_range=true&organization_id={ORG}&skus=%2Fcompute%2Fa&skus=b&start_date_after=2026-07-01T00%3A00%3A00Z"),
        ),
    ];
    let token = app.manager();
    for (verb, asked, _) in &cases {
        let response = app
            .client
            .request(
                verb.parse().expect("method"),
                format!("{}{asked}", app.base),
            )
            .header("x-auth-token", &token)
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 200, "{verb} {asked}");
    }
    let sent = app.upstream_requests().await;
    assert_eq!(sent.len(), cases.len());
    for (request, (verb, asked, want)) in sent.iter().zip(&cases) {
        let got = match request.url.query() {
            Some(q) => format!("{}?{q}", request.url.path()),
            None => request.url.path().to_owned(),
        };
        assert_eq!(&got, want, "for {asked}");
        assert_eq!(request.method.as_str(), *verb);
        assert!(
            request.body.is_empty(),
            "a body was sent upstream for {asked}"
        );
    }
}

#[tokio::test]
async fn read_only_token_cannot_read_invoices_and_nothing_goes_upstream() {
    let app = answering_empty(0).await;
    for path in [
        "/billing/v2beta1/invoices".to_owned(),
        format!("/billing/v2beta1/invoices/{INVOICE}/download?dl=1"),
        "/billing/v2beta1/export-invoices".to_owned(),
        "/billing/v2beta1/discounts".to_owned(),
    ] {
        let body = assert_error(
            app.get(&path, &app.reader()).await,
            403,
            "permissions_denied",
        )
        .await;
        assert_eq!(body["details"][0]["action"], "read", "{path}");
    }
    let response = app
        .client
        .post(format!("{}/billing/v2beta1/redeem-coupon?code=X", app.base))
        .bearer_auth(app.reader())
        .send()
        .await
        .expect("request");
    let body = assert_error(response, 403, "permissions_denied").await;
    assert!(
        body["message"]
            .as_str()
            .unwrap_or("")
            .contains("coupons:redeem")
    );
}

#[tokio::test]
async fn another_organization_is_refused_before_the_upstream() {
    let app = answering_empty(0).await;
    let response = app
        .get(
            &format!("/billing/v2beta1/invoices?organization_id={OTHER_ORG}"),
            &app.manager(),
        )
        .await;
    assert_error(response, 403, "permissions_denied").await;
}

/// Hostile paths, queries and credentials: each is a 4xx and none reaches the upstream.
#[tokio::test]
async fn hostile_requests_are_refused_and_never_forwarded() {
    let app = answering_empty(0).await;
    let now = jsonwebtoken::get_current_timestamp();
    let good = app.manager();
    let unsigned = {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let header = b64.encode(r#"{"alg":"none","typ":"JWT"}"#);
        let body =
            b64.encode(Value::Object(claims(json!({"roles": ["billing-manager"]}))).to_string());
        format!("{header}.{body}.")
    };
    let hs512 = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS512),
        &claims(json!({"roles": ["billing-manager"]})),
        &jsonwebtoken::EncodingKey::from_secret(HS256.as_bytes()).expect("key"),
    )
    .expect("sign");
    let wrong_key = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims(json!({"roles": ["billing-manager"]})),
        &jsonwebtoken::EncodingKey::from_secret(b"another-secret-another-secret-00").expect("key"),
    )
    .expect("sign");
    let mut tampered = good.clone();
    tampered.insert(good.len() - 2, 'A');
    let tokens: Vec<(&str, String, u16)> = vec![
        ("alg none", unsigned, 401),
        ("HS512 not enabled", hs512, 401),
        ("wrong key", wrong_key, 401),
        ("tampered", tampered, 401),
        (
            "expired",
            token_with(json!({"sub": "a", "roles": ["billing-manager"], "exp": now - 120})),
            401,
        ),
        (
            "not yet valid",
            token_with(
                json!({"sub": "a", "roles": ["billing-manager"], "exp": now + 600, "nbf": now + 300}),
            ),
            401,
        ),
        (
            "issued in the future",
            token_with(
                json!({"sub": "a", "roles": ["billing-manager"], "exp": now + 600, "iat": now + 300}),
            ),
            401,
        ),
        (
            "no exp",
            token_with(json!({"sub": "a", "roles": ["billing-manager"]})),
            401,
        ),
        (
            "no sub",
            token_with(json!({"roles": ["billing-manager"], "exp": now + 600})),
            401,
        ),
        ("garbage", "not.a.jwt".into(), 401),
        ("empty", "".into(), 401),
        (
            "unknown gateway key",
            "aaaaaaaa-0000-4000-8000-000000000001".into(),
            401,
        ),
        (
            "no role",
            token_with(json!({"sub": "a", "roles": ["intern"], "exp": now + 600})),
            403,
        ),
    ];
    for (what, token, status) in &tokens {
        let response = app
            .client
            .get(format!("{}/billing/v2beta1/consumptions", app.base))
            .header("x-auth-token", token)
            .send()
            .await
            .expect("request");
        assert_eq!(response.status().as_u16(), *status, "{what}");
        if *status == 401 {
            assert!(
                response.headers().contains_key("www-authenticate"),
                "{what}"
            );
            let body = assert_error(response, 401, "denied_authentication").await;
            assert!(
                body["reason"].is_string() && body["method"].is_string(),
                "{what}"
            );
        }
    }

    let id = INVOICE;
    let requests: Vec<(&str, String, u16)> = vec![
        ("GET", "/billing/v2beta1/invoices/..".into(), 400),
        (
            "GET",
            "/billing/v2beta1/invoices/../../../iam/v1alpha1/api-keys".into(),
            404,
        ),
        ("GET", "/billing/v2beta1/./invoices".into(), 404),
        (
            "GET",
            "/billing/v2beta1/invoices/%2e%2e/download".into(),
            400,
        ),
        (
            "GET",
            format!("/billing/v2beta1/invoices/{id}%2F..%2F..%2Fconsumptions"),
            400,
        ),
        (
            "GET",
            format!("/billing/v2beta1/invoices/{id};jsessionid=1"),
            400,
        ),
        ("GET", "/billing/v2beta1/invoices/not-a-uuid".into(), 400),
        ("GET", "/billing/v2beta1//invoices".into(), 404),
        ("GET", "/billing/v2beta1/invoices/".into(), 404),
        ("GET", "/billing/v2beta1/../v2/budgets".into(), 404),
        ("GET", "/billing/v2/budgets".into(), 404),
        ("GET", "/iam/v1alpha1/api-keys".into(), 404),
        ("GET", "/billing/v2beta1/invoices?evil=1".into(), 400),
        ("GET", "/billing/v2beta1/invoices?page=0".into(), 400),
        ("GET", "/billing/v2beta1/invoices?page=-1".into(), 400),
        ("GET", "/billing/v2beta1/invoices?page_size=101".into(), 400),
        (
            "GET",
            "/billing/v2beta1/invoices?page=1;organization_id=x".into(),
            400,
        ),
        ("GET", "/billing/v2beta1/invoices?page=1&page=2".into(), 400),
        (
            "GET",
            "/billing/v2beta1/invoices?invoice_type=everything".into(),
            400,
        ),
        (
            "GET",
            "/billing/v2beta1/invoices?billing_period_start_after=yesterday".into(),
            400,
        ),
        (
            "GET",
            "/billing/v2beta1/consumptions?billing_period=2026-13".into(),
            400,
        ),
        (
            "GET",
            "/billing/v2beta1/consumptions?project_id=../../etc".into(),
            400,
        ),
        (
            "GET",
            format!("/billing/v2beta1/consumptions?project_id={id}&organization_id={ORG}"),
            400,
        ),
        (
            "GET",
            "/billing/v2beta1/consumptions?category_name=Compute%3Bx%3D1".into(),
            400,
        ),
        (
            "GET",
            "/billing/v2beta1/consumptions?category_name=a%0d%0aX-Auth-Token:%20x".into(),
            400,
        ),
        ("GET", "/billing/v2beta1/charges?page_size=1001".into(), 400),
        (
            "GET",
            "/billing/v2beta1/charges?project_ids=nope".into(),
            400,
        ),
        (
            "GET",
            "/billing/v2beta1/charges?clamp_to_time_range=maybe".into(),
            400,
        ),
        (
            "GET",
            format!("/billing/v2beta1/invoices/{id}/download?file_type=exe"),
            400,
        ),
        (
            "GET",
            format!("/billing/v2beta1/invoices/{id}/download?dl=2"),
            400,
        ),
        ("POST", "/billing/v2beta1/redeem-coupon".into(), 400),
        ("DELETE", "/billing/v2beta1/invoices".into(), 405),
        ("POST", "/billing/v2beta1/consumptions".into(), 405),
        ("PUT", format!("/billing/v2beta1/invoices/{id}"), 405),
        (
            "GET",
            format!("/billing/v2beta1/invoices?organization_id={OTHER_ORG}"),
            403,
        ),
    ];
    for (verb, path, status) in &requests {
        // Raw HTTP: a client library would normalise `..` and `//` before sending.
        let (got, body) = raw_request(&app.base, verb, path, &good).await;
        assert_eq!(got, *status, "{verb} {path}");
        let body: Value = serde_json::from_str(&body).expect("JSON body");
        assert!(body["type"].is_string(), "{verb} {path}: {body}");
    }
    // Every one was answered by the gateway itself and counted as a refusal: no 2xx, no 5xx.
    let m = app.metrics().await;
    let answered: f64 = m
        .lines()
        .filter(|l| l.starts_with("billing_gateway_requests_total{"))
        .map(|l| {
            assert!(l.contains("status=\"4"), "not a refusal: {l}");
            l.rsplit(' ')
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .expect("a count")
        })
        .sum();
    assert_eq!(answered as usize, tokens.len() + requests.len(), "{m}");
    assert!(!m.contains("billing_gateway_upstream_calls_total{"), "{m}");
    assert!(app.upstream_requests().await.is_empty());
}

/// Sends one request byte for byte and returns the status and body.
async fn raw_request(base: &str, verb: &str, path: &str, token: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!(
        "{verb} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    let status = response[9..12].parse().expect("status");
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test]
async fn upstream_errors_pass_through_with_their_status_and_json_is_relabelled_exactly() {
    let app = TestApp::spawn().await;
    let not_found = json!({"message": "resource is not found", "resource": "invoice", "resource_id": INVOICE, "type": "not_found"});
    Mock::given(path(format!("/billing/v2beta1/invoices/{INVOICE}")))
        .respond_with(
            ResponseTemplate::new(404)
                .set_body_raw(not_found.to_string(), "application/json; charset=utf-8"),
        )
        .mount(&app.upstream)
        .await;
    Mock::given(path("/billing/v2beta1/invoices"))
        .respond_with(ResponseTemplate::new(500).set_body_raw(
            r#"{"message":"internal","type":"internal_error"}"#,
            "application/json",
        ))
        .mount(&app.upstream)
        .await;
    let response = app
        .get(
            &format!("/billing/v2beta1/invoices/{INVOICE}"),
            &app.manager(),
        )
        .await;
    let body = assert_error(response, 404, "not_found").await;
    assert_eq!(body, not_found);
    let response = app.get("/billing/v2beta1/invoices", &app.manager()).await;
    assert_error(response, 500, "internal_error").await;
}

#[tokio::test]
async fn upstream_error_bodies_never_carry_the_secret_key() {
    let app = TestApp::spawn().await;
    let upper = SECRET_KEY.to_ascii_uppercase();
    let quoting = |status: u16, content_type: &str| {
        ResponseTemplate::new(status).set_body_raw(
            format!(
                r#"{{"message":"token {SECRET_KEY} is not allowed here","type":"denied","help":"X-Auth-Token: {upper}"}}"#
            ),
            content_type,
        )
    };
    // Forwarded: an invoice, a coupon; cached: consumption (a 4xx passed on) and taxes (a 5xx
    // with no stale answer to cover it). Each reached with the key, as it must be.
    for (p, status, content_type) in [
        (
            format!("/billing/v2beta1/invoices/{INVOICE}"),
            403,
            "application/json; charset=utf-8",
        ),
        (
            "/billing/v2beta1/redeem-coupon".to_owned(),
            400,
            "application/json",
        ),
        (
            "/billing/v2beta1/consumptions".to_owned(),
            401,
            "application/json",
        ),
        ("/billing/v2beta1/taxes".to_owned(), 500, "text/plain"),
    ] {
        Mock::given(path(p))
            .and(header("x-auth-token", SECRET_KEY))
            .respond_with(quoting(status, content_type))
            .expect(1)
            .mount(&app.upstream)
            .await;
    }
    let manager = app.manager();
    let coupon = app
        .client
        .post(format!(
            "{}/billing/v2beta1/redeem-coupon?code=WELCOME",
            app.base
        ))
        .header("x-auth-token", &manager)
        .send()
        .await
        .expect("request");
    let answers = vec![
        (
            app.get(&format!("/billing/v2beta1/invoices/{INVOICE}"), &manager)
                .await,
            403,
        ),
        (coupon, 400),
        (
            app.get("/billing/v2beta1/consumptions", &manager).await,
            401,
        ),
        (app.get("/billing/v2beta1/taxes", &manager).await, 500),
    ];
    for (response, status) in answers {
        assert_eq!(response.status().as_u16(), status);
        let length = response.content_length();
        let body = response.text().await.expect("body");
        assert!(
            !body.to_ascii_lowercase().contains(SECRET_KEY),
            "the secret key was relayed: {body}"
        );
        assert_eq!(
            body,
            r#"{"message":"token [secret key removed] is not allowed here","type":"denied","help":"X-Auth-Token: [secret key removed]"}"#
        );
        if let Some(length) = length {
            assert_eq!(
                length,
                body.len() as u64,
                "the length is the scrubbed body's"
            );
        }
    }
}

#[tokio::test]
async fn upstream_rate_limit_becomes_429_with_retry_after() {
    let app = TestApp::spawn().await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(429).insert_header("x-envoy-ratelimited", "true"))
        .expect(1)
        .mount(&app.upstream)
        .await;
    let response = app.get("/billing/v2beta1/taxes", &app.reader()).await;
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .expect("text")
        .parse()
        .expect("seconds");
    // No Retry-After from the upstream: the gateway's first backoff, one second.
    assert_eq!(retry_after, 1);
    assert_error(response, 429, "too_many_requests").await;
}

#[tokio::test]
async fn redirects_are_never_followed() {
    let app = TestApp::spawn().await;
    let elsewhere = wiremock::MockServer::start().await;
    Mock::given(any())
        .respond_with(ok_json(json!({})))
        .expect(0)
        .mount(&elsewhere)
        .await;
    Mock::given(any())
        .respond_with(
            ResponseTemplate::new(302)
                .insert_header("location", format!("{}/steal", elsewhere.uri())),
        )
        .expect(1)
        .mount(&app.upstream)
        .await;
    let response = app.get("/billing/v2beta1/taxes", &app.reader()).await;
    assert!(response.headers().get("location").is_none());
    assert_error(response, 502, "bad_gateway").await;
    assert!(
        elsewhere
            .received_requests()
            .await
            .unwrap_or_default()
            .is_empty()
    );
}

#[tokio::test]
async fn slow_upstream_is_a_504_and_refused_connection_a_502() {
    let app = TestApp::spawn_with(|c| c.upstream.timeout = Duration::from_millis(300)).await;
    Mock::given(any())
        .respond_with(ok_json(json!({})).set_delay(SLOW))
        .mount(&app.upstream)
        .await;
    assert_error(
        app.get("/billing/v2beta1/taxes", &app.reader()).await,
        504,
        "gateway_timeout",
    )
    .await;

    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead = format!("http://{}", closed.local_addr().expect("addr"));
    drop(closed);
    let app = TestApp::spawn_with(|c| c.upstream.url = dead).await;
    assert_error(
        app.get("/billing/v2beta1/taxes", &app.reader()).await,
        502,
        "bad_gateway",
    )
    .await;
}

#[tokio::test]
async fn a_large_download_streams_through_byte_identical() {
    let app = TestApp::spawn().await;
    let size = 60 << 20;
    let pdf: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
    Mock::given(path(format!(
        "/billing/v2beta1/invoices/{INVOICE}/download"
    )))
    .and(query_param("dl", "1"))
    .respond_with(
        ResponseTemplate::new(200)
            .insert_header(
                "content-disposition",
                "attachment; filename=\"invoice.pdf\"",
            )
            .set_body_raw(pdf.clone(), "application/pdf"),
    )
    .expect(1)
    .mount(&app.upstream)
    .await;
    let response = app
        .get(
            &format!("/billing/v2beta1/invoices/{INVOICE}/download?dl=1"),
            &app.manager(),
        )
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/pdf");
    assert_eq!(
        response.headers()["content-disposition"],
        "attachment; filename=\"invoice.pdf\""
    );
    let got = response.bytes().await.expect("body");
    assert_eq!(got.len(), pdf.len());
    assert!(got == pdf, "the download was altered");
}

#[tokio::test]
async fn content_disposition_reaches_callers_on_file_downloads_only() {
    let app = TestApp::spawn().await;
    let attachment = "attachment; filename=\"invoice.pdf\"";
    let download = format!("/billing/v2beta1/invoices/{INVOICE}/download");
    // Raw bytes of a file: the one answer that keeps it.
    Mock::given(path(download.clone()))
        .and(query_param("dl", "1"))
        .respond_with(
            ResponseTemplate::new(200)
                .insert_header("content-disposition", attachment)
                .set_body_raw(b"%PDF-1.7".to_vec(), "application/pdf"),
        )
        .up_to_n_times(1)
        .mount(&app.upstream)
        .await;
    // The same call answered in JSON, the JSON envelope, a list, a cached answer.
    Mock::given(any())
        .respond_with(
            ResponseTemplate::new(200)
                .insert_header("content-disposition", attachment)
                .set_body_raw(
                    json!({"name": "invoice.pdf", "content_type": "application/pdf", "content": "JVBERi0xLjc="})
                        .to_string(),
                    "application/json",
                ),
        )
        .mount(&app.upstream)
        .await;
    let manager = app.manager();
    let file = app.get(&format!("{download}?dl=1"), &manager).await;
    assert_eq!(file.status(), 200);
    assert_eq!(file.headers()["content-type"], "application/pdf");
    assert_eq!(file.headers()["content-disposition"], attachment);
    for p in [
        format!("{download}?dl=1"),
        download.clone(),
        "/billing/v2beta1/invoices".to_owned(),
        "/billing/v2beta1/consumptions".to_owned(),
    ] {
        let response = app.get(&p, &manager).await;
        assert_eq!(response.status(), 200, "{p}");
        assert_eq!(
            response.headers()["content-type"],
            "application/json",
            "{p}"
        );
        assert!(
            response.headers().get("content-disposition").is_none(),
            "{p}: a JSON answer named as a file"
        );
    }
    let sent = app.upstream_requests().await;
    assert_eq!(sent.len(), 5);
    assert_eq!(sent[1].url.query(), Some("dl=1"));
}

#[tokio::test]
async fn python_sdk_get_with_an_empty_json_body_is_accepted_but_large_bodies_are_not() {
    let app = TestApp::spawn().await;
    Mock::given(any())
        .respond_with(ok_json(json!({"taxes": []})))
        .expect(1)
        .mount(&app.upstream)
        .await;
    let response = app
        .client
        .get(format!("{}/billing/v2beta1/taxes", app.base))
        .header("x-auth-token", app.reader())
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    let response = app
        .client
        .post(format!("{}/billing/v2beta1/redeem-coupon?code=X", app.base))
        .header("x-auth-token", app.manager())
        .body(vec![b' '; 64 * 1024])
        .send()
        .await
        .expect("request");
    assert_error(response, 413, "payload_too_large").await;
}

#[tokio::test]
async fn expect_100_continue_is_answered_only_to_an_allowed_caller() {
    let app = TestApp::spawn().await;
    Mock::given(path("/billing/v2beta1/redeem-coupon"))
        .respond_with(ok_json(json!({"coupon": {}})))
        .expect(1)
        .mount(&app.upstream)
        .await;
    let bearer = |token: String| format!("Authorization: Bearer {token}");
    let refused = [
        (
            "no credential",
            "POST",
            "/billing/v2beta1/redeem-coupon?code=X".to_owned(),
            "X-Nothing: 1".to_owned(),
            "401",
        ),
        (
            "a bad token",
            "POST",
            "/billing/v2beta1/redeem-coupon?code=X".to_owned(),
            bearer("not.a.jwt".into()),
            "401",
        ),
        (
            "not allowed to redeem",
            "POST",
            "/billing/v2beta1/redeem-coupon?code=X".to_owned(),
            bearer(app.reader()),
            "403",
        ),
        (
            "not allowed to read invoices",
            "GET",
            "/billing/v2beta1/invoices".to_owned(),
            bearer(app.reader()),
            "403",
        ),
        (
            "another organization",
            "GET",
            format!("/billing/v2beta1/invoices?organization_id={OTHER_ORG}"),
            bearer(app.manager()),
            "403",
        ),
    ];
    for (what, verb, target, auth, status) in refused {
        let statuses = expect_continue(&app.base, verb, &target, &auth).await;
        assert_eq!(statuses.len(), 1, "{what}: {statuses:?}");
        assert!(
            statuses[0].starts_with(&format!("HTTP/1.1 {status}")),
            "{what}: {statuses:?}"
        );
    }
    let statuses = expect_continue(
        &app.base,
        "POST",
        "/billing/v2beta1/redeem-coupon?code=X",
        &bearer(app.manager()),
    )
    .await;
    assert_eq!(statuses.len(), 2, "{statuses:?}");
    assert!(statuses[0].starts_with("HTTP/1.1 100"), "{statuses:?}");
    assert!(statuses[1].starts_with("HTTP/1.1 200"), "{statuses:?}");
    // Only the allowed call reached the upstream.
    let sent = app.upstream_requests().await;
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].url.path(), "/billing/v2beta1/redeem-coupon");
}

#[tokio::test]
async fn request_ids_are_echoed_when_sane_and_replaced_when_not() {
    let app = answering_empty(0..).await;
    let send = |id: &'static str| {
        app.client
            .get(format!("{}/billing/v2beta1/charges", app.base))
            .bearer_auth(app.reader())
            .header("x-request-id", id)
            .send()
    };
    let response = send("trace-42.a_b").await.expect("request");
    assert_eq!(response.headers()["x-request-id"], "trace-42.a_b");
    let response = send("bad id <script>").await.expect("request");
    let id = response.headers()["x-request-id"]
        .to_str()
        .expect("text")
        .to_owned();
    assert_ne!(id, "bad id <script>");
    assert!(uuid::Uuid::try_parse(&id).is_ok());
    let sent = app.upstream_requests().await;
    assert_eq!(sent[1].headers["x-request-id"], id.as_str());
    // Errors carry one too.
    let response = app
        .client
        .get(format!("{}/nowhere", app.base))
        .send()
        .await
        .expect("request");
    assert!(response.headers().contains_key("x-request-id"));
}

#[tokio::test]
async fn gateway_endpoints_answer() {
    let app = answering_empty(0..).await;
    for p in ["/healthz", "/readyz"] {
        let r = app
            .client
            .get(format!("{}{p}", app.base))
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), 200, "{p}");
    }
    let r = app
        .client
        .post(format!("{}/healthz", app.base))
        .send()
        .await
        .expect("request");
    assert_error(r, 405, "method_not_allowed").await;
    assert_error(app.get("/unknown", &app.reader()).await, 404, "not_found").await;

    let who: Value = app
        .get("/gateway/v1/whoami", &app.reader())
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(who["subject"], "alice");
    assert_eq!(who["permissions"], json!(["consumption:read"]));
    assert_eq!(who["grants"][0]["roles"], json!(["billing-read-only"]));
    let r = app
        .client
        .get(format!("{}/gateway/v1/whoami", app.base))
        .send()
        .await
        .expect("request");
    assert_error(r, 401, "denied_authentication").await;

    app.get("/billing/v2beta1/taxes", &app.reader()).await;
    let metrics = app.metrics().await;
    assert!(
        metrics.contains(r#"billing_gateway_requests_total{operation="taxes",status="200"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("billing_gateway_upstream_duration_seconds_bucket"),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"billing_gateway_rejections_total{reason="not_found"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"billing_gateway_rejections_total{reason="authentication_missing"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics
            .contains(r#"billing_gateway_upstream_calls_total{operation="taxes",status="200"} 1"#),
        "{metrics}"
    );
    assert!(!metrics.contains(SECRET_KEY));
}

#[tokio::test]
async fn shutdown_lets_an_in_flight_request_finish_then_stops_accepting() {
    let mut app = TestApp::spawn().await;
    Mock::given(any())
        .respond_with(ok_json(json!({"taxes": []})).set_delay(Duration::from_millis(800)))
        .mount(&app.upstream)
        .await;
    let in_flight = {
        let request = app
            .client
            .get(format!("{}/billing/v2beta1/taxes", app.base))
            .bearer_auth(app.reader())
            .send();
        tokio::spawn(request)
    };
    // In flight: the gateway has sent it upstream, whose answer takes a while.
    eventually(
        || async { app.upstream_requests().await.len() == 1 },
        PATIENCE,
    )
    .await;
    app.shutdown();
    let response = in_flight.await.expect("join").expect("request completes");
    assert_eq!(response.status(), 200);
    let handle = app.handle.take().expect("handle");
    tokio::time::timeout(Duration::from_secs(10), handle)
        .await
        .expect("server stops")
        .expect("join")
        .expect("clean exit");
    assert!(
        app.client
            .get(format!("{}/healthz", app.base))
            .send()
            .await
            .is_err(),
        "still accepting"
    );
}
