//! The response contract of `GET /api/events/stream`, shared by both writers: who may open
//! a stream now, the headers a stream is answered with, the refusal when it may not open,
//! and the last bytes a stream gets when it ends.
//!
//! The raw-socket writer (`raw.rs`) renders these as bytes, the hyper writer
//! (`via_hyper.rs`) as an axum response; neither carries a header, status or hint of its
//! own, so a policy change here reaches both, and `tests.rs` runs the same checks on a
//! fresh connection (raw) and on a reused keep-alive one (hyper).

use std::fmt::Write as _;

use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

use std::net::IpAddr;
use std::time::SystemTime;

use super::StreamParams;
use crate::address::{self, AddressSlot};
use crate::auth::Denied;
use crate::cors::{CorsPolicy, Headers, Route};
use crate::error::{error_body, raw_error_response_with};
use crate::hub::End;
use crate::sse;
use crate::state::AppState;

/// Headers of every stream response, whichever writer serves it; the CORS headers
/// (`crate::cors`) come on top.
pub(crate) const HEADERS: [(&str, &str); 3] = [
    ("content-type", "text/event-stream"),
    ("cache-control", "no-cache, no-transform"),
    ("x-accel-buffering", "no"),
];

/// Longest `retry:` hint sent when the broker could not be read or the client's token
/// expired, so clients come back soon rather than after the full reconnect delay.
const BROKER_RETRY_CAP_MS: u64 = 1000;

/// Why a stream request is turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The replica is draining or already serves its most clients: try another one.
    Unavailable,
    /// The client's address already has `--max-clients-per-ip` streams open.
    TooManyFromAddress,
    /// No token where one is needed, a bad one (`401`), or one that does not grant the
    /// types asked for (`403`).
    Denied(Denied),
}

