//! [`SETTINGS`], the one table of the gateway's settings: each row names the environment
//! variable, the file key (or the mark of a secret) and the parser that turns the text into a
//! field of [`Config`]. The readers ([`super::sources`]) walk this table and nothing else, so
//! the env and file spellings of a value go through the same parser and cannot disagree.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;
use uuid::Uuid;

use super::units::{
    parse_base_url, parse_duration, parse_http_url, parse_origin, parse_rate, parse_redis_urls,
    parse_size,
};
use super::weak;
use super::{Config, LogFormat, TlsFiles};

/// Where a setting may be written besides its environment variable.
#[derive(Debug, Clone, Copy)]
pub(super) enum Place {
    /// This dotted key of the configuration file.
    File(&'static str),
    /// Nowhere else: a secret, read from the variable or from the file `{VAR}_FILE` names.
    /// `refused` is the file key an operator would reach for; finding it is an error that
    /// says where secrets go instead.
    Secret {
        /// The file key refused with an explanation.
        refused: &'static str,
    },
}

/// One setting: where it is read from, and how its text becomes a field of [`Config`].
#[derive(Debug, Clone, Copy)]
pub(super) struct Setting {
    /// The environment variable, which wins over the file.
    pub(super) env: &'static str,
    /// The file key, or the mark of a secret.
    pub(super) place: Place,
    /// For a setting with no default: what it is, said when `serve` finds it missing.
    pub(super) required: Option<&'static str>,
    /// Parses the text and stores the value; the message is the operator's, without the
    /// variable or file position (added by the caller), and never echoes a secret.
    pub(super) apply: fn(&mut Config, String) -> Result<(), String>,
}

const fn file(
    env: &'static str,
    key: &'static str,
    apply: fn(&mut Config, String) -> Result<(), String>,
) -> Setting {
    Setting {
        env,
        place: Place::File(key),
        required: None,
        apply,
    }
}

const fn secret(
    env: &'static str,
    refused: &'static str,
    apply: fn(&mut Config, String) -> Result<(), String>,
) -> Setting {
    Setting {
        env,
        place: Place::Secret { refused },
        required: None,
        apply,
    }
}

impl Setting {
    const fn required(self, what: &'static str) -> Setting {
        Setting {
            required: Some(what),
            ..self
        }
    }
}

/// Every setting (contract §3, plus CORS and TLS). Defaults are [`Config::new`]'s.
pub(super) static SETTINGS: &[Setting] = &[
    secret("SCW_SECRET_KEY", "upstream.secret_key", |c, v| {
        // Never echoed: a real key with a typo is still nearly a real key.
        let key =
            Uuid::try_parse(&v).map_err(|_| "not a Scaleway secret key (a UUID)".to_owned())?;
        weak::secret_key(&key)?;
        c.upstream.secret_key = SecretString::from(v);
        Ok(())
    })
    .required("the Scaleway API secret key"),
    file(
        "SCW_DEFAULT_ORGANIZATION_ID",
        "upstream.organization_id",
        |c, v| {
            Uuid::try_parse(&v)
                .map(|id| c.upstream.organization_id = id)
                .map_err(|_| format!("`{v}` is not a UUID"))
        },
    )
    .required("the one organization this gateway serves"),
    file("SCW_API_URL", "upstream.url", |c, v| {
        parse_base_url(&v).map(|url| c.upstream.url = url)
    }),
    file("GATEWAY_LISTEN", "listen", |c, v| {
        v.parse::<SocketAddr>()
            .map(|addr| c.listen = addr)
            .map_err(|_| format!("`{v}` is not an address such as 127.0.0.1:8080"))
    }),
    file("GATEWAY_METRICS_LISTEN", "metrics.listen", |c, v| {
        v.parse::<SocketAddr>()
            .map(|addr| c.metrics_listen = Some(addr))
            .map_err(|_| format!("`{v}` is not an address such as 0.0.0.0:9090"))
    }),
    file("GATEWAY_POLICY_DIR", "policy.dir", |c, v| {
        c.policy_dir = PathBuf::from(v);
        Ok(())
    }),
    secret("GATEWAY_JWT_HS256_SECRET", "auth.hs256_secret", |c, v| {
        if v.len() < 32 {
            return Err("must be at least 32 bytes (256 bits) long".into());
        }
        weak::hs256_secret(&v)?;
        c.auth.hs256_secret = Some(SecretString::from(v));
        Ok(())
    }),
    file("GATEWAY_JWKS_URL", "auth.jwks_url", |c, v| {
        parse_http_url(&v).map(|url| c.auth.jwks_url = Some(url))
    }),
    file("GATEWAY_JWT_ISSUER", "auth.issuer", |c, v| {
        // Compared byte for byte with `iss`: kept exactly as written.
        c.auth.issuer = Some(v);
        Ok(())
    }),
    file("GATEWAY_JWT_AUDIENCE", "auth.audience", |c, v| {
        c.auth.audience = Some(v);
        Ok(())
    }),
    file("GATEWAY_JWT_LEEWAY", "auth.leeway", |c, v| {
        parse_duration(&v).map(|d| c.auth.leeway = d)
    }),
    file("GATEWAY_IDP_CA_FILE", "auth.ca_file", |c, v| {
        let path = PathBuf::from(v);
        crate::auth::idp_roots(&path)?;
        c.auth.ca_file = Some(path);
        Ok(())
    }),
    file("GATEWAY_CACHE_TTL", "cache.ttl", |c, v| {
        parse_duration(&v).map(|d| c.cache.ttl = d)
    }),
    file("GATEWAY_CACHE_CLOSED_TTL", "cache.closed_ttl", |c, v| {
        parse_duration(&v).map(|d| c.cache.closed_ttl = d)
    }),
    file(
        "GATEWAY_CACHE_STALE_IF_ERROR",
        "cache.stale_if_error",
        |c, v| parse_duration(&v).map(|d| c.cache.stale_if_error = d),
    ),
    file("GATEWAY_CACHE_MAX_BYTES", "cache.max_bytes", |c, v| {
        parse_size(&v).map(|n| c.cache.max_bytes = n)
    }),
    file(
        "GATEWAY_CACHE_BACKGROUND_REFRESH",
        "cache.background_refresh",
        |c, v| parse_bool(&v).map(|b| c.cache.background_refresh = b),
    ),
    file("GATEWAY_UPSTREAM_TIMEOUT", "upstream.timeout", |c, v| {
        parse_duration(&v).map(|d| c.upstream.timeout = d)
    }),
    file("GATEWAY_UPSTREAM_RATE", "upstream.rate", |c, v| {
        parse_rate(&v).map(|r| c.upstream.rate = r)
    }),
    file("GATEWAY_PRINCIPAL_RATE", "limits.principal_rate", |c, v| {
        parse_rate(&v).map(|r| c.limits.principal_rate = r)
    }),
    file(
        "GATEWAY_MAX_CONNECTIONS",
        "limits.max_connections",
        |c, v| match v.parse::<usize>() {
            Ok(n) if n > 0 => {
                c.limits.max_connections = Some(n);
                Ok(())
            }
            _ => Err(format!("`{v}` is not a connection count (1 or more)")),
        },
    ),
    file(
        "GATEWAY_IDLE_TIMEOUT",
        "limits.idle_timeout",
        |c, v| match parse_duration(&v)? {
            d if d.is_zero() => Err(format!("`{v}`: an idle timeout is longer than 0")),
            d => {
                c.limits.idle_timeout = d;
                Ok(())
            }
        },
    ),
    file("GATEWAY_LOG_FORMAT", "log.format", |c, v| {
        v.parse::<LogFormat>().map(|f| c.log_format = Some(f))
    }),
    file("GATEWAY_CORS_ORIGINS", "cors.origins", |c, v| {
        c.cors_origins = v
            .split(',')
            .map(str::trim)
            .filter(|o| !o.is_empty())
            .map(parse_origin)
            .collect::<Result<_, _>>()?;
        Ok(())
    }),
    // Half a pair is reported by `Config::gather`, which sees both.
    file("GATEWAY_TLS_CERT", "tls.cert", |c, v| {
        tls_files(c).cert = PathBuf::from(v);
        Ok(())
    }),
    file("GATEWAY_TLS_KEY", "tls.key", |c, v| {
        tls_files(c).key = PathBuf::from(v);
        Ok(())
    }),
    // A Redis URL may carry a password: a secret, like the keys; never echoed.
    secret("GATEWAY_REDIS_URL", "redis.url", |c, v| {
        for url in parse_redis_urls(&v)? {
            weak::redis_password(&url)?;
        }
        c.redis.url = Some(SecretString::from(v));
        Ok(())
    }),
    file("GATEWAY_REDIS_PREFIX", "redis.prefix", |c, v| {
        if v.is_empty() || v.chars().any(|ch| ch.is_whitespace() || ch.is_control()) {
            return Err(format!("`{v}` is not a key prefix (empty, or has spaces)"));
        }
        c.redis.prefix = Some(v);
        Ok(())
    }),
    file(
        "GATEWAY_REDIS_TIMEOUT",
        "redis.timeout",
        |c, v| match parse_duration(&v)? {
            d if d.is_zero() || d > Duration::from_secs(10) => Err(format!(
                "`{v}`: between 1ms and 10s (a request waits this long on Redis at most)"
            )),
            d => {
                c.redis.timeout = d;
                Ok(())
            }
        },
    ),
    file(
        "GATEWAY_REDIS_FALLBACK_REPLICAS",
        "redis.fallback_replicas",
        |c, v| match v.parse::<u32>() {
            Ok(n @ 1..=1000) => {
                c.redis.fallback_replicas = n;
                Ok(())
            }
            _ => Err(format!("`{v}` is not a replica count (1 to 1000)")),
        },
    ),
    file("GATEWAY_REDIS_CA_FILE", "redis.ca_file", |c, v| {
        let path = PathBuf::from(v);
        super::pem_certificates(&path)?;
        c.redis.ca_file = Some(path);
        Ok(())
    }),
    // OpenTelemetry's own names, so a collector's usual settings work unchanged.
    file(
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "tracing.otlp_endpoint",
        |c, v| parse_base_url(&v).map(|url| c.tracing.otlp_endpoint = Some(url)),
    ),
    file(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "tracing.otlp_traces_endpoint",
        |c, v| parse_http_url(&v).map(|url| c.tracing.otlp_traces_endpoint = Some(url)),
    ),
    file("OTEL_SERVICE_NAME", "tracing.service_name", |c, v| {
        c.tracing.service_name = v;
        Ok(())
    }),
    file("OTEL_SDK_DISABLED", "tracing.disabled", |c, v| {
        parse_bool(&v).map(|b| c.tracing.disabled = b)
    }),
    file(
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        "tracing.protocol",
        otlp_protocol,
    ),
    file(
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "tracing.traces_protocol",
        otlp_protocol,
    ),
];

fn parse_bool(v: &str) -> Result<bool, String> {
    match v.to_ascii_lowercase().as_str() {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(format!("`{v}` is neither true nor false")),
    }
}

/// Spans are exported over OTLP/HTTP with protobuf bodies only (no gRPC stack is built in).
fn otlp_protocol(_: &mut Config, v: String) -> Result<(), String> {
    if v == "http/protobuf" {
        Ok(())
    } else {
        Err(format!(
            "`{v}`: only http/protobuf is supported (point it at the collector's OTLP/HTTP port, 4318)"
        ))
    }
}

fn tls_files(c: &mut Config) -> &mut TlsFiles {
    c.tls.get_or_insert_with(|| TlsFiles {
        cert: PathBuf::new(),
        key: PathBuf::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_readme_documents_every_setting_of_the_table() {
        let readme = include_str!("../../README.md");
        for setting in SETTINGS {
            assert!(
                readme.contains(&format!("`{}`", setting.env)),
                "{}",
                setting.env
            );
            if let Place::File(key) = setting.place {
                assert!(readme.contains(&format!("`{key}`")), "{key}");
            }
        }
        let mut names: Vec<&str> = SETTINGS.iter().map(|s| s.env).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(
            names.len(),
            SETTINGS.len(),
            "a variable is in the table twice"
        );
    }
}
