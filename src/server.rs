//! The accept loop. Each connection's request head is read first: a `GET` of the event
//! stream is served on the raw socket (see `stream/raw.rs`), everything else is handed,
//! untouched, to hyper and the axum router.
//!
//! What one client can hold is bounded here, the same way on both paths:
//! - a request head is at most [`MAX_HEAD_BYTES`]; a longer one gets `431` (with the JSON
//!   error body on a fresh connection, hyper's bare `431` on a reused one), so no stream
//!   keeps a large head's buffer for its life;
//! - a head must arrive within `--request-timeout-secs` of the connection opening or of
//!   its previous response (hyper's header timer also runs while a keep-alive connection
//!   is idle, so this is the idle timeout too); a request body gets the same deadline
//!   (`http/publish.rs`).

use std::io;
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use bytes::Bytes;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::error::raw_error_response;
use crate::state::AppState;
use crate::stream::{ConnectionKill, StreamParams, serve_raw};
use crate::telemetry::RateLimit;

/// The path served on the raw socket.
pub(crate) const STREAM_PATH: &str = "/api/events/stream";

/// Longest request head accepted, on either path. Browsers send well under 8 KiB; 16 KiB
/// leaves room for large cookies. It is also hyper's `max_buf_size`, which bounds the read
/// buffer hyper keeps for a connection's life (its default, ~400 KiB, let one stream with
/// a 300 KB head keep ~311 KB).
pub(crate) const MAX_HEAD_BYTES: usize = 16 * 1024;

/// First size of the sniffing buffer.
const SNIFF_START: usize = 1024;

/// Pause after a failed accept (typically out of file descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// How often an incomplete request head is looked at again.
const PEEK_INTERVAL: Duration = Duration::from_millis(5);

/// How long a refusal written on the raw socket may take, including reading what the
/// client still sends so that it gets the answer rather than a reset.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(1);

/// Most bytes read and discarded after a refusal before the connection is dropped anyway.
const REFUSAL_DRAIN_BYTES: usize = 1 << 20;

/// Accepts connections until the gateway shuts down. Every connection task is tracked.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    state: AppState,
    router: Router,
    tracker: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            _ = state.shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((socket, _)) => {
                tracker.spawn(handle_connection(
                    socket,
                    state.clone(),
                    router.clone(),
                    tracker.clone(),
                ));
            }
            Err(error) => {
                tracing::warn!(%error, "accept failed; backing off");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// The answer to a request head longer than [`MAX_HEAD_BYTES`].
fn head_too_large() -> Bytes {
    raw_error_response(
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        "headers_too_large",
        &format!("the request head exceeds {MAX_HEAD_BYTES} bytes"),
        None,
    )
}

/// What the first bytes of a connection say.
enum Sniffed {
    /// A stream request; `head` is as long as its request head and can take it.
    Stream { head: Vec<u8>, params: StreamParams },
    /// Anything else: hyper serves it.
    Http,
    /// The head is longer than [`MAX_HEAD_BYTES`].
    TooLarge,
    /// The client left or sent nothing in time.
    Gone,
}

/// Serves one connection. A stream moves to a task of its own, sized for the stream alone,
/// so an idle client's memory is that task and nothing left over from the sniffing.
async fn handle_connection(
    mut socket: TcpStream,
    state: AppState,
    router: Router,
    tracker: TaskTracker,
) {
    let _ = socket.set_nodelay(true);
    match sniff(&socket, state.config.request_timeout()).await {
        Sniffed::Stream { mut head, params } => {
            if socket.read_exact(&mut head).await.is_ok() {
                drop(head);
                tracker.spawn(serve_raw(socket, params, state));
            }
        }
        Sniffed::Http => Box::pin(serve_http(socket, state, router)).await,
        Sniffed::TooLarge => Box::pin(answer_and_close(socket, head_too_large())).await,
        Sniffed::Gone => {}
    }
}

/// Peeks at the request head without consuming it, in a buffer that starts small (most
/// heads fit in 1 KB) and doubles up to [`MAX_HEAD_BYTES`].
async fn sniff(socket: &TcpStream, timeout: Duration) -> Sniffed {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = vec![0u8; SNIFF_START];
    loop {
        let peeked = match tokio::time::timeout_at(deadline, socket.peek(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return Sniffed::Gone,
            Ok(Ok(n)) => n,
        };
        match classify(&buf[..peeked]) {
            Some(Classified::Stream { head_len, params }) => {
                buf.truncate(head_len);
                return Sniffed::Stream { head: buf, params };
            }
            Some(Classified::Http) => return Sniffed::Http,
            None if peeked == buf.len() && buf.len() >= MAX_HEAD_BYTES => {
                return Sniffed::TooLarge;
            }
            None if peeked == buf.len() => buf.resize((buf.len() * 2).min(MAX_HEAD_BYTES), 0),
            None => {
                if tokio::time::Instant::now() >= deadline {
                    return Sniffed::Gone;
                }
                tokio::time::sleep(PEEK_INTERVAL).await;
            }
        }
    }
}

/// How a complete request head is served.
enum Classified {
    /// A stream request whose head is `head_len` bytes long.
    Stream {
        head_len: usize,
        params: StreamParams,
    },
    /// Anything else.
    Http,
}

/// Decides from a (possibly partial) head; `None` means more bytes are needed.
fn classify(head: &[u8]) -> Option<Classified> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut headers);
    let head_len = match request.parse(head) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return None,
        Err(_) => return Some(Classified::Http),
    };
    let (path, query) = match request.path?.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (request.path?, None),
    };
    if request.method != Some("GET") || path != STREAM_PATH {
        return Some(Classified::Http);
    }
    let last_event_id = request
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("last-event-id"))
        .map(|h| h.value);
    Some(Classified::Stream {
        head_len,
        params: StreamParams::parse(query, last_event_id),
    })
}

