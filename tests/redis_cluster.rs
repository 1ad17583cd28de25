//! Replicas sharing through a Redis Cluster (contract §11): three primaries and three replicas
//! made by the test, gateways each given a different node, a primary killed under load.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use billing_gateway::cluster::{Cluster, Event};
use billing_gateway::config::RedisConfig;
use billing_gateway::telemetry::Metrics;
use common::redis_cluster::RedisCluster;
use common::*;
use secrecy::SecretString;
use serde_json::Value;
use wiremock::matchers::any;
use wiremock::{Mock, Request, Respond, ResponseTemplate};

/// Records when each upstream request arrived, and answers it.
#[derive(Clone, Default)]
struct Arrivals(Arc<Mutex<Vec<Instant>>>);

impl Arrivals {
    fn times(&self) -> Vec<Instant> {
        self.0.lock().expect("lock").clone()
    }
}

impl Respond for Arrivals {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        self.0.lock().expect("lock").push(Instant::now());
        consumptions("from the cluster")
    }
}

async fn connected(app: &TestApp, replicas: f64) -> bool {
    let m = app.metrics().await;
    value(&m, "billing_gateway_redis_mode", "mode=\"connected\"") == Some(1.0)
        && value(&m, "billing_gateway_cluster_replicas", "") == Some(replicas)
}

async fn next(events: &mut tokio::sync::broadcast::Receiver<Event>) -> Event {
    tokio::time::timeout(PATIENCE, events.recv())
        .await
        .expect("an event in time")
        .expect("the channel is open")
}

/// Two gateways, one given a primary that does not serve their slot and one a replica: they
/// find the cluster, share one cache (one upstream call for a question both are asked at once)
/// and one budget, hear each other's broadcasts, and keep the budget while the primary serving
/// their slot is killed under load and its replica takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_given_different_nodes_share_a_cluster_and_keep_the_budget_through_a_failover() {
    let mut cluster = RedisCluster::start();
    let tag = format!("{{{ORG}}}");
    let owner = cluster
        .primary_of(0, &tag)
        .expect("a primary serves the slot");
    let elsewhere = (0..6)
        .find(|&i| i != owner && !cluster.is_replica(i))
        .expect("another primary");
    let replica = (0..6).find(|&i| cluster.is_replica(i)).expect("a replica");
    let arrivals = Arrivals::default();
    let rate = 10;
    let edit = |c: &mut billing_gateway::Config| {
        c.upstream.rate = per_second(rate);
        c.redis.fallback_replicas = 2;
        // The machine's two cores run six Redis nodes and two gateways under load.
        c.redis.timeout = Duration::from_millis(500);
    };
    let first = TestApp::builder()
        .redis(cluster.url(elsewhere))
        .config(edit)
        .spawn()
        .await;
    Mock::given(any())
        .respond_with(arrivals.clone())
        .mount(&first.upstream)
        .await;
    let second = TestApp::builder()
        .redis(format!("{},{}", cluster.url(replica), cluster.url(owner)))
        .upstream_url(first.upstream.uri())
        .config(edit)
        .spawn()
        .await;
    let apps = [first, second];
    for app in &apps {
        eventually(|| connected(app, 2.0), PATIENCE).await;
    }

    // One question, asked of both at once: one upstream call.
    let path = "/billing/v2beta1/consumptions?billing_period=2026-07";
    let token = apps[0].reader();
    let (a, b) = tokio::join!(apps[0].get(path, &token), apps[1].get(path, &token));
    for r in [a, b] {
        assert_eq!(r.status(), 200);
        let body: Value = r.json().await.expect("json");
        assert_eq!(body["consumptions"][0]["product_name"], "from the cluster");
    }
    assert_eq!(arrivals.times().len(), 1, "one upstream call for both");

    // Broadcasts reach a link given any node, before and after the failover below.
    let config = RedisConfig {
        url: Some(SecretString::from(cluster.url(elsewhere))),
        prefix: None,
        timeout: Duration::from_millis(500),
        fallback_replicas: 2,
        ca_file: None,
    };
    let listener = Cluster::new(
        &config,
        ORG.parse().expect("uuid"),
        Arc::new(Metrics::default()),
    )
    .expect("a link");
    let mut events = listener.events();
    let listening = tokio::spawn(listener.clone().run());
    assert_eq!(next(&mut events).await, Event::Subscribed);
    let channel = listener.key("events");
    cluster.cli(replica, &["PUBLISH", &channel, "before"]);
    assert_eq!(next(&mut events).await, Event::Message("before".into()));

    // Both driven at twice the budget each; the primary serving the slot killed meanwhile.
    arrivals.0.lock().expect("lock").clear();
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let drivers: Vec<_> = apps
        .iter()
        .map(|app| drive(app, app.reader(), Duration::from_millis(50), stop.clone()))
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster.kill(owner);
    let promoted = (|| {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(now) = cluster.primary_of(elsewhere, &tag).filter(|p| *p != owner) {
                return now;
            }
            assert!(
                Instant::now() < deadline,
                "no replica took over: {}\n{}",
                cluster.cli(elsewhere, &["CLUSTER", "NODES"]),
                cluster.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    })();
    // Both connected again by themselves (and the listener below counts as a third replica).
    for app in &apps {
        eventually(|| connected(app, 3.0), PATIENCE).await;
    }
    let back = Instant::now();
    // Past the 3 s the budget pauses for on resuming.
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::SeqCst);
    let mut served = 0;
    for driver in drivers {
        let statuses = driver.await.expect("driver");
        assert!(
            statuses.iter().all(|s| [200, 429].contains(s)),
            "no 5xx: {statuses:?}"
        );
        served += statuses.iter().filter(|s| **s == 200).count();
    }
    let times = arrivals.times();
    assert_eq!(times.len(), served, "every answer came from the upstream");
    // Within the budget all along, both gateways together (alone during the failover, each
    // paces its own share: the two may coincide).
    assert_paced(started, &times, per_second(rate), 2);
    // Shared again after the failover: calls went upstream through the promoted primary.
    assert!(
        times.iter().any(|t| *t > back),
        "no call after the failover"
    );
    assert_ne!(promoted, owner);

    // Subscribed again on the new primary by the client itself: a broadcast reaches it.
    let deadline = Instant::now() + PATIENCE;
    let mut seen = Vec::new();
    'heard: loop {
        assert!(
            Instant::now() < deadline,
            "no broadcast after the failover: {:?} {:?}",
            (0..6)
                .map(|i| cluster.cli(i, &["PUBSUB", "NUMSUB", &channel]))
                .collect::<Vec<_>>(),
            seen
        );
        cluster.cli(promoted, &["PUBLISH", &channel, "after"]);
        while let Ok(Ok(event)) =
            tokio::time::timeout(Duration::from_millis(500), events.recv()).await
        {
            if event == Event::Message("after".into()) {
                break 'heard;
            }
            seen.push(event);
        }
    }
    listening.abort();
    for app in apps {
        app.stop().await;
    }
}
