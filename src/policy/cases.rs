//! Policy test cases: `<policy dir>/tests/*.toml`, run by `billing-gateway check` like
//! `opa test`, so a policy edit is reviewed together with what it lets through.
//!
//! ```toml
//! [[cases]]
//! name = "read-only cannot list invoices"       # optional
//! claims = { sub = "alice", roles = ["billing-read-only"] }   # or: key = "<[[keys]] name>"
//! method = "GET"                                 # default GET
//! path = "/billing/v2beta1/invoices?page=2"
//! expect = "deny"                                # "allow" | "deny"
//! message = "invoices:read"                      # deny only, optional: part of the denial
//!
//! [[cases]]
//! claims = '{"roles": ["billing-read-only"]}'    # claims may also be a JSON string
//! path = "/billing/v2beta1/consumptions"
//! expect = "allow"
//! upstream = "/billing/v2beta1/consumptions?organization_id={organization_id}"  # allow only, optional
//! ```
//!
//! A case is pure: [`crate::billing::parse`], [`crate::policy::decide`], then
//! [`crate::billing::Call::apply_organization`]; nothing is sent anywhere. `upstream` is the
//! request the gateway would send (path and query after validation, project scoping and the
//! organization fill-in); its query is compared as a set of pairs. `{organization_id}` in `path`
//! or `upstream` stands for the organization the run fills in.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{Map, Value};
use toml::Spanned;
use uuid::Uuid;

use super::load::{PolicyError, PolicySet};
use super::principal::Principal;
use crate::error::Error;

/// One file of cases, parsed and checked for shape.
#[derive(Debug)]
pub struct CaseFile {
    file: PathBuf,
    cases: Vec<Case>,
}

#[derive(Debug)]
struct Case {
    line: usize,
    name: Option<String>,
    who: Who,
    method: String,
    path: String,
    expect: Expect,
    upstream: Option<String>,
    message: Option<String>,
}

#[derive(Debug)]
enum Who {
    Claims(Map<String, Value>),
    Key(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Expect {
    Allow,
    Deny,
}

/// A case whose outcome is not the expected one.
#[derive(Debug)]
pub struct CaseFailure {
    /// The case file.
    pub file: PathBuf,
    /// The case's line in it.
    pub line: usize,
    /// 1-based position of the case in its file.
    pub index: usize,
    /// The case's `name`, when it has one.
    pub name: Option<String>,
    /// What happened instead, e.g. "expected allow, got deny: permission ...".
    pub reason: String,
}

impl fmt::Display for CaseFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}: case {}",
            self.file.display(),
            self.line,
            self.index
        )?;
        if let Some(name) = &self.name {
            write!(f, " ({name})")?;
        }
        write!(f, ": {}", self.reason)
    }
}

/// What a run found.
#[derive(Debug, Default)]
pub struct Report {
    /// How many cases ran.
    pub total: usize,
    /// The ones that did not behave as expected.
    pub failures: Vec<CaseFailure>,
}

/// Reads every `*.toml` in `dir` (the policy folder's `tests/`); no folder means no cases.
pub fn load_dir(dir: &Path) -> Result<Vec<CaseFile>, PolicyError> {
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let sources = PolicySet::read_sources(dir)?;
    from_sources(&sources)
}

/// Parses case files; `file` names each in errors.
pub fn from_sources(sources: &[(PathBuf, String)]) -> Result<Vec<CaseFile>, PolicyError> {
    sources
        .iter()
        .map(|(file, text)| {
            let at = |span: std::ops::Range<usize>, message: String| PolicyError {
                file: file.clone(),
                line: crate::config::line_at(text, span.start),
                message,
            };
            let doc: CasesDef = toml::from_str(text)
                .map_err(|e| at(e.span().unwrap_or(0..0), e.message().to_owned()))?;
            let cases = doc
                .cases
                .into_iter()
                .map(|c| {
                    let span = c.span();
                    let c = c.into_inner();
                    let bad = |m: &str| at(span.clone(), m.to_owned());
                    let who = match (c.claims, c.key) {
                        (Some(ClaimsDef::Table(m)), None) => Who::Claims(m),
                        (Some(ClaimsDef::Json(s)), None) => match serde_json::from_str(&s) {
                            Ok(Value::Object(m)) => Who::Claims(m),
                            _ => return Err(bad("`claims` must be a table or a JSON object")),
                        },
                        (None, Some(key)) => Who::Key(key),
                        _ => return Err(bad("a case needs exactly one of `claims` and `key`")),
                    };
                    if !c.path.starts_with('/') {
                        return Err(bad("`path` must start with `/`"));
                    }
                    if c.upstream.is_some() && c.expect == Expect::Deny {
                        return Err(bad("`upstream` is for cases expecting allow"));
                    }
                    if c.message.is_some() && c.expect == Expect::Allow {
                        return Err(bad("`message` is for cases expecting deny"));
                    }
                    Ok(Case {
                        line: crate::config::line_at(text, span.start),
                        name: c.name,
                        who,
                        method: c.method.to_ascii_uppercase(),
                        path: c.path,
                        expect: c.expect,
                        upstream: c.upstream,
                        message: c.message,
                    })
                })
                .collect::<Result<_, _>>()?;
            Ok(CaseFile {
                file: file.clone(),
                cases,
            })
        })
        .collect()
}

