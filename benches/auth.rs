//! What verifying a caller's token costs: HS256 and RS256 with every verification done in full
//! (a token never seen before each time, so the verified-token cache cannot answer), and both
//! repeated (answered from the cache). The JWKS is served by a local wiremock, as an identity provider would serve it.

use std::cell::Cell;
use std::time::Duration;

use billing_gateway::auth::{Authenticator, mint_hs256};
use billing_gateway::config::AuthConfig;
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use secrecy::SecretString;
use serde_json::{Map, Value, json};
use wiremock::matchers::path;
use wiremock::{Mock, MockServer, ResponseTemplate};

const HS256: &str = "bench-hs256-secret-0123456789abcdef";

/// The claims of a read-only caller; `jti` makes each token distinct.
fn claims(jti: u64) -> Map<String, Value> {
    let now = jsonwebtoken::get_current_timestamp();
    let Value::Object(claims) = json!({
        "sub": "bench", "roles": ["billing-read-only"], "iat": now, "exp": now + 3600, "jti": jti,
    }) else {
        unreachable!()
    };
    claims
}

fn verify(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (auth, _idp) = rt.block_on(async {
        let idp = MockServer::start().await;
        let jwk: Value = serde_json::from_str(include_str!("../tests/keys/rsa-1.jwk.json"))
            .expect("jwk fixture");
        Mock::given(path("/jwks"))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({"keys": [jwk]})))
            .mount(&idp)
            .await;
        let auth = Authenticator::start(&AuthConfig {
            hs256_secret: Some(SecretString::from(HS256)),
            jwks_url: Some(format!("{}/jwks", idp.uri())),
            issuer: None,
            audience: None,
            leeway: Duration::from_secs(30),
        })
        .await
        .expect("authenticator");
        assert!(auth.ready(), "JWKS loaded");
        (auth, idp)
    });
    let secret = SecretString::from(HS256);
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("rsa-1".into());
    let rsa = EncodingKey::from_rsa_pem(include_bytes!("../tests/keys/rsa-1.pem")).expect("pem");
    // Minted outside the measurement, a new one for each uncached verification.
    let fresh = Cell::new(0u64);
    let next = || {
        fresh.set(fresh.get() + 1);
        claims(fresh.get())
    };
    let new_hs256 = || mint_hs256(&secret, &next()).expect("hs256");
    let new_rs256 = || jsonwebtoken::encode(&header, &next(), &rsa).expect("rs256");
    let hs256 = new_hs256();
    let rs256 = new_rs256();

    let auth = &auth;
    let mut group = c.benchmark_group("verify_jwt");
    group.bench_function("hs256", |b| {
        b.to_async(&rt).iter_batched(
            &new_hs256,
            |token| async move { auth.verify_jwt(&token).await.expect("valid") },
            BatchSize::PerIteration,
        )
    });
    group.bench_function("rs256_cold", |b| {
        b.to_async(&rt).iter_batched(
            &new_rs256,
            |token| async move { auth.verify_jwt(&token).await.expect("valid") },
            BatchSize::PerIteration,
        )
    });
    group.bench_function("rs256_cached", |b| {
        b.to_async(&rt)
            .iter(|| async { auth.verify_jwt(&rs256).await.expect("valid") })
    });
    group.bench_function("hs256_cached", |b| {
        b.to_async(&rt)
            .iter(|| async { auth.verify_jwt(&hs256).await.expect("valid") })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = verify
}
criterion_main!(benches);
