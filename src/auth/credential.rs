//! Finding the one credential a request carries (contract §4): a JWT or a gateway key (a UUID),
//! in `Authorization: Bearer` or `X-Auth-Token`. Only the headers are
//! read here, nothing is verified: what the credential is decides who checks it (the
//! [`Authenticator`](super::Authenticator) for a JWT, the policy for a key). Kept apart so the
//! rules of where a credential may be sent can be read in one place.

use axum::http::{HeaderMap, header};
use uuid::Uuid;

use super::{denied, invalid};
use crate::error::{AuthMethod, AuthReason, Error};

/// The one credential a request carries.
#[derive(Debug, PartialEq, Eq)]
pub enum Credential<'a> {
    /// A JWT, from `Authorization: Bearer` or `X-Auth-Token`.
    Jwt(&'a str),
    /// A gateway key (a UUID), as unmodified SDKs send their secret key (`X-Auth-Token`) and
    /// a Prometheus scrape config its credentials (`Authorization: Bearer`).
    Key(Uuid),
}

/// The gateway key a credential is, when it is one: a UUID in its canonical hyphenated form.
fn as_key(token: &str) -> Option<Uuid> {
    Uuid::try_parse(token).ok().filter(|_| token.len() == 36)
}

/// The request's one credential: a second one anywhere, a header that is not text, or a
/// scheme other than `Bearer` is refused.
pub(super) fn find(headers: &HeaderMap) -> Result<Credential<'_>, Error> {
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
        // A gateway key in either header: Prometheus's `authorization` sends it as a bearer
        // token (contract §12), the SDKs as `X-Auth-Token`.
        (Some(token), None) | (None, Some(token)) => {
            Ok(as_key(token).map_or(Credential::Jwt(token), Credential::Key))
        }
        (None, None) => Err(denied(
            AuthMethod::Jwt,
            AuthReason::NotFound,
            "no credential: send Authorization: Bearer <JWT> or X-Auth-Token",
        )),
    }
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;
    use crate::auth::Authenticator;

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
        // A gateway key as a bearer token is a key, as in X-Auth-Token.
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer aaaaaaaa-0000-4000-8000-000000000001"),
        );
        assert!(matches!(
            Authenticator::credential(&h),
            Ok(Credential::Key(k)) if k.to_string() == "aaaaaaaa-0000-4000-8000-000000000001"
        ));
    }
}
