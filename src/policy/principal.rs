//! What the rest of the gateway reasons with: an authenticated caller ([`Principal`]) and the
//! [`Grant`]s the policy gives it, with the rate, share and metrics class they add up to.

use std::sync::Arc;

use uuid::Uuid;

use crate::billing::Permissions;
use crate::config::Rate;

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
    pub(super) class: Class,
}

/// A grant's principal class: the principal's own name for a gateway key (its subject), else one
/// of its roles. Never a user's subject, so metrics have no more labels than the policy has roles
/// and keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Class {
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

pub(super) fn most_generous(rates: impl Iterator<Item = Rate>) -> Option<Rate> {
    let per_second = |r: &Rate| f64::from(r.count) / r.per.as_secs_f64();
    rates.max_by(|a, b| per_second(a).total_cmp(&per_second(b)))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::config::parse_rate;
    use crate::policy::fixtures::{DEFAULT, key_entry, principal, set};

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
    fn the_largest_share_applies_and_classes_name_no_user() {
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
    }
}
