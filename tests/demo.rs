//! `billing-gateway demo`, as the README tells a newcomer to run it: the printed tokens, curl
//! lines and SDK settings work against the embedded simulator, and the demo is `serve` in all
//! but its upstream: its configuration (CORS, the policy folder), its reload and its signals.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use billing_gateway::policy::key_sha256;
use serde_json::Value;

/// A running demo: the process, what its banner printed, and its log lines so far.
struct Demo {
    child: Child,
    base: String,
    /// The banner's lines, up to its `Ctrl-C` line.
    banner: Vec<String>,
    /// Its `NAME=value` lines.
    vars: HashMap<String, String>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Demo {
    /// Starts `demo --listen 127.0.0.1:0` from the repository root with `env` added to a clean
    /// environment, and reads its banner.
    fn start(env: &[(&str, &str)]) -> Demo {
        let mut command = Command::new(env!("CARGO_BIN_EXE_billing-gateway"));
        command
            .args(["demo", "--listen", "127.0.0.1:0"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env_clear()
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("demo starts");
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        // Drained all along, so the demo never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().expect("log").push(line);
            }
        });
        let mut banner = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let line = line.expect("line");
            let end = line.starts_with("Ctrl-C");
            banner.push(line);
            if end {
                break;
            }
        }
        let base = banner
            .first()
            .and_then(|l| l.strip_prefix("billing-gateway demo: "))
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("no banner: {banner:#?} {:#?}", log.lock().expect("log")))
            .to_owned();
        let vars = banner
            .iter()
            .filter_map(|l| l.split_once('='))
            .filter(|(k, _)| k.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        Demo {
            child,
            base,
            banner,
            vars,
            log,
        }
    }

    fn var(&self, name: &str) -> String {
        self.vars
            .get(name)
            .unwrap_or_else(|| panic!("{name}= not printed: {:#?}", self.banner))
            .clone()
    }

    async fn get(&self, path: &str, token: &str) -> reqwest::Response {
        client()
            .get(format!("{}{path}", self.base))
            .header("x-auth-token", token)
            .send()
            .await
            .expect("request")
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([format!("-{name}"), self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{name}");
    }

    /// Fails when the demo has exited (SIGHUP's default action would end it with 129).
    fn assert_running(&mut self) {
        let exited = self.child.try_wait().expect("try_wait");
        assert!(exited.is_none(), "the demo exited: {exited:?}");
    }
}

/// A temporary copy of the repository's policy files (`*.toml` only), removed when dropped.
struct TempPolicy(tempfile::TempDir);

impl TempPolicy {
    fn copy_of_policies() -> TempPolicy {
        let dir = tempfile::tempdir().expect("tmp");
        let policies = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
        for entry in std::fs::read_dir(policies).expect("policies/") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|x| x == "toml") {
                std::fs::copy(&path, dir.path().join(path.file_name().expect("name")))
                    .expect("copy");
            }
        }
        TempPolicy(dir)
    }

    fn path(&self) -> &str {
        self.0.path().to_str().expect("utf-8")
    }
}

