//! A token's claims against the policy's `[[bindings]]`: a binding names a claim by a dot path
//! (`realm_access.roles`) and the value it must hold; every binding a verified token's claims
//! match adds its grant to the caller. How a claim holds a value (whole array elements, words
//! of a string) is decided here and nowhere else.

use serde_json::{Map, Value};

use super::principal::Grant;

/// One `[[bindings]]` entry, checked: who holds `equals` at the `claim` path gets `grant`.
#[derive(Debug, Clone)]
pub(super) struct Binding {
    pub(super) claim: Vec<String>,
    pub(super) equals: String,
    pub(super) grant: Grant,
}

/// The segments of a claim path (`realm_access.roles`), or `None` when it has an empty one.
pub(super) fn claim_path(text: &str) -> Option<Vec<String>> {
    if text.is_empty() || text.split('.').any(str::is_empty) {
        return None;
    }
    Some(text.split('.').map(str::to_owned).collect())
}

/// The grants every binding matching these claims gives.
pub(super) fn grants(bindings: &[Binding], claims: &Map<String, Value>) -> Vec<Grant> {
    bindings
        .iter()
        .filter(|b| claim_matches(claims, &b.claim, &b.equals))
        .map(|b| b.grant.clone())
        .collect()
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::policy::fixtures::{DEFAULT, decide_on, principal, set};

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
}
