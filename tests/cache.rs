//! Consumption answers from memory: one upstream call per distinct query, stale when the
//! upstream is down, never shared across access boundaries.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use wiremock::matchers::{any, method, path, query_param};
use wiremock::{Mock, ResponseTemplate};

const P1: &str = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee";
const P2: &str = "99999999-8888-7777-6666-555555555555";
/// A freshness short enough to wait out.
const SHORT: Duration = Duration::from_millis(300);
/// Sleeping this long is not synchronisation: an entry growing old is what those tests are
/// about, and nothing short of a request (which would change what is tested) shows it expired.
const PAST_SHORT: Duration = Duration::from_millis(450);

#[tokio::test]
async fn two_identical_requests_make_one_upstream_call() {
    let app = TestApp::spawn().await;
    Mock::given(method("GET"))
        .and(path("/billing/v2beta1/consumptions"))
        .and(query_param("organization_id", ORG))
        .respond_with(consumptions("a"))
        .expect(1)
        .mount(&app.upstream)
        .await;
    let started = std::time::Instant::now();
    let first = app
        .get(
            "/billing/v2beta1/consumptions?billing_period=2026-07",
            &app.reader(),
        )
        .await;
    assert_eq!(
        header(&first, "cache-status"),
        "billing-gateway; fwd=miss; stored"
    );
    assert!(header(&first, "cache-control").starts_with("private, max-age="));
    let first_body = first.text().await.expect("body");
    // Another caller with the same rights gets the same entry.
    let second = app
        .get(
            "/billing/v2beta1/consumptions?billing_period=2026-07",
            &app.manager(),
        )
        .await;
    assert_eq!(second.status(), 200);
    assert_eq!(header(&second, "cache-status"), "billing-gateway; hit");
    assert_eq!(header(&second, "content-type"), "application/json");
    // Whole seconds since it was stored: no more than since the first request was sent.
    let age: u64 = header(&second, "age").parse().expect("Age in seconds");
    assert!(age <= started.elapsed().as_secs(), "Age {age}");
    assert!(header(&second, "cache-control").starts_with("private, max-age="));
    assert!(second.headers().get("x-total-count").is_none());
    assert_eq!(second.text().await.expect("body"), first_body);
}

#[tokio::test]
async fn equivalent_queries_share_an_entry_and_different_ones_do_not() {
    let app = TestApp::spawn().await;
    Mock::given(any())
        .respond_with(consumptions("a"))
        .expect(4)
        .mount(&app.upstream)
        .await;
    let token = app.reader();
    for q in [
        "billing_period=2026-07&page=1&page_size=10",
        "page_size=10&billing_period=2026-07&page=1",
        "pageSize=10&page=1&billing_period=2026-07",
        "billing_period=2026-06&page=1&page_size=10",
        &format!("billing_period=2026-07&page=1&page_size=10&project_id={P1}"),
        "billing_period=2026-07&page=1&page_size=10&category_name=Compute",
    ] {
        let r = app
            .get(&format!("/billing/v2beta1/consumptions?{q}"), &token)
            .await;
        assert_eq!(r.status(), 200, "{q}");
    }
}

