//! Who may do what: policy files become a [`PolicySet`]; an authenticated identity becomes a
//! [`Principal`] holding [`Grant`]s; [`decide`] allows or denies one [`Call`].
//!
//! Pure: no I/O but reading the policy folder. Anything no grant allows is denied.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use serde_json::{Map, Value};
use toml::Spanned;
use uuid::Uuid;

use crate::error::Error;
use crate::operations::{Call, Permission, Permissions};

/// Roles from one binding or key, with the projects they are limited to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The role names granted together (for `whoami` and messages).
    pub roles: Arc<[String]>,
    /// The union of those roles' permissions.
    pub permissions: Permissions,
    /// `None`: organization-wide. `Some`: only requests about these projects.
    pub projects: Option<Arc<[Uuid]>>,
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
}

#[derive(Debug, Clone)]
struct Role {
    permissions: Permissions,
    file: PathBuf,
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
        PolicySet::from_sources(&sources)
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
            let doc: PolicyFile = toml::from_str(text)
                .map_err(|e| at(e.span().unwrap_or(0..0), e.message().to_owned()))?;
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
                set.roles.insert(
                    name,
                    Role {
                        permissions,
                        file: file.clone(),
                    },
                );
            }
            parsed.push((at, doc.bindings));
        }
        // Roles first, from every file: a binding may name a role defined in another file.
        for (at, bindings) in parsed {
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
        }
        Ok(set)
    }

    fn grant(
        &self,
        roles: &[Spanned<String>],
        projects: Option<&[Spanned<String>]>,
        at: &impl Fn(std::ops::Range<usize>, String) -> PolicyError,
    ) -> Result<Grant, PolicyError> {
        let mut permissions = Permissions::default();
        for r in roles {
            let role = self
                .roles
                .get(r.get_ref())
                .ok_or_else(|| at(r.span(), format!("unknown role `{}`", r.get_ref())))?;
            permissions = permissions.union(role.permissions);
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

    /// Role names, for `check`'s summary.
    pub fn role_names(&self) -> impl Iterator<Item = &str> {
        self.roles.keys().map(String::as_str)
    }
}

/// Follows a dot path; an array matches when any element equals, a string when it equals or
/// one of its space-separated words does (OAuth `scope`).
fn claim_matches(claims: &Map<String, Value>, path: &[String], equals: &str) -> bool {
    let Some((first, rest)) = path.split_first() else {
        return false;
    };
    let mut value = claims.get(first);
    for key in rest {
        value = value.and_then(|v| v.get(key));
    }
    let scalar = |v: &Value| match v {
        Value::String(s) => s == equals || s.split(' ').any(|w| w == equals),
        _ => false,
    };
    match value {
        Some(Value::Array(items)) => items.iter().any(scalar),
        Some(v) => scalar(v),
        None => false,
    }
}

/// Allows `call` when one of the principal's grants holds its permission and covers it; a
/// scoped grant may fill in the projects it covers (contract §5).
pub fn decide(principal: &Principal, call: &mut Call) -> Result<(), Error> {
    let permission = call.op.permission;
    let holding: Vec<&Grant> = principal
        .grants
        .iter()
        .filter(|g| g.permissions.contains(permission))
        .collect();
    let (action, resource) = call.op.denied_as;
    let deny = |message: String| Error::PermissionDenied {
        message,
        action,
        resource,
    };
    if holding.is_empty() {
        return Err(deny(format!(
            "permission `{permission}` is required for {}",
            call.op.name
        )));
    }
    if holding.iter().any(|g| g.projects.is_none()) {
        return Ok(());
    }
    for grant in &holding {
        let Some(scope) = grant.projects.as_deref() else {
            continue;
        };
        if let Some(fill) = covers(scope, call) {
            if let Some((name, values)) = fill {
                call.set(name, values);
            }
            return Ok(());
        }
    }
    Err(deny(format!(
        "your `{permission}` grants are limited to projects; {} needs a project_id (or project_ids) within them, \
         or an organization-wide grant",
        call.op.name
    )))
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

/// `Some(fill)` when a grant scoped to `scope` covers the call (with what to fill in).
fn covers(scope: &[Uuid], call: &Call) -> Option<Fill> {
    let in_scope = |s: &str| scope.iter().any(|p| p.to_string() == s);
    match call.op.name {
        "consumptions" if call.get("organization_id").is_none() => match call.get("project_id") {
            Some(asked) => in_scope(asked).then_some(None),
            None if scope.len() == 1 => Some(Some(("project_id", vec![scope[0].to_string()]))),
            None => None,
        },
        "charges" => {
            let mut asked = call.get_all("project_ids").peekable();
            if asked.peek().is_none() {
                Some(Some((
                    "project_ids",
                    scope.iter().map(Uuid::to_string).collect(),
                )))
            } else {
                asked.all(in_scope).then_some(None)
            }
        }
        _ => None,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    roles: BTreeMap<String, Spanned<RoleDef>>,
    #[serde(default)]
    bindings: Vec<BindingDef>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RoleDef {
    #[serde(default)]
    #[expect(dead_code, reason = "documentation for operators; read by serde only")]
    description: Option<String>,
    permissions: Vec<Spanned<String>>,
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
    use super::*;
    use crate::operations::parse;
    use serde_json::json;

    const DEFAULT: &str = include_str!("../policies/default.toml");
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
