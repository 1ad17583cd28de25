//! The OpenAPI document describes exactly what the gateway serves: every operation and parameter
//! it lists is accepted and forwarded as described, and every answer, the simulator's Billing
//! answers and the gateway's own errors alike, matches the schema the document gives for its
//! status.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use billing_gateway::server::ServerLimits;
use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wiremock::matchers::any;
use wiremock::{Mock, ResponseTemplate};

fn example(schema: &Value) -> String {
    let schema = if schema["type"] == "array" {
        &schema["items"]
    } else {
        schema
    };
    match &schema["examples"][0] {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[tokio::test]
async fn every_documented_operation_and_parameter_is_served_as_described() {
    let app = TestApp::spawn().await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(200).set_body_raw("{}", "application/json"))
        .mount(&app.upstream)
        .await;
    let doc: Value = app
        .client
        .get(format!("{}/gateway/v1/openapi.json", app.base))
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    assert_eq!(doc["openapi"], "3.1.0");
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());

    let token = app.manager();
    let mut operations = 0;
    let mut calls = Vec::new();
    for (path, methods) in doc["paths"].as_object().expect("paths") {
        for (method, op) in methods.as_object().expect("methods") {
            if op["tags"][0] != "billing" {
                continue;
            }
            operations += 1;
            assert!(op["responses"]["403"].is_object(), "{path}");
            let params = op["parameters"].as_array().expect("parameters");
            let mut concrete = path.clone();
            let mut required = Vec::new();
            let mut optional = Vec::new();
            for p in params {
                let name = p["name"].as_str().expect("name");
                let value = example(&p["schema"]);
                match (p["in"].as_str(), p["required"].as_bool()) {
                    (Some("path"), _) => {
                        concrete = concrete.replace(&format!("{{{name}}}"), &value)
                    }
                    (_, Some(true)) => required.push(format!("{name}={value}")),
                    _ => optional.push(format!("{name}={value}")),
                }
            }
            // Each optional parameter alone (some are mutually exclusive), with the required ones.
            for extra in optional.iter().map(Some).chain([None]) {
                let mut query = required.clone();
                query.extend(extra.cloned());
                calls.push((method.to_uppercase(), concrete.clone(), query.join("&")));
            }
        }
    }
    assert_eq!(operations, 9);
    for (method, path, query) in &calls {
        let response = app
            .client
            .request(
                method.parse().expect("method"),
                format!("{}{path}?{query}", app.base),
            )
            .bearer_auth(&token)
            .send()
            .await
            .expect("request");
        assert_eq!(
            response.status(),
            200,
            "{method} {path}?{query}: {}",
            response.text().await.unwrap_or_default()
        );
    }
    let sent = app.upstream_requests().await;
    let distinct_paths: std::collections::BTreeSet<_> =
        sent.iter().map(|r| r.url.path().to_owned()).collect();
    assert_eq!(distinct_paths.len(), 9, "{distinct_paths:?}");
    assert!(sent.len() > 40, "only {} calls", sent.len());
}

/// The document, from the gateway that serves it.
async fn served_document(app: &TestApp) -> Value {
    app.client
        .get(format!("{}/gateway/v1/openapi.json", app.base))
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json")
}

/// Follows a `#/components/...` reference of the document.
fn resolve<'a>(doc: &'a Value, node: &'a Value) -> &'a Value {
    match node["$ref"].as_str() {
        Some(reference) => {
            let pointer = reference.trim_start_matches('#');
            resolve(doc, doc.pointer(pointer).unwrap_or(&Value::Null))
        }
        None => node,
    }
}

/// The JSON schema the document gives for `status` of `method path`, as a validator that
/// resolves the document's own references and checks formats (uuid, date-time). Panics when
/// the document does not list that status for that operation.
fn documented(doc: &Value, method: &str, path: &str, status: u16) -> jsonschema::Validator {
    let responses = &doc["paths"][path][method]["responses"];
    let response = resolve(doc, &responses[status.to_string()]);
    let schema = &response["content"]["application/json"]["schema"];
    assert!(
        schema.is_object(),
        "{method} {path} documents no JSON answer for {status}"
    );
    let mut root = schema.clone();
    root["components"] = doc["components"].clone();
    jsonschema::options()
        .should_validate_formats(true)
        .build(&root)
        .expect("the documented schema compiles")
}

