//! Secrets no gateway may run with: the placeholders the repository ships (in
//! `deploy/kubernetes/secret.yaml` and `redis.yaml`, applied as-is they would let anyone with
//! the repository mint manager tokens or reach Redis) and values too plain to be random. Each
//! check returns the operator's message, which never repeats the value.

use uuid::Uuid;

/// Words only a placeholder holds: `replace-with-...`, `changeme`.
const PLACEHOLDER_MARKS: [&str; 5] = [
    "replace-with",
    "replace_with",
    "changeme",
    "change-me",
    "placeholder",
];

/// Fewer different characters than this is a pattern (`aaaa...`, `abab...`), not randomness: 32
/// random bytes in hex or base64 hold well over this many.
const MIN_DISTINCT: usize = 8;

/// The shortest Redis password taken: the shipped instructions make 64 hex digits.
const MIN_REDIS_PASSWORD: usize = 16;

fn placeholder(value: &str) -> bool {
    let lower = value.to_ascii_lowercase();
    PLACEHOLDER_MARKS.iter().any(|mark| lower.contains(mark))
}

fn distinct(value: &str) -> usize {
    let mut seen: Vec<char> = value.chars().collect();
    seen.sort_unstable();
    seen.dedup();
    seen.len()
}

/// `SCW_SECRET_KEY`: Scaleway's keys are random UUIDs; the nil one is the shipped placeholder,
/// and one written with a digit or two (`1111...`, `1212...`) is no key either.
pub(super) fn secret_key(key: &Uuid) -> Result<(), String> {
    if key.is_nil() || distinct(&key.simple().to_string()) < 3 {
        return Err(
            "a placeholder, not a Scaleway secret key: set the key of an API key of the \
             organization"
                .to_owned(),
        );
    }
    Ok(())
}

/// `GATEWAY_JWT_HS256_SECRET`: whoever knows it mints any token.
pub(super) fn hs256_secret(secret: &str) -> Result<(), String> {
    if placeholder(secret) {
        return Err(
            "the shipped placeholder: anyone with the repository could mint tokens; set at least \
             32 random bytes (openssl rand -hex 32)"
                .to_owned(),
        );
    }
    if distinct(secret) < MIN_DISTINCT {
        return Err(format!(
            "too plain to be random (fewer than {MIN_DISTINCT} different characters); set at \
             least 32 random bytes (openssl rand -hex 32)"
        ));
    }
    Ok(())
}

/// The password of `GATEWAY_REDIS_URL`, when it has one.
pub(super) fn redis_password(url: &url::Url) -> Result<(), String> {
    let Some(password) = url.password() else {
        return Ok(());
    };
    if placeholder(password) {
        return Err(
            "its password is the shipped placeholder; set a random one (openssl rand -hex 32) \
             in the URL and in Redis's ACL"
                .to_owned(),
        );
    }
    if password.len() < MIN_REDIS_PASSWORD || distinct(password) < MIN_DISTINCT {
        return Err(format!(
            "its password is too weak (at least {MIN_REDIS_PASSWORD} random characters: \
             openssl rand -hex 32)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_placeholders_and_plain_values_are_refused() {
        assert!(secret_key(&Uuid::nil()).is_err());
        assert!(
            secret_key(
                &"11111111-1111-1111-1111-111111111111"
                    .parse()
                    .expect("uuid")
            )
            .is_err()
        );
        assert!(
            secret_key(
                &"5ec7e7ca-fe00-4bad-9000-00000000beef"
                    .parse()
                    .expect("uuid")
            )
            .is_ok()
        );
        assert!(hs256_secret("replace-with-at-least-32-random-bytes-of-secret").is_err());
        assert!(hs256_secret(&"a".repeat(40)).is_err());
        assert!(hs256_secret(&"ab".repeat(20)).is_err());
        assert!(
            hs256_secret("9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08")
                .is_ok()
        );
        let url = |u: &str| url::Url::parse(u).expect("url");
        for weak in [
            "redis://billing-gateway:replace-with-a-long-random-password@redis:6379",
            "redis://:hunter2@redis:6379",
            "redis://:aaaaaaaaaaaaaaaaaaaaaaaa@redis:6379",
        ] {
            let refused = redis_password(&url(weak)).expect_err(weak);
            assert!(
                !refused.contains("hunter2") && !refused.contains("aaaa"),
                "{refused}"
            );
        }
        assert!(redis_password(&url("redis://redis:6379")).is_ok());
        assert!(redis_password(&url("redis://:3f2a9c0d81b7e6455d0c@redis:6379")).is_ok());
    }
}
