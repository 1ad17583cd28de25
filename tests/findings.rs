//! The last request-level findings of issue 20 (§2 a–e), each over real sockets against a
//! wiremock upstream: what came back, and what reached the upstream (nothing, for refused input).

mod common;

use common::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

/// Sends `head` (a whole request head) on a fresh connection and reads up to the end of the
/// first answer's head plus whatever body arrived with it before the gateway closed or paused.
async fn first_answer(app: &TestApp, head: &str) -> String {
    let mut stream = TcpStream::connect(app.addr()).await.expect("connect");
    stream.write_all(head.as_bytes()).await.expect("write");
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    // The first answer is whole once its head is in and its Content-Length of body follows.
    loop {
        let n = tokio::time::timeout(PATIENCE, stream.read(&mut buf))
            .await
            .expect("the gateway answers")
            .expect("read");
        received.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&received).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                })
                .unwrap_or(0);
            if body.len() >= length || n == 0 {
                return text;
            }
        }
        assert!(n > 0, "closed mid-answer: {text}");
    }
}

/// §2a: a declared body over the limit is refused at once, without `100 Continue`, even for a
/// caller allowed to make the call; nothing reaches the upstream.
#[tokio::test]
async fn expect_continue_with_an_oversized_content_length_gets_413_without_the_100() {
    let app = TestApp::spawn().await;
    let head = format!(
        "POST /billing/v2beta1/redeem-coupon?code=X HTTP/1.1\r\nHost: gw\r\n\
         Authorization: Bearer {}\r\nContent-Type: application/json\r\n\
         Content-Length: 1000000\r\nExpect: 100-continue\r\n\r\n",
        app.manager()
    );
    let answer = first_answer(&app, &head).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(!answer.contains("100 Continue"), "{answer}");
    let body: Value =
        serde_json::from_str(answer.split_once("\r\n\r\n").expect("head").1).expect("a JSON body");
    assert_eq!(body["type"], "payload_too_large");
    assert!(app.upstream_requests().await.is_empty());
}

/// §2b: 500 and 3,000 header fields get the gateway's JSON 431, over HTTP/1.1 as over HTTP/2,
/// rather than hyper's empty one; nothing reaches the upstream.
#[tokio::test]
async fn thousands_of_headers_get_a_json_431_never_an_empty_one() {
    let app = TestApp::spawn().await;
    let url = format!("{}/billing/v2beta1/consumptions", app.base);
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("client");
    for n in [500, 3000] {
        for (client, version) in [
            (&app.client, reqwest::Version::HTTP_11),
            (&h2, reqwest::Version::HTTP_2),
        ] {
            let mut request = client.get(&url).bearer_auth(app.reader());
            for i in 0..n {
                request = request.header(format!("x-h{i}"), "v");
            }
            let response = request.send().await.expect("request");
            assert_eq!(response.version(), version);
            assert_error(response, 431, "request_header_fields_too_large").await;
        }
        // Byte for byte too, the shortest header lines there are.
        let mut head = String::from("GET /billing/v2beta1/consumptions HTTP/1.1\r\nHost: gw\r\n");
        for i in 0..n {
            head.push_str(&format!("h{i}:\r\n"));
        }
        head.push_str("\r\n");
        let answer = first_answer(&app, &head).await;
        assert!(answer.starts_with("HTTP/1.1 431"), "{n}: {answer}");
        assert!(
            answer.contains("\"type\":\"request_header_fields_too_large\""),
            "{n}: {answer}"
        );
    }
    assert!(app.upstream_requests().await.is_empty());
}

/// §2c: a query value that is not UTF-8 once decoded is a 400 naming its parameter, never
/// replaced with U+FFFD and forwarded.
#[tokio::test]
async fn a_query_value_that_is_not_utf8_is_refused_naming_it_and_not_forwarded() {
    let app = TestApp::spawn().await;
    let response = app
        .get(
            "/billing/v2beta1/consumptions?category_name=%FF%FE%C0%AF",
            &app.reader(),
        )
        .await;
    let body = assert_error(response, 400, "invalid_arguments").await;
    assert_eq!(
        body["details"][0]["argument_name"], "category_name",
        "{body}"
    );
    assert_eq!(body["details"][0]["reason"], "format", "{body}");
    assert!(app.upstream_requests().await.is_empty());
}

/// §2d: a 405 on a Billing path says what is allowed; `HEAD` works wherever `GET` does, with
/// the `GET` answer's head and no body, and what goes upstream is that `GET`.
#[tokio::test]
async fn billing_405_carries_allow_and_head_is_the_get_without_its_body() {
    let app = TestApp::spawn().await;
    Mock::given(method("GET"))
        .and(path("/billing/v2beta1/invoices"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_raw(r#"{"invoices":[],"total_count":0}"#, "application/json"),
        )
        .expect(2)
        .mount(&app.upstream)
        .await;
    for (verb, target, allow) in [
        ("DELETE", "/billing/v2beta1/invoices", "GET, HEAD"),
        ("GET", "/billing/v2beta1/redeem-coupon?code=X", "POST"),
    ] {
        let response = app
            .client
            .request(
                verb.parse().expect("method"),
                format!("{}{target}", app.base),
            )
            .bearer_auth(app.manager())
            .send()
            .await
            .expect("request");
        assert_eq!(header(&response, "allow"), allow, "{verb} {target}");
        assert_error(response, 405, "method_not_allowed").await;
    }

    let url = format!("{}/billing/v2beta1/invoices", app.base);
    let get = app
        .client
        .get(&url)
        .bearer_auth(app.manager())
        .send()
        .await
        .expect("GET");
    let head = app
        .client
        .head(&url)
        .bearer_auth(app.manager())
        .send()
        .await
        .expect("HEAD");
    assert_eq!(head.status(), 200);
    for name in ["content-type", "content-length"] {
        assert_eq!(header(&head, name), header(&get, name), "{name}");
    }
    assert!(!header(&head, "content-length").is_empty());
    assert_eq!(head.bytes().await.expect("body").len(), 0);
    assert_eq!(get.bytes().await.expect("body").len(), 31);
    // A HEAD a read-only caller may not GET is refused like the GET.
    let refused = app
        .client
        .head(&url)
        .bearer_auth(app.reader())
        .send()
        .await
        .expect("HEAD");
    assert_eq!(refused.status(), 403);
    let methods: Vec<String> = app
        .upstream_requests()
        .await
        .iter()
        .map(|r| r.method.to_string())
        .collect();
    assert_eq!(methods, ["GET", "GET"]);
}

/// §2e: a page number past int32 is refused saying it is too large, and up to what.
#[tokio::test]
async fn a_page_past_int32_is_refused_as_too_large_naming_the_bound() {
    let app = TestApp::spawn().await;
    let response = app
        .get("/billing/v2beta1/invoices?page=2147483648", &app.manager())
        .await;
    let body = assert_error(response, 400, "invalid_arguments").await;
    assert_eq!(body["details"][0]["argument_name"], "page");
    let help = body["details"][0]["help_message"].as_str().expect("help");
    assert!(
        help.contains("too large") && help.contains("2147483647"),
        "{help}"
    );
    assert!(app.upstream_requests().await.is_empty());
}