fn assert_valid(validator: &jsonschema::Validator, body: &Value, what: &str) {
    let errors: Vec<String> = validator
        .iter_errors(body)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(errors.is_empty(), "{what}: {errors:#?}\n{body}");
}

/// The simulator on a port of its own, every path it is asked for recorded.
async fn simulator() -> (String, Vec<uuid::Uuid>, Arc<Mutex<Vec<String>>>) {
    let sim = billing_sim::Simulator::new(SECRET_KEY);
    let invoices = sim.invoice_ids();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    let router = sim.router().layer(axum::middleware::from_fn(
        move |request: axum::extract::Request, next: axum::middleware::Next| {
            let record = record.clone();
            async move {
                let uri = request.uri();
                let line = format!(
                    "{} {}?{}",
                    request.method(),
                    uri.path(),
                    uri.query().unwrap_or("")
                );
                record.lock().expect("record").push(line);
                next.run(request).await
            }
        },
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, router).await });
    (url, invoices, seen)
}

#[tokio::test]
async fn every_billing_answer_of_the_simulator_through_the_gateway_matches_its_schema() {
    let (sim, invoices, seen) = simulator().await;
    let app = TestApp::builder().upstream_url(&sim).spawn().await;
    let doc = served_document(&app).await;
    let invoice = invoices[0];
    let token = app.manager();
    // Each operation bare, and the variants whose answers differ in shape: a project filter
    // (no discount total), a page past the end (an empty list), a charges page with a token to
    // the next, a coupon that exists and one that does not (the upstream's 404), an invoice
    // that does not exist (idem), the files' raw bytes.
    let calls: Vec<(&str, &str, String, u16)> = vec![
        ("get", "/billing/v2beta1/consumptions", String::new(), 200),
        (
            "get",
            "/billing/v2beta1/consumptions",
            "project_id=aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee&page_size=2".into(),
            200,
        ),
        (
            "get",
            "/billing/v2beta1/consumptions",
            "page=99&page_size=100".into(),
            200,
        ),
        ("get", "/billing/v2beta1/taxes", String::new(), 200),
        (
            "get",
            "/billing/v2beta1/invoices",
            "page_size=3".into(),
            200,
        ),
        (
            "get",
            "/billing/v2beta1/export-invoices",
            String::new(),
            200,
        ),
        (
            "get",
            "/billing/v2beta1/invoices/{invoice_id}",
            String::new(),
            200,
        ),
        (
            "get",
            "/billing/v2beta1/invoices/{invoice_id}/download",
            String::new(),
            200,
        ),
        ("get", "/billing/v2beta1/discounts", String::new(), 200),
        (
            "post",
            "/billing/v2beta1/redeem-coupon",
            "code=DEMO-SCHEMA".into(),
            200,
        ),
        (
            "post",
            "/billing/v2beta1/redeem-coupon",
            "code=NO-SUCH-COUPON".into(),
            404,
        ),
        ("get", "/billing/v2beta1/charges", "page_size=2".into(), 200),
        ("get", "/billing/v2beta1/charges", String::new(), 200),
    ];
    let mut operations = std::collections::BTreeSet::new();
    for (method, template, query, status) in &calls {
        let path = template.replace("{invoice_id}", &invoice.to_string());
        let response = app
            .client
            .request(
                method.to_uppercase().parse().expect("method"),
                format!("{}{path}?{query}", app.base),
            )
            .bearer_auth(&token)
            .send()
            .await
            .expect("request");
        assert_eq!(
            response.status().as_u16(),
            *status,
            "{method} {path}?{query}"
        );
        assert_eq!(header(&response, "content-type"), "application/json");
        let body: Value = response.json().await.expect("json");
        let what = format!("{method} {path}?{query}");
        assert_valid(&documented(&doc, method, template, *status), &body, &what);
        operations.insert(
            doc["paths"][*template][*method]["operationId"]
                .as_str()
                .expect("id")
                .to_owned(),
        );
    }
    // The charges page with a next token, and the last page without one: both shapes were met.
    let unknown = format!("/billing/v2beta1/invoices/{}", uuid::Uuid::new_v4());
    let response = app.get(&unknown, &token).await;
    assert_valid(
        &documented(&doc, "get", "/billing/v2beta1/invoices/{invoice_id}", 404),
        &assert_error(response, 404, "not_found").await,
        "unknown invoice",
    );
    assert_eq!(
        operations.len(),
        billing_gateway::billing::OPERATIONS.len(),
        "{operations:?}"
    );

    // The raw forms of the files come in the content type the document gives.
    for template in [
        "/billing/v2beta1/invoices/{invoice_id}/download",
        "/billing/v2beta1/export-invoices",
    ] {
        let content = doc["paths"][template]["get"]["responses"]["200"]["content"]
            .as_object()
            .expect("content");
        let raw = content
            .keys()
            .find(|t| *t != "application/json")
            .expect("a raw type");
        let path = template.replace("{invoice_id}", &invoice.to_string());
        let response = app.get(&format!("{path}?dl=1"), &token).await;
        assert_eq!(response.status(), 200);
        assert_eq!(&header(&response, "content-type"), raw);
    }

    // Every call reached the simulator, with the organization the gateway filled in where the
    // operation takes one and no project was named.
    let seen = seen.lock().expect("seen").clone();
    for (method, template, query, _) in &calls {
        let path = template.replace("{invoice_id}", &invoice.to_string());
        let sent = seen.iter().any(|line| {
            line.starts_with(&format!("{} {path}?", method.to_uppercase()))
                && query
                    .split('&')
                    .filter(|p| !p.is_empty())
                    .all(|p| line.contains(p))
        });
        assert!(
            sent,
            "{method} {path}?{query} never reached the simulator: {seen:#?}"
        );
    }
    let charges = seen
        .iter()
        .find(|l| l.starts_with("GET /billing/v2beta1/charges?"))
        .expect("charges");
    assert!(
        charges.contains(&format!("organization_id={ORG}")),
        "{charges}"
    );

    // The gateway's own costs answer, summed from the simulator's consumption, as documented.
    let costs = app.get("/gateway/v1/costs", &token).await;
    assert_eq!(costs.status(), 200);
    let body: Value = costs.json().await.expect("costs json");
    assert!(
        !body["projects"].as_array().expect("projects").is_empty(),
        "{body}"
    );
    assert_valid(
        &documented(&doc, "get", "/gateway/v1/costs", 200),
        &body,
        "costs",
    );
}

