//! Memory the gateway process really holds, measured from outside as the kernel sees it
//! (`VmRSS`), not only as the gateway counts it.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::served::Served;
use common::*;
use futures_util::StreamExt;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::Mutex;
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

/// One test at a time: each measures memory, and another's would blur it.
static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

/// Resident memory of process `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}

const MIB: f64 = (1 << 20) as f64;

/// Answers every consumption query with the same small body, counting them.
#[derive(Clone, Default)]
struct Counting(Arc<AtomicUsize>);

impl Respond for Counting {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let sent_right = request.url.path() == "/billing/v2beta1/consumptions"
            && request
                .url
                .query_pairs()
                .any(|(k, v)| k == "organization_id" && v == ORG)
            && request
                .headers
                .get("x-auth-token")
                .is_some_and(|v| v == SECRET_KEY);
        if !sent_right {
            return ResponseTemplate::new(400);
        }
        self.0.fetch_add(1, Ordering::SeqCst);
        ResponseTemplate::new(200).set_body_raw(
            json!({
                "consumptions": [{
                    "value": {"currency_code": "EUR", "units": 3, "nanos": 140_000_000},
                    "product_name": "Block Storage 5K",
                    "resource_name": "b-ssd-5k",
                    "sku": "/storage/block/5k",
                    "project_id": ORG,
                    "category_name": "Storage",
                    "unit": "GB-month",
                    "billed_quantity": "42.5",
                    "consumer_id": ORG
                }],
                "total_count": 1,
                "total_discount_untaxed_value": 0.0
            })
            .to_string(),
            "application/json",
        )
    }
}

/// Sends `count` distinct consumption queries (long `category_name`s of a closed month),
/// `first` onwards, 16 at a time.
async fn fill(base: &str, token: &str, first: usize, count: usize) {
    // The gateway runs in another process: install this one's TLS provider before a client.
    billing_gateway::install_crypto_provider();
    let client = reqwest::Client::new();
    let next = Arc::new(AtomicUsize::new(first));
    let end = first + count;
    let workers: Vec<_> = (0..16)
        .map(|_| {
            let (client, next, base, token) =
                (client.clone(), next.clone(), base.to_owned(), token.to_owned());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= end {
                        break;
                    }
                    let category = format!("{i:0>8}-{}", "storage-".repeat(30));
                    let r = client
                        .get(format!(
                            "{base}/billing/v2beta1/consumptions?billing_period=2025-01&category_name={category}"
                        ))
                        .bearer_auth(&token)
                        .send()
                        .await
                        .expect("request");
                    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
                    r.bytes().await.expect("body");
                }
            })
        })
        .collect();
    for w in workers {
        w.await.expect("worker");
    }
}

async fn gauge(base: &str, name: &str) -> u64 {
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .expect("gauge")
}

/// Fixed growth of the gateway under the same load with nothing stored, measured by running
/// this test with `GATEWAY_CACHE_MAX_BYTES=0`: +0.7 MiB (buffers, pools, allocator pages).
const FIXED_ALLOWANCE: u64 = 1 << 20;

#[tokio::test]
async fn the_cache_bound_bounds_the_process_memory() {
    let _one = ONE_AT_A_TIME.lock().await;
    // 3 MiB holds about 1,800 of these entries (a 350-byte key, a 390-byte body); 2,100
    // distinct queries fill it past its bound.
    let bound: u64 = 3 << 20;
    let (warm, queries, refill) = (64, 2100, 500);
    let upstream = MockServer::builder()
        .disable_request_recording()
        .start()
        .await;
    let counted = Counting::default();
    Mock::given(wiremock::matchers::any())
        .respond_with(counted.clone())
        .mount(&upstream)
        .await;
    let gateway = Served::start(
        &upstream.uri(),
        &[("GATEWAY_CACHE_MAX_BYTES", &bound.to_string())],
    );
    let now = jsonwebtoken::get_current_timestamp();
    let manager = token_with(
        json!({"sub": "mem", "roles": ["billing-manager"], "iat": now, "exp": now + 600}),
    );
    let started = Instant::now();
    // Connections, pools and the runtime's first allocations before the baseline.
    fill(&gateway.base, &manager, 0, warm).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = rss(gateway.child.id());
    fill(&gateway.base, &manager, warm, queries).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let full = rss(gateway.child.id());
    let entries = gauge(&gateway.base, "billing_gateway_cache_entries").await;
    let counted_bytes = gauge(&gateway.base, "billing_gateway_cache_size_bytes").await;
    let growth = full.saturating_sub(before);
    println!(
        "{queries} distinct queries in {:.1?}: RSS {:.1} -> {:.1} MiB (+{:.2}), \
         {entries} entries counted as {:.2} MiB ({} bytes each), {:.0} bytes of RSS each",
        started.elapsed(),
        before as f64 / MIB,
        full as f64 / MIB,
        growth as f64 / MIB,
        counted_bytes as f64 / MIB,
        counted_bytes / entries.max(1),
        growth as f64 / entries.max(1) as f64,
    );
    // Every query went upstream once, with the key and the organization (`Counting` checks).
    assert_eq!(counted.0.load(Ordering::SeqCst), warm + queries);
    assert!(
        counted_bytes <= bound && counted_bytes > bound / 2,
        "the cache holds {counted_bytes} bytes, bound {bound}"
    );
    assert!(
        growth <= bound * 3 / 2 + FIXED_ALLOWANCE,
        "RSS grew by {:.1} MiB for a {:.1} MiB cache (the gauge says {:.1} MiB)",
        growth as f64 / MIB,
        bound as f64 / MIB,
        counted_bytes as f64 / MIB
    );

    billing_gateway::install_crypto_provider();
    let purge = reqwest::Client::new()
        .delete(format!("{}/gateway/v1/cache", gateway.base))
        .bearer_auth(&manager)
        .send()
        .await
        .expect("purge");
    assert_eq!(purge.status(), 204);
    assert_eq!(
        gauge(&gateway.base, "billing_gateway_cache_size_bytes").await,
        0
    );
    assert_eq!(
        gauge(&gateway.base, "billing_gateway_cache_entries").await,
        0
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let purged = rss(gateway.child.id());
    // mimalloc keeps freed pages for reuse rather than handing them back at once: what a purge
    // frees shows as the next entries costing no new memory.
    fill(&gateway.base, &manager, warm + queries, refill).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let refilled = rss(gateway.child.id());
    println!(
        "after the purge: RSS {:.1} MiB; {refill} new entries later: {:.1} MiB ({:.1?} in all)",
        purged as f64 / MIB,
        refilled as f64 / MIB,
        started.elapsed()
    );
    assert!(
        refilled <= full + FIXED_ALLOWANCE,
        "entries stored after a purge took new memory: {:.1} -> {:.1} MiB",
        full as f64 / MIB,
        refilled as f64 / MIB
    );
}

/// The block a [`Chunked`] upstream repeats: 64 KiB of a pattern (a prime-sized block would
/// align less; this is enough to notice a byte moved).
fn block() -> Vec<u8> {
    (0..64 * 1024).map(|i| (i * 31 % 251) as u8).collect()
}

/// An upstream over a plain socket answering every request `200` with a chunked JSON-labelled
/// body of `blocks` copies of [`block`], as fast as it is read; keeps each request's head.
struct Chunked {
    url: String,
    heads: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Chunked {
    async fn start(blocks: usize) -> Chunked {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let heads = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = heads.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    let Ok(Some(head)) = read_head(&mut stream).await else {
                        return;
                    };
                    seen.lock()
                        .expect("lock")
                        .push(String::from_utf8_lossy(&head).into_owned());
                    let block = block();
                    let mut chunk = format!("{:x}\r\n", block.len()).into_bytes();
                    chunk.extend_from_slice(&block);
                    chunk.extend_from_slice(b"\r\n");
                    let start = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                                 transfer-encoding: chunked\r\n\r\n";
                    if stream.write_all(start.as_bytes()).await.is_err() {
                        return;
                    }
                    for _ in 0..blocks {
                        if stream.write_all(&chunk).await.is_err() {
                            return; // the gateway hung up
                        }
                    }
                    let _ = stream.write_all(b"0\r\n\r\n").await;
                });
            }
        });
        Chunked { url, heads }
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().expect("lock").clone()
    }
}

