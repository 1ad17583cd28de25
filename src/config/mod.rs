//! Typed configuration from a TOML file plus the environment (which wins), validated once at
//! startup (contract §3).
//!
//! Secrets come only from the environment or files it names, and live in `secrecy` types so no
//! `Debug`, log line or error can print them. Tests build [`Config`] values directly with
//! [`Config::new`] instead of setting environment variables.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;
use uuid::Uuid;

/// The whole configuration of one gateway.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the gateway listens; port 0 picks a free one.
    pub listen: SocketAddr,
    /// Folder of `*.toml` policy files.
    pub policy_dir: PathBuf,
    /// Log line format; `None` picks pretty on a terminal, JSON elsewhere.
    pub log_format: Option<LogFormat>,
    /// The Billing API and the key to reach it.
    pub upstream: UpstreamConfig,
    /// How callers' tokens are checked.
    pub auth: AuthConfig,
    /// The consumption cache.
    pub cache: CacheConfig,
    /// Per-caller fairness.
    pub limits: LimitsConfig,
    /// Browser origins allowed to call the gateway (CORS); empty: no CORS headers at all.
    pub cors_origins: Vec<String>,
    /// Serve HTTPS (HTTP/2 offered) with this certificate and key, re-read when they change.
    pub tls: Option<TlsFiles>,
}

/// PEM files of the TLS listener.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    /// The private key.
    pub key: PathBuf,
}

/// The upstream Billing API.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Base URL without a trailing slash.
    pub url: String,
    /// The one organization this gateway serves.
    pub organization_id: Uuid,
    /// The Scaleway secret key; exposed only when building the upstream request.
    pub secret_key: SecretString,
    /// Whole-request timeout.
    pub timeout: Duration,
    /// Upstream-wide call budget.
    pub rate: Rate,
}

/// Token verification settings.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    // (Gateway keys need no setting here: they live in the policy files.)
    /// Enables HS256 tokens.
    pub hs256_secret: Option<SecretString>,
    /// Enables asymmetric tokens from this JWKS.
    pub jwks_url: Option<String>,
    /// Required `iss`, when set.
    pub issuer: Option<String>,
    /// Required member of `aud`, when set.
    pub audience: Option<String>,
    /// Clock skew allowed on `exp`, `nbf` and `iat`.
    pub leeway: Duration,
}

/// Where the keys for asymmetric tokens come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// `GATEWAY_JWKS_URL`: the JWKS itself.
    Jwks(String),
    /// `GATEWAY_JWT_ISSUER` with no JWKS URL: the JWKS named by the issuer's OIDC discovery
    /// document.
    Discovery(String),
}

impl AuthConfig {
    /// Where asymmetric keys come from, or `None` when only HS256 is enabled. An issuer that is
    /// not an http(s) URL only pins `iss` (for HS256 tokens); nothing can be discovered from it.
    pub fn key_source(&self) -> Option<KeySource> {
        match (&self.jwks_url, &self.issuer) {
            (Some(url), _) => Some(KeySource::Jwks(url.clone())),
            (None, Some(issuer)) if parse_http_url(issuer).is_ok() => {
                Some(KeySource::Discovery(issuer.clone()))
            }
            _ => None,
        }
    }
}

/// Consumption cache settings.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// Freshness for the current billing period.
    pub ttl: Duration,
    /// Freshness for closed billing periods.
    pub closed_ttl: Duration,
    /// How long past freshness an answer may be served when the upstream fails.
    pub stale_if_error: Duration,
    /// Bound on cached body bytes.
    pub max_bytes: u64,
}

/// Per-principal limits.
#[derive(Debug, Clone)]
pub struct LimitsConfig {
    /// Requests per principal.
    pub principal_rate: Rate,
}

/// A rate such as `20/s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rate {
    /// How many.
    pub count: u32,
    /// Per how long.
    pub per: Duration,
}

