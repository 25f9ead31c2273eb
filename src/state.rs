//! Shared handles every request handler and stream needs; cheap to clone.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::broker::Broker;
use crate::config::{Config, HEALTH_RESERVE};
use crate::connections::ConnectionCaps;
use crate::hub::Hub;
use crate::metrics::Metrics;

/// Everything a handler needs; one pointer wide, so every connection can hold a copy.
#[derive(Debug, Clone)]
pub(crate) struct AppState {
    inner: Arc<SharedState>,
}

impl std::ops::Deref for AppState {
    type Target = SharedState;

    fn deref(&self) -> &SharedState {
        &self.inner
    }
}

/// The parts of a gateway that handlers and streams use.
#[derive(Debug)]
pub(crate) struct SharedState {
    /// Validated settings.
    pub config: Arc<Config>,
    /// This replica's fan-out hub.
    pub hub: Hub,
    /// Where events are stored and published.
    pub broker: Broker,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// This replica's id.
    pub replica_id: Arc<str>,
    /// When the gateway started.
    pub started: Instant,
    /// Fires when the gateway begins to shut down.
    pub shutdown: CancellationToken,
    /// Most stream clients served at once.
    pub max_clients: usize,
    /// The cap on connections that are not streams, and its reserve.
    pub connections: ConnectionCaps,
    /// Response head and `retry:` line that open every raw stream (when the CORS headers
    /// do not depend on the client's origin).
    pub stream_preamble: Bytes,
    /// Which web origins may read the stream and publish.
    pub cors: crate::cors::CorsPolicy,
    /// Streams open per client address (`--max-clients-per-ip`).
    pub per_address: Arc<crate::address::PerAddress>,
    /// Proxies whose `X-Forwarded-For` names the client (`--trusted-proxies`).
    pub trusted_proxies: crate::address::TrustedProxies,
    /// Who may subscribe, publish and read the stats.
    pub auth: crate::auth::Auth,
    /// `--publish-rate`, when set.
    pub publish_rate: Option<crate::rate::PublishRate>,
}

impl AppState {
    /// Bundles the parts of a gateway.
    pub fn new(
        config: Arc<Config>,
        hub: Hub,
        broker: Broker,
        metrics: Arc<Metrics>,
        replica_id: Arc<str>,
        shutdown: CancellationToken,
        auth: crate::auth::Auth,
    ) -> Self {
        // Validated when the flag was read; an unreadable value allows no origin.
        let cors = crate::cors::CorsPolicy::parse(config.cors_origins.as_deref())
            .unwrap_or(crate::cors::CorsPolicy::Listed(Vec::new()));
        let per_address = crate::address::PerAddress::new(config.max_clients_per_ip as usize);
        // Validated when the flag was read; an unreadable value trusts no proxy.
        let trusted_proxies =
            crate::address::TrustedProxies::parse(config.trusted_proxies.as_deref())
                .unwrap_or_default();
        let inner = SharedState {
            auth,
            publish_rate: crate::rate::PublishRate::new(config.publish_rate),
            per_address,
            trusted_proxies,
            replica_id,
            max_clients: config.resolved_max_clients(),
            connections: ConnectionCaps::new(
                usize::try_from(config.max_other_connections).unwrap_or(usize::MAX),
                HEALTH_RESERVE,
                metrics.other_connections.clone(),
            ),
            stream_preamble: crate::stream::raw_preamble(
                config.retry_ms,
                &cors.headers(None, crate::cors::Route::Stream),
            ),
            cors,
            config,
            hub,
            broker,
            metrics,
            started: Instant::now(),
            shutdown,
        };
        Self {
            inner: Arc::new(inner),
        }
    }

    /// Whether the replica is shutting down (`/readyz` then turns it away from load
    /// balancers).
    pub fn is_draining(&self) -> bool {
        self.shutdown.is_cancelled()
    }

    /// Whether the replica should receive new traffic.
    pub fn is_ready(&self) -> bool {
        !self.is_draining() && self.broker.is_ready()
    }
}
