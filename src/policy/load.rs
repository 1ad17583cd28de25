//! Reading the policy: every `*.toml` of the policy folder, parsed into the TOML definitions
//! below, checked, and merged into one [`PolicySet`]. Every problem is a [`PolicyError`] located
//! at `file:line`, for the operator who wrote it. Roles are read from every file before any
//! binding or key, so those may name a role defined in another file.
//!
//! The set answers who a token's claims or a gateway key make the caller; how a claim matches
//! (`claims.rs`) and how a key is checked and found (`keys.rs`) are theirs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use serde_json::{Map, Value};
use toml::Spanned;
use uuid::Uuid;

use super::claims::{self, Binding, claim_path};
use super::keys::{self, Key, KeyDef};
use super::principal::{Class, DEFAULT_SHARE, Grant, MAX_SHARE, Principal, most_generous};
use crate::billing::{Permission, Permissions};
use crate::config::{Rate, parse_rate};
use crate::costs::Money;

/// A policy file problem, located for the operator: `file:line: what is wrong`.
#[derive(Debug, thiserror::Error)]
#[error("{}:{line}: {message}", file.display())]
pub struct PolicyError {
    /// The file at fault.
    pub file: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

/// All policy files merged.
#[derive(Debug, Clone, Default)]
pub struct PolicySet {
    pub(super) roles: BTreeMap<String, Role>,
    pub(super) bindings: Vec<Binding>,
    pub(super) keys: Vec<Key>,
    /// Monthly budgets by project (contract §12), and where each was set.
    pub(super) budgets: BTreeMap<Uuid, (Money, PathBuf, usize)>,
}

#[derive(Debug, Clone)]
pub(super) struct Role {
    permissions: Permissions,
    rate: Option<Rate>,
    share: Option<u32>,
    file: PathBuf,
}

impl PolicySet {
    /// Reads every `*.toml` directly in `dir` (sub-folders such as `tests/` are not policy).
    pub fn load_dir(dir: &Path) -> Result<PolicySet, PolicyError> {
        PolicySet::from_sources(&PolicySet::read_sources(dir)?)
    }

    /// The policy files of `dir` and their texts, sorted by path: what [`PolicySet::load_dir`]
    /// parses, and what the reloader compares to notice an edit. Symbolic links are followed
    /// (Kubernetes mounts a ConfigMap as links into a `..data` folder it swaps).
    pub fn read_sources(dir: &Path) -> Result<Vec<(PathBuf, String)>, PolicyError> {
        let at_dir = |message: String| PolicyError {
            file: dir.to_owned(),
            line: 1,
            message,
        };
        let entries = std::fs::read_dir(dir)
            .map_err(|e| at_dir(format!("cannot read the policy folder: {e}")))?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(at_dir(
                "no *.toml policy file: every request would be denied".into(),
            ));
        }
        let mut sources = Vec::with_capacity(files.len());
        for file in files {
            let text = std::fs::read_to_string(&file).map_err(|e| PolicyError {
                file: file.clone(),
                line: 1,
                message: format!("cannot read: {e}"),
            })?;
            sources.push((file, text));
        }
        Ok(sources)
    }