#[tokio::test]
async fn a_hundred_concurrent_cold_requests_make_one_upstream_call() {
    let app = TestApp::spawn().await;
    Mock::given(any())
        .respond_with(consumptions("once").set_delay(Duration::from_millis(300)))
        .expect(1)
        .mount(&app.upstream)
        .await;
    // Four callers, so that no one of them goes past its share of requests in flight.
    let now = jsonwebtoken::get_current_timestamp();
    let tokens: Vec<String> = (0..4)
        .map(|i| {
            token_with(json!({
                "sub": format!("reader-{i}"), "roles": ["billing-read-only"], "exp": now + 600,
            }))
        })
        .collect();
    let requests = (0..100).map(|i| {
        let (client, url, token) = (
            app.client.clone(),
            format!("{}/billing/v2beta1/taxes?billing_period=2026-07", app.base),
            tokens[i % 4].clone(),
        );
        tokio::spawn(async move {
            let r = client
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .expect("request");
            (r.status().as_u16(), r.text().await.expect("body"))
        })
    });
    let answers = futures_util::future::join_all(requests).await;
    let first = answers[0].as_ref().expect("join").1.clone();
    for answer in answers {
        let (status, body) = answer.expect("join");
        assert_eq!(status, 200);
        assert_eq!(body, first);
    }
    let metrics = app.metrics().await;
    assert!(
        metrics.contains(r#"billing_gateway_cache_requests_total{result="stored"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn errors_are_not_cached() {
    let app = TestApp::spawn().await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(500).set_body_raw(
            r#"{"message":"boom","type":"internal_error"}"#,
            "application/json",
        ))
        .expect(2)
        .mount(&app.upstream)
        .await;
    for _ in 0..2 {
        let r = app.get("/billing/v2beta1/taxes", &app.reader()).await;
        assert_eq!(r.status(), 500);
        assert_eq!(header(&r, "cache-status"), "billing-gateway; fwd=miss");
    }
}

#[tokio::test]
async fn stale_answers_cover_a_failing_upstream_and_fresh_ones_return_with_it() {
    let app = TestApp::spawn_with(|c| c.cache.ttl = SHORT).await;
    Mock::given(any())
        .respond_with(consumptions("old"))
        .expect(1)
        .mount(&app.upstream)
        .await;
    let token = app.reader();
    let url = "/billing/v2beta1/consumptions";
    assert_eq!(app.get(url, &token).await.status(), 200);

    tokio::time::sleep(PAST_SHORT).await;
    app.upstream.reset().await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(500).set_body_raw("{}", "application/json"))
        .expect(1)
        .mount(&app.upstream)
        .await;
    let r = app.get(url, &token).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "cache-status"), "billing-gateway; fwd=stale");
    assert_eq!(
        r.json::<Value>().await.expect("json")["consumptions"][0]["product_name"],
        "old"
    );
    // While it is down, the stale answer is held briefly rather than retried on every request.
    let r = app.get(url, &token).await;
    assert_eq!(header(&r, "cache-status"), "billing-gateway; fwd=stale");
    app.upstream.verify().await;

    tokio::time::sleep(PAST_SHORT).await;
    app.upstream.reset().await;
    Mock::given(any())
        .respond_with(consumptions("new"))
        .expect(1)
        .mount(&app.upstream)
        .await;
    let r = app.get(url, &token).await;
    assert_eq!(
        header(&r, "cache-status"),
        "billing-gateway; fwd=miss; stored"
    );
    assert_eq!(
        r.json::<Value>().await.expect("json")["consumptions"][0]["product_name"],
        "new"
    );
}

#[tokio::test]
async fn a_rate_limited_upstream_is_covered_by_stale_too() {
    let app = TestApp::spawn_with(|c| c.cache.ttl = SHORT).await;
    Mock::given(any())
        .respond_with(consumptions("kept"))
        .mount(&app.upstream)
        .await;
    assert_eq!(
        app.get("/billing/v2beta1/taxes", &app.reader())
            .await
            .status(),
        200
    );
    tokio::time::sleep(PAST_SHORT).await;
    app.upstream.reset().await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(429))
        .mount(&app.upstream)
        .await;
    let r = app.get("/billing/v2beta1/taxes", &app.reader()).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "cache-status"), "billing-gateway; fwd=stale");
    // No entry to fall back on: the upstream's 429 reaches the caller with Retry-After.
    let r = app
        .get(
            "/billing/v2beta1/taxes?billing_period=2026-01",
            &app.reader(),
        )
        .await;
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
}

#[tokio::test]
async fn closed_periods_stay_fresh_after_the_current_period_expires() {
    let app = TestApp::spawn_with(|c| c.cache.ttl = SHORT).await;
    Mock::given(query_param("billing_period", "2020-01"))
        .respond_with(consumptions("closed"))
        .expect(1)
        .mount(&app.upstream)
        .await;
    Mock::given(any())
        .respond_with(consumptions("current"))
        .expect(2)
        .mount(&app.upstream)
        .await;
    let token = app.reader();
    app.get(
        "/billing/v2beta1/consumptions?billing_period=2020-01",
        &token,
    )
    .await;
    app.get("/billing/v2beta1/consumptions", &token).await;
    tokio::time::sleep(PAST_SHORT).await;
    let closed = app
        .get(
            "/billing/v2beta1/consumptions?billing_period=2020-01",
            &token,
        )
        .await;
    assert_eq!(header(&closed, "cache-status"), "billing-gateway; hit");
    let current = app.get("/billing/v2beta1/consumptions", &token).await;
    assert_eq!(
        header(&current, "cache-status"),
        "billing-gateway; fwd=miss; stored"
    );
}

