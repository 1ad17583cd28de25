//! Gateway keys: a UUID sent as `X-Auth-Token` is a principal of its own, declared in a
//! `[[keys]]` entry that holds only the SHA-256 of the key (never the key), with its roles,
//! projects, rate and share. Here: the digest, the entry as written and its checks, and finding
//! the entry a key identifies. Kept apart from token claims
//! because a key is looked up by its hash in constant time, not matched.

use std::ops::Range;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use toml::Spanned;
use uuid::Uuid;

use super::principal::{Class, Grant, Principal};

/// The SHA-256, as 64 lowercase hex digits, of a gateway key's canonical text (hyphenated,
/// lowercase): what a `[[keys]]` entry stores instead of the key.
pub fn key_sha256(key: &Uuid) -> String {
    let digest = Sha256::digest(key.hyphenated().to_string().as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// A `[[keys]]` entry as written into a policy file (what `key new` prints): the key's name,
/// the SHA-256 of the key (never the key), its roles and the projects they are limited to.
#[derive(Debug, Serialize)]
pub struct KeyEntry<'a> {
    /// The key's name: the principal's subject.
    pub name: &'a str,
    /// [`key_sha256`] of the key.
    pub sha256: String,
    /// The roles the key is granted.
    pub roles: &'a [&'a str],
    /// The projects those roles are limited to; none: organization-wide.
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    pub projects: &'a [&'a str],
}

impl KeyEntry<'_> {
    /// The entry in TOML, its `[[keys]]` header included. Serialized rather than formatted, so
    /// whatever a value holds is quoted and escaped as TOML wants.
    pub fn to_toml(&self) -> Result<String, toml::ser::Error> {
        #[derive(Serialize)]
        struct File<'e, 'a> {
            keys: [&'e KeyEntry<'a>; 1],
        }
        toml::to_string(&File { keys: [self] })
    }
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

/// One `[[keys]]` entry, checked: the principal it describes is found by `sha256`.
#[derive(Debug, Clone)]
pub(super) struct Key {
    name: String,
    sha256: String,
    grant: Grant,
}

/// Checks the entry `k` against the `keys` read before it and adds it. Its grant comes from
/// `grant` (the roles, projects, rate and share it names, which need every file's roles); the
/// checks of its own fields come first. Problems are located by `at`.
pub(super) fn add<E>(
    keys: &mut Vec<Key>,
    k: Spanned<KeyDef>,
    at: &impl Fn(Range<usize>, String) -> E,
    grant: impl FnOnce(&KeyDef) -> Result<Grant, E>,
) -> Result<(), E> {
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
    if keys.iter().any(|other| &other.name == name) {
        return Err(at(
            k.name.span(),
            format!("key `{name}` is already defined"),
        ));
    }
    if let Some(other) = keys.iter().find(|other| &other.sha256 == sha256) {
        return Err(at(
            k.sha256.span(),
            format!("this sha256 is already the key `{}`'s", other.name),
        ));
    }
    if k.roles.is_empty() {
        return Err(at(span, format!("key `{name}` has no roles")));
    }
    let mut grant = grant(&k)?;
    // A key is a principal of its own: its calls are counted under its name.
    grant.class = Class::Key;
    keys.push(Key {
        name: k.name.into_inner(),
        sha256: k.sha256.into_inner(),
        grant,
    });
    Ok(())
}

/// The entry of a gateway key, or `None` for an unknown key. The key's SHA-256 is compared with
/// every entry's in constant time, so timing reveals nothing of the stored hashes.
pub(super) fn find<'k>(keys: &'k [Key], key: &Uuid) -> Option<&'k Key> {
    let digest = key_sha256(key);
    let mut found = None;
    for k in keys {
        if bool::from(digest.as_bytes().ct_eq(k.sha256.as_bytes())) {
            found = Some(k);
        }
    }
    found
}

impl Key {
    /// The entry's name: the principal's subject.
    pub(super) fn name(&self) -> &str {
        &self.name
    }

    /// The caller this entry describes.
    pub(super) fn principal(&self) -> Principal {
        Principal {
            subject: self.name.clone(),
            grants: vec![self.grant.clone()],
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct KeyDef {
    name: Spanned<String>,
    sha256: Spanned<String>,
    pub(super) roles: Vec<Spanned<String>>,
    pub(super) projects: Option<Vec<Spanned<String>>>,
    pub(super) rate: Option<Spanned<String>>,
    pub(super) share: Option<Spanned<toml::Value>>,
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use uuid::Uuid;

    use super::*;
    use crate::billing::{Permission, Permissions};
    use crate::config::parse_rate;
    use crate::policy::fixtures::{DEFAULT, P1, decide_on, key_entry, set};

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
            KeyEntry {
                name: "web",
                sha256: key_sha256(&K2.parse().expect("uuid")),
                roles: &["billing-read-only"],
                projects: &[P1],
            }
            .to_toml()
            .expect("TOML")
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
    fn a_serialized_entry_is_read_back_as_the_key_it_describes() {
        const K: &str = "0b7d2e1c-9a44-4f6b-8c3d-5e6f7a8b9c0d";
        let key: Uuid = K.parse().expect("uuid");
        let entry = KeyEntry {
            name: "nightly.report",
            sha256: key_sha256(&key),
            roles: &["billing-read-only", "billing-manager"],
            projects: &[P1],
        }
        .to_toml()
        .expect("TOML");
        assert_eq!(
            entry,
            format!(
                "[[keys]]\nname = \"nightly.report\"\nsha256 = \"{}\"\nroles = \
                 [\"billing-read-only\", \"billing-manager\"]\nprojects = [\"{P1}\"]\n",
                key_sha256(&key)
            )
        );
        let set = set(&[DEFAULT, &entry]).expect("valid");
        let principal = set.principal_for_key(&key).expect("known key");
        assert_eq!(principal.subject, "nightly.report");
        assert_eq!(
            decide_on(&principal, "/billing/v2beta1/consumptions", ""),
            Ok(format!("project_id={P1}"))
        );
    }

    #[test]
    fn broken_keys_are_located() {
        const K: &str = "0b7d2e1c-9a44-4f6b-8c3d-5e6f7a8b9c0d";
        let cases = [
            (key_entry("a b", K, ""), 2, "`a b` is not a key name"),
            (
                KeyEntry {
                    name: "k",
                    sha256: "ABCD".to_owned(),
                    roles: &["billing-read-only"],
                    projects: &[],
                }
                .to_toml()
                .expect("TOML"),
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
}
