//! What `check` and `serve` say about identity settings before any token arrives: the warning
//! about an identity provider with no audience to require (contract §4), and `check` running
//! the policy case of a binding on a namespaced (Auth0) claim.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};

const ORG: &str = "11111111-2222-3333-4444-555555555555";
const SECRET_KEY: &str = "5ec7e7ca-fe00-4bad-9000-00000000beef";
const NO_AUDIENCE: &str = "GATEWAY_JWT_AUDIENCE is not set";

fn gateway(command: &str, settings: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_billing-gateway"));
    cmd.arg(command)
        .env_clear()
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("SCW_SECRET_KEY", SECRET_KEY)
        .env("SCW_DEFAULT_ORGANIZATION_ID", ORG)
        .envs(settings.iter().copied());
    cmd
}

fn check(settings: &[(&str, &str)]) -> Output {
    gateway("check", settings).output().expect("check runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn check_warns_when_an_identity_provider_has_no_audience_to_require() {
    let jwks = ("GATEWAY_JWKS_URL", "https://idp.example/keys");
    let issuer = ("GATEWAY_JWT_ISSUER", "https://idp.example/realms/acme");
    for settings in [&[jwks][..], &[issuer]] {
        let out = check(settings);
        let stderr = text(&out.stderr);
        assert!(out.status.success(), "a warning, not a problem: {stderr}");
        let warning = stderr
            .lines()
            .find(|l| l.contains(NO_AUDIENCE))
            .unwrap_or_else(|| panic!("no audience warning: {stderr}"));
        assert!(warning.starts_with("warning: "), "{warning}");
        assert!(warning.contains("any application"), "{warning}");
    }
    let audience = ("GATEWAY_JWT_AUDIENCE", "billing-gateway");
    let out = check(&[jwks, audience]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!text(&out.stderr).contains(NO_AUDIENCE));
    // HS256 alone: the gateway mints or shares those tokens itself; nothing to say.
    let out = check(&[(
        "GATEWAY_JWT_HS256_SECRET",
        "check-test-hs256-secret-0123456789abcdef",
    )]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!text(&out.stderr).contains(NO_AUDIENCE));
}

/// `serve`'s log lines up to "listening" (its JWKS is refused: it starts all the same).
fn serve_start_log(settings: &[(&str, &str)]) -> Vec<String> {
    let mut child = gateway("serve", settings)
        .env("GATEWAY_LISTEN", "127.0.0.1:0")
        .env("GATEWAY_JWKS_URL", "http://127.0.0.1:9/jwks")
        .env("GATEWAY_LOG_FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("serve starts");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = Vec::new();
    for line in BufReader::new(stderr).lines() {
        let line = line.expect("log line");
        let listening = line.contains("billing-gateway listening");
        lines.push(line);
        if listening {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        lines.last().is_some_and(|l| l.contains("listening")),
        "{lines:?}"
    );
    lines
}

#[test]
fn serve_warns_at_start_when_an_identity_provider_has_no_audience_to_require() {
    let lines = serve_start_log(&[]);
    let warning = lines
        .iter()
        .find(|l| l.contains(NO_AUDIENCE))
        .unwrap_or_else(|| panic!("no audience warning: {lines:?}"));
    assert!(warning.contains("\"level\":\"WARN\""), "{warning}");

    let lines = serve_start_log(&[("GATEWAY_JWT_AUDIENCE", "billing-gateway")]);
    assert!(!lines.iter().any(|l| l.contains(NO_AUDIENCE)), "{lines:?}");
}

#[test]
fn check_runs_the_case_of_a_binding_on_a_namespaced_claim() {
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::create_dir(dir.path().join("tests")).expect("tests folder");
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/default.toml");
    std::fs::copy(shipped, dir.path().join("default.toml")).expect("copy");
    std::fs::write(
        dir.path().join("tests/auth0.toml"),
        r#"[[cases]]
name = "an Auth0 manager lists invoices"
claims = '{"https://billing.example.com/roles": ["billing-manager"]}'
path = "/billing/v2beta1/invoices"
expect = "allow"
"#,
    )
    .expect("cases");
    let hs256 = (
        "GATEWAY_JWT_HS256_SECRET",
        "check-test-hs256-secret-0123456789abcdef",
    );
    let policy_dir = dir.path().to_str().expect("utf-8 path").to_owned();
    let settings = [hs256, ("GATEWAY_POLICY_DIR", policy_dir.as_str())];

    // Without a binding on that claim, the case fails, naming itself.
    let out = check(&settings);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("case 1 (an Auth0 manager lists invoices): expected allow, got deny"),
        "{stderr}"
    );

    std::fs::write(
        dir.path().join("auth0.toml"),
        "[[bindings]]\nclaim = \"https://billing.example.com/roles\"\nequals = \"billing-manager\"\nroles = [\"billing-manager\"]\n",
    )
    .expect("binding");
    let out = check(&settings);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("1 policy test cases passed"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn check_refuses_an_idp_ca_file_that_holds_no_certificate() {
    let dir = tempfile::tempdir().expect("tmp");
    let not_pem = dir.path().join("ca.pem");
    std::fs::write(&not_pem, "not a certificate\n").expect("write");
    let missing = dir.path().join("missing.pem");
    let settings = |ca: &Path| {
        vec![
            ("GATEWAY_JWKS_URL", "https://idp.example/keys".to_owned()),
            ("GATEWAY_JWT_AUDIENCE", "billing-gateway".to_owned()),
            ("GATEWAY_IDP_CA_FILE", ca.display().to_string()),
        ]
    };
    for ca in [&not_pem, &missing] {
        let owned = settings(ca);
        let env: Vec<(&str, &str)> = owned.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let out = check(&env);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("GATEWAY_IDP_CA_FILE") && stderr.contains(&ca.display().to_string()),
            "{stderr}"
        );
    }
}