impl Rate {
    /// One cell every `per / count`, never a zero period.
    pub fn pace(self) -> Duration {
        (self.per / self.count.max(1)).max(Duration::from_nanos(1))
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable.
    Pretty,
    /// One JSON object per line.
    Json,
}

/// A configuration problem, worded for the operator who must fix it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

fn err(msg: impl Into<String>) -> ConfigError {
    ConfigError(msg.into())
}

impl Config {
    /// A configuration with every default, for tests and `demo`.
    pub fn new(upstream_url: &str, organization_id: Uuid, secret_key: SecretString) -> Config {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            policy_dir: PathBuf::from("policies"),
            log_format: None,
            upstream: UpstreamConfig {
                url: upstream_url.trim_end_matches('/').to_owned(),
                organization_id,
                secret_key,
                timeout: Duration::from_secs(30),
                rate: Rate {
                    count: 20,
                    per: Duration::from_secs(1),
                },
            },
            auth: AuthConfig {
                hs256_secret: None,
                jwks_url: None,
                issuer: None,
                audience: None,
                leeway: Duration::from_secs(30),
            },
            cache: CacheConfig {
                ttl: Duration::from_secs(300),
                closed_ttl: Duration::from_secs(86_400),
                stale_if_error: Duration::from_secs(3600),
                max_bytes: 64 << 20,
            },
            limits: LimitsConfig {
                principal_rate: Rate {
                    count: 25,
                    per: Duration::from_secs(1),
                },
            },
            cors_origins: Vec::new(),
            tls: None,
        }
    }

