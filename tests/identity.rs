//! Identity as companies run it (contract §4): an IdP of the test's own over TLS, behind a CA
//! generated here, as a company's would be: trusted through `GATEWAY_IDP_CA_FILE` for discovery
//! and the JWKS only; a key it withdraws stops verifying within the bound (remembered tokens
//! included); its `Ed25519` tokens; fetch warnings that say why.

mod common;
#[path = "common/jwks.rs"]
mod idp;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use billing_gateway::auth::Authenticator;
use billing_gateway::config::AuthConfig;
use common::*;
use idp::*;
use jsonwebtoken::Algorithm;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use wiremock::matchers::any;
use wiremock::{Mock, ResponseTemplate};

/// Not cached, so every allowed call reaches the upstream and can be counted.
const CHARGES: &str = "/billing/v2beta1/charges";

/// What the contract promises: a withdrawn key stops verifying within this.
const WITHDRAWAL_BOUND: Duration = Duration::from_secs(5 * 60);

/// A company CA, made for one test, and the folder holding its PEM.
struct CompanyCa {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
    dir: TempDir,
}

impl CompanyCa {
    fn new() -> CompanyCa {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Example Corp internal CA");
        let pem = params.self_signed(&key).expect("CA cert").pem();
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::write(dir.path().join("company-ca.pem"), &pem).expect("write CA");
        CompanyCa {
            issuer: Issuer::new(params, key),
            pem,
            dir,
        }
    }

    fn file(&self) -> PathBuf {
        self.dir.path().join("company-ca.pem")
    }

    /// A server certificate for 127.0.0.1, signed by this CA.
    fn server_config(&self) -> rustls::ServerConfig {
        let key = KeyPair::generate().expect("server key");
        let cert = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .expect("params")
            .signed_by(&key, &self.issuer)
            .expect("server cert");
        let chain = vec![
            CertificateDer::from(cert.der().to_vec()),
            CertificateDer::from_pem_slice(self.pem.as_bytes()).expect("ca der"),
        ];
        let key = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).expect("key der");
        billing_gateway::install_crypto_provider();
        rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("server config")
    }
}

/// What the TLS IdP serves and has seen.
#[derive(Default)]
struct Served {
    /// The JWKS `keys`.
    keys: Vec<Value>,
    /// `Cache-Control` of the JWKS answer, when set.
    cache_control: Option<String>,
    /// Paths asked over a completed handshake, in order.
    asked: Vec<String>,
    /// Handshakes that failed (the client refused the certificate).
    refused_handshakes: usize,
}

/// An identity provider over TLS: `/.well-known/openid-configuration` names itself as issuer
/// and `/jwks` as its keys; anything else is a 404 (or, for an upstream test, a Billing API
/// answer the gateway must never get to read).
struct TlsIdp {
    addr: SocketAddr,
    served: Arc<Mutex<Served>>,
}

impl TlsIdp {
    async fn start(ca: &CompanyCa, keys: &[&TestKey]) -> TlsIdp {
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(ca.server_config()));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let served = Arc::new(Mutex::new(Served {
            keys: keys.iter().map(|k| k.jwk()).collect(),
            ..Served::default()
        }));
        let state = served.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let state = state.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        state.lock().expect("lock").refused_handshakes += 1;
                        return;
                    };
                    while let Ok(Some(head)) = read_head(&mut tls).await {
                        let head = String::from_utf8_lossy(&head).into_owned();
                        let path = head.split(' ').nth(1).unwrap_or("").to_owned();
                        let answer = answer(&state, addr, &path);
                        if tls.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        TlsIdp { addr, served }
    }

    fn issuer(&self) -> String {
        format!("https://{}", self.addr)
    }

    fn jwks_url(&self) -> String {
        format!("https://{}/jwks", self.addr)
    }

    fn publish(&self, keys: &[&TestKey]) {
        self.served.lock().expect("lock").keys = keys.iter().map(|k| k.jwk()).collect();
    }

    fn asked(&self, path: &str) -> usize {
        let served = self.served.lock().expect("lock");
        served.asked.iter().filter(|p| *p == path).count()
    }

    fn refused_handshakes(&self) -> usize {
        self.served.lock().expect("lock").refused_handshakes
    }
}