/// Runs every case against `policy`, filling in `organization_id` with `org`.
pub fn run(policy: &PolicySet, files: &[CaseFile], org: Uuid) -> Report {
    let mut report = Report::default();
    for file in files {
        for (i, case) in file.cases.iter().enumerate() {
            report.total += 1;
            if let Err(reason) = run_case(policy, case, org) {
                report.failures.push(CaseFailure {
                    file: file.file.clone(),
                    line: case.line,
                    index: i + 1,
                    name: case.name.clone(),
                    reason,
                });
            }
        }
    }
    report
}

fn run_case(policy: &PolicySet, case: &Case, org: Uuid) -> Result<(), String> {
    let principal = match &case.who {
        Who::Claims(claims) => {
            let subject = match claims.get("sub") {
                Some(Value::String(s)) => s.clone(),
                _ => "policy-test".to_owned(),
            };
            policy.principal_for_claims(subject, claims)
        }
        Who::Key(name) => policy
            .principal_for_key_name(name)
            .ok_or_else(|| format!("no [[keys]] entry is named `{name}`"))?,
    };
    let path = case.path.replace("{organization_id}", &org.to_string());
    let outcome = upstream_request(&principal, &case.method, &path, org);
    match (case.expect, outcome) {
        (Expect::Allow, Ok(actual)) => match &case.upstream {
            Some(expected) => {
                let expected = expected.replace("{organization_id}", &org.to_string());
                if same_request(&actual, &expected) {
                    Ok(())
                } else {
                    Err(format!(
                        "allowed, but the upstream request is `{actual}`, expected `{expected}`"
                    ))
                }
            }
            None => Ok(()),
        },
        (Expect::Deny, Ok(actual)) => Err(format!(
            "expected deny, got allow (upstream request `{actual}`)"
        )),
        (Expect::Allow, Err(Error::PermissionDenied { message, .. })) => {
            Err(format!("expected allow, got deny: {message}"))
        }
        (Expect::Deny, Err(Error::PermissionDenied { message, .. })) => match &case.message {
            Some(part) if !message.contains(part.as_str()) => Err(format!(
                "denied, but the message `{message}` does not contain `{part}`"
            )),
            _ => Ok(()),
        },
        (_, Err(e)) => Err(format!(
            "the request is refused before policy ({} {}): {}",
            e.status().as_u16(),
            e.kind(),
            refusal(&e)
        )),
    }
}

/// What the gateway would send upstream for this caller, or why it would not.
fn upstream_request(
    principal: &Principal,
    method: &str,
    path_and_query: &str,
    org: Uuid,
) -> Result<String, Error> {
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    };
    let mut call = crate::billing::parse(method, path, query)?;
    super::decide(principal, &mut call)?;
    call.apply_organization(org)?;
    let query = call.query_string();
    Ok(if query.is_empty() {
        call.path()
    } else {
        format!("{}?{query}", call.path())
    })
}

/// Same path and the same query pairs, in any order.
fn same_request(actual: &str, expected: &str) -> bool {
    let split = |s: &str| {
        let (path, query) = s.split_once('?').unwrap_or((s, ""));
        let mut pairs: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        pairs.sort();
        (path.to_owned(), pairs)
    };
    split(actual) == split(expected)
}

