//! The value types settings are written in: durations, sizes, rates and http(s) URLs.
//!
//! Each has exactly one parser, used for the environment, the configuration file and the policy
//! files alike, so a value accepted in one place is accepted everywhere. Parsers are pure
//! functions returning an operator-worded message (the caller prefixes where the value came
//! from). The grammars are the contract's (§3: `500ms`, `64MiB`, `20/s`) and deliberately
//! narrow: a general-purpose parser such as humantime also takes `1h 30m` or `2 months`, which
//! no document promises and no test pins.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use url::{Host, Url};

/// Parses a duration: a whole number and one of `ms`, `s`, `m`, `h`, `d`, with nothing between.
///
/// ```
/// use billing_gateway::config::parse_duration;
/// use std::time::Duration;
///
/// assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
/// assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
/// assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86_400)));
/// assert!(parse_duration("5 minutes").is_err());
/// assert!(parse_duration("30").is_err()); // a unit is required: 30 what?
/// ```
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("`{s}` is not a duration such as 500ms, 30s, 5m or 1h");
    let (n, unit) = number_and_unit(s).ok_or_else(bad)?;
    let ms = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(bad()),
    };
    Ok(Duration::from_millis(n.saturating_mul(ms)))
}

/// Parses a size in bytes: a whole number, optionally followed by `B`, `KiB`, `MiB` or `GiB`.
///
/// Binary units only: `MB` is refused rather than guessed, since it means 10^6 to some readers
/// and 2^20 to others.
///
/// ```
/// use billing_gateway::config::parse_size;
///
/// assert_eq!(parse_size("64MiB"), Ok(64 << 20));
/// assert_eq!(parse_size("512KiB"), Ok(512 << 10));
/// assert_eq!(parse_size("1000"), Ok(1000));
/// assert!(parse_size("64MB").is_err());
/// ```
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bad = || format!("`{s}` is not a size such as 64MiB");
    let (n, unit) = number_and_unit(s).ok_or_else(bad)?;
    let multiplier: u64 = match unit {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => return Err(bad()),
    };
    Ok(n.saturating_mul(multiplier))
}

/// Splits `64MiB` into `(64, "MiB")`; `None` when it does not start with a number.
fn number_and_unit(s: &str) -> Option<(u64, &str)> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    Some((n.parse().ok()?, unit))
}

/// A rate such as `20/s`: how many events per window, for the upstream budget and the
/// per-principal limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rate {
    /// How many.
    pub count: u32,
    /// Per how long.
    pub per: Duration,
}

impl Rate {
    /// One cell every `per / count`, never a zero period.
    ///
    /// ```
    /// use billing_gateway::config::Rate;
    /// use std::time::Duration;
    ///
    /// let rate = |count, secs| Rate { count, per: Duration::from_secs(secs) };
    /// assert_eq!(rate(20, 1).pace(), Duration::from_millis(50));
    /// assert_eq!(rate(100, 60).pace(), Duration::from_millis(600));
    /// assert_eq!(rate(0, 1).pace(), Duration::from_secs(1)); // never a division by zero
    /// ```
    pub fn pace(self) -> Duration {
        (self.per / self.count.max(1)).max(Duration::from_nanos(1))
    }
}

/// Parses a rate: `N/s` or `N/m`, N at least 1 (a zero rate would refuse everything, which is
/// never what a typo meant).
///
/// ```
/// use billing_gateway::config::{Rate, parse_rate};
/// use std::time::Duration;
///
/// assert_eq!(parse_rate("20/s"), Ok(Rate { count: 20, per: Duration::from_secs(1) }));
/// assert_eq!("100/m".parse::<Rate>().map(|r| r.per), Ok(Duration::from_secs(60)));
/// assert!(parse_rate("0/s").is_err());
/// assert!(parse_rate("20/h").is_err());
/// ```
pub fn parse_rate(s: &str) -> Result<Rate, String> {
    let bad = || format!("`{s}` is not a rate such as 20/s or 100/m");
    let (n, per) = s.split_once('/').ok_or_else(bad)?;
    let count: u32 = n.parse().ok().filter(|n| *n > 0).ok_or_else(bad)?;
    let per = match per {
        "s" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        _ => return Err(bad()),
    };
    Ok(Rate { count, per })
}

impl FromStr for Rate {
    type Err = String;
    fn from_str(s: &str) -> Result<Rate, String> {
        parse_rate(s)
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.per.as_millis() {
            1000 => write!(f, "{}/s", self.count),
            60_000 => write!(f, "{}/m", self.count),
            _ => write!(f, "{} per {:?}", self.count, self.per),
        }
    }
}

/// Read from a TOML or JSON string such as `"20/s"`, with [`parse_rate`]'s message on error.
impl<'de> serde::Deserialize<'de> for Rate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Rate, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        parse_rate(&s).map_err(serde::de::Error::custom)
    }
}

