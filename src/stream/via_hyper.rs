//! `GET /api/events/stream` for requests that arrive on a connection hyper already serves
//! (a keep-alive connection reused by a browser or a proxy). Fresh connections are served
//! on the raw socket instead; both follow `contract.rs` and use the same [`Session`].

use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Uri, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt as _;
use tokio_util::sync::CancellationToken;

use super::contract;
use super::{Session, StreamParams};
use crate::auth::Credentials;
use crate::connections::Slot;
use crate::server::PeerAddr;
use crate::state::AppState;

/// Cancelling this drops the HTTP connection it belongs to. The hub cancels it when a
/// stream on that connection falls more than its queue behind: hyper then waits on a full
/// socket and stops polling the body, so the stream itself could not notice. The accept
/// loop makes one per connection and hands it to the request as an extension.
#[derive(Debug, Clone, Default)]
pub(crate) struct ConnectionKill(CancellationToken);

impl ConnectionKill {
    /// Resolves when a stream on this connection must end the connection.
    pub async fn killed(&self) {
        self.0.cancelled().await;
    }
}

/// Serves a stream through axum.
///
/// The connection's place under the cap on non-stream connections is given back, since
/// `--max-clients` now counts it, and the response says `Connection: close` so that the
/// connection cannot go back to carrying other requests without a place. Only the parsed
/// options outlive this function: the request's head and headers are dropped here, and
/// hyper's read buffer is bounded by `MAX_HEAD_BYTES` (see `server.rs`).
pub(crate) async fn stream_events(
    State(state): State<AppState>,
    uri: Uri,
    headers: HeaderMap,
    kill: Option<axum::Extension<ConnectionKill>>,
    slot: Option<axum::Extension<Slot>>,
    peer: Option<axum::Extension<PeerAddr>>,
) -> Response {
    let peer = peer.and_then(|axum::Extension(PeerAddr(ip))| ip);
    let last_event_id = headers.get("last-event-id").map(HeaderValue::as_bytes);
    let mut params = StreamParams::parse(uri.query(), last_event_id);
    params.forwarded_for = headers.get("x-forwarded-for").map(|v| v.as_bytes().into());
    params.credentials = Credentials::from_headers(&headers, uri.query());
    let admitted = match contract::admit(&state, peer, &mut params).await {
        Ok(admitted) => admitted,
        Err(refusal) => return refusal.into_response(),
    };
    let cors: Vec<_> =
        contract::header_map(&state, headers.get("origin").map(HeaderValue::as_bytes)).collect();
    drop((uri, headers));
    let kill = kill.map(|k| k.0.0.clone()).unwrap_or_default();
    let session = Session::open(&state, params, None, kill, admitted);
    if let Some(axum::Extension(slot)) = slot {
        slot.release();
    }
    let preamble = contract::preamble(state.config.retry_ms);
    let body = futures::stream::once(async move { Ok::<_, Infallible>(preamble) }).chain(
        futures::stream::unfold(Some((session, state)), |step| async move {
            let (mut session, state) = step?;
            let mut batch = Vec::new();
            match session.next_batch(&mut batch).await {
                Ok(events) => {
                    state.metrics.events_delivered.inc_by(events);
                    Some((Ok(concat(batch)), Some((session, state))))
                }
                Err(end) => {
                    // A client dropped as slow was already counted by the hub.
                    let hint = contract::farewell(end, state.config.retry_ms)?;
                    Some((Ok(hint), None))
                }
            }
        }),
    );
    let mut response = Body::from_stream(body).into_response();
    response.headers_mut().extend(cors);
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
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
