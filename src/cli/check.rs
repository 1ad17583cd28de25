//! `check`: everything `serve` would refuse, found without connecting anywhere: the
//! configuration, every policy file, the TLS files, a way for callers to authenticate; then the
//! policy test cases.

use super::env;
use anyhow::bail;
use billing_gateway::config::{Config, Needs};
use billing_gateway::policy::{PolicySet, cases};
use billing_gateway::server::tls::Tls;
use std::path::Path;

/// What `serve` and `check` both find before anything runs: the configuration, the policy, the
/// TLS files and a way for callers to authenticate. One validation, so `check` refuses exactly
/// what `serve` would, with the same lines.
pub(super) struct Validated {
    /// Every setting that could be read (defaults for the rest).
    pub(super) config: Config,
    /// The policy folder, when it loads.
    pub(super) policy: Option<PolicySet>,
    /// Every problem, one line each, naming its variable or `file:line`.
    pub(super) problems: Vec<String>,
}

/// See [`Validated`].
pub(super) fn validate(file: Option<&Path>) -> Validated {
    // Read with `serve`'s needs: a check that passes what `serve` refuses vouches for nothing.
    let (config, problems) = Config::gather(file, &env, Needs::Serve);
    let mut problems: Vec<String> = problems.iter().map(ToString::to_string).collect();
    let policy = PolicySet::load_dir(&config.policy_dir)
        .map_err(|e| problems.push(e.to_string()))
        .ok();
    if let Some(tls) = &config.tls
        && let Err(e) = Tls::load(&tls.cert, &tls.key)
    {
        problems.push(format!("TLS: {e}"));
    }
    if let Some(policy) = &policy
        && let Err(e) = config.require_authentication(policy.has_keys())
    {
        problems.push(e.to_string());
    }
    Validated {
        config,
        policy,
        problems,
    }
}

/// Writes every problem to stderr, one per line; the error that ends the command counts them.
pub(super) fn refuse(problems: &[String]) -> anyhow::Error {
    for problem in problems {
        eprintln!("{problem}");
    }
    anyhow::anyhow!("{} found", count(problems.len()))
}

/// Exit 0 when `serve` would start and every case holds; otherwise every problem, one per line
/// (each naming its variable or `file:line`), in one run.
pub(super) fn run(file: Option<&Path>) -> anyhow::Result<()> {
    let Validated {
        config,
        policy,
        mut problems,
    } = validate(file);
    let tests = config.policy_dir.join("tests");
    let cases = cases::load_dir(&tests)
        .map_err(|e| problems.push(e.to_string()))
        .ok();
    // Not a problem (`serve` starts), but what the operator should hear before it does.
    if let Some(warning) = billing_gateway::auth::audience_warning(&config.auth) {
        eprintln!("warning: {warning}");
    }
    let (Some(policy), Some(files)) = (policy, cases) else {
        return Err(refuse(&problems));
    };
    for problem in &problems {
        eprintln!("{problem}");
    }
    let report = cases::run(&policy, &files, config.upstream.organization_id);
    for failure in &report.failures {
        eprintln!("{failure}");
    }
    match (problems.len(), report.failures.len()) {
        (0, 0) => {}
        (0, failed) => bail!("{failed} of {} policy test cases failed", report.total),
        (n, 0) => bail!("{} found", count(n)),
        (n, failed) => bail!(
            "{} found; {failed} of {} policy test cases failed",
            count(n),
            report.total
        ),
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

fn count(n: usize) -> String {
    match n {
        1 => "1 problem".to_owned(),
        n => format!("{n} problems"),
    }
}
