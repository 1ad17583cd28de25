//! Who may do what: policy files become a [`PolicySet`]; an authenticated identity becomes a
//! [`Principal`] holding [`Grant`]s; [`decide`] allows or denies one [`Call`].
//!
//! A gateway key (a UUID sent as `X-Auth-Token`) is a principal of its own, declared in a
//! `[[keys]]` entry that holds only the SHA-256 of the key. [`cases`] runs the policy test cases
//! `billing-gateway check` reads from `<policy dir>/tests/`.
//!
//! Pure: no I/O but reading the policy folder. Anything no grant allows is denied.

pub mod cases;
pub mod reload;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use toml::Spanned;
use uuid::Uuid;

use crate::billing::{Call, Permission, Permissions, Scope};
use crate::config::{Rate, parse_rate};
use crate::error::Error;

/// Roles from one binding or key, with the projects they are limited to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The role names granted together (for `whoami` and messages).
    pub roles: Arc<[String]>,
    /// The union of those roles' permissions.
    pub permissions: Permissions,
    /// `None`: organization-wide. `Some`: only requests about these projects.
    pub projects: Option<Arc<[Uuid]>>,
    /// A per-principal rate overriding `GATEWAY_PRINCIPAL_RATE`: the key's own `rate`, else the
    /// most generous `rate` among the granted roles; `None` when none sets one.
    pub rate: Option<Rate>,
    /// This grant's weight in the fair queue for upstream turns (contract §10): the key's own
    /// `share`, else the largest among the granted roles; `None` when none sets one.
    pub share: Option<u32>,
    /// What metrics count this grant's upstream calls under (see [`Principal::class`]). Plain
    /// values, not a name: a grant is copied into every request's principal, cache hits
    /// included, and only a call that goes upstream asks for its class.
    class: Class,
}

/// A grant's principal class: the principal's own name for a gateway key (its subject), else one
/// of its roles. Never a user's subject, so metrics have no more labels than the policy has roles
/// and keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// The grant of a `[[keys]]` entry.
    Key,
    /// The highest of the granted roles (largest share, then most permissions), by its index.
    Role(usize),
}

/// An authenticated caller and everything the policy grants it.
#[derive(Debug, Clone)]
pub struct Principal {
    /// `sub` of a JWT (or a gateway key's name).
    pub subject: String,
    /// Every grant that applies; the request is allowed when one covers it.
    pub grants: Vec<Grant>,
}

impl Principal {
    /// Every permission held by any grant, scoped or not.
    pub fn permissions(&self) -> Permissions {
        self.grants
            .iter()
            .fold(Permissions::default(), |acc, g| acc.union(g.permissions))
    }

    /// The per-principal rate the policy sets for this caller (the most generous of its
    /// grants'), for the rate limiter; `None`: the configured default applies.
    pub fn rate(&self) -> Option<Rate> {
        most_generous(self.grants.iter().filter_map(|g| g.rate))
    }

    /// This caller's weight in the fair queue for upstream turns: the largest `share` of its
    /// grants, 1 when none sets one.
    pub fn share(&self) -> u32 {
        self.grants
            .iter()
            .filter_map(|g| g.share)
            .max()
            .unwrap_or(DEFAULT_SHARE)
    }

    /// The bounded label metrics count this caller's upstream calls under: a gateway key's
    /// name, or a token's highest role (the grant with the largest share, then the most
    /// permissions); `none` without grants.
    pub fn class(&self) -> &str {
        self.grants
            .iter()
            .rev()
            .max_by_key(|g| {
                (
                    g.share.unwrap_or(DEFAULT_SHARE),
                    g.permissions.iter().count(),
                )
            })
            .and_then(|g| match g.class {
                Class::Key => Some(self.subject.as_str()),
                Class::Role(i) => g.roles.get(i).map(String::as_str),
            })
            .unwrap_or("none")
    }
}

/// A caller's share of upstream turns when no grant sets one.
pub const DEFAULT_SHARE: u32 = 1;

/// The largest `share` a role or key may set: a hundred times anyone else's turns is already
/// more than a fair queue is for.
pub const MAX_SHARE: u32 = 100;

fn most_generous(rates: impl Iterator<Item = Rate>) -> Option<Rate> {
    let per_second = |r: &Rate| f64::from(r.count) / r.per.as_secs_f64();
    rates.max_by(|a, b| per_second(a).total_cmp(&per_second(b)))
}

