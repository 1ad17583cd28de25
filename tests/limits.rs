//! Fair use of the one shared key: per-principal rates, the upstream budget, the backoff after
//! an upstream 429 and retries, seen from callers and from the upstream.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use billing_gateway::config::{Config, Rate};
use billing_gateway::upstream::UPSTREAM_MAX_WAIT;
use common::*;
use serde_json::{Value, json};
use wiremock::matchers::{any, method, path};
use wiremock::{Mock, Request, Respond, ResponseTemplate};

/// The value of one sample line of the exposition, 0 when absent.
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// `count` an hour, burst twice that: nothing refills while a test runs, so exactly the burst
/// is served however slow the machine.
fn per_hour(count: u32) -> Rate {
    Rate {
        count,
        per: Duration::from_secs(3600),
    }
}

fn retry_after(response: &reqwest::Response) -> u64 {
    response.headers()["retry-after"]
        .to_str()
        .expect("text")
        .parse()
        .expect("seconds")
}

/// Records when each upstream request arrived (wiremock's `Request` carries no timestamp).
#[derive(Clone, Default)]
struct Arrivals(Arc<Mutex<Vec<Instant>>>);

impl Respond for Arrivals {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        self.0.lock().expect("lock").push(Instant::now());
        ok_json(json!({"consumptions": [], "total_count": 0}))
    }
}

