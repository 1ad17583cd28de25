//! The real binary, `serve`, as a process of its own: for what only a process shows (its
//! resident memory, dying by SIGKILL in the middle of a fetch). Killed when dropped.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use serde_json::Value;

use super::{HS256, ORG, SECRET_KEY};

pub struct Served {
    pub child: Child,
    pub base: String,
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
        let mut child = Command::new(env!("CARGO_BIN_EXE_billing-gateway"))
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
        let addr = loop {
            let line = lines
                .next()
                .expect("the gateway logs before exiting")
                .expect("log line");
            let Ok(event) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if event["message"] == "billing-gateway listening" {
                break event["addr"].as_str().expect("addr").to_owned();
            }
        };
        // Keep draining the log so the gateway never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Served {
            child,
            base: format!("http://{addr}"),
        }
    }
}
