//! The link to Redis as operators run it (contract §11): a slow Redis that still answers, one
//! that comes back, one behind TLS with a private CA. Real `redis-server`s on free ports, a
//! relay that delays replies, real apps over sockets against a wiremock upstream.

mod common;

use std::sync::Arc;
use std::time::Duration;

use ::redis::Script;
use billing_gateway::cluster::{self, Cluster, Mode, Op};
use billing_gateway::config::RedisConfig;
use billing_gateway::telemetry::Metrics;
use common::redis::{Redis, shared_key};
use common::redis_tls::TlsRedis;
use common::relay::Relay;
use common::*;
use secrecy::SecretString;
use serde_json::Value;
use wiremock::matchers::any;
use wiremock::{Mock, MockServer};

const TIMEOUT: Duration = Duration::from_millis(100);

fn port_of(url: &str) -> u16 {
    url.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("a port")
}

fn commands(metrics: &str, op: &str, result: &str) -> f64 {
    value(
        metrics,
        "billing_gateway_redis_commands_total",
        &format!("op=\"{op}\",result=\"{result}\""),
    )
    .unwrap_or(0.0)
}

fn changes(metrics: &str, to: &str) -> f64 {
    value(
        metrics,
        "billing_gateway_redis_mode_changes_total",
        &format!("to=\"{to}\""),
    )
    .unwrap_or(0.0)
}

/// `GATEWAY_REDIS_TIMEOUT` counts all of a request's commands together: through a Redis that
/// answers every command 250 ms late (timeout 400 ms: margins a loaded machine keeps), a
/// request's first command is answered,
/// its second waits only what is left and gives up, and the others are not even sent; outside
/// a request every command has the whole timeout. One late command is no failure: the mode
/// stays.
#[tokio::test]
async fn a_request_waits_on_a_slow_redis_one_timeout_in_all_whatever_its_commands() {
    let redis = Redis::start();
    let relay = Relay::start(port_of(&redis.url()));
    let metrics = Arc::new(Metrics::default());
    let config = RedisConfig {
        url: Some(SecretString::from(relay.url())),
        prefix: None,
        timeout: Duration::from_millis(400),
        fallback_replicas: 3,
        ca_file: None,
    };
    let link = Cluster::new(&config, ORG.parse().expect("uuid"), metrics.clone()).expect("link");
    let running = tokio::spawn(link.clone().run());
    let incr = Script::new("return redis.call('INCR', KEYS[1])");
    let key = link.key("counted");
    let mut script = incr.prepare_invoke();
    script.key(&key);
    // Connected, and the script known to Redis, before Redis turns slow.
    eventually(
        || async { link.invoke::<i64>(Op::Fill, &script).await.is_ok() },
        PATIENCE,
    )
    .await;
    let sent_before: i64 = redis
        .command(&["GET", &key])
        .and_then(|v| v.parse().ok())
        .expect("a count");

    relay.set(Duration::from_millis(250), 0, Duration::ZERO);
    for _ in 0..2 {
        assert!(link.invoke::<i64>(Op::Fill, &script).await.is_ok());
    }
    let answered = cluster::deadline::request(async {
        let mut answered = Vec::new();
        for _ in 0..4 {
            answered.push(link.invoke::<i64>(Op::Fill, &script).await.is_ok());
        }
        answered
    })
    .await;
    assert_eq!(answered, [true, false, false, false]);

    let m = metrics.render();
    assert_eq!(commands(&m, "fill", "deadline"), 1.0, "{m}");
    assert_eq!(commands(&m, "fill", "skipped"), 2.0, "{m}");
    assert_eq!(commands(&m, "fill", "timeout"), 0.0, "{m}");
    assert_eq!(changes(&m, "degraded"), 0.0, "{m}");
    assert_eq!(link.mode(), Mode::Connected);
    // What reached Redis: the two outside, and the request's first two (the one given up on
    // still ran); the skipped ones never left.
    let sent_after = || {
        redis
            .command(&["GET", &key])
            .and_then(|v| v.parse::<i64>().ok())
    };
    eventually(|| async { sent_after() == Some(sent_before + 4) }, PATIENCE).await;
    running.abort();
}