/// One error the gateway answers itself, provoked on a raw connection (what `reqwest` cannot
/// send): the status line and the JSON body.
async fn raw(app: &TestApp, request: &[u8]) -> (u16, Value) {
    let mut stream = tokio::net::TcpStream::connect(app.addr())
        .await
        .expect("connect");
    stream.write_all(request).await.expect("write");
    let mut got = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut got))
        .await
        .expect("the gateway answered")
        .expect("read");
    let text = String::from_utf8_lossy(&got);
    let status = text[9..12].parse().expect("status");
    let (_, body) = text.split_once("\r\n\r\n").expect("a head and a body");
    (
        status,
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {text}")),
    )
}

#[tokio::test]
async fn every_error_status_the_gateway_answers_matches_its_documented_schema() {
    let app = TestApp::builder()
        .limits(ServerLimits {
            body_deadline: Duration::from_millis(300),
            ..ServerLimits::default()
        })
        .spawn()
        .await;
    Mock::given(any())
        .respond_with(ok_json(json!({})))
        .expect(0)
        .mount(&app.upstream)
        .await;
    let doc = served_document(&app).await;
    let consumptions = "/billing/v2beta1/consumptions";
    let long_header = "x".repeat(ServerLimits::default().max_header_bytes + 1);
    let manager = app.manager();
    let mut answers: Vec<(&str, &str, u16, Value)> = Vec::new();
    let mut check = async |method: &'static str,
                           path: &'static str,
                           response: reqwest::Response,
                           status: u16| {
        assert_eq!(response.status().as_u16(), status, "{method} {path}");
        assert_eq!(
            header(&response, "content-type"),
            "application/json",
            "{status}"
        );
        answers.push((method, path, status, response.json().await.expect("json")));
    };
    let url = |path: &str| format!("{}{path}", app.base);
    check(
        "get",
        consumptions,
        app.get(&format!("{consumptions}?page=0"), &manager).await,
        400,
    )
    .await;
    check(
        "get",
        consumptions,
        app.client
            .get(url(consumptions))
            .send()
            .await
            .expect("request"),
        401,
    )
    .await;
    check(
        "get",
        "/billing/v2beta1/invoices",
        app.get("/billing/v2beta1/invoices", &app.reader()).await,
        403,
    )
    .await;
    check(
        "delete",
        "/gateway/v1/cache",
        app.client
            .delete(url("/gateway/v1/cache"))
            .bearer_auth(app.reader())
            .send()
            .await
            .expect("request"),
        403,
    )
    .await;
    check(
        "get",
        consumptions,
        app.get("/billing/v2beta1/nothing-here", &manager).await,
        404,
    )
    .await;
    check(
        "get",
        consumptions,
        app.client
            .delete(url(consumptions))
            .bearer_auth(&manager)
            .send()
            .await
            .expect("request"),
        405,
    )
    .await;
    check(
        "get",
        "/gateway/v1/whoami",
        app.client
            .get(url("/gateway/v1/whoami"))
            .send()
            .await
            .expect("request"),
        401,
    )
    .await;
    let big = app
        .client
        .post(url("/billing/v2beta1/redeem-coupon?code=X"))
        .bearer_auth(&manager)
        .body(vec![b'{'; 64 * 1024])
        .send()
        .await
        .expect("request");
    check("post", "/billing/v2beta1/redeem-coupon", big, 413).await;
    let long = format!(
        "{consumptions}?category_name={}",
        "a".repeat(ServerLimits::default().max_uri_bytes)
    );
    check("get", consumptions, app.get(&long, &manager).await, 414).await;
    let heavy = app
        .client
        .get(url(consumptions))
        .bearer_auth(&manager)
        .header("x-padding", &long_header)
        .send()
        .await
        .expect("request");
    check("get", consumptions, heavy, 431).await;
    let (status, body) = raw(
        &app,
        format!("POST /billing/v2beta1/redeem-coupon?code=X HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {manager}\r\nContent-Length: 100\r\n\r\n{{").as_bytes(),
    )
    .await;
    assert_eq!(status, 408, "{body}");
    answers.push(("post", "/billing/v2beta1/redeem-coupon", 408, body));
    // Whoami with a valid credential: its own answer.
    let me = app.get("/gateway/v1/whoami", &manager).await;
    assert_eq!(me.status(), 200);
    answers.push((
        "get",
        "/gateway/v1/whoami",
        200,
        me.json().await.expect("json"),
    ));
    for (method, path, status, body) in &answers {
        assert_valid(
            &documented(&doc, method, path, *status),
            body,
            &format!("{status} {body}"),
        );
    }
    let statuses: std::collections::BTreeSet<u16> = answers.iter().map(|a| a.2).collect();
    assert_eq!(statuses.len(), 10, "{statuses:?}");
    // Refused, every one of them, before the upstream.
    assert!(app.upstream_requests().await.is_empty());
}

