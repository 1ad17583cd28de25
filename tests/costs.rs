//! `GET /gateway/v1/costs` and `/gateway/v1/costs/metrics` (contract §12): a caller's costs
//! summed exactly from every page of the organization's consumption, fetched through the cache
//! like any consumption query, scoped by the policy, with the policy's budgets.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use billing_gateway::policy::key_sha256;
use billing_gateway::policy::reload::Reload;
use common::*;
use serde_json::{Value, json};
use time::OffsetDateTime;
use wiremock::matchers::{any, method, path, query_param};
use wiremock::{Mock, ResponseTemplate};

const P1: &str = "aaaaaaaa-0000-4000-8000-000000000001";
const P2: &str = "aaaaaaaa-0000-4000-8000-000000000002";
const P3: &str = "aaaaaaaa-0000-4000-8000-000000000003";
const WEB_KEY: &str = "2d9f4a3e-1c66-4b8d-8e5f-7a8b9c0d1e2f";
const BOTH_KEY: &str = "3e0a5b4f-2d77-4c9e-9f60-8b9c0d1e2f30";
const PURGER_KEY: &str = "4f1b6c50-3e88-4daf-a071-9c0d1e2f3041";
const CLOSED: &str = "2026-11";
const UPDATED: &str = "2026-12-01T03:00:00Z";
const SHORT: Duration = Duration::from_millis(300);
/// Sleeping this long is not synchronisation: an entry growing old is what the stale test is
/// about, and nothing short of a request shows it expired.
const PAST_SHORT: Duration = Duration::from_millis(450);

/// One consumption line of `cents` hundredths plus `nanos` billionths (both may be negative).
fn line(project: &str, category: &str, units: i64, nanos: i32) -> Value {
    json!({
        "value": {"currency_code": "EUR", "units": units, "nanos": nanos},
        "product_name": "x", "project_id": project, "project_name": format!("name-{}", &project[34..]),
        "category_name": category, "sku": "/x", "unit": "hour", "billed_quantity": "1",
    })
}

/// 250 lines over three projects and three categories: amounts of a few cents, many lines of
/// 0.003 (adding across units), and credits.
fn organization() -> Vec<Value> {
    (0..250)
        .map(|i| {
            let project = [P1, P2, P3][i % 3];
            let category = ["Compute", "Storage", "Network"][i % 5 % 3];
            match i % 4 {
                0 => line(project, category, 0, 3_000_000),
                1 => line(project, category, (i as i64) % 7, 990_000_000),
                2 => line(project, category, -((i as i64) % 3), -250_000_000),
                _ => line(project, category, 12, 10_000_000 * (i as i32 % 100)),
            }
        })
        .collect()
}

/// The lines' sum in nanos, in the test's own words: each as units and nanos separately.
fn nanos_of(lines: &[&Value]) -> i128 {
    let units: i128 = lines
        .iter()
        .map(|l| i128::from(l["value"]["units"].as_i64().expect("units")))
        .sum();
    let nanos: i128 = lines
        .iter()
        .map(|l| i128::from(l["value"]["nanos"].as_i64().expect("nanos")))
        .sum();
    units * 1_000_000_000 + nanos
}

/// `money` (a JSON Money) in nanos, checked normalised.
fn money_nanos(money: &Value) -> i128 {
    let (units, nanos) = (
        money["units"].as_i64().expect("units"),
        money["nanos"].as_i64().expect("nanos"),
    );
    assert!(nanos.abs() < 1_000_000_000, "{money}");
    assert!(
        units == 0 || nanos == 0 || units.signum() == nanos.signum(),
        "{money}"
    );
    assert_eq!(money["currency_code"], "EUR");
    i128::from(units) * 1_000_000_000 + i128::from(nanos)
}

