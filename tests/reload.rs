//! Hot reload of the policy folder, observed through requests: a valid edit takes effect while
//! the gateway serves, a broken one is logged and changes nothing, and a Kubernetes-style
//! symbolic-link swap is seen.

mod common;

use std::path::Path;
use std::time::Duration;

use billing_gateway::policy::reload::{DEFAULT_POLL, Reload};
use common::*;
use serde_json::json;
use wiremock::Mock;
use wiremock::matchers::{method, path};

const ROLES: &str = r#"
[roles.billing-read-only]
permissions = ["consumption:read"]

[roles.billing-manager]
permissions = ["consumption:read", "invoices:read"]

[[bindings]]
claim = "roles"
equals = "billing-read-only"
roles = ["billing-read-only"]
"#;

/// `ROLES` plus the binding that lets managers read invoices.
fn with_managers() -> String {
    format!(
        "{ROLES}\n[[bindings]]\nclaim = \"roles\"\nequals = \"billing-manager\"\nroles = [\"billing-manager\"]\n"
    )
}

/// Line 4 names a role nobody defined.
const BROKEN: &str =
    "[[bindings]]\nclaim = \"groups\"\nequals = \"x\"\nroles = [\"billing-admin\"]\n";

const FAST: Duration = Duration::from_millis(50);
const NEVER: Duration = Duration::from_secs(3600);

/// A gateway reading `builder`'s policy folder, in front of an upstream that lists invoices.
async fn start(builder: TestAppBuilder<'_>) -> TestApp {
    let app = builder.spawn().await;
    Mock::given(method("GET"))
        .and(path("/billing/v2beta1/invoices"))
        .respond_with(ok_json(json!({"invoices": []})))
        .mount(&app.upstream)
        .await;
    app
}

/// The status a manager token gets for `GET /billing/v2beta1/invoices`.
async fn manager_invoices(app: &TestApp) -> u16 {
    app.get("/billing/v2beta1/invoices", &app.manager())
        .await
        .status()
        .as_u16()
}

/// Asks until the answer is `status` (the watcher polls every [`FAST`]); fails past
/// [`PATIENCE`].
async fn until_status(app: &TestApp, status: u16) {
    eventually(|| async { manager_invoices(app).await == status }, PATIENCE).await;
}

/// Replaces a file the way editors and config tools do: a new file renamed over the old one.
fn write(file: &Path, text: &str) {
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, file).expect("rename");
}

