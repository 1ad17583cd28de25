//! How long an answer stays fresh: closed billing periods change rarely, the current one often,
//! and last month counts as current until its invoice is out (seen up to the 7th).

use std::time::Duration;

use time::OffsetDateTime;

use super::Cache;
use crate::billing::Call;

impl Cache {
    /// Freshness: closed billing periods change rarely; the current one (or none named) often.
    /// Last month counts as current until its invoice is issued (seen up to the 7th). The period
    /// is read from the operation's [`period`](crate::billing::Operation::period) parameter.
    pub fn ttl_for(&self, call: &Call, now: OffsetDateTime) -> Duration {
        // Last month stays open until the 7th; a validated period is `YYYY-MM`, compared as
        // numbers with no string built.
        let (mut year, mut month) = (now.year(), u8::from(now.month()));
        if now.day() <= 7 {
            (year, month) = if month == 1 {
                (year - 1, 12)
            } else {
                (year, month - 1)
            };
        }
        let closed = call
            .op
            .period
            .and_then(|param| call.get(param))
            .and_then(|period| {
                let (year, month) = period.split_once('-')?;
                Some((year.parse::<i32>().ok()?, month.parse::<u8>().ok()?))
            })
            .is_some_and(|period| period < (year, month));
        if closed { self.closed_ttl } else { self.ttl }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::billing;
    use crate::config::CacheConfig;
    use crate::config::Config;
    use secrecy::SecretString;
    use std::sync::Arc;
    use time::macros::datetime;

    #[test]
    fn closed_periods_are_those_whose_invoice_is_out() {
        let cache = Cache::new(
            &Config::new("http://x", uuid::Uuid::nil(), SecretString::from("")).cache,
            Arc::default(),
        );
        let ttl_at = |period: &str, now| {
            let call = billing::parse(
                "GET",
                "/billing/v2beta1/consumptions",
                Some(&format!("billing_period={period}")),
            )
            .expect("valid");
            cache.ttl_for(&call, now)
        };
        let (open, closed) = (cache.ttl, cache.closed_ttl);
        assert_eq!(ttl_at("2026-07", datetime!(2026-07-20 12:00 UTC)), open);
        assert_eq!(ttl_at("2026-06", datetime!(2026-07-20 12:00 UTC)), closed);
        assert_eq!(
            ttl_at("2026-06", datetime!(2026-07-03 12:00 UTC)),
            open,
            "invoice not out yet"
        );
        assert_eq!(
            ttl_at("2025-12", datetime!(2026-01-05 12:00 UTC)),
            open,
            "across a year"
        );
        assert_eq!(ttl_at("2025-11", datetime!(2026-01-05 12:00 UTC)), closed);
    }

    fn five_minutes_open_a_day_closed() -> Cache {
        Cache::new(
            &CacheConfig {
                ttl: Duration::from_secs(300),
                closed_ttl: Duration::from_secs(86_400),
                stale_if_error: Duration::from_secs(3600),
                max_bytes: 1 << 20,
                background_refresh: true,
            },
            Arc::default(),
        )
    }

    #[test]
    fn closed_billing_periods_get_the_closed_ttl() {
        let cache = five_minutes_open_a_day_closed();
        let now = datetime!(2026-03-15 12:00 UTC);
        let ttl = |query: &str| {
            let call =
                billing::parse("GET", "/billing/v2beta1/consumptions", Some(query)).expect("valid");
            cache.ttl_for(&call, now).as_secs()
        };
        assert_eq!(ttl("billing_period=2026-02"), 86_400);
        assert_eq!(ttl("billing_period=2025-12"), 86_400);
        assert_eq!(ttl("billing_period=2026-03"), 300, "the current period");
        assert_eq!(ttl("billing_period=2026-04"), 300, "a future period");
        assert_eq!(ttl("page=1"), 300, "no period: the current one");
    }

    /// The cache reads the period parameter from the table: an operation without one is
    /// always about the current period, and naming another parameter moves freshness with it.
    #[test]
    fn the_period_parameter_comes_from_the_table() {
        let cache = five_minutes_open_a_day_closed();
        let now = datetime!(2026-03-15 12:00 UTC);
        let consumptions = billing::by_name("consumptions").expect("consumptions");
        let ttl = |period: Option<&'static str>| {
            let op: &'static billing::Operation = Box::leak(Box::new(billing::Operation {
                period,
                ..consumptions.clone()
            }));
            let call = billing::Call {
                op,
                id: None,
                query: vec![
                    ("billing_period", "2026-01".to_owned()),
                    ("category_name", "2026-02".to_owned()),
                ],
            };
            cache.ttl_for(&call, now).as_secs()
        };
        assert_eq!(ttl(consumptions.period), 86_400);
        assert_eq!(ttl(None), 300, "no period parameter: the current period");
        assert_eq!(ttl(Some("category_name")), 86_400);
        assert_eq!(ttl(Some("order_by")), 300, "not given: the current period");
        for op in billing::OPERATIONS.iter().filter(|op| op.cacheable) {
            assert_eq!(op.period, Some("billing_period"), "{}", op.name);
        }
    }
}
