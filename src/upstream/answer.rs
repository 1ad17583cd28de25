//! What the upstream answered, in the only form that leaves this module: status, headers and a
//! body the secret key is already out of.
//!
//! An error answer is read whole here, up to [`ERROR_BODY_LIMIT`] (past it, `502`), and every
//! occurrence of the key is replaced: an upstream may quote the credential it was sent. A success
//! is left unread, to be streamed or read up to a limit by whoever relays it.

use axum::http::{HeaderMap, StatusCode};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};

use crate::error::Error;

/// The longest upstream error body relayed. Scaleway's are a few hundred bytes.
const ERROR_BODY_LIMIT: u64 = 64 * 1024;

/// What stands in for the secret key in a relayed body.
const KEY_MARKER: &str = "[secret key removed]";

/// An upstream answer, judged (never a redirect nor a 429) and clean of the secret key.
pub struct Answer {
    /// The upstream's status.
    pub status: StatusCode,
    /// The upstream's headers, as sent (an error answer's length is the unscrubbed body's).
    pub headers: HeaderMap,
    /// The body: whole for an error answer, unread for a success.
    pub body: Content,
}

/// An answer's body, read or not.
pub enum Content {
    /// The whole body.
    Whole(Bytes),
    /// A body not (or not all) read: the chunks read so far, then the rest as it comes.
    Unread(Unread),
}

/// A body still streaming from the upstream, after the chunks already read of it.
pub struct Unread {
    prefix: Vec<Bytes>,
    rest: reqwest::Response,
}

impl Answer {
    /// Judged `response` as it may be handed out: an error answer read whole and scrubbed of
    /// `key`, a success left unread.
    pub(super) async fn new(response: reqwest::Response, key: &[u8]) -> Result<Answer, Error> {
        let status = response.status();
        let headers = response.headers().clone();
        let unread = Unread {
            prefix: Vec::new(),
            rest: response,
        };
        let body = if status.is_success() {
            Content::Unread(unread)
        } else {
            match unread.read_at_most(ERROR_BODY_LIMIT).await? {
                Content::Whole(body) => Content::Whole(scrub(body, key)),
                Content::Unread(_) => {
                    return Err(Error::BadGateway(format!(
                        "the upstream's error answer is longer than {ERROR_BODY_LIMIT} bytes"
                    )));
                }
            }
        };
        Ok(Answer {
            status,
            headers,
            body,
        })
    }
}

impl Unread {
    /// The whole body as a stream: the prefix, then the rest as it comes, held nowhere.
    pub fn into_stream(self) -> impl Stream<Item = Result<Bytes, Error>> + Send + 'static {
        let prefix = futures_util::stream::iter(self.prefix.into_iter().map(Ok));
        prefix.chain(
            self.rest
                .bytes_stream()
                .map(|chunk| chunk.map_err(body_error)),
        )
    }

    /// Reads the body, at most `limit` bytes of it (plus the one chunk that crosses it): whole
    /// within the limit, else what was read and the rest unread.
    pub async fn read_at_most(mut self, limit: u64) -> Result<Content, Error> {
        if self.rest.content_length().is_some_and(|len| len > limit) {
            return Ok(Content::Unread(self));
        }
        let mut read: u64 = self.prefix.iter().map(|chunk| chunk.len() as u64).sum();
        while let Some(chunk) = self.rest.chunk().await.map_err(body_error)? {
            read += chunk.len() as u64;
            self.prefix.push(chunk);
            if read > limit {
                return Ok(Content::Unread(self));
            }
        }
        let mut prefix = self.prefix;
        Ok(Content::Whole(match prefix.len() {
            0 => Bytes::new(),
            1 => prefix.swap_remove(0),
            _ => prefix.concat().into(),
        }))
    }
}

/// `body` with every occurrence of `key` (ASCII case-insensitive: a UUID may come back in upper
/// case) replaced by [`KEY_MARKER`]; the same bytes, uncopied, when there is none.
fn scrub(body: Bytes, key: &[u8]) -> Bytes {
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
