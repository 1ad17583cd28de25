//! Tokens from a real identity provider: asymmetric algorithms verified with keys from its JWKS
//! (or found by OIDC discovery), against the real gateway, with a wiremock IdP and upstream.

mod common;
#[path = "common/jwks.rs"]
mod idp;

use std::time::Duration;

use common::*;
use idp::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use wiremock::matchers::{any, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

/// Not cached, so every allowed call reaches the upstream and can be counted.
const CHARGES: &str = "/billing/v2beta1/charges";

/// The gateway trusting `idp`'s JWKS at `/jwks` (HS256 stays enabled alongside), with an
/// upstream that answers every call.
async fn gateway(
    idp: &MockServer,
    edit: impl FnOnce(&mut billing_gateway::config::Config),
) -> TestApp {
    let jwks_url = format!("{}/jwks", idp.uri());
    let app = TestApp::spawn_with(|c| {
        c.auth.jwks_url = Some(jwks_url);
        edit(c);
    })
    .await;
    Mock::given(any())
        .respond_with(ok_json(json!({"consumptions": []})))
        .mount(&app.upstream)
        .await;
    app
}

async fn idp_serving(keys: &[&TestKey]) -> MockServer {
    let idp = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/jwks"))
        .respond_with(jwks(keys))
        .mount(&idp)
        .await;
    idp
}

async fn requests_to(server: &MockServer, at: &str) -> usize {
    server
        .received_requests()
        .await
        .unwrap_or_default()
        .iter()
        .filter(|r| r.url.path() == at)
        .count()
}

async fn readyz(app: &TestApp) -> u16 {
    app.client
        .get(format!("{}/readyz", app.base))
        .send()
        .await
        .expect("readyz")
        .status()
        .as_u16()
}

/// An IdP whose JWKS holds `RSA_1` at the gateway's start-up fetch, then answers `later`.
async fn idp_then(later: ResponseTemplate) -> MockServer {
    let idp = MockServer::start().await;
    Mock::given(path("/jwks"))
        .respond_with(jwks(&[&RSA_1]))
        .up_to_n_times(1)
        .mount(&idp)
        .await;
    Mock::given(path("/jwks"))
        .respond_with(later)
        .mount(&idp)
        .await;
    idp
}

#[tokio::test]
async fn rs256_es256_and_eddsa_tokens_from_the_jwks_are_accepted() {
    let idp = idp_serving(&[&RSA_1, &EC_P256, &ED25519]).await;
    let app = gateway(&idp, |_| {}).await;
    assert_eq!(readyz(&app).await, 200);

    for key in [&RSA_1, &EC_P256, &ED25519] {
        let token = key.sign(&idp_claims(json!({"sub": key.name})));
        let response = app.get(CHARGES, &token).await;
        assert_eq!(response.status(), 200, "{}", key.name);
        // Again: answered from the verified-token cache, same outcome.
        assert_eq!(app.get(CHARGES, &token).await.status(), 200);
        let whoami: Value = app
            .get("/gateway/v1/whoami", &token)
            .await
            .json()
            .await
            .expect("whoami");
        assert_eq!(whoami["subject"], key.name);
    }
    assert_eq!(app.upstream_requests().await.len(), 6);
    // HS256 keeps working alongside.
    assert_eq!(app.get(CHARGES, &app.manager()).await.status(), 200);

    // Known kids need no refetch; the IdP never sees the Scaleway key or a caller's token.
    let fetches = idp.received_requests().await.unwrap_or_default();
    assert_eq!(fetches.len(), 1, "only the startup fetch");
    let seen = format!("{:?}", fetches[0].headers);
    assert!(!seen.contains(SECRET_KEY) && !seen.to_ascii_lowercase().contains("x-auth-token"));
    assert!(fetches[0].headers.get("authorization").is_none());
}

#[tokio::test]
async fn a_key_rotated_in_after_startup_is_fetched_once_for_many_concurrent_callers() {
    let idp = idp_then(jwks(&[&RSA_1, &RSA_2]).set_delay(Duration::from_millis(200))).await;
    let app = gateway(&idp, |_| {}).await;
    assert_eq!(requests_to(&idp, "/jwks").await, 1);

    let calls = (0..5).map(|i| {
        let token = RSA_2.sign(&idp_claims(json!({"sub": format!("user-{i}")})));
        let app = &app;
        async move { app.get(CHARGES, &token).await.status().as_u16() }
    });
    let statuses = futures_util::future::join_all(calls).await;
    assert_eq!(statuses, [200; 5]);
    assert_eq!(requests_to(&idp, "/jwks").await, 2, "one shared refetch");

    // Within the cooldown another unknown kid is refused without asking the IdP again.
    let mut header = RSA_2.header();
    header.kid = Some("not-published".into());
    let stranger = RSA_2.sign_with(header, &idp_claims(json!({})));
    let body = assert_error(
        app.get(CHARGES, &stranger).await,
        401,
        "denied_authentication",
    )
    .await;
    assert_eq!(body["reason"], "invalid_argument");
    assert_eq!(requests_to(&idp, "/jwks").await, 2, "cooldown");
    assert_eq!(app.upstream_requests().await.len(), 5);
}

#[tokio::test]
async fn no_token_is_ever_checked_with_a_key_of_another_kind() {
    let idp = idp_serving(&[&RSA_1]).await;
    let app = gateway(&idp, |_| {}).await;
    let claims = idp_claims(json!({}));
    let hs256 = |secret: &[u8]| {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(RSA_1.kid());
        jsonwebtoken::encode(
            &header,
            &claims,
            &EncodingKey::from_secret(secret).expect("key"),
        )
        .expect("sign")
    };
    // The classic confusion: an HMAC whose secret is the public key, in every form it is published.
    let pem = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/keys/rsa-1.pub.pem"
    ))
    .expect("public key");
    let der = {
        let text = String::from_utf8(pem.clone()).expect("pem text");
        let b64: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
        base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b64).expect("der")
    };
    let jwk = RSA_1.jwk().to_string();
    let mut forged = vec![hs256(&pem), hs256(&der), hs256(jwk.as_bytes())];
    // An RSA key whose JWK says RS256 does not check PS256; an EC token cannot borrow its kid.
    forged.push(RSA_1.sign_with(
        {
            let mut h = RSA_1.header();
            h.alg = Algorithm::PS256;
            h
        },
        &claims,
    ));
    forged.push(EC_P256.sign_with(
        {
            let mut h = EC_P256.header();
            h.kid = Some(RSA_1.kid());
            h
        },
        &claims,
    ));
    for token in &forged {
        let body = assert_error(app.get(CHARGES, token).await, 401, "denied_authentication").await;
        assert_eq!(body["method"], "jwt");
    }
    assert!(app.upstream_requests().await.is_empty());
    // The honest token of the same key passes, so the refusals above were about the algorithm.
    assert_eq!(app.get(CHARGES, &RSA_1.sign(&claims)).await.status(), 200);
}

