//! `key new`: a gateway key, printed once, and the policy entry holding only its SHA-256.

use super::env;
use anyhow::{anyhow, bail};
use billing_gateway::config::{Config, Needs};
use billing_gateway::policy::{self, PolicySet};

/// Generates a key and its `[[keys]]` entry, checked against the policy folder.
pub(super) fn new(name: &str, roles: &[String], projects: &[String]) -> anyhow::Result<()> {
    if !policy::is_key_name(name) {
        bail!("--name `{name}`: use letters, digits, `.`, `_` and `-` (at most 64)");
    }
    let roles: Vec<&str> = roles
        .iter()
        .map(|r| r.trim())
        .filter(|r| !r.is_empty())
        .collect();
    if roles.is_empty() {
        bail!("--roles: name at least one role");
    }
    let projects = projects
        .iter()
        .map(|p| {
            uuid::Uuid::try_parse(p.trim())
                .map(|p| p.to_string())
                .map_err(|_| anyhow!("--projects: `{p}` is not a project id (a UUID)"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let key = uuid::Uuid::new_v4();
    let projects: Vec<&str> = projects.iter().map(String::as_str).collect();
    let entry = policy::KeyEntry {
        name,
        sha256: policy::key_sha256(&key),
        roles: &roles,
        projects: &projects,
    }
    .to_toml()?;
    // Checked against the policy folder when there is one: roles must exist, names be unique.
    let config = Config::load(None, &env, Needs::Tools)?;
    match PolicySet::read_sources(&config.policy_dir) {
        Ok(mut sources) => {
            let defined = PolicySet::from_sources(&sources)?;
            let defined: Vec<&str> = defined.role_names().collect();
            let unknown: Vec<String> = roles
                .iter()
                .filter(|r| !defined.contains(r))
                .map(|r| format!("`{r}`"))
                .collect();
            if !unknown.is_empty() {
                bail!(
                    "--roles: unknown role{} {}; the policy folder ({}) defines: {}",
                    if unknown.len() == 1 { "" } else { "s" },
                    unknown.join(", "),
                    config.policy_dir.display(),
                    defined.join(", ")
                );
            }
            sources.push(("(the new entry)".into(), entry.clone()));
            PolicySet::from_sources(&sources)?;
        }
        Err(e) => eprintln!("note: the entry is not checked against a policy folder: {e}"),
    }
    println!(
        "gateway key `{name}` (shown once: the policy stores only its SHA-256):\n\n    {key}\n\n\
         Give it to the caller as its SCW_SECRET_KEY (X-Auth-Token), and paste this entry into a\n\
         *.toml in the policy folder ({}):\n\n{entry}",
        config.policy_dir.display()
    );
    Ok(())
}
