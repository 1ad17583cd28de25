//! `billing-gateway check` runs the policy test cases in `<policy dir>/tests/` and fails, like
//! `opa test`, naming each case that does not behave as it says.

use std::path::Path;
use std::process::{Command, Output};

use tempfile::TempDir;

const ORG: &str = "11111111-2222-3333-4444-555555555555";

/// `check` with what `serve` needs (it vouches for `serve`), plus `extra_env`.
fn check(policy_dir: Option<&Path>, extra_env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_billing-gateway"));
    cmd.arg("check")
        .env_clear()
        .env("SCW_SECRET_KEY", "5ec7e7ca-fe00-4bad-9000-00000000beef")
        .env("SCW_DEFAULT_ORGANIZATION_ID", ORG)
        .env(
            "GATEWAY_JWT_HS256_SECRET",
            "check-test-hs256-secret-0123456789abcdef",
        )
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    if let Some(dir) = policy_dir {
        cmd.env("GATEWAY_POLICY_DIR", dir);
    }
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    cmd.output().expect("the binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A policy folder with the shipped default.toml and `tests/cases.toml`.
/// Removed when dropped.
fn folder_with_cases(cases: &str) -> TempDir {
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::create_dir(dir.path().join("tests")).expect("tests folder");
    let default = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/default.toml");
    std::fs::copy(default, dir.path().join("default.toml")).expect("copy");
    std::fs::write(dir.path().join("tests/cases.toml"), cases).expect("write");
    dir
}

#[test]
fn the_shipped_policies_pass_their_cases() {
    let out = check(None, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("14 policy test cases passed (policies/tests)"),
        "{}",
        text(&out.stdout)
    );

    // The same cases pass with another organization configured: `{organization_id}` follows it.
    let out = check(
        None,
        &[(
            "SCW_DEFAULT_ORGANIZATION_ID",
            "22222222-3333-4444-5555-666666666666",
        )],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));

    let out = check(Some(Path::new("policies/examples")), &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("24 policy test cases passed (policies/examples/tests)"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn a_failing_case_fails_check_with_its_file_name_and_reason() {
    let dir = folder_with_cases(
        r#"[[cases]]
name = "read-only reads invoices"
claims = { roles = ["billing-read-only"] }
path = "/billing/v2beta1/invoices"
expect = "allow"

[[cases]]
claims = { roles = ["billing-read-only"] }
path = "/billing/v2beta1/consumptions"
expect = "allow"
upstream = "/billing/v2beta1/consumptions?organization_id={organization_id}"

[[cases]]
claims = { roles = ["billing-manager"] }
path = "/billing/v2beta1/consumptions"
expect = "allow"
upstream = "/billing/v2beta1/consumptions?project_id=aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
"#,
    );
    let out = check(Some(dir.path()), &[]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let file = dir.path().join("tests/cases.toml");
    assert!(
        stderr.contains(&format!(
            "{}:1: case 1 (read-only reads invoices): expected allow, got deny: permission `invoices:read` is required",
            file.display()
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "{}:13: case 3: allowed, but the upstream request is `/billing/v2beta1/consumptions?organization_id={ORG}`",
            file.display()
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("case 2"), "{stderr}");
    assert!(
        stderr.contains("2 of 3 policy test cases failed"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"));
}

#[test]
fn a_malformed_case_file_is_located() {
    let dir = folder_with_cases(
        "[[cases]]\nclaims = {}\npath = \"/billing/v2beta1/taxes\"\nexpect = \"allow\"\nupstrem = \"/x\"\n",
    );
    let out = check(Some(dir.path()), &[]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{}:5:",
            dir.path().join("tests/cases.toml").display()
        )) && stderr.contains("upstrem"),
        "{stderr}"
    );
}
