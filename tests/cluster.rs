//! Replicas sharing through Redis (contract §11): real `redis-server`s started by the tests, real
//! gateway apps over sockets, one wiremock upstream behind all the replicas of a test.

mod common;

use std::sync::Arc;
use std::time::Duration;

use billing_gateway::cluster::{Cluster, Event, Mode, Unavailable};
use billing_gateway::config::RedisConfig;
use billing_gateway::telemetry::Metrics;
use common::redis::Redis;
use common::*;
use secrecy::SecretString;
use tokio::sync::broadcast;

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
    link_counted(redis, Arc::new(Metrics::default()))
}

/// [`link`], its Redis commands counted in `metrics`.
fn link_counted(redis: &Redis, metrics: Arc<Metrics>) -> Arc<Cluster> {
    let config = RedisConfig {
        url: Some(SecretString::from(redis.url())),
        prefix: Some("test:{events}".to_owned()),
        timeout: Duration::from_millis(500),
        fallback_replicas: 3,
        ca_file: None,
    };
    Cluster::new(&config, ORG.parse().expect("uuid"), metrics).expect("a link")
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
    // The organization follows the prefix, which does not name it (contract §11).
    assert_eq!(channel, format!("test:{{events}}:{{{ORG}}}:events"));
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
    // Connected again by itself (PATIENCE only guards against a hang: how soon is the bench's
    // figure, not a test's).
    eventually(|| async { mode(app).await == "connected" }, PATIENCE).await;
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
    // Resuming paused the shared budget for 3 s: slots taken alone pass out of every window.
    let paused = format!("billing-gateway:{{{ORG}}}:budget:paused_until");
    let ttl: i64 = redis
        .command(&["PTTL", &paused])
        .and_then(|t| t.trim_start_matches(':').parse().ok())
        .expect("a TTL");
    assert!((1..=3000).contains(&ttl), "{ttl}");
    assert_eq!(
        app.get("/billing/v2beta1/charges", &app.reader())
            .await
            .status(),
        429,
        "no upstream call during the pause"
    );
    assert!(app.upstream_requests().await.is_empty());
    for app in apps {
        app.stop().await;
    }
}

// ---- The shared upstream budget (contract §10, §11) ----

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use billing_gateway::config::Rate;
use std::time::Instant;
use wiremock::matchers::any;
use wiremock::{Mock, Request, Respond, ResponseTemplate};

/// The tests that load the machine run one at a time: each measures time.
static LOAD: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Records when each upstream request arrived (wiremock's `Request` carries no timestamp).
#[derive(Clone, Default)]
struct Arrivals(Arc<Mutex<Vec<Instant>>>);

impl Arrivals {
    fn times(&self) -> Vec<Instant> {
        let mut times = self.0.lock().expect("lock").clone();
        times.sort();
        times
    }
}

impl Respond for Arrivals {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        self.0.lock().expect("lock").push(Instant::now());
        ResponseTemplate::new(200).set_body_raw(r#"{"charges":[]}"#, "application/json")
    }
}

/// What one replica's driver saw.
#[derive(Debug, Default)]
struct Seen {
    ok: usize,
    refused: usize,
    /// Any other status: never expected.
    other: Vec<u16>,
}

/// What the driver of one replica saw: its statuses, tallied.
fn tally(statuses: Vec<u16>) -> Seen {
    let mut seen = Seen::default();
    for status in statuses {
        match status {
            200 => seen.ok += 1,
            429 => seen.refused += 1,
            other => seen.other.push(other),
        }
    }
    seen
}

/// Drives each of `apps` as [`drive`] does, all as `token`, until `stop`.
fn drive_each(
    apps: &[TestApp],
    token: String,
    every: Duration,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Seen>> {
    apps.iter()
        .map(|app| {
            let statuses = drive(app, token.clone(), every, stop.clone());
            tokio::spawn(async move { tally(statuses.await.expect("driver")) })
        })
        .collect()
}

/// Three replicas at 10 calls/s in all; the upstream's arrivals are recorded.
async fn budgeted(redis: &Redis, rate: u32) -> (Vec<TestApp>, Arrivals) {
    let apps = replicas(3, redis, move |c| {
        c.upstream.rate = per_second(rate);
        // Above the 100 ms default: the test machine's two cores are loaded by the test itself.
        c.redis.timeout = Duration::from_millis(500);
    })
    .await;
    let arrivals = Arrivals::default();
    Mock::given(any())
        .respond_with(arrivals.clone())
        .mount(&apps[0].upstream)
        .await;
    // Each replica's connection to the upstream is opened before the measure: the first call
    // on a new connection arrives late by its handshake (and by the test's own start-up on
    // these two cores), crowding the call after it, as it would on one replica.
    for app in &apps {
        let response = app
            .get("/billing/v2beta1/charges?page_token=warm", &app.reader())
            .await;
        assert_eq!(response.status(), 200);
    }
    // Each warm-up call was answered, so arrived: none is counted with the test's.
    arrivals.0.lock().expect("lock").clear();
    (apps, arrivals)
}

/// Issue 12, test 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_each_driven_at_three_times_the_budget_keep_within_it() {
    let _one = LOAD.lock().await;
    let redis = Redis::start();
    let (apps, arrivals) = budgeted(&redis, 10).await;
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    // 30 calls a second to each replica: 90 against a budget of 10.
    let drivers = drive_each(&apps, reader_as("busy"), Duration::from_millis(33), &stop);
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::SeqCst);
    let mut served = 0;
    for (i, driver) in drivers.into_iter().enumerate() {
        let seen = driver.await.expect("driver");
        assert!(seen.other.is_empty(), "replica {i}: {seen:?}");
        assert!(seen.ok >= 1 && seen.refused >= 1, "replica {i}: {seen:?}");
        served += seen.ok;
    }
    let times = arrivals.times();
    assert_eq!(times.len(), served, "every call served went upstream once");
    assert_paced(started, &times, per_second(10), 0);
    // The budget is spent, not wasted: about 10 a second over the 4 s.
    assert!(times.len() >= 30, "only {} calls in 4 s", times.len());
    for app in &apps {
        assert_eq!(mode(app).await, "connected");
    }
    for app in apps {
        app.stop().await;
    }
}

