//! Finding 5 of issue 14: a caller without a credential cannot flood the log with long paths.
//!
//! A test binary of its own: the log capture is a thread-local subscriber, and tests running
//! beside it on other threads would make tracing cache its call sites as uninteresting.

mod common;

use common::*;

/// Finding 5: a 64 KiB path without a credential is a JSON 414, and no log line carries more
/// than a few hundred bytes of it; a long unknown path under the bound is a 404 logged short.
/// Single-threaded runtime: the subscriber set for this thread sees every task of the app.
#[tokio::test(flavor = "current_thread")]
async fn a_64_kib_path_gets_a_json_414_and_a_short_log_line() {
    let (captured, _logs) = capture_logs("info");

    let app = TestApp::builder()
        .access_log(captured.clone())
        .spawn()
        .await;
    // Just under hyper's own 64 KiB (65,534-byte) cap on a request target.
    let huge = format!("/billing/{}", "a".repeat(65_000));
    let response = app
        .client
        .get(format!("{}{huge}", app.base))
        .send()
        .await
        .expect("request");
    assert_error(response, 414, "uri_too_long").await;
    let long = format!("/nowhere/{}", "b".repeat(7_000));
    let response = app
        .client
        .get(format!("{}{long}", app.base))
        .send()
        .await
        .expect("request");
    assert_error(response, 404, "not_found").await;
    assert!(app.upstream_requests().await.is_empty());
    // Stopping writes every access log line still queued.
    app.stop().await;

    let logs = captured.text();
    let lines: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("\"message\":\"request\""))
        .collect();
    assert_eq!(lines.len(), 2, "{logs}");
    for line in &lines {
        assert!(line.len() < 1024, "a {} byte log line", line.len());
        assert!(line.contains("truncated"), "{line}");
    }
    assert!(lines[0].contains("\"status\":414"), "{}", lines[0]);
    assert!(lines[0].contains("65009 bytes"), "{}", lines[0]);
    assert!(lines[1].contains("\"status\":404"), "{}", lines[1]);
}