/// Serves `lines` as the period's consumption list, 100 a page; each page must be asked for
/// `expect` times.
async fn serve_pages(app: &TestApp, period: &str, lines: &[Value], updated_at: &str, expect: u64) {
    let pages: Vec<&[Value]> = lines.chunks(100).collect();
    for (i, page) in pages.iter().enumerate() {
        Mock::given(method("GET"))
            .and(path("/billing/v2beta1/consumptions"))
            .and(query_param("organization_id", ORG))
            .and(query_param("billing_period", period))
            .and(query_param("page_size", "100"))
            .and(query_param("page", (i + 1).to_string()))
            .respond_with(ok_json(json!({
                "consumptions": page, "total_count": lines.len(), "updated_at": updated_at,
            })))
            .expect(expect)
            .mount(&app.upstream)
            .await;
    }
}

fn keys() -> String {
    let key = |name: &str, key: &str, role: &str, projects: &str| {
        format!(
            "[[keys]]\nname = \"{name}\"\nsha256 = \"{}\"\nroles = [\"{role}\"]\n{projects}\n",
            key_sha256(&key.parse().expect("uuid"))
        )
    };
    [
        key(
            "web-costs",
            WEB_KEY,
            "billing-read-only",
            &format!("projects = [\"{P1}\"]"),
        ),
        key(
            "two-projects",
            BOTH_KEY,
            "billing-read-only",
            &format!("projects = [\"{P1}\", \"{P2}\"]"),
        ),
        key("purger", PURGER_KEY, "purger", ""),
        "[roles.purger]\npermissions = [\"cache:purge\"]\n".to_owned(),
    ]
    .concat()
}

fn budgets(p1: &str) -> String {
    format!(
        "[[budgets]]\nproject = \"{P1}\"\nmonthly = \"{p1}\"\n\n[[budgets]]\nproject = \"{P3}\"\nmonthly = \"10 EUR\"\n"
    )
}

async fn spawn() -> TestApp {
    TestApp::builder()
        .policy(&[
            ("default.toml", DEFAULT_POLICY),
            ("keys.toml", &keys()),
            ("budgets.toml", &budgets("500.00 EUR")),
        ])
        .spawn()
        .await
}

async fn get_with_key(app: &TestApp, path_and_query: &str, key: &str) -> reqwest::Response {
    app.client
        .get(format!("{}{}", app.base, path_and_query))
        .header("x-auth-token", key)
        .send()
        .await
        .expect("request")
}

async fn json_of(r: reqwest::Response) -> Value {
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-type"), "application/json");
    r.json().await.expect("json")
}

#[tokio::test]
async fn totals_are_the_exact_sum_of_every_page_credits_included() {
    let app = spawn().await;
    let lines = organization();
    serve_pages(&app, CLOSED, &lines, UPDATED, 1).await;
    let costs = json_of(
        app.get(
            &format!("/gateway/v1/costs?billing_period={CLOSED}"),
            &app.reader(),
        )
        .await,
    )
    .await;

    assert_eq!(costs["billing_period"], CLOSED);
    assert_eq!(costs["updated_at"], UPDATED);
    assert!(
        costs.get("forecast").is_none(),
        "a closed period has no forecast: {costs}"
    );
    let all: Vec<&Value> = lines.iter().collect();
    assert_eq!(money_nanos(&costs["total"]), nanos_of(&all));
    let projects = costs["projects"].as_array().expect("projects");
    assert_eq!(projects.len(), 3);
    let mut previous = i128::MAX;
    for p in projects {
        let id = p["project_id"].as_str().expect("id");
        let own: Vec<&Value> = lines.iter().filter(|l| l["project_id"] == id).collect();
        let total = money_nanos(&p["total"]);
        assert_eq!(total, nanos_of(&own), "{id}");
        assert!(total <= previous, "largest first");
        previous = total;
        assert_eq!(p["project_name"], format!("name-{}", &id[34..]));
        let mut previous_category = i128::MAX;
        for c in p["categories"].as_array().expect("categories") {
            let of: Vec<&Value> = own
                .iter()
                .copied()
                .filter(|l| l["category_name"] == c["category_name"])
                .collect();
            let sum = money_nanos(&c["total"]);
            assert_eq!(sum, nanos_of(&of), "{id} {}", c["category_name"]);
            assert!(sum <= previous_category, "largest first");
            previous_category = sum;
        }
    }
    // P1's budget: used ratio against 500 EUR; P2 has none.
    let p1 = projects.iter().find(|p| p["project_id"] == P1).expect("p1");
    let used = p1["budget"]["used_ratio"].as_f64().expect("ratio");
    let expected = nanos_of(
        &lines
            .iter()
            .filter(|l| l["project_id"] == P1)
            .collect::<Vec<_>>(),
    ) as f64
        / 500e9;
    assert!((used - expected).abs() < 1e-12, "{used} {expected}");
    assert_eq!(
        p1["budget"]["monthly"],
        json!({"currency_code": "EUR", "units": 500, "nanos": 0})
    );
    assert!(
        projects
            .iter()
            .find(|p| p["project_id"] == P2)
            .expect("p2")
            .get("budget")
            .is_none()
    );
    app.upstream.verify().await;
}