fn refusal(e: &Error) -> String {
    match e {
        Error::InvalidArguments(args) => args
            .iter()
            .map(|a| format!("{}: {}", a.argument_name, a.help_message))
            .collect::<Vec<_>>()
            .join("; "),
        Error::NotFound => "no Billing operation has this path".to_owned(),
        other => other.to_string(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CasesDef {
    #[serde(default)]
    cases: Vec<Spanned<CaseDef>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseDef {
    name: Option<String>,
    claims: Option<ClaimsDef>,
    key: Option<String>,
    #[serde(default = "get")]
    method: String,
    path: String,
    expect: Expect,
    upstream: Option<String>,
    message: Option<String>,
}

fn get() -> String {
    "GET".to_owned()
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ClaimsDef {
    Json(String),
    Table(Map<String, Value>),
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT: &str = include_str!("../../policies/default.toml");
    const ORG: &str = "11111111-2222-3333-4444-555555555555";
    const P1: &str = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee";

    fn policy() -> PolicySet {
        let keys = crate::policy::KeyEntry {
            name: "web-report",
            sha256: "ab".repeat(32),
            roles: &["billing-read-only"],
            projects: &[P1],
        }
        .to_toml()
        .expect("TOML");
        PolicySet::from_sources(&[
            ("default.toml".into(), DEFAULT.into()),
            ("keys.toml".into(), keys),
        ])
        .expect("policy")
    }

    fn run_text(text: &str) -> Report {
        let files = from_sources(&[("t.toml".into(), text.to_owned())]).expect("cases parse");
        run(&policy(), &files, ORG.parse().expect("uuid"))
    }

    #[test]
    fn passing_cases_pass() {
        let report = run_text(&format!(
            r#"
[[cases]]
claims = {{ roles = ["billing-read-only"] }}
path = "/billing/v2beta1/invoices"
expect = "deny"
message = "invoices:read"

[[cases]]
claims = '{{"roles": "billing-manager"}}'
path = "/billing/v2beta1/invoices?page=2"
expect = "allow"
upstream = "/billing/v2beta1/invoices?page=2&organization_id={{organization_id}}"

[[cases]]
key = "web-report"
path = "/billing/v2beta1/consumptions"
expect = "allow"
upstream = "/billing/v2beta1/consumptions?project_id={P1}"
"#
        ));
        assert_eq!(report.total, 3);
        assert!(report.failures.is_empty(), "{:?}", report.failures);
    }

    #[test]
    fn failures_say_what_happened_instead() {
        let report = run_text(
            r#"
[[cases]]
name = "reader reads invoices"
claims = { roles = ["billing-read-only"] }
path = "/billing/v2beta1/invoices"
expect = "allow"

[[cases]]
claims = { roles = ["billing-manager"] }
path = "/billing/v2beta1/taxes"
expect = "deny"

[[cases]]
claims = { roles = ["billing-manager"] }
path = "/billing/v2beta1/taxes"
expect = "allow"
upstream = "/billing/v2beta1/taxes"

[[cases]]
key = "ghost"
path = "/billing/v2beta1/taxes"
expect = "allow"

[[cases]]
claims = { roles = ["billing-manager"] }
path = "/billing/v2beta1/taxes?colour=red"
expect = "allow"
"#,
        );
        let lines: Vec<String> = report.failures.iter().map(ToString::to_string).collect();
        assert_eq!(lines.len(), 5, "{lines:#?}");
        assert!(
            lines[0].starts_with(
                "t.toml:2: case 1 (reader reads invoices): expected allow, got deny: permission `invoices:read` is required"
            ),
            "{}",
            lines[0]
        );
        assert!(
            lines[1].contains("case 2: expected deny, got allow (upstream request `/billing/v2beta1/taxes?organization_id=11111111-"),
            "{}",
            lines[1]
        );
        assert!(
            lines[2].contains("expected `/billing/v2beta1/taxes`"),
            "{}",
            lines[2]
        );
        assert!(lines[3].ends_with("no [[keys]] entry is named `ghost`"));
        assert!(
            lines[4].contains("refused before policy (400 invalid_arguments): colour"),
            "{}",
            lines[4]
        );
    }

    #[test]
    fn malformed_cases_are_located() {
        let e = from_sources(&[(
            "t.toml".into(),
            "[[cases]]\npath = \"/billing/v2beta1/taxes\"\nexpect = \"allow\"\n".into(),
        )])
        .expect_err("no principal");
        assert_eq!(
            e.to_string(),
            "t.toml:1: a case needs exactly one of `claims` and `key`"
        );
        let e = from_sources(&[(
            "t.toml".into(),
            "[[cases]]\nkey = \"k\"\npath = \"/x\"\nexpect = \"maybe\"\n".into(),
        )])
        .expect_err("bad expect");
        assert_eq!(e.line, 4, "{e}");
    }
}
