//! The real binary, `serve`, as a process of its own: for what only a process shows (its
//! resident memory, dying by SIGKILL in the middle of a fetch, its descriptors and their limit).
//! Killed when dropped.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use serde_json::Value;

use super::{HS256, ORG, SECRET_KEY};

pub struct Served {
    pub child: Child,
    pub base: String,
    /// Every line the gateway has logged so far.
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Served {
    /// `serve` in front of `upstream`, with the tests' key, organization and HS256 secret,
    /// rates far above what a test sends and JSON logs; `settings` add to its environment.
    /// Returns once it listens.
    pub fn start(upstream: &str, settings: &[(&str, &str)]) -> Served {
        Served::spawn(
            Command::new(env!("CARGO_BIN_EXE_billing-gateway")),
            upstream,
            settings,
        )
    }

    /// [`Served::start`] with an open-files limit of `open_files`, soft and hard (so the gateway
    /// cannot raise it), set by `prlimit` before it runs the binary.
    pub fn start_with_open_files(
        upstream: &str,
        settings: &[(&str, &str)],
        open_files: u64,
    ) -> Served {
        let mut prlimit = Command::new("prlimit");
        prlimit
            .arg(format!("--nofile={open_files}:{open_files}"))
            .arg("--")
            .arg(env!("CARGO_BIN_EXE_billing-gateway"));
        Served::spawn(prlimit, upstream, settings)
    }

    fn spawn(mut command: Command, upstream: &str, settings: &[(&str, &str)]) -> Served {
        let mut child = command
            .arg("serve")
            .env_clear()
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("SCW_SECRET_KEY", SECRET_KEY)
            .env("SCW_DEFAULT_ORGANIZATION_ID", ORG)
            .env("SCW_API_URL", upstream)
            .env("GATEWAY_LISTEN", "127.0.0.1:0")
            .env("GATEWAY_JWT_HS256_SECRET", HS256)
            .env("GATEWAY_PRINCIPAL_RATE", "100000/s")
            .env("GATEWAY_UPSTREAM_RATE", "100000/s")
            .env("GATEWAY_LOG_FORMAT", "json")
            .env("RUST_LOG", "warn,billing_gateway::cli=info")
            .envs(settings.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the binary starts");
        let stderr = child.stderr.take().expect("stderr");
        let mut lines = BufReader::new(stderr).lines();
        let log = Arc::new(Mutex::new(Vec::new()));
        let addr = loop {
            let line = lines
                .next()
                .expect("the gateway logs before exiting")
                .expect("log line");
            log.lock().expect("log").push(line.clone());
            let Ok(event) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if event["message"] == "billing-gateway listening" {
                break event["addr"].as_str().expect("addr").to_owned();
            }
        };
        // Keep draining the log so the gateway never blocks on a full pipe.
        let kept = log.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                kept.lock().expect("log").push(line);
            }
        });
        Served {
            child,
            base: format!("http://{addr}"),
            log,
        }
    }
}
