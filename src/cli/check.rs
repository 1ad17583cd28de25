//! `check`: the configuration and every policy file validated, the policy test cases run.

use super::env;
use anyhow::bail;
use billing_gateway::config::Config;
use billing_gateway::policy::{PolicySet, cases};
use std::path::Path;

/// Exit 0 when everything holds; otherwise every problem, `file:line` first.
pub(super) fn run(config: Option<&Path>) -> anyhow::Result<()> {
    let config = Config::load(config, &env, false)?;
    let policy = PolicySet::load_dir(&config.policy_dir)?;
    let tests = config.policy_dir.join("tests");
    let files = cases::load_dir(&tests)?;
    // With no organization configured (a CI run), a fixed placeholder is filled in: the nil UUID.
    let report = cases::run(&policy, &files, config.upstream.organization_id);
    for failure in &report.failures {
        eprintln!("{failure}");
    }
    if !report.failures.is_empty() {
        bail!(
            "{} of {} policy test cases failed",
            report.failures.len(),
            report.total
        );
    }
    let roles: Vec<_> = policy.role_names().collect();
    println!(
        "ok: configuration valid; policy {} ({}); {} policy test cases passed ({})",
        policy.summary(),
        roles.join(", "),
        report.total,
        tests.display()
    );
    Ok(())
}
