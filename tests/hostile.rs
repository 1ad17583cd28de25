//! Hostile clients against availability (issue 14): streams nobody reads, readers who stop
//! reading, callers holding every place, and request heads past the gateway's bounds. Each test
//! uses real sockets and a shrunk [`ServerLimits`], and waits for conditions, never for time.
//! (The log-flooding test is `tests/log_flood.rs`: it needs a test binary of its own.)

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::http::{Request, StatusCode};
use billing_gateway::server::ServerLimits;
use bytes::Bytes;
use common::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use wiremock::matchers::{path, path_regex};
use wiremock::{Mock, MockServer, ResponseTemplate};

/// Waits until the metrics show `line`.
async fn until_metric(app: &TestApp, line: &str) {
    tokio::time::timeout(PATIENCE, async {
        while !app.metrics().await.contains(line) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("never saw `{line}` in the metrics"));
}

/// A probe's status: no credential, as load balancers and scrapers send.
async fn probe(app: &TestApp, path: &str) -> StatusCode {
    app.client
        .get(format!("{}{path}", app.base))
        .send()
        .await
        .expect("request")
        .status()
}

fn token(sub: &str, role: &str) -> String {
    let now = jsonwebtoken::get_current_timestamp();
    token_with(json!({"sub": sub, "roles": [role], "iat": now, "exp": now + 600}))
}

fn download_path() -> String {
    format!("/billing/v2beta1/invoices/{INVOICE}/download?dl=1")
}

/// An upstream over a plain socket whose downloads are far larger than any test reads, written
/// as fast as the gateway takes them; anything else answers `{}`. It notices when the gateway
/// closes a download's connection (a write fails).
struct RawUpstream {
    url: String,
    downloads: Arc<AtomicUsize>,
    reader_gone: Arc<Notify>,
}

/// Size of one download: 256 MiB, far past any socket buffer.
const DOWNLOAD_LEN: usize = 256 * 1024 * 1024;

impl RawUpstream {
    async fn start() -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let downloads = Arc::new(AtomicUsize::new(0));
        let reader_gone = Arc::new(Notify::new());
        let (count, gone) = (downloads.clone(), reader_gone.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (count, gone) = (count.clone(), gone.clone());
                tokio::spawn(async move {
                    let _ = serve_raw(stream, &count, &gone).await;
                });
            }
        });
        RawUpstream {
            url,
            downloads,
            reader_gone,
        }
    }
}

async fn serve_raw(
    mut stream: TcpStream,
    downloads: &AtomicUsize,
    reader_gone: &Notify,
) -> std::io::Result<()> {
    loop {
        let Some(head) = read_head(&mut stream).await? else {
            return Ok(());
        };
        if !String::from_utf8_lossy(&head).contains("/download") {
            stream
                .write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}",
                )
                .await?;
            continue;
        }
        downloads.fetch_add(1, Ordering::SeqCst);
        let start = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/pdf\r\ncontent-length: {DOWNLOAD_LEN}\r\n\r\n"
        );
        stream.write_all(start.as_bytes()).await?;
        let chunk = vec![b'%'; 64 * 1024];
        for _ in 0..DOWNLOAD_LEN / chunk.len() {
            if stream.write_all(&chunk).await.is_err() {
                reader_gone.notify_one();
                return Ok(());
            }
        }
        return Ok(());
    }
}

/// An HTTP/2 connection that announces a zero flow-control window: the gateway can send it
/// response headers but not one byte of any body.
async fn zero_window(addr: &str) -> h2::client::SendRequest<Bytes> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (send, connection) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake(tcp)
        .await
        .expect("h2 handshake");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    send
}

fn h2_request(addr: &str, path: &str, token: Option<&str>) -> Request<()> {
    let mut request = Request::get(format!("http://{addr}{path}"));
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    request.body(()).expect("request")
}