#[tokio::test]
async fn the_current_period_has_a_linear_month_end_forecast() {
    let app = spawn().await;
    let now = OffsetDateTime::now_utc();
    let period = format!("{:04}-{:02}", now.year(), u8::from(now.month()));
    // One day of the month elapsed, one euro spent: the month's days in euros.
    let updated = format!("{period}-02T00:00:00Z");
    serve_pages(&app, &period, &[line(P1, "Compute", 1, 0)], &updated, 1).await;
    let costs = json_of(app.get("/gateway/v1/costs", &app.reader()).await).await;
    let days = i128::from(now.month().length(now.year()));
    assert_eq!(costs["billing_period"], period);
    assert_eq!(money_nanos(&costs["forecast"]), days * 1_000_000_000);
    let p1 = &costs["projects"][0];
    assert_eq!(money_nanos(&p1["forecast"]), days * 1_000_000_000);
    let ratio = p1["budget"]["forecast_ratio"].as_f64().expect("ratio");
    assert!((ratio - days as f64 / 500.0).abs() < 1e-12, "{ratio}");
}

#[tokio::test]
async fn a_project_scoped_key_sees_only_its_projects_and_its_totals_exclude_the_others() {
    let app = spawn().await;
    let lines = organization();
    serve_pages(&app, CLOSED, &lines, UPDATED, 1).await;
    let url = format!("/gateway/v1/costs?billing_period={CLOSED}");
    let sum_of = |projects: &[&str]| {
        nanos_of(
            &lines
                .iter()
                .filter(|l| projects.iter().any(|p| l["project_id"] == *p))
                .collect::<Vec<_>>(),
        )
    };

    let one = json_of(get_with_key(&app, &url, WEB_KEY).await).await;
    let ids: Vec<&str> = one["projects"]
        .as_array()
        .expect("projects")
        .iter()
        .map(|p| p["project_id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids, [P1]);
    assert_eq!(money_nanos(&one["total"]), sum_of(&[P1]));

    let two = json_of(get_with_key(&app, &url, BOTH_KEY).await).await;
    let mut ids: Vec<&str> = two["projects"]
        .as_array()
        .expect("projects")
        .iter()
        .map(|p| p["project_id"].as_str().expect("id"))
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, [P1, P2]);
    assert_eq!(money_nanos(&two["total"]), sum_of(&[P1, P2]));
    // The scope is the policy's: a project in the query is an unknown parameter, not a wider view.
    let r = get_with_key(&app, &format!("{url}&project_id={P3}"), WEB_KEY).await;
    assert_error(r, 400, "invalid_arguments").await;
    // Both keys were answered from the one organization-wide fetch (each page expected once).
    app.upstream.verify().await;
    for r in app.upstream_requests().await {
        assert!(
            !r.url.query().unwrap_or_default().contains("project_id"),
            "{}",
            r.url
        );
    }
}

#[tokio::test]
async fn twenty_teams_asking_at_once_make_one_upstream_call_per_page() {
    let app = spawn().await;
    serve_pages(&app, CLOSED, &organization(), UPDATED, 1).await;
    let url = format!("/gateway/v1/costs?billing_period={CLOSED}");
    let asks = (0..20).map(|i| {
        let (app, url) = (&app, &url);
        async move {
            let r = if i % 2 == 0 {
                app.get(url, &reader_as(&format!("team-{i}"))).await
            } else {
                get_with_key(app, url, WEB_KEY).await
            };
            json_of(r).await["total"].clone()
        }
    });
    let totals = futures_util::future::join_all(asks).await;
    let org_wide: Vec<&Value> = totals.iter().step_by(2).collect();
    assert!(org_wide.windows(2).all(|w| w[0] == w[1]), "{totals:?}");
    app.upstream.verify().await;
    assert_eq!(app.upstream_requests().await.len(), 3);
}

#[tokio::test]
async fn a_failing_upstream_serves_stale_figures_with_their_updated_at() {
    let app = TestApp::builder()
        .policy(&[("default.toml", DEFAULT_POLICY)])
        .config(|c| {
            c.cache.ttl = SHORT;
            c.cache.closed_ttl = SHORT;
        })
        .spawn()
        .await;
    let lines = organization();
    serve_pages(&app, CLOSED, &lines, UPDATED, 1).await;
    let url = format!("/gateway/v1/costs?billing_period={CLOSED}");
    let fresh = json_of(app.get(&url, &app.reader()).await).await;

    tokio::time::sleep(PAST_SHORT).await;
    app.upstream.reset().await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(500).set_body_raw("{}", "application/json"))
        .expect(1..)
        .mount(&app.upstream)
        .await;
    let stale = json_of(app.get(&url, &app.reader()).await).await;
    assert_eq!(stale, fresh);
    assert_eq!(stale["updated_at"], UPDATED);
    app.upstream.verify().await;
}