/// Issue 12, test 4.
#[tokio::test]
async fn an_upstream_429_seen_by_one_replica_stops_all_three_for_its_retry_after() {
    let redis = Redis::start();
    let apps = replicas(3, &redis, |c| c.redis.timeout = Duration::from_millis(500)).await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(429).insert_header("retry-after", "2"))
        .up_to_n_times(1)
        .mount(&apps[0].upstream)
        .await;
    Mock::given(any())
        .respond_with(
            ResponseTemplate::new(200).set_body_raw(r#"{"charges":[]}"#, "application/json"),
        )
        .mount(&apps[0].upstream)
        .await;
    let token = apps[0].reader();
    let charges = "/billing/v2beta1/charges";
    // Before the 429 is even asked for: the backoff it starts ends at least 2 s after this.
    let limited = Instant::now();
    let first = apps[0].get(charges, &token).await;
    assert_error(first, 429, "too_many_requests").await;
    for app in &apps[1..] {
        // Refused for the backoff (counted under that reason below), not by any wait of its own.
        let response = app.get(charges, &token).await;
        assert_eq!(response.headers()["retry-after"], "2");
        assert_error(response, 429, "too_many_requests").await;
        let m = app.metrics().await;
        assert_eq!(
            value(
                &m,
                "billing_gateway_rejections_total",
                "reason=\"upstream_backoff\""
            ),
            Some(1.0),
            "{m}"
        );
    }
    // Learnt once: while backing off, a replica asks Redis no more.
    let budget_calls = |m: String| {
        value(
            &m,
            "billing_gateway_redis_commands_total",
            "op=\"budget\",result=\"ok\"",
        )
    };
    let before = budget_calls(apps[1].metrics().await);
    assert_eq!(apps[1].get(charges, &token).await.status(), 429);
    assert_eq!(budget_calls(apps[1].metrics().await), before);
    assert_eq!(
        apps[0].upstream_requests().await.len(),
        1,
        "only the first call went upstream"
    );
    // After the Retry-After, every replica calls again.
    for app in &apps {
        eventually(
            || async { app.get(charges, &token).await.status() == 200 },
            PATIENCE,
        )
        .await;
    }
    // Not before the Retry-After ran out.
    assert!(limited.elapsed() >= Duration::from_secs(2));
    for app in apps {
        app.stop().await;
    }
}

