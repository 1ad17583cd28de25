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

fn manifest(name: &str) -> String {
    let root = env!("CARGO_MANIFEST_DIR");
    std::fs::read_to_string(format!("{root}/deploy/kubernetes/{name}")).expect("manifest")
}

/// The text after the first `key:` starting a line (or a list item), unquoted.
fn value_of<'a>(text: &'a str, key: &str) -> &'a str {
    text.lines()
        .map(|l| l.trim_start().trim_start_matches("- "))
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no `{key}:` found"))
        .trim()
        .trim_matches('"')
}

/// The value of the container environment variable `name` in a manifest.
fn env_value<'a>(text: &'a str, name: &str) -> &'a str {
    let after = text
        .split_once(&format!("- name: {name}\n"))
        .unwrap_or_else(|| panic!("{name} is not set"))
        .1;
    value_of(after, "value")
}

#[test]
fn the_fallback_replica_count_covers_a_rollout() {
    // While Redis is unreachable each pod takes 1/N of the budget: N must count every pod that
    // can run at once, the rollout's surge included, or the pods together overspend.
    let deployment = manifest("deployment.yaml");
    let replicas: u32 = value_of(&deployment, "replicas").parse().expect("replicas");
    let surge: u32 = value_of(&deployment, "maxSurge").parse().expect("maxSurge");
    let fallback: u32 = env_value(
        &manifest("patches/redis.yaml"),
        "GATEWAY_REDIS_FALLBACK_REPLICAS",
    )
    .parse()
    .expect("a count");
    assert_eq!(
        fallback,
        replicas + surge,
        "GATEWAY_REDIS_FALLBACK_REPLICAS must be replicas + maxSurge"
    );
}

#[test]
fn the_gateway_and_its_redis_agree_on_the_credential_and_the_keys() {
    let deployment = manifest("deployment.yaml");
    // The gateway's side of Redis: the patch added to the Deployment with redis.yaml.
    let patch = manifest("patches/redis.yaml");
    let redis = manifest("redis.yaml");
    // The gateway reads the URL from the key of the Redis Secret it mounts.
    let path = env_value(&patch, "GATEWAY_REDIS_URL_FILE");
    let (dir, file) = path.rsplit_once('/').expect("a file path");
    let mount = patch
        .split_once(&format!("mountPath: {dir}\n"))
        .expect("the Redis Secret's mount")
        .0
        .rsplit_once("- name: ")
        .expect("a volume name")
        .1
        .trim();
    let volume = patch
        .split_once(&format!("- name: {mount}\n          secret:\n"))
        .expect("the volume is a Secret")
        .1;
    assert_eq!(value_of(volume, "secretName"), "billing-gateway-redis");
    assert_eq!(value_of(volume, "key"), file);
    assert_eq!(value_of(volume, "path"), file);

    let secret = redis
        .split_once("kind: Secret\n")
        .expect("the Redis Secret")
        .1;
    let url = value_of(secret, file);
    assert!(
        url.starts_with("redis://billing-gateway:") && url.ends_with("@billing-gateway-redis:6379"),
        "the URL names the ACL user and the Service: {url}"
    );
    // The ACL lets the gateway's user reach the default prefix's keys and channels, which
    // carry the organization id: a mismatch leaves every replica degraded.
    let organization = env_value(&deployment, "SCW_DEFAULT_ORGANIZATION_ID");
    let user = secret
        .lines()
        .find(|l| l.trim_start().starts_with("user billing-gateway on "))
        .expect("the gateway's ACL user");
    let namespace = format!("billing-gateway:{{{organization}}}*");
    for pattern in [format!("~{namespace}"), format!("&{namespace}")] {
        assert!(user.split(' ').any(|w| w == pattern), "{pattern} in {user}");
    }
    let password = url
        .strip_prefix("redis://billing-gateway:")
        .and_then(|rest| rest.split_once('@'))
        .expect("a password")
        .0;
    assert!(user.contains(&format!(" >{password} ")), "same password");

    // Budget keys have no TTL: only `volatile-lru` keeps them from eviction; nothing persists.
    let args: Vec<&str> = redis
        .lines()
        .map(str::trim)
        .filter_map(|l| l.strip_prefix("- "))
        .map(|a| a.trim_matches('"'))
        .collect();
    for pair in [
        ["--maxmemory-policy", "volatile-lru"],
        ["--save", ""],
        ["--appendonly", "no"],
    ] {
        assert!(args.windows(2).any(|w| w == pair), "{pair:?} in {args:?}");
    }
}
