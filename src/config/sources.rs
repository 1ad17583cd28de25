//! Where each setting comes from: [`SETTINGS`], the one table of environment variable, file key
//! and parser, and the reading of the environment and the TOML file through it.
//!
//! A setting is one row here plus its field in [`Config`]: the environment lookup, the file
//! lookup, the unknown-key check and the "required" check all walk this table, so they cannot
//! disagree, and the env and file spellings of a value go through the same parser. There is no
//! mirror struct of the file: a key the table does not know is an unknown key. Values in the
//! file are TOML strings (`timeout = "30s"`), exactly what the variable would hold.
//!
//! Every problem is collected rather than returned at the first, each naming the variable or
//! the `file:line` it came from, so one run of `check` or `serve` lists them all.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::SecretString;
use toml::de::{DeTable, DeValue};
use uuid::Uuid;

use super::units::{
    parse_base_url, parse_duration, parse_http_url, parse_origin, parse_rate, parse_size,
};
use super::weak;
use super::{Config, DEFAULT_API_URL, LogFormat, Needs, Problem, TlsFiles};

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
        weak::redis_password(&parse_redis_url(&v)?)?;
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

/// Checks a Redis URL's form without connecting; the message never repeats the URL, which may
/// hold a password.
pub(crate) fn parse_redis_url(v: &str) -> Result<url::Url, String> {
    let url = url::Url::parse(v).map_err(|e| format!("not a URL ({e})"))?;
    if !matches!(url.scheme(), "redis" | "rediss") {
        return Err("not a redis:// or rediss:// URL".to_owned());
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("a redis:// URL names a host".to_owned());
    }
    let db = url.path().trim_start_matches('/');
    if !db.is_empty() && db.parse::<u16>().is_err() {
        return Err("the path of a redis:// URL is a database number".to_owned());
    }
    Ok(url)
}

fn tls_files(c: &mut Config) -> &mut TlsFiles {
    c.tls.get_or_insert_with(|| TlsFiles {
        cert: PathBuf::new(),
        key: PathBuf::new(),
    })
}

/// A value as found, and where, for messages.
struct Found {
    value: String,
    /// The variable, or `file:line`.
    at: String,
    /// The file key, when it came from the file.
    key: Option<&'static str>,
}

/// The outcome of looking a setting up.
enum Lookup {
    Found(Found),
    Missing,
    /// Present but unreadable; the problem is already recorded.
    Failed,
}

/// The configuration file, parsed.
struct Document<'a> {
    path: &'a Path,
    text: &'a str,
    table: DeTable<'a>,
}

/// Reads every setting from `env` (which wins) and the file, starting from [`Config::new`]'s
/// defaults; returns what could be read and every problem met.
pub(super) fn gather(
    file: Option<&Path>,
    env: &dyn Fn(&str) -> Option<String>,
    needs: Needs,
) -> (Config, Vec<Problem>) {
    let mut problems = Vec::new();
    let default_file = Path::new("gateway.toml");
    let path = file.or_else(|| default_file.exists().then_some(default_file));
    let text = path.and_then(|path| match std::fs::read_to_string(path) {
        Ok(text) => Some(text),
        Err(e) => {
            problems.push(Problem::at(path.display(), format!("cannot read: {e}")));
            None
        }
    });
    let doc = match (path, &text) {
        (Some(path), Some(text)) => Some(parse(path, text, &mut problems)),
        _ => None,
    };

    let mut config = Config::new(
        DEFAULT_API_URL,
        Uuid::nil(),
        SecretString::from(String::new()),
    );
    for setting in SETTINGS {
        let found = match setting.place {
            Place::Secret { .. } => read_secret(env, setting.env, &mut problems),
            Place::File(key) => match from_env(env, setting.env) {
                Some(value) => Lookup::Found(Found {
                    value,
                    at: setting.env.to_owned(),
                    key: None,
                }),
                None => doc
                    .as_ref()
                    .map_or(Lookup::Missing, |doc| doc.get(key, &mut problems)),
            },
        };
        match found {
            Lookup::Found(found) => {
                if let Err(e) = (setting.apply)(&mut config, found.value) {
                    let message = match found.key {
                        Some(key) => format!("{key}: {e}"),
                        None => e,
                    };
                    problems.push(Problem::at(found.at, message));
                }
            }
            Lookup::Missing => {
                if let (Some(what), Needs::Serve) = (setting.required, needs) {
                    problems.push(missing(setting, what));
                }
            }
            Lookup::Failed => {}
        }
    }
    if let Some(doc) = &doc {
        let mut unknown = Vec::new();
        doc.unknown_keys(&doc.table, "", &mut unknown);
        unknown.sort_by_key(|(line, _)| *line);
        problems.extend(unknown.into_iter().map(|(_, p)| p));
    }
    (config, problems)
}