/// Issue 12, test 6 (the budget's part).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_under_load_then_restarted_keeps_the_budget_and_fails_no_call() {
    let _one = LOAD.lock().await;
    let mut redis = Redis::start();
    let (apps, arrivals) = budgeted(&redis, 20).await;
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    // 12 calls a second in all, under the budget of 20 (and over each replica's 6 alone).
    let drivers = drive_each(
        &apps,
        reader_as("steady"),
        Duration::from_millis(250),
        &stop,
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    redis.kill();
    for app in &apps {
        eventually(|| async { mode(app).await == "degraded" }, PATIENCE).await;
    }
    // Degraded long enough to spend alone after the dead time.
    tokio::time::sleep(Duration::from_secs(4)).await;
    redis.restart();
    let back = Instant::now();
    // All connected again by themselves (PATIENCE only guards against a hang: how soon is the
    // bench's figure, not a test's).
    for app in &apps {
        eventually(|| async { mode(app).await == "connected" }, PATIENCE).await;
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::SeqCst);
    let mut served = 0;
    for (i, driver) in drivers.into_iter().enumerate() {
        let seen = driver.await.expect("driver");
        assert!(seen.other.is_empty(), "replica {i}: no 5xx: {seen:?}");
        served += seen.ok;
    }
    let times = arrivals.times();
    assert_eq!(times.len(), served);
    // Alone, each replica paces its own share: the three may coincide.
    assert_paced(started, &times, per_second(20), 2);
    let m = apps[0].metrics().await;
    assert_eq!(
        value(&m, "billing_gateway_upstream_budget_degraded_rate", ""),
        Some(0.0)
    );
    // Shared again: calls are served through Redis.
    assert!(
        times
            .iter()
            .any(|t| t.duration_since(back) > Duration::from_secs(3))
    );
    for app in apps {
        app.stop().await;
    }
}

/// Contract §10 across replicas: beside a principal flooding both replicas, another's calls all
/// take their turns and go upstream, and only the flooder is refused. (How long a turn takes,
/// its rotation plus the slots already booked, is shown in paused time by `upstream::budget`'s
/// tests and measured by the bench; here it would measure the machine's load.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fair_share_holds_across_two_replicas_beside_a_flooding_principal() {
    let _one = LOAD.lock().await;
    let redis = Redis::start();
    let apps = replicas(2, &redis, |c| {
        c.upstream.rate = per_second(10);
        c.redis.timeout = Duration::from_millis(500);
    })
    .await;
    let arrivals = Arrivals::default();
    Mock::given(any())
        .respond_with(arrivals.clone())
        .mount(&apps[0].upstream)
        .await;
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let floods = drive_each(
        &apps,
        reader_as("flooder"),
        Duration::from_millis(20),
        &stop,
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Of another class than the flooder's, so that the gateway counts its waits apart.
    let innocent = token_for("innocent", "billing-manager");
    for n in 0..12 {
        let app = &apps[n % 2];
        let response = app
            .get(
                &format!("/billing/v2beta1/charges?page_token=innocent-{n}"),
                &innocent,
            )
            .await;
        assert_eq!(response.status(), 200, "call {n}");
    }
    stop.store(true, Ordering::SeqCst);
    for flood in floods {
        let seen = flood.await.expect("flood");
        assert!(seen.refused > seen.ok, "the flooder is refused: {seen:?}");
    }
    // Behind the flooder's full backlog (two seconds' worth) the innocent's calls would have
    // been refused: each took a turn of its own and went upstream, none refused, as the
    // gateways counted them under the innocent's class.
    let (mut sent, mut refused) = (0.0, 0.0);
    for app in &apps {
        let m = app.metrics().await;
        sent += value(
            &m,
            "billing_gateway_upstream_calls_by_class_total",
            r#"class="billing-manager""#,
        )
        .unwrap_or(0.0);
        refused += value(
            &m,
            "billing_gateway_refusals_by_class_total",
            r#"reason="upstream_budget",class="billing-manager""#,
        )
        .unwrap_or(0.0);
    }
    assert_eq!((sent, refused), (12.0, 0.0));
    assert_paced(started, &arrivals.times(), per_second(10), 0);
    for app in apps {
        app.stop().await;
    }
}

/// Records the `page_token` of each upstream request, and answers after a small delay (a real
/// upstream takes time, so calls overlap their turns).
#[derive(Clone, Default)]
struct Queries(Arc<Mutex<Vec<String>>>);

impl Queries {
    fn with(&self, marker: &str) -> Vec<String> {
        let seen = self.0.lock().expect("lock");
        seen.iter()
            .filter(|q| q.contains(marker))
            .cloned()
            .collect()
    }
}