/// Opens up to `wanted` streams for `path` on `send` (no more than the server allows at once)
/// and returns their responses, heads received, bodies never read. The responses must be kept:
/// dropping one resets its stream.
async fn open_streams(
    send: &mut h2::client::SendRequest<Bytes>,
    addr: &str,
    path: &str,
    token: Option<&str>,
    wanted: usize,
) -> Vec<axum::http::Response<h2::RecvStream>> {
    // A HEAD has no body: its answer carries the server's SETTINGS in before it, so the
    // server's stream limit is known after it.
    let mut ready = send.clone().ready().await.expect("ready");
    let (head, _) = ready
        .send_request(
            Request::head(format!("http://{addr}/healthz"))
                .body(())
                .expect("request"),
            true,
        )
        .expect("send");
    assert_eq!(head.await.expect("answer").status(), 200);
    let n = wanted.min(send.current_max_send_streams());
    let mut pending = Vec::new();
    for _ in 0..n {
        let mut ready = send.clone().ready().await.expect("ready");
        let (response, _) = ready
            .send_request(h2_request(addr, path, token), true)
            .expect("send");
        pending.push(response);
    }
    let mut responses = Vec::new();
    for response in pending {
        responses.push(response.await.expect("response head"));
    }
    responses
}

fn statuses(responses: &[axum::http::Response<h2::RecvStream>]) -> Vec<u16> {
    responses.iter().map(|r| r.status().as_u16()).collect()
}

/// Finding 1: six zero-window HTTP/2 connections opening as many streams as they may — for an
/// unknown path without a credential, for a cached answer and for a large download with valid
/// tokens — leave the gateway serving a bystander: unread 404s and cache hits hold no place,
/// each connection is held to 32 streams and each principal to its share.
#[tokio::test]
async fn zero_window_http2_streams_from_many_connections_do_not_lock_out_a_bystander() {
    let upstream = MockServer::start().await;
    Mock::given(path("/billing/v2beta1/consumptions"))
        .respond_with(ResponseTemplate::new(200).set_body_raw(
            json!({"consumptions": [], "total_count": 0}).to_string(),
            "application/json",
        ))
        .mount(&upstream)
        .await;
    Mock::given(path_regex("/download$"))
        .respond_with(
            ResponseTemplate::new(200).set_body_raw(vec![b'%'; 4 * 1024 * 1024], "application/pdf"),
        )
        .mount(&upstream)
        .await;
    Mock::given(path("/billing/v2beta1/invoices"))
        .respond_with(ResponseTemplate::new(200).set_body_raw(
            json!({"invoices": [], "total_count": 0}).to_string(),
            "application/json",
        ))
        .mount(&upstream)
        .await;
    let gateway = TestApp::builder()
        .upstream_url(upstream.uri())
        .limits(ServerLimits {
            max_in_flight: 8,
            max_in_flight_per_principal: 2,
            ..ServerLimits::default()
        })
        .spawn()
        .await;
    let addr = gateway.addr().to_string();
    let reader = token("mallory", "billing-read-only");
    let manager = token("mallet", "billing-manager");
    let consumptions = "/billing/v2beta1/consumptions?page_size=10";
    let download = download_path();
    // The consumption answer is cached before the attack: its streams are cache hits.
    assert_eq!(gateway.get(consumptions, &reader).await.status(), 200);

    let mut attack = Vec::new();
    let mut connections = Vec::new();
    for (path, token) in [
        ("/nowhere", None),
        ("/nowhere", None),
        ("/nowhere", None),
        (consumptions, Some(reader.as_str())),
        (consumptions, Some(reader.as_str())),
        (download.as_str(), Some(manager.as_str())),
    ] {
        let mut send = zero_window(&addr).await;
        let responses = open_streams(&mut send, &addr, path, token, 180).await;
        assert!(
            send.current_max_send_streams() <= 32,
            "one connection may open {} streams",
            send.current_max_send_streams()
        );
        attack.push((path.to_owned(), statuses(&responses)));
        connections.push((send, responses));
    }
    for (path, statuses) in &attack {
        let ok = statuses.iter().filter(|s| **s == 200).count();
        match path.as_str() {
            "/nowhere" => assert!(statuses.iter().all(|s| *s == 404), "{statuses:?}"),
            p if p == consumptions => assert_eq!(ok, statuses.len(), "{statuses:?}"),
            _ => {
                // The downloader holds its two places; its other streams were refused.
                assert_eq!(ok, 2, "{statuses:?}");
                assert!(
                    statuses.iter().all(|s| [200, 429].contains(s)),
                    "{statuses:?}"
                );
            }
        }
    }
    // Of everything held open, only the two downloads hold a place.
    until_metric(&gateway, "billing_gateway_requests_in_flight 2\n").await;

    let bystander = token("bob", "billing-manager");
    for _ in 0..20 {
        let response = gateway.get("/billing/v2beta1/invoices", &bystander).await;
        assert_eq!(response.status(), 200, "the bystander was refused");
        assert!(response.text().await.expect("body").contains("invoices"));
    }
    assert_eq!(probe(&gateway, "/readyz").await, 200);
    drop(connections);
}

