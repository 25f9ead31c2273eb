//! `GET /api/events/stream` for requests that arrive on a connection hyper already serves
//! (a keep-alive connection reused by a browser or a proxy). Fresh connections are
//! served on the raw socket instead; both use the same [`Session`].

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Uri, header};
use axum::response::{IntoResponse, Response};
use tokio_util::sync::CancellationToken;

use crate::error::ApiError;
use crate::sse;
use crate::state::AppState;
use crate::stream::{End, Session, StreamParams};

/// Cancelling this token drops the HTTP connection it belongs to. The hub cancels it when
/// a stream on that connection falls more than its queue behind, which happens when hyper
/// waits on a full socket and stops polling the body (so the stream could not notice).
#[derive(Debug, Clone, Default)]
pub struct ConnectionKill(pub CancellationToken);

/// Serves a stream through axum.
pub async fn stream_events(
    State(state): State<AppState>,
    uri: Uri,
    headers: HeaderMap,
    kill: Option<axum::Extension<ConnectionKill>>,
) -> Result<Response, ApiError> {
    if state.is_draining() || state.hub.client_count() >= state.max_clients {
        return Err(ApiError::Overloaded);
    }
    let last_event_id = headers.get("last-event-id").map(HeaderValue::as_bytes);
    let params = StreamParams::parse(uri.query(), last_event_id);
    let kill = kill.map(|k| k.0.0.clone()).unwrap_or_default();
    let session = Session::open(&state, params, None, kill);
    let preamble = sse::retry(state.config.retry_ms);
    let body =
        futures::stream::once(async move { Ok::<_, std::convert::Infallible>(preamble) }).chain(
            futures::stream::unfold(Some((session, state)), |step| async move {
                let (mut session, state) = step?;
                let mut batch = Vec::new();
                match session.next_batch(&mut batch).await {
                    Ok(events) => {
                        state.metrics.events_delivered.inc_by(events);
                        Some((Ok(concat(batch)), Some((session, state))))
                    }
                    Err(End::Shutdown) => {
                        let hint = sse::retry(crate::stream::spread_retry(state.config.retry_ms));
                        Some((Ok(hint), None))
                    }
                    // A client dropped as slow was already counted by the hub.
                    Err(End::Slow | End::BrokerUnavailable | End::ClientGone) => None,
                }
            }),
        );
    let response = (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache, no-transform"),
            (header::HeaderName::from_static("x-accel-buffering"), "no"),
            (header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"),
        ],
        Body::from_stream(body),
    );
    Ok(response.into_response())
}

fn concat(batch: Vec<Bytes>) -> Bytes {
    if batch.len() == 1 {
        return batch.into_iter().next().unwrap_or_default();
    }
    let mut out = Vec::with_capacity(batch.iter().map(Bytes::len).sum());
    for frame in &batch {
        out.extend_from_slice(frame);
    }
    Bytes::from(out)
}

use futures::StreamExt as _;
