//! Issue 20 §2f and §3's metrics: `/metrics` on a listener of its own, an unknown gateway key
//! counted as its own class, and the series the dashboard and alerts read present from the
//! start (retries at 0, the degraded rate before any upstream call).

mod common;

use common::redis::Redis;
use common::*;

/// A port free a moment ago, for a listener the test names before the app binds it.
fn free_port() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
}

/// §2f: with `metrics_listen`, `/metrics` (whose labels name keys and classes) is served there
/// only; the callers' listener answers it 404 like any unknown path, reaching no upstream.
#[tokio::test]
async fn metrics_are_served_on_their_own_listener_only() {
    let metrics_at = free_port();
    let app = TestApp::builder()
        .config(|c| c.metrics_listen = Some(metrics_at))
        .spawn()
        .await;
    // Some traffic, so the exposition has a request series to show.
    let refused = app
        .get("/billing/v2beta1/nothing-here", &app.reader())
        .await;
    assert_eq!(refused.status(), 404);

    let public = app
        .client
        .get(format!("{}/metrics", app.base))
        .send()
        .await
        .expect("request");
    let body = assert_error(public, 404, "not_found").await;
    assert!(!body.to_string().contains("billing_gateway_"), "{body}");

    let scraped = app
        .client
        .get(format!("http://{metrics_at}/metrics"))
        .send()
        .await
        .expect("scrape");
    assert_eq!(scraped.status(), 200);
    let text = scraped.text().await.expect("text");
    assert_eq!(
        value(
            &text,
            "billing_gateway_rejections_total",
            "reason=\"not_found\""
        ),
        Some(2.0),
        "the Billing path and the public /metrics: {text}"
    );
    assert!(app.upstream_requests().await.is_empty());
}

/// §3: a gateway key that names no one is counted apart from a request with no credential.
#[tokio::test]
async fn an_unknown_gateway_key_is_counted_apart_from_a_missing_credential() {
    let app = TestApp::spawn().await;
    let unknown = app
        .client
        .get(format!("{}/billing/v2beta1/consumptions", app.base))
        .header("x-auth-token", "0b7d6a1e-9c2f-4e3a-8b5d-2f1e0c9a8b7d")
        .send()
        .await
        .expect("request");
    let body = assert_error(unknown, 401, "denied_authentication").await;
    assert_eq!(body["method"], "api_key");
    let anonymous = app
        .client
        .get(format!("{}/billing/v2beta1/consumptions", app.base))
        .send()
        .await
        .expect("request");
    assert_error(anonymous, 401, "denied_authentication").await;

    let m = app.metrics().await;
    let rejected = |reason: &str| {
        value(
            &m,
            "billing_gateway_rejections_total",
            &format!("reason=\"{reason}\""),
        )
    };
    assert_eq!(rejected("authentication_unknown_key"), Some(1.0), "{m}");
    assert_eq!(rejected("authentication_missing"), Some(1.0), "{m}");
    assert!(app.upstream_requests().await.is_empty());
}

/// §3: `upstream_retries_total` is there at 0 for every operation that can be retried (the
/// reads) before any retry, so its panel has data and `increase()` sees the first one.
#[tokio::test]
async fn upstream_retries_are_exposed_at_zero_before_the_first_retry() {
    let app = TestApp::spawn().await;
    let m = app.metrics().await;
    for operation in ["consumptions", "taxes", "invoices", "download-invoice"] {
        assert_eq!(
            value(
                &m,
                "billing_gateway_upstream_retries_total",
                &format!("operation=\"{operation}\"")
            ),
            Some(0.0),
            "{operation}: {m}"
        );
    }
    // Coupons are never retried (a POST): no series promised for them.
    assert_eq!(
        value(
            &m,
            "billing_gateway_upstream_retries_total",
            "operation=\"redeem-coupon\""
        ),
        None
    );
    assert!(app.upstream_requests().await.is_empty());
}

/// §3: a replica that loses Redis shows the rate it allows itself at once, not 0 until its
/// first upstream call.
#[tokio::test]
async fn the_degraded_rate_is_shown_before_any_upstream_call() {
    let mut redis = Redis::start();
    let app = TestApp::builder()
        .redis(redis.url())
        .config(|c| {
            c.upstream.rate = billing_gateway::config::Rate {
                count: 30,
                per: std::time::Duration::from_secs(1),
            };
            c.redis.fallback_replicas = 3;
        })
        .spawn()
        .await;
    let degraded_rate = || async {
        value(
            &app.metrics().await,
            "billing_gateway_upstream_budget_degraded_rate",
            "",
        )
    };
    let mode_is = |mode: &'static str| {
        let app = &app;
        async move {
            value(
                &app.metrics().await,
                "billing_gateway_redis_mode",
                &format!("mode=\"{mode}\""),
            ) == Some(1.0)
        }
    };
    eventually(|| mode_is("connected"), PATIENCE).await;
    assert_eq!(degraded_rate().await, Some(0.0));
    redis.kill();
    eventually(|| mode_is("degraded"), PATIENCE).await;
    // 30/s shared by the 3 replicas assumed while Redis cannot say how many there are.
    assert_eq!(degraded_rate().await, Some(10.0));
    assert!(app.upstream_requests().await.is_empty());
}
