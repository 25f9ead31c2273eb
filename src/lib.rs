//! eventfabric: a Server-Sent Events gateway. Producers publish events; every replica fans
//! them out to its browsers, which can resume after a reconnect without losing any.
//!
//! Module map (all private; the items re-exported below are the public surface):
//! - `config`: operator settings (flags and environment), validated at start-up.
//! - `event`: event ids, type validation and the JSON envelope clients receive.
//! - `sse`: the SSE wire format; `Frame` is an event encoded once, shared by every client.
//! - `broker`: where events are stored for resume (in process, or Redis) and the one
//!   `deliver` path from a backend into the history ring and the hub.
//! - `hub`: this replica's fan-out threads, per-client queues and heartbeat tick.
//! - `stream`: the response contract every stream shares (admission, headers, `503`,
//!   farewell `retry:`) and its two writers, raw socket and hyper.
//! - `server`: the accept loop that routes each connection to a stream writer or hyper.
//! - `address`: a client's address (behind trusted proxies) and streams per address.
//! - `connections`: the cap on connections that are not streams, and its reserve.
//! - `cors`: which web origins may read the stream and publish (`--cors-origins`).
//! - `http`: the axum routes (publish, stats, health, metrics).
//! - `publisher`: publishing API for Rust producers.
//! - `metrics`: counters behind `/metrics` and `/api/events/stats`.
//! - `state`, `error`, `shutdown`, `telemetry`: plumbing.

mod address;
mod auth;
mod broker;
mod config;
mod connections;
mod cors;
mod error;
mod event;
mod http;
mod hub;
mod metrics;
mod publisher;
mod rate;
mod server;
mod shutdown;
mod sse;
mod state;
mod stream;
mod telemetry;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use broker::{ClusterStats, Error as BrokerError, ReplicaStats};
pub use config::{Cli, Command, Config, LogFormat, RedisUrl, Secret};
pub use event::EventId;
pub use publisher::{PublishError, Publisher};
pub use shutdown::cancel_on_signal;
pub use telemetry::init as init_logging;

use broker::{Broker, RedisSettings, RedisTarget};
use hub::Hub;
use metrics::Metrics;
use state::AppState;

/// Why a gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The listening socket could not be used.
    #[error("cannot use the listening socket: {0}")]
    Listener(#[source] std::io::Error),
    /// The broker settings are unusable (for example a malformed Redis URL).
    #[error("cannot set up the broker: {0}")]
    Broker(#[source] BrokerError),
    /// A token key cannot be used (the message names the flag, never the key).
    #[error("cannot set up token checks: {0}")]
    Auth(String),
    /// The admin address (`--admin-listen`) cannot be used.
    #[error("cannot listen on --admin-listen {addr}: {source}")]
    AdminListener {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A built gateway: broker, hub and HTTP state, ready to serve on a listener.
#[derive(Debug)]
pub struct Gateway {
    state: AppState,
}

impl Gateway {
    /// Builds every part of a gateway from `config`. Nothing connects yet: a gateway
    /// builds, and serves, while its Redis is down.
    pub async fn build(config: Config) -> Result<Self, StartError> {
        let config = Arc::new(config);
        let metrics = Arc::new(Metrics::new());
        let replica_id: Arc<str> = config.resolved_replica_id().into();
        let hub = Hub::new(
            config.client_queue as usize,
            config.fanout_threads(),
            Arc::clone(&metrics),
        );
        let target = RedisTarget::from_config(&config).map_err(StartError::Broker)?;
        let broker = match target {
            None => Broker::memory(
                config.history,
                hub.clone(),
                Arc::clone(&metrics),
                Arc::clone(&replica_id),
            ),
            Some(target) => Broker::redis(
                RedisSettings::from_config(target, &config),
                hub.clone(),
                Arc::clone(&metrics),
                Arc::clone(&replica_id),
            )
            .map_err(StartError::Broker)?,
        };
        let auth = auth::Auth::from_config(&config)
            .await
            .map_err(StartError::Auth)?;
        let state = AppState::new(
            config,
            hub,
            broker,
            metrics,
            replica_id,
            CancellationToken::new(),
            auth,
        );
        Ok(Self { state })
    }

    /// A handle for publishing events from Rust code in this process.
    pub fn publisher(&self) -> Publisher {
        Publisher::new(self.state.broker.clone(), self.state.config.max_event_bytes)
    }

    /// Client and event counts of the whole fabric (with Redis, every live replica of the
    /// namespace), as `GET /api/events/stats` reports them.
    pub async fn cluster_stats(&self) -> Result<ClusterStats, BrokerError> {
        self.state.broker.cluster_stats().await
    }

    /// The shared state, for in-process tests that drive the router or a stream directly.
    #[cfg(test)]
    pub(crate) fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves on `listener` until `shutdown` fires, then drains: readiness turns off, every
    /// stream ends with a spread-out `retry:` hint, in-flight requests finish, and the call
    /// returns within the configured drain window.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), StartError> {
        let state = self.state;
        let addr = listener.local_addr().map_err(StartError::Listener)?;
        let tracker = TaskTracker::new();
        tracker.spawn(
            state
                .hub
                .clone()
                .run(state.config.heartbeat(), state.shutdown.clone()),
        );
        let root = state.shutdown.clone();
        tracker.spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => root.cancel(),
                _ = root.cancelled() => {}
            }
        });
        state.broker.start(&tracker, &state.shutdown);
        tracing::info!(
            %addr,
            broker = state.broker.kind(),
            replica = &*state.replica_id,
            max_clients = state.max_clients,
            max_other_connections = state.config.max_other_connections,
            "eventfabric listening"
        );
        if let Some(warning) = state.config.file_limit_warning() {
            tracing::warn!(%warning, "connection caps exceed the open-file limit");
        }
        if let Some(addr) = state.config.admin_listen {
            let admin = TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::AdminListener { addr, source })?;
            tracing::info!(%addr, "serving /healthz, /readyz and /metrics");
            let router = http::admin_router(state.clone());
            let shutdown = state.shutdown.clone();
            tracker.spawn(async move {
                let served = axum::serve(admin, router)
                    .with_graceful_shutdown(async move { shutdown.cancelled().await })
                    .await;
                if let Err(error) = served {
                    tracing::warn!(%error, "the admin listener failed");
                }
            });
        }
        let router = http::router(state.clone());
        server::accept_loop(listener, state.clone(), router, tracker.clone()).await;
        tracker.close();
        let clients = state.hub.client_count();
        tracing::info!(clients, "draining");
        if tokio::time::timeout(state.config.drain(), tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                remaining = tracker.len(),
                "drain window ended with connections still open; closing them"
            );
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// Builds a gateway from `config` and serves it on `listener` until `shutdown` fires.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), StartError> {
    Gateway::build(config)
        .await?
        .serve(listener, shutdown)
        .await
}