/// A gateway sharing through `relay` (`GATEWAY_REDIS_TIMEOUT` 400 ms: margins a loaded machine
/// keeps) in front of an upstream answering `product`, once its first heartbeat went through.
async fn sharing_through(relay: &Relay, product: &str) -> TestApp {
    let app = TestApp::builder()
        .redis(relay.url())
        .config(|c| c.redis.timeout = Duration::from_millis(400))
        .spawn()
        .await;
    Mock::given(any())
        .respond_with(consumptions(product))
        .mount(&app.upstream)
        .await;
    eventually(
        || async { commands(&app.metrics().await, "heartbeat", "ok") >= 1.0 },
        PATIENCE,
    )
    .await;
    app
}

/// One late reply does not switch the mode: through a Redis answering every command 250 ms late
/// and every third 500 ms late (past the 400 ms timeout), the replica keeps sharing and serves
/// every request; late replies in a row do switch it.
#[tokio::test]
async fn late_replies_now_and_then_never_switch_the_mode_late_replies_in_a_row_do() {
    let redis = Redis::start();
    let relay = Relay::start(port_of(&redis.url()));
    let app = sharing_through(&relay, "kept").await;
    let token = app.reader();
    let path = "/billing/v2beta1/consumptions?billing_period=2026-07";
    assert_eq!(app.get(path, &token).await.status(), 200);

    relay.set(Duration::from_millis(250), 3, Duration::from_millis(250));
    let late_before = commands(&app.metrics().await, "heartbeat", "timeout");
    // Cached reads and heartbeats through the slow Redis, until several replies came late.
    let mut served = 0;
    loop {
        let r = app.get(path, &token).await;
        assert_eq!(r.status(), 200, "{:?}", r.text().await);
        served += 1;
        let m = app.metrics().await;
        let late: f64 = ["heartbeat", "principal"]
            .iter()
            .map(|op| commands(&m, op, "timeout"))
            .sum();
        if late - late_before >= 3.0 {
            break;
        }
        assert!(served < 1000, "no late reply: {m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let m = app.metrics().await;
    assert_eq!(changes(&m, "degraded"), 0.0, "{m}");
    assert_eq!(
        app.upstream_requests().await.len(),
        1,
        "the reads were cached"
    );

    // Every reply late: failures in a row, and the replica goes on its own.
    relay.set(Duration::from_millis(500), 0, Duration::ZERO);
    eventually(
        || async { changes(&app.metrics().await, "degraded") == 1.0 },
        PATIENCE,
    )
    .await;
    app.stop().await;
}

/// Sharing resumes within 5 s of Redis answering again. Counted, not timed: from just before
/// Redis is started again until the replica is connected, every round of the background task
/// made one probe (answered or not within the timeout, and one or two more for the resumption
/// scripts), one [`cluster::PROBE`] apart, so rounds × (PROBE + timeout) bounds the time.
#[tokio::test]
async fn sharing_resumes_within_five_seconds_of_redis_answering_again() {
    let mut redis = Redis::start();
    let app = TestApp::builder().redis(redis.url()).spawn().await;
    eventually(
        || async { commands(&app.metrics().await, "heartbeat", "ok") >= 1.0 },
        PATIENCE,
    )
    .await;
    redis.kill();
    eventually(
        || async { changes(&app.metrics().await, "degraded") == 1.0 },
        PATIENCE,
    )
    .await;
    let probes = |m: &str| -> f64 {
        ["ok", "error", "timeout"]
            .iter()
            .map(|r| commands(m, "probe", r))
            .sum()
    };
    let before = probes(&app.metrics().await);
    redis.restart();
    eventually(
        || async { changes(&app.metrics().await, "connected") == 1.0 },
        PATIENCE,
    )
    .await;
    let rounds = probes(&app.metrics().await) - before;
    let bound = rounds * (cluster::PROBE + TIMEOUT).as_secs_f64();
    assert!(
        bound <= 5.0,
        "{rounds} probes: resumed up to {bound:.2} s after Redis"
    );
    app.stop().await;
}

/// `rediss://` to a Redis whose certificate a private CA signed: with the CA in
/// `GATEWAY_REDIS_CA_FILE`, two replicas share through it (one upstream call for a question
/// both are asked).
#[tokio::test]
async fn replicas_share_through_a_tls_redis_whose_ca_file_they_trust() {
    let redis = TlsRedis::start();
    let upstream = MockServer::start().await;
    Mock::given(any())
        .respond_with(consumptions("over tls"))
        .expect(1)
        .mount(&upstream)
        .await;
    let ca = redis.ca_file();
    let trusting = |c: &mut billing_gateway::Config| {
        c.redis.ca_file = Some(ca.clone());
        c.redis.fallback_replicas = 1;
    };
    let first = TestApp::builder()
        .redis(redis.url())
        .upstream(upstream)
        .config(trusting)
        .spawn()
        .await;
    let second = TestApp::builder()
        .redis(redis.url())
        .upstream_url(first.upstream.uri())
        .config(trusting)
        .spawn()
        .await;
    for app in [&first, &second] {
        eventually(
            || async {
                value(&app.metrics().await, "billing_gateway_cluster_replicas", "") == Some(2.0)
                    && commands(&app.metrics().await, "heartbeat", "ok") >= 1.0
            },
            PATIENCE,
        )
        .await;
    }
    let path = "/billing/v2beta1/consumptions?billing_period=2026-07";
    let asked = first.get(path, &first.reader()).await;
    assert_eq!(asked.status(), 200);
    let r = second.get(path, &second.reader()).await;
    assert_eq!(
        header(&r, "cache-status"),
        "billing-gateway; hit; detail=shared"
    );
    assert_eq!(
        r.json::<Value>().await.expect("json")["consumptions"][0]["product_name"],
        "over tls"
    );
    assert_eq!(first.upstream_requests().await.len(), 1);
    for app in [&first, &second] {
        let m = app.metrics().await;
        assert_eq!(changes(&m, "degraded"), 0.0, "{m}");
    }
    first.stop().await;
    second.stop().await;
}

/// A gateway [`sharing_through`] a relay that, after one warm call (its scripts were loaded into
/// Redis when the link was made), adds `delay` to every reply; then `asked` misses, each of a
/// new caller (whose rate Redis is asked for), each answered 200 or 429. Their statuses, and
/// what `/metrics` says after.
async fn misses_through_a_slow_redis(delay: Duration, asked: u32) -> (Vec<u16>, String) {
    let redis = Redis::start();
    let relay = Relay::start(port_of(&redis.url()));
    let app = sharing_through(&relay, "slow").await;
    let warm = app
        .get(
            "/billing/v2beta1/consumptions?billing_period=2026-01",
            &reader_as("warm"),
        )
        .await;
    assert_eq!(warm.status(), 200);

    relay.set(delay, 0, Duration::ZERO);
    let mut statuses = Vec::new();
    for n in 0..asked {
        let path = format!(
            "/billing/v2beta1/consumptions?billing_period=2026-0{}",
            n + 2
        );
        let r = app.get(&path, &reader_as(&format!("caller-{n}"))).await;
        statuses.push(r.status().as_u16());
    }
    assert!(
        statuses.iter().all(|s| [200, 429].contains(s)),
        "{statuses:?}"
    );
    assert!(app.upstream_requests().await.len() <= asked as usize + 1);
    let metrics = app.metrics().await;
    app.stop().await;
    (statuses, metrics)
}

/// Issue 21, item 5 (a miss adds at most one timeout, fewer round trips): through a Redis
/// answering every command 280 ms late (timeout 400 ms), each miss of a new caller asks Redis
/// for its rate, its cache lookup and its upstream turn in one round trip (the rate and the
/// lookup go out together; the turn comes with the lookup's fill lease): none is cut short,
/// none reserves a turn on its own, every one is answered, and the replica keeps sharing.
#[tokio::test]
async fn a_new_callers_miss_through_a_slow_redis_asks_its_rate_lookup_and_turn_at_once() {
    let asked = 5;
    let (statuses, m) = misses_through_a_slow_redis(Duration::from_millis(280), asked).await;
    assert_eq!(statuses, vec![200; asked as usize], "{m}");
    // The warm call and each slow miss: one rate, one lookup, answered.
    for op in ["principal", "fill"] {
        assert_eq!(commands(&m, op, "ok"), f64::from(asked) + 1.0, "{op}: {m}");
        for result in ["deadline", "skipped", "timeout"] {
            assert_eq!(commands(&m, op, result), 0.0, "{op} {result}: {m}");
        }
    }
    assert_eq!(commands(&m, "budget", "ok"), 0.0, "{m}");
    assert_eq!(changes(&m, "degraded"), 0.0, "{m}");
}

/// A Redis address that accepts connections and never answers (a hung proxy, packets dropped
/// after the handshake): no link can be made, and the replica goes on its own, saying so,
/// rather than "sharing" with nobody while every command is cut short.
#[tokio::test]
async fn a_redis_that_accepts_and_never_answers_makes_the_replica_degraded() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = silent.local_addr().expect("addr").port();
    let app = TestApp::builder()
        .redis(format!("redis://127.0.0.1:{port}"))
        .spawn()
        .await;
    eventually(
        || async { changes(&app.metrics().await, "degraded") == 1.0 },
        PATIENCE,
    )
    .await;
    assert!(
        app.metrics()
            .await
            .contains("billing_gateway_redis_mode{mode=\"degraded\"} 1")
    );
    app.stop().await;
    drop(silent);
}

/// Two replicas sharing through `relay` (timeout 400 ms), each with a warm `caller` (its rate
/// leased), before Redis turns slow.
async fn two_replicas_through(relay: &Relay, caller: &str) -> (TestApp, TestApp) {
    let first = sharing_through(relay, "fetched").await;
    let second = TestApp::builder()
        .redis(relay.url())
        .upstream_url(first.upstream.uri())
        .config(|c| c.redis.timeout = Duration::from_millis(400))
        .spawn()
        .await;
    for app in [&first, &second] {
        let warm = app
            .get(
                "/billing/v2beta1/consumptions?billing_period=2026-01",
                &reader_as(caller),
            )
            .await;
        assert_eq!(warm.status(), 200);
    }
    (first, second)
}

/// Issue 21, item 5 (a miss adds at most one timeout): through a Redis answering every command
/// 300 ms late (timeout 400 ms), a miss by a caller back after a pause (its lease lapsed) asks
/// Redis once before its upstream call: its rate comes from the request kept of its last lease,
/// its upstream turn with its cache lookup. Its store is answered 300 ms after it is sent, but
/// the request has 100 ms left, so it is answered before the store is; the store still lands,
/// and the other replica serves it.
#[tokio::test]
async fn a_miss_through_a_slow_redis_asks_it_once_and_does_not_wait_for_its_store() {
    let redis = Redis::start();
    let relay = Relay::start(port_of(&redis.url()));
    let (first, second) = two_replicas_through(&relay, "dashboard").await;
    // Past the lease's life (1 s): what the caller holds lapses, but for one request.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let before = first.metrics().await;
    let fetched = first.upstream_requests().await.len();

    relay.set(Duration::from_millis(300), 0, Duration::ZERO);
    let path = "/billing/v2beta1/consumptions?billing_period=2026-02";
    let r = first.get(path, &reader_as("dashboard")).await;
    let m = first.metrics().await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        header(&r, "cache-status"),
        "billing-gateway; fwd=miss; stored"
    );
    assert_eq!(first.upstream_requests().await.len(), fetched + 1);
    let more = |op: &str, result: &str| commands(&m, op, result) - commands(&before, op, result);
    // One lookup, answered, and no reservation of its own: the turn came with it.
    assert_eq!(more("fill", "ok"), 1.0, "{m}");
    assert_eq!(
        more("fill", "deadline") + more("fill", "skipped"),
        0.0,
        "{m}"
    );
    assert_eq!(
        more("budget", "ok") + more("budget", "deadline"),
        0.0,
        "{m}"
    );
    // Answered before its store was.
    assert_eq!(more("commit", "ok"), 0.0, "{m}");
    eventually(
        || async {
            let m = first.metrics().await;
            commands(&m, "commit", "ok") - commands(&before, "commit", "ok") == 1.0
        },
        PATIENCE,
    )
    .await;
    let r = second.get(path, &reader_as("dashboard")).await;
    assert_eq!(r.status(), 200);
    assert!(
        header(&r, "cache-status").contains("hit"),
        "{}",
        header(&r, "cache-status")
    );
    assert_eq!(first.upstream_requests().await.len(), fetched + 1);
    first.stop().await;
    second.stop().await;
}

