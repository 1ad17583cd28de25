//! The W3C Trace Context headers as text: reading a caller's `traceparent` and `tracestate`,
//! and writing the `traceparent` an upstream call sends. Pure functions over bytes: what a
//! trace id is, not where it comes from ([`super`] decides that).

use std::fmt;

use axum::http::{HeaderMap, HeaderName, HeaderValue};

/// `traceparent` (W3C Trace Context), both ways.
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// `tracestate` (W3C Trace Context), passed on with a valid `traceparent`.
pub static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// The longest `tracestate` passed on; W3C asks for at least 512 characters to be propagated.
const MAX_TRACESTATE: usize = 512;

/// A trace id, printed as 32 lowercase hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceId(pub [u8; 16]);

impl TraceId {
    /// The 32 hex digits, written into `buf`: a `&str` field costs a log line less than a
    /// `Display` one (no formatting into a growing string).
    pub fn hex<'a>(&self, buf: &'a mut [u8; 32]) -> &'a str {
        hex(&self.0, buf)
    }
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; 32];
        f.write_str(self.hex(&mut buf))
    }
}

/// Lowercase hex of `bytes` into `out` (twice as long).
fn hex<'a>(bytes: &[u8], out: &'a mut [u8]) -> &'a str {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = DIGITS[usize::from(b >> 4)];
        out[2 * i + 1] = DIGITS[usize::from(b & 0xf)];
    }
    // Only ASCII digits were written.
    std::str::from_utf8(&out[..2 * bytes.len()]).unwrap_or_default()
}

/// The trace context a caller sent, when its `traceparent` is valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    /// The caller's trace.
    pub trace_id: [u8; 16],
    /// The caller's span: the parent of the request's.
    pub parent_id: [u8; 8],
    /// The caller's trace flags (bit 0: sampled).
    pub flags: u8,
    /// The caller's `tracestate`, when it sent one short and plain enough to pass on.
    pub tracestate: Option<HeaderValue>,
}

impl Incoming {
    /// The caller's trace context, or `None` when it sent no `traceparent` or a malformed one
    /// (or several: which would be meant is unknowable).
    pub fn from_headers(headers: &HeaderMap) -> Option<Incoming> {
        let mut values = headers.get_all(&TRACEPARENT).iter();
        let (Some(value), None) = (values.next(), values.next()) else {
            return None;
        };
        let (trace_id, parent_id, flags) = parse_traceparent(value.as_bytes())?;
        Some(Incoming {
            trace_id,
            parent_id,
            flags,
            tracestate: tracestate(headers),
        })
    }
}

/// Parses a `traceparent` value (W3C Trace Context level 1): `00-` 32 hex digits of trace id,
/// `-` 16 of parent id, `-` 2 of flags, all lowercase; neither id all zeros; version `ff` is
/// invalid, and a later version may append `-` and more, which is ignored.
pub fn parse_traceparent(value: &[u8]) -> Option<([u8; 16], [u8; 8], u8)> {
    let value = value.trim_ascii();
    if value.len() < 55 || value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
        return None;
    }
    let version = unhex::<1>(&value[..2])?[0];
    match version {
        0 if value.len() != 55 => return None,
        0xff => return None,
        _ if value.len() > 55 && value[55] != b'-' => return None,
        _ => {}
    }
    let trace_id = unhex::<16>(&value[3..35])?;
    let parent_id = unhex::<8>(&value[36..52])?;
    let flags = unhex::<1>(&value[53..55])?[0];
    if trace_id == [0; 16] || parent_id == [0; 8] {
        return None;
    }
    Some((trace_id, parent_id, flags))
}

/// `N` bytes from `2N` lowercase hex digits.
fn unhex<const N: usize>(digits: &[u8]) -> Option<[u8; N]> {
    fn digit(d: u8) -> Option<u8> {
        match d {
            b'0'..=b'9' => Some(d - b'0'),
            b'a'..=b'f' => Some(d - b'a' + 10),
            _ => None,
        }
    }
    if digits.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, pair) in digits.chunks_exact(2).enumerate() {
        out[i] = (digit(pair[0])? << 4) | digit(pair[1])?;
    }
    Some(out)
}

