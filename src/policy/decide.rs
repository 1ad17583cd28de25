//! The decision: whether one principal may make one call, and what a project-scoped grant fills
//! in when the call names no project (contract §5). It reads only the principal's grants and the
//! operation's row in the table ([`Scope`], permission, how a denial is named), so it is the
//! same for a token's principal and a gateway key's, and needs nothing of how the policy was
//! loaded.

use uuid::Uuid;

use super::principal::Principal;
use crate::billing::{Call, Permission, Scope};
use crate::error::Error;

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

/// The projects a gateway answer about the caller's own projects (costs) may show: `None` every
/// project (an organization-wide grant holds `permission`), `Some` the union of the projects of
/// the scoped grants that hold it; 403 when no grant holds it. Never from the request: a scope
/// is the policy's.
pub fn projects(principal: &Principal, permission: Permission) -> Result<Option<Vec<Uuid>>, Error> {
    let holding: Vec<_> = principal
        .grants
        .iter()
        .filter(|g| g.permissions.contains(permission))
        .collect();
    if holding.is_empty() {
        return Err(Error::PermissionDenied {
            message: format!("permission `{permission}` is required"),
            action: "read",
            resource: "consumption",
        });
    }
    if holding.iter().any(|g| g.projects.is_none()) {
        return Ok(None);
    }
    let mut scope: Vec<Uuid> = holding
        .iter()
        .filter_map(|g| g.projects.as_deref())
        .flatten()
        .copied()
        .collect();
    scope.sort_unstable();
    scope.dedup();
    Ok(Some(scope))
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

#[cfg(test)]
mod tests {
    use serde_json::json;
    use uuid::Uuid;

    use super::*;
    use crate::billing::{OPERATIONS, Operation, by_name, parse};
    use crate::policy::fixtures::{DEFAULT, P1, P2, decide_on, group_binding, principal, set};

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
    fn scoped_grants_cover_only_their_projects() {
        let scoped = group_binding("team-web", "billing-read-only", P1);
        let set = set(&[DEFAULT, &scoped]).expect("valid");
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
        let text = group_binding("team", "billing-manager", P1);
        principal(
            &set(&[DEFAULT, &text]).expect("valid"),
            json!({"groups": ["team"]}),
        )
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

    #[test]
    fn several_scoped_grants_cover_the_union_of_their_projects() {
        let a = group_binding("a", "billing-read-only", P1);
        let b = group_binding("b", "billing-read-only", P2);
        let set = set(&[DEFAULT, &a, &b]).expect("valid");
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
}