/// Applies only the named settings, from the environment only, over `config`.
pub(super) fn overlay(
    config: &mut Config,
    names: &[&str],
    env: &dyn Fn(&str) -> Option<String>,
) -> Vec<Problem> {
    let mut problems = Vec::new();
    for name in names {
        let Some(setting) = SETTINGS.iter().find(|s| s.env == *name) else {
            problems.push(Problem::at(name, "not a setting of this gateway"));
            continue;
        };
        if let Some(value) = from_env(env, name)
            && let Err(e) = (setting.apply)(config, value)
        {
            problems.push(Problem::at(name, e));
        }
    }
    problems
}

fn missing(setting: &Setting, what: &str) -> Problem {
    let alternative = match setting.place {
        Place::File(key) => format!("or `{key}` in the configuration file"),
        Place::Secret { .. } => format!("or {}_FILE naming a file that holds it", setting.env),
    };
    Problem::at(
        setting.env,
        format!("missing: {what} (set it, {alternative})"),
    )
}

/// An unset or empty variable is no value: `FOO=` in a unit file is how one unsets it.
fn from_env(env: &dyn Fn(&str) -> Option<String>, name: &str) -> Option<String> {
    env(name).filter(|v| !v.is_empty())
}

/// A secret from `NAME`, or from the file `NAME_FILE` names (a Kubernetes or Docker secret
/// mount), without the trailing newline editors add.
fn read_secret(
    env: &dyn Fn(&str) -> Option<String>,
    name: &str,
    problems: &mut Vec<Problem>,
) -> Lookup {
    if let Some(value) = from_env(env, name) {
        return Lookup::Found(Found {
            value,
            at: name.to_owned(),
            key: None,
        });
    }
    let var = format!("{name}_FILE");
    let Some(path) = from_env(env, &var) else {
        return Lookup::Missing;
    };
    match std::fs::read_to_string(&path) {
        Ok(mut value) => {
            // Truncated in place: no second copy of the secret is made.
            let len = value.trim_end_matches(['\r', '\n']).len();
            value.truncate(len);
            Lookup::Found(Found {
                value,
                at: var,
                key: None,
            })
        }
        Err(e) => {
            problems.push(Problem::at(var, format!("cannot read {path}: {e}")));
            Lookup::Failed
        }
    }
}

/// Parses the file, recording every syntax error (`file:line`); what could be parsed is kept.
fn parse<'a>(path: &'a Path, text: &'a str, problems: &mut Vec<Problem>) -> Document<'a> {
    let (table, errors) = DeTable::parse_recoverable(text);
    for e in errors {
        let offset = e.span().map_or(0, |s| s.start);
        let (line, message) = syntax_error_at(text, offset, e.message());
        problems.push(Problem::at(format!("{}:{line}", path.display()), message));
        if line != line_at(text, offset) {
            // A value left open: the parser's later complaints are about the rest of the file
            // read as part of it, and would only mislead.
            break;
        }
    }
    Document {
        path,
        text,
        table: table.into_inner(),
    }
}

