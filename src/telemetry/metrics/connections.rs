//! Client connections (contract §13): how many are open, and why they were closed.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::{ReasonLabels, add};

/// Client connections open, and closed by reason (`client`, `timeout`, `idle`, `evicted`,
/// `shutdown`).
#[derive(Debug, Clone, Default)]
pub struct ConnectionCounts {
    open: Gauge,
    closed: Family<ReasonLabels, Counter>,
}

impl ConnectionCounts {
    /// One more connection accepted.
    pub fn opened(&self) {
        self.open.inc();
    }

    /// One connection closed, for `reason`.
    pub fn closed(&self, reason: &'static str) {
        self.open.dec();
        self.closed.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// Shows `reason` at 0 until a connection is closed for it, so alerts see the first one.
    pub fn expect(&self, reason: &'static str) {
        let _ = self.closed.get_or_create(&ReasonLabels { reason });
    }

    pub(super) fn register(registry: &mut Registry) -> ConnectionCounts {
        ConnectionCounts {
            open: add(
                registry,
                "connections_open",
                "Client connections open (at most GATEWAY_MAX_CONNECTIONS)",
                Gauge::default(),
            ),
            closed: add(
                registry,
                "connections_closed",
                "Client connections closed, by reason: client (closed by the client, or a \
                 protocol or TLS error), timeout (too slow: first byte, head, handshake, or an \
                 answer not taken), idle (idle for the idle timeout, shortened near the bound), \
                 evicted (idle, closed to make room at the bound or after an accept error), \
                 shutdown",
                Family::default(),
            ),
        }
    }
}
