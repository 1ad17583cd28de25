//! Each principal's own rate held across replicas (contract §11): one GCRA per principal and
//! rate in Redis, checked on every request, cache hits included. A refusal is remembered here
//! until it ends, so a throttled caller costs no Redis call (Envoy ratelimit's local cache of
//! over-limit keys).

use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use base64::Engine;
use redis::Script;
use sha2::{Digest, Sha256};

use super::{Cluster, Op, Unavailable};
use crate::config::Rate;

static GCRA: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/principal_gcra.lua")));

/// Principals whose refusal is remembered at once; past it the least used are forgotten (and
/// cost a Redis call again, which refuses them again).
const REMEMBERED: u64 = 10_000;

/// Principals' rates kept in Redis for every replica.
pub struct SharedRates {
    cluster: Arc<Cluster>,
    /// Key → when its refusal ends.
    refused: moka::sync::Cache<String, Instant>,
}

impl SharedRates {
    /// Rates kept through `cluster`.
    pub fn new(cluster: Arc<Cluster>) -> SharedRates {
        SharedRates {
            cluster,
            refused: moka::sync::Cache::builder()
                .max_capacity(REMEMBERED)
                // Longer than any refusal of a sane rate; an entry past its end is ignored.
                .time_to_live(Duration::from_secs(3600))
                .build(),
        }
    }

    /// Counts one request of `subject` at `rate` (burst: twice its count, as the local limits):
    /// `Ok(Ok(()))` allowed, `Ok(Err(wait))` refused for `wait`, or [`Unavailable`] when Redis
    /// cannot be asked (the caller limits alone).
    pub async fn check(
        &self,
        subject: &str,
        rate: Rate,
    ) -> Result<Result<(), Duration>, Unavailable> {
        let key = key(subject, rate);
        let now = Instant::now();
        if let Some(wait) = self
            .refused
            .get(&key)
            .and_then(|until| until.checked_duration_since(now))
        {
            return Ok(Err(wait));
        }
        let mut gcra = GCRA.prepare_invoke();
        gcra.key(self.cluster.key(&key))
            .arg(u64::try_from(rate.pace().as_micros()).unwrap_or(u64::MAX))
            .arg(rate.count.saturating_mul(2).max(1));
        match self
            .cluster
            .invoke::<(i64, i64)>(Op::Principal, &gcra)
            .await?
        {
            (0, _) => Ok(Ok(())),
            (_, wait) => {
                let wait = Duration::from_micros(u64::try_from(wait).unwrap_or(0));
                self.refused.insert(key, now + wait);
                Ok(Err(wait))
            }
        }
    }
}

/// `p:{count}/{per ms}:{subject hashed}`: one key per principal and rate (policy rates apart
/// from the default), with no user's name in Redis.
fn key(subject: &str, rate: Rate) -> String {
    let hash = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(subject));
    format!("p:{}/{}:{}", rate.count, rate.per.as_millis(), &hash[..22])
}
