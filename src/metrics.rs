//! This replica's counters: the Prometheus registry behind `GET /metrics` and the local
//! figures behind `GET /api/events/stats`.
//!
//! Each gateway owns its own registry (no global recorder), so several gateways can run in
//! one process, as tests do.

use std::collections::BTreeMap;
use std::sync::Mutex;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Distinct event types counted by name; later newcomers share the label `_other`, so a
/// producer inventing types cannot grow memory or the metrics page without bound.
pub const MAX_TRACKED_TYPES: usize = 1000;

/// Label used for event types beyond [`MAX_TRACKED_TYPES`].
pub const OTHER_TYPE: &str = "_other";

/// Counters and gauges of one replica.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// SSE clients connected to this replica.
    pub clients_connected: Gauge,
    /// Events this replica received from its broker and fanned out.
    pub events_received: Counter,
    /// Events written to clients (one per client per event).
    pub events_delivered: Counter,
    /// Clients disconnected because they fell too far behind.
    pub slow_disconnects: Counter,
    /// Streams opened with a valid `Last-Event-ID`.
    pub resumes: Counter,
    /// `history_truncated` notices sent.
    pub history_truncated: Counter,
    /// Publish requests that failed (broker unavailable or rejected).
    pub publish_errors: Counter,
    /// Messages from the broker that were dropped as malformed.
    pub bad_messages: Counter,
    /// Open connections that are not event streams, under `--max-other-connections`
    /// (also the count that cap is enforced on; see `connections.rs`).
    pub other_connections: Gauge,
    /// Connections turned away because `--max-other-connections` and its reserve were
    /// taken.
    pub connections_refused: Counter,
    /// Streams, publishes and stats requests refused for a missing, bad or insufficient
    /// token (`401`/`403`).
    pub auth_refusals: Counter,
    /// Publishes refused by `--publish-rate`.
    pub rate_limited: Counter,
    events_by_type_metric: Family<Vec<(String, String)>, Counter>,
    events_by_type: Mutex<BTreeMap<Box<str>, u64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates the counters and registers them.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let clients_connected = Gauge::default();
        let events_received = Counter::default();
        let events_delivered = Counter::default();
        let slow_disconnects = Counter::default();
        let resumes = Counter::default();
        let history_truncated = Counter::default();
        let publish_errors = Counter::default();
        let bad_messages = Counter::default();
        let other_connections = Gauge::default();
        let connections_refused = Counter::default();
        let auth_refusals = Counter::default();
        let rate_limited = Counter::default();
        let events_by_type_metric = Family::default();
        registry.register(
            "eventfabric_clients_connected",
            "SSE clients connected to this replica",
            clients_connected.clone(),
        );
        registry.register(
            "eventfabric_events_received",
            "Events this replica received from its broker",
            events_received.clone(),
        );
        registry.register(
            "eventfabric_events_received_by_type",
            "Events received, by event type",
            events_by_type_metric.clone(),
        );
        registry.register(
            "eventfabric_events_delivered",
            "Event deliveries written to clients",
            events_delivered.clone(),
        );
        registry.register(
            "eventfabric_slow_client_disconnects",
            "Clients disconnected for falling behind",
            slow_disconnects.clone(),
        );
        registry.register(
            "eventfabric_resumes",
            "Streams resumed from a Last-Event-ID",
            resumes.clone(),
        );
        registry.register(
            "eventfabric_history_truncated",
            "history_truncated notices sent to resuming clients",
            history_truncated.clone(),
        );
        registry.register(
            "eventfabric_publish_errors",
            "Publish requests that failed",
            publish_errors.clone(),
        );
        registry.register(
            "eventfabric_bad_broker_messages",
            "Malformed messages from the broker that were dropped",
            bad_messages.clone(),
        );
        registry.register(
            "eventfabric_other_connections",
            "Open connections that are not event streams",
            other_connections.clone(),
        );
        registry.register(
            "eventfabric_connections_refused",
            "Connections turned away because the cap on non-stream connections was reached",
            connections_refused.clone(),
        );
        registry.register(
            "eventfabric_auth_refusals",
            "Requests refused for a missing, invalid or insufficient token",
            auth_refusals.clone(),
        );
        registry.register(
            "eventfabric_publishes_rate_limited",
            "Publishes refused by --publish-rate",
            rate_limited.clone(),
        );
        Self {
            registry,
            clients_connected,
            events_received,
            events_delivered,
            slow_disconnects,
            resumes,
            history_truncated,
            publish_errors,
            bad_messages,
            other_connections,
            connections_refused,
            auth_refusals,
            rate_limited,
            events_by_type_metric,
            events_by_type: Mutex::new(BTreeMap::new()),
        }
    }

    /// Counts one received event of the given type.
    pub fn record_event(&self, event_type: &str) {
        self.events_received.inc();
        let label = {
            let mut by_type = self
                .events_by_type
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let key: &str = if by_type.contains_key(event_type) || by_type.len() < MAX_TRACKED_TYPES
            {
                event_type
            } else {
                OTHER_TYPE
            };
            match by_type.get_mut(key) {
                Some(count) => *count += 1,
                None => {
                    by_type.insert(key.into(), 1);
                }
            }
            key.to_owned()
        };
        self.events_by_type_metric
            .get_or_create(&vec![("type".to_owned(), label)])
            .inc();
    }

    /// Events received so far, by type.
    pub fn events_by_type(&self) -> BTreeMap<String, u64> {
        self.events_by_type
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect()
    }

    /// Renders every metric in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_lists_every_documented_metric() {
        let metrics = Metrics::new();
        metrics.record_event("cache_updated");
        let text = metrics.render();
        for name in [
            "eventfabric_clients_connected",
            "eventfabric_events_received_total",
            "eventfabric_events_delivered_total",
            "eventfabric_slow_client_disconnects_total",
            "eventfabric_resumes_total",
            "eventfabric_history_truncated_total",
            "eventfabric_publish_errors_total",
            "eventfabric_other_connections",
            "eventfabric_connections_refused_total",
            "eventfabric_auth_refusals_total",
            "eventfabric_publishes_rate_limited_total",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
        assert!(text.contains(r#"type="cache_updated""#));
    }

    #[test]
    fn distinct_types_beyond_the_cap_share_one_label() {
        let metrics = Metrics::new();
        for n in 0..MAX_TRACKED_TYPES + 50 {
            metrics.record_event(&format!("t{n}"));
        }
        let by_type = metrics.events_by_type();
        assert_eq!(by_type.len(), MAX_TRACKED_TYPES + 1);
        assert_eq!(by_type[OTHER_TYPE], 50);
        assert_eq!(
            metrics.events_received.get(),
            (MAX_TRACKED_TYPES + 50) as u64
        );
    }
}
