//! `GET /api/events/stats`: the seed's counters plus per-type counts and replica details.
//! With Redis the figures are cluster-wide: clients summed over live replicas, events
//! from the shared counters.

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use crate::broker::Broker;
use crate::event::unix_ms;
use crate::state::AppState;

/// Client and event counts for the whole cluster (or this replica, without Redis).
pub async fn get_stats(State(state): State<AppState>) -> Json<Value> {
    let local_clients = state.hub.client_count();
    let mut body = json!({
        "active_clients": local_clients,
        "total_events_broadcast": state.metrics.events_received.get(),
        "events_by_type": state.metrics.events_by_type(),
        "replica_id": &*state.replica_id,
        "uptime_secs": state.started.elapsed().as_secs(),
        "broker": state.broker.kind(),
        "replicas": [{
            "id": &*state.replica_id,
            "active_clients": local_clients,
            "last_seen_ms": unix_ms(),
        }],
    });
    if let Broker::Redis(redis) = &state.broker {
        match redis.cluster_stats().await {
            Ok(cluster) => {
                let replicas: Vec<Value> = cluster
                    .replicas
                    .iter()
                    .map(|(id, clients, seen)| json!({ "id": id, "active_clients": clients, "last_seen_ms": seen }))
                    .collect();
                body["active_clients"] = json!(cluster.replicas.iter().map(|r| r.1).sum::<u64>());
                body["total_events_broadcast"] = json!(cluster.total_events);
                body["events_by_type"] = json!(cluster.events_by_type);
                body["replicas"] = json!(replicas);
            }
            Err(error) => {
                tracing::warn!(%error, "cluster stats unavailable; answering with this replica's");
                body["degraded"] = json!(true);
            }
        }
    }
    Json(body)
}