#[tokio::test]
async fn a_valid_edit_takes_effect_while_serving() {
    let app = start(
        TestApp::builder()
            .policy(&[("policy.toml", ROLES)])
            .poll(FAST),
    )
    .await;
    assert_eq!(manager_invoices(&app).await, 403);

    write(&app.policy_dir().join("policy.toml"), &with_managers());
    // Within a few of the app's polls: well before the default poll would have seen it, so the
    // interval the app was given is the one it runs with.
    eventually(
        || async { manager_invoices(&app).await == 200 },
        DEFAULT_POLL / 2,
    )
    .await;
    assert_eq!(
        app.upstream_requests().await.len(),
        1,
        "a 403 went upstream"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_broken_edit_is_logged_once_and_the_last_good_policy_stays() {
    let (logs, _capture) = capture_logs("info");
    let app = start(
        TestApp::builder()
            .policy(&[("policy.toml", &with_managers())])
            .poll(FAST),
    )
    .await;
    let dir = app.policy_dir();
    assert_eq!(manager_invoices(&app).await, 200);

    write(&dir.join("team.toml"), BROKEN);
    let rejected = "team.toml:4: unknown role `billing-admin`";
    eventually(|| async { logs.text().contains(rejected) }, PATIENCE).await;
    let text = logs.text();
    let line = text
        .lines()
        .find(|l| l.contains(rejected))
        .unwrap_or_else(|| panic!("the broken edit was not logged: {text}"));
    assert!(
        line.contains("ERROR") && line.contains("last good policy stays"),
        "{line}"
    );
    assert_eq!(
        manager_invoices(&app).await,
        200,
        "the good policy was lost"
    );
    // Already seen: neither re-applied nor logged again.
    assert!(matches!(app.policy().reload(), Reload::Unchanged));
    assert_eq!(logs.text().matches(rejected).count(), 1);

    // Fixing the file (here: removing it) is picked up like any edit.
    std::fs::remove_file(dir.join("team.toml")).expect("rm");
    write(&dir.join("policy.toml"), ROLES);
    until_status(&app, 403).await;
    assert!(logs.text().contains("policy reloaded"));
    app.stop().await;
}

/// What SIGHUP runs, called directly: the edit applies before `reload` returns.
#[tokio::test]
async fn reload_applies_a_valid_edit_at_once_and_rejects_a_broken_one() {
    // No poll tick in the test's lifetime: every change below is `reload`'s doing.
    let app = start(
        TestApp::builder()
            .policy(&[("policy.toml", ROLES)])
            .poll(NEVER),
    )
    .await;
    let dir = app.policy_dir().to_owned();
    assert!(matches!(app.policy().reload(), Reload::Unchanged));
    assert_eq!(manager_invoices(&app).await, 403);
    let summary = || app.policy().load().summary();
    assert_eq!(summary(), "roles: 2, bindings: 1, keys: 0");

    write(&dir.join("policy.toml"), &with_managers());
    assert!(matches!(app.policy().reload(), Reload::Applied));
    assert_eq!(manager_invoices(&app).await, 200);
    assert_eq!(
        summary(),
        "roles: 2, bindings: 2, keys: 0",
        "what is enforced"
    );

    write(&dir.join("team.toml"), BROKEN);
    match app.policy().reload() {
        Reload::Rejected(e) => assert_eq!(
            e.to_string(),
            format!(
                "{}:4: unknown role `billing-admin`",
                dir.join("team.toml").display()
            )
        ),
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert_eq!(manager_invoices(&app).await, 200);

    // An unreadable folder is no policy change either.
    std::fs::remove_dir_all(&dir).expect("rm");
    assert!(matches!(app.policy().reload(), Reload::Rejected(_)));
    assert_eq!(manager_invoices(&app).await, 200);
    app.stop().await;
}

#[cfg(unix)]
fn symlink(target: &str, link: &Path) {
    std::os::unix::fs::symlink(target, link).expect("symlink");
}

/// Points `link` at `target` atomically: a new link renamed over the old one.
#[cfg(unix)]
fn swap(link: &Path, target: &str) {
    let tmp = link.with_file_name(format!("{}_tmp", uuid::Uuid::new_v4()));
    symlink(target, &tmp);
    std::fs::rename(&tmp, link).expect("rename");
}

#[cfg(unix)]
#[tokio::test]
async fn a_swapped_policy_folder_link_is_picked_up() {
    let root = tempfile::tempdir().expect("tmp");
    let root = root.path();
    for (version, text) in [("v1", ROLES.to_owned()), ("v2", with_managers())] {
        std::fs::create_dir(root.join(version)).expect("mkdir");
        write(&root.join(version).join("policy.toml"), &text);
    }
    symlink("v1", &root.join("current"));
    let app = start(
        TestApp::builder()
            .policy_dir(root.join("current"))
            .poll(FAST),
    )
    .await;
    assert_eq!(manager_invoices(&app).await, 403);

    swap(&root.join("current"), "v2");
    until_status(&app, 200).await;
    app.stop().await;
}

/// How Kubernetes mounts a ConfigMap: each file is a link into `..data`, itself a link to a
/// timestamped folder; an update writes a new folder and swaps `..data`.
#[cfg(unix)]
#[tokio::test]
async fn a_kubernetes_configmap_update_is_picked_up() {
    let dir = tempfile::tempdir().expect("tmp");
    let dir = dir.path();
    for (version, text) in [
        ("..2026_07_01_v1", ROLES.to_owned()),
        ("..2026_07_02_v2", with_managers()),
    ] {
        std::fs::create_dir(dir.join(version)).expect("mkdir");
        write(&dir.join(version).join("policy.toml"), &text);
    }
    symlink("..2026_07_01_v1", &dir.join("..data"));
    symlink("..data/policy.toml", &dir.join("policy.toml"));
    let app = start(TestApp::builder().policy_dir(dir).poll(FAST)).await;
    assert_eq!(manager_invoices(&app).await, 403);

    swap(&dir.join("..data"), "..2026_07_02_v2");
    until_status(&app, 200).await;
    app.stop().await;
}