impl Respond for Queries {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let token = request
            .url
            .query_pairs()
            .find(|(name, _)| name == "page_token")
            .map(|(_, value)| value.into_owned())
            .unwrap_or_default();
        self.0.lock().expect("lock").push(token);
        ResponseTemplate::new(200)
            .set_body_raw(r#"{"charges":[]}"#, "application/json")
            .set_delay(Duration::from_millis(20))
    }
}

/// Issue 21, item 4: a `share = 100` key flooding all three replicas with cache misses, beside
/// a bystander reading now and then through each of them. Each replica gets a third of the
/// budget's turns, so a round counted in the whole budget's turns (ten at 10/s) lasted three
/// times as long there and outlasted the bystander's 2 s wait; counted in the replica's own,
/// every bystander read takes its turn and goes upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_share_of_100_flooding_three_replicas_leaves_a_bystander_its_turns() {
    let _one = LOAD.lock().await;
    let redis = Redis::start();
    const KEY: &str = "3e0a5b4f-2d77-4c9e-9f60-8b9c0d1e2f3a";
    let keys = format!(
        "[[keys]]\nname = \"flood\"\nsha256 = \"{}\"\nroles = [\"billing-read-only\"]\nshare = 100\n",
        billing_gateway::policy::key_sha256(&KEY.parse().expect("uuid"))
    );
    let policy = [
        ("default.toml", DEFAULT_POLICY),
        ("keys.toml", keys.as_str()),
    ];
    let edit = |c: &mut billing_gateway::Config| {
        c.upstream.rate = per_second(10);
        c.redis.timeout = Duration::from_millis(500);
    };
    let mut apps = vec![
        TestApp::builder()
            .policy(&policy)
            .redis(redis.url())
            .config(edit)
            .spawn()
            .await,
    ];
    let upstream = apps[0].upstream.uri();
    for _ in 1..3 {
        apps.push(
            TestApp::builder()
                .policy(&policy)
                .redis(redis.url())
                .upstream_url(upstream.clone())
                .config(edit)
                .spawn()
                .await,
        );
    }
    let queries = Queries::default();
    Mock::given(any())
        .respond_with(queries.clone())
        .mount(&apps[0].upstream)
        .await;
    let stop = Arc::new(AtomicBool::new(false));
    // 50 misses a second into each replica, against 10 a second for all three together.
    let floods = drive_each(&apps, KEY.to_owned(), Duration::from_millis(20), &stop);
    // The flooder's backlogs fill (past them its calls are refused).
    eventually(
        || async {
            let mut refused = 0.0;
            for app in &apps {
                refused += value(
                    &app.metrics().await,
                    "billing_gateway_refusals_by_class_total",
                    r#"reason="upstream_budget",class="flood""#,
                )
                .unwrap_or(0.0);
            }
            refused >= 3.0
        },
        PATIENCE,
    )
    .await;
    let bystander = reader_as("bystander");
    let mut statuses = Vec::new();
    for n in 0..6 {
        let response = apps[n % 3]
            .get(
                &format!("/billing/v2beta1/charges?page_token=bystander-{n}"),
                &bystander,
            )
            .await;
        statuses.push(response.status().as_u16());
    }
    stop.store(true, Ordering::SeqCst);
    for flood in floods {
        let seen = flood.await.expect("flood");
        assert!(seen.other.is_empty(), "{seen:?}");
        assert!(seen.ok >= 1 && seen.refused >= 1, "{seen:?}");
    }
    assert_eq!(statuses, [200; 6]);
    let mut sent = queries.with("bystander");
    sent.sort();
    let expected: Vec<String> = (0..6).map(|n| format!("bystander-{n}")).collect();
    assert_eq!(sent, expected, "each bystander read went upstream once");
    for app in apps {
        app.stop().await;
    }
}