#[tokio::test]
async fn an_upstream_failure_with_nothing_cached_is_a_502_and_a_second_currency_too() {
    let app = spawn().await;
    Mock::given(query_param("billing_period", CLOSED))
        .respond_with(ResponseTemplate::new(500).set_body_raw("{}", "application/json"))
        .mount(&app.upstream)
        .await;
    let r = app
        .get(
            &format!("/gateway/v1/costs?billing_period={CLOSED}"),
            &app.reader(),
        )
        .await;
    assert_eq!(r.status(), 502);

    let mut lines = vec![line(P1, "Compute", 1, 0), line(P2, "Compute", 1, 0)];
    lines[1]["value"]["currency_code"] = json!("USD");
    serve_pages(&app, "2026-10", &lines, UPDATED, 1).await;
    // Even a caller who sees only P1: the organization's list is the upstream's error.
    let r = get_with_key(&app, "/gateway/v1/costs?billing_period=2026-10", WEB_KEY).await;
    assert_error(r, 502, "bad_gateway").await;
}

#[tokio::test]
async fn bad_periods_and_unknown_parameters_are_refused_before_anything_goes_upstream() {
    let app = spawn().await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(200))
        .expect(0)
        .mount(&app.upstream)
        .await;
    for (query, argument, reason) in [
        ("billing_period=2026-13", "billing_period", "format"),
        ("billing_period=26-01", "billing_period", "format"),
        (
            "billing_period=2026-01&billing_period=2026-02",
            "billing_period",
            "constraint",
        ),
        ("page=2", "page", "unknown"),
    ] {
        let r = app
            .get(&format!("/gateway/v1/costs?{query}"), &app.reader())
            .await;
        let body = assert_error(r, 400, "invalid_arguments").await;
        assert_eq!(body["details"][0]["argument_name"], argument, "{query}");
        assert_eq!(body["details"][0]["reason"], reason, "{query}");
    }
    // Checked before the credential, like a Billing call's parameters.
    let r = app
        .client
        .get(format!("{}/gateway/v1/costs?page=1", app.base))
        .send()
        .await
        .expect("request");
    assert_error(r, 400, "invalid_arguments").await;
    let r = app
        .get("/gateway/v1/costs/metrics?x=1", &app.reader())
        .await;
    assert_error(r, 400, "invalid_arguments").await;
}

