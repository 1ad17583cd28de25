//! What deciding a request costs once the token is verified: the caller's grants from its claims
//! (done on every request, cache hits included) and the decision for one call, organization-wide
//! and project-scoped (where the gateway fills in the project).

use std::hint::black_box;
use std::path::PathBuf;

use billing_gateway::billing;
use billing_gateway::policy::{self, PolicySet};
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use serde_json::{Map, Value, json};

const TEAMS: &str = r#"
[roles.team-consumption]
description = "One team's consumption"
permissions = ["consumption:read"]

[[bindings]]
claim = "groups"
equals = "team-web"
roles = ["team-consumption"]
projects = ["aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"]
"#;

fn claims(value: Value) -> Map<String, Value> {
    let Value::Object(map) = value else {
        unreachable!("an object")
    };
    map
}

fn benches(c: &mut Criterion) {
    let policy = PolicySet::from_sources(&[
        (
            PathBuf::from("default.toml"),
            include_str!("../policies/default.toml").to_owned(),
        ),
        (PathBuf::from("teams.toml"), TEAMS.to_owned()),
    ])
    .expect("policy");
    let org = uuid::Uuid::from_u128(0x1111_2222_3333_4444_5555_6666_7777_8888);
    let reader = claims(json!({"sub": "bench", "roles": ["billing-read-only"], "exp": 1}));
    let team = claims(json!({"sub": "web", "groups": ["team-web", "other"], "exp": 1}));
    let call = |query: &str| {
        billing::parse("GET", "/billing/v2beta1/consumptions", Some(query)).expect("valid")
    };

    c.bench_function("policy/principal_for_claims", |b| {
        b.iter(|| policy.principal_for_claims("bench".to_owned(), black_box(&reader)))
    });

    let principal = policy.principal_for_claims("bench".to_owned(), &reader);
    let mut org_wide = call("billing_period=2026-07");
    org_wide.apply_organization(org).expect("org");
    c.bench_function("policy/decide_org_wide", |b| {
        b.iter_batched_ref(
            || org_wide.clone(),
            |call| policy::decide(black_box(&principal), call).expect("allowed"),
            BatchSize::SmallInput,
        )
    });

    let scoped = policy.principal_for_claims("web".to_owned(), &team);
    let unscoped_call = call("billing_period=2026-07");
    c.bench_function("policy/decide_project_scoped_fill", |b| {
        b.iter_batched_ref(
            || unscoped_call.clone(),
            |call| policy::decide(black_box(&scoped), call).expect("allowed"),
            BatchSize::SmallInput,
        )
    });
}

criterion_group!(policy_benches, benches);
criterion_main!(policy_benches);