/// Issue 12, test 8 (the budget's scripts): slots exactly one pace apart in Redis time whoever
/// reserves them, none beyond the longest wait, and a 429 noted by one replica held by another
/// (doubling from 1 s without Retry-After).
#[tokio::test]
async fn the_budget_scripts_pace_refuse_and_back_off_in_redis_time() {
    use billing_gateway::upstream::{Backoff, SharedTurns};
    let redis = Redis::start();
    let pace = Duration::from_millis(105);
    let slots = |max_wait: Duration| {
        let backoff = Arc::new(Backoff::default());
        let cluster = link(&redis);
        let slots = SharedTurns::new(cluster, backoff.clone(), per_second(10), pace, max_wait);
        (slots, backoff)
    };
    let (a, _) = slots(Duration::from_secs(2));
    let (b, b_backoff) = slots(Duration::from_secs(2));
    let tat = || -> u64 {
        redis
            .command(&["GET", &format!("test:{{events}}:{{{ORG}}}:budget:tat")])
            .and_then(|t| t.parse().ok())
            .expect("a tat")
    };
    // Taken before the first turn is asked for, so no later than it: load only delays the
    // turns after it, never brings them closer.
    let started = Instant::now();
    a.next_turn().await.expect("the first turn is free");
    let first = tat();
    for s in [&b, &a, &b] {
        s.next_turn().await.expect("a slot");
    }
    assert_eq!(tat() - first, 3 * 105_000, "three paces, in µs");
    // The last of the four was taken three paces after the first (less the clocks' granularity).
    assert!(started.elapsed() >= 3 * pace - Duration::from_millis(5));

    // A replica that will not wait is refused, and told for how long.
    let (impatient, _) = slots(Duration::ZERO);
    let left = impatient
        .next_turn()
        .await
        .expect_err("no slot within no wait");
    assert!(left <= pace, "{left:?}");

    // A 429 noted on one replica is held by the next that asks for a slot.
    assert_eq!(a.note_backoff(None).await, Some(Duration::from_secs(1)));
    let second = a.note_backoff(None).await.expect("noted");
    assert!(
        second > Duration::from_millis(1990) && second <= Duration::from_secs(2),
        "{second:?}"
    );
    b.next_turn().await.expect("handed on to be refused");
    assert!(b_backoff.remaining() > Duration::from_millis(1900));
    let until: u64 = redis
        .command(&[
            "GET",
            &format!("test:{{events}}:{{{ORG}}}:budget:backoff_until"),
        ])
        .and_then(|t| t.parse().ok())
        .expect("until");
    assert!(tat() >= until, "slots resume after the backoff, paced");
    a.reset_backoff().await;
    assert_eq!(
        redis
            .command(&[
                "EXISTS",
                &format!("test:{{events}}:{{{ORG}}}:budget:backoff_next")
            ])
            .as_deref(),
        Some(":0")
    );
}

// ---- Principal rates across replicas (contract §11) ----

/// How many of `n` concurrent whoami calls as `token`, spread over `apps`, were allowed; the
/// rest must be 429s.
async fn whoami_burst(apps: &[TestApp], token: &str, n: usize) -> usize {
    let answers = futures_util::future::join_all(
        (0..n).map(|i| apps[i % apps.len()].get("/gateway/v1/whoami", token)),
    )
    .await;
    let mut allowed = 0;
    for response in answers {
        match response.status().as_u16() {
            200 => allowed += 1,
            429 => {
                assert_error(response, 429, "too_many_requests").await;
            }
            other => panic!("unexpected status {other}"),
        };
    }
    allowed
}

/// Issue 12, test 3.
#[tokio::test]
async fn a_principals_rate_holds_across_three_replicas() {
    let redis = Redis::start();
    // 5 a minute, burst 10: nothing refills during the test, and a refusal lasts seconds.
    let apps = replicas(3, &redis, |c| {
        c.limits.principal_rate = Rate {
            count: 5,
            per: Duration::from_secs(60),
        };
        c.redis.timeout = Duration::from_millis(500);
    })
    .await;
    let greedy = reader_as("greedy");
    let allowed = whoami_burst(&apps, &greedy, 30).await;
    // A burst of 10 in all, not 10 on each of the three.
    assert_eq!(allowed, 10);
    // Others are untouched.
    let allowed = whoami_burst(&apps, &reader_as("patient"), 3).await;
    assert_eq!(allowed, 3);
    // A refused caller is refused again on that replica without a Redis call.
    let principal_calls = |m: String| {
        value(
            &m,
            "billing_gateway_redis_commands_total",
            "op=\"principal\",result=\"ok\"",
        )
    };
    let before = principal_calls(apps[1].metrics().await);
    assert_eq!(
        apps[1].get("/gateway/v1/whoami", &greedy).await.status(),
        429
    );
    assert_eq!(principal_calls(apps[1].metrics().await), before);
    // No user's name in Redis: the subject is hashed into the key.
    assert_eq!(
        redis.command(&["KEYS", "*greedy*"]).as_deref(),
        Some("*0"),
        "a key names the subject"
    );
    for app in apps {
        app.stop().await;
    }
}