/// `cents` as the exact decimal the exposition writes (`101.75`, `97.5`, `100`).
fn decimal_cents(cents: u32) -> String {
    match cents % 100 {
        0 => (cents / 100).to_string(),
        r if r % 10 == 0 => format!("{}.{}", cents / 100, r / 10),
        r => format!("{}.{r:02}", cents / 100),
    }
}

/// The value of the one sample of `series` with exactly these labels (in this order).
fn sample(text: &str, series: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ').map(str::to_owned))
}

#[tokio::test]
async fn cost_metrics_refuse_a_missing_credential_and_a_scoped_scraper_gets_only_its_series() {
    let app = spawn().await;
    let now = OffsetDateTime::now_utc();
    let period = format!("{:04}-{:02}", now.year(), u8::from(now.month()));
    let updated = format!("{period}-02T00:00:00Z");
    let lines = vec![
        line(P1, "Compute", 2, 500_000_000),
        line(P1, "Compute", 0, -250_000_000),
        line(P1, "Object Storage", 1, 0),
        line(P2, "Compute", 7, 0),
    ];
    serve_pages(&app, &period, &lines, &updated, 1).await;
    let url = format!("{}/gateway/v1/costs/metrics", app.base);

    let r = app.client.get(&url).send().await.expect("request");
    assert!(r.headers().contains_key("www-authenticate"));
    assert_error(r, 401, "denied_authentication").await;
    let r = app
        .client
        .get(&url)
        .bearer_auth(PURGER_KEY)
        .send()
        .await
        .expect("request");
    assert_error(r, 403, "permissions_denied").await;

    // As Prometheus sends a gateway key: `authorization` in the scrape config.
    let r = app
        .client
        .get(&url)
        .bearer_auth(WEB_KEY)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 200);
    assert!(header(&r, "content-type").starts_with("text/plain; version=0.0.4"));
    let text = r.text().await.expect("text");
    let days = now.month().length(now.year());
    let cost = |p: &str, c: &str| {
        format!(
            "billing_gateway_cost{{project_id=\"{p}\",category_name=\"{c}\",currency_code=\"EUR\"}}"
        )
    };
    assert_eq!(sample(&text, &cost(P1, "Compute")).as_deref(), Some("2.25"));
    assert_eq!(
        sample(&text, &cost(P1, "Object Storage")).as_deref(),
        Some("1")
    );
    // 3.25 EUR in the month's first day: its days times that.
    assert_eq!(
        sample(
            &text,
            &format!("billing_gateway_cost_forecast{{project_id=\"{P1}\",currency_code=\"EUR\"}}")
        ),
        Some(decimal_cents(u32::from(days) * 325)),
    );
    assert_eq!(
        sample(
            &text,
            &format!("billing_gateway_budget{{project_id=\"{P1}\",currency_code=\"EUR\"}}")
        )
        .as_deref(),
        Some("500")
    );
    let updated_at =
        OffsetDateTime::parse(&updated, &time::format_description::well_known::Rfc3339)
            .expect("time");
    assert_eq!(
        sample(&text, "billing_gateway_cost_updated_timestamp_seconds"),
        Some(updated_at.unix_timestamp().to_string())
    );
    assert!(!text.contains(P2) && !text.contains(P3), "{text}");

    // An organization-wide scraper sees every project, from the cache.
    let all = app
        .client
        .get(&url)
        .bearer_auth(app.reader())
        .send()
        .await
        .expect("request")
        .text()
        .await
        .expect("text");
    assert_eq!(sample(&all, &cost(P2, "Compute")).as_deref(), Some("7"));
    // P3 has a budget and no line: shown at zero with its budget.
    assert_eq!(
        sample(
            &all,
            &format!("billing_gateway_budget{{project_id=\"{P3}\",currency_code=\"EUR\"}}")
        )
        .as_deref(),
        Some("10")
    );
    app.upstream.verify().await;
}

