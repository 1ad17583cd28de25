//! The cache's hot path: building a key from a validated call, and answering a hit.

use std::hint::black_box;

use billing_gateway::billing;
use billing_gateway::cache::{Cache, Fetch, Outcome, Shareable};
use billing_gateway::config::Config;
use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use secrecy::SecretString;

const QUERY: &str =
    "billing_period=2026-07&page=2&page_size=100&order_by=updated_at_desc&category_name=Compute";

/// The answer of a failed fetch, which the bench never makes.
struct NoAnswer;

impl Shareable for NoAnswer {
    fn to_shared(&self) -> Option<Vec<u8>> {
        None
    }
    fn from_shared(_: &[u8]) -> Option<NoAnswer> {
        None
    }
}

fn benches(c: &mut Criterion) {
    let org = uuid::Uuid::from_u128(0x1111_2222_3333_4444_5555_6666_7777_8888);
    let mut call =
        billing::parse("GET", "/billing/v2beta1/consumptions", Some(QUERY)).expect("valid query");
    call.apply_organization(org).expect("org");

    c.bench_function("cache/key", |b| b.iter(|| Cache::key(black_box(&call))));
    c.bench_function("operations/parse+key", |b| {
        b.iter(|| {
            let mut call = billing::parse(
                "GET",
                "/billing/v2beta1/consumptions",
                Some(black_box(QUERY)),
            )
            .expect("valid");
            call.apply_organization(org).expect("org");
            Cache::key(&call)
        })
    });

    let config = Config::new("http://unused", org, SecretString::from(String::new()));
    let cache = Cache::new(&config.cache, Default::default());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let key = Cache::key(&call);
    let body = Bytes::from(vec![b'x'; 16 * 1024]);
    runtime.block_on(async {
        let stored = cache
            .get_or_fetch::<NoAnswer, _, _>(&key, config.cache.ttl, || async { Fetch::Store(body) })
            .await;
        assert!(matches!(stored, Outcome::Stored(_)));
    });
    c.bench_function("cache/hit", |b| {
        b.to_async(&runtime).iter(|| async {
            match cache
                .get_or_fetch::<NoAnswer, _, _>(&Cache::key(&call), config.cache.ttl, || async {
                    unreachable!("a hit never fetches")
                })
                .await
            {
                Outcome::Hit(entry) => entry,
                _ => panic!("expected a hit"),
            }
        })
    });
}

criterion_group!(cache, benches);
criterion_main!(cache);