impl Refusal {
    fn status_code_message(self) -> (StatusCode, &'static str, &'static str) {
        match self {
            Self::Unavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "this replica cannot take more streams now",
            ),
            Self::TooManyFromAddress => (
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_streams",
                "this address has as many streams open as it may",
            ),
            Self::Denied(denied) => denied.status_code_message(),
        }
    }

    /// Headers on top of the JSON error: when to come back, or how to authenticate.
    fn headers(self) -> Vec<(&'static str, String)> {
        match self {
            Self::Unavailable => vec![("retry-after", "1".to_owned())],
            Self::TooManyFromAddress => vec![("retry-after", "5".to_owned())],
            Self::Denied(denied) => denied
                .www_authenticate()
                .map(|challenge| ("www-authenticate", challenge.to_owned()))
                .into_iter()
                .collect(),
        }
    }

    /// The refusal as a complete HTTP/1.1 response that closes the connection.
    pub fn to_raw(self) -> Bytes {
        let (status, code, message) = self.status_code_message();
        raw_error_response_with(status, code, message, &self.headers())
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let (status, code, message) = self.status_code_message();
        let mut response = (
            status,
            [(
                axum::http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            error_body(code, message),
        )
            .into_response();
        for (name, value) in self.headers() {
            if let Ok(value) = HeaderValue::try_from(value) {
                response
                    .headers_mut()
                    .insert(HeaderName::from_static(name), value);
            }
        }
        response
    }
}

/// What an admitted stream holds: its place under `--max-clients-per-ip` for as long as
/// it lives, and when its grant ends.
#[derive(Debug)]
pub(crate) struct Admitted {
    /// The place under `--max-clients-per-ip`.
    pub address: Option<AddressSlot>,
    /// When the stream must end (its token's expiry).
    pub expires: Option<SystemTime>,
}

/// Decides whether a new stream from `peer` may open now: capacity, then its token and
/// the types it asks for (`params.types` becomes what it will be served), then the
/// streams its address holds (a proxy's `X-Forwarded-For` counting when the proxy is
/// trusted). Credentials and the forwarded address are taken out of `params` and dropped
/// here, so a stream does not keep them.
pub(crate) async fn admit(
    state: &AppState,
    peer: Option<IpAddr>,
    params: &mut StreamParams,
) -> Result<Admitted, Refusal> {
    if state.is_draining() || state.hub.client_count() >= state.max_clients {
        return Err(Refusal::Unavailable);
    }
    let credentials = std::mem::take(&mut params.credentials);
    let forwarded_for = params.forwarded_for.take();
    let grant = state
        .auth
        .subscriber(&credentials, &params.types)
        .await
        .map_err(|denied| {
            state.metrics.auth_refusals.inc();
            Refusal::Denied(denied)
        })?;
    params.types = grant.types;
    let address = match peer {
        None => None,
        Some(peer) => {
            let client =
                address::client_address(peer, forwarded_for.as_deref(), &state.trusted_proxies);
            state
                .per_address
                .take(client)
                .map_err(|()| Refusal::TooManyFromAddress)?
        }
    };
    Ok(Admitted {
        address,
        expires: grant.expires,
    })
}

/// The first bytes of every stream body: the reconnect delay.
pub(crate) fn preamble(retry_ms: u64) -> Bytes {
    sse::retry(retry_ms)
}

/// The response head and first body bytes of a stream written on the raw socket: the
/// body ends when the connection closes.
pub(crate) fn raw_preamble(retry_ms: u64, cors: &Headers) -> Bytes {
    let mut head = String::from("HTTP/1.1 200 OK\r\n");
    for (name, value) in HEADERS {
        let _ = write!(head, "{name}: {value}\r\n");
    }
    for (name, value) in cors {
        let _ = write!(head, "{name}: {value}\r\n");
    }
    head.push_str("connection: close\r\n\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(&preamble(retry_ms));
    Bytes::from(bytes)
}

/// The raw preamble of a stream from `origin`: the one made at start-up when the CORS
/// headers do not depend on the origin, else one made for this request.
pub(crate) fn raw_preamble_for(state: &AppState, origin: Option<&[u8]>) -> Bytes {
    match &state.cors {
        CorsPolicy::Listed(_) => raw_preamble(
            state.config.retry_ms,
            &state.cors.headers(origin, Route::Stream),
        ),
        CorsPolicy::StreamOnly | CorsPolicy::AnyOrigin => state.stream_preamble.clone(),
    }
}

/// The headers of [`HEADERS`] and the CORS headers for `origin`, for a hyper response.
pub(crate) fn header_map(
    state: &AppState,
    origin: Option<&[u8]>,
) -> impl Iterator<Item = (HeaderName, HeaderValue)> {
    let fixed = HEADERS.into_iter().map(|(name, value)| {
        (
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        )
    });
    let cors = state
        .cors
        .headers(origin, Route::Stream)
        .into_iter()
        .filter_map(|(name, value)| {
            Some((
                HeaderName::from_static(name),
                HeaderValue::try_from(value).ok()?,
            ))
        });
    fixed.chain(cors)
}

/// The last bytes a stream gets when it ends for `end`: a `retry:` hint when the client
/// should come back (spread out at shutdown, short when the broker failed), nothing when
/// it left or was dropped for falling behind.
pub(crate) fn farewell(end: End, retry_ms: u64) -> Option<Bytes> {
    match end {
        End::Shutdown => Some(sse::retry(spread_retry(retry_ms))),
        // Both come back at once: to a working Redis, or with a fresh token.
        End::BrokerUnavailable | End::Expired => {
            Some(sse::retry(retry_ms.min(BROKER_RETRY_CAP_MS)))
        }
        End::Slow | End::ClientGone => None,
    }
}

/// A reconnect delay drawn from 10–100 % of the configured one, so the clients of a
/// draining replica do not all reconnect to the survivors in the same instant.
pub(crate) fn spread_retry(retry_ms: u64) -> u64 {
    use rand::Rng;
    let low = retry_ms / 10;
    rand::rng().random_range(low..=retry_ms.max(low))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_preamble_declares_an_event_stream_and_the_retry_hint() {
        let cors = vec![("access-control-allow-origin", "*".to_owned())];
        let head = raw_preamble(5000, &cors);
        let text = std::str::from_utf8(&head).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"));
        for (name, value) in HEADERS {
            assert!(text.contains(&format!("{name}: {value}\r\n")), "{name}");
        }
        assert!(text.contains("access-control-allow-origin: *\r\n"));
        assert!(text.ends_with("\r\n\r\nretry: 5000\n\n"));
    }

    #[test]
    fn a_raw_refusal_has_a_correct_length_and_a_json_body() {
        let raw = Refusal::Unavailable.to_raw();
        let text = std::str::from_utf8(&raw).unwrap();
        assert!(text.starts_with("HTTP/1.1 503 Service Unavailable\r\n"));
        assert!(text.contains("retry-after: 1\r\n"));
        let (_, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(text.contains(&format!("content-length: {}\r\n", body.len())));
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"], "unavailable");
    }

    #[test]
    fn farewells_follow_the_reason() {
        assert_eq!(
            farewell(End::BrokerUnavailable, 5000).unwrap(),
            "retry: 1000\n\n"
        );
        assert_eq!(
            farewell(End::BrokerUnavailable, 300).unwrap(),
            "retry: 300\n\n"
        );
        assert_eq!(farewell(End::Expired, 5000).unwrap(), "retry: 1000\n\n");
        assert!(farewell(End::Shutdown, 5000).is_some());
        assert!(farewell(End::Slow, 5000).is_none());
        assert!(farewell(End::ClientGone, 5000).is_none());
    }

    #[test]
    fn spread_retry_stays_within_ten_to_hundred_percent() {
        for _ in 0..1000 {
            let r = spread_retry(5000);
            assert!((500..=5000).contains(&r));
        }
        assert_eq!(spread_retry(0), 0);
    }
}