#[tokio::test]
async fn budgets_reload_and_show_in_whoami_for_the_callers_projects() {
    let app = TestApp::builder()
        .policy(&[
            ("default.toml", DEFAULT_POLICY),
            ("keys.toml", &keys()),
            ("budgets.toml", &budgets("500.00 EUR")),
        ])
        .poll(Duration::from_secs(3600))
        .spawn()
        .await;
    serve_pages(&app, CLOSED, &[line(P1, "Compute", 100, 0)], UPDATED, 1).await;
    let url = format!("/gateway/v1/costs?billing_period={CLOSED}");
    let budget = |costs: &Value| costs["projects"][0]["budget"].clone();
    let costs = json_of(get_with_key(&app, &url, WEB_KEY).await).await;
    assert_eq!(budget(&costs)["used_ratio"], json!(0.2));

    let whoami = json_of(get_with_key(&app, "/gateway/v1/whoami", WEB_KEY).await).await;
    assert_eq!(
        whoami["budgets"],
        json!([{"project_id": P1, "monthly": {"currency_code": "EUR", "units": 500, "nanos": 0}}])
    );
    let whoami = json_of(app.get("/gateway/v1/whoami", &app.reader()).await).await;
    assert_eq!(
        whoami["budgets"].as_array().map(Vec::len),
        Some(2),
        "{whoami}"
    );

    let file = app.policy_dir().join("budgets.toml");
    std::fs::write(&file, budgets("250.5 EUR")).expect("write");
    assert!(matches!(app.policy().reload(), Reload::Applied));
    let costs = json_of(get_with_key(&app, &url, WEB_KEY).await).await;
    assert_eq!(
        budget(&costs)["monthly"],
        json!({"currency_code": "EUR", "units": 250, "nanos": 500_000_000})
    );

    std::fs::write(&file, budgets("250,5 EUR")).expect("write");
    match app.policy().reload() {
        Reload::Rejected(e) => assert_eq!(
            e.to_string(),
            format!(
                "{}:3: monthly: `250,5` is not an amount: use digits with at most nine decimals, such as 500.00",
                file.display()
            )
        ),
        other => panic!("expected a rejection, got {other:?}"),
    }
    let costs = json_of(get_with_key(&app, &url, WEB_KEY).await).await;
    assert_eq!(
        budget(&costs)["monthly"]["units"],
        250,
        "the last good policy stays"
    );
}

#[test]
fn check_fails_at_the_line_of_a_bad_budget() {
    let dir = tempfile::tempdir().expect("tmp");
    let default = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/default.toml");
    std::fs::copy(default, dir.path().join("default.toml")).expect("copy");
    for (text, line, says) in [
        (
            format!("[[budgets]]\nproject = \"{P1}\"\nmonthly = \"500.00 EUR\"\n"),
            0,
            "",
        ),
        (
            "\n[[budgets]]\nproject = \"web\"\nmonthly = \"1 EUR\"\n".to_owned(),
            3,
            "project `web` is not a UUID",
        ),
        (
            format!("[[budgets]]\nproject = \"{P1}\"\nmonthly = \"1 euros\"\n"),
            3,
            "is not a currency",
        ),
        (
            format!(
                "[[budgets]]\nproject = \"{P1}\"\nmonthly = \"1 EUR\"\n[[budgets]]\nproject = \"{P1}\"\nmonthly = \"2 EUR\"\n"
            ),
            5,
            "already has a budget",
        ),
    ] {
        let file = dir.path().join("budgets.toml");
        std::fs::write(&file, &text).expect("write");
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_billing-gateway"))
            .arg("check")
            .env_clear()
            .env("SCW_SECRET_KEY", SECRET_KEY)
            .env("SCW_DEFAULT_ORGANIZATION_ID", ORG)
            .env("GATEWAY_JWT_HS256_SECRET", HS256)
            .env("GATEWAY_POLICY_DIR", dir.path())
            .output()
            .expect("the binary runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        if line == 0 {
            assert!(out.status.success(), "{stderr}");
            assert!(String::from_utf8_lossy(&out.stdout).contains("budgets: 1"));
        } else {
            assert_eq!(out.status.code(), Some(1), "{text}");
            let located = format!("{}:{line}: ", file.display());
            assert!(
                stderr.contains(&located) && stderr.contains(says),
                "{text}\n{stderr}"
            );
        }
    }
}