#[tokio::test]
async fn throttled_unreachable_slow_and_full_answers_match_their_documented_schemas() {
    let consumptions = "/billing/v2beta1/consumptions";
    // 429: a caller past its own rate (burst: twice the rate).
    let app = TestApp::spawn_with(|c| c.limits.principal_rate = per_second(1)).await;
    Mock::given(any())
        .respond_with(consumptions_body())
        .mount(&app.upstream)
        .await;
    let doc = served_document(&app).await;
    let token = app.reader();
    let mut refused = None;
    for _ in 0..5 {
        let response = app.get(consumptions, &token).await;
        if response.status() == 429 {
            assert!(response.headers().contains_key("retry-after"));
            refused = Some(response.json::<Value>().await.expect("json"));
            break;
        }
    }
    let refused = refused.expect("a 429 within five calls at one a second");
    assert_valid(&documented(&doc, "get", consumptions, 429), &refused, "429");
    assert!(app.upstream_requests().await.len() <= 2);

    // 504: the upstream slower than the timeout.
    let app = TestApp::spawn_with(|c| c.upstream.timeout = Duration::from_millis(300)).await;
    Mock::given(any())
        .respond_with(consumptions_body().set_delay(SLOW))
        .expect(1)
        .mount(&app.upstream)
        .await;
    let body = assert_error(
        app.get(consumptions, &app.reader()).await,
        504,
        "gateway_timeout",
    )
    .await;
    assert_valid(&documented(&doc, "get", consumptions, 504), &body, "504");

    // 502: nothing listens at the upstream's address.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead = format!("http://{}", closed.local_addr().expect("addr"));
    drop(closed);
    let app = TestApp::spawn_with(|c| c.upstream.url = dead).await;
    let body = assert_error(
        app.get(consumptions, &app.reader()).await,
        502,
        "bad_gateway",
    )
    .await;
    assert_valid(&documented(&doc, "get", consumptions, 502), &body, "502");

    // 503: no place in flight at all.
    let app = TestApp::builder()
        .limits(ServerLimits {
            max_in_flight: 0,
            ..ServerLimits::default()
        })
        .spawn()
        .await;
    Mock::given(any())
        .respond_with(consumptions_body())
        .expect(0)
        .mount(&app.upstream)
        .await;
    let response = app.get(consumptions, &app.reader()).await;
    assert!(response.headers().contains_key("retry-after"));
    let body = assert_error(response, 503, "service_unavailable").await;
    assert_valid(&documented(&doc, "get", consumptions, 503), &body, "503");
}

