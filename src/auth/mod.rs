//! Credentials to identities: which credential a request carries, and whether it is genuine
//! (contract §4).
//!
//! This is where a token is verified and nowhere else. A request carries exactly one credential;
//! a JWT's algorithm picks its key before its signature is checked: HS256 only ever meets the
//! configured secret, the asymmetric algorithms only ever meet a key from the identity
//! provider's JWKS (the `jwks` submodule) whose type and `alg` fit, so `none` and algorithm confusion are
//! refused up front. Both kinds then go through one validation (`exp` required, `nbf`, `iat`,
//! `iss`, `aud`, leeway).
//!
//! Verified tokens are remembered (keyed by their SHA-256, until their `exp` and never beyond),
//! so a caller repeating an RS256 token pays for one signature check, not one per request.

mod jwks;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, header};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use moka::Expiry;
use moka::sync::Cache;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::config::AuthConfig;
use crate::error::{AuthMethod, AuthReason, Error};
use crate::telemetry::SourceHealth;

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

/// Verified tokens remembered at most; each entry is one caller's live token.
const VERIFIED_CAPACITY: u64 = 10_000;

/// A verified caller, before policy: who it is and what its token says.
#[derive(Debug, Clone)]
pub struct Identity {
    /// `sub`.
    pub subject: String,
    /// Every claim, for policy bindings; shared, so a remembered token is handed out cheaply.
    pub claims: Arc<Map<String, Value>>,
}

/// The one credential a request carries.
#[derive(Debug, PartialEq, Eq)]
pub enum Credential<'a> {
    /// A JWT, from `Authorization: Bearer` or `X-Auth-Token`.
    Jwt(&'a str),
    /// A gateway key (a UUID in `X-Auth-Token`), as unmodified SDKs send their secret key.
    Key(Uuid),
}

/// Verifies credentials with the keys the configuration enables.
pub struct Authenticator {
    hs256: Option<DecodingKey>,
    keys: Option<Arc<jwks::KeyStore>>,
    /// The claim rules, one copy per enabled algorithm.
    validations: Vec<Validation>,
    leeway: u64,
    verified: Cache<[u8; 32], Verified>,
}

/// A remembered verification: the identity and the token's `exp`, past which it is not served.
#[derive(Clone)]
struct Verified {
    identity: Identity,
    exp: u64,
}

/// Each remembered token lives until its own `exp`.
struct UntilExp;

/// How long a verified token is remembered at most (then its signature is checked again).
const REMEMBER_AT_MOST: Duration = Duration::from_secs(300);

impl Expiry<[u8; 32], Verified> for UntilExp {
    fn expire_after_create(
        &self,
        _token: &[u8; 32],
        verified: &Verified,
        _now: std::time::Instant,
    ) -> Option<Duration> {
        // Never beyond `exp`, and never long: `exp` is chosen by whoever signed the token, and a
        // key withdrawn from the JWKS must stop a token it signed within minutes, not at `exp`.
        Some(
            Duration::from_secs(
                verified
                    .exp
                    .saturating_sub(jsonwebtoken::get_current_timestamp()),
            )
            .min(REMEMBER_AT_MOST),
        )
    }
}

fn denied(method: AuthMethod, reason: AuthReason, message: &'static str) -> Error {
    Error::Unauthenticated {
        method,
        reason,
        message,
    }
}