#[tokio::test]
async fn redis_gone_each_replica_holds_principals_to_its_share_of_their_rate() {
    let mut redis = Redis::start();
    // N = 3 (the fallback): 15 a minute becomes 5, burst 10, on each replica; nothing refills
    // during the test, so the count is exact.
    let apps = replicas(1, &redis, |c| {
        c.limits.principal_rate = Rate {
            count: 15,
            per: Duration::from_secs(60),
        }
    })
    .await;
    redis.kill();
    // The first check finds Redis gone, the replica goes on its own.
    let _ = apps[0].get("/gateway/v1/whoami", &reader_as("first")).await;
    eventually(|| async { mode(&apps[0]).await == "degraded" }, PATIENCE).await;
    let allowed = whoami_burst(&apps, &reader_as("greedy"), 20).await;
    assert_eq!(
        allowed, 10,
        "the replica's share of the burst, not the whole 30"
    );
    for app in apps {
        app.stop().await;
    }
}

/// Issue 12, test 8 (the principal's script): the same decisions and the same wait as governor
/// at the same quota.
#[tokio::test]
async fn the_principal_script_decides_as_governor_does() {
    use billing_gateway::limits::SharedRates;
    use governor::{Quota, RateLimiter};
    use std::num::NonZeroU32;
    let redis = Redis::start();
    let rates = SharedRates::new(link(&redis));
    let rate = per_second(5);
    let quota = Quota::with_period(rate.pace())
        .expect("a pace")
        .allow_burst(NonZeroU32::new(10).expect("10"));
    let governor = RateLimiter::direct(quota);
    let clock = governor::clock::DefaultClock::default();
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for _ in 0..15 {
        ours.push(rates.check("alice", rate).await.expect("Redis answers"));
        theirs.push(
            governor
                .check()
                .map_err(|not_until| not_until.wait_time_from(governor::clock::Clock::now(&clock))),
        );
    }
    let allowed = |d: &[Result<(), Duration>]| d.iter().filter(|d| d.is_ok()).count();
    assert_eq!(allowed(&ours), 10, "{ours:?}");
    assert_eq!(allowed(&theirs), 10, "{theirs:?}");
    // The first refusal: both about one pace (200 ms) less the time the 10 took.
    let (Err(ours), Err(theirs)) = (ours[10], theirs[10]) else {
        panic!("the 11th is refused by both")
    };
    let gap = ours.abs_diff(theirs);
    assert!(
        gap < Duration::from_millis(20),
        "{ours:?} against {theirs:?}"
    );
    assert!(ours <= Duration::from_millis(200), "{ours:?}");
    // Remembered: refused again without Redis, until the wait is over.
    redis.command(&["FLUSHALL"]);
    assert!(rates.check("alice", rate).await.expect("answer").is_err());
    assert!(rates.check("bob", rate).await.expect("answer").is_ok());
}

/// Issue 12, leasing: the script grants k at once, fewer when fewer conform, none when none do,
/// as governor's `check_n` decides at the same quota, and refuses for as long.
#[tokio::test]
async fn the_principal_script_leases_as_governors_check_n_decides() {
    use billing_gateway::limits::SharedRates;
    use governor::{Quota, RateLimiter};
    use std::num::NonZeroU32;
    let redis = Redis::start();
    let rates = SharedRates::new(link(&redis));
    // Burst 10, a pace of 200 ms: nothing refills between the calls below.
    let rate = per_second(5);
    let n = |n| NonZeroU32::new(n).expect("not zero");
    let governor = RateLimiter::direct(
        Quota::with_period(rate.pace())
            .expect("a pace")
            .allow_burst(n(10)),
    );
    for _ in 0..2 {
        assert_eq!(rates.lease("alice", rate, 4).await, Ok(Ok(4)));
        assert_eq!(governor.check_n(n(4)), Ok(Ok(())));
    }
    // Two left: a partial grant, where governor refuses three and allows two.
    assert_eq!(rates.lease("alice", rate, 4).await, Ok(Ok(2)));
    assert!(governor.check_n(n(3)).expect("within the burst").is_err());
    assert_eq!(governor.check_n(n(2)), Ok(Ok(())));
    // None left: refused, for as long as governor would.
    let Ok(Err(ours)) = rates.lease("alice", rate, 4).await else {
        panic!("refused when nothing conforms")
    };
    let clock = governor::clock::DefaultClock::default();
    let theirs = governor
        .check()
        .expect_err("refused")
        .wait_time_from(governor::clock::Clock::now(&clock));
    assert!(
        ours.abs_diff(theirs) < Duration::from_millis(20),
        "{ours:?} against {theirs:?}"
    );
    assert!(ours <= Duration::from_millis(200), "{ours:?}");
    // Another principal is untouched.
    assert_eq!(rates.lease("bob", rate, 4).await, Ok(Ok(4)));
}

