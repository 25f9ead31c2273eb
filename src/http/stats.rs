//! `GET /api/events/stats`: the seed's counters plus per-type counts and replica details.

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use crate::event::unix_ms;
use crate::state::AppState;

/// Client and event counts. With the in-process broker the cluster is this one replica.
pub async fn get_stats(State(state): State<AppState>) -> Json<Value> {
    let clients = state.hub.client_count();
    Json(json!({
        "active_clients": clients,
        "total_events_broadcast": state.metrics.events_received.get(),
        "events_by_type": state.metrics.events_by_type(),
        "replica_id": &*state.replica_id,
        "uptime_secs": state.started.elapsed().as_secs(),
        "broker": state.broker.kind(),
        "replicas": [{
            "id": &*state.replica_id,
            "active_clients": clients,
            "last_seen_ms": unix_ms(),
        }],
    }))
}