/// The gateway key a credential is, when it is one: a UUID in its canonical hyphenated form.
fn as_key(token: &str) -> Option<Uuid> {
    Uuid::try_parse(token).ok().filter(|_| token.len() == 36)
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
            verified: Cache::builder()
                .max_capacity(VERIFIED_CAPACITY)
                .expire_after(UntilExp)
                .build(),
        })
    }

    /// Whether signing keys are at hand, so tokens can be checked at all (`/readyz`): false
    /// while an identity provider is configured and none of its keys could be fetched yet.
    pub fn ready(&self) -> bool {
        self.keys.as_ref().is_none_or(|keys| keys.has_keys())
    }

    /// Forgets every verified token, so each is checked in full again on its next use: after
    /// withdrawing a signing key, and for measuring the uncached path.
    pub fn forget_verified(&self) {
        self.verified.invalidate_all();
    }

    /// Finds the request's one credential.
    pub fn credential(headers: &HeaderMap) -> Result<Credential<'_>, Error> {
        let one = |name: &header::HeaderName| -> Result<Option<&str>, Error> {
            let mut values = headers.get_all(name).iter();
            match (values.next(), values.next()) {
                (None, _) => Ok(None),
                (Some(v), None) => v
                    .to_str()
                    .map(|s| Some(s.trim()))
                    .map_err(|_| invalid("the credential header is not valid text")),
                (Some(_), Some(_)) => Err(invalid("send exactly one credential")),
            }
        };
        let bearer = one(&header::AUTHORIZATION)?
            .map(|v| match v.split_once(' ') {
                Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => Ok(token.trim()),
                _ => Err(invalid("the Authorization header must be `Bearer <token>`")),
            })
            .transpose()?;
        let x_auth = one(&header::HeaderName::from_static("x-auth-token"))?;
        match (bearer, x_auth) {
            (Some(_), Some(_)) => Err(invalid(
                "send exactly one credential: Authorization or X-Auth-Token",
            )),
            // A gateway key is never a bearer token: say where it goes rather than call it a
            // malformed JWT (and do not accept it: one header, one meaning).
            (Some(token), None) if as_key(token).is_some() => Err(denied(
                AuthMethod::ApiKey,
                AuthReason::InvalidArgument,
                "a gateway key goes in the X-Auth-Token header, not in Authorization: Bearer \
                 (which takes a JWT)",
            )),
            (Some(token), None) => Ok(Credential::Jwt(token)),
            (None, Some(token)) => {
                Ok(as_key(token).map_or(Credential::Jwt(token), Credential::Key))
            }
            (None, None) => Err(denied(
                AuthMethod::Jwt,
                AuthReason::NotFound,
                "no credential: send Authorization: Bearer <JWT> or X-Auth-Token",
            )),
        }
    }

    /// Verifies a JWT: enabled algorithm, the key that algorithm may use, signature, `exp`
    /// (required), `nbf`, `iat`, and `iss`/`aud` when configured. 503 when the token needs the
    /// identity provider's keys and none could be fetched.
    pub async fn verify_jwt(&self, token: &str) -> Result<Identity, Error> {
        if token.is_empty() || token.len() > MAX_TOKEN_LEN {
            return Err(invalid("the token is empty or too long"));
        }
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let now = jsonwebtoken::get_current_timestamp();
        if let Some(hit) = self.verified.get(&digest).filter(|v| v.exp > now) {
            return Ok(hit.identity);
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
        if let Some(exp) = exp.filter(|exp| *exp > now) {
            self.verified.insert(
                digest,
                Verified {
                    identity: identity.clone(),
                    exp,
                },
            );
        }
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
    use axum::http::HeaderValue;
    use serde_json::json;
    use std::time::Duration;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    async fn auth() -> Authenticator {
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

    fn token(claims: Value) -> String {
        let Value::Object(m) = claims else { panic!() };
        mint_hs256(&SecretString::from(SECRET), &m).expect("sign")
    }

    fn reason(r: Result<Identity, Error>) -> &'static str {
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
    async fn only_verified_tokens_are_remembered_and_never_past_their_exp() {
        let a = auth().await;
        let now = jsonwebtoken::get_current_timestamp();
        let good = token(json!({"sub": "u", "exp": now + 60}));
        let first = a.verify_jwt(&good).await.expect("valid");
        let again = a.verify_jwt(&good).await.expect("remembered");
        assert!(
            Arc::ptr_eq(&first.claims, &again.claims),
            "served from memory"
        );

        let Value::Object(claims) = json!({"sub": "u", "exp": now + 60}) else {
            panic!()
        };
        let forged = mint_hs256(
            &SecretString::from("another-secret-of-thirty-two-bytes"),
            &claims,
        )
        .expect("sign");
        for _ in 0..2 {
            assert_eq!(reason(a.verify_jwt(&forged).await), "invalid_argument");
        }
        a.verified.run_pending_tasks();
        assert_eq!(
            a.verified.entry_count(),
            1,
            "a refused token is not remembered"
        );

        let ttl = UntilExp
            .expire_after_create(
                &[0; 32],
                &Verified {
                    identity: first.clone(),
                    exp: now + 60,
                },
                std::time::Instant::now(),
            )
            .expect("ttl");
        assert!(ttl <= Duration::from_secs(60) && ttl >= Duration::from_secs(58));

        // A remembered verification whose exp has passed is never served.
        let expired = token(json!({"sub": "u", "exp": now - 100}));
        a.verified.insert(
            Sha256::digest(expired.as_bytes()).into(),
            Verified {
                identity: first.clone(),
                exp: now,
            },
        );
        assert_eq!(reason(a.verify_jwt(&expired).await), "expired");

        a.forget_verified();
        let fresh = a.verify_jwt(&good).await.expect("valid");
        assert!(!Arc::ptr_eq(&first.claims, &fresh.claims), "checked again");
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

    #[test]
    fn one_credential_exactly() {
        let mut h = HeaderMap::new();
        assert!(Authenticator::credential(&h).is_err());
        h.insert(
            "x-auth-token",
            HeaderValue::from_static("aaaaaaaa-0000-4000-8000-000000000001"),
        );
        assert!(matches!(
            Authenticator::credential(&h),
            Ok(Credential::Key(_))
        ));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc"),
        );
        assert!(Authenticator::credential(&h).is_err());
        h.remove("x-auth-token");
        assert_eq!(
            Authenticator::credential(&h).ok(),
            Some(Credential::Jwt("abc"))
        );
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert!(Authenticator::credential(&h).is_err());
        // A gateway key as a bearer token is refused with where it goes, not as a bad JWT.
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer aaaaaaaa-0000-4000-8000-000000000001"),
        );
        assert!(matches!(
            Authenticator::credential(&h),
            Err(Error::Unauthenticated {
                method: AuthMethod::ApiKey,
                reason: AuthReason::InvalidArgument,
                message,
            }) if message.contains("X-Auth-Token")
        ));
    }
}
