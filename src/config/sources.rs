//! Reading the settings ([`Config::load`], [`Config::gather`], [`Config::apply_env`]): the
//! environment (which wins), the secrets' `_FILE` variants and the TOML file, each through the
//! one table of [`super::settings`], then the rules between settings. There is no mirror struct of
//! the file: a key the table does not know is an unknown key. Values in the file are TOML
//! strings (`timeout = "30s"`), exactly what the variable would hold.
//!
//! Every problem is collected rather than returned at the first, each naming the variable or
//! the `file:line` it came from, so one run of `check` or `serve` lists them all.

use std::path::Path;

use secrecy::SecretString;
use toml::de::{DeTable, DeValue};
use uuid::Uuid;

use super::locate::{line_at, syntax_error_at};
use super::settings::{Place, SETTINGS, Setting};
use super::{Config, ConfigErrors, DEFAULT_API_URL, Needs, Problem, TlsFiles};

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

impl Config {
    /// Reads `file` (or `gateway.toml` when present) and the environment through `env`; every
    /// problem, or a configuration `needs` can run with.
    pub fn load(
        file: Option<&Path>,
        env: &dyn Fn(&str) -> Option<String>,
        needs: Needs,
    ) -> Result<Config, ConfigErrors> {
        match Config::gather(file, env, needs) {
            (config, problems) if problems.is_empty() => Ok(config),
            (_, problems) => Err(ConfigErrors(problems)),
        }
    }

    /// [`Config::load`] without the verdict: every setting that could be read (defaults for
    /// the rest, a nil organization and an empty key when missing) and every problem. For
    /// `check`, which goes on to the policy folder to report its problems in the same run; a
    /// configuration with problems must never serve.
    pub fn gather(
        file: Option<&Path>,
        env: &dyn Fn(&str) -> Option<String>,
        needs: Needs,
    ) -> (Config, Vec<Problem>) {
        let (mut config, mut problems) = read(file, env, needs);
        if let Some(TlsFiles { cert, key }) = &config.tls
            && (cert.as_os_str().is_empty() || key.as_os_str().is_empty())
        {
            problems.push(Problem::between(
                "GATEWAY_TLS_CERT and GATEWAY_TLS_KEY (tls.cert, tls.key) go together: set both \
                 or neither",
            ));
            config.tls = None;
        }
        if let (None, None, Some(issuer)) = (
            config.auth.key_source(),
            &config.auth.hs256_secret,
            &config.auth.issuer,
        ) {
            problems.push(Problem::at(
                "GATEWAY_JWT_ISSUER",
                format!(
                    "`{issuer}` is not an http(s) URL, so no JWKS can be discovered from it; \
                     set GATEWAY_JWKS_URL or GATEWAY_JWT_HS256_SECRET"
                ),
            ));
        }
        (config, problems)
    }