fn consumptions_body() -> ResponseTemplate {
    ok_json(json!({"consumptions": [], "total_count": 0, "updated_at": null}))
}

/// Values just outside what a parameter's documented schema allows, each with why.
fn outside(schema: &Value) -> Vec<(String, &'static str)> {
    let mut bad = Vec::new();
    if let Some(max) = schema["maximum"].as_i64() {
        bad.push(((max + 1).to_string(), "above maximum"));
    }
    if let Some(min) = schema["minimum"].as_i64() {
        bad.push(((min - 1).to_string(), "below minimum"));
    }
    if let Some(max) = schema["maxLength"].as_u64() {
        bad.push(("a".repeat(max as usize + 1), "longer than maxLength"));
    }
    if schema["enum"].is_array() {
        bad.push(("not-one-of-them".into(), "outside the enum"));
    }
    match schema["format"].as_str() {
        Some("uuid") => bad.push(("not-a-uuid".into(), "not a uuid")),
        Some("date-time") => bad.push(("yesterday".into(), "not a date-time")),
        _ => {}
    }
    if schema["pattern"].is_string() {
        let value = if schema["maxLength"].is_number() {
            "a;b"
        } else {
            "2026-13"
        };
        bad.push((value.into(), "against the pattern"));
    }
    if schema["type"] == "boolean" {
        bad.push(("maybe".into(), "not a boolean"));
    }
    bad
}

