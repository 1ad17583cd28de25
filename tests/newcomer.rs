//! Issue 20 §3, tried as a new user would, on the real binary and the shipped files: the
//! README's "Trying it" block, the `key new` walkthrough from an empty folder, the demo's banner
//! under another policy folder, and the Kubernetes manifests against the README.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_billing-gateway");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(path)).expect(path)
}

/// A running `demo --listen 127.0.0.1:0` and its banner; killed when dropped.
struct Demo {
    child: Child,
    base: String,
    banner: Vec<String>,
    vars: HashMap<String, String>,
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Demo {
    fn start(dir: &Path, env: &[(&str, &str)]) -> Demo {
        let mut child = Command::new(BIN)
            .args(["demo", "--listen", "127.0.0.1:0"])
            .current_dir(dir)
            .env_clear()
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("demo starts");
        let stderr = child.stderr.take().expect("stderr");
        std::thread::spawn(move || for _ in BufReader::new(stderr).lines() {});
        let mut banner = Vec::new();
        for line in BufReader::new(child.stdout.take().expect("stdout")).lines() {
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
            .unwrap_or_else(|| panic!("no banner: {banner:#?}"))
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
        }
    }

    /// The banner's `curl` lines as (header, token, URL, status the line's comment promises).
    fn curls(&self) -> Vec<(String, String, String, u16)> {
        self.banner
            .iter()
            .filter(|l| l.starts_with("curl "))
            .map(|l| {
                let quoted: Vec<&str> = l.split('"').collect();
                let (header, value) = quoted[1].split_once(": ").expect("a header");
                let var = value.rsplit_once('$').expect("a variable").1;
                let url = l.split('\'').nth(1).expect("a quoted URL");
                let status = if l.contains("# 403") { 403 } else { 200 };
                (
                    header.to_owned(),
                    self.vars[var].clone(),
                    url.to_owned(),
                    status,
                )
            })
            .collect()
    }
}

async fn get(url: &str, header: &str, value: &str) -> reqwest::Response {
    billing_gateway::install_crypto_provider();
    let value = match header {
        "Authorization" => format!("Bearer {value}"),
        _ => value.to_owned(),
    };
    reqwest::Client::new()
        .get(url)
        .header(header, value)
        .send()
        .await
        .expect("request")
}

/// The README's "Trying it" block never starts a demo while another runs: each listens on
/// 127.0.0.1:8080, and a second dies on "Address already in use" while the curl lines after it
/// reach the first.
#[test]
fn the_readme_trying_it_block_runs_one_demo_at_a_time() {
    let readme = read("README.md");
    let section = readme
        .split_once("## Trying it")
        .expect("the section")
        .1
        .split_once("\n## ")
        .expect("its end")
        .0;
    let block = section
        .split_once("```sh\n")
        .expect("the block")
        .1
        .split_once("```")
        .expect("its end")
        .0;
    let mut running = 0;
    let mut demos = 0;
    for line in block
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
    {
        if line.contains("billing-gateway demo") {
            assert_eq!(running, 0, "a demo starts while another runs: {line}");
            assert!(line.ends_with('&'), "the block goes on after it: {line}");
            running += 1;
            demos += 1;
        } else if line == "kill %1" {
            assert_eq!(running, 1, "nothing to stop");
            running -= 1;
        } else if line.starts_with("curl ") {
            assert_eq!(running, 1, "a curl line with no demo running: {line}");
        }
    }
    assert_eq!(running, 0, "the block leaves a demo running");
    assert_eq!(demos, 3);
}

/// `key new`, as the README walks through it, from a folder with no `policies/`: the demo
/// writes the built-in policy there, `key new` checks its entry against it, the pasted entry is
/// in force without a restart, and the demo starts again on the same folder with the key.
#[tokio::test]
async fn the_key_new_walkthrough_works_from_an_empty_folder_and_survives_a_restart() {
    let dir = tempfile::tempdir().expect("tmp");
    let demo = Demo::start(dir.path(), &[]);
    let written = std::fs::read_to_string(dir.path().join("policies/default.toml"))
        .expect("the built-in policy written out");
    assert_eq!(written, read("policies/default.toml"));

    let key_new = Command::new(BIN)
        .args([
            "key",
            "new",
            "--name",
            "my-script",
            "--roles",
            "billing-read-only",
        ])
        .current_dir(dir.path())
        .env_clear()
        .output()
        .expect("key new runs");
    let stdout = String::from_utf8_lossy(&key_new.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&key_new.stderr).into_owned();
    assert!(key_new.status.success(), "{stderr}");
    assert!(!stderr.contains("not checked"), "{stderr}");
    let key = stdout
        .lines()
        .map(str::trim)
        .find(|l| l.len() == 36 && l.matches('-').count() == 4)
        .expect("the key")
        .to_owned();
    let entry = &stdout[stdout.find("[[keys]]").expect("the entry")..];
    std::fs::write(dir.path().join("policies/scripts.toml"), entry).expect("paste");

    let url = format!("{}/billing/v2beta1/consumptions?page_size=3", demo.base);
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(&url, "X-Auth-Token", &key).await.status() != 200 {
        assert!(
            Instant::now() < deadline,
            "the pasted key never took effect"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(demo);

    let again = Demo::start(dir.path(), &[]);
    let url = format!("{}/billing/v2beta1/consumptions?page_size=3", again.base);
    assert_eq!(get(&url, "X-Auth-Token", &key).await.status(), 200);
}

/// Every `curl` line of the banner answers what it says, with the shipped policy and under a
/// folder holding only `policies/examples/team-scoped.toml` (which binds `groups`, not the
/// `roles` claim: no line for the printed tokens then, and no `invoice.pdf` saved from a 403);
/// the JS hint names the package its function comes from.
#[tokio::test]
async fn every_banner_curl_line_answers_as_it_says_whatever_the_policy() {
    let groups_only = tempfile::tempdir().expect("tmp");
    std::fs::write(
        groups_only.path().join("team-scoped.toml"),
        read("policies/examples/team-scoped.toml"),
    )
    .expect("copy");
    for (env, lines) in [
        (vec![], 7),
        (
            vec![(
                "GATEWAY_POLICY_DIR",
                groups_only.path().to_str().expect("utf-8"),
            )],
            3,
        ),
    ] {
        let demo = Demo::start(Path::new(ROOT), &env);
        let curls = demo.curls();
        assert_eq!(curls.len(), lines, "{:#?}", demo.banner);
        for (header, token, url, status) in curls {
            let answer = get(&url, &header, &token).await;
            assert_eq!(answer.status().as_u16(), status, "{url} with {header}");
        }
        let js = demo
            .banner
            .iter()
            .find(|l| l.contains("loadProfileFromEnvironmentValues"))
            .expect("the JS hint");
        assert!(js.contains("@scaleway/configuration-loader"), "{js}");
        let package = read("sdk-tests/js/test.mjs");
        assert!(
            package.contains(
                "import { loadProfileFromEnvironmentValues } from '@scaleway/configuration-loader'"
            ),
            "the hint follows the SDK tests' import"
        );
    }
}

/// The value of `key:` on the first line holding it (quotes and list dashes dropped).
fn value_of<'a>(text: &'a str, key: &str) -> &'a str {
    text.lines()
        .map(|l| l.trim_start().trim_start_matches("- "))
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no `{key}:`"))
        .trim()
        .trim_matches('"')
}

/// The Deployment runs the image the README builds, starts without anything of `redis.yaml`,
/// and serves `/metrics` on the pod port Prometheus scrapes, which the Service does not expose.
#[test]
fn the_deployment_runs_the_readme_image_without_redis_and_keeps_metrics_off_the_service() {
    let deployment = read("deploy/kubernetes/deployment.yaml");
    let readme = read("README.md");
    let built = readme
        .lines()
        .find_map(|l| l.strip_prefix("docker build -t "))
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the README's docker build");
    assert_eq!(value_of(&deployment, "image"), built);

    let redis = read("deploy/kubernetes/redis.yaml");
    for name in redis
        .lines()
        .filter_map(|l| l.trim().strip_prefix("name: "))
        .filter(|n| n.starts_with("billing-gateway-redis"))
    {
        assert!(
            !deployment.contains(name),
            "the Deployment needs {name} from redis.yaml"
        );
    }
    assert!(!deployment.contains("GATEWAY_REDIS"), "{deployment}");

    let listen = deployment
        .split_once("- name: GATEWAY_METRICS_LISTEN\n")
        .map(|(_, rest)| value_of(rest, "value"))
        .expect("GATEWAY_METRICS_LISTEN set");
    let port = listen.rsplit_once(':').expect("a port").1;
    assert_eq!(value_of(&deployment, "prometheus.io/port"), port);
    let ports = deployment
        .split_once("ports:\n")
        .expect("container ports")
        .1;
    assert_eq!(
        value_of(
            ports.split_once("- name: metrics\n").expect("metrics").1,
            "containerPort"
        ),
        port
    );
    let service = read("deploy/kubernetes/service.yaml");
    assert_eq!(value_of(&service, "targetPort"), "http");
    assert!(
        !service.contains(port) && !service.contains("metrics"),
        "{service}"
    );
}
