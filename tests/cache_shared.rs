//! The cache shared by replicas through Redis (contract §11): one upstream call for a question
//! however many replicas are asked it at once, a purge on one replica reaching every other
//! within a second, a fill whose replica died taken over. Real `redis-server`s, real apps over
//! sockets, one wiremock upstream behind all the replicas of a test.

mod common;

use std::time::{Duration, Instant};

use common::redis::{Redis, shared_key};
use common::served::Served;
use common::*;
use serde_json::{Value, json};
use wiremock::matchers::any;
use wiremock::{Mock, MockServer, ResponseTemplate};

/// The value of the series `name{labels}` in a Prometheus exposition (0 when absent).
fn value(exposition: &str, series: &str) -> f64 {
    exposition
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// A wiremock upstream answering every request with the consumption of `product`, expecting
/// `calls` of them.
async fn answering(product: &str, calls: impl Into<wiremock::Times>) -> MockServer {
    let upstream = MockServer::start().await;
    Mock::given(any())
        .respond_with(consumptions(product))
        .expect(calls)
        .mount(&upstream)
        .await;
    upstream
}

/// `n` replicas of one gateway: one Redis, one upstream (the first replica's wiremock), each
/// connected and seeing the others.
async fn replicas(n: usize, redis: &Redis, upstream: MockServer) -> Vec<TestApp> {
    replicas_with(n, redis, upstream, |_| {}).await
}

async fn replicas_with(
    n: usize,
    redis: &Redis,
    upstream: MockServer,
    edit: impl Fn(&mut billing_gateway::Config),
) -> Vec<TestApp> {
    let first = TestApp::builder()
        .redis(redis.url())
        .upstream(upstream)
        .config(&edit)
        .spawn()
        .await;
    let url = first.upstream.uri();
    let mut apps = vec![first];
    for _ in 1..n {
        let app = TestApp::builder()
            .redis(redis.url())
            .upstream_url(url.clone())
            .config(&edit)
            .spawn()
            .await;
        apps.push(app);
    }
    for app in &apps {
        eventually(
            || async {
                value(&app.metrics().await, "billing_gateway_cluster_replicas") >= n as f64
            },
            PATIENCE,
        )
        .await;
    }
    apps
}

/// A reader token for one of several subjects, so no subject goes past its share of requests
/// in flight.
fn reader(subject: usize) -> String {
    let now = jsonwebtoken::get_current_timestamp();
    token_with(json!({
        "sub": format!("reader-{subject}"), "roles": ["billing-read-only"], "exp": now + 600,
    }))
}

async fn product(app: &TestApp, path: &str) -> (String, String) {
    let r = app.get(path, &reader(0)).await;
    assert_eq!(r.status(), 200, "{path}");
    let status = header(&r, "cache-status");
    let body: Value = r.json().await.expect("json");
    let product = body["consumptions"][0]["product_name"]
        .as_str()
        .expect("product")
        .to_owned();
    (status, product)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_cold_requests_over_three_replicas_make_one_upstream_call() {
    let redis = Redis::start();
    let upstream = MockServer::start().await;
    Mock::given(any())
        .respond_with(consumptions("once").set_delay(Duration::from_millis(500)))
        .expect(1)
        .mount(&upstream)
        .await;
    // Three replicas and 300 clients on one test process: Redis is given time to answer, so
    // that what is tested is the coalescing, not the replicas going on their own when slow.
    let apps = replicas_with(3, &redis, upstream, |c| {
        c.redis.timeout = Duration::from_secs(1);
    })
    .await;
    let tokens: Vec<String> = (0..4).map(reader).collect();
    let requests = (0..300).map(|i| {
        let app = &apps[i % 3];
        let request = app
            .client
            .get(format!(
                "{}/billing/v2beta1/taxes?billing_period=2026-07",
                app.base
            ))
            .bearer_auth(&tokens[i % 4]);
        async move {
            let r = request.send().await.expect("request");
            (r.status().as_u16(), r.text().await.expect("body"))
        }
    });
    let answers = futures_util::future::join_all(requests).await;
    for (status, body) in &answers {
        assert_eq!(*status, 200);
        assert_eq!(body, &answers[0].1);
    }
    assert_eq!(apps[0].upstream_requests().await.len(), 1);
    // One replica fetched; the two others waited for it (or found its answer stored).
    let mut stored = 0.0;
    for app in &apps {
        let m = app.metrics().await;
        let result = |r: &str| {
            value(
                &m,
                &format!("billing_gateway_cache_requests_total{{result=\"{r}\"}}"),
            )
        };
        stored += result("stored");
        if result("stored") == 0.0 {
            assert!(
                result("coalesced_remote") + result("hit_shared") >= 1.0,
                "{m}"
            );
        }
    }
    assert_eq!(stored, 1.0);
}

#[tokio::test]
async fn an_answer_stored_by_one_replica_is_a_shared_hit_on_another() {
    let redis = Redis::start();
    let upstream = answering("shared", 1).await;
    let apps = replicas(2, &redis, upstream).await;
    let path = "/billing/v2beta1/consumptions?billing_period=2026-07";
    let (status, _) = product(&apps[0], path).await;
    assert_eq!(status, "billing-gateway; fwd=miss; stored");
    let r = apps[1].get(path, &reader(1)).await;
    assert_eq!(
        header(&r, "cache-status"),
        "billing-gateway; hit; detail=shared"
    );
    let age: u64 = header(&r, "age").parse().expect("Age");
    assert!(age <= 1, "Age {age}");
    assert!(header(&r, "cache-control").starts_with("private, max-age="));
    assert_eq!(
        r.json::<Value>().await.expect("json")["consumptions"][0]["product_name"],
        "shared"
    );
    // Now in the second replica's own memory.
    let (status, _) = product(&apps[1], path).await;
    assert_eq!(status, "billing-gateway; hit");
}

/// Asks `app` until it serves `wanted` for `path`; how long that took.
async fn until_serves(app: &TestApp, path: &str, wanted: &str) -> Duration {
    let started = Instant::now();
    loop {
        let (_, served) = product(app, path).await;
        if served == wanted {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < PATIENCE,
            "{} never served {wanted}",
            app.base
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_purge_on_one_replica_reaches_the_others_within_a_second_even_without_pubsub() {
    let redis = Redis::start();
    let upstream = MockServer::start().await;
    let apps = replicas(3, &redis, upstream).await;
    let path = "/billing/v2beta1/consumptions";
    for (round, marker) in ["v1", "v2", "v3"].into_iter().enumerate() {
        apps[0].upstream.reset().await;
        Mock::given(any())
            .respond_with(consumptions(marker))
            .mount(&apps[0].upstream)
            .await;
        if round > 0 {
            purge(&apps[0]).await;
            for app in &apps[1..] {
                let took = until_serves(app, path, marker).await;
                assert!(
                    took < Duration::from_secs(1),
                    "{marker}: purged after {took:?}"
                );
            }
        }
        // Every replica holds the answer in its own memory: a hit asks nobody.
        for app in &apps {
            until_serves(app, path, marker).await;
            assert_eq!(product(app, path).await.0, "billing-gateway; hit");
        }
        // One fetch served every replica.
        assert_eq!(apps[0].upstream_requests().await.len(), 1, "{marker}");
        // The last round without the announcements: the replicas' subscriptions are cut just
        // before the purge, so only the generation poll can tell them.
        if round == 1 {
            redis
                .command(&["CLIENT", "KILL", "TYPE", "pubsub"])
                .expect("client kill");
        }
    }
    // The first purge came by its announcement, the second by the generation poll.
    for app in &apps[1..] {
        let m = app.metrics().await;
        let flushes = |reason: &str| {
            value(
                &m,
                &format!("billing_gateway_cache_l1_flushes_total{{reason=\"{reason}\"}}"),
            )
        };
        assert_eq!(flushes("message"), 1.0, "{m}");
        assert!(flushes("generation") >= 1.0, "{m}");
        assert_eq!(value(&m, "billing_gateway_cache_generation"), 2.0, "{m}");
    }
}

#[tokio::test]
async fn a_purge_while_redis_is_unreachable_empties_this_replica_and_says_so() {
    let mut redis = Redis::start();
    let upstream = answering("a", ..).await;
    let apps = replicas(1, &redis, upstream).await;
    let app = &apps[0];
    let path = "/billing/v2beta1/taxes";
    product(app, path).await;
    assert_eq!(product(app, path).await.0, "billing-gateway; hit");
    redis.kill();
    let r = purge_answer(app).await;
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["type"], "service_unavailable");
    assert_eq!(
        body["message"],
        "purged on this replica only; the shared cache is unreachable"
    );
    // Purged here all the same: nothing more from memory; the answer comes from this
    // replica's own fetch, once its budget (on its own, after a dead time) allows one.
    let started = Instant::now();
    loop {
        let r = app.get(path, &reader(0)).await;
        let status = header(&r, "cache-status");
        if r.status() == 200 {
            assert_eq!(status, "billing-gateway; fwd=miss; stored");
            break;
        }
        assert_eq!(
            (r.status().as_u16(), status.as_str()),
            (429, "billing-gateway; fwd=miss")
        );
        assert!(started.elapsed() < PATIENCE, "never fetched again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(app.upstream_requests().await.len(), 2);
}

#[tokio::test]
async fn a_replica_that_dies_filling_is_taken_over_with_one_more_upstream_call() {
    let redis = Redis::start();
    let upstream = MockServer::start().await;
    Mock::given(any())
        .respond_with(consumptions("filled").set_delay(Duration::from_secs(2)))
        .mount(&upstream)
        .await;
    let mut holder = Served::start(&upstream.uri(), &[("GATEWAY_REDIS_URL", &redis.url())]);
    let apps = replicas(1, &redis, upstream).await;
    let waiter = &apps[0];
    let path = "/billing/v2beta1/consumptions?billing_period=2026-07";
    // The holder takes the fill lease and calls the upstream...
    let client = waiter.client.clone();
    let dying = tokio::spawn(
        client
            .get(format!("{}{path}", holder.base))
            .bearer_auth(reader(0))
            .send(),
    );
    eventually(
        || async { waiter.upstream_requests().await.len() == 1 },
        PATIENCE,
    )
    .await;
    // ...another replica is asked the same, and waits for the holder's fill...
    let waiting = tokio::spawn({
        let request = waiter
            .client
            .get(format!("{}{path}", waiter.base))
            .bearer_auth(reader(1));
        async move { request.send().await.expect("request") }
    });
    eventually(
        || async {
            waiter
                .metrics()
                .await
                .contains("billing_gateway_requests_in_flight 1")
        },
        PATIENCE,
    )
    .await;
    // ...and the holder dies before answering: its lease lapses, the waiter takes over.
    let _ = holder.child.kill();
    let _ = holder.child.wait();
    assert!(dying.await.expect("join").is_err(), "the holder answered");
    let r = tokio::time::timeout(PATIENCE, waiting)
        .await
        .expect("the waiter is answered")
        .expect("join");
    assert_eq!(r.status(), 200);
    assert_eq!(
        header(&r, "cache-status"),
        "billing-gateway; fwd=miss; stored; detail=takeover"
    );
    assert_eq!(waiter.upstream_requests().await.len(), 2);
    let m = waiter.metrics().await;
    assert_eq!(
        value(
            &m,
            r#"billing_gateway_cache_requests_total{result="lock_takeover"}"#
        ),
        1.0
    );
    assert!(value(&m, "billing_gateway_cache_fill_wait_seconds_count") >= 1.0);
}

#[tokio::test]
async fn coalescing_across_replicas_resumes_after_redis_restarts() {
    let mut redis = Redis::start();
    let upstream = MockServer::start().await;
    Mock::given(any())
        .respond_with(consumptions("a").set_delay(Duration::from_millis(200)))
        .mount(&upstream)
        .await;
    let apps = replicas(3, &redis, upstream).await;
    redis.kill();
    // Without Redis each replica answers from its own fetch.
    for (i, app) in apps.iter().enumerate() {
        let r = app
            .get(
                &format!("/billing/v2beta1/taxes?page={}", i + 1),
                &reader(i),
            )
            .await;
        assert!(r.status() == 200 || r.status() == 429, "{}", r.status());
    }
    redis.restart();
    let restarted = Instant::now();
    let tokens: Vec<String> = (0..3).map(reader).collect();
    let fill_waits = || async {
        let mut waits = 0.0;
        for app in &apps {
            waits += value(
                &app.metrics().await,
                "billing_gateway_cache_fill_wait_seconds_count",
            );
        }
        waits
    };
    // One request per replica for a new question each time, until the replicas coordinate
    // again: one of them asks the upstream (or is refused by the shared budget, which holds
    // back a little after Redis returns), the others wait for its answer and get the same.
    let mut attempt = 100;
    loop {
        // Only against a hang: the contract's 5 s is the bench's figure to measure, not a
        // test's on a loaded machine.
        assert!(
            restarted.elapsed() < 3 * PATIENCE,
            "still not coalescing across replicas after Redis restarted"
        );
        attempt += 1;
        let path = format!("/billing/v2beta1/taxes?page={attempt}");
        let (calls_before, waits_before) =
            (apps[0].upstream_requests().await.len(), fill_waits().await);
        let batch = (0..3).map(|i| apps[i].get(&path, &tokens[i]));
        let statuses: Vec<u16> = futures_util::future::join_all(batch)
            .await
            .iter()
            .map(|r| r.status().as_u16())
            .collect();
        assert!(
            statuses.iter().all(|s| *s == 200 || *s == 429),
            "{statuses:?}"
        );
        let calls = apps[0].upstream_requests().await.len() - calls_before;
        let waited = fill_waits().await - waits_before;
        if calls <= 1 && waited >= 1.0 && statuses.iter().all(|s| *s == statuses[0]) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // And once the budget calls upstream again, one call answers all three.
    let started = Instant::now();
    loop {
        assert!(
            started.elapsed() < PATIENCE,
            "no single shared fetch after the restart"
        );
        attempt += 1;
        let path = format!("/billing/v2beta1/taxes?page={attempt}");
        let before = apps[0].upstream_requests().await.len();
        let batch = (0..3).map(|i| apps[i].get(&path, &tokens[i]));
        let answers = futures_util::future::join_all(batch).await;
        if answers.iter().all(|r| r.status() == 200) {
            assert_eq!(apps[0].upstream_requests().await.len() - before, 1);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_failed_fill_is_relayed_to_the_replicas_that_waited_for_it() {
    let redis = Redis::start();
    let upstream = MockServer::start().await;
    Mock::given(any())
        .respond_with(
            ResponseTemplate::new(500)
                .set_body_raw(
                    r#"{"message":"boom","type":"internal_error"}"#,
                    "application/json",
                )
                .set_delay(Duration::from_millis(500)),
        )
        .mount(&upstream)
        .await;
    let apps = replicas(3, &redis, upstream).await;
    let tokens: Vec<String> = (0..6).map(reader).collect();
    let path = "/billing/v2beta1/taxes?billing_period=2026-07";
    let answers =
        futures_util::future::join_all((0..6).map(|i| apps[i % 3].get(path, &tokens[i]))).await;
    for r in answers {
        assert_eq!(r.status(), 500);
        assert_eq!(r.headers()["content-type"], "application/json");
        let body: Value = r.json().await.expect("json");
        assert_eq!(body["message"], "boom");
    }
    assert_eq!(apps[0].upstream_requests().await.len(), 1);
    // Failures are not stored: the next question goes upstream again.
    assert_eq!(apps[1].get(path, &tokens[0]).await.status(), 500);
    assert_eq!(apps[0].upstream_requests().await.len(), 2);
}

#[tokio::test]
async fn the_shared_copy_covers_a_failing_upstream_on_every_replica() {
    const TTL: Duration = Duration::from_millis(500);
    let redis = Redis::start();
    let upstream = MockServer::start().await;
    Mock::given(any())
        .respond_with(consumptions("kept"))
        .up_to_n_times(1)
        .mount(&upstream)
        .await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(500).set_body_raw("{}", "application/json"))
        .mount(&upstream)
        .await;
    let apps = replicas_with(2, &redis, upstream, |c| c.cache.ttl = TTL).await;
    let path = "/billing/v2beta1/consumptions";
    assert_eq!(
        product(&apps[0], path).await.0,
        "billing-gateway; fwd=miss; stored"
    );
    // Past its freshness, within stale-if-error: the entry growing old is what is tested.
    tokio::time::sleep(TTL + Duration::from_millis(200)).await;
    // A replica that never held the answer serves the shared copy while the upstream fails...
    assert_eq!(
        product(&apps[1], path).await,
        ("billing-gateway; fwd=stale".to_owned(), "kept".to_owned())
    );
    // ...and so does every other, without asking the upstream again for a few seconds.
    assert_eq!(
        product(&apps[0], path).await,
        ("billing-gateway; fwd=stale".to_owned(), "kept".to_owned())
    );
    assert_eq!(apps[0].upstream_requests().await.len(), 2);
}

#[tokio::test]
async fn entries_planted_in_redis_without_the_gateways_mac_are_never_served() {
    let redis = Redis::start();
    let upstream = answering("upstream", 2).await;
    let apps = replicas(1, &redis, upstream).await;
    let app = &apps[0];
    // A page with a script, planted as a fresh entry (with and without a MAC field)...
    let entry = shared_key(
        "c",
        0,
        &format!("consumptions?billing_period=2026-07&organization_id={ORG}"),
    );
    let far = "9999999999999";
    let script = "<html><script>alert(1)</script></html>";
    redis
        .command(&[
            "HSET", &entry, "a", "0", "f", far, "s", far, "x", "0", "b", script, "m", "forged",
        ])
        .expect("planted");
    // ...and a redirect, planted as the answer of a failed fill that a waiter relays (a lease
    // is planted too, so the reader waits for that fill).
    let taxes = format!("taxes?billing_period=2026-07&organization_id={ORG}");
    let redirect = "302\ntext/html\n\n<script>alert(2)</script>";
    redis
        .command(&["SET", &shared_key("o", 0, &taxes), redirect])
        .expect("planted");
    redis
        .command(&["SET", &shared_key("l", 0, &taxes), "x", "PX", "600"])
        .expect("planted");

    let path = "/billing/v2beta1/consumptions?billing_period=2026-07";
    assert_eq!(
        product(app, path).await,
        (
            "billing-gateway; fwd=miss; stored".to_owned(),
            "upstream".to_owned()
        )
    );
    let r = app
        .get("/billing/v2beta1/taxes?billing_period=2026-07", &reader(1))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["consumptions"][0]["product_name"], "upstream");
    // Both went to the upstream (the mock expects exactly two calls), and the fill replaced
    // the planted entry with the gateway's own: served from memory now.
    assert_eq!(product(app, path).await.0, "billing-gateway; hit");
    let untrusted = value(
        &app.metrics().await,
        "billing_gateway_cache_untrusted_entries_total",
    );
    // The entry once, the redirect at each look while the planted lease held.
    assert!(untrusted >= 2.0, "{untrusted}");
}

#[tokio::test]
async fn gateways_of_two_organizations_under_one_prefix_never_serve_each_others_answers() {
    let redis = Redis::start();
    let project = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee";
    let mut apps = Vec::new();
    for (organization, marker) in [(ORG, "first"), (OTHER_ORG, "second")] {
        let upstream = answering(marker, 1).await;
        let app = TestApp::builder()
            .redis(redis.url())
            .upstream(upstream)
            .config(move |c| {
                c.upstream.organization_id = organization.parse().expect("uuid");
                c.redis.prefix = Some("one-prefix".to_owned());
            })
            .spawn()
            .await;
        apps.push(app);
    }
    // One project's consumption is the same upstream request for both organizations: only
    // the namespace and the MAC keep their answers apart.
    let path = format!("/billing/v2beta1/consumptions?project_id={project}");
    for (app, marker) in apps.iter().zip(["first", "second"]) {
        assert_eq!(
            product(app, &path).await,
            (
                "billing-gateway; fwd=miss; stored".to_owned(),
                marker.to_owned()
            )
        );
        assert_eq!(app.upstream_requests().await.len(), 1);
    }
    // Each organization's entry is under its own name, whatever the prefix.
    for organization in [ORG, OTHER_ORG] {
        let entries = format!("one-prefix:{{{organization}}}:c:*");
        assert_eq!(redis.command(&["KEYS", &entries]).as_deref(), Some("*1"));
    }
}

/// Purges through `app`, which must answer 204.
async fn purge(app: &TestApp) {
    assert_eq!(purge_answer(app).await.status(), 204);
}

/// Purges through the first of `apps` and waits until every one holds `generation`.
async fn purge_everywhere(apps: &[TestApp], generation: f64) {
    purge(&apps[0]).await;
    for app in apps {
        eventually(
            || async { metric(app, "billing_gateway_cache_generation").await == generation },
            PATIENCE,
        )
        .await;
    }
}

/// What `app` answers a purge.
async fn purge_answer(app: &TestApp) -> reqwest::Response {
    app.client
        .delete(format!("{}/gateway/v1/cache", app.base))
        .bearer_auth(app.manager())
        .send()
        .await
        .expect("purge")
}

/// A series of `app`'s metrics now.
async fn metric(app: &TestApp, series: &str) -> f64 {
    value(&app.metrics().await, series)
}

const GENERATION_FLUSHES: &str = r#"billing_gateway_cache_l1_flushes_total{reason="generation"}"#;
const DEGRADED: &str = r#"billing_gateway_redis_mode{mode="degraded"}"#;
const GENERATION_READS: &str =
    r#"billing_gateway_redis_commands_total{op="generation",result="ok"}"#;

/// How many times each replica has read the shared generation.
async fn generation_reads(apps: &[TestApp]) -> Vec<f64> {
    let mut reads = Vec::new();
    for app in apps {
        reads.push(metric(app, GENERATION_READS).await);
    }
    reads
}

/// Whether every replica read the generation again since `before` (after Redis was killed, so
/// from the new server), sharing again.
async fn read_generation_since(apps: &[TestApp], before: &[f64]) -> bool {
    let now = generation_reads(apps).await;
    now.iter().zip(before).all(|(now, before)| now > before)
}

#[tokio::test]
async fn a_redis_restart_after_a_purge_flushes_nothing_and_cached_reads_stay_200() {
    let mut redis = Redis::start();
    let upstream = answering("kept", ..).await;
    let apps = replicas(2, &redis, upstream).await;
    let path = "/billing/v2beta1/consumptions?billing_period=2026-07";
    purge_everywhere(&apps, 1.0).await;
    for app in &apps {
        product(app, path).await;
        assert_eq!(product(app, path).await.0, "billing-gateway; hit");
    }
    assert_eq!(apps[0].upstream_requests().await.len(), 1);
    let mut flushes = Vec::new();
    for app in &apps {
        flushes.push(metric(app, GENERATION_FLUSHES).await);
    }
    // Every read from now on, on both replicas, is answered from memory.
    let reads = || async {
        for app in &apps {
            let r = app.get(path, &reader(0)).await;
            assert_eq!(
                (r.status().as_u16(), header(&r, "cache-status")),
                (200, "billing-gateway; hit".to_owned())
            );
        }
    };
    redis.kill();
    // Both replicas go on their own (their budget starts no upstream call for a while)...
    let started = Instant::now();
    loop {
        reads().await;
        let mut degraded = true;
        for app in &apps {
            degraded &= metric(app, DEGRADED).await == 1.0;
        }
        if degraded {
            break;
        }
        assert!(started.elapsed() < PATIENCE, "the replicas never noticed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    redis.restart();
    // ...and share again, until both read the generation from the new (empty) server.
    let after_restart = generation_reads(&apps).await;
    let started = Instant::now();
    while !read_generation_since(&apps, &after_restart).await {
        reads().await;
        assert!(
            started.elapsed() < 3 * PATIENCE,
            "the replicas never shared again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    reads().await;
    for (app, before) in apps.iter().zip(flushes) {
        assert_eq!(metric(app, GENERATION_FLUSHES).await, before);
        assert_eq!(metric(app, "billing_gateway_cache_generation").await, 1.0);
    }
    // The generation is back in Redis, and nothing more went upstream.
    let generation = format!("billing-gateway:{{{ORG}}}:gen");
    assert_eq!(redis.command(&["GET", &generation]).as_deref(), Some("1"));
    assert_eq!(apps[0].upstream_requests().await.len(), 1);
}

#[tokio::test]
async fn a_restore_from_a_snapshot_taken_before_a_purge_never_serves_the_purged_answer() {
    let mut redis = Redis::start();
    let upstream = MockServer::start().await;
    Mock::given(any())
        .respond_with(consumptions("purged"))
        .up_to_n_times(1)
        .mount(&upstream)
        .await;
    Mock::given(any())
        .respond_with(consumptions("new"))
        .mount(&upstream)
        .await;
    let apps = replicas(2, &redis, upstream).await;
    let path = "/billing/v2beta1/consumptions?billing_period=2026-07";
    assert_eq!(product(&apps[0], path).await.1, "purged");
    let snapshot = redis.snapshot();
    purge_everywhere(&apps, 1.0).await;
    // Redis comes back from the backup taken before the purge: the purged answer is in it.
    redis.restore(&snapshot);
    let entries = format!("billing-gateway:{{{ORG}}}:c:0:*");
    assert_eq!(redis.command(&["KEYS", &entries]).as_deref(), Some("*1"));
    let after_restore = generation_reads(&apps).await;
    let started = Instant::now();
    while !read_generation_since(&apps, &after_restore).await {
        assert!(
            started.elapsed() < 3 * PATIENCE,
            "the replicas never shared again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Each replica asks until answered (the budget holds calls back a moment after Redis
    // returns): never the purged answer.
    for app in &apps {
        let started = Instant::now();
        loop {
            let r = app.get(path, &reader(0)).await;
            if r.status() == 200 {
                let body: Value = r.json().await.expect("json");
                assert_eq!(body["consumptions"][0]["product_name"], "new");
                break;
            }
            assert_eq!(r.status(), 429);
            assert!(started.elapsed() < PATIENCE, "never answered");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // One call before the purge, one after it for both replicas.
    assert_eq!(apps[0].upstream_requests().await.len(), 2);
}

/// Readers A and C flood `flooded` with cold questions (A's backlog too long for the budget's
/// wait); A then asks `path` there, and B asks it on `asked` while A's fetch waits in A's
/// backlog. Their answers, A's then B's.
async fn refused_filler_and_waiter(
    redis: &Redis,
    flooded: &TestApp,
    asked: &TestApp,
    path: &'static str,
    canonical: &str,
) -> (reqwest::Response, reqwest::Response) {
    let mut flood = Vec::new();
    for (reader, pages) in [("a", 1..16), ("c", 101..116)] {
        for page in pages {
            let request = flooded
                .client
                .get(format!(
                    "{}/billing/v2beta1/taxes?page={page}",
                    flooded.base
                ))
                .bearer_auth(reader_as(reader))
                .send();
            flood.push(tokio::spawn(request));
        }
    }
    eventually(
        || async {
            metric(
                flooded,
                "billing_gateway_upstream_budget_waiting_principals",
            )
            .await
                == 2.0
        },
        PATIENCE,
    )
    .await;
    let first = tokio::spawn(
        flooded
            .client
            .get(format!("{}{path}", flooded.base))
            .bearer_auth(reader_as("a"))
            .send(),
    );
    // A holds the fill lease of the question (its fetch waits for a turn)...
    let lease = shared_key("l", 0, canonical);
    eventually(
        || async { redis.command(&["EXISTS", &lease]).as_deref() == Some(":1") },
        PATIENCE,
    )
    .await;
    // ...when B asks it.
    let second = asked.get(path, &reader_as("b")).await;
    let first = first.await.expect("join").expect("A answered");
    for request in flood {
        let _ = request.await;
    }
    (first, second)
}

/// An upstream answering `wanted` for one period's consumption and anything else for the rest,
/// with a budget of ten calls a second.
async fn flooded_replicas(redis: &Redis) -> Vec<TestApp> {
    let upstream = MockServer::start().await;
    Mock::given(wiremock::matchers::query_param("billing_period", "2026-05"))
        .respond_with(consumptions("wanted"))
        .mount(&upstream)
        .await;
    Mock::given(any())
        .respond_with(consumptions("flood"))
        .mount(&upstream)
        .await;
    replicas_with(2, redis, upstream, |c| c.upstream.rate = per_second(10)).await
}

const ASKED: &str = "/billing/v2beta1/consumptions?billing_period=2026-05";

fn asked_canonical() -> String {
    format!("consumptions?billing_period=2026-05&organization_id={ORG}")
}

/// B's answer: the upstream's, fetched once, for B.
async fn assert_answered_for_itself(second: reqwest::Response, cache_status: &str, app: &TestApp) {
    assert_eq!(second.status(), 200);
    assert_eq!(header(&second, "cache-status"), cache_status);
    let body: Value = second.json().await.expect("json");
    assert_eq!(body["consumptions"][0]["product_name"], "wanted");
    let asked = app
        .upstream_requests()
        .await
        .iter()
        .filter(|r| r.url.query() == Some(&format!("billing_period=2026-05&organization_id={ORG}")))
        .count();
    assert_eq!(asked, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_readers_refusal_is_not_served_to_a_reader_waiting_on_the_same_replica() {
    let redis = Redis::start();
    let apps = flooded_replicas(&redis).await;
    let (first, second) =
        refused_filler_and_waiter(&redis, &apps[0], &apps[0], ASKED, &asked_canonical()).await;
    assert_eq!(first.status(), 429);
    assert_answered_for_itself(second, "billing-gateway; fwd=miss; stored", &apps[0]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_readers_refusal_is_not_relayed_to_a_reader_waiting_on_another_replica() {
    let redis = Redis::start();
    let apps = flooded_replicas(&redis).await;
    let (first, second) =
        refused_filler_and_waiter(&redis, &apps[0], &apps[1], ASKED, &asked_canonical()).await;
    assert_eq!(first.status(), 429);
    assert_answered_for_itself(
        second,
        "billing-gateway; fwd=miss; stored; detail=takeover",
        &apps[0],
    )
    .await;
}

#[tokio::test]
async fn an_upstream_429_relayed_to_another_replica_is_counted_there_with_its_reason() {
    let redis = Redis::start();
    let upstream = MockServer::start().await;
    Mock::given(any())
        .respond_with(
            ResponseTemplate::new(429)
                .insert_header("retry-after", "1")
                .set_delay(Duration::from_millis(500)),
        )
        .expect(1)
        .mount(&upstream)
        .await;
    let apps = replicas(2, &redis, upstream).await;
    let path = "/billing/v2beta1/taxes?billing_period=2026-07";
    let reason = r#"billing_gateway_rejections_total{reason="upstream_rate_limited"}"#;
    let first = tokio::spawn(
        apps[0]
            .client
            .get(format!("{}{path}", apps[0].base))
            .bearer_auth(reader(0))
            .send(),
    );
    let lease = shared_key(
        "l",
        0,
        &format!("taxes?billing_period=2026-07&organization_id={ORG}"),
    );
    eventually(
        || async { redis.command(&["EXISTS", &lease]).as_deref() == Some(":1") },
        PATIENCE,
    )
    .await;
    let second = apps[1].get(path, &reader(1)).await;
    assert_eq!(first.await.expect("join").expect("answered").status(), 429);
    assert_eq!(second.status(), 429);
    assert_eq!(header(&second, "cache-status"), "billing-gateway; fwd=miss");
    // One upstream call (the mock expects one); each replica counts the 429 it answered.
    for app in &apps {
        assert_eq!(metric(app, reason).await, 1.0);
    }
}

#[tokio::test]
async fn across_a_redis_restart_after_a_purge_an_expired_answer_is_served_stale_not_refused() {
    const TTL: Duration = Duration::from_millis(300);
    let mut redis = Redis::start();
    let upstream = answering("kept", ..).await;
    let apps = replicas_with(1, &redis, upstream, |c| c.cache.ttl = TTL).await;
    let app = &apps[0];
    // The current month: fresh for the short TTL.
    let path = "/billing/v2beta1/consumptions";
    purge(app).await;
    product(app, path).await;
    // Every read is a 200 from memory: the answer while fresh, then stale while the budget
    // starts no upstream call (it may also have its turn, and store the answer again).
    let read = || async {
        let (status, product) = product(app, path).await;
        assert_eq!(product, "kept");
        assert!(
            [
                "billing-gateway; hit",
                "billing-gateway; hit; detail=refreshing",
                "billing-gateway; fwd=stale",
                "billing-gateway; fwd=miss; stored"
            ]
            .contains(&status.as_str()),
            "{status}"
        );
        status == "billing-gateway; fwd=stale"
    };
    redis.kill();
    let started = Instant::now();
    while metric(app, DEGRADED).await != 1.0 {
        read().await;
        assert!(started.elapsed() < PATIENCE, "never degraded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    redis.restart();
    let after_restart = generation_reads(&apps).await;
    let (started, mut stale) = (Instant::now(), 0);
    while !read_generation_since(&apps, &after_restart).await || stale == 0 {
        stale += usize::from(read().await);
        assert!(started.elapsed() < 3 * PATIENCE, "never served stale");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(metric(app, GENERATION_FLUSHES).await, 0.0);
}