#[tokio::test]
async fn a_scoped_caller_cannot_read_another_projects_cached_answer() {
    let teams = format!(
        "[[bindings]]\nclaim = \"groups\"\nequals = \"team-web\"\nroles = [\"billing-read-only\"]\nprojects = [\"{P1}\"]\n"
    );
    let app = TestApp::builder()
        .policy(&[("default.toml", DEFAULT_POLICY), ("teams.toml", &teams)])
        .spawn()
        .await;
    Mock::given(query_param("project_id", P2))
        .respond_with(consumptions("p2"))
        .expect(1)
        .mount(&app.upstream)
        .await;
    Mock::given(query_param("project_id", P1))
        .respond_with(consumptions("p1"))
        .expect(1)
        .mount(&app.upstream)
        .await;

    let org_wide = app.manager();
    let r = app
        .get(
            &format!("/billing/v2beta1/consumptions?project_id={P2}"),
            &org_wide,
        )
        .await;
    assert_eq!(r.status(), 200);

    let now = jsonwebtoken::get_current_timestamp();
    let team = token_with(json!({"sub": "web", "groups": ["team-web"], "exp": now + 600}));
    let denied = app
        .get(
            &format!("/billing/v2beta1/consumptions?project_id={P2}"),
            &team,
        )
        .await;
    assert_error(denied, 403, "permissions_denied").await;
    let own = app.get("/billing/v2beta1/consumptions", &team).await;
    assert_eq!(
        header(&own, "cache-status"),
        "billing-gateway; fwd=miss; stored"
    );
    assert_eq!(
        own.json::<Value>().await.expect("json")["consumptions"][0]["product_name"],
        "p1"
    );
}

#[tokio::test]
async fn purge_needs_its_permission_and_empties_the_cache() {
    let app = TestApp::spawn().await;
    Mock::given(any())
        .respond_with(consumptions("a"))
        .expect(2)
        .mount(&app.upstream)
        .await;
    let purge = |token: String| {
        app.client
            .delete(format!("{}/gateway/v1/cache", app.base))
            .bearer_auth(token)
            .send()
    };
    app.get("/billing/v2beta1/taxes", &app.reader()).await;
    assert_error(
        purge(app.reader()).await.expect("request"),
        403,
        "permissions_denied",
    )
    .await;
    let hit = app.get("/billing/v2beta1/taxes", &app.reader()).await;
    assert_eq!(header(&hit, "cache-status"), "billing-gateway; hit");
    let r = purge(app.manager()).await.expect("request");
    assert_eq!(r.status(), 204);
    let again = app.get("/billing/v2beta1/taxes", &app.reader()).await;
    assert_eq!(
        header(&again, "cache-status"),
        "billing-gateway; fwd=miss; stored"
    );
}

#[tokio::test]
async fn cached_bytes_stay_within_the_bound() {
    let bound: u64 = 16 * 1024;
    let app = TestApp::spawn_with(|c| c.cache.max_bytes = bound).await;
    let big = "x".repeat(2000);
    Mock::given(query_param("category_name", "Big"))
        .respond_with(consumptions(&big))
        .expect(2)
        .mount(&app.upstream)
        .await;
    Mock::given(any())
        .respond_with(consumptions(&"y".repeat(900)))
        .mount(&app.upstream)
        .await;
    let token = app.reader();
    // Larger than a tenth of the bound: served, never stored.
    for _ in 0..2 {
        let r = app
            .get("/billing/v2beta1/consumptions?category_name=Big", &token)
            .await;
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "cache-status"), "billing-gateway; fwd=miss");
    }
    for page in 1..=60 {
        let r = app
            .get(
                &format!("/billing/v2beta1/consumptions?page={page}"),
                &token,
            )
            .await;
        assert_eq!(r.status(), 200);
    }
    let metrics = app.metrics().await;
    let bytes: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("billing_gateway_cache_size_bytes "))
        .and_then(|v| v.trim().parse().ok())
        .expect("cache size metric");
    assert!(
        bytes > 0 && bytes <= bound,
        "{bytes} cached bytes, bound {bound}"
    );
}

