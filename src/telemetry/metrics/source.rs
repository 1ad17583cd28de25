//! The health of a source the gateway re-reads while it runs (the policy folder, the identity
//! provider's keys): two series each, which the alerts on a source that stopped refreshing are
//! written against.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

use super::{add, add_in};

/// How a source the gateway re-reads while it runs is doing: when it was last read and found
/// good, and how many reads failed.
#[derive(Debug, Clone, Default)]
pub struct SourceHealth {
    last_success: Gauge<f64, std::sync::atomic::AtomicU64>,
    failures: Counter,
}

impl SourceHealth {
    /// The source was read and found good just now.
    pub fn succeeded(&self) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        self.last_success.set(now.as_secs_f64());
    }

    /// A read of the source failed (what was held before stays in force).
    pub fn failed(&self) {
        self.failures.inc();
    }

    /// The series of the source `what`, registered as `{name}_…`.
    pub(super) fn register(registry: &mut Registry, name: &str, what: &str) -> SourceHealth {
        SourceHealth {
            last_success: add_in(
                registry,
                &format!("{name}_last_success_timestamp"),
                &format!("When {what} was last read and found good (Unix time; 0: never)"),
                Unit::Seconds,
                Gauge::default(),
            ),
            failures: add(
                registry,
                &format!("{name}_failures"),
                &format!("Reads of {what} that failed; what was held before stays in force"),
                Counter::default(),
            ),
        }
    }
}