    /// Merges policy texts; `file` names each in errors.
    pub fn from_sources(sources: &[(PathBuf, String)]) -> Result<PolicySet, PolicyError> {
        let mut set = PolicySet::default();
        let mut parsed = Vec::with_capacity(sources.len());
        for (file, text) in sources {
            let at = |span: std::ops::Range<usize>, message: String| PolicyError {
                file: file.clone(),
                line: crate::config::line_at(text, span.start),
                message,
            };
            let doc: PolicyFile = toml::from_str(text).map_err(|e| {
                let offset = e.span().map_or(0, |s| s.start);
                match toml::de::DeTable::parse(text) {
                    // Not TOML at all: located where the unfinished value began, if one did.
                    Err(_) => {
                        let (line, message) =
                            crate::config::syntax_error_at(text, offset, e.message());
                        PolicyError {
                            file: file.clone(),
                            line,
                            message,
                        }
                    }
                    Ok(_) => at(offset..offset, e.message().to_owned()),
                }
            })?;
            for (name, role) in doc.roles {
                let span = role.span();
                if let Some(first) = set.roles.get(&name) {
                    return Err(at(
                        span,
                        format!(
                            "role `{name}` is already defined in {}",
                            first.file.display()
                        ),
                    ));
                }
                let mut permissions = Permissions::default();
                for p in &role.get_ref().permissions {
                    permissions.insert(Permission::parse(p.get_ref()).ok_or_else(|| {
                        at(p.span(), format!("unknown permission `{}`", p.get_ref()))
                    })?);
                }
                let rate = rate(role.get_ref().rate.as_ref(), &at)?;
                let share = share(role.get_ref().share.as_ref(), &at)?;
                set.roles.insert(
                    name,
                    Role {
                        permissions,
                        rate,
                        share,
                        file: file.clone(),
                    },
                );
            }
            for b in doc.budgets {
                add_budget(&mut set.budgets, b, file, text, &at)?;
            }
            parsed.push((at, doc.bindings, doc.keys));
        }
        // Roles first, from every file: a binding or key may name a role defined in another file.
        for (at, bindings, keys) in parsed {
            for b in bindings {
                let claim = b.claim.get_ref();
                let Some(path) = claim_path(claim) else {
                    return Err(at(b.claim.span(), format!("`{claim}` is not a claim path")));
                };
                let grant = grant(&set.roles, &b.roles, b.projects.as_deref(), &at)?;
                set.bindings.push(Binding {
                    claim: path,
                    equals: b.equals,
                    grant,
                });
            }
            for k in keys {
                let roles = &set.roles;
                keys::add(&mut set.keys, k, &at, |k| {
                    let mut grant = grant(roles, &k.roles, k.projects.as_deref(), &at)?;
                    if let Some(own) = rate(k.rate.as_ref(), &at)? {
                        grant.rate = Some(own);
                    }
                    if let Some(own) = share(k.share.as_ref(), &at)? {
                        grant.share = Some(own);
                    }
                    Ok(grant)
                })?;
            }
        }
        Ok(set)
    }

    /// The grants every binding matching these claims gives.
    pub fn grants_for_claims(&self, claims: &Map<String, Value>) -> Vec<Grant> {
        claims::grants(&self.bindings, claims)
    }

    /// The caller a verified token describes: its subject and every grant its claims match.
    pub fn principal_for_claims(&self, subject: String, claims: &Map<String, Value>) -> Principal {
        Principal {
            subject,
            grants: self.grants_for_claims(claims),
        }
    }

    /// The caller a gateway key identifies, or `None` for an unknown key (found in constant
    /// time: see `keys.rs`).
    pub fn principal_for_key(&self, key: &Uuid) -> Option<Principal> {
        keys::find(&self.keys, key).map(Key::principal)
    }

    /// The caller a `[[keys]]` entry describes, by its name (policy test cases name keys, since
    /// the keys themselves are nowhere to be found).
    pub fn principal_for_key_name(&self, name: &str) -> Option<Principal> {
        self.keys
            .iter()
            .find(|k| k.name() == name)
            .map(Key::principal)
    }

    /// Whether any gateway key is defined: with no JWT method configured, keys are the only way in.
    pub fn has_keys(&self) -> bool {
        !self.keys.is_empty()
    }

    /// Every project's monthly budget.
    pub fn budgets(&self) -> BTreeMap<Uuid, Money> {
        self.budgets
            .iter()
            .map(|(id, (money, _, _))| (*id, money.clone()))
            .collect()
    }

    /// Role names, for `check`'s summary.
    pub fn role_names(&self) -> impl Iterator<Item = &str> {
        self.roles.keys().map(String::as_str)
    }

    /// `roles: N, bindings: N, keys: N`, for `check` and reload log lines.
    pub fn summary(&self) -> String {
        let mut summary = format!(
            "roles: {}, bindings: {}, keys: {}",
            self.roles.len(),
            self.bindings.len(),
            self.keys.len()
        );
        if !self.budgets.is_empty() {
            summary.push_str(&format!(", budgets: {}", self.budgets.len()));
        }
        summary
    }
}