/// The SHA-256, as 64 lowercase hex digits, of a gateway key's canonical text (hyphenated,
/// lowercase): what a `[[keys]]` entry stores instead of the key.
pub fn key_sha256(key: &Uuid) -> String {
    let digest = Sha256::digest(key.hyphenated().to_string().as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `name` may name a gateway key: it becomes the principal's subject in logs and audit
/// events, so it is kept to letters, digits, `.`, `_` and `-` (at most 64, starting with a
/// letter or digit).
pub fn is_key_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= 64
        && chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

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
    roles: BTreeMap<String, Role>,
    bindings: Vec<Binding>,
    keys: Vec<Key>,
}

#[derive(Debug, Clone)]
struct Role {
    permissions: Permissions,
    rate: Option<Rate>,
    share: Option<u32>,
    file: PathBuf,
}

#[derive(Debug, Clone)]
struct Key {
    name: String,
    sha256: String,
    grant: Grant,
}

#[derive(Debug, Clone)]
struct Binding {
    claim: Vec<String>,
    equals: String,
    grant: Grant,
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
            parsed.push((at, doc.bindings, doc.keys));
        }
        // Roles first, from every file: a binding or key may name a role defined in another file.
        for (at, bindings, keys) in parsed {
            for b in bindings {
                let claim = b.claim.get_ref();
                if claim.is_empty() || claim.split('.').any(str::is_empty) {
                    return Err(at(b.claim.span(), format!("`{claim}` is not a claim path")));
                }
                let grant = set.grant(&b.roles, b.projects.as_deref(), &at)?;
                set.bindings.push(Binding {
                    claim: claim.split('.').map(str::to_owned).collect(),
                    equals: b.equals,
                    grant,
                });
            }
            for k in keys {
                set.add_key(k, &at)?;
            }
        }
        Ok(set)
    }

    fn add_key(
        &mut self,
        k: Spanned<KeyDef>,
        at: &impl Fn(std::ops::Range<usize>, String) -> PolicyError,
    ) -> Result<(), PolicyError> {
        let (span, k) = (k.span(), k.into_inner());
        let name = k.name.get_ref();
        if !is_key_name(name) {
            return Err(at(
                k.name.span(),
                format!(
                    "`{name}` is not a key name: use letters, digits, `.`, `_` and `-` (at most 64)"
                ),
            ));
        }
        let sha256 = k.sha256.get_ref();
        if sha256.len() != 64
            || !sha256
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err(at(
                k.sha256.span(),
                "`sha256` must be 64 lowercase hex digits (see `billing-gateway key new`)".into(),
            ));
        }
        if self.keys.iter().any(|other| &other.name == name) {
            return Err(at(
                k.name.span(),
                format!("key `{name}` is already defined"),
            ));
        }
        if let Some(other) = self.keys.iter().find(|other| &other.sha256 == sha256) {
            return Err(at(
                k.sha256.span(),
                format!("this sha256 is already the key `{}`'s", other.name),
            ));
        }
        if k.roles.is_empty() {
            return Err(at(span, format!("key `{name}` has no roles")));
        }
        let mut grant = self.grant(&k.roles, k.projects.as_deref(), at)?;
        if let Some(own) = rate(k.rate.as_ref(), at)? {
            grant.rate = Some(own);
        }
        if let Some(own) = share(k.share.as_ref(), at)? {
            grant.share = Some(own);
        }
        // A key is a principal of its own: its calls are counted under its name.
        grant.class = Class::Key;
        self.keys.push(Key {
            name: k.name.into_inner(),
            sha256: k.sha256.into_inner(),
            grant,
        });
        Ok(())
    }

    fn grant(
        &self,
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
            let role = self
                .roles
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

    /// The grants every binding matching these claims gives.
    pub fn grants_for_claims(&self, claims: &Map<String, Value>) -> Vec<Grant> {
        self.bindings
            .iter()
            .filter(|b| claim_matches(claims, &b.claim, &b.equals))
            .map(|b| b.grant.clone())
            .collect()
    }

    /// The caller a verified token describes: its subject and every grant its claims match.
    pub fn principal_for_claims(&self, subject: String, claims: &Map<String, Value>) -> Principal {
        Principal {
            subject,
            grants: self.grants_for_claims(claims),
        }
    }

    /// The caller a gateway key identifies, or `None` for an unknown key. The key's SHA-256 is
    /// compared with every entry's in constant time, so timing reveals nothing of the stored
    /// hashes.
    pub fn principal_for_key(&self, key: &Uuid) -> Option<Principal> {
        let digest = key_sha256(key);
        let mut found = None;
        for k in &self.keys {
            if bool::from(digest.as_bytes().ct_eq(k.sha256.as_bytes())) {
                found = Some(k);
            }
        }
        found.map(Key::principal)
    }

    /// The caller a `[[keys]]` entry describes, by its name (policy test cases name keys, since
    /// the keys themselves are nowhere to be found).
    pub fn principal_for_key_name(&self, name: &str) -> Option<Principal> {
        self.keys
            .iter()
            .find(|k| k.name == name)
            .map(Key::principal)
    }

    /// Role names, for `check`'s summary.
    pub fn role_names(&self) -> impl Iterator<Item = &str> {
        self.roles.keys().map(String::as_str)
    }

    /// Whether any gateway key is defined: with no JWT method configured, keys are the only way in.
    pub fn has_keys(&self) -> bool {
        !self.keys.is_empty()
    }

    /// `roles: N, bindings: N, keys: N`, for `check` and reload log lines.
    pub fn summary(&self) -> String {
        format!(
            "roles: {}, bindings: {}, keys: {}",
            self.roles.len(),
            self.bindings.len(),
            self.keys.len()
        )
    }
}

