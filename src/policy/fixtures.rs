//! What the policy unit tests share: the shipped default policy, two projects, and short ways
//! to build a [`PolicySet`] from texts, a [`Principal`] from claims, and a call's decision. Kept
//! apart so each concept's tests can sit next to its code without copying these.

use std::path::PathBuf;

use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

use super::{KeyEntry, PolicyError, PolicySet, Principal, decide, key_sha256};
use crate::billing::parse;

pub const DEFAULT: &str = include_str!("../../policies/default.toml");
pub const P1: &str = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee";
pub const P2: &str = "99999999-8888-7777-6666-555555555555";

/// The policy merged from `texts`, named `p0.toml`, `p1.toml`… in errors.
pub fn set(texts: &[&str]) -> Result<PolicySet, PolicyError> {
    let sources: Vec<(PathBuf, String)> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| (PathBuf::from(format!("p{i}.toml")), (*t).to_owned()))
        .collect();
    PolicySet::from_sources(&sources)
}

/// The caller a token with these claims is.
pub fn principal(set: &PolicySet, claims: Value) -> Principal {
    let Value::Object(claims) = claims else {
        panic!("claims must be an object")
    };
    Principal {
        subject: "t".into(),
        grants: set.grants_for_claims(&claims),
    }
}

/// The query string sent upstream when `p` may `GET path?query`, else the status.
pub fn decide_on(p: &Principal, path: &str, query: &str) -> Result<String, u16> {
    let mut call = parse("GET", path, Some(query)).map_err(|e| e.status().as_u16())?;
    decide(p, &mut call).map_err(|e| e.status().as_u16())?;
    Ok(call.query_string())
}

/// A `[[bindings]]` entry: members of `group` (in the `groups` claim) get `role` within
/// `project`.
pub fn group_binding(group: &str, role: &str, project: &str) -> String {
    #[derive(Serialize)]
    struct Binding<'a> {
        claim: &'a str,
        equals: &'a str,
        roles: [&'a str; 1],
        projects: [&'a str; 1],
    }
    #[derive(Serialize)]
    struct File<'a> {
        bindings: [Binding<'a>; 1],
    }
    let binding = Binding {
        claim: "groups",
        equals: group,
        roles: [role],
        projects: [project],
    };
    toml::to_string(&File {
        bindings: [binding],
    })
    .expect("TOML")
}

/// A `[[keys]]` entry for `key` granting `billing-read-only`, with `extra` lines.
pub fn key_entry(name: &str, key: &str, extra: &str) -> String {
    let key: Uuid = key.parse().expect("uuid");
    let entry = KeyEntry {
        name,
        sha256: key_sha256(&key),
        roles: &["billing-read-only"],
        projects: &[],
    };
    entry.to_toml().expect("TOML") + extra
}
