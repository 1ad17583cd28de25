//! The verified-token memo: a token whose signature and claims were checked is remembered,
//! keyed by its SHA-256, so a caller repeating an RS256 token pays for one signature check, not
//! one per request. An entry is never served past the token's `exp`, and never kept longer than
//! a few minutes (a key withdrawn from the JWKS must stop a token it signed soon); only verified
//! tokens enter it. Kept apart from verification so what is cached, and for how long, is
//! decided in one place.

use std::time::Duration;

use moka::Expiry;
use moka::sync::Cache;
use sha2::{Digest, Sha256};

use super::Identity;

/// Verified tokens remembered at most; each entry is one caller's live token.
const VERIFIED_CAPACITY: u64 = 10_000;

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

/// Verified tokens, by their SHA-256.
pub(super) struct Memo {
    cache: Cache<[u8; 32], Verified>,
}

impl Memo {
    pub(super) fn new() -> Memo {
        Memo {
            cache: Cache::builder()
                .max_capacity(VERIFIED_CAPACITY)
                .expire_after(UntilExp)
                .build(),
        }
    }

    /// What a token is remembered by.
    pub(super) fn digest(token: &str) -> [u8; 32] {
        Sha256::digest(token.as_bytes()).into()
    }

    /// The identity a token was verified as, unless its `exp` is not after `now`.
    pub(super) fn get(&self, digest: &[u8; 32], now: u64) -> Option<Identity> {
        self.cache
            .get(digest)
            .filter(|v| v.exp > now)
            .map(|hit| hit.identity)
    }

    /// Remembers a verified token, when its `exp` is after `now`.
    pub(super) fn remember(
        &self,
        digest: [u8; 32],
        identity: &Identity,
        exp: Option<u64>,
        now: u64,
    ) {
        if let Some(exp) = exp.filter(|exp| *exp > now) {
            self.cache.insert(
                digest,
                Verified {
                    identity: identity.clone(),
                    exp,
                },
            );
        }
    }

    /// Forgets every token.
    #[cfg(test)]
    pub(super) fn forget_all(&self) {
        self.cache.invalidate_all();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use secrecy::SecretString;
    use serde_json::{Value, json};

    use super::*;
    use crate::auth::mint_hs256;
    use crate::auth::tests::{auth, reason, token};

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
        a.verified.cache.run_pending_tasks();
        assert_eq!(
            a.verified.cache.entry_count(),
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
        a.verified.cache.insert(
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
}
