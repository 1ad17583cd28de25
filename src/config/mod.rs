//! Typed configuration: the TOML file plus the environment (which wins), validated once at
//! startup (contract §3).
//!
//! [`Config`] is a plain struct of typed values; tests and `demo` build it with [`Config::new`]
//! and set fields. Operators reach it through [`Config::load`] (`sources.rs`), which reads
//! every setting through the one table in `settings.rs` (variable, file key, parser) and the
//! value types of [`units`]. A setting is written in three places: its row there, its field
//! here, and its default in [`Config::new`]; its names and its parsing are in the row alone, so
//! the environment, the file, the unknown-key check and the "required" check cannot disagree
//! (and a test holds the README to the table). Loading reports every problem at once, each
//! naming its variable or `file:line`, so a broken deployment is fixed in one round.
//!
//! Secrets (`SCW_SECRET_KEY`, `GATEWAY_JWT_HS256_SECRET`) come only from the environment or the
//! files their `_FILE` variants name, and live in `secrecy` types so no `Debug`, log line or
//! error can print them.

mod locate;
mod problem;
mod settings;
mod sources;
pub mod units;
mod weak;

pub use locate::{line_at, syntax_error_at};
pub use problem::{ConfigErrors, Problem};
pub use units::{
    HttpUrl, Rate, parse_base_url, parse_duration, parse_http_url, parse_origin, parse_rate,
    parse_size,
};
pub(crate) use units::{parse_redis_urls, pem_certificates};

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use secrecy::SecretString;
use uuid::Uuid;

/// The Billing API, when `SCW_API_URL` does not say otherwise.
pub const DEFAULT_API_URL: &str = "https://api.scaleway.com";

/// The whole configuration of one gateway.
///
/// Deliberately not `Clone` (nor are [`UpstreamConfig`] and [`AuthConfig`]): it holds the
/// secrets, and [`crate::server::App`] consumes it so that each secret lives in one place only.
#[derive(Debug)]
pub struct Config {
    /// Where the gateway listens; port 0 picks a free one.
    pub listen: SocketAddr,
    /// Where `/metrics` is served instead, when set (contract §9): its labels name principal
    /// classes and gateway keys, so it stays off the callers' listener (which answers it 404).
    pub metrics_listen: Option<SocketAddr>,
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
    /// Where spans are exported (OpenTelemetry), when anywhere.
    pub tracing: TracingConfig,
    /// The Redis replicas share budget, rates and cache through (contract §11), when any.
    pub redis: RedisConfig,
}

/// Sharing through Redis (contract §11). Without a URL everything stays in this process.
#[derive(Debug)]
pub struct RedisConfig {
    /// `GATEWAY_REDIS_URL`: `redis://` or `rediss://`, of a single server or of any node of a
    /// Redis Cluster (or several, comma-separated); a secret (it may hold a password).
    pub url: Option<SecretString>,
    /// `GATEWAY_REDIS_PREFIX`: the namespace of every key and channel; `None`:
    /// `billing-gateway:{<organization id>}` (one hash tag, so Redis Cluster keeps it in one slot).
    pub prefix: Option<String>,
    /// `GATEWAY_REDIS_TIMEOUT`: the longest a request waits on Redis before the replica
    /// decides on its own.
    pub timeout: Duration,
    /// `GATEWAY_REDIS_FALLBACK_REPLICAS`: the replica count assumed when Redis cannot be reached.
    pub fallback_replicas: u32,
    /// `GATEWAY_REDIS_CA_FILE`: PEM certificates trusted for `rediss://` instead of the system's
    /// roots (a managed Redis's own CA).
    pub ca_file: Option<PathBuf>,
}

impl RedisConfig {
    /// The namespace of every key and channel of the organization `organization_id`. The
    /// organization is in it as a hash tag whatever the prefix (`:{<id>}` appended unless the
    /// prefix holds it), so two organizations given the same prefix never share a key, and a
    /// Redis Cluster keeps every key in one slot (a prefix without braces would scatter them
    /// and make every script fail with `CROSSSLOT`).
    pub fn namespace(&self, organization_id: Uuid) -> String {
        let tag = format!("{{{organization_id}}}");
        match &self.prefix {
            Some(prefix) if prefix.contains(&tag) => prefix.clone(),
            Some(prefix) => format!("{prefix}:{tag}"),
            None => format!("billing-gateway:{tag}"),
        }
    }
}