#[tokio::test]
async fn jku_x5u_and_embedded_jwk_headers_are_never_followed() {
    let idp = idp_serving(&[&RSA_1]).await;
    let attacker = idp_serving(&[&ATTACKER]).await;
    let app = gateway(&idp, |_| {}).await;

    let embedded: jsonwebtoken::jwk::Jwk =
        serde_json::from_value(ATTACKER.jwk()).expect("attacker jwk");
    let mut header = ATTACKER.header(); // kid "rsa-1": the IdP's own kid
    header.jku = Some(format!("{}/jwks", attacker.uri()));
    header.x5u = Some(format!("{}/cert.pem", attacker.uri()));
    header.jwk = Some(embedded);
    let same_kid = ATTACKER.sign_with(header.clone(), &idp_claims(json!({})));
    header.kid = Some("attacker-kid".into());
    let new_kid = ATTACKER.sign_with(header, &idp_claims(json!({})));

    for token in [&same_kid, &new_kid] {
        assert_error(app.get(CHARGES, token).await, 401, "denied_authentication").await;
    }
    assert!(
        attacker
            .received_requests()
            .await
            .unwrap_or_default()
            .is_empty(),
        "the gateway contacted a server named in a token"
    );
    assert!(app.upstream_requests().await.is_empty());
}

