//! The identity provider's signing keys (contract §4): fetched at startup from the JWKS (or the
//! JWKS the issuer's OIDC discovery document names), held by `kid`, refetched on an unknown `kid`
//! at most once per [`REFETCH_COOLDOWN`], re-read on a schedule (the answer's `Cache-Control`
//! max-age, within [`REFRESH_MIN`]..[`REFRESH_MAX`]) so a withdrawn key stops verifying within
//! minutes, and kept when a fetch fails.
//!
//! A key still published is kept as the same [`Key`] across re-reads, and only the store holds
//! it strongly: the verified-token memo holds it weakly, so a key gone from the set takes every
//! verification it made with it.
//!
//! Keys come only from the configured place: a token's `jku`, `x5u` or embedded `jwk` is never
//! looked at. Fetches use their own client (short timeout, no redirects, no default headers, the
//! system roots plus `GATEWAY_IDP_CA_FILE`'s), so nothing the gateway holds for the upstream can
//! ride along, and a company CA trusted for the IdP is trusted for nothing else.

use std::collections::HashSet;
use std::error::Error as _;
use std::path::Path;
use std::sync::{Arc, PoisonError, RwLock, Weak};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{
    AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, KeyOperations, PublicKeyUse,
};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::invalid;
use crate::config::{KeySource, parse_http_url};
use crate::error::Error;
use crate::telemetry::SourceHealth;

/// An unknown `kid` refetches the JWKS at most this often, so junk tokens cannot hammer the IdP.
pub(crate) const REFETCH_COOLDOWN: Duration = Duration::from_secs(30);
/// Whole-request timeout of one discovery or JWKS fetch.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// A JWKS is a few kilobytes; anything much larger is not one.
const MAX_DOCUMENT: usize = 256 * 1024;
/// Retry pace while no key is held: from the first to the second, doubling.
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// While keys are held, the set is re-read after the JWKS answer's `Cache-Control` max-age,
/// held within these bounds (the most when it names none): a key the IdP withdrew stops verifying
/// within [`REFRESH_MAX`] plus one fetch, under the 5 minutes contract §4 promises, and an IdP
/// saying `max-age=0` is not asked in a loop.
pub(crate) const REFRESH_MIN: Duration = Duration::from_secs(30);
pub(crate) const REFRESH_MAX: Duration = Duration::from_secs(4 * 60);
/// RSA keys shorter than this are refused (RFC 7518 §3.3 asks for 2048 bits at least).
const MIN_RSA_BYTES: usize = 256;

/// One usable verification key from the JWKS.
pub(crate) struct Key {
    /// The JWK as published: a re-read publishing the same one keeps this `Key`.
    jwk: Value,
    kid: Option<String>,
    /// The algorithms this key type can verify, narrowed to the JWK's own `alg` when it has one.
    algs: Vec<Algorithm>,
    /// The key itself.
    pub(crate) key: DecodingKey,
}

