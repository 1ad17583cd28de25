//! The OpenAPI document describes exactly what the gateway serves: every operation and parameter
//! it lists is accepted and forwarded as described.

mod common;

use common::*;
use serde_json::Value;
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