/// Checks one `[[budgets]]` entry of `file` and adds it: a project budgeted twice, in this file
/// or another, is an error naming where the first budget is.
fn add_budget(
    budgets: &mut BTreeMap<Uuid, (Money, PathBuf, usize)>,
    b: BudgetDef,
    file: &Path,
    text: &str,
    at: &impl Fn(std::ops::Range<usize>, String) -> PolicyError,
) -> Result<(), PolicyError> {
    let project = Uuid::try_parse(b.project.get_ref())
        .ok()
        .filter(|_| b.project.get_ref().len() == 36)
        .ok_or_else(|| {
            at(
                b.project.span(),
                format!("project `{}` is not a UUID", b.project.get_ref()),
            )
        })?;
    let monthly = Money::parse_amount(b.monthly.get_ref())
        .map_err(|e| at(b.monthly.span(), format!("monthly: {e}")))?;
    let line = crate::config::line_at(text, b.project.span().start);
    if let Some((_, first, first_line)) = budgets.get(&project) {
        return Err(at(
            b.project.span(),
            format!(
                "project `{project}` already has a budget ({}:{first_line})",
                first.display()
            ),
        ));
    }
    budgets.insert(project, (monthly, file.to_owned(), line));
    Ok(())
}

/// The grant of a binding or key naming these roles and projects.
fn grant(
    defined: &BTreeMap<String, Role>,
    roles: &[Spanned<String>],
    projects: Option<&[Spanned<String>]>,
    at: &impl Fn(std::ops::Range<usize>, String) -> PolicyError,
) -> Result<Grant, PolicyError> {
    let mut permissions = Permissions::default();
    let mut rates = Vec::new();
    let mut share = None;
    // The highest role, for metrics: largest share, then most permissions, then first.
    let mut class: Option<(u32, usize, usize)> = None;
    for (i, r) in roles.iter().enumerate() {
        let role = defined
            .get(r.get_ref())
            .ok_or_else(|| at(r.span(), format!("unknown role `{}`", r.get_ref())))?;
        permissions = permissions.union(role.permissions);
        rates.extend(role.rate);
        share = share.max(role.share);
        let rank = (
            role.share.unwrap_or(DEFAULT_SHARE),
            role.permissions.iter().count(),
        );
        if class.is_none_or(|(s, p, _)| rank > (s, p)) {
            class = Some((rank.0, rank.1, i));
        }
    }
    let projects = projects
        .map(|ps| {
            if ps.is_empty() {
                return Err(at(
                    0..0,
                    "`projects` is empty: omit it for an organization-wide grant".into(),
                ));
            }
            ps.iter()
                .map(|p| {
                    Uuid::try_parse(p.get_ref()).map_err(|_| {
                        at(p.span(), format!("project `{}` is not a UUID", p.get_ref()))
                    })
                })
                .collect::<Result<Arc<[Uuid]>, _>>()
        })
        .transpose()?;
    Ok(Grant {
        roles: roles.iter().map(|r| r.get_ref().clone()).collect(),
        permissions,
        projects,
        rate: most_generous(rates.into_iter()),
        share,
        class: Class::Role(class.map_or(0, |(_, _, i)| i)),
    })
}

/// A `share`: a whole number of turns, from 1 to [`MAX_SHARE`]. Read as any TOML value so that
/// a string or a fraction gets the same message as a number out of range.
fn share(
    share: Option<&Spanned<toml::Value>>,
    at: &impl Fn(std::ops::Range<usize>, String) -> PolicyError,
) -> Result<Option<u32>, PolicyError> {
    share
        .map(|s| {
            s.get_ref()
                .as_integer()
                .and_then(|n| u32::try_from(n).ok())
                .filter(|n| (DEFAULT_SHARE..=MAX_SHARE).contains(n))
                .ok_or_else(|| {
                    at(
                        s.span(),
                        format!(
                            "share: `{}` is not a share: use a whole number from 1 to {MAX_SHARE}",
                            s.get_ref()
                        ),
                    )
                })
        })
        .transpose()
}

