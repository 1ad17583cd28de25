//! A token's claims against the policy's `[[bindings]]`: a binding names a claim (a top-level
//! claim of exactly that name, such as Auth0's `https://billing.example.com/roles`, else a dot
//! path into objects: `realm_access.roles`) and the value it must hold; every binding a verified
//! token's claims match adds its grant to the caller. Which claim a name means, and how a claim
//! holds a value (whole array elements, words of a string), is decided here and nowhere else.

use serde_json::{Map, Value};

use super::principal::Grant;

/// One `[[bindings]]` entry, checked: who holds `equals` in the `claim` gets `grant`.
#[derive(Debug, Clone)]
pub(super) struct Binding {
    pub(super) claim: Claim,
    pub(super) equals: String,
    pub(super) grant: Grant,
}

/// A binding's claim name: the whole name, and its dot path for when no top-level claim has it.
#[derive(Debug, Clone)]
pub(super) struct Claim {
    name: String,
    path: Vec<String>,
}

impl Claim {
    /// The value it names in these claims: the top-level claim of exactly this name when there
    /// is one (namespaced claims are URLs, dots included), else the one the dot path reaches.
    fn find<'c>(&self, claims: &'c Map<String, Value>) -> Option<&'c Value> {
        if let Some(exact) = claims.get(&self.name) {
            return Some(exact);
        }
        let (first, rest) = self.path.split_first()?;
        rest.iter()
            .try_fold(claims.get(first)?, |value, key| value.get(key))
    }
}

/// A binding's claim name, or `None` when it is empty or has an empty dot segment.
pub(super) fn claim_path(text: &str) -> Option<Claim> {
    if text.is_empty() || text.split('.').any(str::is_empty) {
        return None;
    }
    Some(Claim {
        name: text.to_owned(),
        path: text.split('.').map(str::to_owned).collect(),
    })
}

/// The grants every binding matching these claims gives.
pub(super) fn grants(bindings: &[Binding], claims: &Map<String, Value>) -> Vec<Grant> {
    bindings
        .iter()
        .filter(|b| claim_matches(claims, &b.claim, &b.equals))
        .map(|b| b.grant.clone())
        .collect()
}

/// An array matches when one of its elements is a string equal to `equals` (whole:
/// `["Former finance"]` does not match `finance`); only a string claim is split into words,
/// matching when it equals `equals` or one of its space-separated words does (OAuth `scope`).
fn claim_matches(claims: &Map<String, Value>, claim: &Claim, equals: &str) -> bool {
    match claim.find(claims) {
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
        let path = |s: &str| claim_path(s).expect("claim");
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
        let path = |s: &str| claim_path(s).expect("claim");
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

    /// Auth0 namespaces its custom claims with URLs: a top-level claim of exactly the binding's
    /// name wins over walking its dots; with none, the dots walk into objects.
    #[test]
    fn a_top_level_claim_of_exactly_the_name_wins_else_dots_walk_into_objects() {
        let auth0 = "https://billing.example.com/roles";
        let Value::Object(c) = json!({
            auth0: ["billing-manager"],
            "https://billing": {"example": {"com/roles": ["nested"]}},
            "realm_access": {"roles": ["kc"]},
            "a.b": "top",
            "a": {"b": "nested"},
        }) else {
            panic!()
        };
        let path = |s: &str| claim_path(s).expect("claim");
        assert!(claim_matches(&c, &path(auth0), "billing-manager"));
        assert!(
            !claim_matches(&c, &path(auth0), "nested"),
            "exact name wins"
        );
        assert!(claim_matches(&c, &path("realm_access.roles"), "kc"));
        assert!(claim_matches(&c, &path("a.b"), "top"));
        assert!(!claim_matches(&c, &path("a.b"), "nested"));
        let Value::Object(only_nested) = json!({"a": {"b": "nested"}}) else {
            panic!()
        };
        assert!(claim_matches(&only_nested, &path("a.b"), "nested"));

        let set = set(&[&format!(
            "{DEFAULT}\n[[bindings]]\nclaim = \"{auth0}\"\nequals = \"billing-manager\"\nroles = [\"billing-manager\"]\n"
        )])
        .expect("policy");
        let manager = principal(&set, json!({auth0: ["billing-manager"]}));
        assert_eq!(
            decide_on(&manager, "/billing/v2beta1/invoices", "").map(|_| ()),
            Ok(())
        );
    }
}
