//! The accept loop. Every connection first takes a place (`connections.rs`: in the room
//! streams have left, else under the cap on connections that are not streams); then its
//! request head is read, on readiness, so a head that arrives slowly costs nothing while
//! it waits: a `GET` of the
//! event stream is served on the raw socket (see `stream/raw.rs`) and gives the place
//! back, everything else is handed, untouched, to hyper and the axum router.
//!
//! What one client can hold is bounded here, the same way on both paths:
//! - a request head is at most [`MAX_HEAD_BYTES`]; a longer one gets `431` (with the JSON
//!   error body on a fresh connection, hyper's bare `431` on a reused one), so no stream
//!   keeps a large head's buffer for its life;
//! - a head must arrive within `--request-timeout-secs` of the connection opening or of
//!   its previous response (hyper's header timer also runs while a keep-alive connection
//!   is idle, so this is the idle timeout too); a request body gets the same deadline
//!   (`http/publish.rs`);
//! - beyond `--max-other-connections`, a small reserve serves only `/healthz`, `/readyz`,
//!   `/metrics` and streams; other requests get a quick `503`, and with the reserve full
//!   too a connection is closed as soon as it is accepted.

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

use crate::connections::Slot;
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

/// Most header fields in a request head; more get `431` on both paths.
pub(crate) const MAX_HEADERS: usize = 64;

/// Longest request target (path and query); longer ones get `414` on both paths.
pub(crate) const MAX_URI_BYTES: usize = 8 * 1024;

/// First size of the sniffing buffer.
const SNIFF_START: usize = 1024;

/// How long a connection in the health reserve may take to send its head: probes send
/// theirs at once, and a stalled one must not hold the reserve.
const RESERVE_HEAD_TIMEOUT: Duration = Duration::from_secs(1);

/// Pause after a failed accept (typically out of file descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// How long a refusal written on the raw socket may take to write.
const REFUSAL_TIMEOUT: Duration = Duration::from_millis(200);

/// How long, after a refusal, what the client still sends is read and discarded, so that
/// it gets the answer rather than a connection reset.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// Most bytes read and discarded after a refusal before the connection is dropped anyway.
const REFUSAL_DRAIN_BYTES: usize = 1 << 20;