fn rate(
    rate: Option<&Spanned<String>>,
    at: &impl Fn(std::ops::Range<usize>, String) -> PolicyError,
) -> Result<Option<Rate>, PolicyError> {
    rate.map(|r| parse_rate(r.get_ref()).map_err(|e| at(r.span(), format!("rate: {e}"))))
        .transpose()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    roles: BTreeMap<String, Spanned<RoleDef>>,
    #[serde(default)]
    bindings: Vec<BindingDef>,
    #[serde(default)]
    keys: Vec<Spanned<KeyDef>>,
    #[serde(default)]
    budgets: Vec<BudgetDef>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BudgetDef {
    project: Spanned<String>,
    monthly: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RoleDef {
    #[serde(default)]
    #[expect(dead_code, reason = "documentation for operators; read by serde only")]
    description: Option<String>,
    permissions: Vec<Spanned<String>>,
    rate: Option<Spanned<String>>,
    share: Option<Spanned<toml::Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BindingDef {
    claim: Spanned<String>,
    equals: String,
    roles: Vec<Spanned<String>>,
    projects: Option<Vec<Spanned<String>>>,
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::policy::fixtures::{DEFAULT, key_entry, set};

    #[test]
    fn shares_are_validated() {
        const K: &str = "0b7d2e1c-9a44-4f6b-8c3d-5e6f7a8b9c0d";
        for bad in ["0", "101", "-1", "1.5", "\"3\"", "[2]"] {
            let entry = key_entry("k", K, &format!("share = {bad}\n"));
            let e = set(&[DEFAULT, &entry]).expect_err(bad);
            assert_eq!(
                (e.line, e.file.as_path(), e.message.as_str()),
                (
                    5,
                    Path::new("p1.toml"),
                    format!("share: `{bad}` is not a share: use a whole number from 1 to 100")
                        .as_str()
                ),
            );
        }
        let e = set(&["[roles.x]\npermissions = []\nshare = 0\n"]).expect_err("role share");
        assert_eq!(
            (e.line, e.message.as_str()),
            (
                3,
                "share: `0` is not a share: use a whole number from 1 to 100"
            )
        );
    }

    #[test]
    fn budgets_are_read_and_checked_at_their_line() {
        const P: &str = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee";
        let budget = |project: &str, monthly: &str| {
            format!("\n[[budgets]]\nproject = \"{project}\"\nmonthly = \"{monthly}\"\n")
        };
        let ok = set(&[DEFAULT, &budget(P, "500.00 EUR")]).expect("valid");
        let budgets = ok.budgets();
        let m = &budgets[&P.parse().expect("uuid")];
        assert_eq!(
            (m.units, m.nanos, m.currency_code.as_str()),
            (500, 0, "EUR")
        );
        for (text, line, says) in [
            (budget("not-a-project", "5 EUR"), 3, "is not a UUID"),
            (budget(P, "5,00 EUR"), 4, "monthly: `5,00` is not an amount"),
            (budget(P, "5.00 EURO"), 4, "three capital letters"),
            (budget(P, "5.00 eu"), 4, "three capital letters"),
            (
                format!("{}{}", budget(P, "5 EUR"), budget(P, "6 EUR")),
                7,
                "already has a budget (p1.toml:3)",
            ),
        ] {
            let e = set(&[DEFAULT, &text]).expect_err(&text);
            assert_eq!(
                (e.file.as_path(), e.line),
                (Path::new("p1.toml"), line),
                "{e}"
            );
            assert!(e.message.contains(says), "{e}");
        }
    }

    #[test]
    fn broken_policies_are_located() {
        let e = set(&[DEFAULT, "[roles.billing-manager]\npermissions = []\n"]).expect_err("dup");
        assert!(
            e.to_string().starts_with("p1.toml:1:") && e.message.contains("already defined"),
            "{e}"
        );
        let e = set(&["[roles.x]\npermissions = [\n  \"consumption:reed\"]\n"]).expect_err("perm");
        assert_eq!(
            (e.line, e.message.as_str()),
            (3, "unknown permission `consumption:reed`")
        );
        let e = set(&["[roles.x]\npermissions = []\ncolour = 1\n"]).expect_err("field");
        assert!(e.message.contains("colour"), "{e}");
        let e = set(&["[[bindings]]\nclaim = \"g\"\nequals = \"x\"\nroles = [\"ghost\"]\n"])
            .expect_err("role");
        assert_eq!((e.line, e.message.as_str()), (4, "unknown role `ghost`"));
    }
}