/// Waits, at most 10 s, for `check` to hold.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(Instant::now() < deadline, "{what}: not within 10 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn demo_serves_the_simulated_api_with_the_printed_tokens() {
    let demo = Demo::start(&[]);
    let reader_token = demo.var("READ_ONLY");
    let manager_token = demo.var("MANAGER");
    let key = demo.var("GATEWAY_KEY");
    let invoice = demo
        .banner
        .iter()
        .find(|l| l.contains("/download?dl=1"))
        .and_then(|l| l.split("/invoices/").nth(1))
        .and_then(|s| s.split('/').next())
        .expect("download line printed")
        .to_owned();

    let r = demo
        .get("/billing/v2beta1/consumptions?page_size=3", &reader_token)
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["consumptions"].as_array().map(Vec::len), Some(3));
    assert!(body["total_count"].as_u64().unwrap_or(0) > 3);

    let r = demo.get("/billing/v2beta1/invoices", &reader_token).await;
    assert_eq!(r.status(), 403);

    let raw = demo
        .get(
            &format!("/billing/v2beta1/invoices/{invoice}/download?dl=1"),
            &manager_token,
        )
        .await;
    assert_eq!(raw.status(), 200);
    assert_eq!(raw.headers()["content-type"], "application/pdf");
    let pdf = raw.bytes().await.expect("pdf");
    assert!(pdf.starts_with(b"%PDF-"));

    let envelope: Value = demo
        .get(
            &format!("/billing/v2beta1/invoices/{invoice}/download"),
            &manager_token,
        )
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(envelope["content_type"], "application/pdf");
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(envelope["content"].as_str().expect("content"))
        .expect("base64");
    assert_eq!(decoded, pdf.to_vec());

    // The printed gateway key works as an unmodified SDK's SCW_SECRET_KEY.
    let who: Value = demo
        .get("/gateway/v1/whoami", &key)
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(who["subject"], "demo-sdk");
    let r = demo.get("/billing/v2beta1/discounts", &key).await;
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn demo_banner_gives_the_sdks_everything_they_need_whatever_the_shell_holds() {
    // A Scaleway user's own profile in the shell must neither reach the demo nor break it.
    let demo = Demo::start(&[
        ("SCW_SECRET_KEY", "5ec7e7ca-fe00-4bad-9000-00000000beef"),
        (
            "SCW_DEFAULT_ORGANIZATION_ID",
            "22222222-3333-4444-5555-666666666666",
        ),
        ("SCW_API_URL", "http://127.0.0.1:9"),
    ]);
    let key = demo.var("GATEWAY_KEY");
    let export = demo
        .banner
        .iter()
        .find_map(|l| l.strip_prefix("export "))
        .unwrap_or_else(|| panic!("no export line: {:#?}", demo.banner));
    let sdk: HashMap<&str, &str> = export
        .split_whitespace()
        .map(|kv| kv.split_once('=').expect("NAME=value"))
        .collect();
    // What Python's Client.from_env() and JS's loadProfileFromEnvironmentValues() need.
    let access = sdk.get("SCW_ACCESS_KEY").expect("SCW_ACCESS_KEY");
    assert!(
        access.len() == 20
            && access.starts_with("SCW")
            && access[3..].bytes().all(|b| b.is_ascii_alphanumeric()),
        "{access}"
    );
    assert_eq!(sdk.get("SCW_SECRET_KEY"), Some(&key.as_str()));
    assert_eq!(
        sdk.get("SCW_DEFAULT_ORGANIZATION_ID"),
        Some(&billing_sim::ORGANIZATION_ID)
    );
    assert_eq!(sdk.get("SCW_API_URL"), Some(&demo.base.as_str()));
    assert!(!demo.base.ends_with('/'));

    // As the SDK would call, with the organization it was given: the simulator's data.
    let r = demo
        .get(
            &format!(
                "/billing/v2beta1/invoices?organization_id={}",
                billing_sim::ORGANIZATION_ID
            ),
            &key,
        )
        .await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.expect("json");
    assert!(body["total_count"].as_u64().unwrap_or(0) > 0, "{body}");
    assert!(
        demo.log
            .lock()
            .expect("log")
            .iter()
            .any(|l| l.contains("SCW_SECRET_KEY") && l.contains("not used")),
        "the ignored settings are named in the log"
    );
}

