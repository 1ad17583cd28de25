//! Reading upstream bodies with a bound, and keeping the secret key out of what is relayed.
//!
//! A body is read whole only up to a limit: a cacheable answer up to the cache's store limit
//! (past it, the prefix read so far and the rest of the stream are relayed, never held), an error
//! answer up to [`ERROR_BODY_LIMIT`] (past it, `502`). Error answers are read whole so that the
//! secret key can be taken out of them: an upstream may quote the credential it was sent.

use bytes::Bytes;
use futures_util::StreamExt;

use crate::error::Error;

/// The longest upstream error body relayed. Scaleway's are a few hundred bytes.
pub(super) const ERROR_BODY_LIMIT: u64 = 64 * 1024;

/// What stands in for the secret key in a relayed body.
pub(super) const KEY_MARKER: &str = "[secret key removed]";

/// A body read up to a limit.
pub(super) enum Read {
    /// The whole body, within the limit.
    Whole(Bytes),
    /// Longer than the limit: what was read, then the rest, unread.
    Over(Over),
}

/// A body past its limit: the chunks read so far and the upstream answer still streaming.
pub(super) struct Over {
    prefix: Vec<Bytes>,
    rest: reqwest::Response,
}

impl Over {
    /// The whole body as a stream: the prefix, then the rest as it comes, held nowhere.
    pub(super) fn into_stream(
        self,
    ) -> impl futures_util::Stream<Item = Result<Bytes, reqwest::Error>> + Send + 'static {
        let prefix = futures_util::stream::iter(self.prefix.into_iter().map(Ok));
        prefix.chain(self.rest.bytes_stream())
    }
}

/// Reads `response`'s body, at most `limit` bytes of it (plus the one chunk that crosses it).
pub(super) async fn read_at_most(
    mut response: reqwest::Response,
    limit: u64,
) -> Result<Read, Error> {
    if response.content_length().is_some_and(|len| len > limit) {
        return Ok(Read::Over(Over {
            prefix: Vec::new(),
            rest: response,
        }));
    }
    let mut prefix: Vec<Bytes> = Vec::new();
    let mut read: u64 = 0;
    while let Some(chunk) = response.chunk().await.map_err(body_error)? {
        read += chunk.len() as u64;
        prefix.push(chunk);
        if read > limit {
            return Ok(Read::Over(Over {
                prefix,
                rest: response,
            }));
        }
    }
    Ok(Read::Whole(match prefix.len() {
        0 => Bytes::new(),
        1 => prefix.swap_remove(0),
        _ => prefix.concat().into(),
    }))
}

/// An upstream error answer's body, read whole (bounded) and scrubbed of `key`.
pub(super) async fn error_body(response: reqwest::Response, key: &[u8]) -> Result<Bytes, Error> {
    match read_at_most(response, ERROR_BODY_LIMIT).await? {
        Read::Whole(body) => Ok(scrub(body, key)),
        Read::Over(_) => Err(Error::BadGateway(format!(
            "the upstream's error answer is longer than {ERROR_BODY_LIMIT} bytes"
        ))),
    }
}

/// `body` with every occurrence of `key` (ASCII case-insensitive: a UUID may come back in upper
/// case) replaced by [`KEY_MARKER`]; the same bytes, uncopied, when there is none.
pub(super) fn scrub(body: Bytes, key: &[u8]) -> Bytes {
    let found = |at: usize| {
        body.get(at..at + key.len())
            .is_some_and(|window| window.eq_ignore_ascii_case(key))
    };
    if key.is_empty() || !(0..body.len()).any(found) {
        return body;
    }
    let mut out = Vec::with_capacity(body.len());
    let mut at = 0;
    while at < body.len() {
        if found(at) {
            out.extend_from_slice(KEY_MARKER.as_bytes());
            at += key.len();
        } else {
            out.push(body[at]);
            at += 1;
        }
    }
    out.into()
}

/// A body that failed mid-way: too slow is `504`, anything else `502` (reqwest's message names
/// the URL, never the headers; the URL is dropped anyway).
fn body_error(e: reqwest::Error) -> Error {
    if e.is_timeout() {
        Error::GatewayTimeout
    } else {
        Error::BadGateway(format!(
            "reading the upstream's answer: {}",
            e.without_url()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "5ec7e7ca-fe00-4bad-9000-00000000beef";

    #[test]
    fn every_occurrence_of_the_key_is_replaced_in_any_case() {
        let body = Bytes::from(format!(
            r#"{{"message":"key {KEY} is not allowed","help":"{}","type":"denied"}}{KEY}"#,
            KEY.to_ascii_uppercase()
        ));
        let scrubbed = scrub(body, KEY.as_bytes());
        let text = std::str::from_utf8(&scrubbed).expect("utf-8");
        assert_eq!(
            text,
            format!(
                r#"{{"message":"key {KEY_MARKER} is not allowed","help":"{KEY_MARKER}","type":"denied"}}{KEY_MARKER}"#
            )
        );
        serde_json::from_str::<serde_json::Value>(text.trim_end_matches(KEY_MARKER))
            .expect("still JSON");
    }

    #[test]
    fn a_body_without_the_key_is_left_as_it_is() {
        let body = Bytes::from_static(br#"{"message":"not found","type":"not_found"}"#);
        let scrubbed = scrub(body.clone(), KEY.as_bytes());
        assert_eq!(scrubbed, body);
        assert_eq!(scrubbed.as_ptr(), body.as_ptr(), "not copied");
        // A prefix of the key at the very end is not the key.
        let tail = Bytes::from(format!("x{}", &KEY[..10]));
        assert_eq!(scrub(tail.clone(), KEY.as_bytes()), tail);
        assert_eq!(scrub(Bytes::new(), KEY.as_bytes()), Bytes::new());
    }
}