fn answer(state: &Mutex<Served>, addr: SocketAddr, path: &str) -> String {
    let mut served = state.lock().expect("lock");
    served.asked.push(path.to_owned());
    let (status, extra, body) = match path {
        "/.well-known/openid-configuration" => (
            "200 OK",
            String::new(),
            json!({"issuer": format!("https://{addr}"), "jwks_uri": format!("https://{addr}/jwks")})
                .to_string(),
        ),
        "/jwks" => (
            "200 OK",
            served
                .cache_control
                .as_ref()
                .map(|cc| format!("cache-control: {cc}\r\n"))
                .unwrap_or_default(),
            json!({"keys": served.keys}).to_string(),
        ),
        _ => ("404 Not Found", String::new(), "{}".to_owned()),
    };
    format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\n{extra}content-length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// The gateway trusting `idp` through the company CA file, with an upstream answering all.
async fn gateway(
    ca: &CompanyCa,
    edit: impl FnOnce(&mut billing_gateway::config::Config),
) -> TestApp {
    let ca_file = ca.file();
    let app = TestApp::spawn_with(move |c| {
        c.auth.ca_file = Some(ca_file);
        edit(c);
    })
    .await;
    Mock::given(any())
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_raw(json!({"charges": []}).to_string(), "application/json"),
        )
        .mount(&app.upstream)
        .await;
    app
}

/// Moves the gateway's clock (tokio's: its refresh schedule and cooldowns) `by` at once, then
/// lets it run on real time again; the tokens' own `exp`/`iat` follow the wall clock, untouched.
async fn let_pass(by: Duration) {
    tokio::time::pause();
    tokio::time::advance(by).await;
    tokio::time::resume();
}

#[tokio::test]
async fn discovery_and_the_jwks_trust_the_company_ca_file_while_the_upstream_still_refuses_it() {
    let ca = CompanyCa::new();
    let idp = TlsIdp::start(&ca, &[&RSA_1]).await;
    let issuer = idp.issuer();
    let app = gateway(&ca, |c| {
        c.auth.hs256_secret = None;
        c.auth.issuer = Some(issuer);
    })
    .await;
    assert_eq!(idp.asked("/.well-known/openid-configuration"), 1);
    assert_eq!(idp.asked("/jwks"), 1);

    let token = RSA_1.sign(&idp_claims(json!({"iss": idp.issuer()})));
    assert_eq!(app.get(CHARGES, &token).await.status(), 200);
    assert_eq!(app.upstream_requests().await.len(), 1);

    // The same CA file, and a "Billing API" behind a certificate of that CA: refused.
    let billing = TlsIdp::start(&ca, &[]).await;
    let ca_file = ca.file();
    let idp_issuer = idp.issuer();
    let upstream = TestApp::builder()
        .upstream_url(format!("https://{}", billing.addr))
        .config(move |c| {
            c.auth.ca_file = Some(ca_file);
            c.auth.issuer = Some(idp_issuer);
        })
        .spawn()
        .await;
    let status = upstream.get(CHARGES, &token).await.status().as_u16();
    assert_eq!(status, 502, "the upstream client trusted the IdP's CA");
    assert!(billing.refused_handshakes() >= 1, "the gateway did try");
    assert!(billing.served.lock().expect("lock").asked.is_empty());

    // Without the file, the IdP's certificate is not trusted: no keys, 503.
    let issuer = idp.issuer();
    let untrusting = TestApp::spawn_with(move |c| {
        c.auth.hs256_secret = None;
        c.auth.issuer = Some(issuer);
    })
    .await;
    assert_error(
        untrusting.get(CHARGES, &token).await,
        503,
        "service_unavailable",
    )
    .await;
}