/// Paths a connection in the health reserve may ask for.
const PROBE_PATHS: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

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
            Ok((socket, _)) => match state
                .connections
                .take(state.max_clients.saturating_sub(state.hub.client_count()))
            {
                Some(slot) => {
                    tracker.spawn(handle_connection(
                        socket,
                        slot,
                        state.clone(),
                        router.clone(),
                        tracker.clone(),
                    ));
                }
                None => turn_away(socket, &state),
            },
            Err(error) => {
                tracing::warn!(%error, "accept failed; backing off");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// Closes a connection accepted with every place taken, after one non-blocking attempt
/// to say why. Its file is free again at once, so `accept` keeps working at the cap.
fn turn_away(socket: TcpStream, state: &AppState) {
    state.metrics.connections_refused.inc();
    let _ = socket.try_write(&busy());
}

/// The answer to a request that finds every connection place taken.
fn busy() -> Bytes {
    raw_error_response(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "this replica has too many open connections; retry later",
        Some(1),
    )
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

/// The answer to a head with more than [`MAX_HEADERS`] fields.
fn too_many_headers() -> Bytes {
    raw_error_response(
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        "headers_too_large",
        &format!("the request has more than {MAX_HEADERS} header fields"),
        None,
    )
}

/// The answer to a request target longer than [`MAX_URI_BYTES`].
fn uri_too_long() -> Bytes {
    raw_error_response(
        StatusCode::URI_TOO_LONG,
        "uri_too_long",
        &format!("the request target exceeds {MAX_URI_BYTES} bytes"),
        None,
    )
}

/// What the first bytes of a connection say.
enum Sniffed {
    /// A stream request, its head read.
    Stream { params: StreamParams },
    /// Anything else: hyper serves it, starting with the bytes already `read`. `probe` is
    /// set for a health or metrics request.
    Http { probe: bool, read: Bytes },
    /// The head breaks a limit; the answer says which.
    Refused(Bytes),
    /// The client left or sent nothing in time.
    Gone,
}

/// Serves one connection. A stream moves to a task of its own, sized for the stream alone,
/// so an idle client's memory is that task and nothing left over from the sniffing.
async fn handle_connection(
    socket: TcpStream,
    slot: Slot,
    state: AppState,
    router: Router,
    tracker: TaskTracker,
) {
    let _ = socket.set_nodelay(true);
    let mut head_timeout = state.config.request_timeout();
    if slot.is_reserve() {
        head_timeout = head_timeout.min(RESERVE_HEAD_TIMEOUT);
    }
    match sniff(&socket, head_timeout).await {
        Sniffed::Stream { params } => {
            // From here on the connection is a stream, capped by `--max-clients`.
            drop(slot);
            tracker.spawn(serve_raw(socket, params, state));
        }
        Sniffed::Http { probe, read } => {
            // Room left by streams is for streams (and probes): anything else needs a
            // general place, so other connections stay within their own cap. A probe
            // takes one too when there is one, to keep its connection alive; else it is
            // served once from the room it has.
            let slot = if slot.is_stream_room() {
                match state.connections.take_other() {
                    Some(general) => Some(general),
                    None if probe => Some(slot),
                    None => None,
                }
            } else {
                Some(slot)
            };
            match slot {
                Some(slot) if probe || !slot.is_reserve() => {
                    Box::pin(serve_http(socket, read, slot, state, router)).await;
                }
                _ => {
                    state.metrics.connections_refused.inc();
                    Box::pin(answer_and_close(socket, busy(), Duration::ZERO)).await;
                }
            }
        }
        Sniffed::Refused(answer) => {
            // A reserve place is not held while a client finishes sending a huge head.
            let linger = if slot.is_reserve() {
                Duration::ZERO
            } else {
                REFUSAL_LINGER
            };
            Box::pin(answer_and_close(socket, answer, linger)).await;
        }
        Sniffed::Gone => {}
    }
}

/// Reads the request head, in a buffer that starts small (most heads fit in 1 KB) and
/// doubles up to [`MAX_HEAD_BYTES`]. The task sleeps until the socket is readable, so a
/// client that sends its head a byte at a time, or never, costs one wake-up per segment
/// it sends and no CPU in between.
async fn sniff(socket: &TcpStream, timeout: Duration) -> Sniffed {
    // One timer for the whole head, not one per wake-up.
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let mut buf = vec![0u8; SNIFF_START];
    let mut filled = 0;
    loop {
        tokio::select! {
            biased;
            readable = socket.readable() => if readable.is_err() {
                return Sniffed::Gone;
            },
            () = &mut deadline => return Sniffed::Gone,
        }
        if filled == buf.len() {
            if buf.len() >= MAX_HEAD_BYTES {
                return Sniffed::Refused(head_too_large());
            }
            buf.resize((buf.len() * 2).min(MAX_HEAD_BYTES), 0);
        }
        match socket.try_read(&mut buf[filled..]) {
            Ok(0) => return Sniffed::Gone,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(_) => return Sniffed::Gone,
        }
        match classify(&buf[..filled]) {
            Some(Classified::Stream { params }) => return Sniffed::Stream { params },
            Some(Classified::Http { probe }) => {
                buf.truncate(filled);
                return Sniffed::Http {
                    probe,
                    read: Bytes::from(buf),
                };
            }
            Some(Classified::Refused(answer)) => return Sniffed::Refused(answer()),
            None if filled == buf.len() && buf.len() >= MAX_HEAD_BYTES => {
                return Sniffed::Refused(head_too_large());
            }
            None => {}
        }
    }
}

/// How a complete request head is served.
enum Classified {
    /// A stream request, with its options.
    Stream { params: StreamParams },
    /// Anything else; `probe` for a `GET` or `HEAD` of a health or metrics path.
    Http { probe: bool },
    /// A head that breaks a limit, with the answer it gets.
    Refused(fn() -> Bytes),
}

/// Decides from a (possibly partial) head; `None` means more bytes are needed.
fn classify(head: &[u8]) -> Option<Classified> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return None,
        Err(httparse::Error::TooManyHeaders) => return Some(Classified::Refused(too_many_headers)),
        Err(_) => return Some(Classified::Http { probe: false }),
    };
    if request.path?.len() > MAX_URI_BYTES {
        return Some(Classified::Refused(uri_too_long));
    }
    let (path, query) = match request.path?.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (request.path?, None),
    };
    if request.method != Some("GET") || path != STREAM_PATH {
        let probe = matches!(request.method, Some("GET" | "HEAD")) && PROBE_PATHS.contains(&path);
        return Some(Classified::Http { probe });
    }
    let header = |name: &str| {
        request
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    };
    let mut params = StreamParams::parse(query, header("last-event-id"));
    params.origin = header("origin").map(Box::from);
    params.forwarded_for = header("x-forwarded-for").map(Box::from);
    params.credentials.authorization = header("authorization").map(Box::from);
    params.credentials.cookie = header("cookie").map(Box::from);
    Some(Classified::Stream { params })
}

