//! The readiness canary: every second this replica publishes a message on a channel of its
//! own and its subscriber watches for it to come back. Only a canary that made the whole
//! round trip (command connection, the function library, Redis, this replica's
//! subscription) counts, so `/readyz` is 200 only while delivery through Redis is proven to
//! work right now. The library sends it the way the gateways listen (sharded on a cluster).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::redis::{CANARY_STALE, RedisBroker};

/// How often the canary is published.
const CANARY_EVERY: Duration = Duration::from_secs(1);

/// The task that publishes the canary.
#[derive(Debug)]
pub(crate) struct Canary {
    /// The broker to publish through.
    pub broker: Arc<RedisBroker>,
    /// This replica's id (names its canary channel).
    pub replica_id: Arc<str>,
}

impl Canary {
    /// Publishes the canary every second until `shutdown` fires.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(CANARY_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {
                    let sent = tokio::time::timeout(CANARY_STALE, self.broker.send_canary(&self.replica_id)).await;
                    if let Ok(Err(error)) = sent {
                        tracing::debug!(%error, "canary not sent");
                    }
                }
            }
        }
    }
}
