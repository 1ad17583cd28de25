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

/// The one warning logged on going degraded: the line that says so, once `app` is degraded.
async fn degraded_warning(app: &TestApp, captured: &Captured, before: usize) -> String {
    eventually(
        || async {
            app.metrics()
                .await
                .contains("billing_gateway_redis_mode{mode=\"degraded\"} 1")
        },
        PATIENCE,
    )
    .await;
    let log = captured.text();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("this replica keeps its own limits"))
        .collect();
    assert_eq!(warnings.len(), before + 1, "{log}");
    warnings[before].to_owned()
}

/// Refused, denied by the ACL, or an untrusted TLS certificate: the one warning says which.
#[tokio::test(flavor = "current_thread")]
async fn the_warning_on_going_degraded_says_why_refused_acl_or_tls() {
    let (captured, _logs) = capture_logs("warn");

    // Nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let app = TestApp::builder()
        .redis(format!("redis://127.0.0.1:{closed}"))
        .spawn()
        .await;
    let warning = degraded_warning(&app, &captured, 0).await;
    assert!(warning.contains("connection refused"), "{warning}");
    app.stop().await;

    // A user the ACL confines to other keys: its scripts are refused (NOPERM).
    let redis = Redis::start();
    assert_eq!(
        redis
            .command(&[
                "ACL",
                "SETUSER",
                "gateway",
                "on",
                &format!(">{PASSWORD}"),
                "~elsewhere:*",
                "&*",
                "+@all",
            ])
            .as_deref(),
        Some("+OK")
    );
    let port = redis.url().rsplit(':').next().expect("a port").to_owned();
    let app = TestApp::builder()
        .redis(format!("redis://gateway:{PASSWORD}@127.0.0.1:{port}"))
        .spawn()
        .await;
    let warning = degraded_warning(&app, &captured, 1).await;
    assert!(warning.contains("ACL refused"), "{warning}");
    assert!(warning.contains("NOPERM"), "{warning}");
    app.stop().await;

    // A Redis with a private CA, not trusted (no GATEWAY_REDIS_CA_FILE).
    let tls = common::redis_tls::TlsRedis::start();
    let app = TestApp::builder().redis(tls.url()).spawn().await;
    let warning = degraded_warning(&app, &captured, 2).await;
    assert!(warning.contains("TLS handshake failed"), "{warning}");
    app.stop().await;

    let log = captured.text();
    assert!(!log.contains(PASSWORD), "the Redis password leaked: {log}");
    assert!(!log.contains("127.0.0.1:"), "a Redis URL leaked: {log}");
}