#[tokio::test]
async fn an_answer_too_long_to_store_reaches_every_concurrent_caller_whole() {
    // A 64 KiB cache stores answers of up to 6.4 KiB.
    let app = TestApp::spawn_with(|c| c.cache.max_bytes = 64 * 1024).await;
    let long = "x".repeat(20_000);
    Mock::given(query_param("category_name", "Long"))
        .respond_with(consumptions(&long).set_delay(SHORT))
        .mount(&app.upstream)
        .await;
    let token = app.reader();
    let path = "/billing/v2beta1/consumptions?category_name=Long";
    let answers = futures_util::future::join_all((0..3).map(|_| app.get(path, &token))).await;
    for response in answers {
        assert_eq!(response.status(), 200);
        assert_eq!(header(&response, "content-type"), "application/json");
        assert_eq!(
            header(&response, "cache-status"),
            "billing-gateway; fwd=miss"
        );
        let body: Value = response.json().await.expect("the whole JSON answer");
        assert_eq!(body["consumptions"][0]["product_name"], long.as_str());
    }
    // The first caller's answer streamed through to it alone; the two that waited for it
    // fetched their own, since nothing was held whole to share.
    let sent = app.upstream_requests().await;
    assert_eq!(sent.len(), 3);
    assert!(sent.iter().all(|r| {
        r.url
            .query_pairs()
            .any(|(k, v)| k == "organization_id" && v == ORG)
    }));
    assert!(
        app.metrics()
            .await
            .lines()
            .any(|l| l == "billing_gateway_cache_entries 0")
    );
}

/// Sleeps until `at`: the passing of an entry's freshness is what the refresh tests are about.
async fn at(at: Instant) {
    tokio::time::sleep_until(at.into()).await;
}

/// A dashboard polling the current month across several expiries: every answer after the first
/// comes from the cache without waiting for the upstream, which is asked about once per
/// freshness, in the background.
#[tokio::test]
async fn a_key_polled_steadily_never_waits_for_the_upstream() {
    const TTL: Duration = Duration::from_secs(4);
    // Shorter than the last tenth of the freshness, so a refresh lands before the expiry; any
    // request that waited for the upstream took at least this long. Long enough that a hit
    // delayed by a busy 2-core machine (200 ms seen) is not mistaken for one that waited.
    const UPSTREAM: Duration = Duration::from_millis(350);
    const POLLING: Duration = Duration::from_secs(12);
    let app = TestApp::spawn_with(|c| c.cache.ttl = TTL).await;
    Mock::given(any())
        .respond_with(consumptions("polled").set_delay(UPSTREAM))
        .mount(&app.upstream)
        .await;
    let token = app.reader();
    let url = "/billing/v2beta1/consumptions?page_size=20";
    let first = app.get(url, &token).await;
    assert_eq!(
        header(&first, "cache-status"),
        "billing-gateway; fwd=miss; stored"
    );
    let started = Instant::now();
    let mut ticks = tokio::time::interval(Duration::from_millis(20));
    let (mut slowest, mut refreshing) = (Duration::ZERO, 0);
    while started.elapsed() < POLLING {
        ticks.tick().await;
        let sent = Instant::now();
        let r = app.get(url, &token).await;
        let took = sent.elapsed();
        let status = header(&r, "cache-status");
        assert!(
            status == "billing-gateway; hit" || status == "billing-gateway; hit; detail=refreshing",
            "{status} at {:?}",
            started.elapsed()
        );
        assert_eq!(
            r.json::<Value>().await.expect("json")["consumptions"][0]["product_name"],
            "polled"
        );
        slowest = slowest.max(took);
        refreshing += usize::from(status.ends_with("detail=refreshing"));
    }
    assert!(slowest < UPSTREAM, "the slowest answer took {slowest:?}");
    // Every refresh started has ended (the last may have been started by the last request).
    let ended = format!("billing_gateway_cache_refreshes_total{{result=\"stored\"}} {refreshing}");
    eventually(|| async { app.metrics().await.contains(&ended) }, PATIENCE).await;
    // The first fetch, then one refresh per freshness (each starting a tenth early).
    let sent = app.upstream_requests().await;
    let refreshes = sent.len() - 1;
    assert!((3..=4).contains(&refreshes), "{refreshes} refreshes");
    assert_eq!(refreshing, refreshes, "one request started each refresh");
    assert!(sent.iter().all(|r| {
        r.url
            .query_pairs()
            .any(|(k, v)| k == "organization_id" && v == ORG)
    }));
}