/// The caller's `tracestate` headers as one list, when short and plain enough to pass on.
fn tracestate(headers: &HeaderMap) -> Option<HeaderValue> {
    let mut values = headers.get_all(&TRACESTATE).iter();
    let first = values.next()?;
    let Some(second) = values.next() else {
        return plain_tracestate(first.as_bytes()).then(|| first.clone());
    };
    // Several headers are one list (RFC 9110 §5.3).
    let mut joined = Vec::with_capacity(first.len() + second.len() + 1);
    for value in [first, second].into_iter().chain(values) {
        if !joined.is_empty() {
            joined.push(b',');
        }
        joined.extend_from_slice(value.as_bytes());
    }
    if !plain_tracestate(&joined) {
        return None;
    }
    HeaderValue::from_bytes(&joined).ok()
}

fn plain_tracestate(value: &[u8]) -> bool {
    !value.is_empty()
        && value.len() <= MAX_TRACESTATE
        && value.iter().all(|b| (b' '..=b'~').contains(b))
}

/// `00-{trace id}-{parent id}-{flags}`.
pub fn traceparent(trace_id: [u8; 16], parent_id: [u8; 8], flags: u8) -> HeaderValue {
    let mut buf = [0u8; 55];
    buf[..3].copy_from_slice(b"00-");
    hex(&trace_id, &mut buf[3..35]);
    buf[35] = b'-';
    hex(&parent_id, &mut buf[36..52]);
    buf[52] = b'-';
    hex(&[flags], &mut buf[53..55]);
    // Only ASCII digits and dashes.
    HeaderValue::from_bytes(&buf).unwrap_or_else(|_| HeaderValue::from_static(""))
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_is_read_and_written_back_alike() {
        let (trace, parent, flags) = parse_traceparent(VALID.as_bytes()).expect("valid");
        assert_eq!(flags, 1);
        assert_eq!(traceparent(trace, parent, flags), VALID);
        assert_eq!(
            TraceId(trace).to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        // Surrounding blanks are tolerated; a later version's extra fields are ignored.
        assert!(parse_traceparent(format!(" {VALID} ").as_bytes()).is_some());
        assert!(
            parse_traceparent(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra")
                .is_some()
        );
    }

    #[test]
    fn malformed_traceparents_are_ignored() {
        for bad in [
            "",
            "garbage",
            // Uppercase hex, all-zero ids, version ff, a short id, extra text on version 00.
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
        ] {
            assert_eq!(parse_traceparent(bad.as_bytes()), None, "{bad}");
        }
    }

    #[test]
    fn tracestate_travels_only_with_a_valid_traceparent_and_within_bounds() {
        let mut headers = HeaderMap::new();
        headers.insert(&TRACEPARENT, HeaderValue::from_static(VALID));
        headers.append(&TRACESTATE, HeaderValue::from_static("a=1"));
        headers.append(&TRACESTATE, HeaderValue::from_static("b=2"));
        let incoming = Incoming::from_headers(&headers).expect("valid");
        assert_eq!(
            incoming.tracestate.as_ref().map(|v| v.as_bytes()),
            Some(&b"a=1,b=2"[..])
        );
        headers.insert(
            &TRACESTATE,
            HeaderValue::from_str(&"x".repeat(MAX_TRACESTATE + 1)).expect("value"),
        );
        assert_eq!(
            Incoming::from_headers(&headers).expect("valid").tracestate,
            None
        );
        headers.insert(&TRACEPARENT, HeaderValue::from_static("00-nonsense"));
        assert_eq!(Incoming::from_headers(&headers), None);
        // Two traceparents: which one was meant is unknowable.
        headers.insert(&TRACEPARENT, HeaderValue::from_static(VALID));
        headers.append(&TRACEPARENT, HeaderValue::from_static(VALID));
        assert_eq!(Incoming::from_headers(&headers), None);
    }
}
