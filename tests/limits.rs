//! Fair use of the one shared key: per-principal rates, the upstream budget, the backoff after
//! an upstream 429 and retries, seen from callers and from the upstream.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use billing_gateway::config::Rate;
use billing_gateway::upstream::UPSTREAM_MAX_WAIT;
use common::*;
use serde_json::{Value, json};
use wiremock::matchers::{any, method, path};
use wiremock::{Mock, Request, Respond, ResponseTemplate};

fn ok_json(body: Value) -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_raw(body.to_string(), "application/json")
}

fn per_second(count: u32) -> Rate {
    Rate {
        count,
        per: Duration::from_secs(1),
    }
}

/// A read-only token for subject `sub`.
fn reader_as(sub: &str) -> String {
    let now = jsonwebtoken::get_current_timestamp();
    token_with(json!({"sub": sub, "roles": ["billing-read-only"], "iat": now, "exp": now + 600}))
}

/// The value of one sample line of the exposition, 0 when absent.
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The most requests a principal limited to `rate` per second (burst: twice that) can have
/// served within `elapsed`: the burst, plus what the rate refilled meanwhile.
fn most_allowed(rate: u32, elapsed: Duration) -> usize {
    (2 * rate) as usize + (elapsed.as_secs_f64() * f64::from(rate)).floor() as usize
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
        c.limits.principal_rate = per_second(5);
        c.upstream.rate = per_second(1000);
    })
    .await;
    Mock::given(any())
        .respond_with(ok_json(json!({"charges": []})))
        .mount(&app.upstream)
        .await;
    let greedy = reader_as("greedy");
    let started = Instant::now();
    let answers = futures_util::future::join_all(
        (0..30).map(|_| app.get("/billing/v2beta1/charges", &greedy)),
    )
    .await;
    let most = most_allowed(5, started.elapsed());
    let mut served = 0;
    let mut throttled = 0;
    for response in answers {
        match response.status().as_u16() {
            200 => served += 1,
            429 => {
                throttled += 1;
                // The next request is allowed within one pace step (200 ms), rounded up.
                assert_eq!(retry_after(&response), 1);
                assert_error(response, 429, "too_many_requests").await;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    // A burst of twice the rate is served at once, and no more than the rate refills.
    assert!(
        (10..=most).contains(&served),
        "{served} served, at most {most}"
    );
    assert!(throttled >= 1, "nothing throttled");

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
        c.limits.principal_rate = per_second(1);
        c.upstream.rate = per_second(1000);
    })
    .await;
    Mock::given(any())
        .respond_with(ok_json(json!({"taxes": []})))
        .mount(&app.upstream)
        .await;
    let token = reader_as("spoofer");
    let started = Instant::now();
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
    let most = most_allowed(1, started.elapsed());
    assert!(statuses.contains(&429), "{statuses:?}");
    let served = statuses.iter().filter(|s| **s == 200).count();
    assert!((2..=most).contains(&served), "{statuses:?}, at most {most}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_calls_never_exceed_the_budget_in_any_one_second_window() {
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
    // Opens the upstream connection first, so a connection set-up cannot delay one arrival
    // and bunch the next ones into its window.
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
    let answers = futures_util::future::join_all(requests.iter().map(|(token, p)| async {
        let sent = Instant::now();
        let response = app.get(p, token).await;
        (response, sent.elapsed())
    }))
    .await;
    let mut served = 0;
    let mut refused = 0;
    for (response, took) in answers {
        // The wait for a turn is bounded: nobody is kept longer, served or refused (plus a
        // second for the round trip on a busy machine).
        let bound = UPSTREAM_MAX_WAIT + Duration::from_secs(1);
        assert!(took <= bound, "answered after {took:?}, bound {bound:?}");
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
    let mut times = arrivals.0.lock().expect("lock").clone();
    times.sort();
    assert_eq!(times.len(), served, "every served request made one call");
    for (i, start) in times.iter().enumerate() {
        let in_window = times[i..]
            .iter()
            .take_while(|t| t.duration_since(*start) < Duration::from_secs(1))
            .count();
        assert!(
            in_window <= 5,
            "{in_window} upstream calls within one second: gaps {:?}",
            times
                .windows(2)
                .map(|w| w[1].duration_since(w[0]).as_millis())
                .collect::<Vec<_>>()
        );
    }
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