#[tokio::test]
async fn a_withdrawn_key_stops_verifying_within_the_bound_remembered_tokens_included() {
    let ca = CompanyCa::new();
    let idp = TlsIdp::start(&ca, &[&RSA_1, &RSA_2]).await;
    let jwks_url = idp.jwks_url();
    let app = gateway(&ca, |c| c.auth.jwks_url = Some(jwks_url)).await;

    let remembered = RSA_1.sign(&idp_claims(json!({"sub": "remembered"})));
    let unseen = RSA_1.sign(&idp_claims(json!({"sub": "unseen"})));
    let rotated = RSA_2.sign(&idp_claims(json!({"sub": "rotated"})));
    for _ in 0..2 {
        assert_eq!(app.get(CHARGES, &remembered).await.status(), 200);
    }
    // The IdP withdraws rsa-1: until the set is re-read, the held key still verifies.
    idp.publish(&[&RSA_2]);
    assert_eq!(app.get(CHARGES, &remembered).await.status(), 200);
    assert_eq!(idp.asked("/jwks"), 1);

    let_pass(WITHDRAWAL_BOUND).await;
    refused_soon(&app, &remembered).await;
    // The scheduled re-read, then one for the kid it made unknown; none for the next token.
    let body = assert_error(
        app.get(CHARGES, &unseen).await,
        401,
        "denied_authentication",
    )
    .await;
    assert_eq!(body["reason"], "invalid_argument");
    assert_eq!(idp.asked("/jwks"), 3);
    let before = app.upstream_requests().await.len();
    assert_eq!(app.get(CHARGES, &rotated).await.status(), 200);
    assert_eq!(app.upstream_requests().await.len(), before + 1);
}

#[tokio::test]
async fn the_jwks_max_age_sets_when_it_is_read_again() {
    let ca = CompanyCa::new();
    let idp = TlsIdp::start(&ca, &[&RSA_1, &RSA_2]).await;
    idp.served.lock().expect("lock").cache_control = Some("public, max-age=60".into());
    let jwks_url = idp.jwks_url();
    let app = gateway(&ca, |c| c.auth.jwks_url = Some(jwks_url)).await;
    let token = RSA_1.sign(&idp_claims(json!({})));
    assert_eq!(app.get(CHARGES, &token).await.status(), 200);
    idp.publish(&[&RSA_2]);

    // A minute and a second: well before the 4 minutes of an answer without max-age.
    let_pass(Duration::from_secs(61)).await;
    refused_soon(&app, &token).await;
    assert!(idp.asked("/jwks") >= 2);
}

/// Waits, asking with `token`, until the gateway refuses it (it was allowed until then). A
/// connection the gateway closed as idle while the clock moved counts as "not yet": the client
/// drops it and the next try opens another.
async fn refused_soon(app: &TestApp, token: &str) {
    let url = format!("{}{CHARGES}", app.base);
    eventually(
        || async {
            let sent = app.client.get(&url).bearer_auth(token).send().await;
            sent.is_ok_and(|r| r.status() == 401)
        },
        PATIENCE,
    )
    .await;
}

#[tokio::test]
async fn fully_specified_ed25519_tokens_verify_as_eddsa_and_only_with_their_key() {
    let ca = CompanyCa::new();
    // The JWK itself may say `Ed25519` too (RFC 9864).
    let mut jwk = ED25519.jwk();
    jwk["alg"] = "Ed25519".into();
    let idp = TlsIdp::start(&ca, &[&RSA_1]).await;
    idp.served.lock().expect("lock").keys.push(jwk);
    let jwks_url = idp.jwks_url();
    let app = gateway(&ca, |c| {
        c.auth.jwks_url = Some(jwks_url);
        c.auth.audience = Some("billing-gateway".into());
    })
    .await;

    let claims = idp_claims(json!({"aud": "billing-gateway"}));
    let fully_specified = respell(&ED25519.sign(&claims), "Ed25519");
    // Re-signed over the respelled header, as an IdP issuing `Ed25519` does.
    let token = sign_as_ed25519(&claims);
    assert_eq!(app.get(CHARGES, &token).await.status(), 200);
    assert_eq!(app.get(CHARGES, &token).await.status(), 200, "remembered");
    let whoami: Value = app
        .get("/gateway/v1/whoami", &token)
        .await
        .json()
        .await
        .expect("whoami");
    assert_eq!(whoami["subject"], "carol");

    // The header changed after signing: the signature no longer covers it.
    assert_error(
        app.get(CHARGES, &fully_specified).await,
        401,
        "denied_authentication",
    )
    .await;
    // The same claim rules as any token: another audience, or expired, is refused.
    for bad in [
        json!({"aud": "another-app"}),
        json!({"aud": "billing-gateway", "exp": jsonwebtoken::get_current_timestamp() - 600}),
    ] {
        let token = sign_as_ed25519(&idp_claims(bad));
        assert_error(app.get(CHARGES, &token).await, 401, "denied_authentication").await;
    }
    // An RSA key never checks an `Ed25519` token, whatever kid it names.
    let mut header = json!({"alg": "Ed25519", "kid": RSA_1.kid()});
    let borrowed = sign_raw_ed25519(&mut header, &claims);
    assert_error(
        app.get(CHARGES, &borrowed).await,
        401,
        "denied_authentication",
    )
    .await;
    assert_eq!(app.upstream_requests().await.len(), 2);
}