/// A lookup cut short by its request's Redis time may still have taken the fill lease in Redis.
/// Through a Redis answering 300 ms late (timeout 400 ms), a miss whose first look finds an
/// entry planted without a valid MAC looks again, and that look is cut short. The request
/// still gets its upstream turn (reserved for the queue, with time of its own) and is
/// answered; and the lease it may hold is given up at once: once Redis is quick again, the
/// other replica's caller fills the key itself instead of waiting for the lease to lapse (5 s)
/// and taking over.
#[tokio::test]
async fn a_lookup_cut_short_still_gets_its_turn_and_gives_up_its_fill_lease() {
    let redis = Redis::start();
    let relay = Relay::start(port_of(&redis.url()));
    let (first, second) = two_replicas_through(&relay, "dashboard").await;
    let canonical = format!("consumptions?billing_period=2026-03&organization_id={ORG}");
    let far = "9999999999999";
    redis
        .command(&[
            "HSET",
            &shared_key("c", 0, &canonical),
            "a",
            "0",
            "f",
            far,
            "s",
            far,
            "x",
            "0",
            "b",
            "{}",
            "m",
            "forged",
        ])
        .expect("planted");
    let before = first.metrics().await;

    relay.set(Duration::from_millis(300), 0, Duration::ZERO);
    let path = "/billing/v2beta1/consumptions?billing_period=2026-03";
    let r = first.get(path, &reader_as("dashboard")).await;
    assert_eq!(r.status(), 200);
    let m = first.metrics().await;
    let more = |op: &str, result: &str| commands(&m, op, result) - commands(&before, op, result);
    assert_eq!(more("fill", "ok"), 1.0, "{m}");
    assert_eq!(more("fill", "deadline"), 1.0, "{m}");
    assert_eq!(more("budget", "ok"), 1.0, "{m}");

    relay.set(Duration::ZERO, 0, Duration::ZERO);
    let r = second.get(path, &reader_as("dashboard")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        header(&r, "cache-status"),
        "billing-gateway; fwd=miss; stored"
    );
    let waits = value(
        &second.metrics().await,
        "billing_gateway_cache_fill_wait_seconds_count",
        "",
    );
    assert_eq!(waits, Some(0.0));
    first.stop().await;
    second.stop().await;
}

