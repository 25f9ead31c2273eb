//! The HTTP API served through axum: publishing, stats, health, metrics, and streams that
//! arrive on keep-alive connections. `router` builds it without binding, so tests can
//! drive it with `oneshot`.

mod health;
mod publish;
mod stats;
#[cfg(test)]
mod tests;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::TraceLayer;

use crate::error::ApiError;
use crate::server::STREAM_PATH;
use crate::state::AppState;

/// The application's routes and layers.
pub(crate) fn router(state: AppState) -> Router {
    let body_limit = usize::try_from(state.config.max_event_bytes).unwrap_or(usize::MAX);
    Router::new()
        .route(STREAM_PATH, get(crate::stream::stream_events))
        .route("/api/events", post(publish::publish_event))
        .route("/api/events/stats", get(stats::get_stats))
        .route("/healthz", get(health::get_healthz))
        .route("/readyz", get(health::get_readyz))
        .route("/metrics", get(health::get_metrics))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(TraceLayer::new_for_http())
        .layer(CatchPanicLayer::new())
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::NotFound
}
