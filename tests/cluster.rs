//! Replicas sharing through Redis (contract §11): real `redis-server`s started by the tests, real
//! gateway apps over sockets, one wiremock upstream behind all the replicas of a test.

mod common;

use std::sync::Arc;
use std::time::Duration;

use billing_gateway::cluster::{Cluster, Event, Mode};
use billing_gateway::config::RedisConfig;
use billing_gateway::telemetry::Metrics;
use common::redis::Redis;
use common::*;
use secrecy::SecretString;
use tokio::sync::broadcast;

/// The value of the series `name{labels}` in a Prometheus exposition.
fn value(exposition: &str, name: &str, labels: &str) -> Option<f64> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            l.split([' ', '{']).next() == Some(name)
                && l.split(' ')
                    .next()
                    .is_some_and(|head| head.contains(labels))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

async fn mode(app: &TestApp) -> &'static str {
    let m = app.metrics().await;
    ["local", "connected", "degraded"]
        .into_iter()
        .find(|mode| {
            value(
                &m,
                "billing_gateway_redis_mode",
                &format!("mode=\"{mode}\""),
            ) == Some(1.0)
        })
        .expect("one mode is 1")
}

/// `n` replicas of one gateway: one Redis, one upstream (the first replica's wiremock).
async fn replicas(
    n: usize,
    redis: &Redis,
    edit: impl Fn(&mut billing_gateway::Config),
) -> Vec<TestApp> {
    let first = TestApp::builder()
        .redis(redis.url())
        .config(&edit)
        .spawn()
        .await;
    let upstream = first.upstream.uri();
    let mut apps = vec![first];
    for _ in 1..n {
        apps.push(
            TestApp::builder()
                .redis(redis.url())
                .upstream_url(upstream.clone())
                .config(&edit)
                .spawn()
                .await,
        );
    }
    apps
}

#[tokio::test]
async fn replicas_sharing_one_redis_see_each_other_and_report_connected() {
    let redis = Redis::start();
    let apps = replicas(3, &redis, |c| c.redis.fallback_replicas = 1).await;
    for app in &apps {
        eventually(
            || async {
                value(&app.metrics().await, "billing_gateway_cluster_replicas", "") == Some(3.0)
            },
            PATIENCE,
        )
        .await;
        assert_eq!(mode(app).await, "connected");
        let m = app.metrics().await;
        assert!(
            value(
                &m,
                "billing_gateway_redis_commands_total",
                "op=\"heartbeat\",result=\"ok\""
            )
            .is_some_and(|n| n >= 1.0),
            "{m}"
        );
    }
    // Every key the replicas wrote is under the organization's namespace, with a TTL.
    let key = format!("billing-gateway:{{{ORG}}}:replicas");
    assert_eq!(redis.command(&["ZCARD", &key]).as_deref(), Some(":3"));
    let ttl: i64 = redis
        .command(&["PTTL", &key])
        .and_then(|t| t.trim_start_matches(':').parse().ok())
        .expect("a TTL");
    assert!(ttl > 0, "{ttl}");
    for app in apps {
        app.stop().await;
    }
}

#[tokio::test]
async fn the_replica_count_never_falls_below_the_fallback() {
    let redis = Redis::start();
    let apps = replicas(1, &redis, |c| c.redis.fallback_replicas = 5).await;
    eventually(
        || async {
            value(
                &apps[0].metrics().await,
                "billing_gateway_cluster_replicas",
                "",
            ) == Some(5.0)
        },
        PATIENCE,
    )
    .await;
    for app in apps {
        app.stop().await;
    }
}

fn link(redis: &Redis) -> Arc<Cluster> {
    let config = RedisConfig {
        url: Some(SecretString::from(redis.url())),
        prefix: Some("test:{events}".to_owned()),
        timeout: Duration::from_millis(500),
        fallback_replicas: 3,
    };
    Cluster::new(
        &config,
        ORG.parse().expect("uuid"),
        Arc::new(Metrics::default()),
    )
    .expect("a link")
}

async fn next(events: &mut broadcast::Receiver<Event>) -> Event {
    tokio::time::timeout(PATIENCE, events.recv())
        .await
        .expect("an event in time")
        .expect("the channel is open")
}

#[tokio::test]
async fn events_reach_every_receiver_and_a_killed_subscription_is_made_again() {
    let redis = Redis::start();
    let cluster = link(&redis);
    let mut events = cluster.events();
    let running = tokio::spawn(cluster.clone().run());
    assert_eq!(next(&mut events).await, Event::Subscribed);
    let channel = cluster.key("events");
    assert_eq!(channel, "test:{events}:events");
    assert_eq!(
        redis.command(&["PUBLISH", &channel, "purge 7"]).as_deref(),
        Some(":1")
    );
    assert_eq!(next(&mut events).await, Event::Message("purge 7".into()));

    // Redis drops the subscriber: the link says so, subscribes again by itself, and messages
    // published after that arrive.
    assert_eq!(
        redis
            .command(&["CLIENT", "KILL", "TYPE", "pubsub"])
            .as_deref(),
        Some(":1")
    );
    assert_eq!(next(&mut events).await, Event::Disconnected);
    assert_eq!(next(&mut events).await, Event::Subscribed);
    assert_eq!(
        redis.command(&["PUBLISH", &channel, "purge 8"]).as_deref(),
        Some(":1")
    );
    assert_eq!(next(&mut events).await, Event::Message("purge 8".into()));
    assert_eq!(cluster.mode(), Mode::Connected);
    running.abort();
}

#[tokio::test]
async fn redis_gone_makes_the_replica_degraded_and_back_it_shares_again() {
    let mut redis = Redis::start();
    let apps = replicas(1, &redis, |_| {}).await;
    let app = &apps[0];
    eventually(
        || async {
            value(
                &app.metrics().await,
                "billing_gateway_redis_commands_total",
                "op=\"heartbeat\",result=\"ok\"",
            )
            .is_some()
        },
        PATIENCE,
    )
    .await;
    redis.kill();
    eventually(|| async { mode(app).await == "degraded" }, PATIENCE).await;
    // It keeps serving, and says it is ready.
    let ready = app
        .client
        .get(format!("{}/readyz", app.base))
        .send()
        .await
        .expect("readyz");
    assert_eq!(ready.status(), 200);
    redis.restart();
    let back = tokio::time::Instant::now();
    eventually(|| async { mode(app).await == "connected" }, PATIENCE).await;
    // Three probes a second apart, and a connection remade within a second.
    assert!(
        back.elapsed() < Duration::from_secs(5),
        "{:?}",
        back.elapsed()
    );
    let m = app.metrics().await;
    assert_eq!(
        value(
            &m,
            "billing_gateway_redis_mode_changes_total",
            "to=\"degraded\""
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &m,
            "billing_gateway_redis_mode_changes_total",
            "to=\"connected\""
        ),
        Some(1.0)
    );
    // Resuming pushed the shared budget 3 s ahead: slots taken alone pass out of every window.
    let tat = format!("billing-gateway:{{{ORG}}}:budget:tat");
    assert!(redis.command(&["GET", &tat]).is_some_and(|t| t != "$-1"));
    assert_eq!(
        redis.command(&["PTTL", &tat]).as_deref(),
        Some(":-1"),
        "no TTL"
    );
    for app in apps {
        app.stop().await;
    }
}
