//! The stats reporter: keeps this replica's entry in the namespace's replica table (its
//! client count, on Redis's clock), which `GET /api/events/stats` sums over the live
//! replicas; removes the entry when the replica shuts down.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::redis::RedisBroker;
use crate::hub::Hub;

/// How often the client count is checked for a change worth reporting.
const REPORT_CHECK: Duration = Duration::from_millis(250);
/// Longest gap between two heartbeats even when nothing changed.
const REPORT_EVERY: Duration = Duration::from_secs(2);
/// How long leaving the table may take at shutdown.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(2);

/// The task that reports this replica's clients.
#[derive(Debug)]
pub(crate) struct StatsReporter {
    /// The broker to report through.
    pub broker: Arc<RedisBroker>,
    /// Whose clients are counted.
    pub hub: Hub,
    /// This replica's id.
    pub replica_id: Arc<str>,
}

impl StatsReporter {
    /// Reports the client count whenever it changes (at most every 250 ms) and at least
    /// every two seconds; removes the replica from the stats when `shutdown` fires.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(REPORT_CHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reported: Option<(usize, tokio::time::Instant)> = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {
                    let clients = self.hub.client_count();
                    let due = match reported {
                        Some((count, at)) => count != clients || at.elapsed() >= REPORT_EVERY,
                        None => true,
                    };
                    if due {
                        match self.broker.heartbeat(&self.replica_id, clients).await {
                            Ok(()) => reported = Some((clients, tokio::time::Instant::now())),
                            Err(error) => tracing::debug!(%error, "stats heartbeat failed"),
                        }
                    }
                }
            }
        }
        match tokio::time::timeout(LEAVE_TIMEOUT, self.broker.leave(&self.replica_id)).await {
            Ok(Ok(())) => tracing::info!("removed this replica from the cluster stats"),
            _ => {
                tracing::warn!("could not remove this replica from the cluster stats; it ages out")
            }
        }
    }
}