    /// Reads `file` (or `gateway.toml` when present) and the environment through `env`.
    ///
    /// With `require_upstream` false (for `check` and `token`), a missing secret key or
    /// organization is not an error; such a configuration must never serve.
    pub fn load(
        file: Option<&Path>,
        env: &dyn Fn(&str) -> Option<String>,
        require_upstream: bool,
    ) -> Result<Config, ConfigError> {
        let file_cfg = match file {
            Some(path) => read_file(path)?,
            None if Path::new("gateway.toml").exists() => read_file(Path::new("gateway.toml"))?,
            None => FileConfig::default(),
        };
        let get = |var: &str, from_file: &Option<String>| {
            env(var)
                .filter(|v| !v.is_empty())
                .or_else(|| from_file.clone())
        };
        let secret = |var: &str| -> Result<Option<SecretString>, ConfigError> {
            if let Some(v) = env(var).filter(|v| !v.is_empty()) {
                return Ok(Some(SecretString::from(v)));
            }
            let file_var = format!("{var}_FILE");
            match env(&file_var).filter(|v| !v.is_empty()) {
                Some(path) => std::fs::read_to_string(&path)
                    .map(|s| {
                        Some(SecretString::from(
                            s.trim_end_matches(['\r', '\n']).to_owned(),
                        ))
                    })
                    .map_err(|e| err(format!("{file_var}: cannot read {path}: {e}"))),
                None => Ok(None),
            }
        };

        let mut cfg = Config::new("", Uuid::nil(), SecretString::from(String::new()));
        let f = &file_cfg;

        let url = get("SCW_API_URL", &f.upstream.url)
            .unwrap_or_else(|| "https://api.scaleway.com".to_owned());
        cfg.upstream.url = parse_url(&url).map_err(|e| err(format!("SCW_API_URL: {e}")))?;

        match get("SCW_DEFAULT_ORGANIZATION_ID", &f.upstream.organization_id) {
            Some(org) => {
                cfg.upstream.organization_id = Uuid::try_parse(&org).map_err(|_| {
                    err(format!(
                        "SCW_DEFAULT_ORGANIZATION_ID: `{org}` is not a UUID"
                    ))
                })?;
            }
            None if require_upstream => {
                return Err(err(
                    "SCW_DEFAULT_ORGANIZATION_ID is required: the organization this gateway serves",
                ));
            }
            None => {}
        }
        match secret("SCW_SECRET_KEY")? {
            Some(key) => {
                use secrecy::ExposeSecret;
                if Uuid::try_parse(key.expose_secret()).is_err() {
                    // Never echo the value: it may be a real key with a typo.
                    return Err(err("SCW_SECRET_KEY is not a Scaleway secret key (a UUID)"));
                }
                cfg.upstream.secret_key = key;
            }
            None if require_upstream => {
                return Err(err(
                    "SCW_SECRET_KEY (or SCW_SECRET_KEY_FILE) is required: the Scaleway API secret key",
                ));
            }
            None => {}
        }
        if let Some(v) = get("GATEWAY_UPSTREAM_TIMEOUT", &f.upstream.timeout) {
            cfg.upstream.timeout = named("GATEWAY_UPSTREAM_TIMEOUT", parse_duration(&v))?;
        }
        if let Some(v) = get("GATEWAY_UPSTREAM_RATE", &f.upstream.rate) {
            cfg.upstream.rate = named("GATEWAY_UPSTREAM_RATE", parse_rate(&v))?;
        }
        if let Some(v) = get("GATEWAY_LISTEN", &f.listen) {
            cfg.listen = v.parse().map_err(|_| {
                err(format!(
                    "GATEWAY_LISTEN: `{v}` is not an address such as 127.0.0.1:8080"
                ))
            })?;
        }
        if let Some(v) = get("GATEWAY_POLICY_DIR", &f.policy.dir) {
            cfg.policy_dir = PathBuf::from(v);
        }
        cfg.auth.hs256_secret = secret("GATEWAY_JWT_HS256_SECRET")?;
        if let Some(s) = &cfg.auth.hs256_secret {
            use secrecy::ExposeSecret;
            if s.expose_secret().len() < 32 {
                return Err(err(
                    "GATEWAY_JWT_HS256_SECRET must be at least 32 bytes (256 bits) long",
                ));
            }
        }
        if let Some(url) = get("GATEWAY_JWKS_URL", &f.auth.jwks_url) {
            cfg.auth.jwks_url = Some(named("GATEWAY_JWKS_URL", parse_http_url(&url))?);
        }
        cfg.auth.issuer = get("GATEWAY_JWT_ISSUER", &f.auth.issuer);
        cfg.auth.audience = get("GATEWAY_JWT_AUDIENCE", &f.auth.audience);
        if let Some(v) = get("GATEWAY_JWT_LEEWAY", &f.auth.leeway) {
            cfg.auth.leeway = named("GATEWAY_JWT_LEEWAY", parse_duration(&v))?;
        }
        if let Some(v) = get("GATEWAY_CACHE_TTL", &f.cache.ttl) {
            cfg.cache.ttl = named("GATEWAY_CACHE_TTL", parse_duration(&v))?;
        }
        if let Some(v) = get("GATEWAY_CACHE_CLOSED_TTL", &f.cache.closed_ttl) {
            cfg.cache.closed_ttl = named("GATEWAY_CACHE_CLOSED_TTL", parse_duration(&v))?;
        }
        if let Some(v) = get("GATEWAY_CACHE_STALE_IF_ERROR", &f.cache.stale_if_error) {
            cfg.cache.stale_if_error = named("GATEWAY_CACHE_STALE_IF_ERROR", parse_duration(&v))?;
        }
        if let Some(v) = get("GATEWAY_CACHE_MAX_BYTES", &f.cache.max_bytes) {
            cfg.cache.max_bytes = named("GATEWAY_CACHE_MAX_BYTES", parse_size(&v))?;
        }
        if let Some(v) = get("GATEWAY_PRINCIPAL_RATE", &f.limits.principal_rate) {
            cfg.limits.principal_rate = named("GATEWAY_PRINCIPAL_RATE", parse_rate(&v))?;
        }
        if let Some(v) = get("GATEWAY_CORS_ORIGINS", &f.cors.origins) {
            cfg.cors_origins = v
                .split(',')
                .map(str::trim)
                .filter(|o| !o.is_empty())
                .map(|o| parse_origin(o).map_err(|e| err(format!("GATEWAY_CORS_ORIGINS: {e}"))))
                .collect::<Result<_, _>>()?;
        }
        match (
            get("GATEWAY_TLS_CERT", &f.tls.cert),
            get("GATEWAY_TLS_KEY", &f.tls.key),
        ) {
            (Some(cert), Some(key)) => {
                cfg.tls = Some(TlsFiles {
                    cert: cert.into(),
                    key: key.into(),
                });
            }
            (None, None) => {}
            _ => {
                return Err(err(
                    "GATEWAY_TLS_CERT and GATEWAY_TLS_KEY go together: set both or neither",
                ));
            }
        }
        if let Some(v) = get("GATEWAY_LOG_FORMAT", &f.log.format) {
            cfg.log_format = Some(match v.as_str() {
                "json" => LogFormat::Json,
                "pretty" => LogFormat::Pretty,
                _ => {
                    return Err(err(format!(
                        "GATEWAY_LOG_FORMAT: `{v}` is neither json nor pretty"
                    )));
                }
            });
        }
        if let (None, None, Some(issuer)) = (
            &cfg.auth.key_source(),
            &cfg.auth.hs256_secret,
            &cfg.auth.issuer,
        ) {
            return Err(err(format!(
                "GATEWAY_JWT_ISSUER: `{issuer}` is not an http(s) URL, so no JWKS can be discovered \
                 from it; set GATEWAY_JWKS_URL or GATEWAY_JWT_HS256_SECRET"
            )));
        }
        Ok(cfg)
    }
}