impl Key {
    /// Accepts only public signature keys of a supported type; `oct` keys never come from a JWKS
    /// (a symmetric key there would let anyone who can read the JWKS sign tokens).
    fn from_jwk(value: Value) -> Result<Key, String> {
        let mut spelled = value.clone();
        // RFC 9864's fully specified name for EdDSA on Ed25519, which jsonwebtoken does not know.
        if spelled["alg"] == "Ed25519" {
            spelled["alg"] = "EdDSA".into();
        }
        let jwk: Jwk = serde_json::from_value(spelled).map_err(|e| format!("not a JWK: {e}"))?;
        let kid = jwk.common.key_id.clone();
        match &jwk.common.public_key_use {
            None | Some(PublicKeyUse::Signature) => {}
            Some(_) => return Err(format!("{kid:?}: not a signature key (use)")),
        }
        if let Some(ops) = &jwk.common.key_operations
            && !ops.contains(&KeyOperations::Verify)
        {
            return Err(format!("{kid:?}: key_ops does not allow verify"));
        }
        let (algs, key) = match &jwk.algorithm {
            AlgorithmParameters::RSA(rsa) => {
                let n = URL_SAFE_NO_PAD
                    .decode(rsa.n.trim_end_matches('='))
                    .map_err(|_| format!("{kid:?}: bad RSA modulus"))?;
                let bytes = n.iter().skip_while(|b| **b == 0).count();
                if bytes < MIN_RSA_BYTES {
                    return Err(format!("{kid:?}: RSA key shorter than 2048 bits"));
                }
                let key = DecodingKey::from_rsa_components(&rsa.n, &rsa.e)
                    .map_err(|e| format!("{kid:?}: bad RSA key: {e}"))?;
                let algs = vec![
                    Algorithm::RS256,
                    Algorithm::RS384,
                    Algorithm::RS512,
                    Algorithm::PS256,
                ];
                (algs, key)
            }
            AlgorithmParameters::EllipticCurve(ec) => {
                let alg = match ec.curve {
                    EllipticCurve::P256 => Algorithm::ES256,
                    EllipticCurve::P384 => Algorithm::ES384,
                    _ => return Err(format!("{kid:?}: unsupported curve")),
                };
                let key = DecodingKey::from_ec_components(&ec.x, &ec.y)
                    .map_err(|e| format!("{kid:?}: bad EC key: {e}"))?;
                (vec![alg], key)
            }
            AlgorithmParameters::OctetKeyPair(okp) if okp.curve == EllipticCurve::Ed25519 => {
                let key = DecodingKey::from_ed_components(&okp.x)
                    .map_err(|e| format!("{kid:?}: bad Ed25519 key: {e}"))?;
                (vec![Algorithm::EdDSA], key)
            }
            AlgorithmParameters::OctetKeyPair(_) => {
                return Err(format!("{kid:?}: unsupported curve"));
            }
            AlgorithmParameters::OctetKey(_) => {
                return Err(format!(
                    "{kid:?}: symmetric keys are never taken from a JWKS"
                ));
            }
            _ => return Err(format!("{kid:?}: unsupported key type")),
        };
        let algs = match jwk.common.key_algorithm {
            None => algs,
            Some(declared) => match key_alg(declared) {
                Some(alg) if algs.contains(&alg) => vec![alg],
                _ => return Err(format!("{kid:?}: alg {declared} does not fit the key")),
            },
        };
        Ok(Key {
            jwk: value,
            kid,
            algs,
            key,
        })
    }

    /// Whether this key may check a token signed with `alg`: its type and its own `alg` agree.
    pub(crate) fn fits(&self, alg: Algorithm) -> bool {
        self.algs.contains(&alg)
    }
}

/// The signing algorithm a JWK's `alg` names, if it names one.
fn key_alg(alg: KeyAlgorithm) -> Option<Algorithm> {
    Algorithm::try_from(alg).ok()
}

/// The keys currently held and how to get more.
pub(crate) struct KeyStore {
    source: KeySource,
    client: reqwest::Client,
    keys: RwLock<Arc<[Arc<Key>]>>,
    /// Held while fetching, so concurrent unknown-`kid` requests share one fetch.
    fetch: Mutex<FetchState>,
    /// Every fetch's outcome, for the metrics.
    health: SourceHealth,
    /// When a held set is next re-read: the last fetch's time plus its max-age (a failed
    /// fetch, [`REFRESH_MIN`]), counted from the fetch rather than from whenever the
    /// refresher next runs.
    next_refresh: std::sync::Mutex<Instant>,
}

#[derive(Default)]
struct FetchState {
    /// The `jwks_uri` discovery found, until a fetch from it fails.
    jwks_uri: Option<String>,
    /// When an unknown `kid` last caused a fetch.
    last_on_demand: Option<Instant>,
    /// Why JWKS keys were skipped, each warned about once rather than at every re-read.
    skipped: HashSet<String>,
}

#[derive(Deserialize)]
struct JwkSet {
    keys: Vec<Value>,
}

#[derive(Deserialize)]
struct Discovery {
    issuer: String,
    jwks_uri: String,
}

impl KeyStore {
    /// Builds the store, fetches the keys once (a failure is logged: the gateway starts and
    /// answers 503 for asymmetric tokens until keys arrive) and starts the background refresher.
    pub(crate) async fn start(
        source: KeySource,
        ca_file: Option<&Path>,
        health: SourceHealth,
    ) -> Result<Arc<KeyStore>, String> {
        crate::crypto::install_crypto_provider();
        let roots = match ca_file {
            Some(path) => idp_roots(path)?,
            None => Vec::new(),
        };
        let client = reqwest::Client::builder()
            .tls_certs_merge(roots)
            .no_proxy()
            .timeout(FETCH_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("billing-gateway/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build the JWKS client: {e}"))?;
        let store = Arc::new(KeyStore {
            source,
            client,
            keys: RwLock::new(Arc::from(Vec::new())),
            fetch: Mutex::new(FetchState::default()),
            health,
            next_refresh: std::sync::Mutex::new(Instant::now() + REFRESH_MAX),
        });
        store.refresh("startup").await;
        tokio::spawn(maintain(Arc::downgrade(&store)));
        Ok(store)
    }