/// OpenTelemetry trace export, from the standard `OTEL_*` variables. With no endpoint no
/// exporter runs. The SDK reads the rest of its variables itself (`OTEL_EXPORTER_OTLP_HEADERS`,
/// `OTEL_EXPORTER_OTLP_TIMEOUT`, `OTEL_TRACES_SAMPLER`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_BSP_*`).
#[derive(Debug, Clone)]
pub struct TracingConfig {
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`: the collector's base URL; spans go to `{it}/v1/traces`.
    pub otlp_endpoint: Option<String>,
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`: the whole URL spans go to; wins over the base.
    pub otlp_traces_endpoint: Option<String>,
    /// `OTEL_SERVICE_NAME`: the `service.name` of every span.
    pub service_name: String,
    /// `OTEL_SDK_DISABLED=true`: no exporter, whatever the endpoint says.
    pub disabled: bool,
}

impl TracingConfig {
    /// The URL spans are exported to (OTLP/HTTP protobuf), or `None`: no exporter runs.
    pub fn traces_url(&self) -> Option<String> {
        if self.disabled {
            return None;
        }
        match (&self.otlp_traces_endpoint, &self.otlp_endpoint) {
            (Some(url), _) => Some(url.clone()),
            (None, Some(base)) => Some(format!("{}/v1/traces", base.trim_end_matches('/'))),
            (None, None) => None,
        }
    }
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
#[derive(Debug)]
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
#[derive(Debug)]
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
    /// PEM certificates trusted, beside the system roots, for discovery and the JWKS only.
    pub ca_file: Option<PathBuf>,
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
            (None, Some(issuer)) if issuer.parse::<HttpUrl>().is_ok() => {
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
    /// Refresh an entry in the background when it is asked for in the last tenth of its
    /// freshness, rather than let the next caller after expiry wait for the upstream.
    pub background_refresh: bool,
}

/// Per-principal limits, and the bounds on client connections (contract §13).
#[derive(Debug, Clone)]
pub struct LimitsConfig {
    /// Requests per principal.
    pub principal_rate: Rate,
    /// `GATEWAY_MAX_CONNECTIONS`: most client connections open at once; `None`: derived from
    /// the open-files limit, keeping room for upstream, Redis, JWKS and files.
    pub max_connections: Option<usize>,
    /// `GATEWAY_IDLE_TIMEOUT`: how long a connection with no request in progress stays open
    /// (shorter as connections approach the bound).
    pub idle_timeout: Duration,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable.
    Pretty,
    /// One JSON object per line.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<LogFormat, String> {
        match s {
            "json" => Ok(LogFormat::Json),
            "pretty" => Ok(LogFormat::Pretty),
            _ => Err(format!("`{s}` is neither json nor pretty")),
        }
    }
}

/// What the command at hand needs from the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    /// `serve`, and `check` (which vouches for `serve`): every setting without a default, the
    /// secret key and the organization included.
    Serve,
    /// `token` and `key new`: they use the HS256 secret, the `iss`/`aud` pins or the policy
    /// folder, never the upstream, so its settings may be missing (a malformed value still
    /// counts).
    Tools,
}