fn named<T>(var: &str, r: Result<T, String>) -> Result<T, ConfigError> {
    r.map_err(|e| err(format!("{var}: {e}")))
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| err(format!("{}: cannot read: {e}", path.display())))?;
    toml::from_str(&text).map_err(|e| {
        let line = line_at(&text, e.span().map_or(0, |s| s.start));
        err(format!("{}:{line}: {}", path.display(), e.message()))
    })
}

/// An exact browser origin, `scheme://host[:port]`: no path, no wildcard (a wildcard with
/// credentials in headers would let any site spend the caller's token).
fn parse_origin(origin: &str) -> Result<String, String> {
    let rest = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"))
        .ok_or_else(|| format!("`{origin}` is not an origin such as https://app.example.com"))?;
    if rest.is_empty() || rest.contains(['/', '*', '?', '#', ' ', '@']) {
        return Err(format!(
            "`{origin}` is not an origin such as https://app.example.com"
        ));
    }
    Ok(origin.to_owned())
}

/// The 1-based line of a byte offset, for `file:line:` messages.
pub fn line_at(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// `http(s)://host[:port][/prefix]`, without query, fragment or trailing slash.
fn parse_url(url: &str) -> Result<String, String> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| format!("`{url}` must start with https:// or http://"))?;
    let host = rest.split('/').next().unwrap_or_default();
    if host.is_empty() || rest.contains(['?', '#', ' ', '@']) {
        return Err(format!(
            "`{url}` is not a base URL such as https://api.scaleway.com"
        ));
    }
    Ok(url.trim_end_matches('/').to_owned())
}

/// An absolute `http(s)://host[:port][/path][?query]` URL, as the JWKS or an issuer is named:
/// no credentials in it (they would be sent along) and no fragment.
pub(crate) fn parse_http_url(url: &str) -> Result<String, String> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| format!("`{url}` must start with https:// or http://"))?;
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    if authority.is_empty()
        || authority.contains('@')
        || url.contains('#')
        || url.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "`{url}` is not a URL such as https://idp.example.com/.well-known/jwks.json"
        ));
    }
    Ok(url.to_owned())
}

/// `500ms`, `30s`, `5m`, `1h`, `1d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration such as 500ms, 30s, 5m or 1h"))?;
    let ms = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => {
            return Err(format!(
                "`{s}` is not a duration such as 500ms, 30s, 5m or 1h"
            ));
        }
    };
    Ok(Duration::from_millis(n.saturating_mul(ms)))
}

/// `64MiB`, `512KiB`, `1GiB`, or plain bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size such as 64MiB"))?;
    let mult = match unit {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => return Err(format!("`{s}` is not a size such as 64MiB")),
    };
    Ok(n.saturating_mul(mult))
}