/// Finding 1: a download whose HTTP/2 window stays shut — hyper never even asks its body for a
/// frame — is cut after the idle write time: the upstream connection is closed and the place
/// given back, while the connection itself goes on serving.
#[tokio::test]
async fn a_zero_window_download_is_cut_after_the_idle_write_time() {
    let upstream = RawUpstream::start().await;
    let gateway = TestApp::builder()
        .upstream_url(upstream.url)
        .limits(ServerLimits {
            idle_write_timeout: Duration::from_millis(300),
            ..ServerLimits::default()
        })
        .spawn()
        .await;
    let addr = gateway.addr().to_string();
    let manager = token("mallet", "billing-manager");
    let gone = upstream.reader_gone.notified();
    let mut send = zero_window(&addr).await;
    let held = open_streams(&mut send, &addr, &download_path(), Some(&manager), 1).await;
    assert_eq!(statuses(&held), [200]);

    tokio::time::timeout(PATIENCE, gone)
        .await
        .expect("the gateway closed the upstream connection of the unread download");
    until_metric(&gateway, "billing_gateway_requests_in_flight 0\n").await;
    until_metric(&gateway, "billing_gateway_stalled_answers_total 1\n").await;
    // The same connection still serves.
    let more = open_streams(
        &mut send,
        &addr,
        "/billing/v2beta1/taxes",
        Some(&manager),
        1,
    )
    .await;
    assert_eq!(statuses(&more), [200]);
    assert_eq!(upstream.downloads.load(Ordering::SeqCst), 1);
}

/// Finding 1: an HTTP/1.1 client that asks for a large download and never reads it is cut off
/// after the idle write time: its connection is closed, the upstream connection too, and its
/// place goes back (with one place in all, a bystander gets through).
#[tokio::test]
async fn a_reader_that_never_reads_a_download_is_cut_off_and_its_place_given_back() {
    let upstream = RawUpstream::start().await;
    let gateway = TestApp::builder()
        .upstream_url(upstream.url)
        .limits(ServerLimits {
            max_in_flight: 1,
            idle_write_timeout: Duration::from_millis(300),
            ..ServerLimits::default()
        })
        .spawn()
        .await;
    let gone = upstream.reader_gone.notified();
    let mut stalled = TcpStream::connect(gateway.addr()).await.expect("connect");
    let head = format!(
        "GET {} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {}\r\n\r\n",
        download_path(),
        token("mallet", "billing-manager")
    );
    stalled.write_all(head.as_bytes()).await.expect("write");
    // Reads the status line, then nothing more.
    let mut first = [0u8; 12];
    stalled.read_exact(&mut first).await.expect("status line");
    assert_eq!(&first, b"HTTP/1.1 200");

    tokio::time::timeout(PATIENCE, gone)
        .await
        .expect("the gateway closed the upstream connection of the unread download");
    until_metric(&gateway, "billing_gateway_requests_in_flight 0\n").await;
    let bystander = gateway
        .get("/billing/v2beta1/taxes", &token("bob", "billing-read-only"))
        .await;
    assert_eq!(bystander.status(), 200);
    // The stalled connection was closed: what the kernel held is all it gets, not the download.
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, stalled.read_to_end(&mut rest))
        .await
        .expect("the stalled connection was closed");
    assert!(rest.len() < DOWNLOAD_LEN, "{}", rest.len());
}

