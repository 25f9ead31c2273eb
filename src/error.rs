//! The one error type HTTP handlers return: a status and a stable JSON body. Causes are
//! logged here and never sent to clients.

use std::fmt::Write as _;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::json;

use crate::broker;
use crate::publisher::PublishError;
use crate::telemetry::RateLimit;

/// An API failure as the client sees it.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    /// The request is malformed; the message says how.
    #[error("{0}")]
    BadRequest(String),
    /// The body is larger than `--max-event-bytes`.
    #[error("body exceeds {limit} bytes")]
    TooLarge {
        /// The configured limit.
        limit: u64,
    },
    /// The request body did not arrive within `--request-timeout-secs`.
    #[error("the request body did not arrive within {secs} s")]
    RequestTimeout {
        /// The configured deadline.
        secs: u64,
    },
    /// No route matches the path.
    #[error("no such endpoint")]
    NotFound,
    /// The request target is longer than the gateway reads.
    #[error("the request target exceeds {limit} bytes")]
    UriTooLong {
        /// The limit.
        limit: usize,
    },
    /// The broker cannot take the request now.
    #[error("broker unavailable")]
    Unavailable(#[source] crate::broker::Error),
    /// Stored, but not confirmed by enough replicas; the message says so and gives the id.
    #[error("{0}")]
    NotReplicated(String),
    /// No token, a bad one, or one that does not grant this.
    #[error("{}", .0.status_code_message().2)]
    Denied(crate::auth::Denied),
    /// The publisher is over `--publish-rate`.
    #[error("this publisher is over its rate of events per second; retry later")]
    RateLimited {
        /// Seconds until it may publish again.
        retry_after: u32,
    },
}

impl ApiError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Self::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            Self::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            Self::RequestTimeout { .. } => (StatusCode::REQUEST_TIMEOUT, "request_timeout"),
            Self::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            Self::UriTooLong { .. } => (StatusCode::URI_TOO_LONG, "uri_too_long"),
            Self::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            Self::NotReplicated(_) => (StatusCode::SERVICE_UNAVAILABLE, "not_replicated"),
            Self::Denied(denied) => {
                let (status, code, _) = denied.status_code_message();
                (status, code)
            }
            Self::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let message = match &self {
            Self::Unavailable(cause) => {
                // Operators need to know, but one line per failed request is a flood
                // when Redis is down under load.
                static LOG: RateLimit = RateLimit::per_second();
                if let Some(suppressed) = LOG.allow() {
                    tracing::warn!(%cause, suppressed, "request failed: broker unavailable");
                }
                "the event store is unavailable; retry later".to_owned()
            }
            other => other.to_string(),
        };
        let mut response = (
            status,
            [(header::CONTENT_TYPE, "application/json")],
            error_body(code, &message),
        )
            .into_response();
        match &self {
            Self::Denied(denied) => {
                if let Some(challenge) = denied.www_authenticate() {
                    response.headers_mut().insert(
                        header::WWW_AUTHENTICATE,
                        HeaderValue::from_static(challenge),
                    );
                }
            }
            Self::RateLimited { retry_after } => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(*retry_after));
            }
            _ => {}
        }
        if matches!(self, Self::TooLarge { .. } | Self::RequestTimeout { .. }) {
            // The rest of the body is not read, so the connection cannot carry another
            // request; say so rather than let the client find out on its next one (hyper
            // closes the connection once this answer is written).
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

/// A refused publish as the client sees it: `503` means only "not stored, retry"; an
/// event the broker refused as invalid is the producer's mistake, `400` like any other.
impl From<PublishError> for ApiError {
    fn from(error: PublishError) -> Self {
        match error {
            PublishError::Broker(broker::Error::Invalid(why)) => Self::BadRequest(why),
            PublishError::Broker(cause @ broker::Error::NotReplicated { .. }) => {
                Self::NotReplicated(cause.to_string())
            }
            PublishError::Broker(cause) => Self::Unavailable(cause),
            PublishError::TooLarge { limit } => Self::TooLarge { limit },
            other => Self::BadRequest(other.to_string()),
        }
    }
}

/// The JSON body of every error answer: `{"error": <code>, "message": <text>}`.
pub(crate) fn error_body(code: &str, message: &str) -> String {
    json!({ "error": code, "message": message }).to_string()
}

/// A complete HTTP/1.1 error answer with the JSON body of [`error_body`] that closes the
/// connection, for the places that answer on the raw socket, before or instead of hyper.
pub(crate) fn raw_error_response(
    status: StatusCode,
    code: &str,
    message: &str,
    retry_after: Option<u32>,
) -> Bytes {
    let retry = retry_after.map(|seconds| ("retry-after", seconds.to_string()));
    raw_error_response_with(status, code, message, retry.as_slice())
}

/// [`raw_error_response`] with other headers on top (`WWW-Authenticate`, ...).
pub(crate) fn raw_error_response_with(
    status: StatusCode,
    code: &str,
    message: &str,
    headers: &[(&str, String)],
) -> Bytes {
    let body = error_body(code, message);
    let mut head = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    for (name, value) in headers {
        let _ = write!(head, "{name}: {value}\r\n");
    }
    let _ = write!(
        head,
        "connection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    Bytes::from(head)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::InvalidEventData;

    #[test]
    fn only_a_broker_that_did_not_store_answers_503() {
        let status = |error: PublishError| ApiError::from(error).status_and_code();
        let bad_event = redis::RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError),
            "ERR",
            "invalid event: data is not valid JSON".to_owned(),
        ));
        let invalid = broker::redis::classify(bad_event);
        assert!(matches!(&invalid, broker::Error::Invalid(why) if why == "data is not valid JSON"));
        assert_eq!(
            status(PublishError::Broker(invalid)),
            (StatusCode::BAD_REQUEST, "bad_request")
        );
        assert_eq!(
            status(PublishError::InvalidData(InvalidEventData::TooDeep)),
            (StatusCode::BAD_REQUEST, "bad_request")
        );
        assert_eq!(
            status(PublishError::TooLarge { limit: 1 }),
            (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
        );
        // Other replies keep their meaning: an unknown extension code, a plain `ERR` and a
        // lost connection are not the producer's fault.
        let other = redis::make_extension_error("OTHER".to_owned(), Some("x".to_owned()));
        let err = redis::RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError),
            "ERR",
            "boom".to_owned(),
        ));
        let gone =
            redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        for cause in [other, err, gone] {
            let classified = broker::redis::classify(cause);
            assert!(
                !matches!(classified, broker::Error::Invalid(_)),
                "{classified:?}"
            );
            assert_eq!(
                status(PublishError::Broker(classified)),
                (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
            );
        }
    }
}