#[tokio::test]
async fn issuer_audience_and_time_claims_are_enforced_on_asymmetric_tokens() {
    let idp = idp_serving(&[&RSA_1]).await;
    let app = gateway(&idp, |c| {
        c.auth.issuer = Some("https://idp.example/realms/acme".into());
        c.auth.audience = Some("billing-gateway".into());
    })
    .await;
    let iss = "https://idp.example/realms/acme";
    let good = idp_claims(json!({"iss": iss, "aud": ["account", "billing-gateway"]}));
    assert_eq!(app.get(CHARGES, &RSA_1.sign(&good)).await.status(), 200);

    let now = jsonwebtoken::get_current_timestamp();
    let refused = [
        json!({"iss": "https://evil.example", "aud": "billing-gateway"}),
        json!({"aud": "billing-gateway"}),
        json!({"iss": iss, "aud": "another-app"}),
        json!({"iss": iss}),
        json!({"iss": iss, "aud": "billing-gateway", "nbf": now + 600}),
        json!({"iss": iss, "aud": "billing-gateway", "iat": now + 600}),
    ];
    for extra in refused {
        let token = RSA_1.sign(&idp_claims(extra.clone()));
        let body = assert_error(app.get(CHARGES, &token).await, 401, "denied_authentication").await;
        assert_eq!(body["reason"], "invalid_argument", "{extra}");
    }
    let expired = RSA_1.sign(&idp_claims(
        json!({"iss": iss, "aud": "billing-gateway", "exp": now - 600}),
    ));
    let body = assert_error(
        app.get(CHARGES, &expired).await,
        401,
        "denied_authentication",
    )
    .await;
    assert_eq!(body["reason"], "expired");
    let mut no_exp = idp_claims(json!({"iss": iss, "aud": "billing-gateway"}));
    no_exp.as_object_mut().map(|c| c.remove("exp"));
    assert_error(
        app.get(CHARGES, &RSA_1.sign(&no_exp)).await,
        401,
        "denied_authentication",
    )
    .await;

    assert_eq!(
        app.upstream_requests().await.len(),
        1,
        "only the good token got through"
    );
}

#[tokio::test]
async fn an_unknown_kid_while_the_jwks_is_down_is_refused_and_held_keys_keep_working() {
    let idp = idp_then(ResponseTemplate::new(503)).await;
    let app = gateway(&idp, |_| {}).await;

    let unknown = RSA_2.sign(&idp_claims(json!({})));
    let body = assert_error(
        app.get(CHARGES, &unknown).await,
        401,
        "denied_authentication",
    )
    .await;
    assert_eq!(body["reason"], "invalid_argument");
    assert_eq!(requests_to(&idp, "/jwks").await, 2, "one refetch was tried");
    assert!(app.upstream_requests().await.is_empty());

    assert_eq!(
        app.get(CHARGES, &RSA_1.sign(&idp_claims(json!({}))))
            .await
            .status(),
        200
    );
    assert_eq!(readyz(&app).await, 200, "keys are held");
}

