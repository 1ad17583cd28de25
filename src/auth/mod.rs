//! Credentials to identities: which credential a request carries, and whether it is genuine
//! (contract §4).
//!
//! The walk, in the order a request takes it:
//!
//! 1. [`Authenticator::credential`] finds the request's one credential (`credential.rs`): a JWT
//!    or a gateway key. A key is handed to the policy; a JWT comes back here.
//! 2. [`Authenticator::verify_jwt`] first asks the verified-token memo (`memo.rs`: keyed by the
//!    token's SHA-256, until its `exp` and never beyond), so a caller repeating an RS256 token
//!    pays for one signature check, not one per request.
//! 3. Otherwise the JWT's algorithm picks its key before its signature is checked: HS256 only
//!    ever meets the configured secret, the asymmetric algorithms only ever meet a key from the
//!    identity provider's JWKS (`jwks.rs`) whose type and `alg` fit, so `none` and algorithm
//!    confusion are refused up front. Both kinds then go through one validation (`exp`
//!    required, `nbf`, `iat`, `iss`, `aud`, leeway), and the [`Identity`] is remembered.
//!
//! This is where a token is verified and nowhere else.

mod credential;
mod jwks;
mod memo;

use std::collections::HashSet;
use std::sync::Arc;

use axum::http::HeaderMap;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Map, Value};

use crate::config::AuthConfig;
use crate::error::{AuthMethod, AuthReason, Error};
use crate::telemetry::SourceHealth;

pub use credential::Credential;
use memo::Memo;

/// Tokens longer than this are refused before any parsing.
const MAX_TOKEN_LEN: usize = 8 * 1024;

/// The asymmetric algorithms a JWKS key may verify (contract §3, `GATEWAY_JWKS_URL`).
const ASYMMETRIC: [Algorithm; 7] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// A verified caller, before policy: who it is and what its token says.
#[derive(Debug, Clone)]
pub struct Identity {
    /// `sub`.
    pub subject: String,
    /// Every claim, for policy bindings; shared, so a remembered token is handed out cheaply.
    pub claims: Arc<Map<String, Value>>,
}

/// Verifies credentials with the keys the configuration enables.
pub struct Authenticator {
    hs256: Option<DecodingKey>,
    keys: Option<Arc<jwks::KeyStore>>,
    /// The claim rules, one copy per enabled algorithm.
    validations: Vec<Validation>,
    leeway: u64,
    verified: Memo,
}

fn denied(method: AuthMethod, reason: AuthReason, message: &'static str) -> Error {
    Error::Unauthenticated {
        method,
        reason,
        message,
    }
}

fn invalid(message: &'static str) -> Error {
    denied(AuthMethod::Jwt, AuthReason::InvalidArgument, message)
}

impl Authenticator {
    /// Builds the verifier and, when a JWKS URL or an OIDC issuer is configured, fetches the
    /// identity provider's keys once. A failed fetch does not stop the gateway: it starts
    /// unready (503 for asymmetric tokens) and keeps trying in the background.
    pub async fn start(cfg: &AuthConfig) -> Result<Authenticator, Error> {
        Authenticator::start_reporting(cfg, SourceHealth::default()).await
    }