/// Writes `answer` and closes the connection, reading (and discarding) what the client
/// still sends for a moment, so that it sees the answer rather than a connection reset.
async fn answer_and_close(mut socket: TcpStream, answer: Bytes) {
    let exchange = async {
        socket.write_all(&answer).await?;
        socket.shutdown().await?;
        let mut scratch = vec![0u8; 4096];
        let mut drained = 0;
        while drained < REFUSAL_DRAIN_BYTES {
            match socket.read(&mut scratch).await? {
                0 => break,
                n => drained += n,
            }
        }
        io::Result::Ok(())
    };
    let _ = tokio::time::timeout(REFUSAL_TIMEOUT, exchange).await;
}

/// Serves a connection with hyper (HTTP/1.1, keep-alive) and the axum router.
async fn serve_http(socket: TcpStream, state: AppState, router: Router) {
    let kill = ConnectionKill::default();
    let kicked = kill.clone();
    let service = router.map_request(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(kill.clone());
        request
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        // In hyper 1.12 this timer runs from the connection's start and again from each
        // response's end, so it is the idle timeout of a keep-alive connection as well.
        .header_read_timeout(state.config.request_timeout())
        .max_buf_size(MAX_HEAD_BYTES)
        .serve_connection(TokioIo::new(socket), TowerToHyperService::new(service));
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => log_connection_error(result),
        _ = kicked.killed() => {}
        _ = state.shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            if let Ok(result) = tokio::time::timeout(state.config.drain(), connection).await {
                log_connection_error(result);
            }
        }
    }
}

fn log_connection_error(result: Result<(), hyper::Error>) {
    if let Err(error) = result
        && !error.is_incomplete_message()
        && !is_disconnect(&error)
    {
        // Clients decide how their connections end: at most one line a second.
        static LOG: RateLimit = RateLimit::per_second();
        if let Some(suppressed) = LOG.allow() {
            tracing::debug!(%error, suppressed, "http connection ended with an error");
        }
    }
}

fn is_disconnect(error: &hyper::Error) -> bool {
    std::error::Error::source(error)
        .and_then(|source| source.downcast_ref::<io::Error>())
        .is_some_and(|io| {
            matches!(
                io.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventId;

    #[test]
    fn stream_requests_are_recognised_with_their_options() {
        let head =
            b"GET /api/events/stream?types=a HTTP/1.1\r\nHost: x\r\nlast-event-id: 3-4\r\n\r\n";
        match classify(head) {
            Some(Classified::Stream { head_len, params }) => {
                assert_eq!(head_len, head.len());
                assert_eq!(params.last_event_id, Some(EventId::new(3, 4)));
                assert!(params.types.wants("a") && !params.types.wants("b"));
            }
            _ => panic!("not recognised as a stream"),
        }
    }

    #[test]
    fn other_requests_and_garbage_go_to_hyper() {
        for head in [
            &b"POST /api/events/stream HTTP/1.1\r\n\r\n"[..],
            b"GET /api/events/stats HTTP/1.1\r\n\r\n",
            b"GET /api/events/streamx HTTP/1.1\r\n\r\n",
            b"\x16\x03\x01 garbage\r\n\r\n",
        ] {
            assert!(matches!(classify(head), Some(Classified::Http)), "{head:?}");
        }
    }

    #[test]
    fn partial_heads_ask_for_more() {
        assert!(classify(b"GET /api/events/str").is_none());
        assert!(classify(b"GET /api/events/stream HTTP/1.1\r\nHost: x\r\n").is_none());
    }
}
