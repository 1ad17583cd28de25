//! `token`: HS256 tokens for development and tests.

use super::env;
use anyhow::{Context, anyhow};
use billing_gateway::auth::mint_hs256;
use billing_gateway::config::{AuthConfig, Config, Needs, parse_duration};
use secrecy::SecretString;
use serde_json::{Map, Value, json};

/// `token`: mints a token the configured gateway accepts.
pub(super) fn run(roles: &[String], sub: &str, claims: &[String], ttl: &str) -> anyhow::Result<()> {
    let config = Config::load(None, &env, Needs::Tools)?;
    // Tokens the configured gateway accepts: with an issuer or audience pinned, carry them.
    let mut extra = pinned_claims(&config.auth);
    let secret = config
        .auth
        .hs256_secret
        .ok_or_else(|| anyhow!("GATEWAY_JWT_HS256_SECRET (or _FILE) is needed to sign tokens"))?;
    let ttl = parse_duration(ttl).map_err(|e| anyhow!("--ttl: {e}"))?;
    for claim in claims {
        let (k, v) = claim
            .split_once('=')
            .with_context(|| format!("--claim `{claim}` is not key=value"))?;
        let value = if v.starts_with(['[', '{']) {
            serde_json::from_str(v).with_context(|| format!("--claim {k}: bad JSON"))?
        } else {
            Value::String(v.to_owned())
        };
        extra.insert(k.to_owned(), value);
    }
    println!("{}", token(&secret, sub, roles, extra, ttl.as_secs())?);
    Ok(())
}

/// What a token needs to be accepted besides its signature: the `iss` and `aud` the
/// configuration pins, when it pins them.
pub(super) fn pinned_claims(auth: &AuthConfig) -> Map<String, Value> {
    let mut claims = Map::new();
    if let Some(iss) = &auth.issuer {
        claims.insert("iss".into(), json!(iss));
    }
    if let Some(aud) = &auth.audience {
        claims.insert("aud".into(), json!(aud));
    }
    claims
}

/// An HS256 token for `sub` with `roles`, valid `ttl` seconds.
pub(super) fn token(
    secret: &SecretString,
    sub: &str,
    roles: &[String],
    extra: Map<String, Value>,
    ttl: u64,
) -> anyhow::Result<String> {
    let now = jsonwebtoken::get_current_timestamp();
    let mut claims = extra;
    claims.insert("sub".into(), json!(sub));
    claims.insert("roles".into(), json!(roles));
    claims.insert("iat".into(), json!(now));
    claims.insert("exp".into(), json!(now + ttl));
    Ok(mint_hs256(secret, &claims)?)
}
