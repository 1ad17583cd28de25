//! The pub/sub side of the link: what the connection subscribed to `{ns}:events` brings, and
//! keeping that subscription in place.

use std::time::Duration;

use redis::{PushInfo, PushKind};
use tokio::sync::broadcast;

use super::{Cluster, TICK};

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
    /// Every [`TICK`]: subscribes when not subscribed (yet, or since the connection dropped),
    /// or asks the subscribed connection something so that a lost one is noticed and remade.
    /// After a drop the client subscribes again by itself, except a Cluster client whose node a
    /// failover took away: when no subscription came back by the next tick, this one makes it.
    pub(super) async fn keep_subscription(&self) -> std::convert::Infallible {
        let channel = self.key("events");
        let mut events = self.events();
        let mut subscribed = false;
        loop {
            loop {
                match events.try_recv() {
                    Ok(Event::Disconnected) => subscribed = false,
                    // Subscribed again by the client itself (a single server's connection).
                    Ok(Event::Subscribed) => subscribed = true,
                    Err(broadcast::error::TryRecvError::Empty) => break,
                    _ => {}
                }
            }
            // Subscribed as soon as the link is made (by the heartbeat, or here).
            if let Ok(link) = self.link().await {
                let mut sub = link.sub.clone();
                let bound = Duration::from_secs(1);
                if subscribed {
                    // A command for the channel's slot, not a PING (which a Cluster client
                    // sends to any node): it goes where the subscription is, so a lost
                    // connection is noticed there.
                    let ping = redis::cmd("EXISTS").arg(&channel).to_owned();
                    let pong = ping.query_async::<redis::Value>(&mut sub);
                    let _ = tokio::time::timeout(bound, pong).await;
                } else {
                    subscribed = matches!(
                        tokio::time::timeout(bound, sub.subscribe(&channel)).await,
                        Ok(Ok(()))
                    );
                }
            }
            tokio::time::sleep(TICK).await;
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
