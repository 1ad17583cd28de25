//! Gateway keys: a UUID in `X-Auth-Token` (what unmodified SDKs send as their secret key) is a
//! principal named by its `[[keys]]` entry, allowed what its roles and projects allow.

mod common;

use std::process::Command;

use billing_gateway::config::Config;
use billing_gateway::policy::key_sha256;
use common::*;
use serde_json::{Value, json};
use wiremock::matchers::{any, header, method, path};
use wiremock::{Mock, ResponseTemplate};

const READER_KEY: &str = "0b7d2e1c-9a44-4f6b-8c3d-5e6f7a8b9c0d";
const MANAGER_KEY: &str = "1c8e3f2d-0b55-4a7c-9d4e-6f7a8b9c0d1e";
const WEB_KEY: &str = "2d9f4a3e-1c66-4b8d-8e5f-7a8b9c0d1e2f";
const P1: &str = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee";

fn entry(name: &str, key: &str, roles: &str, extra: &str) -> String {
    format!(
        "[[keys]]\nname = \"{name}\"\nsha256 = \"{}\"\nroles = [\"{roles}\"]\n{extra}\n",
        key_sha256(&key.parse().expect("uuid"))
    )
}

/// A gateway whose policy folder is the shipped default.toml plus `keys.toml`.
async fn spawn_with_policy_keys(keys: &str, edit: impl FnOnce(&mut Config)) -> TestApp {
    TestApp::builder()
        .policy(&[("default.toml", DEFAULT_POLICY), ("keys.toml", keys)])
        .config(edit)
        .spawn()
        .await
}

async fn spawn_with_keys() -> TestApp {
    let keys = [
        entry("nightly-report", READER_KEY, "billing-read-only", ""),
        entry("finance-sync", MANAGER_KEY, "billing-manager", ""),
        entry(
            "web-costs",
            WEB_KEY,
            "billing-read-only",
            &format!("projects = [\"{P1}\"]"),
        ),
    ]
    .concat();
    spawn_with_policy_keys(&keys, |_| {}).await
}

async fn get_with_key(app: &TestApp, path_and_query: &str, key: &str) -> reqwest::Response {
    app.client
        .get(format!("{}{}", app.base, path_and_query))
        .header("x-auth-token", key)
        .send()
        .await
        .expect("request")
}

/// The upstream of `app` must see no call at all.
async fn nothing_goes_upstream(app: &TestApp) {
    Mock::given(any())
        .respond_with(ResponseTemplate::new(200))
        .expect(0)
        .mount(&app.upstream)
        .await;
}

/// The message of the 403 `key` gets for `path_and_query`.
async fn denied(app: &TestApp, path_and_query: &str, key: &str) -> String {
    let body = assert_error(
        get_with_key(app, path_and_query, key).await,
        403,
        "permissions_denied",
    )
    .await;
    body["message"].as_str().expect("a message").to_owned()
}

#[tokio::test]
async fn a_gateway_key_is_allowed_what_its_roles_allow() {
    let app = spawn_with_keys().await;
    Mock::given(method("GET"))
        .and(path("/billing/v2beta1/consumptions"))
        .and(header("x-auth-token", SECRET_KEY))
        .respond_with(ok_json(json!({"consumptions": [], "total_count": 0})))
        .expect(1)
        .mount(&app.upstream)
        .await;
    Mock::given(method("GET"))
        .and(path("/billing/v2beta1/invoices"))
        .and(header("x-auth-token", SECRET_KEY))
        .respond_with(ok_json(json!({"invoices": [], "total_count": 0})))
        .expect(1)
        .mount(&app.upstream)
        .await;

    let r = get_with_key(&app, "/billing/v2beta1/consumptions", READER_KEY).await;
    assert_eq!(r.status(), 200);
    // The reader key may not list invoices; the message names the permission it lacks.
    let message = denied(&app, "/billing/v2beta1/invoices", READER_KEY).await;
    assert!(
        message.contains("`invoices:read`") && message.contains("billing-read-only"),
        "{message}"
    );
    // The manager key may, and an SDK may send it in upper case.
    let r = get_with_key(
        &app,
        "/billing/v2beta1/invoices",
        &MANAGER_KEY.to_uppercase(),
    )
    .await;
    assert_eq!(r.status(), 200);

    let sent = app.upstream_requests().await;
    assert_eq!(sent.len(), 2, "the denied call went upstream");
    for request in &sent {
        let headers = format!("{:?}", request.headers).to_lowercase();
        assert!(!headers.contains(READER_KEY) && !headers.contains(MANAGER_KEY));
        assert_eq!(
            request.url.query(),
            Some(format!("organization_id={ORG}").as_str())
        );
    }
}

#[tokio::test]
async fn a_project_scoped_key_gets_its_project_filled_in() {
    let app = spawn_with_keys().await;
    Mock::given(any())
        .respond_with(ok_json(json!({"total_count": 0})))
        .expect(2)
        .mount(&app.upstream)
        .await;

    let r = get_with_key(
        &app,
        "/billing/v2beta1/consumptions?billing_period=2026-07",
        WEB_KEY,
    )
    .await;
    assert_eq!(r.status(), 200);
    let r = get_with_key(&app, "/billing/v2beta1/charges?page_size=500", WEB_KEY).await;
    assert_eq!(r.status(), 200);
    let message = denied(&app, "/billing/v2beta1/taxes", WEB_KEY).await;
    assert!(
        message.contains("limited to projects")
            && message.contains("organization-wide grant")
            && !message.contains("project_id"),
        "{message}"
    );

    let sent = app.upstream_requests().await;
    let queries: Vec<_> = sent
        .iter()
        .map(|r| (r.url.path().to_owned(), r.url.query().map(str::to_owned)))
        .collect();
    assert_eq!(
        queries,
        [
            (
                "/billing/v2beta1/consumptions".to_owned(),
                Some(format!("billing_period=2026-07&project_id={P1}"))
            ),
            (
                "/billing/v2beta1/charges".to_owned(),
                Some(format!(
                    "organization_id={ORG}&page_size=500&project_ids={P1}"
                ))
            ),
        ]
    );
}

