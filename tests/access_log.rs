//! The access log: one line per request, its fields and both formats pinned by parsing them;
//! what the extractors learn (operation, subject) reaches it without code in any handler; a
//! blocked sink costs dropped lines, counted in `/metrics`, never a request's time.
//!
//! A test binary of its own: each test sets a thread-local subscriber before building the app
//! (the access log obeys the log filter in force then), on a single-threaded runtime so it sees
//! every task of the app.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex};

use billing_gateway::config::LogFormat;
use common::*;
use serde_json::{Value, json};
use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

const CONSUMPTIONS: &str = "/billing/v2beta1/consumptions";

/// Every field of a line, in order; `upstream_ms` only when the upstream was called.
const FIELDS: [&str; 16] = [
    "timestamp",
    "level",
    "message",
    "request_id",
    "trace_id",
    "method",
    "path",
    "operation",
    "subject",
    "status",
    "rejection",
    "cache",
    "upstream_ms",
    "duration_ms",
    "target",
    "",
];

/// The access lines among everything captured, parsed; every one must be a JSON object with
/// exactly the known fields, in the known order.
fn json_lines(captured: &Captured) -> Vec<Value> {
    let lines = captured.access_lines();
    for line in &lines {
        let mut keys: Vec<&str> = line
            .as_object()
            .expect("an object")
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        let expected: Vec<&str> = FIELDS
            .iter()
            .copied()
            .filter(|f| !f.is_empty() && (*f != "upstream_ms" || keys.contains(f)))
            .collect();
        // Compared as sets: the order is pinned on the raw text below.
        let mut sorted = expected.clone();
        sorted.sort_unstable();
        assert_eq!(keys, sorted, "{line}");
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["message"], "request");
        assert!(
            line["status"].is_u64() && line["duration_ms"].is_f64(),
            "{line}"
        );
        assert_eq!(line["trace_id"].as_str().map(str::len), Some(32), "{line}");
    }
    for raw in captured.access_raw() {
        let mut at = 0;
        for field in FIELDS.iter().filter(|f| !f.is_empty()) {
            if let Some(found) = raw[at..].find(&format!("\"{field}\":")) {
                at += found;
            } else {
                assert_eq!(
                    *field, "upstream_ms",
                    "{field} missing or out of order: {raw}"
                );
            }
        }
    }
    lines
}

/// The line of the request with this id.
fn line_of<'a>(lines: &'a [Value], request_id: &str) -> &'a Value {
    lines
        .iter()
        .find(|l| l["request_id"] == request_id)
        .unwrap_or_else(|| panic!("no line for {request_id}: {lines:#?}"))
}

async fn send(req: reqwest::RequestBuilder, id: &str) -> u16 {
    let response = req
        .header("x-request-id", id)
        .send()
        .await
        .expect("request");
    assert_eq!(response.headers()["x-request-id"], id, "echoed");
    let status = response.status().as_u16();
    response.bytes().await.expect("body");
    status
}