impl Document<'_> {
    fn position(&self, span: std::ops::Range<usize>) -> String {
        format!("{}:{}", self.path.display(), line_at(self.text, span.start))
    }

    /// The string at dotted `key`.
    fn get(&self, key: &'static str, problems: &mut Vec<Problem>) -> Lookup {
        let mut table = &self.table;
        let mut segments = key.split('.').peekable();
        while let Some(segment) = segments.next() {
            let Some(value) = table.get(segment) else {
                return Lookup::Missing;
            };
            match (value.get_ref(), segments.peek()) {
                (DeValue::Table(inner), Some(_)) => table = inner,
                // A scalar where a table should be: reported by `unknown_keys`.
                (_, Some(_)) => return Lookup::Missing,
                (DeValue::String(s), None) if s.is_empty() => return Lookup::Missing,
                (DeValue::String(s), None) => {
                    return Lookup::Found(Found {
                        value: s.to_string(),
                        at: self.position(value.span()),
                        key: Some(key),
                    });
                }
                (other, None) => {
                    problems.push(Problem::at(
                        self.position(value.span()),
                        format!(
                            "{key}: must be a quoted string, as the variable would hold it \
                             (found {})",
                            other.type_str()
                        ),
                    ));
                    return Lookup::Failed;
                }
            }
        }
        Lookup::Missing
    }

    /// Every key of the file the table does not know, with its line.
    fn unknown_keys(&self, table: &DeTable<'_>, prefix: &str, out: &mut Vec<(usize, Problem)>) {
        for (key, value) in table {
            let path = format!("{prefix}{}", key.get_ref());
            let line = line_at(self.text, key.span().start);
            let at = format!("{}:{line}", self.path.display());
            let known = |p: &Place| matches!(p, Place::File(k) if *k == path);
            if SETTINGS.iter().any(|s| known(&s.place)) {
                continue;
            }
            if let Some(s) = SETTINGS
                .iter()
                .find(|s| matches!(s.place, Place::Secret { refused } if refused == path))
            {
                let message = format!(
                    "{path}: secrets are never read from the configuration file; set {0} or \
                     {0}_FILE",
                    s.env
                );
                out.push((line, Problem::at(at, message)));
                continue;
            }
            let below = format!("{path}.");
            let is_section = file_keys().any(|k| k.starts_with(&below));
            match value.get_ref() {
                DeValue::Table(inner) if is_section => self.unknown_keys(inner, &below, out),
                _ if is_section => out.push((
                    line,
                    Problem::at(at, format!("{path}: must be a table such as [{path}]")),
                )),
                _ => out.push((line, Problem::at(at, unknown(&path, prefix)))),
            }
        }
    }
}

fn file_keys() -> impl Iterator<Item = &'static str> {
    SETTINGS.iter().filter_map(|s| match s.place {
        Place::File(key) => Some(key),
        Place::Secret { .. } => None,
    })
}

/// "unknown key", with the keys that do exist at that level (typos are the usual cause).
fn unknown(path: &str, prefix: &str) -> String {
    let mut known: Vec<&str> = Vec::new();
    for key in file_keys().filter_map(|k| k.strip_prefix(prefix)) {
        let name = key.split('.').next().unwrap_or(key);
        if !known.contains(&name) {
            known.push(name);
        }
    }
    let place = match prefix.strip_suffix('.') {
        Some(table) => format!("in [{table}]"),
        None => "at the top level".to_owned(),
    };
    format!("unknown key `{path}` (known {place}: {})", known.join(", "))
}

/// Where a TOML syntax error found at byte `offset` really is, and its message worded for it.
///
/// The parser notices a missing `]`, `}` or closing `"""` only at the next token, which may be
/// several lines later (past blank lines, at the next table header, at the end of the file).
/// When the error is the first thing on its line, the lines before it are re-parsed alone: while
/// they still end inside an unfinished value, the value began earlier, and the line it began on
/// is the one reported, the message adding where the parser stopped.
pub fn syntax_error_at(text: &str, offset: usize, message: &str) -> (usize, String) {
    let offset = offset.min(text.len());
    let stopped = line_at(text, offset);
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    if !text[line_start..offset].trim().is_empty() {
        return (stopped, message.to_owned());
    }
    // `end`: the start of a line; `text[..end]` the lines before it.
    let mut end = line_start;
    let mut opened = None;
    for _ in 0..MAX_LINES_BACK {
        if end == 0 || !unfinished(&text[..end]) {
            break;
        }
        end = text[..end - 1].rfind('\n').map_or(0, |i| i + 1);
        opened = Some(line_at(text, end));
    }
    match opened {
        Some(line) if line != stopped => {
            let at = if offset == text.len() {
                "the end of the file".to_owned()
            } else {
                format!("line {stopped}")
            };
            let message = format!(
                "{message} (the value begun on this line is still open at {at}: is a closing \
                 bracket, brace or quote missing?)"
            );
            (line, message)
        }
        _ => (stopped, message.to_owned()),
    }
}

/// How far back [`syntax_error_at`] looks for the start of an unfinished value.
const MAX_LINES_BACK: usize = 500;

/// Whether `text` (whole lines) ends inside a value: it fails to parse, at its very end.
fn unfinished(text: &str) -> bool {
    match DeTable::parse(text) {
        Ok(_) => false,
        Err(e) => e.span().is_some_and(|s| s.start >= text.trim_end().len()),
    }
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
