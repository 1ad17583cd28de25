//! What verifying a caller's token costs: HS256, RS256 with every verification done in full
//! (the verified-token cache forgotten before each), and RS256 repeated (answered from the
//! cache). The JWKS is served by a local wiremock, as an identity provider would serve it.

use std::time::Duration;

use billing_gateway::auth::{Authenticator, mint_hs256};
use billing_gateway::config::AuthConfig;
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use secrecy::SecretString;
use serde_json::{Value, json};
use wiremock::matchers::path;
use wiremock::{Mock, MockServer, ResponseTemplate};

const HS256: &str = "bench-hs256-secret-0123456789abcdef";

fn claims() -> Value {
    let now = jsonwebtoken::get_current_timestamp();
    json!({"sub": "bench", "roles": ["billing-read-only"], "iat": now, "exp": now + 3600})
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
            ca_file: None,
        })
        .await
        .expect("authenticator");
        assert!(auth.ready(), "JWKS loaded");
        (auth, idp)
    });
    let Value::Object(claims) = claims() else {
        unreachable!()
    };
    let hs256 = mint_hs256(&SecretString::from(HS256), &claims).expect("hs256");
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("rsa-1".into());
    let rsa = EncodingKey::from_rsa_pem(include_bytes!("../tests/keys/rsa-1.pem")).expect("pem");
    let rs256 = jsonwebtoken::encode(&header, &claims, &rsa).expect("rs256");

    let mut group = c.benchmark_group("verify_jwt");
    group.bench_function("hs256", |b| {
        b.to_async(&rt).iter_batched(
            || auth.forget_verified(),
            |()| async { auth.verify_jwt(&hs256).await.expect("valid") },
            BatchSize::PerIteration,
        )
    });
    group.bench_function("rs256_cold", |b| {
        b.to_async(&rt).iter_batched(
            || auth.forget_verified(),
            |()| async { auth.verify_jwt(&rs256).await.expect("valid") },
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
