//! Credentials to identities: which credential a request carries, and whether it is genuine
//! (contract §4).
//!
//! This is where a token is verified and nowhere else. A request carries exactly one credential;
//! a JWT's algorithm is pinned to what the configuration enables before its signature is checked,
//! so `none` and algorithm confusion are refused up front.

use std::collections::HashSet;

use axum::http::{HeaderMap, header};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::config::AuthConfig;
use crate::error::{AuthMethod, AuthReason, Error};

/// Tokens longer than this are refused before any parsing.
const MAX_TOKEN_LEN: usize = 8 * 1024;

/// A verified caller, before policy: who it is and what its token says.
#[derive(Debug, Clone)]
pub struct Identity {
    /// `sub`.
    pub subject: String,
    /// Every claim, for policy bindings.
    pub claims: Map<String, Value>,
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
    validation: Validation,
    leeway: u64,
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
    /// Builds the verifier once; tokens are then checked without allocation of keys.
    pub fn new(cfg: &AuthConfig) -> Authenticator {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = cfg.leeway.as_secs();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.required_spec_claims = HashSet::from(["exp".to_owned()]);
        match &cfg.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &cfg.issuer {
            validation.set_issuer(&[iss]);
        }
        Authenticator {
            hs256: cfg
                .hs256_secret
                .as_ref()
                .map(|s| DecodingKey::from_secret(s.expose_secret().as_bytes())),
            validation,
            leeway: cfg.leeway.as_secs(),
        }
    }

    /// Whether signing keys are at hand, so tokens can be checked at all (`/readyz`).
    pub fn ready(&self) -> bool {
        true
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
            (Some(token), None) => Ok(Credential::Jwt(token)),
            (None, Some(token)) => match Uuid::try_parse(token) {
                Ok(key) if token.len() == 36 => Ok(Credential::Key(key)),
                _ => Ok(Credential::Jwt(token)),
            },
            (None, None) => Err(denied(
                AuthMethod::Jwt,
                AuthReason::NotFound,
                "no credential: send Authorization: Bearer <JWT> or X-Auth-Token",
            )),
        }
    }

    /// Verifies a JWT: enabled algorithm, signature, `exp` (required), `nbf`, `iat`,
    /// and `iss`/`aud` when configured.
    pub async fn verify_jwt(&self, token: &str) -> Result<Identity, Error> {
        if token.is_empty() || token.len() > MAX_TOKEN_LEN {
            return Err(invalid("the token is empty or too long"));
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| invalid("the token is not a well-formed JWT"))?;
        let key = match (header.alg, &self.hs256) {
            (Algorithm::HS256, Some(key)) => key,
            _ => {
                return Err(invalid(
                    "the token's algorithm is not accepted by this gateway",
                ));
            }
        };
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, key, &self.validation)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => denied(
                    AuthMethod::Jwt,
                    AuthReason::Expired,
                    "the token has expired",
                ),
                ErrorKind::ImmatureSignature => invalid("the token is not valid yet (nbf)"),
                ErrorKind::InvalidSignature => invalid("the token's signature does not verify"),
                ErrorKind::MissingRequiredClaim(_) => invalid("the token has no exp claim"),
                ErrorKind::InvalidIssuer => invalid("the token's issuer is not accepted"),
                ErrorKind::InvalidAudience => invalid("the token's audience is not accepted"),
                _ => invalid("the token is not a well-formed JWT"),
            })?;
        let claims = data.claims;
        if let Some(iat) = claims.get("iat") {
            let now = jsonwebtoken::get_current_timestamp();
            match iat.as_u64() {
                Some(iat) if iat <= now + self.leeway => {}
                _ => return Err(invalid("the token's iat is in the future or not a number")),
            }
        }
        let subject = match claims.get("sub") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            _ => return Err(invalid("the token has no sub claim")),
        };
        Ok(Identity { subject, claims })
    }
}

/// Signs `claims` with HS256: for `token`, `demo` and tests, never for callers' real identities.
pub fn mint_hs256(secret: &SecretString, claims: &Map<String, Value>) -> Result<String, Error> {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.expose_secret().as_bytes()),
    )
    .map_err(|e| Error::Internal(format!("cannot sign a token: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use serde_json::json;
    use std::time::Duration;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn auth() -> Authenticator {
        Authenticator::new(&AuthConfig {
            hs256_secret: Some(SecretString::from(SECRET)),
            jwks_url: None,
            issuer: None,
            audience: None,
            leeway: Duration::from_secs(30),
        })
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
        let a = auth();
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
    }
}
