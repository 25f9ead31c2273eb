//! eventfabric: a Server-Sent Events gateway. Producers publish events; every replica fans
//! them out to its browsers, which can resume after a reconnect without losing any.
//!
//! Module map:
//! - [`config`]: operator settings (flags and environment), validated at start-up.
//! - [`event`]: event ids, type validation and the JSON envelope clients receive.
//! - [`sse`]: the SSE wire format, encoded once per event.
//! - [`hub`]: this replica's fan-out threads, per-client queues and heartbeat tick.
//! - [`broker`]: where events are stored for resume: in process, or Redis.
//! - [`stream`]: the per-client session and the raw-socket stream writer.
//! - [`server`]: the accept loop that routes each connection to the raw writer or hyper.
//! - [`http`]: the axum routes (publish, stats, health, metrics).
//! - [`publisher`]: publishing API for Rust producers.
//! - [`metrics`]: counters behind `/metrics` and `/api/events/stats`.
//! - [`state`], [`error`], [`shutdown`], [`telemetry`]: plumbing.

pub mod broker;
pub mod config;
pub mod error;
pub mod event;
pub mod http;
pub mod hub;
pub mod metrics;
pub mod publisher;
pub mod server;
pub mod shutdown;
pub mod sse;
pub mod state;
pub mod stream;
pub mod telemetry;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::Config;
pub use event::EventId;
pub use publisher::{PublishError, Publisher};

use broker::subscriber::Background;
use broker::{Broker, MemoryBroker, RedisBroker, RedisSettings};
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
    Broker(#[source] broker::Error),
}

/// A built gateway: broker, hub and HTTP state, ready to serve on a listener.
#[derive(Debug)]
pub struct Gateway {
    state: AppState,
}

impl Gateway {
    /// Builds every part of a gateway from `config`.
    pub async fn build(config: Config) -> Result<Self, StartError> {
        let config = Arc::new(config);
        let metrics = Arc::new(Metrics::new());
        let hub = Hub::new(
            config.client_queue as usize,
            config.fanout_threads(),
            Arc::clone(&metrics),
        );
        let broker = match config.redis_url() {
            None => Broker::Memory(Arc::new(MemoryBroker::new(
                config.history as usize,
                hub.clone(),
            ))),
            Some(url) => Broker::Redis(Arc::new(
                RedisBroker::new(RedisSettings {
                    url: url.to_owned(),
                    namespace: config.namespace.clone(),
                    history: config.history,
                    max_event_bytes: config.max_event_bytes,
                })
                .map_err(StartError::Broker)?,
            )),
        };
        let state = AppState::new(config, hub, broker, metrics, CancellationToken::new());
        Ok(Self { state })
    }

    /// A handle for publishing events from Rust code in this process.
    pub fn publisher(&self) -> Publisher {
        Publisher::new(self.state.broker.clone(), self.state.config.max_event_bytes)
    }

    /// The shared state, for tests that drive the router directly.
    pub fn state(&self) -> &AppState {
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
        if let Broker::Redis(redis) = &state.broker {
            let background = Background {
                broker: Arc::clone(redis),
                hub: state.hub.clone(),
                metrics: Arc::clone(&state.metrics),
                replica_id: Arc::clone(&state.replica_id),
                max_event_bytes: state.config.max_event_bytes,
            };
            tracker.spawn(background.clone().run_subscriber(state.shutdown.clone()));
            tracker.spawn(background.clone().run_canary(state.shutdown.clone()));
            tracker.spawn(background.run_reporter(state.shutdown.clone()));
        }
        tracing::info!(
            %addr,
            broker = state.broker.kind(),
            replica = &*state.replica_id,
            max_clients = state.max_clients,
            "eventfabric listening"
        );
        let router = http::router(state.clone());
        server::accept_loop(listener, state.clone(), router, tracker.clone()).await;
        state.start_draining();
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