/// No handler writes anything for the log: whoami, a Billing call (stored, then a hit), a
/// refused call, an unknown path and a refused credential are each logged with what the
/// extractors and the cache learned.
#[tokio::test(flavor = "current_thread")]
async fn each_request_is_logged_with_what_its_handler_learned() {
    let (captured, _logs, app) = app_logging().await;
    Mock::given(method("GET"))
        .and(path(CONSUMPTIONS))
        .respond_with(ResponseTemplate::new(200).set_body_raw(
            json!({"consumptions": [], "total_count": 0}).to_string(),
            "application/json",
        ))
        .mount(&app.upstream)
        .await;
    let reader = app.reader();
    let url = |p: &str| format!("{}{p}", app.base);
    let c = &app.client;
    assert_eq!(
        send(c.get(url("/gateway/v1/whoami")).bearer_auth(&reader), "who").await,
        200
    );
    let consumptions = url(&format!("{CONSUMPTIONS}?organization_id={ORG}"));
    assert_eq!(
        send(c.get(&consumptions).bearer_auth(&reader), "miss").await,
        200
    );
    assert_eq!(
        send(c.get(&consumptions).bearer_auth(&reader), "hit").await,
        200
    );
    let coupon = url("/billing/v2beta1/redeem-coupon?code=WELCOME");
    assert_eq!(
        send(c.post(&coupon).bearer_auth(&reader), "refused").await,
        403
    );
    assert_eq!(
        send(c.get(url("/nowhere")).bearer_auth(&reader), "lost").await,
        404
    );
    assert_eq!(
        send(c.delete(url("/gateway/v1/cache")), "anonymous").await,
        401
    );
    // Only the miss went upstream.
    let upstream = app.upstream_requests().await;
    assert_eq!(upstream.len(), 1, "{upstream:?}");
    assert_eq!(upstream[0].url.path(), CONSUMPTIONS);
    app.stop().await;

    let lines = json_lines(&captured);
    let summary = |id: &str| {
        let l = line_of(&lines, id);
        (
            l["operation"].as_str().unwrap_or("?").to_owned(),
            l["subject"].as_str().unwrap_or("?").to_owned(),
            l["status"].as_u64().unwrap_or(0),
            l["rejection"].as_str().unwrap_or("?").to_owned(),
            l["cache"].as_str().unwrap_or("?").to_owned(),
        )
    };
    let row = |o: &str, s: &str, st: u64, r: &str, ca: &str| {
        (o.to_owned(), s.to_owned(), st, r.to_owned(), ca.to_owned())
    };
    assert_eq!(summary("who"), row("gateway", "alice", 200, "-", "-"));
    assert_eq!(
        summary("miss"),
        row("consumptions", "alice", 200, "-", "stored")
    );
    assert_eq!(
        summary("hit"),
        row("consumptions", "alice", 200, "-", "hit")
    );
    assert_eq!(
        summary("refused"),
        row("redeem-coupon", "alice", 403, "permissions_denied", "-")
    );
    assert_eq!(summary("lost"), row("unknown", "-", 404, "not_found", "-"));
    assert_eq!(
        summary("anonymous"),
        row("gateway", "-", 401, "authentication_missing", "-")
    );
    assert!(line_of(&lines, "miss")["upstream_ms"].is_f64());
    assert!(line_of(&lines, "hit").get("upstream_ms").is_none());
    assert_eq!(line_of(&lines, "hit")["path"], CONSUMPTIONS);
    assert_eq!(line_of(&lines, "hit")["method"], "GET");
    assert!(
        !captured.text().contains(&reader),
        "a caller's token was logged"
    );
}

/// The pretty format: `<timestamp>  INFO <target>: request name=value ...`, values a caller
/// chose quoted, the same fields as the JSON line.
#[tokio::test(flavor = "current_thread")]
async fn a_pretty_line_carries_the_same_fields() {
    let (captured, _logs) = capture_logs("info");
    let app = TestApp::builder()
        .access_log_as(LogFormat::Pretty, captured.clone(), 64)
        .spawn()
        .await;
    let response = app
        .client
        .get(format!("{}/nowhere/a%20b", app.base))
        .header("x-request-id", "pretty-1")
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 404);
    app.stop().await;

    let text = captured.text();
    let line = text
        .lines()
        .find(|l| l.contains(" INFO billing_gateway::access: request "))
        .unwrap_or_else(|| panic!("no pretty access line: {text}"));
    let (head, fields) = line
        .split_once(" INFO billing_gateway::access: request ")
        .expect("head");
    assert!(
        time::OffsetDateTime::parse(
            head.trim_end(),
            &time::format_description::well_known::Rfc3339
        )
        .is_ok(),
        "{head}"
    );
    let fields = pretty_fields(fields);
    let names: Vec<&str> = fields.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        names,
        [
            "request_id",
            "trace_id",
            "method",
            "path",
            "operation",
            "subject",
            "status",
            "rejection",
            "cache",
            "duration_ms"
        ]
    );
    let map: BTreeMap<_, _> = fields.into_iter().collect();
    assert_eq!(map["request_id"], "pretty-1");
    assert_eq!(map["path"], "/nowhere/a%20b");
    assert_eq!(map["operation"], "unknown");
    assert_eq!(map["subject"], "-");
    assert_eq!(map["status"], "404");
    assert_eq!(map["rejection"], "not_found");
    assert!(map["duration_ms"].parse::<f64>().is_ok());
}

