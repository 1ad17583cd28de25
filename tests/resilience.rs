//! Staying up when things go wrong: hostile and broken clients, overload, flaky upstream
//! connections and shutdown in the middle of a download.
//!
//! Some tests need an upstream that streams slowly or drops connections, which wiremock cannot
//! do; [`RawUpstream`] is a few lines of plain HTTP/1.1 over a socket for them.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use billing_gateway::server::ServerLimits;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::time::Instant;
use wiremock::matchers::any;
use wiremock::{Mock, ResponseTemplate};

/// What [`RawUpstream`] does with each connection.
#[derive(Clone, Copy)]
struct Script {
    /// Close the first connection after reading its request, without an answer.
    drop_first: bool,
    /// Downloads: this many chunks of `chunk` bytes, `pause` apart.
    chunks: usize,
    chunk: usize,
    pause: Duration,
}

/// An upstream over a plain socket: `/download` streams the scripted body slowly, anything else
/// answers `{}`. Counts connections and notices when a download's reader goes away.
struct RawUpstream {
    url: String,
    connections: Arc<AtomicUsize>,
    reader_gone: Arc<Notify>,
}

impl RawUpstream {
    async fn start(script: Script) -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let connections = Arc::new(AtomicUsize::new(0));
        let reader_gone = Arc::new(Notify::new());
        let (count, gone) = (connections.clone(), reader_gone.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let n = count.fetch_add(1, Ordering::SeqCst);
                let gone = gone.clone();
                tokio::spawn(async move {
                    let _ = serve_raw(stream, script, n == 0 && script.drop_first, &gone).await;
                });
            }
        });
        RawUpstream {
            url,
            connections,
            reader_gone,
        }
    }
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

async fn serve_raw(
    mut stream: TcpStream,
    script: Script,
    drop_it: bool,
    reader_gone: &Notify,
) -> std::io::Result<()> {
    loop {
        let Some(head) = read_head(&mut stream).await? else {
            return Ok(());
        };
        if drop_it {
            return Ok(());
        }
        let head = String::from_utf8_lossy(&head);
        if head.contains("/download") {
            let len = script.chunks * script.chunk;
            let start = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/pdf\r\ncontent-length: {len}\r\n\r\n"
            );
            stream.write_all(start.as_bytes()).await?;
            for i in 0..script.chunks {
                let piece: Vec<u8> = (i * script.chunk..(i + 1) * script.chunk)
                    .map(|j| (j * 31 % 251) as u8)
                    .collect();
                if stream.write_all(&piece).await.is_err() {
                    reader_gone.notify_one();
                    return Ok(());
                }
                // Not synchronisation: a slow upstream is what these tests are about.
                tokio::time::sleep(script.pause).await;
            }
        } else {
            stream
                .write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}",
                )
                .await?;
        }
    }
}

fn download_path() -> String {
    format!("/billing/v2beta1/invoices/{INVOICE}/download?dl=1")
}

#[tokio::test]
async fn oversized_headers_get_a_json_431_and_oversized_bodies_a_413() {
    let app = TestApp::spawn().await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(200).set_body_raw("{}", "application/json"))
        .mount(&app.upstream)
        .await;
    let response = app
        .client
        .get(format!("{}/billing/v2beta1/taxes", app.base))
        .bearer_auth(app.reader())
        .header("x-padding", "a".repeat(40 * 1024))
        .send()
        .await
        .expect("request");
    assert_error(response, 431, "request_header_fields_too_large").await;
    let response = app
        .client
        .post(format!("{}/billing/v2beta1/redeem-coupon?code=X", app.base))
        .header("x-auth-token", app.manager())
        .body(vec![b' '; 64 * 1024])
        .send()
        .await
        .expect("request");
    assert_error(response, 413, "payload_too_large").await;
    assert!(app.upstream_requests().await.is_empty());
    // Normal headers are served as before.
    assert_eq!(
        app.get("/billing/v2beta1/taxes", &app.reader())
            .await
            .status(),
        200
    );
}

/// A gateway that gives clients `header_read_timeout` to send a request head.
fn impatient() -> ServerLimits {
    ServerLimits {
        header_read_timeout: Duration::from_millis(300),
        ..ServerLimits::default()
    }
}

#[tokio::test]
async fn a_request_body_that_never_comes_is_cut_off_with_a_json_408() {
    let app = TestApp::builder()
        .limits(ServerLimits {
            body_deadline: Duration::from_millis(300),
            ..ServerLimits::default()
        })
        .spawn()
        .await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(200).set_body_raw("{}", "application/json"))
        .expect(0)
        .mount(&app.upstream)
        .await;
    // A valid head promising a body that never comes.
    let mut stream = TcpStream::connect(app.addr()).await.expect("connect");
    let head = format!(
        "POST /billing/v2beta1/redeem-coupon?code=X HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {}\r\n\
         Content-Length: 100\r\n\r\n{{",
        app.manager()
    );
    stream.write_all(head.as_bytes()).await.expect("write");
    let mut got = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut got))
        .await
        .expect("the gateway answered")
        .expect("read");
    let answer = String::from_utf8_lossy(&got);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains(r#""type":"request_timeout""#), "{answer}");
}