    /// Whether any key is held.
    pub(crate) fn has_keys(&self) -> bool {
        !self.snapshot().is_empty()
    }

    /// When the held set is next re-read.
    fn next_refresh(&self) -> Instant {
        *self
            .next_refresh
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn refresh_in(&self, wait: Duration) {
        *self
            .next_refresh
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Instant::now() + wait;
    }

    fn snapshot(&self) -> Arc<[Arc<Key>]> {
        self.keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The key for a token's `kid` and `alg`. An unknown `kid` refetches the set (at most once
    /// per cooldown); with no key at all the answer is 503, not 401.
    pub(crate) async fn key_for(
        &self,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> Result<Arc<Key>, Error> {
        if let Some(found) = find(&self.snapshot(), kid, alg) {
            return found;
        }
        self.refetch_on_demand().await;
        let keys = self.snapshot();
        match find(&keys, kid, alg) {
            Some(found) => found,
            None if keys.is_empty() => Err(Error::Unavailable(
                "no signing keys: the identity provider's JWKS could not be fetched".into(),
            )),
            None if kid.is_none() => Err(invalid(
                "the token names no key (kid) and the identity provider has several",
            )),
            None => Err(invalid(
                "the token's key (kid) is not one of the identity provider's keys",
            )),
        }
    }

    async fn refetch_on_demand(&self) {
        let mut state = self.fetch.lock().await;
        if state
            .last_on_demand
            .is_some_and(|at| at.elapsed() < REFETCH_COOLDOWN)
        {
            return;
        }
        state.last_on_demand = Some(Instant::now());
        self.fetch_locked(&mut state, "unknown kid").await;
    }

    async fn refresh(&self, why: &'static str) -> bool {
        let mut state = self.fetch.lock().await;
        self.fetch_locked(&mut state, why).await
    }

    /// Fetches and swaps in the new set; on failure the keys held stay.
    async fn fetch_locked(&self, state: &mut FetchState, why: &'static str) -> bool {
        match self.fetch_keys(state).await {
            Ok((keys, max_age)) => {
                self.health.succeeded();
                let refresh = max_age
                    .unwrap_or(REFRESH_MAX)
                    .clamp(REFRESH_MIN, REFRESH_MAX);
                self.refresh_in(refresh);
                tracing::info!(
                    keys = keys.len(),
                    why,
                    refresh_in_s = refresh.as_secs(),
                    "identity provider keys loaded"
                );
                *self.keys.write().unwrap_or_else(PoisonError::into_inner) = keys.into();
                true
            }
            Err(error) => {
                self.health.failed();
                self.refresh_in(REFRESH_MIN);
                state.jwks_uri = None;
                tracing::warn!(
                    %error,
                    why,
                    held = self.snapshot().len(),
                    "cannot fetch the identity provider's keys; keeping those held"
                );
                false
            }
        }
    }

    /// The usable keys of the set, the ones already held kept as they are, and the answer's
    /// max-age.
    async fn fetch_keys(
        &self,
        state: &mut FetchState,
    ) -> Result<(Vec<Arc<Key>>, Option<Duration>), String> {
        let jwks_uri = match (&self.source, &state.jwks_uri) {
            (KeySource::Jwks(url), _) => url.clone(),
            (KeySource::Discovery(_), Some(uri)) => uri.clone(),
            (KeySource::Discovery(issuer), None) => {
                let url = format!(
                    "{}/.well-known/openid-configuration",
                    issuer.trim_end_matches('/')
                );
                let (doc, _): (Discovery, _) = self.get_json(&url).await?;
                // OIDC Discovery §4.3: the document must name the issuer it was asked for.
                if doc.issuer != *issuer {
                    return Err(format!("{url}: names issuer `{}`", doc.issuer));
                }
                let uri = parse_http_url(&doc.jwks_uri).map_err(|e| format!("{url}: {e}"))?;
                state.jwks_uri = Some(uri.clone());
                uri
            }
        };
        let (set, max_age): (JwkSet, _) = self.get_json(&jwks_uri).await?;
        let held = self.snapshot();
        let mut keys = Vec::with_capacity(set.keys.len());
        for jwk in set.keys {
            if let Some(same) = held.iter().find(|k| k.jwk == jwk) {
                keys.push(same.clone());
                continue;
            }
            match Key::from_jwk(jwk) {
                Ok(key) => keys.push(Arc::new(key)),
                // An IdP publishing a key it means tokens to be signed with, in a form the
                // gateway cannot use, is worth knowing about; once, not at every re-read.
                Err(why) if state.skipped.insert(why.clone()) => {
                    tracing::warn!(%why, "a JWKS key the gateway cannot use is skipped");
                }
                Err(why) => tracing::debug!(%why, "JWKS key skipped"),
            }
        }
        if keys.is_empty() {
            return Err(format!("{jwks_uri}: no usable signing key"));
        }
        Ok((keys, max_age))
    }

    /// The document at `url` and its `Cache-Control` max-age; an error names its cause.
    async fn get_json<T: DeserializeOwned>(
        &self,
        url: &str,
    ) -> Result<(T, Option<Duration>), String> {
        let mut response = self
            .client
            .get(url)
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| format!("{url}: {}", cause(&e)))?;
        if !response.status().is_success() {
            return Err(format!("{url}: status {}", response.status()));
        }
        let max_age = max_age(response.headers());
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| format!("{url}: {}", cause(&e)))?
        {
            if body.len() + chunk.len() > MAX_DOCUMENT {
                return Err(format!("{url}: larger than {MAX_DOCUMENT} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        let doc = serde_json::from_slice(&body)
            .map_err(|e| format!("{url}: unexpected document: {e}"))?;
        Ok((doc, max_age))
    }
}

/// The certificates of `GATEWAY_IDP_CA_FILE`: a PEM file holding at least one.
pub(crate) fn idp_roots(path: &Path) -> Result<Vec<reqwest::Certificate>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    match reqwest::Certificate::from_pem_bundle(&pem) {
        Ok(certs) if !certs.is_empty() => Ok(certs),
        Ok(_) => Err(format!("{}: no PEM certificate in it", path.display())),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// `Cache-Control: max-age=N`, when the answer says it.
fn max_age(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    headers
        .get_all(reqwest::header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|d| d.trim().strip_prefix("max-age=")?.parse().ok())
        .map(Duration::from_secs)
}

/// Why a request failed, in the operator's words first (refused, timed out, certificate, TLS),
/// then the innermost error's own: reqwest's text alone says "error sending request" for all.
fn cause(error: &reqwest::Error) -> String {
    let mut kind = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "cannot connect"
    } else {
        "failed"
    };
    let mut detail = error.to_string();
    let mut next: Option<&(dyn std::error::Error + 'static)> = error.source();
    while let Some(e) = next {
        detail = e.to_string();
        // tokio-rustls reports TLS failures as an io::Error wrapping rustls's own, and an
        // io::Error's `source` skips what it wraps: look inside it too.
        let io = e.downcast_ref::<std::io::Error>();
        let wrapped = io.and_then(|io| io.get_ref());
        let tls = e
            .downcast_ref::<rustls::Error>()
            .or_else(|| wrapped.and_then(|w| w.downcast_ref::<rustls::Error>()));
        if let Some(tls) = tls {
            kind = match tls {
                rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented => {
                    "certificate not trusted"
                }
                _ => "TLS handshake failed",
            };
            detail = tls.to_string();
            break;
        }
        match io.map(std::io::Error::kind) {
            Some(std::io::ErrorKind::ConnectionRefused) => kind = "refused",
            Some(std::io::ErrorKind::TimedOut) => kind = "timed out",
            _ => {}
        }
        next = e.source();
    }
    format!("{kind} ({detail})")
}

/// `Some` when the set decides: the key, or why the token cannot use the key its `kid` names.
/// `None` when the set holds nothing for it (worth a refetch).
fn find(keys: &[Arc<Key>], kid: Option<&str>, alg: Algorithm) -> Option<Result<Arc<Key>, Error>> {
    let Some(kid) = kid else {
        // No `kid`: only unambiguous when exactly one key can check this algorithm.
        let mut fitting = keys.iter().filter(|k| k.fits(alg));
        return match (fitting.next(), fitting.next()) {
            (Some(key), None) => Some(Ok(key.clone())),
            _ => None,
        };
    };
    let mut named = keys
        .iter()
        .filter(|k| k.kid.as_deref() == Some(kid))
        .peekable();
    named.peek()?;
    Some(
        named
            .find(|k| k.fits(alg))
            .cloned()
            .ok_or_else(|| invalid("the token's algorithm does not fit its key")),
    )
}

/// Retries while no key is held, and re-reads the set now and then while keys are held. Ends
/// when the gateway that owns the store is gone.
async fn maintain(store: Weak<KeyStore>) {
    let mut retry = RETRY_MIN;
    loop {
        let wake = match store.upgrade() {
            Some(s) if s.has_keys() => s.next_refresh(),
            Some(_) => Instant::now() + retry,
            None => return,
        };
        tokio::time::sleep_until(wake).await;
        let Some(s) = store.upgrade() else { return };
        retry = if s.refresh("scheduled").await {
            RETRY_MIN
        } else {
            (retry * 2).min(RETRY_MAX)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn n_2048() -> String {
        let jwk: Value =
            serde_json::from_str(include_str!("../../tests/keys/rsa-1.jwk.json")).expect("fixture");
        jwk["n"].as_str().expect("n").to_owned()
    }

    fn key(jwk: Value) -> Result<Key, String> {
        Key::from_jwk(jwk)
    }

    #[test]
    fn only_public_signature_keys_whose_alg_fits_their_type_are_taken() {
        let n = n_2048();
        let rsa = key(json!({"kty": "RSA", "n": n, "e": "AQAB", "kid": "r"})).expect("rsa");
        assert!(rsa.fits(Algorithm::RS256) && rsa.fits(Algorithm::PS256));
        assert!(!rsa.fits(Algorithm::ES256) && !rsa.fits(Algorithm::HS256));
        let pinned =
            key(json!({"kty": "RSA", "n": n, "e": "AQAB", "alg": "RS256"})).expect("rsa with alg");
        assert!(pinned.fits(Algorithm::RS256) && !pinned.fits(Algorithm::RS512));

        for bad in [
            json!({"kty": "oct", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA"}),
            json!({"kty": "RSA", "n": n, "e": "AQAB", "use": "enc"}),
            json!({"kty": "RSA", "n": n, "e": "AQAB", "alg": "ES256"}),
            json!({"kty": "RSA", "n": n, "e": "AQAB", "alg": "HS256"}),
            json!({"kty": "RSA", "n": n, "e": "AQAB", "alg": "RSA-OAEP"}),
            json!({"kty": "RSA", "n": n, "e": "AQAB", "key_ops": ["encrypt"]}),
            json!({"kty": "RSA", "n": &n[..170], "e": "AQAB"}),
            json!({"kty": "EC", "crv": "P-521", "x": "AA", "y": "AA"}),
            json!({"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA", "alg": "ES384"}),
        ] {
            assert!(key(bad.clone()).is_err(), "{bad}");
        }
        let ec = key(json!({"kty": "EC", "crv": "P-384", "x": "AA", "y": "AA"})).expect("ec");
        assert!(ec.fits(Algorithm::ES384) && !ec.fits(Algorithm::ES256));
    }

    #[test]
    fn a_kid_selects_its_key_and_a_missing_kid_only_an_unambiguous_one() {
        let n = n_2048();
        let a = Arc::new(key(json!({"kty": "RSA", "n": n, "e": "AQAB", "kid": "a"})).expect("a"));
        let b = Arc::new(
            key(json!({"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA", "kid": "b"})).expect("b"),
        );
        let keys = [a, b];
        assert!(matches!(
            find(&keys, Some("a"), Algorithm::RS256),
            Some(Ok(_))
        ));
        assert!(matches!(
            find(&keys, Some("a"), Algorithm::ES256),
            Some(Err(_))
        ));
        assert!(find(&keys, Some("c"), Algorithm::RS256).is_none());
        assert!(
            matches!(find(&keys, None, Algorithm::ES256), Some(Ok(k)) if k.kid.as_deref() == Some("b"))
        );
        assert!(find(&keys, None, Algorithm::EdDSA).is_none());
    }

    #[test]
    fn an_ed25519_jwk_may_name_its_algorithm_either_way() {
        let x = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo";
        for alg in ["EdDSA", "Ed25519"] {
            let ed = key(json!({"kty": "OKP", "crv": "Ed25519", "x": x, "alg": alg})).expect(alg);
            assert!(
                ed.fits(Algorithm::EdDSA) && !ed.fits(Algorithm::ES256),
                "{alg}"
            );
        }
        let refused =
            key(json!({"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA", "alg": "Ed25519"}));
        assert!(refused.is_err());
    }

    #[test]
    fn max_age_is_read_among_the_cache_control_directives() {
        let headers = |values: &[&str]| {
            let mut h = reqwest::header::HeaderMap::new();
            for v in values {
                h.append(reqwest::header::CACHE_CONTROL, v.parse().expect("value"));
            }
            h
        };
        let secs = |values: &[&str]| max_age(&headers(values)).map(|d| d.as_secs());
        assert_eq!(secs(&["public, max-age=60"]), Some(60));
        assert_eq!(
            secs(&["no-transform", "max-age=0, must-revalidate"]),
            Some(0)
        );
        assert_eq!(secs(&["s-maxage=60"]), None);
        assert_eq!(secs(&["max-age=soon"]), None);
        assert_eq!(secs(&[]), None);
    }
}