    /// Overrides the named settings from the environment only (the file is not read): `demo`
    /// takes its rates this way, through the same parsers as `serve`.
    pub fn apply_env(
        &mut self,
        names: &[&str],
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<(), ConfigErrors> {
        match overlay(self, names, env) {
            problems if problems.is_empty() => Ok(()),
            problems => Err(ConfigErrors(problems)),
        }
    }
}

/// Reads every setting from `env` (which wins) and the file, starting from [`Config::new`]'s
/// defaults; returns what could be read and every problem met.
fn read(
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
fn overlay(
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| vars.get(k).cloned()
    }

    fn document<'a>(text: &'a str, problems: &mut Vec<Problem>) -> Document<'a> {
        parse(Path::new("g.toml"), text, problems)
    }

    #[test]
    fn an_empty_variable_is_no_value() {
        let env = env_of(&[("SET", "x"), ("EMPTY", "")]);
        assert_eq!(from_env(&env, "SET").as_deref(), Some("x"));
        assert_eq!(from_env(&env, "EMPTY"), None);
        assert_eq!(from_env(&env, "UNSET"), None);
    }

    #[test]
    fn a_secret_is_read_from_its_variable_first_then_from_the_file_its_file_variant_names() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("secret");
        std::fs::write(&path, "s3cret\r\n\n").expect("write");
        let path = path.to_str().expect("utf-8");
        let mut problems = Vec::new();

        let env = env_of(&[("S", "direct"), ("S_FILE", path)]);
        let Lookup::Found(found) = read_secret(&env, "S", &mut problems) else {
            panic!("the variable is set")
        };
        assert_eq!((found.value.as_str(), found.at.as_str()), ("direct", "S"));

        let env = env_of(&[("S_FILE", path)]);
        let Lookup::Found(found) = read_secret(&env, "S", &mut problems) else {
            panic!("the file is named")
        };
        // The newlines editors add are not part of the secret.
        assert_eq!(
            (found.value.as_str(), found.at.as_str()),
            ("s3cret", "S_FILE")
        );
        assert!(problems.is_empty(), "{problems:?}");

        assert!(matches!(
            read_secret(&env_of(&[]), "S", &mut problems),
            Lookup::Missing
        ));
        let env = env_of(&[("S_FILE", "/nonexistent/secret")]);
        assert!(matches!(
            read_secret(&env, "S", &mut problems),
            Lookup::Failed
        ));
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].at.as_deref(), Some("S_FILE"));
        assert!(
            problems[0]
                .message
                .starts_with("cannot read /nonexistent/secret: "),
            "{}",
            problems[0].message
        );
    }

    #[test]
    fn a_file_value_is_found_by_its_dotted_key_at_its_line_and_must_be_a_string() {
        let text =
            "listen = \"127.0.0.1:0\"\n[cache]\nttl = \"5m\"\nclosed_ttl = 5\nmax_bytes = \"\"\n";
        let mut problems = Vec::new();
        let doc = document(text, &mut problems);
        assert!(problems.is_empty(), "{problems:?}");

        let Lookup::Found(found) = doc.get("cache.ttl", &mut problems) else {
            panic!("cache.ttl is set")
        };
        assert_eq!(
            (found.value.as_str(), found.at.as_str(), found.key),
            ("5m", "g.toml:3", Some("cache.ttl"))
        );
        // Absent, empty (no value, as for a variable), or a scalar where a table should be.
        for key in ["cache.stale_if_error", "cache.max_bytes", "listen.port"] {
            assert!(
                matches!(doc.get(key, &mut problems), Lookup::Missing),
                "{key}"
            );
        }
        assert!(problems.is_empty(), "{problems:?}");

        assert!(matches!(
            doc.get("cache.closed_ttl", &mut problems),
            Lookup::Failed
        ));
        assert_eq!(
            problems,
            [Problem::at(
                "g.toml:4",
                "cache.closed_ttl: must be a quoted string, as the variable would hold it \
                 (found integer)"
            )]
        );
    }

    #[test]
    fn an_unknown_key_is_reported_at_its_line_with_the_keys_known_at_its_level() {
        let text =
            "lisen = \"x\"\n[cache]\nttl = \"5m\"\ntll = \"5m\"\n[upstream]\nsecret_key = \"k\"\n";
        let mut problems = Vec::new();
        let doc = document(text, &mut problems);
        let mut unknown = Vec::new();
        doc.unknown_keys(&doc.table, "", &mut unknown);
        unknown.sort_by_key(|(line, _)| *line);
        let lines: Vec<usize> = unknown.iter().map(|(line, _)| *line).collect();
        assert_eq!(lines, [1, 4, 6]);
        let messages: Vec<&str> = unknown.iter().map(|(_, p)| p.message.as_str()).collect();
        assert!(
            messages[0].starts_with("unknown key `lisen` (known at the top level: ")
                && messages[0].contains("listen"),
            "{}",
            messages[0]
        );
        assert!(
            messages[1].starts_with("unknown key `cache.tll` (known in [cache]: ttl, "),
            "{}",
            messages[1]
        );
        assert_eq!(
            messages[2],
            "upstream.secret_key: secrets are never read from the configuration file; set \
             SCW_SECRET_KEY or SCW_SECRET_KEY_FILE"
        );
    }

    #[test]
    fn a_syntax_error_is_recorded_at_its_line_and_the_rest_of_the_file_is_kept() {
        let mut problems = Vec::new();
        let doc = document("listen = \"127.0.0.1:0\"\nbroken\n", &mut problems);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].at.as_deref(), Some("g.toml:2"));
        assert!(matches!(doc.get("listen", &mut problems), Lookup::Found(_)));
    }

    #[test]
    fn an_overlay_applies_only_the_named_settings_and_refuses_a_name_outside_the_table() {
        let mut config = Config::new(
            DEFAULT_API_URL,
            Uuid::nil(),
            SecretString::from(String::new()),
        );
        let env = env_of(&[
            ("GATEWAY_UPSTREAM_RATE", "5/s"),
            ("GATEWAY_PRINCIPAL_RATE", "1/s"),
        ]);
        let problems = overlay(
            &mut config,
            &["GATEWAY_UPSTREAM_RATE", "NOT_A_SETTING"],
            &env,
        );
        assert_eq!(
            problems,
            [Problem::at(
                "NOT_A_SETTING",
                "not a setting of this gateway"
            )]
        );
        assert_eq!(config.upstream.rate.count, 5);
        assert_eq!(
            config.limits.principal_rate.count, 25,
            "not named: the default"
        );
    }
}
