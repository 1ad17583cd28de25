//! The binary's commands: configuration errors are clear and non-zero, never a panic.

use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_billing-gateway");
const ORG: &str = "11111111-2222-3333-4444-555555555555";
const KEY: &str = "5ec7e7ca-fe00-4bad-9000-00000000beef";
const HS256: &str = "cli-test-hs256-secret-0123456789abcdef";

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_clear()
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("the binary runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// What `serve` needs to start with the shipped policy.
const SERVABLE: [(&str, &str); 3] = [
    ("SCW_SECRET_KEY", KEY),
    ("SCW_DEFAULT_ORGANIZATION_ID", ORG),
    ("GATEWAY_JWT_HS256_SECRET", HS256),
];

#[test]
fn check_accepts_the_shipped_policy() {
    let out = run(&["check"], &SERVABLE);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("billing-manager"));
}

#[test]
fn check_on_an_empty_environment_lists_every_missing_setting_in_one_run() {
    let out = run(&["check"], &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    for name in [
        "SCW_SECRET_KEY",
        "SCW_DEFAULT_ORGANIZATION_ID",
        // No way to authenticate callers: the shipped policy defines no [[keys]].
        "GATEWAY_JWT_HS256_SECRET",
        "GATEWAY_JWKS_URL",
    ] {
        assert!(err.contains(name), "{name} not named: {err}");
    }
    assert!(err.contains("3 problems found"), "{err}");
    assert!(!err.contains("configuration valid"), "{err}");
}

#[test]
fn check_lists_problems_from_the_environment_and_the_file_together() {
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("gateway.toml");
    std::fs::write(
        &file,
        "[upstream]\nrate = \"fast\"\n[cache]\nttl = \"5 minutes\"\n",
    )
    .expect("write");
    let out = run(
        &["check", "--config", file.to_str().expect("utf-8")],
        &[
            ("SCW_SECRET_KEY", KEY),
            ("GATEWAY_JWT_HS256_SECRET", HS256),
            ("GATEWAY_UPSTREAM_TIMEOUT", "soon"),
        ],
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let f = file.display();
    for expected in [
        "SCW_DEFAULT_ORGANIZATION_ID: missing".to_owned(),
        "GATEWAY_UPSTREAM_TIMEOUT: `soon` is not a duration".to_owned(),
        format!("{f}:2: upstream.rate: `fast` is not a rate"),
        format!("{f}:4: cache.ttl: `5 minutes` is not a duration"),
    ] {
        assert!(err.contains(&expected), "{expected}: {err}");
    }
}

#[test]
fn check_names_the_file_and_line_of_a_broken_policy() {
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::write(
        dir.path().join("team.toml"),
        "[roles.x]\ndescription = \"x\"\npermissions = [\"invoices:reed\"]\n",
    )
    .expect("write");
    let out = run(
        &["check"],
        &[("GATEWAY_POLICY_DIR", dir.path().to_str().expect("utf-8"))],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("team.toml:3: unknown permission `invoices:reed`"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn serve_fails_fast_on_missing_or_invalid_configuration() {
    let cases: [(&[(&str, &str)], &str); 5] = [
        (
            &[
                ("SCW_SECRET_KEY", KEY),
                ("SCW_DEFAULT_ORGANIZATION_ID", ORG),
            ],
            "no way to authenticate callers",
        ),
        (
            &[
                ("SCW_DEFAULT_ORGANIZATION_ID", ORG),
                ("GATEWAY_JWT_HS256_SECRET", HS256),
            ],
            "SCW_SECRET_KEY",
        ),
        (
            &[("SCW_SECRET_KEY", KEY), ("GATEWAY_JWT_HS256_SECRET", HS256)],
            "SCW_DEFAULT_ORGANIZATION_ID",
        ),
        (
            &[
                ("SCW_SECRET_KEY", KEY),
                ("SCW_DEFAULT_ORGANIZATION_ID", ORG),
                ("GATEWAY_JWT_HS256_SECRET", HS256),
                ("GATEWAY_UPSTREAM_TIMEOUT", "soon"),
            ],
            "GATEWAY_UPSTREAM_TIMEOUT",
        ),
        (
            &[
                ("SCW_SECRET_KEY", KEY),
                ("SCW_DEFAULT_ORGANIZATION_ID", ORG),
                ("GATEWAY_JWT_HS256_SECRET", HS256),
                ("GATEWAY_POLICY_DIR", "/nonexistent/policies"),
            ],
            "/nonexistent/policies",
        ),
    ];
    // `check` refuses exactly what `serve` refuses, naming the same thing.
    for (env, names) in cases {
        for command in ["serve", "check"] {
            let out = run(&[command], env);
            let err = stderr(&out);
            assert_eq!(out.status.code(), Some(1), "{command}: {err}");
            assert!(err.contains(names), "{command}: {names}: {err}");
            assert!(!err.contains("panicked") && !err.contains(KEY), "{err}");
        }
    }
}

#[test]
fn serve_refuses_an_unknown_config_file_key() {
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("gateway.toml");
    std::fs::write(
        &file,
        "listen = \"127.0.0.1:0\"\n[upstream]\nurl = \"http://x\"\nkey = \"oops\"\n",
    )
    .expect("write");
    let out = run(
        &["serve", "--config", file.to_str().expect("utf-8")],
        &[
            ("SCW_SECRET_KEY", KEY),
            ("SCW_DEFAULT_ORGANIZATION_ID", ORG),
            ("GATEWAY_JWT_HS256_SECRET", HS256),
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("gateway.toml:4"), "{}", stderr(&out));
}

#[test]
fn token_mints_a_verifiable_hs256_token() {
    let out = run(
        &[
            "token",
            "--roles",
            "billing-read-only,billing-manager",
            "--sub",
            "bob",
            "--claim",
            "groups=[\"a\"]",
            "--ttl",
            "5m",
        ],
        &[("GATEWAY_JWT_HS256_SECRET", HS256)],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let token = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.validate_aud = false;
    let data = jsonwebtoken::decode::<serde_json::Value>(
        &token,
        &jsonwebtoken::DecodingKey::from_secret(HS256.as_bytes()).expect("key"),
        &validation,
    )
    .expect("valid token");
    assert_eq!(data.claims["sub"], "bob");
    assert_eq!(
        data.claims["roles"],
        serde_json::json!(["billing-read-only", "billing-manager"])
    );
    assert_eq!(data.claims["groups"], serde_json::json!(["a"]));
    let ttl = data.claims["exp"].as_u64().unwrap_or(0) - data.claims["iat"].as_u64().unwrap_or(0);
    assert_eq!(ttl, 300);

    let out = run(
        &["token", "--roles", "x"],
        &[
            ("GATEWAY_JWT_HS256_SECRET", HS256),
            ("GATEWAY_JWT_ISSUER", "https://idp.example"),
            ("GATEWAY_JWT_AUDIENCE", "billing"),
        ],
    );
    let token = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let claims = jsonwebtoken::dangerous::insecure_decode::<serde_json::Value>(&token)
        .expect("decodes")
        .claims;
    assert_eq!(
        (claims["iss"].as_str(), claims["aud"].as_str()),
        (Some("https://idp.example"), Some("billing"))
    );

    let out = run(&["token", "--roles", "x"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("GATEWAY_JWT_HS256_SECRET"));
}

#[test]
fn simulate_serves_the_billing_api_to_its_key_only() {
    let out = run(&["simulate", "--listen", "127.0.0.1:0"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("SCW_SECRET_KEY"));

    let mut child = Command::new(BIN)
        .args(["simulate", "--listen", "127.0.0.1:0"])
        .env_clear()
        .env("SCW_SECRET_KEY", KEY)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("simulator starts");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().expect("stdout")),
        &mut line,
    )
    .expect("address line");
    let base = line.trim().rsplit(' ').next().expect("url").to_owned();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let (ok, refused) = runtime.block_on(async {
        billing_gateway::install_crypto_provider();
        let client = reqwest::Client::new();
        let url = format!("{base}/billing/v2beta1/taxes");
        let ok = client
            .get(&url)
            .header("x-auth-token", KEY)
            .send()
            .await
            .expect("request");
        let refused = client.get(&url).send().await.expect("request");
        (ok.status().as_u16(), refused.status().as_u16())
    });
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!((ok, refused), (200, 401));
}

#[test]
fn a_syntax_error_is_reported_where_the_unclosed_value_begins() {
    // The `]` missing at the end of line 3: the parser only notices at line 5's table header.
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    std::fs::write(
        dir.join("team.toml"),
        "[roles.x]\ndescription = \"x\"\npermissions = [\"consumption:read\"\n\n[[bindings]]\n\
         claim = \"groups\"\nequals = \"x\"\nroles = [\"x\"]\n",
    )
    .expect("write");
    let out = run(
        &["check"],
        &[
            SERVABLE[0],
            SERVABLE[1],
            SERVABLE[2],
            ("GATEWAY_POLICY_DIR", dir.to_str().expect("utf-8")),
        ],
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("team.toml:3: "), "{err}");
    assert!(err.contains("still open at line 5"), "{err}");

    let file = dir.join("gateway.toml");
    std::fs::write(
        &file,
        "listen = \"127.0.0.1:0\"\n[cors]\norigins = \"\"\"https://a.example\n\n[cache]\nttl = \"1m\"\n",
    )
    .expect("write");
    let out = run(
        &["check", "--config", file.to_str().expect("utf-8")],
        &SERVABLE,
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("gateway.toml:3: "), "{err}");
    assert!(err.contains("still open at the end of the file"), "{err}");
    assert!(!err.contains("gateway.toml:7"), "{err}");
}

#[test]
fn key_new_with_an_unknown_role_lists_the_roles_the_policy_defines() {
    let out = run(
        &[
            "key",
            "new",
            "--name",
            "ci",
            "--roles",
            "billing-admin,billing-read-only",
        ],
        &[],
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(
            "unknown role `billing-admin`; the policy folder (policies) defines: \
             billing-manager, billing-read-only"
        ),
        "{err}"
    );
    assert!(out.stdout.is_empty(), "no key printed on failure");
}

#[test]
fn check_validates_the_redis_settings_without_connecting_or_echoing_the_password() {
    let bad = [
        ("GATEWAY_REDIS_URL", "http://:hunter2@redis.billing:6379"),
        ("GATEWAY_REDIS_PREFIX", "two words"),
        ("GATEWAY_REDIS_TIMEOUT", "0s"),
        ("GATEWAY_REDIS_FALLBACK_REPLICAS", "none"),
        ("GATEWAY_REDIS_CA_FILE", "/nonexistent/redis-ca.pem"),
    ];
    let out = run(&["check"], &[&SERVABLE[..], &bad].concat());
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    for (name, _) in bad {
        assert!(err.contains(name), "{name} not named: {err}");
    }
    assert!(err.contains("5 problems found"), "{err}");
    assert!(!err.contains("hunter2"), "the password is echoed: {err}");

    // Well-formed: valid without connecting (nothing listens on ports 1 and 2): two nodes of a
    // Cluster, a CA to trust.
    let dir = tempfile::tempdir().expect("tmp");
    let ca = dir.path().join("redis-ca.pem");
    let cert = rcgen::generate_simple_self_signed(vec!["redis.example".to_owned()]).expect("cert");
    std::fs::write(&ca, cert.cert.pem()).expect("write the CA");
    let good = [
        (
            "GATEWAY_REDIS_URL",
            "rediss://:hunter2-but-long-9f3a1c@127.0.0.1:1/0,rediss://:hunter2-but-long-9f3a1c@127.0.0.1:2",
        ),
        ("GATEWAY_REDIS_CA_FILE", ca.to_str().expect("a path")),
        ("GATEWAY_REDIS_PREFIX", "billing-gateway:{staging}"),
        ("GATEWAY_REDIS_TIMEOUT", "250ms"),
        ("GATEWAY_REDIS_FALLBACK_REPLICAS", "4"),
    ];
    let out = run(&["check"], &[&SERVABLE[..], &good].concat());
    assert!(out.status.success(), "{}", stderr(&out));
    let all = format!("{}{}", stderr(&out), String::from_utf8_lossy(&out.stdout));
    assert!(!all.contains("hunter2"), "the password is echoed: {all}");
}
