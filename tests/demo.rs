//! `billing-gateway demo`, as the README tells a newcomer to run it: the printed tokens and curl
//! lines work against the embedded simulator.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use base64::Engine;
use serde_json::Value;

struct Demo(Child);

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn demo_serves_the_simulated_api_with_the_printed_tokens() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_billing-gateway"))
        .args(["demo", "--listen", "127.0.0.1:0"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("demo starts");
    let stdout = child.stdout.take().expect("stdout");
    let _demo = Demo(child);
    let (mut base, mut reader_token, mut manager_token, mut invoice, mut key) =
        (None, None, None, None, None);
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("line");
        if let Some(rest) = line.strip_prefix("billing-gateway demo: ") {
            base = rest.split_whitespace().next().map(str::to_owned);
        } else if let Some(t) = line.strip_prefix("READ_ONLY=") {
            reader_token = Some(t.to_owned());
        } else if let Some(k) = line.strip_prefix("GATEWAY_KEY=") {
            key = Some(k.to_owned());
        } else if let Some(t) = line.strip_prefix("MANAGER=") {
            manager_token = Some(t.to_owned());
        } else if line.contains("/download?dl=1") {
            invoice = line
                .split("/invoices/")
                .nth(1)
                .and_then(|s| s.split('/').next())
                .map(str::to_owned);
        }
        if line.starts_with("Ctrl-C") {
            break;
        }
    }
    let (base, reader_token, manager_token, invoice) = (
        base.expect("base URL printed"),
        reader_token.expect("read-only token printed"),
        manager_token.expect("manager token printed"),
        invoice.expect("download line printed"),
    );
    let key = key.expect("gateway key printed");
    billing_gateway::install_crypto_provider();
    let client = reqwest::Client::new();
    let get = |path: String, token: &str| {
        client
            .get(format!("{base}{path}"))
            .header("x-auth-token", token)
            .send()
    };

    let r = get(
        "/billing/v2beta1/consumptions?page_size=3".into(),
        &reader_token,
    )
    .await
    .expect("request");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["consumptions"].as_array().map(Vec::len), Some(3));
    assert!(body["total_count"].as_u64().unwrap_or(0) > 3);

    let r = get("/billing/v2beta1/invoices".into(), &reader_token)
        .await
        .expect("request");
    assert_eq!(r.status(), 403);

    let raw = get(
        format!("/billing/v2beta1/invoices/{invoice}/download?dl=1"),
        &manager_token,
    )
    .await
    .expect("request");
    assert_eq!(raw.status(), 200);
    assert_eq!(raw.headers()["content-type"], "application/pdf");
    let pdf = raw.bytes().await.expect("pdf");
    assert!(pdf.starts_with(b"%PDF-"));

    let envelope: Value = get(
        format!("/billing/v2beta1/invoices/{invoice}/download"),
        &manager_token,
    )
    .await
    .expect("request")
    .json()
    .await
    .expect("json");
    assert_eq!(envelope["content_type"], "application/pdf");
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(envelope["content"].as_str().expect("content"))
        .expect("base64");
    assert_eq!(decoded, pdf.to_vec());

    // The printed gateway key works as an unmodified SDK's SCW_SECRET_KEY.
    let who: Value = get("/gateway/v1/whoami".into(), &key)
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    assert_eq!(who["subject"], "demo-sdk");
    let r = get("/billing/v2beta1/discounts".into(), &key)
        .await
        .expect("request");
    assert_eq!(r.status(), 200);
}
