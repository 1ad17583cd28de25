//! What the on-call engineer opens, checked against the real gateway: every metric the alert
//! rules, the Grafana dashboard and the README name exists on a running gateway's `/metrics`;
//! the dashboard is valid JSON with its data source a variable; every alert is documented and
//! unit-tested; the caller's trace is carried upstream; the reload, key-fetch and sharing
//! metrics follow what happens. (The OTLP export has its own test binary, `tests/otlp.rs`: it
//! installs the process's one global subscriber.)

mod common;
#[path = "common/jwks.rs"]
mod idp;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use billing_gateway::telemetry::trace::parse_traceparent;
use common::*;
use serde_json::{Value, json};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const CONSUMPTIONS: &str = "/billing/v2beta1/consumptions";
const INVOICES: &str = "/billing/v2beta1/invoices";
const TAXES: &str = "/billing/v2beta1/taxes";
/// The W3C specification's own example.
const CALLER_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const CALLER_PARENT: &str = "b7ad6b7169203331";

fn read(file: &str) -> String {
    std::fs::read_to_string(format!("{ROOT}/{file}")).unwrap_or_else(|e| panic!("{file}: {e}"))
}

/// Every `billing_gateway_*` name in `text` (PromQL identifiers, names in prose alike).
fn metric_names(text: &str) -> BTreeSet<String> {
    let is_name = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_';
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("billing_gateway_") {
        // Part of a longer identifier (`x_billing_gateway_...`) is not a metric name.
        let preceded = rest[..at].chars().next_back().is_some_and(is_name);
        let tail = &rest[at..];
        let end = tail.find(|c: char| !is_name(c)).unwrap_or(tail.len());
        let name = &tail[..end];
        if !preceded && !name.ends_with('_') {
            names.insert(name.to_owned());
        }
        rest = &tail[end..];
    }
    names
}

/// The names of the README's metrics table, which leaves out the common prefix.
fn readme_table_names(readme: &str) -> BTreeSet<String> {
    let table = readme
        .split_once("| metric | type | labels | meaning |")
        .expect("the README's metrics table")
        .1;
    table
        .lines()
        .skip(2)
        .take_while(|line| line.starts_with('|'))
        .map(|line| {
            let cell = line.split('`').nth(1).expect("a `name` in the first cell");
            format!("billing_gateway_{cell}")
        })
        .collect()
}

/// The values `label="v"` and `label=~"a|b"` matchers in `text` ask of `label`.
fn matched_values(text: &str, label: &str) -> BTreeSet<String> {
    let mut values = BTreeSet::new();
    for (op, split) in [("=\"", false), ("=~\"", true)] {
        let pattern = format!("{label}{op}");
        for (at, _) in text.match_indices(&pattern) {
            let value = &text[at + pattern.len()..];
            let Some(end) = value.find('"') else { continue };
            if split {
                values.extend(value[..end].split('|').map(str::to_owned));
            } else {
                values.insert(value[..end].to_owned());
            }
        }
    }
    values
}

/// The exposition's samples: name → the label sets seen (as written).
fn samples(exposition: &str) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in exposition.lines().filter(|l| !l.starts_with('#')) {
        let end = line.find(['{', ' ']).unwrap_or(line.len());
        let labels = line[end..].split(' ').next().unwrap_or("").to_owned();
        out.entry(line[..end].to_owned()).or_default().push(labels);
    }
    out
}

