//! Scaleway's `Money` (`currency_code`, integer `units`, integer `nanos`) and exact sums of it:
//! amounts are added as whole nanos in an `i128`, never as floating point, and written back
//! normalised (`nanos` has the sign of `units`, |`nanos`| < 10⁹).

use serde::{Deserialize, Serialize};

/// Nanos in one currency unit.
pub const NANOS: i128 = 1_000_000_000;

/// A Scaleway `Money` value as it travels in JSON. Zero fields may be omitted (proto3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Money {
    /// ISO 4217 code, e.g. `EUR`.
    #[serde(default)]
    pub currency_code: String,
    /// Whole units.
    #[serde(default)]
    pub units: i64,
    /// Billionths of a unit, with the sign of `units`.
    #[serde(default)]
    pub nanos: i32,
}

impl Money {
    /// The amount in whole nanos: exact, whatever the signs of `units` and `nanos`.
    pub fn total_nanos(&self) -> i128 {
        i128::from(self.units) * NANOS + i128::from(self.nanos)
    }

    /// `nanos` of `currency` as a normalised `Money`; `None` past what `units` (an `i64`) holds.
    ///
    /// ```
    /// use billing_gateway::costs::Money;
    /// let m = Money::from_nanos("EUR", -1_750_000_000).expect("fits");
    /// assert_eq!((m.units, m.nanos), (-1, -750_000_000));
    /// ```
    pub fn from_nanos(currency: &str, nanos: i128) -> Option<Money> {
        // `/` and `%` truncate toward zero, so both parts carry the sign of the whole.
        Some(Money {
            currency_code: currency.to_owned(),
            units: i64::try_from(nanos / NANOS).ok()?,
            nanos: i32::try_from(nanos % NANOS).ok()?,
        })
    }

    /// A budget amount as a policy writes it: `"500.00 EUR"` (a positive decimal with at most
    /// nine decimals, a space, three capital letters); the error says what is wrong.
    ///
    /// ```
    /// use billing_gateway::costs::Money;
    /// let m = Money::parse_amount("500.5 EUR").expect("valid");
    /// assert_eq!((m.currency_code.as_str(), m.units, m.nanos), ("EUR", 500, 500_000_000));
    /// assert!(Money::parse_amount("500,00 EUR").is_err());
    /// assert!(Money::parse_amount("500 EURO").is_err());
    /// ```
    pub fn parse_amount(text: &str) -> Result<Money, String> {
        let Some((amount, currency)) = text.trim().split_once(' ') else {
            return Err(format!(
                "`{text}` is not an amount: write it as \"500.00 EUR\""
            ));
        };
        let currency = currency.trim();
        if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(format!(
                "`{currency}` is not a currency: use three capital letters (ISO 4217), such as EUR"
            ));
        }
        let malformed = || {
            format!(
                "`{amount}` is not an amount: use digits with at most nine decimals, such as 500.00"
            )
        };
        let (whole, fraction) = amount.split_once('.').unwrap_or((amount, ""));
        let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if whole.is_empty() || !digits(whole) || !digits(fraction) || fraction.len() > 9 {
            return Err(malformed());
        }
        if amount.ends_with('.') {
            return Err(malformed());
        }
        let units: i64 = whole.parse().map_err(|_| malformed())?;
        let nanos: i32 = format!("{fraction:0<9}").parse().map_err(|_| malformed())?;
        if units == 0 && nanos == 0 {
            return Err("a monthly budget must be more than zero".into());
        }
        Ok(Money {
            currency_code: currency.to_owned(),
            units,
            nanos,
        })
    }

    /// The amount as a decimal number of units, exact (`-1.75`, `1234.56`, `0`): what the
    /// Prometheus series carry.
    pub fn decimal(&self) -> String {
        decimal(self.total_nanos())
    }
}

/// `nanos` as an exact decimal number of units, without trailing zeros.
pub fn decimal(nanos: i128) -> String {
    let sign = if nanos < 0 { "-" } else { "" };
    let (units, fraction) = (nanos.abs() / NANOS, nanos.abs() % NANOS);
    if fraction == 0 {
        return format!("{sign}{units}");
    }
    let fraction = format!("{fraction:09}");
    format!("{sign}{units}.{}", fraction.trim_end_matches('0'))
}

/// `numerator / denominator` rounded half away from zero (`denominator` > 0).
pub(super) fn div_round(numerator: i128, denominator: i128) -> i128 {
    let (q, r) = (numerator / denominator, numerator % denominator);
    if 2 * r.abs() >= denominator {
        q + numerator.signum()
    } else {
        q
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_normalise_with_one_sign() {
        for (nanos, units, rest) in [
            (1_999_999_999_i128, 1, 999_999_999),
            (-1_000_000_001, -1, -1),
            (-999_999_999, 0, -999_999_999),
            (0, 0, 0),
        ] {
            let m = Money::from_nanos("EUR", nanos).expect("fits");
            assert_eq!((m.units, m.nanos), (units, rest), "{nanos}");
            assert_eq!(m.total_nanos(), nanos);
        }
        // A line written with mixed signs still adds exactly.
        let odd = Money {
            currency_code: "EUR".into(),
            units: 2,
            nanos: -500_000_000,
        };
        assert_eq!(odd.total_nanos(), 1_500_000_000);
        assert!(Money::from_nanos("EUR", i128::from(i64::MAX) * NANOS * 2).is_none());
    }

    #[test]
    fn decimals_are_exact() {
        assert_eq!(decimal(1_234_560_000_000), "1234.56");
        assert_eq!(decimal(-1_750_000_000), "-1.75");
        assert_eq!(decimal(1), "0.000000001");
        assert_eq!(decimal(-5), "-0.000000005");
        assert_eq!(decimal(7 * NANOS), "7");
    }

    #[test]
    fn budget_amounts_are_checked() {
        let m = Money::parse_amount("500.00 EUR").expect("valid");
        assert_eq!((m.units, m.nanos), (500, 0));
        for (bad, says) in [
            ("500.00", "not an amount"),
            ("500.00 eur", "three capital letters"),
            ("500.00 EU", "three capital letters"),
            ("5,00 EUR", "digits"),
            ("-5 EUR", "digits"),
            ("5. EUR", "digits"),
            (".5 EUR", "digits"),
            ("1.0000000001 EUR", "digits"),
            ("0.00 EUR", "more than zero"),
        ] {
            let e = Money::parse_amount(bad).expect_err(bad);
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn rounding_is_half_away_from_zero() {
        assert_eq!(div_round(5, 2), 3);
        assert_eq!(div_round(-5, 2), -3);
        assert_eq!(div_round(4, 3), 1);
        assert_eq!(div_round(-4, 3), -1);
    }
}
