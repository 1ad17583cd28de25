//! The pub/sub side of the link: what the connection subscribed to `{ns}:events` brings, and
//! keeping that subscription in place.

use std::time::Duration;

use redis::{PushInfo, PushKind};

use super::Cluster;

/// What the pub/sub connection brings, to every [`Cluster::events`] receiver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A message published on `{ns}:events`.
    Message(String),
    /// The subscription is (again) in place: messages published while it was not were lost,
    /// so whoever relies on them re-reads what they would have said.
    Subscribed,
    /// The pub/sub connection dropped; messages may be lost until [`Event::Subscribed`].
    Disconnected,
}

impl Cluster {
    /// Subscribes when not yet subscribed, or pings the subscribed connection so that a lost
    /// one is remade (and resubscribed by the client); whether the subscription is in place.
    pub(super) async fn keep_subscribed(&self, channel: &str, subscribed: bool) -> bool {
        let mut sub = self.sub.clone();
        let bound = Duration::from_secs(1);
        if subscribed {
            let ping = redis::cmd("PING");
            let pong = tokio::time::timeout(bound, ping.query_async::<redis::Value>(&mut sub));
            let _ = pong.await;
            true
        } else {
            matches!(
                tokio::time::timeout(bound, sub.subscribe(channel)).await,
                Ok(Ok(()))
            )
        }
    }
}

/// The event a push from the pub/sub connection means, if any.
pub(super) fn event(push: PushInfo) -> Option<Event> {
    match push.kind {
        PushKind::Message => match push.data.get(1) {
            Some(redis::Value::BulkString(bytes)) => {
                Some(Event::Message(String::from_utf8_lossy(bytes).into_owned()))
            }
            _ => None,
        },
        PushKind::Subscribe => Some(Event::Subscribed),
        PushKind::Disconnection => Some(Event::Disconnected),
        _ => None,
    }
}