/// An absolute `http://` or `https://` URL naming a server the gateway talks to or trusts: the
/// Billing API, a JWKS, an OIDC issuer, a browser origin. The one URL parser of the crate.
///
/// Parsed by `url` (WHATWG), and refused where that parser would silently repair what an
/// operator surely mistyped: whitespace or control characters (it drops tabs and newlines),
/// `https:///x` (it reads the host as `x`), backslashes. Also refused: credentials (they would
/// be sent along to every request), a fragment (meaningless to a server), and a host that is
/// not a plain DNS name or IP address (`*.example.com` is no host; `_` is allowed, as Docker
/// Compose service names have it).
///
/// ```
/// use billing_gateway::config::HttpUrl;
///
/// assert!("https://idp.example.com/realms/acme".parse::<HttpUrl>().is_ok());
/// assert!("https:///keys".parse::<HttpUrl>().is_err());
/// assert!("https://user:pw@idp.example.com".parse::<HttpUrl>().is_err());
/// assert!("ftp://idp.example.com".parse::<HttpUrl>().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl(Url);

impl FromStr for HttpUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<HttpUrl, String> {
        let rest = s
            .strip_prefix("https://")
            .or_else(|| s.strip_prefix("http://"))
            .ok_or_else(|| format!("`{s}` must start with https:// or http://"))?;
        if rest.is_empty() || rest.starts_with(['/', '?', '#']) {
            return Err(format!("`{s}` names no host"));
        }
        if s.contains('\\') || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!(
                "`{}` holds a space, backslash or control character",
                s.escape_debug()
            ));
        }
        let url = Url::parse(s).map_err(|e| format!("`{s}` is not a URL: {e}"))?;
        if !url.username().is_empty() || url.password().is_some() {
            // Not echoed: the password may be real.
            return Err("a URL must not carry credentials (they would be sent along)".into());
        }
        if url.fragment().is_some() {
            return Err(format!("`{s}` has a #fragment, which no server sees"));
        }
        match url.host() {
            Some(Host::Domain(d))
                if d.split('.').all(|label| {
                    !label.is_empty()
                        && label
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                }) => {}
            Some(Host::Ipv4(_) | Host::Ipv6(_)) => {}
            _ => {
                return Err(format!(
                    "`{s}` does not name a host such as api.example.com"
                ));
            }
        }
        Ok(HttpUrl(url))
    }
}

impl HttpUrl {
    /// The URL as `url` serializes it (host lowercased, default port dropped, path at least `/`).
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    /// As a base that request paths are appended to: no query, no trailing slash.
    pub fn into_base(self) -> Result<String, String> {
        if self.0.query().is_some() {
            return Err(format!(
                "`{}` has a query; a base URL such as https://api.scaleway.com has none",
                self.0
            ));
        }
        Ok(self.0.as_str().trim_end_matches('/').to_owned())
    }

    /// As a browser origin, `scheme://host[:port]`, spelled the way browsers send it in `Origin`
    /// (lowercase host, no default port), so a byte comparison matches.
    pub fn into_origin(self) -> Result<String, String> {
        if self.0.path() != "/" || self.0.query().is_some() {
            return Err(format!(
                "`{}` is not an origin such as https://app.example.com (no path, no query)",
                self.0
            ));
        }
        Ok(self.0.origin().ascii_serialization())
    }
}

/// An absolute http(s) URL (a JWKS, an issuer, a discovered `jwks_uri`), as [`HttpUrl`]
/// serializes it.
///
/// ```
/// use billing_gateway::config::parse_http_url;
///
/// assert_eq!(
///     parse_http_url("https://IdP.Example.com:443/realms/acme/certs").as_deref(),
///     Ok("https://idp.example.com/realms/acme/certs")
/// );
/// assert!(parse_http_url("ftp://idp.example.com/certs").is_err());
/// assert!(parse_http_url("https://user:pw@idp.example.com/certs").is_err());
/// assert!(parse_http_url("/realms/acme/certs").is_err());
/// ```
pub fn parse_http_url(s: &str) -> Result<String, String> {
    s.parse::<HttpUrl>().map(|u| u.as_str().to_owned())
}

/// The Billing API's base URL: `http(s)://host[:port][/prefix]`, without query or trailing
/// slash, so `{base}{path}` is the request URL.
///
/// ```
/// use billing_gateway::config::parse_base_url;
///
/// assert_eq!(parse_base_url("https://api.scaleway.com/").as_deref(), Ok("https://api.scaleway.com"));
/// assert_eq!(parse_base_url("http://127.0.0.1:8081/sim").as_deref(), Ok("http://127.0.0.1:8081/sim"));
/// assert!(parse_base_url("https://api.scaleway.com/?x=1").is_err());
/// ```
pub fn parse_base_url(s: &str) -> Result<String, String> {
    s.parse::<HttpUrl>()?.into_base()
}