/// `token` with its header's `alg` replaced, the signature left as it was.
fn respell(token: &str, alg: &str) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut parts = token.splitn(2, '.');
    let header = parts.next().expect("header");
    let rest = parts.next().expect("rest");
    let mut json: Value = serde_json::from_slice(&b64.decode(header).expect("b64")).expect("json");
    json["alg"] = alg.into();
    format!("{}.{rest}", b64.encode(json.to_string()))
}

fn sign_as_ed25519(claims: &Value) -> String {
    let mut header = json!({"alg": "Ed25519", "typ": "JWT", "kid": ED25519.kid()});
    sign_raw_ed25519(&mut header, claims)
}

/// A JWS signed with the Ed25519 test key under exactly this header.
fn sign_raw_ed25519(header: &mut Value, claims: &Value) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let message = format!(
        "{}.{}",
        b64.encode(header.to_string()),
        b64.encode(claims.to_string())
    );
    let key = jsonwebtoken::EncodingKey::from_ed_pem(&ED25519.pem()).expect("key");
    let signature =
        jsonwebtoken::crypto::sign(message.as_bytes(), &key, Algorithm::EdDSA).expect("sign");
    format!("{message}.{signature}")
}

/// Log lines at warning level and up, captured for one test.
fn warnings() -> (Captured, tracing::subscriber::DefaultGuard) {
    logs(tracing::Level::WARN)
}

/// Log lines at `level` and up, captured for one test (its runtime runs on its one thread).
fn logs(level: tracing::Level) -> (Captured, tracing::subscriber::DefaultGuard) {
    let captured = Captured::default();
    let writer = captured.clone();
    let filter = format!("warn,billing_gateway::auth={level}");
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let guard = tracing::subscriber::set_default(subscriber);
    // Other tests' subscribers, on other threads, may have had callsites' interest cached
    // without this one's: recompute it, so no event this test waits for is skipped.
    tracing::callsite::rebuild_interest_cache();
    (captured, guard)
}

fn auth_config(jwks_url: String, ca_file: Option<PathBuf>) -> AuthConfig {
    AuthConfig {
        hs256_secret: None,
        jwks_url: Some(jwks_url),
        issuer: None,
        audience: Some("billing-gateway".into()),
        leeway: Duration::from_secs(30),
        ca_file,
    }
}

/// The warning the one startup fetch of `jwks_url` logs.
async fn startup_warning(jwks_url: String, ca_file: Option<PathBuf>) -> String {
    let (captured, _guard) = warnings();
    let auth = Authenticator::start(&auth_config(jwks_url, ca_file))
        .await
        .expect("starts even without keys");
    assert!(!auth.ready());
    let text = captured.text();
    let line = text
        .lines()
        .find(|l| l.contains("cannot fetch the identity provider's keys"))
        .unwrap_or_else(|| panic!("no fetch warning in {text}"));
    line.to_owned()
}

#[tokio::test]
async fn each_fetch_warning_names_its_cause() {
    // Refused: a port nobody listens on any more.
    let closed = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = closed.local_addr().expect("addr");
    drop(closed);
    let line = startup_warning(format!("http://{addr}/jwks"), None).await;
    assert!(line.contains("refused"), "{line}");

    // Certificate: the company's IdP, without the company CA.
    let ca = CompanyCa::new();
    let idp = TlsIdp::start(&ca, &[&RSA_1]).await;
    let line = startup_warning(idp.jwks_url(), None).await;
    assert!(line.contains("certificate"), "{line}");
    eventually(|| async { idp.refused_handshakes() >= 1 }, PATIENCE).await;
    // With it: fetched, no warning of any kind.
    let (captured, _guard) = warnings();
    let auth = Authenticator::start(&auth_config(idp.jwks_url(), Some(ca.file())))
        .await
        .expect("auth");
    assert!(auth.ready());
    assert_eq!(captured.text(), "");

    // Status: the IdP answers, but not with keys.
    let line = startup_warning(format!("{}/nowhere", idp.issuer()), Some(ca.file())).await;
    assert!(line.contains("status 404"), "{line}");
}

