//! What a replica sharing through Redis writes in its log: each switch of mode once (not once
//! per request), and never the Redis password.
//!
//! A test binary of its own: the log capture is a thread-local subscriber, and tests running
//! beside it on other threads would make tracing cache its call sites as uninteresting.

mod common;

use std::time::Duration;

use common::redis::Redis;
use common::*;

const PASSWORD: &str = "hunter2-redis-password";

/// Single-threaded runtime: the subscriber set for this thread sees every task of the app.
#[tokio::test(flavor = "current_thread")]
async fn mode_changes_are_logged_once_and_the_password_never() {
    let (captured, _logs) = capture_logs("debug");

    let mut redis = Redis::with_password(PASSWORD);
    let app = TestApp::builder().redis(redis.url()).spawn().await;
    let connected = |m: String| m.contains("billing_gateway_redis_mode{mode=\"connected\"} 1");
    let degraded = |m: String| m.contains("billing_gateway_redis_mode{mode=\"degraded\"} 1");
    eventually(
        || async {
            app.metrics()
                .await
                .contains("op=\"heartbeat\",result=\"ok\"")
        },
        PATIENCE,
    )
    .await;
    redis.kill();
    eventually(|| async { degraded(app.metrics().await) }, PATIENCE).await;
    // Several failed probes (one a second) and requests meanwhile: still one line.
    let token = app.reader();
    for _ in 0..3 {
        let r = app.get("/billing/v2beta1/invoices", &token).await;
        assert_ne!(r.status().as_u16() / 100, 5, "Redis down is never a 5xx");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    redis.restart();
    eventually(|| async { connected(app.metrics().await) }, PATIENCE).await;

    let log = captured.text();
    assert_eq!(
        log.matches("this replica keeps its own limits").count(),
        1,
        "{log}"
    );
    assert_eq!(
        log.matches("sharing budget, rates and cache resumes")
            .count(),
        1,
        "{log}"
    );
    assert!(
        log.contains("a Redis command failed"),
        "the failures are in the debug log"
    );
    let metrics = app.metrics().await;
    for text in [&log, &metrics] {
        assert!(!text.contains(PASSWORD), "the Redis password leaked");
    }
    app.stop().await;
}
