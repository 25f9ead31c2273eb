//! `POST /api/events`: validate a producer's event and hand it to the broker.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{FromRequest, Request, State};
use axum::http::StatusCode;
use serde_json::json;

use crate::auth::{Credentials, Denied};
use crate::error::ApiError;
use crate::event::MAX_IDEMPOTENCY_KEY_LEN;
use crate::publisher::{self, PublishError};
use crate::server::PeerAddr;
use crate::state::AppState;

/// Publishes `{"type": "...", "data": <any JSON>}`; answers `202 {"id": "..."}`. An
/// `Idempotency-Key` header makes retries safe.
///
/// The whole body must arrive within `--request-timeout-secs` of the head, or the answer
/// is `408` and the connection closes: a producer whose body stalls would otherwise hold
/// its connection, a file and hyper's buffers for as long as it likes.
pub(crate) async fn publish_event(
    State(state): State<AppState>,
    request: Request,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let limit = state.config.max_event_bytes;
    // The token is checked before the body is read: a refused publisher costs no body.
    let credentials = Credentials::from_headers(request.headers(), None);
    let grant = state.auth.publisher(&credentials).await.map_err(|denied| {
        state.metrics.auth_refusals.inc();
        ApiError::Denied(denied)
    })?;
    drop(credentials);
    if let Some(rate) = &state.publish_rate {
        let publisher = match grant.as_ref().and_then(|g| g.subject.as_deref()) {
            Some(subject) => format!("sub:{subject}"),
            None => format!("ip:{}", client_address(&state, &request)),
        };
        rate.take(&publisher).map_err(|retry_after| {
            state.metrics.rate_limited.inc();
            ApiError::RateLimited { retry_after }
        })?;
    }
    let key_header = request.headers().get("idempotency-key").cloned();
    let deadline = state.config.request_timeout();
    let body = tokio::time::timeout(deadline, Bytes::from_request(request, &state))
        .await
        .map_err(|_| ApiError::RequestTimeout {
            secs: deadline.as_secs(),
        })?;
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge { limit }
        } else {
            ApiError::BadRequest(format!("cannot read body: {rejection}"))
        }
    })?;
    let request = publisher::parse_request(&body).map_err(ApiError::BadRequest)?;
    if let Some(grant) = &grant
        && !grant.publish.wants(&request.event_type)
    {
        state.metrics.auth_refusals.inc();
        return Err(ApiError::Denied(Denied::Forbidden(
            "this token does not grant publishing this event type",
        )));
    }
    let idempotency_key = match &key_header {
        None => None,
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .filter(|key| !key.is_empty() && key.len() <= MAX_IDEMPOTENCY_KEY_LEN)
                .ok_or_else(|| {
                    ApiError::BadRequest(
                        format!("`Idempotency-Key` must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} visible ASCII characters"),
                    )
                })?,
        ),
    };
    let id = publisher::publish_validated(
        &state.broker,
        &request.event_type,
        request.data,
        limit,
        idempotency_key,
    )
    .await
    .map_err(|error: PublishError| {
        state.metrics.publish_errors.inc();
        ApiError::from(error)
    })?;
    Ok((StatusCode::ACCEPTED, Json(json!({ "id": id.to_string() }))))
}

/// The publisher's address for `--publish-rate`: the peer, or the client a trusted proxy
/// names in `X-Forwarded-For`.
fn client_address(state: &AppState, request: &Request) -> String {
    let peer = request
        .extensions()
        .get::<PeerAddr>()
        .and_then(|PeerAddr(ip)| *ip);
    match peer {
        Some(peer) => {
            let forwarded = request
                .headers()
                .get("x-forwarded-for")
                .map(|v| v.as_bytes());
            crate::address::client_address(peer, forwarded, &state.trusted_proxies).to_string()
        }
        None => "unknown".to_owned(),
    }
}