#[tokio::test(start_paused = true)]
async fn a_jwks_that_never_answers_is_reported_as_timed_out() {
    // Accepts and reads, never answers: the fetch's own timeout ends it (paused clock).
    let hanging = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = hanging.local_addr().expect("addr");
    let held = Arc::new(Mutex::new(Vec::new()));
    let keep = held.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = hanging.accept().await {
            keep.lock().expect("lock").push(tcp);
        }
    });
    let line = startup_warning(format!("http://{addr}/jwks"), None).await;
    assert!(line.contains("timed out"), "{line}");
    assert_eq!(held.lock().expect("lock").len(), 1, "it did connect");
}

#[tokio::test]
async fn a_jwks_key_the_gateway_cannot_use_is_warned_about_once_with_its_reason() {
    let ca = CompanyCa::new();
    let idp = TlsIdp::start(&ca, &[&RSA_1]).await;
    idp.served.lock().expect("lock").keys.push(json!({
        "kty": "EC", "crv": "P-521", "kid": "p521", "x": "AA", "y": "AA"
    }));
    let (captured, _guard) = warnings();
    let jwks_url = idp.jwks_url();
    let app = gateway(&ca, |c| c.auth.jwks_url = Some(jwks_url)).await;
    // A second read of the same set (an unknown kid asks for it) warns no more.
    let stranger = RSA_2.sign(&idp_claims(json!({})));
    assert_error(
        app.get(CHARGES, &stranger).await,
        401,
        "denied_authentication",
    )
    .await;
    assert_eq!(idp.asked("/jwks"), 2);

    let text = captured.text();
    let skipped: Vec<_> = text.lines().filter(|l| l.contains("cannot use")).collect();
    assert_eq!(skipped.len(), 1, "{text}");
    assert!(
        skipped[0].contains("WARN")
            && skipped[0].contains("p521")
            && skipped[0].contains("unsupported curve"),
        "{}",
        skipped[0]
    );
    // The usable key beside it works.
    let token = RSA_1.sign(&idp_claims(json!({})));
    assert_eq!(app.get(CHARGES, &token).await.status(), 200);
}

#[tokio::test]
async fn a_namespaced_top_level_claim_binds_through_the_real_gateway() {
    let ca = CompanyCa::new();
    let idp = TlsIdp::start(&ca, &[&RSA_1]).await;
    let binding = "[[bindings]]\nclaim = \"https://billing.example.com/roles\"\nequals = \"billing-manager\"\nroles = [\"billing-manager\"]\n";
    let jwks_url = idp.jwks_url();
    let ca_file = ca.file();
    let app = TestApp::builder()
        .policy(&[("default.toml", DEFAULT_POLICY), ("auth0.toml", binding)])
        .config(move |c| {
            c.auth.jwks_url = Some(jwks_url);
            c.auth.ca_file = Some(ca_file);
        })
        .spawn()
        .await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(200).set_body_raw("{}", "application/json"))
        .mount(&app.upstream)
        .await;
    let auth0 = |roles: Value| {
        let mut claims = idp_claims(json!({}));
        claims.as_object_mut().map(|c| c.remove("roles"));
        claims["https://billing.example.com/roles"] = roles;
        RSA_1.sign(&claims)
    };
    let invoices = "/billing/v2beta1/invoices";
    assert_eq!(
        app.get(invoices, &auth0(json!(["billing-manager"])))
            .await
            .status(),
        200
    );
    assert_error(
        app.get(invoices, &auth0(json!(["billing-read-only"])))
            .await,
        403,
        "permissions_denied",
    )
    .await;
    let sent = app.upstream_requests().await;
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].url.path(), invoices);
}
