//! Issue 20 §2 g–h, on the real binary: `check` refuses the shipped placeholder secrets, and
//! `serve` refuses exactly what `check` does, with the same lines, all at once.

use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_billing-gateway");
const ORG: &str = "11111111-2222-3333-4444-555555555555";

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_clear()
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .envs(env.iter().copied())
        .output()
        .expect("the binary runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The value of `key: "..."` in a shipped manifest.
fn shipped(manifest: &str, key: &str) -> String {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("deploy/kubernetes")
            .join(manifest),
    )
    .expect("manifest");
    text.lines()
        .find_map(|l| l.trim().strip_prefix(&format!("{key}: ")))
        .map(|v| v.trim_matches('"').to_owned())
        .unwrap_or_else(|| panic!("{key} in {manifest}"))
}

/// §2g: the secrets `deploy/kubernetes/secret.yaml` and `redis.yaml` ship, applied as-is, are
/// refused, each naming its variable and none echoed; so are obviously weak values.
#[test]
fn check_refuses_the_shipped_placeholder_secrets_naming_each_variable() {
    let key = shipped("secret.yaml", "SCW_SECRET_KEY");
    let hs256 = shipped("secret.yaml", "GATEWAY_JWT_HS256_SECRET");
    let redis = shipped("redis.yaml", "url");
    let placeholders = [
        ("SCW_SECRET_KEY", key.as_str()),
        ("SCW_DEFAULT_ORGANIZATION_ID", ORG),
        ("GATEWAY_JWT_HS256_SECRET", hs256.as_str()),
        ("GATEWAY_REDIS_URL", redis.as_str()),
    ];
    let out = run(&["check"], &placeholders);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    for name in [
        "SCW_SECRET_KEY:",
        "GATEWAY_JWT_HS256_SECRET:",
        "GATEWAY_REDIS_URL:",
    ] {
        assert!(err.contains(name), "{name} not named: {err}");
    }
    // And, the HS256 secret refused, no way left to authenticate callers.
    assert!(err.contains("4 problems found"), "{err}");
    let password = redis
        .split_once("billing-gateway:")
        .and_then(|(_, rest)| rest.split_once('@'))
        .expect("a password")
        .0;
    assert!(
        !err.contains(&hs256) && !err.contains(password),
        "a secret is echoed: {err}"
    );

    let weak = [
        ("SCW_SECRET_KEY", "11111111-1111-1111-1111-111111111111"),
        ("SCW_DEFAULT_ORGANIZATION_ID", ORG),
        (
            "GATEWAY_JWT_HS256_SECRET",
            "secretsecretsecretsecretsecretsecret",
        ),
        ("GATEWAY_REDIS_URL", "redis://:hunter2@127.0.0.1:1"),
    ];
    let err = stderr(&run(&["check"], &weak));
    assert!(err.contains("4 problems found"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
}

/// §2h: with nothing set, and with many bad settings at once, `serve` lists exactly the lines
/// `check` lists (every problem, the missing authentication included), and ends the same way.
#[test]
fn serve_lists_every_problem_at_once_exactly_as_check_does() {
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("gateway.toml");
    std::fs::write(
        &file,
        "listen = \"nowhere\"\n[cache]\nttl = \"5 minutes\"\nmax_bytes = \"lots\"\n",
    )
    .expect("write");
    let config = file.to_str().expect("utf-8");
    let many = [
        ("SCW_SECRET_KEY", "not-a-key"),
        ("SCW_DEFAULT_ORGANIZATION_ID", "nope"),
        ("SCW_API_URL", "ftp://x"),
        ("GATEWAY_JWT_HS256_SECRET", "short"),
        ("GATEWAY_JWT_LEEWAY", "a while"),
        ("GATEWAY_CACHE_CLOSED_TTL", "forever"),
        ("GATEWAY_CACHE_STALE_IF_ERROR", "-1"),
        ("GATEWAY_UPSTREAM_TIMEOUT", "soon"),
        ("GATEWAY_UPSTREAM_RATE", "fast"),
        ("GATEWAY_PRINCIPAL_RATE", "slow"),
        ("GATEWAY_LOG_FORMAT", "xml"),
        ("GATEWAY_REDIS_TIMEOUT", "0s"),
        ("GATEWAY_POLICY_DIR", "/nonexistent/policies"),
    ];
    for (env, args) in [(&[][..], vec![]), (&many[..], vec!["--config", config])] {
        let serve = run(&[&["serve"][..], &args].concat(), env);
        let check = run(&[&["check"][..], &args].concat(), env);
        assert_eq!(serve.status.code(), Some(1), "{}", stderr(&serve));
        assert_eq!(check.status.code(), Some(1), "{}", stderr(&check));
        assert_eq!(stderr(&serve), stderr(&check));
        let lines = stderr(&serve).lines().count();
        let last = stderr(&serve).lines().last().unwrap_or("").to_owned();
        assert_eq!(last, format!("error: {} problems found", lines - 1));
        if env.is_empty() {
            // The key, the organization, and no way to authenticate callers.
            assert_eq!(lines - 1, 3, "{}", stderr(&serve));
        } else {
            // One line per bad setting: 12 variables, 3 file keys and the policy folder.
            assert_eq!(lines - 1, 16, "{}", stderr(&serve));
        }
    }
}
