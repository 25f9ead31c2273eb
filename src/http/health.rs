//! Liveness, readiness and the Prometheus page.

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde_json::json;

use crate::state::AppState;

/// `GET /healthz`: the process is alive and serving HTTP.
pub(crate) async fn get_healthz() -> impl IntoResponse {
    Json(json!({ "status": "ok" }))
}

/// `GET /readyz`: 200 while this replica should get traffic; 503 while draining or while
/// its broker is unavailable.
pub(crate) async fn get_readyz(State(state): State<AppState>) -> impl IntoResponse {
    let draining = state.is_draining();
    let broker_ready = state.broker.is_ready();
    let ready = state.is_ready();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "ready": ready,
        "draining": draining,
        "broker": state.broker.kind(),
        "broker_ready": broker_ready,
    });
    (status, Json(body))
}

/// `GET /metrics`: every counter in the OpenMetrics text format Prometheus scrapes.
pub(crate) async fn get_metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
}