#[tokio::test]
async fn a_principal_over_its_rate_is_throttled_while_another_is_served() {
    let app = TestApp::spawn_with(|c| {
        c.limits.principal_rate = per_hour(5);
        c.upstream.rate = per_second(1000);
    })
    .await;
    Mock::given(any())
        .respond_with(ok_json(json!({"charges": []})))
        .mount(&app.upstream)
        .await;
    let greedy = reader_as("greedy");
    let answers = futures_util::future::join_all(
        (0..30).map(|_| app.get("/billing/v2beta1/charges", &greedy)),
    )
    .await;
    let mut served = 0;
    let mut throttled = 0;
    for response in answers {
        match response.status().as_u16() {
            200 => served += 1,
            429 => {
                throttled += 1;
                // The next request is allowed within one pace step (720 s), rounded up.
                let wait = retry_after(&response);
                assert!((1..=720).contains(&wait), "Retry-After {wait}");
                assert_error(response, 429, "too_many_requests").await;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    // A burst of twice the rate is served at once, and nothing more.
    assert_eq!(served, 10);
    assert_eq!(throttled, 20);

    let patient = reader_as("patient");
    assert_eq!(
        app.get("/billing/v2beta1/charges", &patient).await.status(),
        200
    );
    // Throttled requests never reached the upstream (charges are not cached).
    assert_eq!(app.upstream_requests().await.len(), served + 1);
    let m = app.metrics().await;
    assert_eq!(
        sample(
            &m,
            r#"billing_gateway_rejections_total{reason="principal_rate"}"#
        ),
        throttled as f64,
        "{m}"
    );
}

#[tokio::test]
async fn the_principal_limit_is_keyed_by_subject_not_by_forwarded_address() {
    let app = TestApp::spawn_with(|c| {
        c.limits.principal_rate = per_hour(1);
        c.upstream.rate = per_second(1000);
    })
    .await;
    Mock::given(any())
        .respond_with(ok_json(json!({"taxes": []})))
        .mount(&app.upstream)
        .await;
    let token = reader_as("spoofer");
    let mut statuses = Vec::new();
    // A fresh X-Forwarded-For each time buys nothing: the burst of 2 is the subject's.
    for i in 0..4 {
        let response = app
            .client
            .get(format!("{}/billing/v2beta1/taxes", app.base))
            .bearer_auth(&token)
            .header("x-forwarded-for", format!("10.0.0.{i}"))
            .send()
            .await
            .expect("request");
        statuses.push(response.status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 429, 429]);
}

#[tokio::test]
async fn the_gateway_endpoints_count_against_the_callers_rate_too() {
    let app = TestApp::spawn_with(|c| c.limits.principal_rate = per_hour(1)).await;
    let token = reader_as("poller");
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(
            app.get("/gateway/v1/whoami", &token)
                .await
                .status()
                .as_u16(),
        );
    }
    assert_eq!(statuses, [200, 200, 429, 429]);
    // Refused for the caller's rate, not anything else, and counted under its class (its role),
    // never its subject.
    let m = app.metrics().await;
    assert!(
        m.contains(r#"billing_gateway_rejections_total{reason="principal_rate"}"#),
        "{m}"
    );
    let refused = statuses.iter().filter(|s| **s == 429).count();
    assert!(
        m.contains(&format!(
            "billing_gateway_refusals_by_class_total{{reason=\"principal_rate\",class=\"billing-read-only\"}} {refused}"
        )),
        "{m}"
    );
    assert!(!m.contains("poller"), "a subject in the metrics: {m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_calls_never_come_faster_than_the_budget() {
    let app = TestApp::spawn_with(|c| {
        c.upstream.rate = per_second(5);
        c.limits.principal_rate = per_second(100);
    })
    .await;
    let arrivals = Arrivals::default();
    Mock::given(path("/billing/v2beta1/consumptions"))
        .respond_with(arrivals.clone())
        .mount(&app.upstream)
        .await;
    Mock::given(path("/billing/v2beta1/taxes"))
        .respond_with(ok_json(json!({"taxes": []})))
        .expect(1)
        .mount(&app.upstream)
        .await;
    // Opens the upstream connection first: the calls below then wait for nothing but turns.
    let warm = app.get("/billing/v2beta1/taxes", &app.reader()).await;
    assert_eq!(warm.status(), 200);
    // Many principals, every request distinct: nothing a cache could answer.
    let requests: Vec<_> = (0..24)
        .map(|i| {
            (
                reader_as(&format!("team-{}", i % 12)),
                format!("/billing/v2beta1/consumptions?page={}", i + 1),
            )
        })
        .collect();
    let started = Instant::now();
    let answers =
        futures_util::future::join_all(requests.iter().map(|(token, p)| app.get(p, token))).await;
    let mut served = 0;
    let mut refused = 0;
    for response in answers {
        match response.status().as_u16() {
            200 => served += 1,
            429 => {
                refused += 1;
                let wait = retry_after(&response);
                assert!((1..=UPSTREAM_MAX_WAIT.as_secs()).contains(&wait), "{wait}");
                assert_error(response, 429, "too_many_requests").await;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    let times = arrivals.0.lock().expect("lock").clone();
    assert_eq!(times.len(), served, "every served request made one call");
    assert_paced(started, &times, per_second(5), 0);
    // Some waited their turn and were served; past the bounded wait the rest were refused.
    assert!(served > 5, "{served} served");
    assert!(refused >= 1, "nothing refused");
    let m = app.metrics().await;
    assert_eq!(
        sample(
            &m,
            r#"billing_gateway_rejections_total{reason="upstream_budget"}"#
        ),
        refused as f64,
        "{m}"
    );
    // One turn for each call that went upstream: the warm-up and every served request.
    assert_eq!(
        sample(&m, "billing_gateway_upstream_budget_wait_seconds_count"),
        (served + 1) as f64,
        "{m}"
    );
}

#[tokio::test]
async fn after_an_upstream_429_nobody_reaches_the_upstream_until_its_retry_after() {
    let app = TestApp::spawn().await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(429).insert_header("retry-after", "30"))
        .expect(1)
        .mount(&app.upstream)
        .await;
    let first = app.get("/billing/v2beta1/taxes", &app.reader()).await;
    assert_eq!(retry_after(&first), 30);
    assert_error(first, 429, "too_many_requests").await;
    for (i, p) in [
        "/billing/v2beta1/taxes",
        "/billing/v2beta1/consumptions",
        "/billing/v2beta1/invoices",
    ]
    .iter()
    .enumerate()
    {
        let token = if i == 2 {
            app.manager()
        } else {
            reader_as(&format!("other-{i}"))
        };
        let response = app.get(p, &token).await;
        let wait = retry_after(&response);
        assert!((1..=30).contains(&wait), "{wait}");
        assert_error(response, 429, "too_many_requests").await;
    }
    assert_eq!(app.upstream_requests().await.len(), 1);
    let m = app.metrics().await;
    assert_eq!(
        sample(
            &m,
            r#"billing_gateway_rejections_total{reason="upstream_backoff"}"#
        ),
        3.0,
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            r#"billing_gateway_rejections_total{reason="upstream_rate_limited"}"#
        ),
        1.0,
        "{m}"
    );
    assert!(
        sample(&m, "billing_gateway_upstream_backoff_seconds") > 0.0,
        "{m}"
    );
}

#[tokio::test]
async fn calls_waiting_for_their_turn_do_not_go_upstream_after_a_429() {
    let app = TestApp::spawn_with(|c| c.upstream.rate = per_second(1)).await;
    Mock::given(any())
        .respond_with(
            ResponseTemplate::new(429)
                .insert_header("retry-after", "30")
                .set_delay(Duration::from_millis(300)),
        )
        .expect(1)
        .mount(&app.upstream)
        .await;
    // The first takes the budget's turn; the second, sent once the first has reached the
    // upstream, waits for the next turn, which comes after the first's 429.
    let token = app.reader();
    let (first, second) = tokio::join!(app.get("/billing/v2beta1/taxes", &token), async {
        eventually(
            || async { app.upstream_requests().await.len() == 1 },
            PATIENCE,
        )
        .await;
        app.get("/billing/v2beta1/consumptions", &token).await
    });
    assert_error(first, 429, "too_many_requests").await;
    assert_error(second, 429, "too_many_requests").await;
    assert_eq!(app.upstream_requests().await.len(), 1);
    let m = app.metrics().await;
    assert_eq!(
        sample(
            &m,
            r#"billing_gateway_rejections_total{reason="upstream_backoff"}"#
        ),
        1.0,
        "{m}"
    );
}

#[tokio::test]
async fn without_retry_after_the_backoff_starts_near_a_second_and_ends() {
    let app = TestApp::spawn().await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(429))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&app.upstream)
        .await;
    Mock::given(any())
        .respond_with(ok_json(json!({"taxes": []})))
        .mount(&app.upstream)
        .await;
    let first = app.get("/billing/v2beta1/taxes", &app.reader()).await;
    let wait = retry_after(&first);
    assert_eq!(wait, 1);
    assert_error(first, 429, "too_many_requests").await;
    let during = app.get("/billing/v2beta1/taxes", &app.reader()).await;
    assert_error(during, 429, "too_many_requests").await;
    assert_eq!(app.upstream_requests().await.len(), 1);

    // Not synchronisation: the backoff's length is what is tested. A client that comes back when
    // told to (plus a little) is served.
    tokio::time::sleep(Duration::from_secs(wait) + Duration::from_millis(100)).await;
    let after = app.get("/billing/v2beta1/taxes", &app.reader()).await;
    assert_eq!(after.status(), 200);
    assert_eq!(app.upstream_requests().await.len(), 2);
    let m = app.metrics().await;
    assert_eq!(
        sample(&m, "billing_gateway_upstream_backoff_seconds"),
        0.0,
        "{m}"
    );
}

#[tokio::test]
async fn a_get_is_retried_on_503_and_a_coupon_redemption_never() {
    let app = TestApp::spawn().await;
    let unavailable = || {
        ResponseTemplate::new(503).set_body_raw(
            r#"{"message":"unavailable","type":"service_unavailable"}"#,
            "application/json",
        )
    };
    Mock::given(method("GET"))
        .and(path("/billing/v2beta1/taxes"))
        .respond_with(unavailable())
        .up_to_n_times(2)
        .with_priority(1)
        .expect(2)
        .mount(&app.upstream)
        .await;
    Mock::given(method("GET"))
        .and(path("/billing/v2beta1/taxes"))
        .respond_with(ok_json(json!({"taxes": []})))
        .expect(1)
        .mount(&app.upstream)
        .await;
    Mock::given(method("GET"))
        .and(path("/billing/v2beta1/invoices"))
        .respond_with(unavailable())
        .expect(3)
        .mount(&app.upstream)
        .await;
    Mock::given(method("POST"))
        .and(path("/billing/v2beta1/redeem-coupon"))
        .respond_with(unavailable())
        .expect(1)
        .mount(&app.upstream)
        .await;

    let response = app.get("/billing/v2beta1/taxes", &app.reader()).await;
    assert_eq!(response.status(), 200, "two 503s, then served");
    // Still 503 after the last retry: the upstream's answer is relayed.
    let response = app.get("/billing/v2beta1/invoices", &app.manager()).await;
    assert_error(response, 503, "service_unavailable").await;
    let response = app
        .client
        .post(format!(
            "{}/billing/v2beta1/redeem-coupon?code=WELCOME",
            app.base
        ))
        .header("x-auth-token", app.manager())
        .send()
        .await
        .expect("request");
    assert_error(response, 503, "service_unavailable").await;

    let sent = app.upstream_requests().await;
    let posts = sent.iter().filter(|r| r.method.as_str() == "POST").count();
    assert_eq!(posts, 1, "a POST was retried");
    let m = app.metrics().await;
    assert_eq!(
        sample(
            &m,
            r#"billing_gateway_upstream_retries_total{operation="taxes"}"#
        ),
        2.0,
        "{m}"
    );
}

#[tokio::test]
async fn a_policy_rate_overrides_the_default_for_its_holders_only() {
    let app = TestApp::builder()
        .policy(&[(
            "policy.toml",
            "[roles.reader]\npermissions = [\"consumption:read\"]\n\
             [roles.slow-reader]\npermissions = [\"consumption:read\"]\nrate = \"1/s\"\n\
             [[bindings]]\nclaim = \"roles\"\nequals = \"billing-read-only\"\nroles = [\"reader\"]\n\
             [[bindings]]\nclaim = \"roles\"\nequals = \"slow\"\nroles = [\"slow-reader\"]\n",
        )])
        .config(|c| c.limits.principal_rate = per_second(100))
        .spawn()
        .await;
    Mock::given(any())
        .respond_with(ok_json(json!({"charges": []})))
        .mount(&app.upstream)
        .await;
    let now = jsonwebtoken::get_current_timestamp();
    let slow = token_with(json!({"sub": "cron", "roles": ["slow"], "exp": now + 600}));
    let statuses: Vec<u16> =
        futures_util::future::join_all((0..6).map(|_| app.get("/billing/v2beta1/charges", &slow)))
            .await
            .iter()
            .map(|r| r.status().as_u16())
            .collect();
    // 1/s with a burst of 2: the rest of a quick 6 are refused.
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        2,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        4,
        "{statuses:?}"
    );
    // The default rate still applies to everyone else.
    let normal = reader_as("dashboard");
    for _ in 0..6 {
        assert_eq!(
            app.get("/billing/v2beta1/charges", &normal).await.status(),
            200
        );
    }
}

// Fair share of the upstream budget (contract §10).

/// The fairness tests measure turns in wall-clock time: one at a time, so they do not take
/// each other's CPU (the other tests of this file are short and light).
static FLOOD: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A generous bound for a condition to come about; a test fails past it, it never measures.
const PATIENCE: Duration = Duration::from_secs(10);

/// A policy folder with one role per `(name, share)`, each bound to tokens whose `roles` claim
/// holds its name and allowed to read consumption (consumptions, taxes, charges).
fn policy_with_shares(roles: &[(&str, u32)]) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("bg-fair-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("dir");
    let mut text = String::new();
    for (name, share) in roles {
        text.push_str(&format!(
            "[roles.{name}]\npermissions = [\"consumption:read\"]\nshare = {share}\n\n\
             [[bindings]]\nclaim = \"roles\"\nequals = \"{name}\"\nroles = [\"{name}\"]\n\n"
        ));
    }
    std::fs::write(dir.join("policy.toml"), text).expect("policy");
    dir
}

/// Records each upstream request's path and arrival; answers 200, or 503 every `fail_every`th.
#[derive(Clone, Default)]
struct Recorder {
    seen: Arc<Mutex<Vec<(Instant, String)>>>,
    fail_every: usize,
}

impl Recorder {
    fn failing_every(n: usize) -> Recorder {
        Recorder {
            fail_every: n,
            ..Recorder::default()
        }
    }

    fn arrivals(&self) -> Vec<(Instant, String)> {
        self.seen.lock().expect("lock").clone()
    }

    fn count(&self, path: &str) -> usize {
        self.arrivals().iter().filter(|(_, p)| p == path).count()
    }
}

impl Respond for Recorder {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let mut seen = self.seen.lock().expect("lock");
        seen.push((Instant::now(), request.url.path().to_owned()));
        if self.fail_every > 0 && seen.len().is_multiple_of(self.fail_every) {
            return ResponseTemplate::new(503).set_body_raw(
                r#"{"message":"unavailable","type":"service_unavailable"}"#,
                "application/json",
            );
        }
        ok_json(json!({"items": [], "total_count": 0}))
    }
}

const CONSUMPTIONS: &str = "/billing/v2beta1/consumptions";
const TAXES: &str = "/billing/v2beta1/taxes";
const INVOICES: &str = "/billing/v2beta1/invoices";

/// What a flood of requests came to.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    ok: usize,
    throttled: usize,
    /// 503s relayed from the upstream (after the retries).
    unavailable: usize,
}