#[tokio::test]
async fn with_no_key_at_all_asymmetric_tokens_and_readyz_answer_503_until_keys_arrive() {
    let idp = MockServer::start().await;
    Mock::given(path("/jwks"))
        .respond_with(ResponseTemplate::new(500))
        .mount(&idp)
        .await;
    let app = gateway(&idp, |_| {}).await;

    assert_eq!(readyz(&app).await, 503);
    let token = RSA_1.sign(&idp_claims(json!({})));
    assert_error(app.get(CHARGES, &token).await, 503, "service_unavailable").await;
    assert!(app.upstream_requests().await.is_empty());
    // HS256 does not depend on the IdP.
    assert_eq!(app.get(CHARGES, &app.manager()).await.status(), 200);
    assert_eq!(app.upstream_requests().await.len(), 1);

    // The IdP comes back: the background retry brings the keys in without any request.
    idp.reset().await;
    Mock::given(path("/jwks"))
        .respond_with(jwks(&[&RSA_1]))
        .mount(&idp)
        .await;
    eventually(|| async { readyz(&app).await == 200 }, PATIENCE).await;
    assert_eq!(app.get(CHARGES, &token).await.status(), 200);
}

#[tokio::test]
async fn the_jwks_is_found_by_oidc_discovery_from_the_issuer() {
    let idp = MockServer::start().await;
    let issuer = format!("{}/realms/acme", idp.uri());
    Mock::given(method("GET"))
        .and(path("/realms/acme/.well-known/openid-configuration"))
        .respond_with(
            ResponseTemplate::new(200).set_body_raw(
                json!({"issuer": issuer, "jwks_uri": format!("{}/realms/acme/certs", idp.uri())})
                    .to_string(),
                "application/json",
            ),
        )
        .expect(1)
        .mount(&idp)
        .await;
    Mock::given(method("GET"))
        .and(path("/realms/acme/certs"))
        .respond_with(jwks(&[&EC_P256]))
        .expect(1)
        .mount(&idp)
        .await;
    let discovered_issuer = issuer.clone();
    let app = TestApp::spawn_with(move |c| {
        c.auth.hs256_secret = None;
        c.auth.issuer = Some(discovered_issuer);
    })
    .await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(200).set_body_raw("{}", "application/json"))
        .mount(&app.upstream)
        .await;
    assert_eq!(readyz(&app).await, 200);

    let token = EC_P256.sign(&idp_claims(json!({"iss": issuer})));
    assert_eq!(app.get(CHARGES, &token).await.status(), 200);
    let no_iss = EC_P256.sign(&idp_claims(json!({})));
    assert_error(
        app.get(CHARGES, &no_iss).await,
        401,
        "denied_authentication",
    )
    .await;
    // With no HS256 secret configured, HS256 tokens have nothing to meet.
    assert_error(
        app.get(CHARGES, &app.manager()).await,
        401,
        "denied_authentication",
    )
    .await;
    assert_eq!(app.upstream_requests().await.len(), 1);
}

#[tokio::test]
async fn a_discovery_document_naming_another_issuer_or_a_redirect_is_not_trusted() {
    let elsewhere = idp_serving(&[&RSA_1]).await;
    let idp = MockServer::start().await;
    Mock::given(path("/.well-known/openid-configuration"))
        .respond_with(ResponseTemplate::new(200).set_body_raw(
            json!({"issuer": "https://evil.example", "jwks_uri": format!("{}/jwks", elsewhere.uri())})
                .to_string(),
            "application/json",
        ))
        .mount(&idp)
        .await;
    Mock::given(path("/jwks"))
        .respond_with(
            ResponseTemplate::new(302)
                .insert_header("location", format!("{}/jwks", elsewhere.uri())),
        )
        .mount(&idp)
        .await;

    let by_discovery = {
        let issuer = idp.uri();
        TestApp::spawn_with(move |c| c.auth.issuer = Some(issuer)).await
    };
    let by_redirect = gateway(&idp, |_| {}).await;
    for app in [&by_discovery, &by_redirect] {
        assert_eq!(readyz(app).await, 503);
        let token = RSA_1.sign(&idp_claims(json!({})));
        assert_error(app.get(CHARGES, &token).await, 503, "service_unavailable").await;
        assert!(app.upstream_requests().await.is_empty());
    }
    assert!(
        elsewhere
            .received_requests()
            .await
            .unwrap_or_default()
            .is_empty(),
        "followed a redirect or a foreign discovery document"
    );
}
