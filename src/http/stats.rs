//! `GET /api/events/stats`: the seed's counters plus per-type counts and replica details.
//! With Redis the figures are cluster-wide: clients summed over live replicas, events
//! from the shared counters.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, Uri};
use serde::Serialize;

use crate::auth::Credentials;
use crate::broker::ClusterStats;
use crate::error::ApiError;
use crate::state::AppState;
use crate::telemetry::RateLimit;

/// The stats body: the fabric's figures and who answered.
#[derive(Debug, Serialize)]
pub(crate) struct StatsReport {
    #[serde(flatten)]
    cluster: ClusterStats,
    replica_id: String,
    uptime_secs: u64,
    broker: &'static str,
    /// Set when Redis could not be asked, so the figures are this replica's alone.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    degraded: bool,
}

/// Client and event counts for the whole cluster (or this replica, without Redis).
pub(crate) async fn get_stats(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Json<StatsReport>, ApiError> {
    let credentials = Credentials::from_headers(&headers, uri.query());
    state
        .auth
        .stats_reader(&credentials)
        .await
        .map_err(|denied| {
            state.metrics.auth_refusals.inc();
            ApiError::Denied(denied)
        })?;
    let (cluster, degraded) = match state.broker.cluster_stats().await {
        Ok(cluster) => (cluster, false),
        Err(error) => {
            // Any client can ask as often as it likes; one line a second tells operators.
            static LOG: RateLimit = RateLimit::per_second();
            if let Some(suppressed) = LOG.allow() {
                tracing::warn!(
                    %error,
                    suppressed,
                    "cluster stats unavailable; answering with this replica's"
                );
            }
            (state.broker.local_stats(), true)
        }
    };
    Ok(Json(StatsReport {
        cluster,
        replica_id: state.replica_id.to_string(),
        uptime_secs: state.started.elapsed().as_secs(),
        broker: state.broker.kind(),
        degraded,
    }))
}