/// Writes `answer` and closes the connection. What the client has already sent is read
/// first, and what it still sends is read (and discarded) for up to `linger`, so that it
/// sees the answer rather than a connection reset.
async fn answer_and_close(mut socket: TcpStream, answer: Bytes, linger: Duration) {
    let mut scratch = vec![0u8; 4096];
    let mut drained = 0;
    while drained < REFUSAL_DRAIN_BYTES {
        match socket.try_read(&mut scratch) {
            Ok(n) if n > 0 => drained += n,
            _ => break,
        }
    }
    let answering = async {
        socket.write_all(&answer).await?;
        socket.shutdown().await
    };
    if !matches!(
        tokio::time::timeout(REFUSAL_TIMEOUT, answering).await,
        Ok(Ok(()))
    ) || linger.is_zero()
    {
        return;
    }
    let lingering = async {
        while drained < REFUSAL_DRAIN_BYTES {
            match socket.read(&mut scratch).await {
                Ok(n) if n > 0 => drained += n,
                _ => break,
            }
        }
    };
    let _ = tokio::time::timeout(linger, lingering).await;
}

/// The address a connection served by hyper comes from, for the stream's admission.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PeerAddr(pub Option<std::net::IpAddr>);

/// Serves a connection with hyper (HTTP/1.1, keep-alive) and the axum router. The
/// connection keeps `slot` until it closes, unless a stream on it gives it back; a
/// connection from the health reserve carries one request only.
async fn serve_http(socket: TcpStream, read: Bytes, slot: Slot, state: AppState, router: Router) {
    let kill = ConnectionKill::default();
    let kicked = kill.clone();
    let keep_alive = slot.is_general();
    let peer = PeerAddr(socket.peer_addr().ok().map(|addr| addr.ip()));
    let socket = Prefixed {
        prefix: read,
        socket,
    };
    let service = router.map_request(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(kill.clone());
        request.extensions_mut().insert(peer);
        request.extensions_mut().insert(slot.clone());
        request
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        // In hyper 1.12 this timer runs from the connection's start and again from each
        // response's end, so it is the idle timeout of a keep-alive connection as well.
        .header_read_timeout(state.config.request_timeout())
        .max_buf_size(MAX_HEAD_BYTES)
        .max_headers(MAX_HEADERS)
        .keep_alive(keep_alive)
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

/// A socket whose first bytes were already read (to classify the request): hyper reads
/// `prefix` first, then the socket.
struct Prefixed {
    prefix: Bytes,
    socket: TcpStream,
}

impl tokio::io::AsyncRead for Prefixed {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let head = self.prefix.split_to(n);
            buf.put_slice(&head);
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.socket).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Prefixed {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.socket).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.socket).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.socket.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.socket).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.socket).poll_shutdown(cx)
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
            Some(Classified::Stream { params }) => {
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
            assert!(
                matches!(classify(head), Some(Classified::Http { probe: false })),
                "{head:?}"
            );
        }
    }

    #[test]
    fn health_and_metrics_requests_are_probes() {
        for head in [
            &b"GET /healthz HTTP/1.1\r\n\r\n"[..],
            b"GET /readyz?x=1 HTTP/1.1\r\n\r\n",
            b"HEAD /metrics HTTP/1.1\r\n\r\n",
        ] {
            assert!(
                matches!(classify(head), Some(Classified::Http { probe: true })),
                "{head:?}"
            );
        }
        assert!(matches!(
            classify(b"POST /healthz HTTP/1.1\r\n\r\n"),
            Some(Classified::Http { probe: false })
        ));
    }

    #[test]
    fn heads_over_the_field_or_target_limits_are_refused() {
        let with_fields = |n: usize| {
            let fields: String = (0..n).map(|i| format!("x{i}: v\r\n")).collect();
            format!("GET /api/events/stream HTTP/1.1\r\n{fields}\r\n")
        };
        assert!(matches!(
            classify(with_fields(MAX_HEADERS).as_bytes()),
            Some(Classified::Stream { .. })
        ));
        assert!(matches!(
            classify(with_fields(MAX_HEADERS + 1).as_bytes()),
            Some(Classified::Refused(_))
        ));
        let target = |n: usize| {
            format!(
                "GET /api/events/stream?types={} HTTP/1.1\r\n\r\n",
                "a".repeat(n)
            )
        };
        let fits = MAX_URI_BYTES - "/api/events/stream?types=".len();
        assert!(matches!(
            classify(target(fits).as_bytes()),
            Some(Classified::Stream { .. })
        ));
        assert!(matches!(
            classify(target(fits + 1).as_bytes()),
            Some(Classified::Refused(_))
        ));
    }

    #[test]
    fn partial_heads_ask_for_more() {
        assert!(classify(b"GET /api/events/str").is_none());
        assert!(classify(b"GET /api/events/stream HTTP/1.1\r\nHost: x\r\n").is_none());
    }
}