/// The `n`th of distinct queries (distinct pages of distinct months: every one a cache miss).
fn nth(path: &str, n: usize) -> String {
    format!(
        "{path}?billing_period=2025-{:02}&page={}",
        n % 12 + 1,
        n / 12 + 1
    )
}

fn consumptions(n: usize) -> String {
    nth(CONSUMPTIONS, n)
}

fn taxes(n: usize) -> String {
    nth(TAXES, n)
}

fn charges(n: usize) -> String {
    format!("/billing/v2beta1/charges?page_token={n}")
}

/// `tasks` concurrent loops sending the distinct queries `query(n)` with `token` until `stop`;
/// a 429 must carry `Retry-After`, and its loop pauses 50 ms as a polite client would (without
/// it the refused loops would spin and take the CPU every test here measures).
fn flood(
    base: &str,
    query: fn(usize) -> String,
    token: String,
    tasks: usize,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<Tally> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let client = reqwest::Client::new();
    let next = Arc::new(AtomicUsize::new(0));
    let loops: Vec<_> = (0..tasks)
        .map(|_| {
            let (client, token, stop, next) =
                (client.clone(), token.clone(), stop.clone(), next.clone());
            let base = base.to_owned();
            tokio::spawn(async move {
                let mut tally = Tally::default();
                while !stop.load(Ordering::SeqCst) {
                    let n = next.fetch_add(1, Ordering::SeqCst);
                    let response = client
                        .get(format!("{base}{}", query(n)))
                        .bearer_auth(&token)
                        .send()
                        .await
                        .expect("request");
                    match response.status().as_u16() {
                        200 => tally.ok += 1,
                        429 => {
                            assert!(retry_after(&response) >= 1);
                            tally.throttled += 1;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        503 => tally.unavailable += 1,
                        other => panic!("unexpected status {other}"),
                    }
                }
                tally
            })
        })
        .collect();
    tokio::spawn(async move {
        let mut total = Tally::default();
        for l in loops {
            let t = l.await.expect("flood task");
            total.ok += t.ok;
            total.throttled += t.throttled;
            total.unavailable += t.unavailable;
        }
        total
    })
}

/// Waits (polling the metrics) until `series` reads `value`.
async fn until_metric(app: &TestApp, series: &str, value: f64) {
    eventually(
        || async { sample(&app.metrics().await, series) == value },
        PATIENCE,
    )
    .await;
}

/// Every call that reached the upstream since `since` took a turn of the budget, as the gateway
/// counts turns, and the upstream saw them no faster than the budget's 10/s (the rate of every
/// flood here).
async fn assert_every_call_took_a_turn(app: &TestApp, since: Instant, recorder: &Recorder) {
    let arrivals: Vec<_> = recorder.arrivals().into_iter().map(|(at, _)| at).collect();
    let m = app.metrics().await;
    assert_eq!(
        sample(&m, "billing_gateway_upstream_budget_wait_seconds_count"),
        arrivals.len() as f64,
        "{m}"
    );
    assert_paced(since, &arrivals, per_second(10), 0);
}

/// An app whose upstream budget (10/s) is the only limit a flood meets, `edit`ed further, and
/// its upstream answering through `recorder`.
async fn flooded(edit: impl FnOnce(&mut Config), recorder: Recorder) -> (TestApp, Recorder) {
    let app = TestApp::spawn_with(|c| {
        c.upstream.rate = per_second(10);
        c.limits.principal_rate = per_second(1000);
        edit(c);
    })
    .await;
    Mock::given(any())
        .respond_with(recorder.clone())
        .mount(&app.upstream)
        .await;
    (app, recorder)
}

const WAITING: &str = "billing_gateway_upstream_budget_waiting_principals";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_principal_delays_another_by_at_most_two_paces() {
    let _one_at_a_time = FLOOD.lock().await;
    let (app, recorder) = flooded(|_| {}, Recorder::default()).await;
    // A: a report script on consumption; B: a finance app listing invoices.
    let started = Instant::now();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let a = flood(
        &app.base,
        consumptions,
        token_for("report-script", "billing-read-only"),
        30,
        stop.clone(),
    );
    // A's backlog is there before B's first call.
    until_metric(&app, WAITING, 1.0).await;
    let b_token = token_for("finance-app", "billing-manager");
    let b_client = reqwest::Client::new();
    // B's connection and token are ready (whoami never goes upstream): what B's calls then
    // take is its turn plus a few milliseconds of HTTP.
    let warm = b_client
        .get(format!("{}/gateway/v1/whoami", app.base))
        .bearer_auth(&b_token)
        .send()
        .await
        .expect("whoami");
    assert_eq!(warm.status(), 200);
    let mut a_waiting = Vec::new();
    for page in 1..=8 {
        let sent = tokio::time::Instant::now();
        a_waiting.push(sample(&app.metrics().await, WAITING));
        let response = b_client
            .get(format!("{}{INVOICES}?page={page}", app.base))
            .bearer_auth(&b_token)
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 200, "B's call {page} was refused");
        tokio::time::sleep_until(sent + Duration::from_millis(500)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let a = a.await.expect("flood");

    // Every B call waited at most two paces for its turn, as the gateway counted it: the
    // histogram bucket just above 210 ms holds all eight.
    let m = app.metrics().await;
    let b_waits = r#"billing_gateway_upstream_budget_wait_by_class_seconds_bucket{le="0.256",class="billing-manager"}"#;
    assert_eq!(sample(&m, b_waits), 8.0, "{m}");
    // Not vacuous: A had calls waiting for the budget when each of B's was sent, and its
    // excess (only A's) was refused for the budget, with Retry-After.
    assert!(a_waiting.iter().all(|w| *w >= 1.0), "{a_waiting:?}");
    assert!(a.throttled > 0 && a.unavailable == 0, "{a:?}");
    assert_eq!(
        sample(
            &m,
            r#"billing_gateway_rejections_total{reason="upstream_budget"}"#
        ),
        a.throttled as f64,
        "{m}"
    );
    // Every refusal is A's, and counted under A's class: B's is never refused.
    assert_eq!(
        sample(
            &m,
            r#"billing_gateway_refusals_by_class_total{reason="upstream_budget",class="billing-read-only"}"#
        ),
        a.throttled as f64,
        "{m}"
    );
    assert!(
        !m.contains(r#"billing_gateway_refusals_by_class_total{reason="upstream_budget",class="billing-manager"}"#),
        "{m}"
    );
    let a_wait = sample(
        &m,
        r#"billing_gateway_upstream_budget_wait_by_class_seconds_sum{class="billing-read-only"}"#,
    ) / sample(
        &m,
        r#"billing_gateway_upstream_budget_wait_by_class_seconds_count{class="billing-read-only"}"#,
    );
    assert!(a_wait > 0.5, "A's calls waited {a_wait} s on average");
    assert_eq!(
        sample(
            &m,
            r#"billing_gateway_upstream_calls_by_class_total{class="billing-manager"}"#
        ),
        8.0,
        "{m}"
    );
    assert!(
        !m.contains("finance-app") && !m.contains("report-script"),
        "{m}"
    );
    assert_every_call_took_a_turn(&app, started, &recorder).await;
    eprintln!("A: {a:?}, waited {a_wait:.2} s on average");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shares_weight_the_upstream_calls_of_flooding_principals() {
    let _one_at_a_time = FLOOD.lock().await;
    let dir = policy_with_shares(&[("heavy", 3), ("light", 1)]);
    let (app, recorder) = flooded(|c| c.policy_dir = dir, Recorder::default()).await;
    let who: Value = app
        .get("/gateway/v1/whoami", &token_for("h", "heavy"))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!((&who["share"], &who["class"]), (&json!(3), &json!("heavy")));

    let started = Instant::now();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let heavy = flood(
        &app.base,
        consumptions,
        token_for("h", "heavy"),
        12,
        stop.clone(),
    );
    let light = flood(&app.base, taxes, token_for("l", "light"), 12, stop.clone());
    until_metric(&app, WAITING, 2.0).await;
    // Counted from when both are waiting, for four seconds.
    let (h0, l0) = (recorder.count(CONSUMPTIONS), recorder.count(TAXES));
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (h, l) = (
        recorder.count(CONSUMPTIONS) - h0,
        recorder.count(TAXES) - l0,
    );
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (heavy, light) = (heavy.await.expect("flood"), light.await.expect("flood"));
    let ratio = h as f64 / l.max(1) as f64;
    assert!(
        (2.0..=4.0).contains(&ratio),
        "heavy {h}, light {l} upstream calls: ratio {ratio}"
    );
    assert!(h + l >= 30, "the budget was spent: {h} + {l} in 4 s");
    // The light principal asked for more than its quarter: its excess was refused.
    assert!(light.throttled > 0, "{heavy:?} {light:?}");
    eprintln!("heavy {h}, light {l}: ratio {ratio:.2}; {heavy:?} {light:?}");
    assert_every_call_took_a_turn(&app, started, &recorder).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_budget_holds_with_weighted_principals_and_retries() {
    let _one_at_a_time = FLOOD.lock().await;
    let dir = policy_with_shares(&[("heavy", 3), ("light", 1), ("other", 1)]);
    // Every fifth answer is a 503: its GET is retried, and each retry spends a turn too.
    let (app, recorder) = flooded(|c| c.policy_dir = dir, Recorder::failing_every(5)).await;
    let started = Instant::now();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let floods = [
        flood(
            &app.base,
            consumptions,
            token_for("h", "heavy"),
            8,
            stop.clone(),
        ),
        flood(&app.base, taxes, token_for("l", "light"), 8, stop.clone()),
        flood(&app.base, charges, token_for("o", "other"), 8, stop.clone()),
    ];
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for f in floods {
        f.await.expect("flood");
    }
    let arrivals = recorder.arrivals();
    assert!(arrivals.len() >= 20, "{} upstream calls", arrivals.len());
    assert_every_call_took_a_turn(&app, started, &recorder).await;
    let m = app.metrics().await;
    let retries: f64 = ["consumptions", "taxes", "charges"]
        .iter()
        .map(|op| {
            sample(
                &m,
                &format!(r#"billing_gateway_upstream_retries_total{{operation="{op}"}}"#),
            )
        })
        .sum();
    assert!(retries >= 1.0, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_that_disconnect_leave_the_queue_and_take_no_turn() {
    let _one_at_a_time = FLOOD.lock().await;
    let (app, recorder) = flooded(|_| {}, Recorder::default()).await;
    // Twenty of A's calls at once: one is sent, the rest wait (two seconds' worth).
    let a_token = token_for("report-script", "billing-read-only");
    let client = reqwest::Client::new();
    let a_sent_at = tokio::time::Instant::now();
    let a: Vec<_> = (1..=20)
        .map(|page| {
            let request = client
                .get(format!("{}{CONSUMPTIONS}?page={page}", app.base))
                .bearer_auth(&a_token)
                .send();
            tokio::spawn(request)
        })
        .collect();
    until_metric(&app, WAITING, 1.0).await;
    let sent_before = recorder.count(CONSUMPTIONS);
    // A's clients go away; the gateway lets go of their places at once, long before their
    // two-second wait would have.
    for request in &a {
        request.abort();
    }
    // An ordering, not a measure: the queue empties before the first of A's waits could
    // have run out.
    tokio::select! {
        () = until_metric(&app, WAITING, 0.0) => {}
        () = tokio::time::sleep_until(a_sent_at + UPSTREAM_MAX_WAIT) => {
            panic!("A's places were held until their wait ran out")
        }
    }

    // B, now alone, has a turn every pace: none goes to A's departed calls.
    let b_token = token_for("finance-app", "billing-manager");
    for page in 1..=5 {
        let response = app.get(&format!("{INVOICES}?page={page}"), &b_token).await;
        assert_eq!(response.status(), 200);
    }
    // A turn granted just before the disconnect may still have been on its way: B's first
    // turn came a pace after it, so by now it has arrived. Nothing of A's came after.
    let a_sent = recorder.count(CONSUMPTIONS);
    assert!(
        a_sent <= sent_before + 1 && a_sent < 20,
        "{sent_before} then {a_sent}"
    );
    assert_eq!(recorder.count(INVOICES), 5);
    let later = app.get(&format!("{INVOICES}?page=6"), &b_token).await;
    assert_eq!(later.status(), 200);
    assert_eq!(
        recorder.count(CONSUMPTIONS),
        a_sent,
        "an aborted call went upstream"
    );
    // Turns are counted as they are granted: every one went to a call that went upstream.
    assert_eq!(
        sample(
            &app.metrics().await,
            "billing_gateway_upstream_budget_wait_seconds_count"
        ),
        recorder.arrivals().len() as f64
    );
}

#[tokio::test]
async fn calls_refused_by_the_policy_do_not_spend_the_callers_rate() {
    // Two an hour (a burst of four): nothing refills during the test.
    let app = TestApp::spawn_with(|c| {
        c.limits.principal_rate = Rate {
            count: 2,
            per: Duration::from_secs(3600),
        }
    })
    .await;
    Mock::given(any())
        .respond_with(ok_json(json!({"charges": []})))
        .mount(&app.upstream)
        .await;
    let reader = reader_as("curious");
    // Invoices are not a reader's: each is refused by the policy, never by the rate, though
    // there are more of them than the burst.
    for _ in 0..10 {
        assert_error(
            app.get("/billing/v2beta1/invoices", &reader).await,
            403,
            "permissions_denied",
        )
        .await;
    }
    assert_eq!(
        app.get("/billing/v2beta1/charges", &reader).await.status(),
        200
    );
    // Only the allowed call went upstream.
    let upstream = app.upstream_requests().await;
    assert_eq!(upstream.len(), 1, "{upstream:?}");
    assert_eq!(upstream[0].url.path(), "/billing/v2beta1/charges");
    let m = app.metrics().await;
    assert_eq!(
        sample(
            &m,
            r#"billing_gateway_rejections_total{reason="principal_rate"}"#
        ),
        0.0,
        "{m}"
    );
}