    /// [`Authenticator::start`], reporting every fetch of the identity provider's keys to
    /// `health` (the app's metrics).
    pub async fn start_reporting(
        cfg: &AuthConfig,
        health: SourceHealth,
    ) -> Result<Authenticator, Error> {
        let keys = match cfg.key_source() {
            Some(source) => Some(
                jwks::KeyStore::start(source, health)
                    .await
                    .map_err(Error::Internal)?,
            ),
            None => None,
        };
        let hs256 = cfg
            .hs256_secret
            .as_ref()
            .map(|s| DecodingKey::from_secret(s.expose_secret().as_bytes()))
            .transpose()
            .map_err(|e| Error::Internal(format!("the HS256 secret is not usable: {e}")))?;
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = cfg.leeway.as_secs();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.required_spec_claims = HashSet::from(["exp".to_owned()]);
        // jsonwebtoken checks `iss` and `aud` only when present: configured, they are required.
        match &cfg.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                validation.required_spec_claims.insert("aud".to_owned());
            }
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &cfg.issuer {
            validation.set_issuer(&[iss]);
            validation.required_spec_claims.insert("iss".to_owned());
        }
        // jsonwebtoken wants one key family per `Validation`: one copy per enabled algorithm,
        // the claim rules identical in all.
        let validations = hs256
            .iter()
            .map(|_| Algorithm::HS256)
            .chain(keys.iter().flat_map(|_| ASYMMETRIC))
            .map(|alg| {
                let mut v = validation.clone();
                v.algorithms = vec![alg];
                v
            })
            .collect();
        Ok(Authenticator {
            hs256,
            keys,
            validations,
            leeway: cfg.leeway.as_secs(),
            verified: Memo::new(),
        })
    }

    /// Whether signing keys are at hand, so tokens can be checked at all (`/readyz`): false
    /// while an identity provider is configured and none of its keys could be fetched yet.
    pub fn ready(&self) -> bool {
        self.keys.as_ref().is_none_or(|keys| keys.has_keys())
    }

    /// Forgets every verified token, so each is checked in full again on its next use.
    #[cfg(test)]
    pub(crate) fn forget_verified(&self) {
        self.verified.forget_all();
    }

    /// Finds the request's one credential.
    pub fn credential(headers: &HeaderMap) -> Result<Credential<'_>, Error> {
        credential::find(headers)
    }

    /// Verifies a JWT: enabled algorithm, the key that algorithm may use, signature, `exp`
    /// (required), `nbf`, `iat`, and `iss`/`aud` when configured. 503 when the token needs the
    /// identity provider's keys and none could be fetched.
    pub async fn verify_jwt(&self, token: &str) -> Result<Identity, Error> {
        if token.is_empty() || token.len() > MAX_TOKEN_LEN {
            return Err(invalid("the token is empty or too long"));
        }
        let digest = Memo::digest(token);
        let now = jsonwebtoken::get_current_timestamp();
        if let Some(identity) = self.verified.get(&digest, now) {
            return Ok(identity);
        }
        // Only picks the key: `decode` below parses the header again and refuses any `crit`
        // extension it does not implement.
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| invalid("the token is not a well-formed JWT"))?;
        let validation = self
            .validations
            .iter()
            .find(|v| v.algorithms == [header.alg])
            .ok_or_else(|| invalid("the token's algorithm is not accepted by this gateway"))?;
        // The algorithm picks where the key comes from; `jku`, `x5u` and `jwk` are never read.
        let held;
        let key = match (header.alg, &self.hs256, &self.keys) {
            (Algorithm::HS256, Some(secret), _) => secret,
            (alg, _, Some(keys)) if ASYMMETRIC.contains(&alg) => {
                held = keys.key_for(header.kid.as_deref(), alg).await?;
                &held.key
            }
            _ => {
                return Err(invalid(
                    "the token's algorithm is not accepted by this gateway",
                ));
            }
        };
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, key, validation).map_err(
            |e| match e.kind() {
                ErrorKind::ExpiredSignature => denied(
                    AuthMethod::Jwt,
                    AuthReason::Expired,
                    "the token has expired",
                ),
                ErrorKind::ImmatureSignature => invalid("the token is not valid yet (nbf)"),
                ErrorKind::InvalidSignature => invalid("the token's signature does not verify"),
                ErrorKind::MissingRequiredClaim(claim) => match claim.as_str() {
                    "iss" => invalid("the token has no iss claim"),
                    "aud" => invalid("the token has no aud claim"),
                    _ => invalid("the token has no exp claim"),
                },
                ErrorKind::InvalidIssuer => invalid("the token's issuer is not accepted"),
                ErrorKind::InvalidAudience => invalid("the token's audience is not accepted"),
                // The header names a `crit` extension jsonwebtoken does not implement (any but
                // `b64`), or the token does not split into header, claims and signature.
                ErrorKind::InvalidToken => invalid(
                    "the token is malformed or has critical header extensions this gateway does not understand",
                ),
                ErrorKind::InvalidAlgorithm => {
                    invalid("the token's algorithm is not accepted by this gateway")
                }
                ErrorKind::InvalidKeyFormat
                | ErrorKind::InvalidEcdsaKey
                | ErrorKind::InvalidRsaKey(_) => {
                    invalid("the token's key cannot check its signature")
                }
                _ => invalid("the token is not a well-formed JWT"),
            },
        )?;
        let claims = data.claims;
        if let Some(iat) = claims.get("iat") {
            match iat.as_u64() {
                Some(iat) if iat <= now + self.leeway => {}
                _ => return Err(invalid("the token's iat is in the future or not a number")),
            }
        }
        let subject = match claims.get("sub") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            _ => return Err(invalid("the token has no sub claim")),
        };
        let exp = claims.get("exp").and_then(Value::as_u64);
        let identity = Identity {
            subject,
            claims: Arc::new(claims),
        };
        self.verified.remember(digest, &identity, exp, now);
        Ok(identity)
    }
}

