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

use crate::cors::Route;
use crate::error::ApiError;
use crate::server::{MAX_URI_BYTES, STREAM_PATH};
use crate::state::AppState;

/// The application's routes and layers.
pub(crate) fn router(state: AppState) -> Router {
    let body_limit = usize::try_from(state.config.max_event_bytes).unwrap_or(usize::MAX);
    let api = Router::new()
        .route(STREAM_PATH, get(crate::stream::stream_events))
        .route("/api/events", post(publish::publish_event))
        .route("/api/events/stats", get(stats::get_stats));
    // With an admin address, probes and scrapes are served there only.
    let routes = if state.config.admin_listen.is_some() {
        api
    } else {
        api.merge(probe_routes())
    };
    routes
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(state.clone(), cors))
        .layer(axum::middleware::from_fn(refuse_long_uri))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(TraceLayer::new_for_http())
        .layer(CatchPanicLayer::new())
        .with_state(state)
}

/// The routes of `--admin-listen`: health, readiness and metrics, nothing else.
pub(crate) fn admin_router(state: AppState) -> Router {
    probe_routes()
        .fallback(not_found)
        .layer(CatchPanicLayer::new())
        .with_state(state)
}

fn probe_routes() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(health::get_healthz))
        .route("/readyz", get(health::get_readyz))
        .route("/metrics", get(health::get_metrics))
}

async fn not_found() -> ApiError {
    ApiError::NotFound
}

/// `414` for a request target longer than a fresh connection accepts, so a keep-alive
/// connection (which hyper reads) answers the same.
async fn refuse_long_uri(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let target = request
        .uri()
        .path_and_query()
        .map_or(0, |target| target.as_str().len());
    if target > MAX_URI_BYTES {
        return ApiError::UriTooLong {
            limit: MAX_URI_BYTES,
        }
        .into_response();
    }
    next.run(request).await
}

/// CORS for `POST /api/events` and preflights of it and of the stream; the stream's own
/// headers come from the stream contract, on both writers.
async fn cors(
    axum::extract::State(state): axum::extract::State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
    use axum::response::IntoResponse;

    let route = match request.uri().path() {
        "/api/events" => Route::Publish,
        STREAM_PATH => Route::Stream,
        _ => return next.run(request).await,
    };
    let origin = request
        .headers()
        .get(header::ORIGIN)
        .map(|o| o.as_bytes().to_vec());
    let (headers, response) = if request.method() == Method::OPTIONS {
        match state.cors.preflight(origin.as_deref()) {
            Some(headers) => (headers, StatusCode::NO_CONTENT.into_response()),
            None => return next.run(request).await,
        }
    } else if route == Route::Publish {
        let headers = state.cors.headers(origin.as_deref(), Route::Publish);
        (headers, next.run(request).await)
    } else {
        return next.run(request).await;
    };
    let mut response = response;
    for (name, value) in headers {
        if let Ok(value) = HeaderValue::try_from(value) {
            response
                .headers_mut()
                .append(HeaderName::from_static(name), value);
        }
    }
    response
}