/// The upstream of [`the_pages_after_the_first_are_asked_four_at_a_time`]: serves `lines` by
/// pages of 100, holding every page but the first until four are in flight at once (or a hang
/// guard passes), and notes what it was asked.
/// One upstream request: its `X-Auth-Token` and query.
type Asked = (Option<String>, HashMap<String, String>);

#[derive(Clone)]
struct GatedPages {
    lines: Arc<Vec<Value>>,
    in_flight: Arc<AtomicUsize>,
    most: Arc<AtomicUsize>,
    gate: Arc<tokio::sync::watch::Sender<bool>>,
    asked: Arc<Mutex<Vec<Asked>>>,
}

async fn gated_page(
    axum::extract::State(up): axum::extract::State<GatedPages>,
    headers: axum::http::HeaderMap,
    axum::extract::Query(query): axum::extract::Query<HashMap<String, String>>,
) -> axum::Json<Value> {
    let token = headers
        .get("x-auth-token")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    up.asked.lock().expect("lock").push((token, query.clone()));
    let number: usize = query["page"].parse().expect("page");
    if number > 1 {
        let now = up.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        up.most.fetch_max(now, Ordering::SeqCst);
        if now >= 4 {
            up.gate.send_replace(true);
        }
        let mut open = up.gate.subscribe();
        // A hang guard, not a timing: one page at a time never opens the gate.
        let _ = tokio::time::timeout(SLOW, open.wait_for(|open| *open)).await;
        up.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
    let page: Vec<&Value> = up.lines.iter().skip((number - 1) * 100).take(100).collect();
    axum::Json(json!({
        "consumptions": page, "total_count": up.lines.len(), "updated_at": UPDATED,
    }))
}

/// A cold costs request asks the first page, then the others together, four at a time (so a
/// scrape waits about one turn of the budget, not one per page): the upstream sees four pages
/// in flight at once and never more, each page once, with the key and the organization.
#[tokio::test]
async fn the_pages_after_the_first_are_asked_four_at_a_time() {
    let lines: Vec<Value> = (0..650)
        .map(|i| line([P1, P2, P3][i % 3], "Compute", (i % 5) as i64, 10_000_000))
        .collect();
    let upstream = GatedPages {
        lines: Arc::new(lines.clone()),
        in_flight: Default::default(),
        most: Default::default(),
        gate: Arc::new(tokio::sync::watch::channel(false).0),
        asked: Default::default(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let router = axum::Router::new()
        .route(
            "/billing/v2beta1/consumptions",
            axum::routing::get(gated_page),
        )
        .with_state(upstream.clone());
    tokio::spawn(async move { axum::serve(listener, router).await });
    let app = TestApp::builder()
        .policy(&[("default.toml", DEFAULT_POLICY), ("keys.toml", &keys())])
        .upstream_url(url)
        .spawn()
        .await;

    let costs = json_of(
        get_with_key(
            &app,
            &format!("/gateway/v1/costs?billing_period={CLOSED}"),
            BOTH_KEY,
        )
        .await,
    )
    .await;

    let mine: Vec<&Value> = lines
        .iter()
        .filter(|l| l["project_id"] == P1 || l["project_id"] == P2)
        .collect();
    assert_eq!(money_nanos(&costs["total"]), nanos_of(&mine), "{costs}");
    assert_eq!(upstream.most.load(Ordering::SeqCst), 4);
    let asked = upstream.asked.lock().expect("lock").clone();
    let mut pages: Vec<usize> = asked
        .iter()
        .map(|(_, q)| q["page"].parse().expect("page"))
        .collect();
    assert_eq!(pages[0], 1, "the first page first");
    pages.sort_unstable();
    assert_eq!(pages, (1..=7).collect::<Vec<_>>());
    for (token, query) in &asked {
        assert_eq!(token.as_deref(), Some(SECRET_KEY));
        assert_eq!(query["organization_id"], ORG);
        assert_eq!(query["billing_period"], CLOSED);
        assert_eq!(query["page_size"], "100");
    }
}