#[tokio::test]
async fn an_unknown_key_is_refused_and_nothing_goes_upstream() {
    let app = spawn_with_keys().await;
    nothing_goes_upstream(&app).await;
    let r = get_with_key(
        &app,
        "/billing/v2beta1/consumptions",
        "3e0a5b4f-2d77-4c9e-9f60-8b9c0d1e2f3a",
    )
    .await;
    assert!(r.headers().contains_key("www-authenticate"));
    let body = assert_error(r, 401, "denied_authentication").await;
    assert_eq!(body["method"], "api_key");
    assert_eq!(body["reason"], "not_found");
    assert!(app.upstream_requests().await.is_empty());
}

#[tokio::test]
async fn whoami_describes_a_key_principal() {
    let app = spawn_with_keys().await;
    let who: Value = get_with_key(&app, "/gateway/v1/whoami", WEB_KEY)
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(who["subject"], "web-costs");
    assert_eq!(
        who["grants"],
        json!([{"roles": ["billing-read-only"], "permissions": ["consumption:read"], "projects": [P1]}])
    );
    assert_eq!(who["permissions"], json!(["consumption:read"]));
}

fn key_new(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_billing-gateway"))
        .args(["key", "new"])
        .args(args)
        .env_clear()
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("the binary runs")
}

#[tokio::test]
async fn key_new_prints_a_key_that_its_printed_entry_authenticates() {
    let out = key_new(&["--name", "ci-report", "--projects", P1]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = stdout
        .lines()
        .map(str::trim)
        .find(|l| uuid::Uuid::try_parse(l).is_ok())
        .expect("the key is printed on a line of its own")
        .to_owned();
    let entry = &stdout[stdout.find("[[keys]]").expect("the entry is printed")..];
    assert!(!entry.contains(&key), "the entry must hold only the hash");
    assert!(entry.contains(&key_sha256(&key.parse().expect("uuid"))));

    let app = spawn_with_policy_keys(entry, |_| {}).await;
    Mock::given(any())
        .respond_with(ok_json(json!({"consumptions": []})))
        .expect(1)
        .mount(&app.upstream)
        .await;
    let r = get_with_key(&app, "/billing/v2beta1/consumptions", &key).await;
    assert_eq!(r.status(), 200);
    let sent = app.upstream_requests().await;
    assert_eq!(
        sent[0].url.query(),
        Some(format!("project_id={P1}").as_str())
    );
    let who: Value = get_with_key(&app, "/gateway/v1/whoami", &key)
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(who["subject"], "ci-report");
    assert_eq!(who["grants"][0]["roles"], json!(["billing-read-only"]));

    // Two runs never print the same key.
    let again = String::from_utf8_lossy(&key_new(&["--name", "ci-report"]).stdout).into_owned();
    assert!(!again.contains(&key));
}

#[test]
fn key_new_refuses_bad_names_projects_and_roles() {
    for (args, says) in [
        (&["--name", "ci report"][..], "--name `ci report`"),
        (
            &["--name", "ci", "--projects", "not-a-uuid"][..],
            "--projects: `not-a-uuid`",
        ),
        (
            &["--name", "ci", "--roles", "billing-admin"][..],
            "unknown role `billing-admin`",
        ),
    ] {
        let out = key_new(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "no key printed on failure");
    }
}

#[tokio::test]
async fn gateway_keys_alone_are_a_valid_deployment() {
    let app = spawn_with_policy_keys(
        &entry("finance-sync", MANAGER_KEY, "billing-manager", ""),
        |c| c.auth.hs256_secret = None,
    )
    .await;
    Mock::given(any())
        .respond_with(ok_json(json!({"invoices": []})))
        .expect(1)
        .mount(&app.upstream)
        .await;
    let response = get_with_key(&app, "/billing/v2beta1/invoices", MANAGER_KEY).await;
    assert_eq!(response.status(), 200);
    // With no JWT method enabled, a JWT is simply not accepted.
    assert_error(
        app.get("/billing/v2beta1/invoices", &app.manager()).await,
        401,
        "denied_authentication",
    )
    .await;
}

/// Prometheus's `authorization` sends a gateway key as a bearer token (contract §12): it is the
/// same key there as in `X-Auth-Token`, and only the secret key goes upstream.
#[tokio::test]
async fn a_gateway_key_sent_as_a_bearer_token_is_that_key() {
    let app = spawn_with_keys().await;
    Mock::given(any())
        .respond_with(ok_json(json!({"consumptions": [], "total_count": 0})))
        .expect(1)
        .mount(&app.upstream)
        .await;
    let r = app.get("/billing/v2beta1/consumptions", READER_KEY).await;
    assert_eq!(r.status(), 200);
    let sent = app.upstream_requests().await;
    assert_eq!(sent.len(), 1);
    let token = sent[0]
        .headers
        .get("x-auth-token")
        .and_then(|v| v.to_str().ok());
    assert_eq!(token, Some(SECRET_KEY));
    assert!(!sent[0].headers.contains_key("authorization"));
    // An unknown key in that header is an unknown key, not a malformed JWT.
    let r = app
        .get(
            "/billing/v2beta1/consumptions",
            WEB_KEY.replace('2', "3").as_str(),
        )
        .await;
    let body = assert_error(r, 401, "denied_authentication").await;
    assert_eq!(body["method"], "api_key");
}