impl Key {
    fn principal(&self) -> Principal {
        Principal {
            subject: self.name.clone(),
            grants: vec![self.grant.clone()],
        }
    }
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

/// Follows a dot path. An array matches when one of its elements is a string equal to `equals`
/// (whole: `["Former finance"]` does not match `finance`); only a string claim is split into
/// words, matching when it equals `equals` or one of its space-separated words does (OAuth
/// `scope`).
fn claim_matches(claims: &Map<String, Value>, path: &[String], equals: &str) -> bool {
    let Some((first, rest)) = path.split_first() else {
        return false;
    };
    let mut value = claims.get(first);
    for key in rest {
        value = value.and_then(|v| v.get(key));
    }
    match value {
        Some(Value::Array(items)) => items.iter().any(|item| item.as_str() == Some(equals)),
        Some(Value::String(s)) => s == equals || s.split(' ').any(|word| word == equals),
        _ => false,
    }
}

/// Allows `call` when one of the principal's grants holds its permission and covers it; a
/// scoped grant may fill in the projects it covers (contract §5).
pub fn decide(principal: &Principal, call: &mut Call) -> Result<(), Error> {
    let permission = call.op.permission;
    // Walked again rather than collected: decided on every request, over a handful of grants.
    let holding = || {
        principal
            .grants
            .iter()
            .filter(move |g| g.permissions.contains(permission))
    };
    let (action, resource) = call.op.denied_as;
    let deny = |message: String| Error::PermissionDenied {
        message,
        action,
        resource,
    };
    if holding().next().is_none() {
        let mut roles: Vec<&str> = principal
            .grants
            .iter()
            .flat_map(|g| g.roles.iter().map(String::as_str))
            .collect();
        roles.sort_unstable();
        roles.dedup();
        let held = if roles.is_empty() {
            "the policy grants you no role".to_owned()
        } else {
            format!("your roles: {}", roles.join(", "))
        };
        return Err(deny(format!(
            "permission `{permission}` is required for {} ({held})",
            call.op.name
        )));
    }
    if holding().any(|g| g.projects.is_none()) {
        return Ok(());
    }
    // Every holding grant is scoped here: together they cover the union of their projects (two
    // bindings giving P1 and P2 let a charges query span both, and fill in both).
    let mut scope: Vec<Uuid> = holding()
        .filter_map(|g| g.projects.as_deref())
        .flatten()
        .copied()
        .collect();
    scope.sort_unstable();
    scope.dedup();
    if let Some(fill) = covers(&scope, call) {
        if let Some((name, values)) = fill {
            call.set(name, values);
        }
        return Ok(());
    }
    Err(deny(format!(
        "your `{permission}` grants are limited to projects; {}",
        scope_hint(call)
    )))
}

/// What would let a project-scoped caller make this call: only what the operation's [`Scope`]
/// takes (never a parameter the operation would refuse).
fn scope_hint(call: &Call) -> String {
    let op = call.op.name;
    match call.op.scope {
        Scope::None => {
            format!("{op} is organization-wide only: it needs an organization-wide grant")
        }
        Scope::One(param) if call.names_organization() => format!(
            "{op} about the whole organization needs an organization-wide grant; \
             name a {param} within them instead"
        ),
        Scope::One(param) => {
            format!("{op} needs a {param} within them, or an organization-wide grant")
        }
        Scope::Many(param) => format!(
            "{op} needs its {param} all within them (none: all of them), \
             or an organization-wide grant"
        ),
    }
}

/// Allows a gateway action that no operation describes (cache purge): it needs an
/// organization-wide grant holding `permission`.
pub fn require(principal: &Principal, permission: Permission) -> Result<(), Error> {
    if principal
        .grants
        .iter()
        .any(|g| g.projects.is_none() && g.permissions.contains(permission))
    {
        return Ok(());
    }
    Err(Error::PermissionDenied {
        message: format!("permission `{permission}` is required, organization-wide"),
        action: "write",
        resource: "cache",
    })
}

type Fill = Option<(&'static str, Vec<String>)>;

/// `Some(fill)` when a grant scoped to `scope` covers the call (with what to fill in), as the
/// operation's [`Scope`] says.
fn covers(scope: &[Uuid], call: &Call) -> Option<Fill> {
    let in_scope = |s: &str| scope.iter().any(|p| p.to_string() == s);
    match call.op.scope {
        Scope::None => None,
        // Naming the organization instead of a project asks about all of it.
        Scope::One(_) if call.names_organization() => None,
        Scope::One(param) => match call.get(param) {
            Some(asked) => in_scope(asked).then_some(None),
            None if scope.len() == 1 => Some(Some((param, vec![scope[0].to_string()]))),
            None => None,
        },
        Scope::Many(param) => {
            let mut asked = call.get_all(param).peekable();
            if asked.peek().is_none() {
                Some(Some((param, scope.iter().map(Uuid::to_string).collect())))
            } else {
                asked.all(in_scope).then_some(None)
            }
        }
    }
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyDef {
    name: Spanned<String>,
    sha256: Spanned<String>,
    roles: Vec<Spanned<String>>,
    projects: Option<Vec<Spanned<String>>>,
    rate: Option<Spanned<String>>,
    share: Option<Spanned<toml::Value>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::billing::{OPERATIONS, Operation, by_name, parse};
    use serde_json::json;

    const DEFAULT: &str = include_str!("../../policies/default.toml");
    const P1: &str = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee";
    const P2: &str = "99999999-8888-7777-6666-555555555555";

    fn set(texts: &[&str]) -> Result<PolicySet, PolicyError> {
        let sources: Vec<(PathBuf, String)> = texts
            .iter()
            .enumerate()
            .map(|(i, t)| (PathBuf::from(format!("p{i}.toml")), (*t).to_owned()))
            .collect();
        PolicySet::from_sources(&sources)
    }

    fn principal(set: &PolicySet, claims: Value) -> Principal {
        let Value::Object(claims) = claims else {
            panic!("claims must be an object")
        };
        Principal {
            subject: "t".into(),
            grants: set.grants_for_claims(&claims),
        }
    }

    fn decide_on(p: &Principal, path: &str, query: &str) -> Result<String, u16> {
        let mut call = parse("GET", path, Some(query)).map_err(|e| e.status().as_u16())?;
        decide(p, &mut call).map_err(|e| e.status().as_u16())?;
        Ok(call.query_string())
    }

    #[test]
    fn default_policy_separates_read_only_from_manager() {
        let set = set(&[DEFAULT]).expect("default policy");
        let ro = principal(&set, json!({"roles": ["billing-read-only"]}));
        let mgr = principal(&set, json!({"roles": "openid billing-manager"}));
        let nobody = principal(&set, json!({"roles": ["other"]}));
        assert!(decide_on(&ro, "/billing/v2beta1/consumptions", "").is_ok());
        assert_eq!(decide_on(&ro, "/billing/v2beta1/invoices", ""), Err(403));
        assert!(decide_on(&mgr, "/billing/v2beta1/invoices", "").is_ok());
        assert_eq!(
            decide_on(&nobody, "/billing/v2beta1/consumptions", ""),
            Err(403)
        );
    }

    #[test]
    fn claim_paths_match_nested_arrays_and_scope_words() {
        let claims =
            json!({"realm_access": {"roles": ["a", "b"]}, "scope": "openid billing", "n": 3});
        let Value::Object(c) = claims else { panic!() };
        let path = |s: &str| s.split('.').map(str::to_owned).collect::<Vec<_>>();
        assert!(claim_matches(&c, &path("realm_access.roles"), "b"));
        assert!(!claim_matches(&c, &path("realm_access.roles"), "c"));
        assert!(claim_matches(&c, &path("scope"), "billing"));
        assert!(!claim_matches(&c, &path("scope"), "bill"));
        assert!(!claim_matches(&c, &path("n"), "3"));
        assert!(!claim_matches(&c, &path("missing.deeper"), "a"));
    }

    /// An array claim matches an element exactly; only a string claim is split into words.
    #[test]
    fn array_elements_are_matched_whole_never_split_into_words() {
        let claims = json!({
            "groups": ["Former finance", "team web"],
            "roles": ["not a billing-manager", 3, ["billing-manager"]],
            "scope": "openid billing-manager",
            "realm_access": {"roles": ["ex billing-read-only"]},
        });
        let Value::Object(c) = claims else { panic!() };
        let path = |s: &str| s.split('.').map(str::to_owned).collect::<Vec<_>>();
        assert!(!claim_matches(&c, &path("groups"), "finance"));
        assert!(!claim_matches(&c, &path("groups"), "Former"));
        assert!(claim_matches(&c, &path("groups"), "Former finance"));
        assert!(claim_matches(&c, &path("groups"), "team web"));
        assert!(!claim_matches(&c, &path("groups"), "web"));
        assert!(!claim_matches(&c, &path("roles"), "billing-manager"));
        assert!(!claim_matches(&c, &path("roles"), "3"));
        assert!(!claim_matches(
            &c,
            &path("realm_access.roles"),
            "billing-read-only"
        ));
        assert!(claim_matches(&c, &path("scope"), "billing-manager"));
        assert!(claim_matches(&c, &path("scope"), "openid billing-manager"));

        let set = set(&[DEFAULT]).expect("default policy");
        let sentence = principal(&set, json!({"roles": ["not a billing-manager"]}));
        assert!(sentence.grants.is_empty());
        assert_eq!(
            decide_on(&sentence, "/billing/v2beta1/invoices", ""),
            Err(403)
        );
        let words = principal(
            &set,
            json!({"roles": ["billing-read-only billing-manager"]}),
        );
        assert!(words.grants.is_empty());
        let string = principal(&set, json!({"roles": "billing-read-only billing-manager"}));
        assert_eq!(string.grants.len(), 2, "a string claim is split into words");
    }

    #[test]
    fn scoped_grants_cover_only_their_projects() {
        let scoped = format!(
            "{DEFAULT}\n[[bindings]]\nclaim = \"groups\"\nequals = \"team-web\"\nroles = [\"billing-read-only\"]\nprojects = [\"{P1}\"]\n"
        );
        let set = set(&[&scoped]).expect("valid");
        let p = principal(&set, json!({"groups": ["team-web"]}));
        assert_eq!(
            decide_on(&p, "/billing/v2beta1/consumptions", ""),
            Ok(format!("project_id={P1}"))
        );
        assert!(
            decide_on(
                &p,
                "/billing/v2beta1/consumptions",
                &format!("project_id={P1}")
            )
            .is_ok()
        );
        assert_eq!(
            decide_on(
                &p,
                "/billing/v2beta1/consumptions",
                &format!("project_id={P2}")
            ),
            Err(403)
        );
        assert_eq!(decide_on(&p, "/billing/v2beta1/taxes", ""), Err(403));
        assert_eq!(
            decide_on(&p, "/billing/v2beta1/charges", ""),
            Ok(format!("project_ids={P1}"))
        );
        assert_eq!(
            decide_on(
                &p,
                "/billing/v2beta1/charges",
                &format!("project_ids={P1}&project_ids={P2}")
            ),
            Err(403)
        );
    }

    /// One project in the grant: what each operation's [`Scope`] lets it do with no project
    /// asked.
    fn scoped_to_p1() -> Principal {
        let text = format!(
            "{DEFAULT}\n[[bindings]]\nclaim = \"groups\"\nequals = \"team\"\nroles = [\"billing-manager\"]\nprojects = [\"{P1}\"]\n"
        );
        principal(&set(&[&text]).expect("valid"), json!({"groups": ["team"]}))
    }

    /// A call of `op` as the table has it, with no parameter.
    fn bare_call(op: &'static Operation) -> Call {
        Call {
            op,
            id: op.path.contains('{').then(Uuid::nil),
            query: Vec::new(),
        }
    }

    fn decide_bare(p: &Principal, op: &'static Operation) -> Result<String, u16> {
        let mut call = bare_call(op);
        decide(p, &mut call).map_err(|e| e.status().as_u16())?;
        Ok(call.query_string())
    }

    #[test]
    fn every_scoped_operation_is_covered_and_filled_in_and_no_other() {
        let p = scoped_to_p1();
        for op in OPERATIONS {
            let expected = match op.scope {
                Scope::None => Err(403),
                Scope::One(param) | Scope::Many(param) => Ok(format!("{param}={P1}")),
            };
            assert_eq!(decide_bare(&p, op), expected, "{}", op.name);
        }
    }

    /// Policy reads the table, not operation names: giving an operation another scope moves
    /// what a scoped grant may do with it.
    #[test]
    fn a_scope_change_in_the_table_moves_the_decision() {
        let p = scoped_to_p1();
        for op in OPERATIONS {
            for scope in [Scope::None, Scope::One("x_id"), Scope::Many("x_ids")] {
                let op: &'static Operation = Box::leak(Box::new(Operation {
                    scope,
                    ..op.clone()
                }));
                let expected = match scope {
                    Scope::None => Err(403),
                    Scope::One(param) | Scope::Many(param) => Ok(format!("{param}={P1}")),
                };
                assert_eq!(decide_bare(&p, op), expected, "{} as {scope:?}", op.name);
            }
        }
        // A single project replaces the organization: naming the organization asks about all
        // of it, which a project-scoped grant does not cover; a project list does not.
        let org = "11111111-1111-1111-1111-111111111111";
        for (scope, expected) in [
            (Scope::One("x_id"), Err(403)),
            (
                Scope::Many("x_ids"),
                Ok(format!("organization_id={org}&x_ids={P1}")),
            ),
        ] {
            let op: &'static Operation = Box::leak(Box::new(Operation {
                scope,
                ..by_name("taxes").expect("taxes").clone()
            }));
            let mut call = bare_call(op);
            call.set("organization_id", [org.to_owned()]);
            let decided = decide(&p, &mut call)
                .map(|()| call.query_string())
                .map_err(|e| e.status().as_u16());
            assert_eq!(decided, expected, "{scope:?}");
        }
    }

    fn denial(p: &Principal, call: &mut Call) -> String {
        match decide(p, call) {
            Err(Error::PermissionDenied { message, .. }) => message,
            other => panic!("{}: expected a denial, got {other:?}", call.op.name),
        }
    }

    /// A scoped 403 suggests only what the operation takes: a project parameter where it has
    /// one (never on `taxes`, which refuses `project_id`), else an organization-wide grant.
    #[test]
    fn scoped_denials_suggest_only_what_the_operation_takes() {
        let p = scoped_to_p1();
        let scope_params: Vec<&str> = OPERATIONS
            .iter()
            .filter_map(|op| op.scope.param())
            .collect();
        for op in OPERATIONS {
            let mut call = bare_call(op);
            match op.scope {
                Scope::None => {}
                // Another project than the grant's.
                Scope::One(param) | Scope::Many(param) => call.set(param, [P2.to_owned()]),
            }
            let message = denial(&p, &mut call);
            assert!(message.contains("limited to projects"), "{message}");
            assert!(message.contains("organization-wide grant"), "{message}");
            for param in &scope_params {
                let suggested = message.split([' ', ',', ';']).any(|w| w == *param);
                assert_eq!(
                    suggested,
                    op.scope.param() == Some(*param),
                    "{}: {message}",
                    op.name
                );
            }
        }
        let mut taxes = parse("GET", "/billing/v2beta1/taxes", None).expect("valid");
        assert_eq!(
            denial(&p, &mut taxes),
            "your `consumption:read` grants are limited to projects; \
             taxes is organization-wide only: it needs an organization-wide grant"
        );
        // Naming the organization where a project replaces it: name the project instead.
        let org = "11111111-1111-1111-1111-111111111111";
        let mut consumptions = parse(
            "GET",
            "/billing/v2beta1/consumptions",
            Some(&format!("organization_id={org}")),
        )
        .expect("valid");
        let message = denial(&p, &mut consumptions);
        assert!(
            message.contains("name a project_id within them"),
            "{message}"
        );
    }

    fn key_entry(name: &str, key: &str, extra: &str) -> String {
        let key: Uuid = key.parse().expect("uuid");
        format!(
            "[[keys]]\nname = \"{name}\"\nsha256 = \"{}\"\nroles = [\"billing-read-only\"]\n{extra}",
            key_sha256(&key)
        )
    }

    #[test]
    fn key_digest_is_sha256_of_the_canonical_text() {
        let key: Uuid = "0B7D2E1C9A444F6B8C3D5E6F7A8B9C0D".parse().expect("uuid");
        // printf %s 0b7d2e1c-9a44-4f6b-8c3d-5e6f7a8b9c0d | sha256sum
        assert_eq!(
            key_sha256(&key),
            "4743d22d4922c545b85a91c910df155d5c5691aba960c05b45e641aba08e3e98"
        );
    }

    #[test]
    fn gateway_keys_are_found_by_their_hash_only() {
        const K1: &str = "0b7d2e1c-9a44-4f6b-8c3d-5e6f7a8b9c0d";
        const K2: &str = "1c8e3f2d-0b55-4a7c-9d4e-6f7a8b9c0d1e";
        let keys = format!(
            "{}\n{}",
            key_entry("report", K1, "rate = \"2/s\"\n"),
            key_entry("web", K2, &format!("projects = [\"{P1}\"]\n"))
        );
        let set = set(&[DEFAULT, &keys]).expect("valid");
        assert_eq!(set.summary(), "roles: 2, bindings: 2, keys: 2");
        let k1: Uuid = K1.to_uppercase().parse().expect("uuid");
        let report = set.principal_for_key(&k1).expect("known key");
        assert_eq!(report.subject, "report");
        assert_eq!(
            report.permissions(),
            Permissions::from_iter([Permission::parse("consumption:read").expect("p")])
        );
        assert_eq!(report.rate(), Some(parse_rate("2/s").expect("rate")));
        assert!(decide_on(&report, "/billing/v2beta1/consumptions", "").is_ok());
        assert_eq!(
            decide_on(&report, "/billing/v2beta1/invoices", ""),
            Err(403)
        );

        let web = set
            .principal_for_key(&K2.parse().expect("uuid"))
            .expect("known key");
        assert_eq!(web.subject, "web");
        assert_eq!(web.rate(), None);
        assert_eq!(
            decide_on(&web, "/billing/v2beta1/consumptions", ""),
            Ok(format!("project_id={P1}"))
        );
        assert!(set.principal_for_key(&Uuid::new_v4()).is_none());
        assert!(set.principal_for_key_name("web").is_some());
        assert!(set.principal_for_key_name("nobody").is_none());
    }

    #[test]
    fn broken_keys_are_located() {
        const K: &str = "0b7d2e1c-9a44-4f6b-8c3d-5e6f7a8b9c0d";
        let cases = [
            (key_entry("a b", K, ""), 2, "`a b` is not a key name"),
            (
                "[[keys]]\nname = \"k\"\nsha256 = \"ABCD\"\nroles = [\"billing-read-only\"]\n"
                    .to_owned(),
                3,
                "`sha256` must be 64 lowercase hex digits",
            ),
            (
                key_entry("k", K, "").replace("billing-read-only", "ghost"),
                4,
                "unknown role `ghost`",
            ),
            (
                format!(
                    "{}{}",
                    key_entry("k", K, ""),
                    key_entry("k", "1c8e3f2d-0b55-4a7c-9d4e-6f7a8b9c0d1e", "")
                ),
                6,
                "key `k` is already defined",
            ),
            (
                format!("{}{}", key_entry("k", K, ""), key_entry("j", K, "")),
                7,
                "this sha256 is already the key `k`'s",
            ),
            (
                key_entry("k", K, "rate = \"fast\"\n"),
                5,
                "rate: `fast` is not a rate",
            ),
            (
                key_entry("k", K, "colour = 1\n"),
                5,
                "unknown field `colour`",
            ),
        ];
        for (text, line, message) in cases {
            let e = set(&[DEFAULT, &text]).expect_err(message);
            assert!(
                e.line == line && e.message.starts_with(message) && e.file == Path::new("p1.toml"),
                "{message}: {e}"
            );
        }
    }

    #[test]
    fn role_rates_give_the_most_generous_to_a_principal() {
        let text = DEFAULT.replace(
            "permissions = [\"consumption:read\"]",
            "permissions = [\"consumption:read\"]\nrate = \"100/m\"",
        );
        let text = text.replace(
            "description = \"Everything",
            "rate = \"5/s\"\ndescription = \"Everything",
        );
        let set = set(&[&text]).expect("valid");
        let ro = principal(&set, json!({"roles": ["billing-read-only"]}));
        let both = principal(
            &set,
            json!({"roles": ["billing-read-only", "billing-manager"]}),
        );
        let nobody = principal(&set, json!({}));
        assert_eq!(ro.rate(), Some(parse_rate("100/m").expect("rate")));
        assert_eq!(both.rate(), Some(parse_rate("5/s").expect("rate")));
        assert_eq!(nobody.rate(), None);
    }

    #[test]
    fn several_scoped_grants_cover_the_union_of_their_projects() {
        let two = format!(
            "{DEFAULT}\n[[bindings]]\nclaim = \"groups\"\nequals = \"a\"\nroles = [\"billing-read-only\"]\nprojects = [\"{P1}\"]\n\
             [[bindings]]\nclaim = \"groups\"\nequals = \"b\"\nroles = [\"billing-read-only\"]\nprojects = [\"{P2}\"]\n"
        );
        let set = set(&[&two]).expect("valid");
        let p = principal(&set, json!({"groups": ["a", "b"]}));
        let mut both = [P1, P2];
        both.sort_unstable();
        assert_eq!(
            decide_on(&p, "/billing/v2beta1/charges", ""),
            Ok(format!("project_ids={}&project_ids={}", both[0], both[1]))
        );
        assert!(
            decide_on(
                &p,
                "/billing/v2beta1/charges",
                &format!("project_ids={P1}&project_ids={P2}")
            )
            .is_ok()
        );
        // Two projects: a consumption query must name one.
        assert_eq!(decide_on(&p, "/billing/v2beta1/consumptions", ""), Err(403));
        assert!(
            decide_on(
                &p,
                "/billing/v2beta1/consumptions",
                &format!("project_id={P2}")
            )
            .is_ok()
        );
    }

    #[test]
    fn shares_are_validated_the_largest_applies_and_classes_name_no_user() {
        const K: &str = "0b7d2e1c-9a44-4f6b-8c3d-5e6f7a8b9c0d";
        let text = DEFAULT.replace(
            "description = \"Everything",
            "share = 3\ndescription = \"Everything",
        );
        let shared = set(&[&text, &key_entry("report", K, "share = 5\n")]).expect("valid");
        let ro = principal(&shared, json!({"roles": ["billing-read-only"]}));
        let both = principal(
            &shared,
            json!({"roles": ["billing-read-only", "billing-manager"]}),
        );
        let nobody = principal(&shared, json!({}));
        assert_eq!((ro.share(), ro.class()), (1, "billing-read-only"));
        assert_eq!((both.share(), both.class()), (3, "billing-manager"));
        assert_eq!((nobody.share(), nobody.class()), (1, "none"));
        let key = shared.principal_for_key_name("report").expect("key");
        assert_eq!((key.share(), key.class()), (5, "report"));

        // Equal shares: the role with the most permissions names the class, whatever the order.
        let plain = set(&[DEFAULT]).expect("valid");
        for roles in [
            json!(["billing-manager", "billing-read-only"]),
            json!(["billing-read-only", "billing-manager"]),
        ] {
            let p = principal(&plain, json!({ "roles": roles }));
            assert_eq!((p.share(), p.class()), (1, "billing-manager"));
        }

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