impl Config {
    /// A configuration with every default, for tests and `demo`.
    pub fn new(upstream_url: &str, organization_id: Uuid, secret_key: SecretString) -> Config {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            metrics_listen: None,
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
                ca_file: None,
            },
            cache: CacheConfig {
                ttl: Duration::from_secs(300),
                closed_ttl: Duration::from_secs(86_400),
                stale_if_error: Duration::from_secs(3600),
                max_bytes: 64 << 20,
                background_refresh: true,
            },
            limits: LimitsConfig {
                principal_rate: Rate {
                    count: 25,
                    per: Duration::from_secs(1),
                },
                max_connections: None,
                idle_timeout: Duration::from_secs(60),
            },
            cors_origins: Vec::new(),
            tls: None,
            tracing: TracingConfig {
                otlp_endpoint: None,
                otlp_traces_endpoint: None,
                service_name: "billing-gateway".to_owned(),
                disabled: false,
            },
            redis: RedisConfig {
                url: None,
                prefix: None,
                timeout: Duration::from_millis(100),
                fallback_replicas: 3,
                ca_file: None,
            },
        }
    }

    /// Whether any caller could authenticate: a token source configured, or gateway keys in
    /// the policy (`policy_has_keys`). `serve` refuses to start without one, and `check`
    /// reports it, from this one rule.
    pub fn require_authentication(&self, policy_has_keys: bool) -> Result<(), Problem> {
        let tokens = self.auth.hs256_secret.is_some() || self.auth.key_source().is_some();
        if tokens || policy_has_keys {
            return Ok(());
        }
        Err(Problem::between(
            "no way to authenticate callers: set GATEWAY_JWKS_URL, GATEWAY_JWT_ISSUER (OIDC \
             discovery) or GATEWAY_JWT_HS256_SECRET (or its _FILE variant), or define [[keys]] \
             in the policy",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::path::Path;

    const ORG: &str = "11111111-2222-3333-4444-555555555555";
    const KEY: &str = "aaaaaaaa-0000-4000-8000-000000000001";
    const HS: &str = "0123456789abcdef0123456789abcdef";

    fn gather(vars: &[(&str, &str)], file: Option<&Path>, needs: Needs) -> (Config, Vec<String>) {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let (config, problems) = Config::gather(file, &|k| vars.get(k).cloned(), needs);
        (config, problems.iter().map(ToString::to_string).collect())
    }

    fn load(vars: &[(&str, &str)], file: Option<&Path>) -> Result<Config, ConfigErrors> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::load(file, &|k| vars.get(k).cloned(), Needs::Serve)
    }

    /// `base` plus `extra`, loaded for `serve`.
    fn with(extra: &[(&str, &str)]) -> Result<Config, ConfigErrors> {
        let mut vars = vec![
            ("SCW_SECRET_KEY", KEY),
            ("SCW_DEFAULT_ORGANIZATION_ID", ORG),
        ];
        vars.extend_from_slice(extra);
        load(&vars, None)
    }

    /// A file holding `text`, removed when dropped.
    fn temp_file(text: &str) -> tempfile::TempPath {
        let file = tempfile::NamedTempFile::new()
            .expect("tmp")
            .into_temp_path();
        std::fs::write(&file, text).expect("write");
        file
    }

    #[test]
    fn every_problem_is_reported_at_once_each_naming_its_variable_or_line() {
        let file = temp_file(
            "listen = \"nowhere\"\n[upstream]\ntimeuot = \"10s\"\nsecret_key = \"x\"\n\
             [cache]\nmax_bytes = 1024\n",
        );
        let (_, problems) = gather(
            &[
                ("GATEWAY_UPSTREAM_RATE", "fast"),
                ("GATEWAY_JWT_HS256_SECRET", "short"),
            ],
            Some(&*file),
            Needs::Serve,
        );
        let f = file.display();
        let expected = [
            "SCW_SECRET_KEY: missing".to_owned(),
            "SCW_DEFAULT_ORGANIZATION_ID: missing".to_owned(),
            format!("{f}:1: listen: `nowhere` is not an address"),
            "GATEWAY_JWT_HS256_SECRET: must be at least 32 bytes".to_owned(),
            format!("{f}:6: cache.max_bytes: must be a quoted string"),
            "GATEWAY_UPSTREAM_RATE: `fast` is not a rate".to_owned(),
            format!(
                "{f}:3: unknown key `upstream.timeuot` (known in [upstream]: organization_id, url, timeout, rate)"
            ),
            format!(
                "{f}:4: upstream.secret_key: secrets are never read from the configuration file; set SCW_SECRET_KEY or SCW_SECRET_KEY_FILE"
            ),
        ];
        assert_eq!(problems.len(), expected.len(), "{problems:#?}");
        for (problem, expected) in problems.iter().zip(&expected) {
            assert!(problem.starts_with(expected), "{problem} / {expected}");
        }
    }

    #[test]
    fn tools_do_without_the_upstream_but_not_with_a_malformed_value() {
        let (config, problems) = gather(&[("GATEWAY_JWT_HS256_SECRET", HS)], None, Needs::Tools);
        assert_eq!(problems, Vec::<String>::new());
        assert!(config.auth.hs256_secret.is_some());
        let (_, problems) = gather(&[("GATEWAY_CACHE_TTL", "soon")], None, Needs::Tools);
        assert_eq!(problems.len(), 1, "{problems:?}");
    }

    #[test]
    fn background_refresh_is_on_unless_turned_off() {
        let on = |vars: &[(&str, &str)], file: Option<&Path>| {
            let (config, problems) = gather(vars, file, Needs::Tools);
            (config.cache.background_refresh, problems)
        };
        assert_eq!(on(&[], None), (true, vec![]));
        let file = temp_file("[cache]\nbackground_refresh = \"false\"\n");
        assert_eq!(on(&[], Some(&*file)), (false, vec![]));
        let env = [("GATEWAY_CACHE_BACKGROUND_REFRESH", "TRUE")];
        assert_eq!(on(&env, Some(&*file)), (true, vec![]));
        let (_, problems) = on(&[("GATEWAY_CACHE_BACKGROUND_REFRESH", "yes")], None);
        assert_eq!(
            problems,
            ["GATEWAY_CACHE_BACKGROUND_REFRESH: `yes` is neither true nor false"]
        );
    }

    #[test]
    fn environment_wins_over_the_file_and_an_empty_value_is_no_value() {
        let file = temp_file(
            "[upstream]\ntimeout = \"10s\"\nurl = \"http://file.example/\"\n\
             organization_id = \"11111111-2222-3333-4444-555555555555\"\n[auth]\naudience = \"\"\n",
        );
        let vars = [
            ("SCW_SECRET_KEY", KEY),
            ("GATEWAY_UPSTREAM_TIMEOUT", "2s"),
            ("SCW_DEFAULT_ORGANIZATION_ID", ""),
        ];
        let cfg = load(&vars, Some(&*file)).expect("valid");
        assert_eq!(cfg.upstream.timeout, Duration::from_secs(2));
        assert_eq!(cfg.upstream.url, "http://file.example");
        assert_eq!(cfg.upstream.organization_id.to_string(), ORG);
        assert_eq!(cfg.auth.audience, None);
    }

    #[test]
    fn a_broken_file_and_a_misplaced_table_are_located() {
        let file = temp_file("[upstream]\nurl = \"http://x\"\nurl = \"http://y\"\n");
        let e = load(&[("SCW_SECRET_KEY", KEY)], Some(&*file))
            .expect_err("duplicate key")
            .to_string();
        assert!(e.contains(&format!("{}:3:", file.display())), "{e}");

        let file = temp_file("upstream = \"http://x\"\n[tls.cert]\npath = \"/c.pem\"\n");
        let (_, problems) = gather(&[], Some(&*file), Needs::Tools);
        let f = file.display();
        assert_eq!(
            problems,
            [
                format!(
                    "{f}:2: tls.cert: must be a quoted string, as the variable would hold it (found table)"
                ),
                format!("{f}:1: upstream: must be a table such as [upstream]"),
            ]
        );
    }

    #[test]
    fn a_syntax_error_is_located_where_the_unfinished_value_begins() {
        // The locator's own cases are in `locate.rs`; through the loader: at the line the
        // array began, and not the parser's cascade of complaints about the lines it swallowed.
        let file = temp_file("listen = \"127.0.0.1:0\"\n[cache]\nttl = [\"5m\"\n\n[upstream]\n");
        let (_, problems) = gather(&[], Some(&file), Needs::Tools);
        let f = file.display();
        assert!(
            problems[0].starts_with(&format!("{f}:3: ")) && problems[0].contains("line 5"),
            "{problems:#?}"
        );
        assert!(
            !problems.iter().any(|p| p.starts_with(&format!("{f}:5:"))),
            "{problems:#?}"
        );
    }

    #[test]
    fn secrets_come_from_the_environment_or_their_file_and_are_never_echoed() {
        let file = temp_file(&format!("{KEY}\n"));
        let path = file.to_str().expect("utf-8");
        let cfg = load(
            &[
                ("SCW_SECRET_KEY_FILE", path),
                ("SCW_DEFAULT_ORGANIZATION_ID", ORG),
            ],
            None,
        )
        .expect("key from its file");
        use secrecy::ExposeSecret;
        assert_eq!(cfg.upstream.secret_key.expose_secret(), KEY);

        let e = load(
            &[
                ("SCW_DEFAULT_ORGANIZATION_ID", ORG),
                ("SCW_SECRET_KEY", "not-a-uuid-s3cr3t"),
            ],
            None,
        )
        .expect_err("bad key")
        .to_string();
        assert!(e.contains("SCW_SECRET_KEY") && !e.contains("s3cr3t"), "{e}");
        let e = load(
            &[
                ("SCW_DEFAULT_ORGANIZATION_ID", ORG),
                ("SCW_SECRET_KEY_FILE", "/nonexistent/key"),
            ],
            None,
        )
        .expect_err("unreadable")
        .to_string();
        assert!(
            e.starts_with("SCW_SECRET_KEY_FILE: cannot read /nonexistent/key"),
            "{e}"
        );
    }

    #[test]
    fn cors_origins_are_exact_and_tls_files_come_in_pairs() {
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
        let cfg = with(&[
            ("GATEWAY_TLS_CERT", "/c.pem"),
            ("GATEWAY_TLS_KEY", "/k.pem"),
        ])
        .expect("a pair");
        assert_eq!(cfg.tls.map(|t| t.key), Some(PathBuf::from("/k.pem")));
    }

    #[test]
    fn asymmetric_tokens_are_configured_by_jwks_url_or_issuer() {
        // Gateway keys alone are a valid setup; the app checks the policy holds some.
        let cfg = with(&[]).expect("keys only");
        assert_eq!(cfg.auth.key_source(), None);
        assert!(cfg.require_authentication(true).is_ok());
        let e = cfg.require_authentication(false).expect_err("no way in");
        assert!(e.to_string().contains("GATEWAY_JWT_HS256_SECRET"), "{e}");

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
            let e = with(&[("GATEWAY_JWKS_URL", bad)])
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
    fn demo_overrides_named_settings_through_the_same_parsers() {
        let mut cfg = Config::new("http://x", Uuid::nil(), SecretString::from(KEY.to_owned()));
        let vars = HashMap::from([
            ("GATEWAY_PRINCIPAL_RATE", "1000/s"),
            ("GATEWAY_CACHE_TTL", "1s"),
        ]);
        let env = |k: &str| vars.get(k).map(|v| v.to_string());
        cfg.apply_env(&["GATEWAY_PRINCIPAL_RATE", "GATEWAY_UPSTREAM_RATE"], &env)
            .expect("rates");
        assert_eq!(cfg.limits.principal_rate.count, 1000);
        assert_eq!(cfg.upstream.rate.count, 20);
        assert_eq!(cfg.cache.ttl, Duration::from_secs(300), "not named");
        let vars = HashMap::from([("GATEWAY_UPSTREAM_RATE", "lots")]);
        let env = |k: &str| vars.get(k).map(|v| v.to_string());
        let e = cfg
            .apply_env(&["GATEWAY_UPSTREAM_RATE"], &env)
            .expect_err("bad rate");
        assert!(
            e.to_string().starts_with("GATEWAY_UPSTREAM_RATE: `lots`"),
            "{e}"
        );
    }

    #[test]
    fn connection_settings_are_read_from_either_place_and_refuse_zero() {
        let file = temp_file("[limits]\nmax_connections = \"500\"\nidle_timeout = \"15s\"\n");
        let (config, problems) = gather(&[], Some(&*file), Needs::Tools);
        assert_eq!(problems, Vec::<String>::new());
        assert_eq!(config.limits.max_connections, Some(500));
        assert_eq!(config.limits.idle_timeout, Duration::from_secs(15));
        let (config, _) = gather(&[], None, Needs::Tools);
        assert_eq!(config.limits.max_connections, None, "derived at start");
        assert_eq!(config.limits.idle_timeout, Duration::from_secs(60));
        let (_, problems) = gather(
            &[
                ("GATEWAY_MAX_CONNECTIONS", "0"),
                ("GATEWAY_IDLE_TIMEOUT", "0s"),
            ],
            None,
            Needs::Tools,
        );
        assert_eq!(
            problems,
            [
                "GATEWAY_MAX_CONNECTIONS: `0` is not a connection count (1 or more)",
                "GATEWAY_IDLE_TIMEOUT: `0s`: an idle timeout is longer than 0",
            ]
        );
    }

    #[test]
    fn debug_output_never_shows_the_secret_key() {
        let cfg = Config::new("http://x", Uuid::nil(), SecretString::from(KEY.to_owned()));
        assert!(!format!("{cfg:?}").contains(KEY));
    }
}