#[tokio::test]
async fn demo_reloads_its_policy_folder_on_sighup_and_keeps_its_sdk_key() {
    let policy = TempPolicy::copy_of_policies();
    let mut demo = Demo::start(&[("GATEWAY_POLICY_DIR", policy.path())]);
    let sdk_key = demo.var("GATEWAY_KEY");
    assert!(
        demo.banner.iter().any(|l| l.contains(policy.path())),
        "the banner names the policy folder: {:#?}",
        demo.banner
    );
    // SIGHUP as soon as the banner is out: taken, not the end of the process.
    demo.signal("HUP");
    tokio::time::sleep(Duration::from_millis(300)).await;
    demo.assert_running();

    // The README's walkthrough: a new key's entry pasted into a policy file, then SIGHUP.
    let key = uuid::Uuid::new_v4();
    let consumptions = "/billing/v2beta1/consumptions?page_size=1";
    assert_eq!(demo.get(consumptions, &key.to_string()).await.status(), 401);
    std::fs::write(
        policy.0.path().join("scripts.toml"),
        format!(
            "[[keys]]\nname = \"nightly-report\"\nsha256 = \"{}\"\nroles = [\"billing-read-only\"]\n",
            key_sha256(&key)
        ),
    )
    .expect("write");
    demo.signal("HUP");
    eventually("the new key is accepted", || async {
        demo.get(consumptions, &key.to_string()).await.status() == 200
    })
    .await;
    demo.assert_running();
    assert!(
        demo.log
            .lock()
            .expect("log")
            .iter()
            .any(|l| l.contains("SIGHUP: re-reading the policy folder")),
        "SIGHUP is logged as a reload"
    );

    // The demo's own key survives the reload, still with every permission.
    let who: Value = demo
        .get("/gateway/v1/whoami", &sdk_key)
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(who["subject"], "demo-sdk");
    assert_eq!(
        demo.get("/billing/v2beta1/invoices", &sdk_key)
            .await
            .status(),
        200
    );

    // SIGTERM stops it, like `serve`: gracefully, exit 0.
    demo.signal("TERM");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = demo.child.try_wait().expect("try_wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "still running after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn demo_honours_the_cors_setting() {
    let origin = "https://costs.example.com";
    let demo = Demo::start(&[("GATEWAY_CORS_ORIGINS", origin)]);
    let r = client()
        .request(
            reqwest::Method::OPTIONS,
            format!("{}/billing/v2beta1/consumptions", demo.base),
        )
        .header("origin", origin)
        .header("access-control-request-method", "GET")
        .header("access-control-request-headers", "authorization")
        .send()
        .await
        .expect("preflight");
    assert!(r.status().is_success(), "{}", r.status());
    assert_eq!(
        r.headers()
            .get("access-control-allow-origin")
            .and_then(|v| v.to_str().ok()),
        Some(origin)
    );
}

/// A plain client; reqwest needs the process's one crypto provider installed first.
fn client() -> reqwest::Client {
    billing_gateway::install_crypto_provider();
    reqwest::Client::new()
}

/// The banner's `costs` lines answer from the simulated organization: every project it bills,
/// the budget the demo sets, and the same figures as Prometheus text for the gateway key.
#[tokio::test]
async fn demo_prints_costs_lines_that_answer_with_its_budget() {
    let demo = Demo::start(&[]);
    let production = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee";
    assert!(
        demo.banner.iter().any(|l| l.contains("/gateway/v1/costs'")),
        "{:#?}",
        demo.banner
    );
    assert!(
        demo.banner
            .iter()
            .any(|l| l.starts_with("Budget:") && l.contains(production))
    );

    let r = demo.get("/gateway/v1/costs", &demo.var("READ_ONLY")).await;
    assert_eq!(r.status(), 200);
    let costs: Value = r.json().await.expect("json");
    let projects = costs["projects"].as_array().expect("projects");
    assert_eq!(projects.len(), 3, "{costs}");
    let nanos = |m: &Value| {
        i128::from(m["units"].as_i64().expect("units")) * 1_000_000_000
            + i128::from(m["nanos"].as_i64().expect("nanos"))
    };
    let sum: i128 = projects.iter().map(|p| nanos(&p["total"])).sum();
    assert_eq!(sum, nanos(&costs["total"]));
    let budgeted = projects
        .iter()
        .find(|p| p["project_id"] == production)
        .expect("production");
    assert_eq!(budgeted["budget"]["monthly"]["units"], 250);

    let text = client()
        .get(format!("{}/gateway/v1/costs/metrics", demo.base))
        .bearer_auth(demo.var("GATEWAY_KEY"))
        .send()
        .await
        .expect("request")
        .text()
        .await
        .expect("text");
    assert!(
        text.contains(&format!(
            "billing_gateway_budget{{project_id=\"{production}\",currency_code=\"EUR\"}} 250\n"
        )),
        "{text}"
    );
}