/// An exact browser origin, `scheme://host[:port]`: no path, no wildcard (a wildcard with
/// credentials in headers would let any site spend the caller's token).
///
/// ```
/// use billing_gateway::config::parse_origin;
///
/// assert_eq!(parse_origin("https://Costs.example.com:443").as_deref(), Ok("https://costs.example.com"));
/// assert!(parse_origin("https://*.example.com").is_err());
/// assert!(parse_origin("https://costs.example.com/app").is_err());
/// ```
pub fn parse_origin(s: &str) -> Result<String, String> {
    s.parse::<HttpUrl>()?.into_origin()
}

/// Checks a Redis URL's form without connecting; the message never repeats the URL, which may
/// hold a password.
pub(crate) fn parse_redis_url(v: &str) -> Result<url::Url, String> {
    let url = url::Url::parse(v).map_err(|e| format!("not a URL ({e})"))?;
    if !matches!(url.scheme(), "redis" | "rediss") {
        return Err("not a redis:// or rediss:// URL".to_owned());
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("a redis:// URL names a host".to_owned());
    }
    let db = url.path().trim_start_matches('/');
    if !db.is_empty() && db.parse::<u16>().is_err() {
        return Err("the path of a redis:// URL is a database number".to_owned());
    }
    Ok(url)
}

/// Checks `GATEWAY_REDIS_URL`: one URL, or several comma-separated (nodes of one Redis
/// Cluster), all `redis://` or all `rediss://`; messages never repeat a URL.
pub(crate) fn parse_redis_urls(v: &str) -> Result<Vec<url::Url>, String> {
    let urls = v
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(parse_redis_url)
        .collect::<Result<Vec<_>, _>>()?;
    match urls.first() {
        None => Err("no URL".to_owned()),
        Some(first) if urls.iter().any(|u| u.scheme() != first.scheme()) => {
            Err("the URLs mix redis:// and rediss://".to_owned())
        }
        Some(_) => Ok(urls),
    }
}

/// A PEM file of certificates to trust (`GATEWAY_REDIS_CA_FILE`): its bytes, once it is known
/// to hold at least one certificate and nothing unreadable.
pub(crate) fn pem_certificates(path: &std::path::Path) -> Result<Vec<u8>, String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let at = path.display();
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {at}: {e}"))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{at}: not PEM certificates ({e})"))?;
    if certs.is_empty() {
        return Err(format!("{at}: no PEM certificate in it"));
    }
    Ok(pem)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_sizes_and_rates_refuse_what_the_contract_does_not_write() {
        for bad in ["", "s", "-1s", "1.5s", "1 s", "1S", "1sec"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        for bad in ["", "MiB", "1 MiB", "1mib", "1TiB"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        for bad in ["", "20", "/s", "20/", "20/sec", "-1/s", "1.5/s"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_duration("99999999999999999d").map(|_| ()), Ok(()));
    }

    #[test]
    fn a_rate_prints_as_it_is_written() {
        for s in ["20/s", "100/m"] {
            assert_eq!(parse_rate(s).map(|r| r.to_string()).as_deref(), Ok(s));
        }
        #[derive(serde::Deserialize)]
        struct T {
            rate: Rate,
        }
        let t: T = toml::from_str("rate = \"5/s\"").expect("rate");
        assert_eq!(t.rate.count, 5);
        let e = toml::from_str::<T>("rate = \"5/h\"")
            .err()
            .map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.contains("20/s or 100/m")));
    }

    #[test]
    fn urls_are_refused_where_the_parser_would_repair_a_typo() {
        for bad in [
            "idp.example/keys",
            "ftp://idp.example/keys",
            "https:///keys",
            "https://",
            "https://user:pw@idp.example/keys",
            "https://idp.example/keys#k",
            "https://idp.exa\tmple/keys",
            "https://idp.example/ keys",
            "https:\\\\idp.example",
            "https://*.example",
            "https://idp..example",
        ] {
            assert!(bad.parse::<HttpUrl>().is_err(), "{bad}");
        }
        assert_eq!(
            parse_http_url("https://idp.example/keys?v=2").as_deref(),
            Ok("https://idp.example/keys?v=2")
        );
        assert_eq!(
            parse_base_url("http://[::1]:8080").as_deref(),
            Ok("http://[::1]:8080")
        );
        assert!(parse_origin("http://localhost:3000").is_ok());
        assert!(parse_base_url("http://billing_sim:8081").is_ok());
        assert_eq!(
            parse_origin("https://a.example/").as_deref(),
            Ok("https://a.example")
        );
        let e = parse_http_url("https://u:s3cr3t@idp.example").expect_err("credentials");
        assert!(!e.contains("s3cr3t"), "{e}");
    }
}
