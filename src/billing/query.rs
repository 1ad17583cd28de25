//! The query half of a [`Call`](super::Call): every parameter of a request's query string
//! checked against the operation's [`Param`](super::Param) list and normalised to the one form
//! sent upstream (snake_case names, RFC 3339 UTC timestamps, canonical UUIDs), with every
//! problem reported at once. Kept apart from routing: what a value may be is decided by its
//! [`Kind`] here, whichever path asked for it.

use std::borrow::Cow;
use std::num::IntErrorKind;

use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};
use uuid::Uuid;

use super::operations::{Kind, Operation};
use crate::error::{ArgError, Error};

/// Only the canonical hyphenated form: `Uuid::parse_str` also takes braces and `urn:uuid:`.
pub(super) fn parse_uuid(s: &str) -> Option<Uuid> {
    (s.len() == 36).then(|| Uuid::parse_str(s).ok()).flatten()
}

pub(super) fn validate_query(
    op: &Operation,
    raw: &str,
) -> Result<Vec<(&'static str, String)>, Error> {
    let mut query: Vec<(&'static str, String)> = Vec::new();
    let mut errors = Vec::new();
    for (name, value) in form_urlencoded::parse(raw.as_bytes()) {
        let snake = to_snake_case(&name);
        let Some(param) = op.params.iter().find(|p| p.name == snake) else {
            errors.push(ArgError::new(
                name,
                "unknown",
                format!("{} takes no such parameter", op.name),
            ));
            continue;
        };
        // The Go SDK sends unset strings as `name=`: that means "not given".
        if value.is_empty() {
            continue;
        }
        // `form_urlencoded` decodes bytes that are not UTF-8 as U+FFFD rather than failing: such
        // a value is refused, never forwarded altered. (A U+FFFD sent on purpose is refused too:
        // no Billing value holds one.)
        if value.contains(char::REPLACEMENT_CHARACTER) {
            errors.push(ArgError::new(
                param.name,
                "format",
                "value must be UTF-8 text once percent-decoded",
            ));
            continue;
        }
        if !param.list && query.iter().any(|(n, _)| *n == param.name) {
            errors.push(ArgError::new(
                param.name,
                "constraint",
                "may be given only once",
            ));
            continue;
        }
        match normalise(param.kind, &value) {
            Ok(v) => query.push((param.name, v)),
            Err(help) => errors.push(ArgError::new(param.name, "format", help)),
        }
    }
    for param in op.params.iter().filter(|p| p.required) {
        if !query.iter().any(|(n, _)| *n == param.name) {
            errors.push(ArgError::new(
                param.name,
                "required",
                "this parameter is required",
            ));
        }
    }
    if !errors.is_empty() {
        return Err(Error::InvalidArguments(errors));
    }
    query.sort_by_key(|(n, _)| *n);
    Ok(query)
}

/// Borrowed when there is nothing to change: the SDKs mostly send snake_case already.
fn to_snake_case(name: &str) -> Cow<'_, str> {
    if !name.bytes().any(|b| b.is_ascii_uppercase()) {
        return Cow::Borrowed(name);
    }
    let mut out = String::with_capacity(name.len() + 4);
    for c in name.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Checks one value and returns the form sent upstream, or a help message.
fn normalise(kind: Kind, value: &str) -> Result<String, String> {
    match kind {
        Kind::Uuid => parse_uuid(value)
            .map(|u| u.to_string())
            .ok_or_else(|| "value must be a valid UUID".into()),
        Kind::Enum(allowed) => allowed
            .iter()
            .find(|a| **a == value)
            .map(|a| (*a).to_owned())
            .ok_or_else(|| format!("value must be one of: {}", allowed.join(", "))),
        // Scaleway's pages are int32: past its largest, say so rather than "at least 1".
        Kind::Page => match value.parse::<i32>() {
            Ok(n) if n >= 1 => Ok(n.to_string()),
            Err(e) if *e.kind() == IntErrorKind::PosOverflow => Err(format!(
                "value is too large: a page number is at most {}",
                i32::MAX
            )),
            _ => Err(format!("value must be an integer from 1 to {}", i32::MAX)),
        },
        Kind::PageSize(max) => match value.parse::<u32>() {
            Ok(n) if (1..=max).contains(&n) => Ok(n.to_string()),
            _ => Err(format!("value must be an integer from 1 to {max}")),
        },
        Kind::Timestamp => parse_timestamp(value)
            .ok_or_else(|| "value must be a date-time such as 2024-01-01T00:00:00Z".into()),
        Kind::Period => parse_period(value)
            .then(|| value.to_owned())
            .ok_or_else(|| "value must be a billing period such as 2024-01".into()),
        Kind::Bool => match value {
            "true" | "True" | "TRUE" => Ok("true".into()),
            "false" | "False" | "FALSE" => Ok("false".into()),
            _ => Err("value must be true or false".into()),
        },
        Kind::Flag => match value {
            "1" | "true" | "True" => Ok("1".into()),
            _ => Err("value must be 1".into()),
        },
        Kind::Text => {
            let ok =
                value.chars().count() <= 256 && value.chars().all(|c| !c.is_control() && c != ';');
            ok.then(|| value.to_owned()).ok_or_else(|| {
                "value must be printable text of at most 256 characters, without ';'".into()
            })
        }
    }
}

/// Accepts RFC 3339 (Go, JS: `2024-01-01T00:00:00.000Z`), Python's `str(datetime)`
/// (`2024-01-01 00:00:00+00:00`) and a naive Python datetime (read as UTC).
pub fn parse_timestamp(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    if bytes.len() < 19 || !matches!(bytes[10], b'T' | b't' | b' ') {
        return None;
    }
    let mut s = String::with_capacity(value.len() + 1);
    s.push_str(&value[..10]);
    s.push('T');
    s.push_str(&value[11..]);
    let time_part = &s[11..];
    if !time_part.ends_with(['Z', 'z']) && !time_part.contains(['+', '-']) {
        s.push('Z');
    }
    let at = OffsetDateTime::parse(&s, &Rfc3339).ok()?;
    at.to_offset(UtcOffset::UTC).format(&Rfc3339).ok()
}

fn parse_period(value: &str) -> bool {
    let b = value.as_bytes();
    b.len() == 7
        && b[4] == b'-'
        && b[..4].iter().chain(&b[5..]).all(u8::is_ascii_digit)
        && matches!(value[5..].parse::<u8>(), Ok(1..=12))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::billing::{Call, parse};

    fn call(method: &str, path: &str, query: &str) -> Result<Call, Error> {
        parse(method, path, Some(query))
    }

    fn details(result: Result<Call, Error>) -> Vec<(String, &'static str)> {
        match result {
            Err(Error::InvalidArguments(d)) => {
                d.into_iter().map(|a| (a.argument_name, a.reason)).collect()
            }
            other => panic!("expected invalid_arguments, got {other:?}"),
        }
    }

    #[test]
    fn timestamps_in_every_sdk_form_normalise_to_rfc3339_utc() {
        for (input, want) in [
            ("2024-01-01T00:00:00Z", "2024-01-01T00:00:00Z"),
            ("2024-01-01T00:00:00.000Z", "2024-01-01T00:00:00Z"),
            ("2024-01-01 00:00:00+00:00", "2024-01-01T00:00:00Z"),
            ("2024-01-01 02:00:00+02:00", "2024-01-01T00:00:00Z"),
            ("2024-01-01 00:00:00", "2024-01-01T00:00:00Z"),
            ("2024-01-01T00:00:00.5Z", "2024-01-01T00:00:00.5Z"),
        ] {
            assert_eq!(parse_timestamp(input).as_deref(), Some(want), "{input}");
        }
        for bad in [
            "2024-01-01",
            "yesterday",
            "2024-13-01T00:00:00Z",
            "2024-01-01X00:00:00Z",
        ] {
            assert_eq!(parse_timestamp(bad), None, "{bad}");
        }
    }

    #[test]
    fn python_query_forms_are_accepted_and_normalised() {
        let c = call(
            "GET",
            "/billing/v2beta1/charges",
            "start_date_after=2024-01-01+00%3A00%3A00%2B00%3A00&clamp_to_time_range=True&skus=b&skus=a",
        )
        .expect("valid");
        assert_eq!(
            c.query_string(),
            "clamp_to_time_range=true&skus=b&skus=a&start_date_after=2024-01-01T00%3A00%3A00Z"
        );
    }

    #[test]
    fn the_query_string_is_exactly_what_form_urlencoded_writes() {
        let c = call(
            "GET",
            "/billing/v2beta1/charges",
            "skus=a+b%26c%3Dd&skus=%C3%A9t%C3%A9%2F%2A-._~&resource_names=%25%2B!",
        )
        .expect("valid");
        let mut expected = form_urlencoded::Serializer::new(String::new());
        for (name, value) in &c.query {
            expected.append_pair(name, value);
        }
        assert_eq!(c.query_string(), expected.finish());
        assert_eq!(
            c.query_string(),
            "resource_names=%25%2B%21&skus=a+b%26c%3Dd&skus=%C3%A9t%C3%A9%2F*-._%7E"
        );
    }

    #[test]
    fn camel_case_names_and_empty_go_values_are_understood() {
        let c = call(
            "GET",
            "/billing/v2beta1/taxes",
            "organization_id=&billingPeriod=2024-02",
        )
        .expect("valid");
        assert_eq!(c.query, vec![("billing_period", "2024-02".to_owned())]);
    }

    #[test]
    fn invalid_values_are_all_reported_with_their_reason() {
        let d = details(call(
            "GET",
            "/billing/v2beta1/consumptions",
            "page=0&page_size=101&project_id=nope&billing_period=2024-13&order_by=x&evil=1",
        ));
        assert_eq!(
            d,
            vec![
                ("page".into(), "format"),
                ("page_size".into(), "format"),
                ("project_id".into(), "format"),
                ("billing_period".into(), "format"),
                ("order_by".into(), "format"),
                ("evil".into(), "unknown"),
            ]
        );
    }

    #[test]
    fn a_value_that_is_not_utf8_is_refused_naming_its_parameter() {
        let refused = call(
            "GET",
            "/billing/v2beta1/consumptions",
            "category_name=%FF%FE%C0%AF&page=1",
        );
        let Err(Error::InvalidArguments(d)) = refused else {
            panic!("expected invalid_arguments, got {refused:?}");
        };
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(
            (d[0].argument_name.as_str(), d[0].reason),
            ("category_name", "format")
        );
        assert!(d[0].help_message.contains("UTF-8"), "{d:?}");
        // Valid UTF-8, percent-encoded, still passes.
        assert!(
            call(
                "GET",
                "/billing/v2beta1/consumptions",
                "category_name=%C3%A9"
            )
            .is_ok()
        );
    }

    #[test]
    fn a_page_past_int32_says_it_is_too_large_and_names_the_bound() {
        let help = |query: &str| match call("GET", "/billing/v2beta1/invoices", query) {
            Err(Error::InvalidArguments(d)) => d[0].help_message.clone(),
            other => panic!("expected invalid_arguments, got {other:?}"),
        };
        assert_eq!(
            help("page=2147483648"),
            "value is too large: a page number is at most 2147483647"
        );
        assert_eq!(
            help("page=0"),
            "value must be an integer from 1 to 2147483647"
        );
        assert!(call("GET", "/billing/v2beta1/invoices", "page=2147483647").is_ok());
    }

    #[test]
    fn charges_page_size_goes_to_a_thousand() {
        assert!(call("GET", "/billing/v2beta1/charges", "page_size=1000").is_ok());
        assert!(call("GET", "/billing/v2beta1/charges", "page_size=1001").is_err());
        assert!(call("GET", "/billing/v2beta1/invoices", "page_size=1000").is_err());
    }

    #[test]
    fn repeated_scalars_semicolons_and_missing_required_are_refused() {
        assert_eq!(
            details(call("GET", "/billing/v2beta1/taxes", "page=1&page=2")),
            vec![("page".into(), "constraint")]
        );
        assert_eq!(
            details(call(
                "GET",
                "/billing/v2beta1/taxes",
                "page=1;organization_id=x"
            )),
            vec![("page".into(), "format")]
        );
        assert_eq!(
            details(call("POST", "/billing/v2beta1/redeem-coupon", "")),
            vec![("code".into(), "required")]
        );
    }
}