/// `name=value` pairs separated by spaces; a value in double quotes may hold spaces and
/// backslash escapes.
fn pretty_fields(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let (name, after) = rest.split_once('=').expect("name=value");
        let (value, after) = if let Some(quoted) = after.strip_prefix('"') {
            let mut value = String::new();
            let mut chars = quoted.char_indices();
            let end = loop {
                match chars.next().expect("closing quote") {
                    (i, '"') => break i + 1,
                    (_, '\\') => value.push(chars.next().expect("escape").1),
                    (_, c) => value.push(c),
                }
            };
            (value, &quoted[end..])
        } else {
            let end = after.find(' ').unwrap_or(after.len());
            (after[..end].to_owned(), &after[end..])
        };
        out.push((name.to_owned(), value));
        rest = after.trim_start();
    }
    out
}

/// A writer that blocks until opened, as a stalled disk or a full pipe does.
#[derive(Clone, Default)]
struct Gate {
    open: Arc<(Mutex<bool>, Condvar)>,
    written: Captured,
}

impl Gate {
    fn open(&self) {
        let (open, changed) = &*self.open;
        *open.lock().expect("lock") = true;
        changed.notify_all();
    }
}

impl std::io::Write for Gate {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let (open, changed) = &*self.open;
        let mut is_open = open.lock().expect("lock");
        while !*is_open {
            is_open = changed.wait(is_open).expect("lock");
        }
        self.written.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// With the sink blocked, requests are answered as usual; the lines that do not fit the queue
/// are dropped and counted in `/metrics`; once the sink moves, what was kept is written whole.
#[tokio::test(flavor = "current_thread")]
async fn a_blocked_sink_drops_and_counts_lines_and_delays_no_request() {
    let (_captured, _logs) = capture_logs("info");
    let gate = Gate::default();
    let capacity = 2;
    let app = TestApp::builder()
        .access_log_as(LogFormat::Json, gate.clone(), capacity)
        .spawn()
        .await;
    let requests = 10;
    tokio::time::timeout(PATIENCE, async {
        for _ in 0..requests {
            let response = app
                .client
                .get(format!("{}/healthz", app.base))
                .send()
                .await
                .expect("request");
            assert_eq!(response.status(), 200);
        }
    })
    .await
    .expect("no request waits for the log");
    let metrics = app.metrics().await;
    let dropped = metrics
        .lines()
        .find_map(|l| l.strip_prefix("billing_gateway_log_lines_dropped_total "))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no dropped-lines counter:\n{metrics}"));
    // A line or a few are held by the blocked writer, `capacity` wait in the queue.
    assert!(dropped >= requests / 2, "{dropped} dropped of {requests}");
    gate.open();
    app.stop().await;
    let text = gate.written.text();
    // Every line is either written or counted (the scrape's own line came after its count).
    let kept = text.lines().count() as u64;
    assert!(
        (requests - dropped..=requests + 1 - dropped).contains(&kept),
        "{kept} written, {dropped} dropped:\n{text}"
    );
    for line in text.lines() {
        let line: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert_eq!(line["message"], "request");
    }
}

/// The access log obeys the log filter like any event: `RUST_LOG=...,billing_gateway::access=warn`
/// silences it and nothing else.
#[tokio::test(flavor = "current_thread")]
async fn the_log_filter_can_turn_the_access_log_off() {
    let (captured, _logs) = capture_logs("info,billing_gateway::access=warn");
    let app = TestApp::builder()
        .access_log(captured.clone())
        .spawn()
        .await;
    let response = app
        .client
        .get(format!("{}/healthz", app.base))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    app.stop().await;
    let text = captured.text();
    assert!(
        text.contains("shutting down"),
        "other INFO events still pass: {text}"
    );
    assert!(!text.contains("billing_gateway::access"), "{text}");
}