/// Signs `claims` with HS256: for `token`, `demo` and tests, never for callers' real identities.
pub fn mint_hs256(secret: &SecretString, claims: &Map<String, Value>) -> Result<String, Error> {
    let key = EncodingKey::from_secret(secret.expose_secret().as_bytes())
        .map_err(|e| Error::Internal(format!("cannot sign a token: {e}")))?;
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &key)
        .map_err(|e| Error::Internal(format!("cannot sign a token: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    pub(super) async fn auth() -> Authenticator {
        Authenticator::start(&AuthConfig {
            hs256_secret: Some(SecretString::from(SECRET)),
            jwks_url: None,
            issuer: None,
            audience: None,
            leeway: Duration::from_secs(30),
        })
        .await
        .expect("authenticator")
    }

    pub(super) fn token(claims: Value) -> String {
        let Value::Object(m) = claims else { panic!() };
        mint_hs256(&SecretString::from(SECRET), &m).expect("sign")
    }

    pub(super) fn reason(r: Result<Identity, Error>) -> &'static str {
        match r {
            Err(Error::Unauthenticated { reason, .. }) => match reason {
                AuthReason::Expired => "expired",
                AuthReason::InvalidArgument => "invalid_argument",
                AuthReason::NotFound => "not_found",
            },
            other => panic!("expected 401, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn time_claims_are_enforced_with_leeway() {
        let now = jsonwebtoken::get_current_timestamp();
        let a = auth().await;
        assert!(
            a.verify_jwt(&token(json!({"sub": "u", "exp": now + 60})))
                .await
                .is_ok()
        );
        assert!(
            a.verify_jwt(&token(json!({"sub": "u", "exp": now - 10})))
                .await
                .is_ok(),
            "leeway"
        );
        assert_eq!(
            reason(
                a.verify_jwt(&token(json!({"sub": "u", "exp": now - 100})))
                    .await
            ),
            "expired"
        );
        assert_eq!(
            reason(a.verify_jwt(&token(json!({"sub": "u"}))).await),
            "invalid_argument"
        );
        assert_eq!(
            reason(
                a.verify_jwt(&token(
                    json!({"sub": "u", "exp": now + 600, "nbf": now + 300})
                ))
                .await
            ),
            "invalid_argument"
        );
        assert_eq!(
            reason(
                a.verify_jwt(&token(
                    json!({"sub": "u", "exp": now + 600, "iat": now + 300})
                ))
                .await
            ),
            "invalid_argument"
        );
    }

    #[tokio::test]
    async fn no_token_is_checked_with_a_key_of_another_kind() {
        // HS256 only: an asymmetric token has no key to meet, whatever its header says.
        let a = auth().await;
        let now = jsonwebtoken::get_current_timestamp();
        let Value::Object(claims) = json!({"sub": "u", "exp": now + 60}) else {
            panic!()
        };
        let rsa =
            EncodingKey::from_rsa_pem(include_bytes!("../../tests/keys/rsa-1.pem")).expect("pem");
        let mut header = Header::new(Algorithm::RS256);
        header.jku = Some("http://127.0.0.1:9/keys".into());
        let rs256 = jsonwebtoken::encode(&header, &claims, &rsa).expect("sign");
        assert_eq!(reason(a.verify_jwt(&rs256).await), "invalid_argument");
        let hs512 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS512),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()).expect("key"),
        )
        .expect("sign");
        assert_eq!(reason(a.verify_jwt(&hs512).await), "invalid_argument");
        let none = format!(
            "{}.{}.",
            base64::Engine::encode(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                br#"{"alg":"none","typ":"JWT"}"#
            ),
            base64::Engine::encode(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                serde_json::to_vec(&claims).expect("json")
            )
        );
        assert_eq!(reason(a.verify_jwt(&none).await), "invalid_argument");
        assert!(a.ready(), "HS256 alone needs no fetched keys");
    }

    #[tokio::test]
    async fn a_token_naming_a_critical_extension_the_gateway_does_not_implement_is_refused() {
        let a = auth().await;
        let now = jsonwebtoken::get_current_timestamp();
        let Value::Object(claims) = json!({"sub": "u", "exp": now + 60}) else {
            panic!()
        };
        let key = EncodingKey::from_secret(SECRET.as_bytes()).expect("key");
        let signed = |crit: Option<&[&str]>| {
            let mut header = Header::new(Algorithm::HS256);
            header.crit = crit.map(|c| c.iter().map(|s| (*s).to_owned()).collect());
            jsonwebtoken::encode(&header, &claims, &key).expect("sign")
        };
        assert!(a.verify_jwt(&signed(None)).await.is_ok());
        // `b64` without its header parameter is refused as surely as an extension nobody knows.
        for crit in [&["exp"][..], &["https://example.com/ext"], &["b64"], &[]] {
            assert_eq!(
                reason(a.verify_jwt(&signed(Some(crit))).await),
                "invalid_argument",
                "crit {crit:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_configured_issuer_and_audience_are_required_not_only_compared() {
        let a = Authenticator::start(&AuthConfig {
            hs256_secret: Some(SecretString::from(SECRET)),
            jwks_url: None,
            issuer: Some("billing".into()),
            audience: Some("gateway".into()),
            leeway: Duration::from_secs(30),
        })
        .await
        .expect("authenticator");
        let exp = jsonwebtoken::get_current_timestamp() + 60;
        let ok = json!({"sub": "u", "exp": exp, "iss": "billing", "aud": "gateway"});
        assert!(a.verify_jwt(&token(ok)).await.is_ok());
        for claims in [
            json!({"sub": "u", "exp": exp, "aud": "gateway"}),
            json!({"sub": "u", "exp": exp, "iss": "billing"}),
        ] {
            assert_eq!(
                reason(a.verify_jwt(&token(claims)).await),
                "invalid_argument"
            );
        }
    }
}