#[tokio::test]
async fn every_documented_parameter_constraint_is_the_one_enforced() {
    let app = TestApp::spawn().await;
    Mock::given(any())
        .respond_with(ok_json(json!({})))
        .mount(&app.upstream)
        .await;
    let doc = served_document(&app).await;
    let token = app.manager();
    let send = async |method: &str, path: &str, query: &str| {
        app.client
            .request(
                method.parse().expect("method"),
                format!("{}{path}?{query}", app.base),
            )
            .bearer_auth(&token)
            .send()
            .await
            .expect("request")
    };
    let mut refused = 0;
    for (template, methods) in doc["paths"].as_object().expect("paths") {
        for (method, op) in methods.as_object().expect("methods") {
            if op["tags"][0] != "billing" {
                continue;
            }
            let method = method.to_uppercase();
            let path = template.replace("{invoice_id}", INVOICE);
            let params = op["parameters"].as_array().expect("parameters");
            // What every call needs: the required parameters at their examples.
            let required: Vec<String> = params
                .iter()
                .filter(|p| p["in"] == "query" && p["required"] == true)
                .map(|p| {
                    format!(
                        "{}={}",
                        p["name"].as_str().expect("name"),
                        example(&p["schema"])
                    )
                })
                .collect();
            for p in params.iter().filter(|p| p["in"] == "query") {
                let name = p["name"].as_str().expect("name");
                let schema = if p["schema"]["type"] == "array" {
                    &p["schema"]["items"]
                } else {
                    &p["schema"]
                };
                let others: Vec<&String> = required
                    .iter()
                    .filter(|q| !q.starts_with(&format!("{name}=")))
                    .collect();
                let with = |value: &str| {
                    let mut query: Vec<String> = others.iter().map(|q| (*q).clone()).collect();
                    let value: String = form_urlencoded::byte_serialize(value.as_bytes()).collect();
                    query.push(format!("{name}={value}"));
                    query.join("&")
                };
                for (value, why) in outside(schema) {
                    let response = send(&method, &path, &with(&value)).await;
                    let body = assert_error(response, 400, "invalid_arguments").await;
                    assert_eq!(
                        body["details"][0]["argument_name"], name,
                        "{method} {path} {name} {why}"
                    );
                    refused += 1;
                }
                // The bounds themselves are inside.
                for bound in ["maximum", "minimum", "maxLength"] {
                    let Some(n) = schema[bound].as_u64() else {
                        continue;
                    };
                    let value = if bound == "maxLength" {
                        "a".repeat(n as usize)
                    } else {
                        n.to_string()
                    };
                    let response = send(&method, &path, &with(&value)).await;
                    assert_eq!(
                        response.status(),
                        200,
                        "{method} {path} {name}: its {bound}"
                    );
                }
                // Empty is no value: refused when required (minLength 1), dropped otherwise.
                let response = send(&method, &path, &with("")).await;
                match (p["required"].as_bool(), schema["minLength"].as_u64()) {
                    (Some(true), Some(1)) => {
                        let body = assert_error(response, 400, "invalid_arguments").await;
                        assert_eq!(body["details"][0]["reason"], "required", "{name}");
                    }
                    _ => {
                        assert_eq!(p["allowEmptyValue"], true, "{method} {path} {name}");
                        assert_eq!(response.status(), 200, "{method} {path} {name} empty");
                    }
                }
                // A list's maxItems values fit in a request target; one more does not.
                if let Some(max) = p["schema"]["maxItems"].as_u64() {
                    let value = if schema["format"] == "uuid" {
                        INVOICE
                    } else {
                        "a"
                    };
                    let items = |n: u64| vec![format!("{name}={value}"); n as usize].join("&");
                    let at = send(&method, &path, &items(max)).await;
                    assert_ne!(at.status(), 414, "{name}: {max} items");
                    let over = send(&method, &path, &items(max + 1)).await;
                    assert_eq!(over.status(), 414, "{name}: {} items", max + 1);
                }
            }
        }
    }
    assert!(refused > 40, "only {refused} refusals tried");
    // Nothing refused, and no empty value, ever reached the upstream.
    for request in app.upstream_requests().await {
        for (name, value) in request.url.query_pairs() {
            assert!(!value.is_empty(), "{name}= went upstream");
            assert!(
                !value.contains(';') && value != "not-one-of-them",
                "{name}={value}"
            );
        }
    }
}