/// `N/s` or `N/m`, N at least 1.
pub fn parse_rate(s: &str) -> Result<Rate, String> {
    let bad = || format!("`{s}` is not a rate such as 20/s or 100/m");
    let (n, per) = s.split_once('/').ok_or_else(bad)?;
    let count: u32 = n.parse().ok().filter(|n| *n > 0).ok_or_else(bad)?;
    let per = match per {
        "s" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        _ => return Err(bad()),
    };
    Ok(Rate { count, per })
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    #[serde(default)]
    upstream: FileUpstream,
    #[serde(default)]
    policy: FilePolicy,
    #[serde(default)]
    auth: FileAuth,
    #[serde(default)]
    cache: FileCache,
    #[serde(default)]
    limits: FileLimits,
    #[serde(default)]
    log: FileLog,
    #[serde(default)]
    cors: FileCors,
    #[serde(default)]
    tls: FileTls,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCors {
    origins: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTls {
    cert: Option<String>,
    key: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileUpstream {
    url: Option<String>,
    organization_id: Option<String>,
    timeout: Option<String>,
    rate: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FilePolicy {
    dir: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAuth {
    jwks_url: Option<String>,
    issuer: Option<String>,
    audience: Option<String>,
    leeway: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCache {
    ttl: Option<String>,
    closed_ttl: Option<String>,
    stale_if_error: Option<String>,
    max_bytes: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLimits {
    principal_rate: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLog {
    format: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const ORG: &str = "11111111-2222-3333-4444-555555555555";
    const KEY: &str = "aaaaaaaa-0000-4000-8000-000000000001";
    const HS: &str = "0123456789abcdef0123456789abcdef";

    fn load(vars: &[(&str, &str)], file: Option<&Path>) -> Result<Config, ConfigError> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::load(file, &|k| vars.get(k).cloned(), true)
    }

    #[test]
    fn cors_origins_are_exact_and_tls_files_come_in_pairs() {
        let base = [
            ("SCW_SECRET_KEY", KEY),
            ("SCW_DEFAULT_ORGANIZATION_ID", ORG),
        ];
        let with = |extra: &[(&'static str, &'static str)]| {
            let mut vars = base.to_vec();
            vars.extend_from_slice(extra);
            load(&vars, None)
        };
        let cfg = with(&[(
            "GATEWAY_CORS_ORIGINS",
            "https://a.example, http://localhost:3000",
        )])
        .expect("origins");
        assert_eq!(
            cfg.cors_origins,
            ["https://a.example", "http://localhost:3000"]
        );
        for bad in [
            "*",
            "https://a.example/app",
            "a.example",
            "https://*.example",
        ] {
            assert!(with(&[("GATEWAY_CORS_ORIGINS", bad)]).is_err(), "{bad}");
        }
        let e = with(&[("GATEWAY_TLS_CERT", "/c.pem")]).expect_err("half a pair");
        assert!(e.to_string().contains("GATEWAY_TLS_KEY"));
    }

    #[test]
    fn units_parse() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert!(parse_duration("5 minutes").is_err());
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert!(parse_size("64MB").is_err());
        assert_eq!(parse_rate("100/m").map(|r| r.count), Ok(100));
        assert!(parse_rate("0/s").is_err());
    }

    #[test]
    fn environment_wins_over_the_file_and_unknown_keys_fail() {
        let dir = std::env::temp_dir().join(format!("bg-config-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("tmp");
        let file = dir.join("gateway.toml");
        std::fs::write(
            &file,
            "[upstream]\ntimeout = \"10s\"\nurl = \"http://file.example/\"\n",
        )
        .expect("write");
        let base = [
            ("SCW_SECRET_KEY", KEY),
            ("SCW_DEFAULT_ORGANIZATION_ID", ORG),
            ("GATEWAY_JWT_HS256_SECRET", HS),
        ];
        let mut vars = base.to_vec();
        vars.push(("GATEWAY_UPSTREAM_TIMEOUT", "2s"));
        let cfg = load(&vars, Some(&file)).expect("valid");
        assert_eq!(cfg.upstream.timeout, Duration::from_secs(2));
        assert_eq!(cfg.upstream.url, "http://file.example");

        std::fs::write(&file, "\n[upstream]\ntimeuot = \"10s\"\n").expect("write");
        let e = load(&base, Some(&file))
            .expect_err("unknown key")
            .to_string();
        assert!(e.contains("gateway.toml:3") && e.contains("timeuot"), "{e}");
    }

    #[test]
    fn missing_or_malformed_secrets_are_clear_errors_that_do_not_echo_them() {
        let e = load(&[("SCW_DEFAULT_ORGANIZATION_ID", ORG)], None).expect_err("no key");
        assert!(e.to_string().contains("SCW_SECRET_KEY"));
        let e = load(
            &[
                ("SCW_DEFAULT_ORGANIZATION_ID", ORG),
                ("SCW_SECRET_KEY", "not-a-uuid-s3cr3t"),
            ],
            None,
        )
        .expect_err("bad key");
        assert!(!e.to_string().contains("s3cr3t"));
        let e = load(
            &[
                ("SCW_DEFAULT_ORGANIZATION_ID", ORG),
                ("SCW_SECRET_KEY", KEY),
                ("GATEWAY_JWT_HS256_SECRET", "short"),
            ],
            None,
        )
        .expect_err("short secret");
        assert!(e.to_string().contains("32 bytes"));
    }

    #[test]
    fn asymmetric_tokens_are_configured_by_jwks_url_or_issuer() {
        let base = [
            ("SCW_SECRET_KEY", KEY),
            ("SCW_DEFAULT_ORGANIZATION_ID", ORG),
        ];
        let with = |extra: &[(&'static str, &'static str)]| {
            let mut vars = base.to_vec();
            vars.extend_from_slice(extra);
            load(&vars, None)
        };
        // Gateway keys alone are a valid setup; the app checks the policy holds some.
        assert_eq!(with(&[]).expect("keys only").auth.key_source(), None);

        let cfg = with(&[("GATEWAY_JWKS_URL", "https://idp.example/keys?v=2")]).expect("jwks");
        assert_eq!(
            cfg.auth.key_source(),
            Some(KeySource::Jwks("https://idp.example/keys?v=2".into()))
        );
        let cfg = with(&[("GATEWAY_JWT_ISSUER", "https://idp.example/realms/x")]).expect("oidc");
        assert_eq!(
            cfg.auth.key_source(),
            Some(KeySource::Discovery("https://idp.example/realms/x".into()))
        );
        for bad in [
            "idp.example/keys",
            "ftp://idp.example/keys",
            "https:///keys",
            "https://user:pw@idp.example/keys",
            "https://idp.example/keys#k",
        ] {
            let e = load(
                &[
                    ("SCW_SECRET_KEY", KEY),
                    ("SCW_DEFAULT_ORGANIZATION_ID", ORG),
                    ("GATEWAY_JWKS_URL", bad),
                ],
                None,
            )
            .expect_err(bad)
            .to_string();
            assert!(e.starts_with("GATEWAY_JWKS_URL"), "{e}");
        }
        // An issuer that is no URL only pins `iss` for HS256 tokens; alone it is an error.
        let e = with(&[("GATEWAY_JWT_ISSUER", "billing")])
            .expect_err("nothing to discover")
            .to_string();
        assert!(e.contains("GATEWAY_JWT_ISSUER"), "{e}");
        let cfg = with(&[
            ("GATEWAY_JWT_ISSUER", "billing"),
            ("GATEWAY_JWT_HS256_SECRET", HS),
        ])
        .expect("HS256 with an iss check");
        assert_eq!(cfg.auth.key_source(), None);
    }

    #[test]
    fn debug_output_never_shows_the_secret_key() {
        let cfg = Config::new("http://x", Uuid::nil(), SecretString::from(KEY.to_owned()));
        assert!(!format!("{cfg:?}").contains(KEY));
    }
}