#[tokio::test]
async fn a_cacheable_answer_longer_than_the_store_limit_streams_through_unheld() {
    let _one = ONE_AT_A_TIME.lock().await;
    // 200 MiB: read whole, as it was, it would add at least that much.
    let blocks = 3200;
    let size = blocks * 64 * 1024;
    let upstream = Chunked::start(blocks).await;
    // 1 MiB of cache: answers over ~100 KiB are not stored.
    let app = TestApp::spawn_with(|c| {
        c.upstream.url = upstream.url.clone();
        c.cache.max_bytes = 1 << 20;
    })
    .await;
    let pid = std::process::id();
    let before = rss(pid);
    let response = app
        .get(
            "/billing/v2beta1/consumptions?billing_period=2025-01",
            &app.reader(),
        )
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    assert_eq!(
        response.headers()["cache-status"],
        "billing-gateway; fwd=miss"
    );
    let block = block();
    let (mut received, mut peak) = (0usize, before);
    let mut body = response.bytes_stream();
    let mut next_sample = 0;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.expect("the whole body arrives");
        // Byte for byte what the upstream sent.
        let mut at = 0;
        while at < chunk.len() {
            let offset = (received + at) % block.len();
            let n = (block.len() - offset).min(chunk.len() - at);
            assert!(
                chunk[at..at + n] == block[offset..offset + n],
                "altered at byte {}",
                received + at
            );
            at += n;
        }
        received += chunk.len();
        if received >= next_sample {
            peak = peak.max(rss(pid));
            next_sample += 1 << 20;
        }
    }
    assert_eq!(received, size);
    let growth = peak.saturating_sub(before);
    println!(
        "{} MiB streamed: RSS {:.1} MiB before, peak {:.1} MiB (+{:.1})",
        size >> 20,
        before as f64 / MIB,
        peak as f64 / MIB,
        growth as f64 / MIB
    );
    // The gateway holds at most the store limit and a chunk or two in flight; this process also
    // runs the client and the upstream. 32 MiB is six times less than the body.
    assert!(
        growth < 32 << 20,
        "RSS grew by {:.1} MiB while {} MiB went through",
        growth as f64 / MIB,
        size >> 20
    );
    // Not stored: the next request goes upstream again, and is not stored either.
    let again = app
        .get(
            "/billing/v2beta1/consumptions?billing_period=2025-01",
            &app.manager(),
        )
        .await;
    assert_eq!(again.status(), 200);
    assert_eq!(again.headers()["cache-status"], "billing-gateway; fwd=miss");
    drop(again);
    let heads = upstream.heads();
    assert_eq!(heads.len(), 2, "{heads:?}");
    for head in &heads {
        let head = head.to_ascii_lowercase();
        assert!(
            head.starts_with(&format!(
                "get /billing/v2beta1/consumptions?billing_period=2025-01&organization_id={ORG} "
            )),
            "{head}"
        );
        assert!(
            head.contains(&format!("x-auth-token: {SECRET_KEY}")),
            "{head}"
        );
    }
    let metrics = app.metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l == "billing_gateway_cache_entries 0"),
        "{metrics}"
    );
}