/// Issue 21, item 11: a lease half spent is topped up in the background, so while what is held
/// has room, a request never waits on Redis: with Redis frozen, every request the top-up brought
/// is allowed at once, and only the one past them waits (and Redis unavailable, it decides
/// alone).
#[tokio::test]
async fn a_half_spent_lease_is_topped_up_ahead_so_requests_do_not_wait_on_redis() {
    use billing_gateway::limits::{SharedRates, lease_size};
    let redis = Redis::start();
    let metrics = Arc::new(Metrics::default());
    let rates = SharedRates::new(link_counted(&redis, metrics.clone()));
    // Burst 200 and N the fallback, 3: leases of 16, a pace of 10 ms (nothing lapses).
    let rate = per_second(100);
    let k = lease_size(rate, 3);
    assert_eq!(k, 16);
    let leases = || {
        value(
            &metrics.render(),
            "billing_gateway_redis_commands_total",
            "op=\"principal\",result=\"ok\"",
        )
        .unwrap_or(0.0)
    };
    // The first request waits for a lease of 16; by the 8th, half is spent: a top-up of the
    // spent 8 goes out while the other 8 are spent.
    for _ in 0..k / 2 {
        assert_eq!(rates.check("alice", rate).await, Ok(Ok(())));
    }
    eventually(|| async { leases() == 2.0 }, PATIENCE).await;
    // Held now: the 8 left and the 8 of the top-up. Redis stalls: all 16 are allowed without
    // it (the top-up they start in turn gets no answer).
    redis.pause();
    for n in 0..k {
        assert_eq!(rates.check("alice", rate).await, Ok(Ok(())), "request {n}");
    }
    // The next finds nothing held, waits for that top-up, which never comes.
    assert_eq!(rates.check("alice", rate).await, Err(Unavailable));
    redis.resume();
}

/// Issue 12, leasing: a principal's hits on one replica, all at once, cost one Redis call per
/// half lease (a lease of k, then top-ups of the k/2 spent; one call in flight at a time), not
/// one each.
#[tokio::test]
async fn leasing_cuts_a_principals_redis_calls_to_one_per_half_lease_of_hits() {
    use billing_gateway::limits::lease_size;
    let redis = Redis::start();
    let rate = per_second(100);
    let apps = replicas(1, &redis, |c| c.limits.principal_rate = rate).await;
    // N is the fallback, 3: a quarter of each replica's share of the burst, 200 / (4 × 3).
    let k = lease_size(rate, 3) as usize;
    assert_eq!(k, 16);
    let calls = |m: String| {
        value(
            &m,
            "billing_gateway_redis_commands_total",
            "op=\"principal\",result=\"ok\"",
        )
        .unwrap_or(0.0) as usize
    };
    let before = calls(apps[0].metrics().await);
    let hits = 40;
    let allowed = whoami_burst(&apps, &reader_as("busy"), hits).await;
    assert_eq!(allowed, hits, "within the burst");
    let made = calls(apps[0].metrics().await) - before;
    assert!(
        (1..=hits.div_ceil(k / 2) + 1).contains(&made),
        "{made} principal calls for {hits} hits"
    );
    // whoami is the gateway's own answer: nothing went upstream.
    let upstream = apps[0].upstream.received_requests().await;
    assert_eq!(upstream.map(|r| r.len()), Some(0));
    for app in apps {
        app.stop().await;
    }
}

/// `count` a minute, burst twice that: nothing refills during a test.
fn per_minute(count: u32) -> Rate {
    Rate {
        count,
        per: Duration::from_secs(60),
    }
}

