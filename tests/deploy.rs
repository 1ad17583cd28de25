//! The Kubernetes manifests ship the same default policy as the repository.

#[test]
fn the_configmap_carries_the_default_policy_verbatim() {
    let root = env!("CARGO_MANIFEST_DIR");
    let policy = std::fs::read_to_string(format!("{root}/policies/default.toml")).expect("policy");
    let configmap = std::fs::read_to_string(format!("{root}/deploy/kubernetes/configmap.yaml"))
        .expect("configmap");
    let embedded: String = configmap
        .split_once("  default.toml: |\n")
        .expect("default.toml key")
        .1
        .lines()
        .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
        .collect();
    assert_eq!(
        embedded.trim_end(),
        policy.trim_end(),
        "regenerate deploy/kubernetes/configmap.yaml"
    );
}