#[tokio::test]
async fn every_metric_name_the_alerts_dashboard_and_readme_use_is_exposed() {
    // A small mixed workload that makes every family show: shared through Redis, JWT keys from a JWKS, a cache miss
    // then a hit, a forwarded call retried after a 503, refusals, and last an upstream 429.
    let upstream = MockServer::start().await;
    Mock::given(path("/jwks"))
        .respond_with(idp::jwks(&[&idp::RSA_1]))
        .mount(&upstream)
        .await;
    Mock::given(path(CONSUMPTIONS))
        .respond_with(ok_json(json!({"consumptions": [], "total_count": 0})))
        .mount(&upstream)
        .await;
    Mock::given(path(INVOICES))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(1)
        .mount(&upstream)
        .await;
    Mock::given(path(INVOICES))
        .respond_with(ok_json(json!({"invoices": [], "total_count": 0})))
        .mount(&upstream)
        .await;
    Mock::given(path(TAXES))
        .respond_with(ResponseTemplate::new(429).insert_header("retry-after", "1"))
        .mount(&upstream)
        .await;
    let jwks = format!("{}/jwks", upstream.uri());
    // Shared through a Redis, so the Redis families show too.
    let redis = common::redis::Redis::start();
    let app = TestApp::builder()
        .upstream(upstream)
        .redis(redis.url())
        .config(|c| {
            c.auth.jwks_url = Some(jwks);
            // Low enough for the flood below to be refused, with room for the calls before it.
            c.limits.principal_rate = billing_gateway::config::Rate {
                count: 2,
                per: Duration::from_secs(1),
            };
        })
        .spawn()
        .await;
    let reader = app.reader();
    let manager = app.manager();
    let rs256 = idp::RSA_1.sign(&idp::idp_claims(json!({"roles": ["billing-read-only"]})));
    for (path, token, status) in [
        (CONSUMPTIONS, reader.as_str(), 200),
        (CONSUMPTIONS, rs256.as_str(), 200),
        (INVOICES, manager.as_str(), 200),
        ("/billing/v2beta1/nothing-here", reader.as_str(), 404),
        (INVOICES, "not-a-token", 401),
        (TAXES, reader.as_str(), 429),
    ] {
        assert_eq!(app.get(path, token).await.status(), status, "{path}");
    }
    // A caller past its own rate, so the refusals by class have a series.
    let flooder = token_with(json!({
        "sub": "flooder",
        "roles": ["billing-read-only"],
        "exp": jsonwebtoken::get_current_timestamp() + 600,
    }));
    let mut refused = false;
    for _ in 0..50 {
        if app.get("/gateway/v1/whoami", &flooder).await.status() == 429 {
            refused = true;
            break;
        }
    }
    assert!(refused, "the flooder was never refused");
    eventually(
        || async {
            app.metrics()
                .await
                .contains("billing_gateway_redis_duration_seconds_bucket")
        },
        PATIENCE,
    )
    .await;
    let exposition = app.metrics().await;
    let exposed = samples(&exposition);

    let files = [
        "deploy/prometheus/alerts.yaml",
        "deploy/prometheus/prometheusrule.yaml",
        "deploy/grafana/billing-gateway.json",
        "README.md",
    ];
    let mut used = BTreeMap::<String, BTreeSet<&str>>::new();
    for file in files {
        for name in metric_names(&read(file)) {
            used.entry(name).or_default().insert(file);
        }
    }
    for name in readme_table_names(&read("README.md")) {
        used.entry(name)
            .or_default()
            .insert("README.md (metrics table)");
    }
    assert!(used.len() >= 15, "too few names found: {used:?}");
    // A name is exposed as a sample, or is the family of one: a histogram's `_bucket`, `_sum`
    // and `_count`, a counter's `_total`.
    let missing: Vec<_> = used
        .iter()
        .filter(|(name, _)| {
            !["", "_bucket", "_total"]
                .iter()
                .any(|suffix| exposed.contains_key(&format!("{name}{suffix}")))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "named but not on /metrics: {missing:?}\n{exposition}"
    );

    // The label values the files select on are ones the gateway writes (a renamed refusal
    // reason breaks an alert as surely as a renamed metric).
    let all: String = files.iter().map(|f| read(f)).collect();
    for label in ["reason", "result", "mode"] {
        let wanted = matched_values(&all, label);
        assert!(!wanted.is_empty(), "no {label} matcher found");
        for v in wanted {
            assert!(
                exposition.contains(&format!("{label}=\"{v}\"")),
                "{label}=\"{v}\" is selected on but never written:\n{exposition}"
            );
        }
    }
    // The sources re-read while running report in: keys fetched, policy folder read.
    for name in [
        "billing_gateway_jwks_fetch_last_success_timestamp_seconds",
        "billing_gateway_policy_reload_last_success_timestamp_seconds",
    ] {
        assert!(
            value(&exposition, name, "").is_some_and(|v| v > 1.0e9),
            "{name}"
        );
    }
    assert_eq!(
        value(
            &exposition,
            "billing_gateway_upstream_budget_calls_per_second",
            ""
        ),
        Some(10_000.0)
    );
}

#[test]
fn the_dashboard_is_json_with_its_data_source_a_variable_and_the_panels_on_call_needs() {
    let dashboard: Value =
        serde_json::from_str(&read("deploy/grafana/billing-gateway.json")).expect("valid JSON");
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("variables");
    let datasource = variables
        .iter()
        .find(|v| v["type"] == "datasource")
        .expect("a data source variable");
    assert_eq!(datasource["query"], "prometheus");
    let name = datasource["name"].as_str().expect("name");
    let reference = format!("${{{name}}}");

    let panels = dashboard["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    let mut titles = Vec::new();
    for panel in panels {
        assert!(ids.insert(panel["id"].as_u64().expect("id")), "{panel}");
        titles.push(panel["title"].as_str().expect("title").to_lowercase());
        if panel["type"] == "row" {
            continue;
        }
        // Every query goes to the chosen data source: none is pinned to one installation's.
        assert_eq!(panel["datasource"]["uid"], reference.as_str(), "{panel}");
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{panel}");
        for target in targets {
            assert_eq!(target["datasource"]["uid"], reference.as_str(), "{target}");
            let expr = target["expr"].as_str().expect("expr");
            assert!(expr.contains("billing_gateway_"), "{expr}");
        }
    }
    for wanted in [
        "requests by operation",
        "errors by operation",
        "latency quantiles",
        "cache hit ratio",
        "cache size",
        "upstream calls against the budget",
        "budget waits and refusals by class",
        "backoff",
        "replicas by sharing mode",
        "shed load",
    ] {
        assert!(
            titles.iter().any(|t| t.contains(wanted)),
            "no `{wanted}` panel in {titles:?}"
        );
    }
}

#[test]
fn every_alert_is_documented_unit_tested_and_wrapped_for_the_operator() {
    let alerts = read("deploy/prometheus/alerts.yaml");
    let tests = read("deploy/prometheus/alerts.test.yaml");
    let readme = read("README.md");
    let on_call = readme
        .split_once("## On call")
        .expect("an On call section")
        .1;
    let blocks: Vec<&str> = alerts.split("- alert: ").skip(1).collect();
    assert!(blocks.len() >= 10, "{} alerts", blocks.len());
    for block in blocks {
        let name = block.lines().next().expect("name").trim();
        for field in ["expr:", "severity:", "summary:", "description:"] {
            assert!(block.contains(field), "{name} has no {field}");
        }
        // promtool checks the rest: here, that each alert has cases at all, firing and quiet.
        let cases = tests.matches(&format!("alertname: {name}\n")).count();
        assert!(cases >= 2, "{name}: {cases} promtool cases");
        assert!(
            tests.contains(&format!(
                "alertname: {name}\n        exp_alerts:\n          - "
            )),
            "{name}: no case where it fires"
        );
        assert!(
            tests.contains(&format!("alertname: {name}\n        exp_alerts: []")),
            "{name}: no case where it stays quiet"
        );
        assert!(on_call.contains(name), "{name} is not in README's On call");
    }
    // The Prometheus Operator wrapper holds the same rule group, indented under `spec:`.
    let wrapper = read("deploy/prometheus/prometheusrule.yaml");
    let group = alerts.split_once("\ngroups:\n").expect("groups").1;
    let indented: String = group.lines().map(|l| format!("  {l}\n")).collect();
    assert!(
        wrapper.contains("kind: PrometheusRule") && wrapper.contains(&indented),
        "regenerate deploy/prometheus/prometheusrule.yaml with deploy/prometheus/render.sh"
    );
}

/// An upstream answering every Billing call; the app in front of it.
async fn traced_app() -> TestApp {
    let app = TestApp::spawn().await;
    Mock::given(method("GET"))
        .respond_with(ok_json(
            json!({"consumptions": [], "invoices": [], "total_count": 0}),
        ))
        .mount(&app.upstream)
        .await;
    app
}

/// What the upstream received for its last request: `traceparent`, `tracestate`,
/// `x-request-id`.
async fn last_upstream(app: &TestApp) -> (Option<String>, Option<String>, Option<String>) {
    let requests = app.upstream_requests().await;
    let last = requests.last().expect("the upstream was called");
    let header = |name: &str| {
        last.headers
            .get(name)
            .map(|v| v.to_str().expect("ascii").to_owned())
    };
    (
        header("traceparent"),
        header("tracestate"),
        header("x-request-id"),
    )
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn a_callers_traceparent_reaches_the_upstream_with_the_same_trace_and_a_new_parent() {
    let app = traced_app().await;
    for path in [INVOICES, CONSUMPTIONS] {
        let response = app
            .client
            .get(format!("{}{path}", app.base))
            .bearer_auth(app.manager())
            .header(
                "traceparent",
                format!("00-{CALLER_TRACE}-{CALLER_PARENT}-01"),
            )
            .header("tracestate", "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE")
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 200, "{path}");
        let echoed = response.headers()["x-request-id"]
            .to_str()
            .expect("id")
            .to_owned();
        let (traceparent, tracestate, request_id) = last_upstream(&app).await;
        let traceparent = traceparent.expect("a traceparent upstream");
        let (trace, parent, flags) = parse_traceparent(traceparent.as_bytes()).expect("valid");
        assert_eq!(hex(&trace), CALLER_TRACE, "{path}: the caller's trace");
        assert_ne!(hex(&parent), CALLER_PARENT, "{path}: a new parent id");
        assert_eq!(flags, 1, "{path}: the caller's sampled flag");
        assert_eq!(
            tracestate.as_deref(),
            Some("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE")
        );
        assert_eq!(request_id.as_deref(), Some(echoed.as_str()), "{path}");
    }
    app.stop().await;
}

#[tokio::test]
async fn a_malformed_traceparent_is_ignored_and_the_upstream_gets_a_fresh_trace() {
    let app = traced_app().await;
    let mut seen = BTreeSet::new();
    for malformed in [
        // Uppercase, a zero trace id, a bad version, nonsense.
        Some(format!(
            "00-{}-{CALLER_PARENT}-01",
            CALLER_TRACE.to_uppercase()
        )),
        Some(format!("00-{}-{CALLER_PARENT}-01", "0".repeat(32))),
        Some(format!("ff-{CALLER_TRACE}-{CALLER_PARENT}-01")),
        Some("not a trace".to_owned()),
        None,
    ] {
        let mut request = app
            .client
            .get(format!("{}{INVOICES}", app.base))
            .bearer_auth(app.manager())
            .header("tracestate", "rojo=00f067aa0ba902b7");
        if let Some(value) = &malformed {
            request = request.header("traceparent", value);
        }
        let response = request.send().await.expect("request");
        assert_eq!(response.status(), 200, "{malformed:?}: never an error");
        let (traceparent, tracestate, _) = last_upstream(&app).await;
        let traceparent = traceparent.expect("a fresh traceparent upstream");
        let (trace, _, flags) = parse_traceparent(traceparent.as_bytes()).expect("valid");
        assert_ne!(hex(&trace), CALLER_TRACE);
        assert_eq!(flags, 0, "nothing records a fresh trace without export");
        assert_eq!(
            tracestate, None,
            "a tracestate without its traceparent is dropped"
        );
        assert!(seen.insert(trace), "each request its own trace");
    }
    app.stop().await;
}

/// Single-threaded: the subscriber set for this thread sees every task of the app.
#[tokio::test(flavor = "current_thread")]
async fn the_access_log_line_names_the_trace() {
    let (captured, _logs, app) = app_logging().await;
    Mock::given(method("GET"))
        .respond_with(ok_json(
            json!({"consumptions": [], "invoices": [], "total_count": 0}),
        ))
        .mount(&app.upstream)
        .await;
    let response = app
        .client
        .get(format!("{}{CONSUMPTIONS}", app.base))
        .bearer_auth(app.reader())
        .header(
            "traceparent",
            format!("00-{CALLER_TRACE}-{CALLER_PARENT}-00"),
        )
        .header("x-request-id", "trace-in-log")
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    // Read to the end: a connection left mid-answer would hold the shutdown up.
    response.bytes().await.expect("body");
    // One without a traceparent still gets a trace id, a fresh one.
    assert_eq!(app.get(INVOICES, &app.manager()).await.status(), 200);
    app.stop().await;

    let text = captured.text();
    let lines: Vec<Value> = captured
        .access_lines()
        .into_iter()
        .filter(|l| l["path"] != "/metrics")
        .collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert_eq!(lines[0]["request_id"], "trace-in-log");
    assert_eq!(lines[0]["trace_id"], CALLER_TRACE);
    let fresh = lines[1]["trace_id"].as_str().expect("a trace id");
    assert!(
        fresh.len() == 32 && fresh != CALLER_TRACE,
        "{fresh}: a fresh trace id"
    );
}

#[tokio::test]
async fn policy_reload_metrics_follow_a_broken_edit_and_its_fix() {
    let app = TestApp::builder()
        .policy(&[("default.toml", DEFAULT_POLICY)])
        .poll(Duration::from_millis(50))
        .spawn()
        .await;
    let reads = |m: &str| {
        (
            value(
                m,
                "billing_gateway_policy_reload_last_success_timestamp_seconds",
                "",
            )
            .expect("timestamp"),
            value(m, "billing_gateway_policy_reload_failures_total", "").expect("failures"),
        )
    };
    let (good, failures) = reads(&app.metrics().await);
    assert!(good > 1.0e9, "{good}");
    assert_eq!(failures, 0.0);

    let file = app.policy_dir().join("default.toml");
    std::fs::write(&file, "[roles.reader\nbroken").expect("edit");
    eventually(|| async { reads(&app.metrics().await).1 >= 3.0 }, PATIENCE).await;
    let last = reads(&app.metrics().await);
    // Every poll fails while the edit is broken: the timestamp no longer moves.
    let stuck = last.0;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (still, more) = reads(&app.metrics().await);
    assert_eq!(still, stuck, "no good read while the edit is broken");
    assert!(more > last.1, "each poll counts: {more} after {}", last.1);
    // A request is still decided by the last good policy.
    Mock::given(method("GET"))
        .respond_with(ok_json(json!({"invoices": [], "total_count": 0})))
        .mount(&app.upstream)
        .await;
    assert_eq!(app.get(INVOICES, &app.manager()).await.status(), 200);

    std::fs::write(&file, DEFAULT_POLICY).expect("fix");
    eventually(|| async { reads(&app.metrics().await).0 > stuck }, PATIENCE).await;
    app.stop().await;
}

#[tokio::test]
async fn jwks_fetch_metrics_count_failures_until_keys_arrive() {
    let idp = MockServer::start().await;
    Mock::given(path("/jwks"))
        .respond_with(ResponseTemplate::new(500))
        .up_to_n_times(2)
        .mount(&idp)
        .await;
    Mock::given(path("/jwks"))
        .respond_with(idp::jwks(&[&idp::RSA_1]))
        .mount(&idp)
        .await;
    let jwks = format!("{}/jwks", idp.uri());
    let app = TestApp::spawn_with(|c| c.auth.jwks_url = Some(jwks)).await;
    let m = app.metrics().await;
    assert_eq!(
        value(&m, "billing_gateway_jwks_fetch_failures_total", ""),
        Some(1.0),
        "the startup fetch failed:\n{m}"
    );
    assert_eq!(
        value(
            &m,
            "billing_gateway_jwks_fetch_last_success_timestamp_seconds",
            ""
        ),
        Some(0.0),
        "never fetched"
    );
    // The retries (1 s, then 2 s) fail once more, then succeed.
    eventually(
        || async {
            let m = app.metrics().await;
            value(
                &m,
                "billing_gateway_jwks_fetch_last_success_timestamp_seconds",
                "",
            )
            .is_some_and(|v| v > 1.0e9)
        },
        PATIENCE,
    )
    .await;
    let m = app.metrics().await;
    assert_eq!(
        value(&m, "billing_gateway_jwks_fetch_failures_total", ""),
        Some(2.0)
    );
    app.stop().await;
}

#[tokio::test]
async fn without_redis_the_replica_reports_the_local_mode() {
    let app = TestApp::spawn().await;
    let m = app.metrics().await;
    for (mode, expected) in [("local", 1.0), ("connected", 0.0), ("degraded", 0.0)] {
        assert_eq!(
            value(
                &m,
                "billing_gateway_redis_mode",
                &format!("mode=\"{mode}\"")
            ),
            Some(expected),
            "{mode}"
        );
    }
    app.stop().await;
}