#[tokio::test]
async fn a_refresh_that_fails_keeps_the_entry() {
    const TTL: Duration = Duration::from_secs(5);
    let app = TestApp::spawn_with(|c| c.cache.ttl = TTL).await;
    Mock::given(any())
        .respond_with(consumptions("old"))
        .up_to_n_times(1)
        .mount(&app.upstream)
        .await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(500).set_body_raw("{}", "application/json"))
        .mount(&app.upstream)
        .await;
    let token = app.reader();
    let url = "/billing/v2beta1/taxes";
    let product = |body: Value| body["consumptions"][0]["product_name"].clone();
    assert_eq!(app.get(url, &token).await.status(), 200);
    let stored = Instant::now();

    at(stored + TTL.mul_f64(0.92)).await;
    let r = app.get(url, &token).await;
    assert_eq!(
        header(&r, "cache-status"),
        "billing-gateway; hit; detail=refreshing"
    );
    assert_eq!(product(r.json().await.expect("json")), "old");
    // The refresh failed: the entry stays, and is not refreshed again on every hit.
    eventually(
        || async {
            app.metrics()
                .await
                .contains(r#"billing_gateway_cache_refreshes_total{result="kept"} 1"#)
        },
        PATIENCE,
    )
    .await;
    assert_eq!(app.upstream_requests().await.len(), 2);
    let r = app.get(url, &token).await;
    assert_eq!(header(&r, "cache-status"), "billing-gateway; hit");
    assert_eq!(product(r.json().await.expect("json")), "old");
    assert_eq!(app.upstream_requests().await.len(), 2);

    // Past its freshness, the old answer still covers the failing upstream.
    at(stored + TTL + Duration::from_millis(100)).await;
    let r = app.get(url, &token).await;
    assert_eq!(header(&r, "cache-status"), "billing-gateway; fwd=stale");
    assert_eq!(product(r.json().await.expect("json")), "old");
}

#[tokio::test]
async fn only_a_key_asked_for_near_its_end_is_refreshed() {
    const TTL: Duration = Duration::from_secs(1);
    let app = TestApp::spawn_with(|c| c.cache.ttl = TTL).await;
    Mock::given(any())
        .respond_with(consumptions("a"))
        .mount(&app.upstream)
        .await;
    let token = app.reader();
    let (asked, forgotten) = (
        "/billing/v2beta1/consumptions?page=1",
        "/billing/v2beta1/consumptions?page=2",
    );
    app.get(asked, &token).await;
    app.get(forgotten, &token).await;
    let stored = Instant::now();
    // Asked for, but not yet in the last tenth of its freshness: a plain hit.
    at(stored + TTL / 2).await;
    let r = app.get(asked, &token).await;
    assert_eq!(header(&r, "cache-status"), "billing-gateway; hit");
    at(stored + TTL + Duration::from_millis(200)).await;
    assert_eq!(app.upstream_requests().await.len(), 2, "nothing refreshed");
    let r = app.get(forgotten, &token).await;
    assert_eq!(
        header(&r, "cache-status"),
        "billing-gateway; fwd=miss; stored"
    );
}

#[tokio::test]
async fn with_background_refresh_off_an_entry_simply_expires() {
    const TTL: Duration = Duration::from_secs(5);
    let app = TestApp::spawn_with(|c| {
        c.cache.ttl = TTL;
        c.cache.background_refresh = false;
    })
    .await;
    Mock::given(any())
        .respond_with(consumptions("a"))
        .mount(&app.upstream)
        .await;
    let token = app.reader();
    let url = "/billing/v2beta1/taxes";
    app.get(url, &token).await;
    let stored = Instant::now();
    at(stored + TTL.mul_f64(0.93)).await;
    let r = app.get(url, &token).await;
    assert_eq!(header(&r, "cache-status"), "billing-gateway; hit");
    at(stored + TTL + Duration::from_millis(100)).await;
    assert_eq!(app.upstream_requests().await.len(), 1, "nothing refreshed");
    let r = app.get(url, &token).await;
    assert_eq!(
        header(&r, "cache-status"),
        "billing-gateway; fwd=miss; stored"
    );
    assert_eq!(app.upstream_requests().await.len(), 2);
}