/// Finding 1: one principal holds at most its share of the places; past it a JSON 429 while
/// other principals are served, and its places come back when its answers end.
#[tokio::test]
async fn a_principal_past_its_share_in_flight_gets_a_json_429_and_others_are_served() {
    let upstream = RawUpstream::start().await;
    let gateway = TestApp::builder()
        .upstream_url(upstream.url)
        .limits(ServerLimits {
            max_in_flight_per_principal: 1,
            ..ServerLimits::default()
        })
        .spawn()
        .await;
    let alice = token("alice", "billing-manager");
    // A download not read: its place stays held (for the idle write time, 30 s here).
    let held = gateway.get(&download_path(), &alice).await;
    assert_eq!(held.status(), 200);

    let refused = gateway.get("/billing/v2beta1/taxes", &alice).await;
    assert_eq!(refused.headers()["retry-after"], "1");
    assert_error(refused, 429, "too_many_requests").await;
    let bob = gateway
        .get("/billing/v2beta1/taxes", &token("bob", "billing-manager"))
        .await;
    assert_eq!(bob.status(), 200);
    let m = gateway.metrics().await;
    assert!(
        m.contains(r#"billing_gateway_rejections_total{reason="principal_in_flight"} 1"#),
        "{m}"
    );

    drop(held);
    tokio::time::timeout(PATIENCE, async {
        while gateway.get("/billing/v2beta1/taxes", &alice).await.status() != 200 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("alice's place came back");
}

/// Finding 1: readiness reflects saturation — `/readyz` is 503 while every place is taken, and
/// 200 again once one comes back; `/healthz` stays 200 throughout.
#[tokio::test]
async fn readyz_is_503_while_every_place_is_taken_and_healthz_stays_200() {
    let upstream = RawUpstream::start().await;
    let gateway = TestApp::builder()
        .upstream_url(upstream.url)
        .limits(ServerLimits {
            max_in_flight: 1,
            ..ServerLimits::default()
        })
        .spawn()
        .await;
    assert_eq!(probe(&gateway, "/readyz").await, 200);
    let held = gateway
        .get(&download_path(), &token("alice", "billing-manager"))
        .await;
    assert_eq!(held.status(), 200);
    assert_eq!(probe(&gateway, "/readyz").await, 503);
    assert_eq!(probe(&gateway, "/healthz").await, 200);
    let shed = gateway
        .get("/billing/v2beta1/taxes", &token("bob", "billing-manager"))
        .await;
    assert_error(shed, 503, "service_unavailable").await;

    drop(held);
    tokio::time::timeout(PATIENCE, async {
        while probe(&gateway, "/readyz").await != 200 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("ready again once the place came back");
}

fn with_headers(mut request: reqwest::RequestBuilder, n: usize) -> reqwest::RequestBuilder {
    for i in 0..n {
        request = request.header(format!("x-h{i}"), "v");
    }
    request
}

/// Finding 7 (the HTTP layer's part): over a hundred headers is a JSON 431 like every error,
/// over HTTP/1.1 and HTTP/2 alike; only a head past hyper's hard byte cap gets hyper's bare
/// 431, and a request target past hyper's own 64 KiB limit hyper's bare 414.
#[tokio::test]
async fn over_a_hundred_headers_get_a_json_431() {
    let upstream = MockServer::start().await;
    Mock::given(path("/billing/v2beta1/taxes"))
        .respond_with(ResponseTemplate::new(200).set_body_raw("{}", "application/json"))
        .mount(&upstream)
        .await;
    let gateway = TestApp::builder()
        .upstream_url(upstream.uri())
        .spawn()
        .await;
    let url = format!("{}/billing/v2beta1/taxes", gateway.base);
    let reader = token("alice", "billing-read-only");

    let ok = with_headers(gateway.client.get(&url).bearer_auth(&reader), 60)
        .send()
        .await
        .expect("request");
    assert_eq!(ok.status(), 200);
    let many = with_headers(gateway.client.get(&url).bearer_auth(&reader), 150)
        .send()
        .await
        .expect("request");
    assert_error(many, 431, "request_header_fields_too_large").await;

    // The same over HTTP/2 (prior knowledge, as the SDKs' h2c would).
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("client");
    let many = with_headers(h2.get(&url).bearer_auth(&reader), 150)
        .send()
        .await
        .expect("request");
    assert_eq!(many.version(), reqwest::Version::HTTP_2);
    assert_error(many, 431, "request_header_fields_too_large").await;

    // Past the hard caps: hyper's own answers (documented in `ServerLimits`): a head over
    // twice the header and target limits, and a target over 64 KiB.
    let enormous = gateway
        .client
        .get(&url)
        .header("x-big", "b".repeat(90 * 1024))
        .send()
        .await
        .expect("request");
    assert_eq!(enormous.status(), 431);
    let mut raw = TcpStream::connect(gateway.addr()).await.expect("connect");
    let target = format!("/{}", "c".repeat(70 * 1024));
    raw.write_all(format!("GET {target} HTTP/1.1\r\nHost: gw\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, raw.read_to_end(&mut answer))
        .await
        .expect("answered");
    assert!(
        String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 414"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    assert!(upstream.received_requests().await.unwrap_or_default().len() == 1);
}