/// A caller's rate decided with its cache lookup (the lease asked for goes out with it) still
/// refuses before anything is served or fetched. At 1 a minute (burst 2, leased one request at
/// a time), the third request at once is refused `429` though its answer is cached here; on
/// another replica, which holds nothing of the caller, a miss is refused too, asks nothing
/// upstream, and gives up the fill lease its lookup took: the next caller fills the key at once.
#[tokio::test]
async fn a_rate_decided_with_the_lookup_refuses_before_serving_or_fetching() {
    let redis = Redis::start();
    let apps = replicas(2, &redis, |c| c.limits.principal_rate = per_minute(1)).await;
    Mock::given(any())
        .respond_with(consumptions("limited"))
        .mount(&apps[0].upstream)
        .await;
    let token = reader_as("limited");
    let cached = "/billing/v2beta1/consumptions?billing_period=2026-01";
    let first = apps[0].get(cached, &token).await;
    assert_eq!(first.status(), 200);
    let again = apps[0].get(cached, &token).await;
    assert_eq!(header(&again, "cache-status"), "billing-gateway; hit");
    let refused = apps[0].get(cached, &token).await;
    assert_error(refused, 429, "too_many_requests").await;
    assert_eq!(apps[0].upstream_requests().await.len(), 1);

    let missed = "/billing/v2beta1/consumptions?billing_period=2026-02";
    let refused = apps[1].get(missed, &token).await;
    assert_error(refused, 429, "too_many_requests").await;
    assert_eq!(
        apps[0].upstream_requests().await.len(),
        1,
        "nothing fetched"
    );
    // Both refused for the caller's own rate.
    for app in &apps {
        let refusals = value(
            &app.metrics().await,
            "billing_gateway_refusals_by_class_total",
            "reason=\"principal_rate\"",
        );
        assert_eq!(refusals, Some(1.0));
    }
    let other = apps[0].get(missed, &reader_as("other")).await;
    assert_eq!(other.status(), 200);
    assert_eq!(
        header(&other, "cache-status"),
        "billing-gateway; fwd=miss; stored"
    );
    for app in apps {
        app.stop().await;
    }
}

/// A refused caller that found an entry in the last tenth of its freshness gives its background
/// refresh back: the next caller takes it, rather than the entry expiring unrefreshed. At 1 a
/// minute (burst 2), the caller's third request, its lease asked of Redis with the lookup, hits
/// the entry near its end and is refused; another caller's hit then refreshes it.
#[tokio::test]
async fn a_refused_callers_refresh_goes_to_the_next_caller() {
    const TTL: Duration = Duration::from_secs(4);
    let redis = Redis::start();
    let apps = replicas(1, &redis, |c| {
        c.limits.principal_rate = per_minute(1);
        c.cache.ttl = TTL;
    })
    .await;
    let app = &apps[0];
    Mock::given(any())
        .respond_with(consumptions("refreshed"))
        .mount(&app.upstream)
        .await;
    // The current month's: a closed month's answer is kept longer than `TTL`.
    let path = "/billing/v2beta1/consumptions?page_size=20";
    let limited = reader_as("limited");
    let stored = Instant::now();
    assert_eq!(app.get(path, &limited).await.status(), 200);
    assert_eq!(app.get(path, &limited).await.status(), 200);
    // In the last tenth of the freshness (0.4 s before the end).
    tokio::time::sleep_until((stored + TTL - Duration::from_millis(300)).into()).await;
    assert_error(app.get(path, &limited).await, 429, "too_many_requests").await;
    let r = app.get(path, &reader_as("other")).await;
    assert_eq!(
        header(&r, "cache-status"),
        "billing-gateway; hit; detail=refreshing"
    );
    eventually(
        || async { app.upstream_requests().await.len() == 2 },
        PATIENCE,
    )
    .await;
    for app in apps {
        app.stop().await;
    }
}

/// A caller still being counted (its lease asked of Redis with the lookup) is decided before
/// its body is read: over its rate, it is refused without being invited to send the body.
#[tokio::test]
async fn a_caller_still_being_counted_is_not_invited_to_send_its_body_before_its_rate_is_decided() {
    let redis = Redis::start();
    let apps = replicas(1, &redis, |c| c.limits.principal_rate = per_minute(1)).await;
    let app = &apps[0];
    Mock::given(any())
        .respond_with(consumptions("counted"))
        .mount(&app.upstream)
        .await;
    let token = reader_as("limited");
    let path = "/billing/v2beta1/consumptions?billing_period=2026-01";
    for _ in 0..2 {
        assert_eq!(app.get(path, &token).await.status(), 200);
    }
    let auth = format!("Authorization: Bearer {token}");
    let statuses = expect_continue(&app.base, "GET", path, &auth).await;
    assert_eq!(statuses.len(), 1, "{statuses:?}");
    assert!(statuses[0].starts_with("HTTP/1.1 429"), "{statuses:?}");
    for app in apps {
        app.stop().await;
    }
}