/// A caller back after a pause (its lease lapsed) spends the request kept from that lease:
/// through a Redis answering 300 ms late, its cached read is answered before its next lease is
/// (fetched meanwhile, in the background), where with nothing kept it would wait for it.
#[tokio::test]
async fn a_caller_back_after_a_pause_is_answered_before_its_next_lease_comes() {
    let redis = Redis::start();
    let relay = Relay::start(port_of(&redis.url()));
    let app = sharing_through(&relay, "kept").await;
    let path = "/billing/v2beta1/consumptions?billing_period=2026-01";
    let warm = app.get(path, &reader_as("dashboard")).await;
    assert_eq!(warm.status(), 200);
    // Past the lease's life (1 s).
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let before = app.metrics().await;

    relay.set(Duration::from_millis(300), 0, Duration::ZERO);
    let r = app.get(path, &reader_as("dashboard")).await;
    let m = app.metrics().await;
    assert_eq!(header(&r, "cache-status"), "billing-gateway; hit");
    let leases = |m: &str| commands(m, "principal", "ok");
    assert_eq!(
        leases(&m),
        leases(&before),
        "answered before the lease came"
    );
    eventually(
        || async { leases(&app.metrics().await) == leases(&before) + 1.0 },
        PATIENCE,
    )
    .await;
    app.stop().await;
}