/// Reads one answer off a raw connection, then on until the gateway closes it (a reset counts
/// as closed too): the answer's text and when its first byte came.
async fn answer_then_close(reader: &mut (impl AsyncReadExt + Unpin)) -> (String, Instant) {
    let mut got = vec![0u8; 16 * 1024];
    let n = tokio::time::timeout(PATIENCE, reader.read(&mut got))
        .await
        .expect("the gateway answered")
        .expect("read");
    let at = Instant::now();
    got.truncate(n);
    let rest = tokio::time::timeout(PATIENCE, reader.read_to_end(&mut got))
        .await
        .expect("the gateway closed the connection");
    assert!(
        rest.is_ok() || rest.is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "the connection did not close cleanly"
    );
    (String::from_utf8_lossy(&got).into_owned(), at)
}

#[tokio::test]
async fn a_body_trickled_a_byte_a_second_gets_a_json_408_at_the_deadline_and_frees_its_place() {
    const DEADLINE: Duration = Duration::from_secs(2);
    // One place in flight: if the trickled request kept it, the next request would be shed.
    let app = TestApp::builder()
        .limits(ServerLimits {
            body_deadline: DEADLINE,
            max_in_flight: 1,
            ..ServerLimits::default()
        })
        .spawn()
        .await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(200).set_body_raw("{}", "application/json"))
        .mount(&app.upstream)
        .await;
    // 20 bytes promised, one sent each second: every byte comes well within any idle timeout,
    // the whole body only after 19 s.
    let (mut reader, mut writer) = TcpStream::connect(app.addr())
        .await
        .expect("connect")
        .into_split();
    let head = format!(
        "POST /billing/v2beta1/redeem-coupon?code=X HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 20\r\n\r\n{{",
        app.manager()
    );
    // The head and the first body byte in one write, so the gateway's clock cannot start
    // before `first_byte`.
    let first_byte = Instant::now();
    writer.write_all(head.as_bytes()).await.expect("write");
    let trickle = tokio::spawn(async move {
        for _ in 1..20 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if writer.write_all(b" ").await.is_err() {
                return;
            }
        }
    });

    let (answer, at) = answer_then_close(&mut reader).await;
    let took = at - first_byte;
    assert!(
        took >= DEADLINE && took < DEADLINE + Duration::from_secs(2),
        "answered {took:?} after the first body byte; the deadline is {DEADLINE:?}, so between \
         {DEADLINE:?} and {:?}",
        DEADLINE + Duration::from_secs(2)
    );
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        answer.contains("content-type: application/json\r\n"),
        "{answer}"
    );
    assert!(answer.contains(r#""type":"request_timeout""#), "{answer}");
    trickle.abort();

    // Nothing went upstream, and the place is free again: the next request is served.
    assert!(
        app.upstream
            .received_requests()
            .await
            .unwrap_or_default()
            .is_empty()
    );
    assert_eq!(
        app.get("/billing/v2beta1/taxes", &app.manager())
            .await
            .status(),
        200
    );
    tokio::time::timeout(PATIENCE, async {
        while !app
            .metrics()
            .await
            .contains("billing_gateway_requests_in_flight 0")
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("no request left in flight");
    let m = app.metrics().await;
    assert!(
        m.contains(r#"billing_gateway_rejections_total{reason="request_timeout"} 1"#),
        "{m}"
    );
}

#[tokio::test]
async fn a_malformed_chunked_body_gets_a_json_400_not_a_408() {
    let app = TestApp::spawn().await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(200).set_body_raw("{}", "application/json"))
        .expect(0)
        .mount(&app.upstream)
        .await;
    let mut stream = TcpStream::connect(app.addr()).await.expect("connect");
    // `zz` is no chunk size.
    let request = format!(
        "POST /billing/v2beta1/redeem-coupon?code=X HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {}\r\n\
         Transfer-Encoding: chunked\r\n\r\nzz\r\n{{}}\r\n0\r\n\r\n",
        app.manager()
    );
    let sent = Instant::now();
    stream.write_all(request.as_bytes()).await.expect("write");
    let (answer, at) = answer_then_close(&mut stream).await;
    assert!(
        at - sent < Duration::from_secs(2),
        "answered only after {:?}",
        at - sent
    );
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(
        answer.contains("content-type: application/json\r\n"),
        "{answer}"
    );
    assert!(
        answer.contains(r#""type":"invalid_request_error""#),
        "{answer}"
    );
}

#[tokio::test]
async fn a_slow_loris_connection_is_closed_and_others_are_served() {
    let app = TestApp::builder().limits(impatient()).spawn().await;
    // One sends half a request head and stalls; another connects and says nothing.
    let mut half = TcpStream::connect(app.addr()).await.expect("connect");
    half.write_all(b"GET /healthz HTTP/1.1\r\nHost: gw\r\nX-Slow: ")
        .await
        .expect("write");
    let mut silent = TcpStream::connect(app.addr()).await.expect("connect");
    for stream in [&mut half, &mut silent] {
        let mut got = Vec::new();
        let read = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut got))
            .await
            .expect("the gateway closed the connection");
        assert!(
            read.is_err() || !String::from_utf8_lossy(&got).contains("200 OK"),
            "a stalled request was answered"
        );
    }
    let response = app
        .client
        .get(format!("{}/healthz", app.base))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn load_past_the_bound_is_shed_with_a_json_503_and_probes_still_answer() {
    let app = Arc::new(
        TestApp::builder()
            .limits(ServerLimits {
                max_in_flight: 2,
                ..ServerLimits::default()
            })
            .spawn()
            .await,
    );
    Mock::given(any())
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_raw("{}", "application/json")
                .set_delay(Duration::from_millis(1500)),
        )
        .mount(&app.upstream)
        .await;
    let token = app.manager();
    let busy: Vec<_> = (0..2)
        .map(|_| {
            let (app, token) = (app.clone(), token.clone());
            tokio::spawn(async move { app.get("/billing/v2beta1/charges", &token).await.status() })
        })
        .collect();
    // Both places are taken once both requests are waiting on the (slow) upstream.
    eventually(
        || async { app.upstream_requests().await.len() == 2 },
        PATIENCE,
    )
    .await;

    let shed = app.get("/billing/v2beta1/charges", &token).await;
    assert_eq!(shed.headers()["retry-after"], "1");
    assert_error(shed, 503, "service_unavailable").await;
    let health = app
        .client
        .get(format!("{}/healthz", app.base))
        .send()
        .await
        .expect("request");
    assert_eq!(health.status(), 200, "a probe was shed");

    for request in busy {
        assert_eq!(request.await.expect("join"), 200);
    }
    assert_eq!(
        app.get("/billing/v2beta1/charges", &token).await.status(),
        200
    );
    assert_eq!(app.upstream_requests().await.len(), 3);
    let m = app.metrics().await;
    assert!(
        m.contains(r#"billing_gateway_rejections_total{reason="overloaded"} 1"#),
        "{m}"
    );
}

#[tokio::test]
async fn a_get_is_retried_after_the_upstream_drops_the_connection() {
    let upstream = RawUpstream::start(Script {
        drop_first: true,
        chunks: 0,
        chunk: 1,
        pause: Duration::ZERO,
    })
    .await;
    let app = TestApp::builder().upstream_url(&upstream.url).spawn().await;
    let response = app.get("/billing/v2beta1/taxes", &app.manager()).await;
    assert_eq!(response.status(), 200);
    assert_eq!(upstream.connections.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_client_leaving_mid_download_frees_the_upstream_connection_and_service_goes_on() {
    // A download far longer than the test: only the client leaving can end it.
    let upstream = RawUpstream::start(Script {
        drop_first: false,
        chunks: 100_000,
        chunk: 16 * 1024,
        pause: Duration::from_millis(5),
    })
    .await;
    let app = TestApp::builder().upstream_url(&upstream.url).spawn().await;
    let gone = upstream.reader_gone.notified();
    let mut response = app.get(&download_path(), &app.manager()).await;
    assert_eq!(response.status(), 200);
    let first = response
        .chunk()
        .await
        .expect("body")
        .expect("a first chunk");
    assert!(!first.is_empty());
    drop(response);

    tokio::time::timeout(PATIENCE, gone)
        .await
        .expect("the gateway closed its upstream connection");
    assert_eq!(
        app.get("/billing/v2beta1/taxes", &app.manager())
            .await
            .status(),
        200
    );
    // The abandoned download gave its place in the concurrency bound back.
    eventually(
        || async {
            app.metrics()
                .await
                .contains("billing_gateway_requests_in_flight 0")
        },
        PATIENCE,
    )
    .await;
}

#[tokio::test]
async fn shutdown_during_a_slow_download_lets_it_finish_then_exits_cleanly() {
    let script = Script {
        drop_first: false,
        chunks: 20,
        chunk: 8 * 1024,
        pause: Duration::from_millis(50),
    };
    let upstream = RawUpstream::start(script).await;
    let mut app = TestApp::builder().upstream_url(&upstream.url).spawn().await;
    let response = app.get(&download_path(), &app.manager()).await;
    assert_eq!(response.status(), 200);

    // The SIGTERM path of `serve`: the same future completing.
    app.shutdown();
    let body = response.bytes().await.expect("the download completes");
    assert!(
        body.as_ref() == pattern(script.chunks * script.chunk).as_slice(),
        "the download was cut or altered"
    );
    let addr = app.addr();
    app.stop().await;
    assert!(TcpStream::connect(addr).await.is_err(), "still accepting");
}
