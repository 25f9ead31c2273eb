//! The stream contract, checked in process on both writers: every test runs once on a
//! fresh connection (served on the raw socket) and once on a keep-alive connection that
//! already carried another request (served through hyper). A rule that one writer forgets
//! fails here.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::contract::HEADERS;
use crate::{Config, Gateway, Publisher, StartError};

/// How a stream request reaches the gateway.
#[derive(Debug, Clone, Copy)]
enum Path {
    /// A new connection: the raw-socket writer.
    Fresh,
    /// A keep-alive connection that first carried `GET /healthz`: the hyper writer.
    Reused,
}

const PATHS: [Path; 2] = [Path::Fresh, Path::Reused];

const WAIT: Duration = Duration::from_secs(5);

/// A gateway served in this process on a loopback port.
struct InProcess {
    addr: SocketAddr,
    publisher: Publisher,
    shutdown: CancellationToken,
    serving: JoinHandle<Result<(), StartError>>,
}

impl InProcess {
    async fn start(configure: impl FnOnce(&mut Config)) -> Self {
        let mut config = Config::default_for_tests();
        config.fanout_threads = 1;
        config.drain_secs = 2;
        configure(&mut config);
        let gateway = Gateway::build(config).await.unwrap();
        let publisher = gateway.publisher();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let serving = tokio::spawn(gateway.serve(listener, shutdown.clone()));
        Self {
            addr,
            publisher,
            shutdown,
            serving,
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.serving)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

/// A stream response read with nothing but a socket: head parsed, body de-chunked.
struct Response {
    tcp: TcpStream,
    status: u16,
    headers: Vec<(String, String)>,
    chunked: bool,
    /// Bytes after the head not yet decoded.
    pending: Vec<u8>,
    /// The decoded body so far.
    body: Vec<u8>,
    ended: bool,
}

impl Response {
    async fn open(addr: SocketAddr, path: Path, target: &str, extra: &str) -> Self {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        let mut pending = Vec::new();
        if let Path::Reused = path {
            tcp.write_all(b"GET /healthz HTTP/1.1\r\nhost: t\r\n\r\n")
                .await
                .unwrap();
            let (head, rest) = read_head(&mut tcp, Vec::new()).await;
            let length = header(&head.1, "content-length").unwrap().parse().unwrap();
            let (_, rest) = read_exact_from(&mut tcp, rest, length).await;
            assert_eq!(head.0, 200, "the first request of a reused connection");
            pending = rest;
        }
        let request = format!("GET {target} HTTP/1.1\r\nhost: t\r\n{extra}\r\n");
        tcp.write_all(request.as_bytes()).await.unwrap();
        let ((status, headers), rest) = read_head(&mut tcp, pending).await;
        let chunked = header(&headers, "transfer-encoding").is_some_and(|v| v == "chunked");
        let mut response = Self {
            tcp,
            status,
            headers,
            chunked,
            pending: rest,
            body: Vec::new(),
            ended: false,
        };
        response.decode();
        response
    }

    fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Moves complete chunks (or, unchunked, everything) from `pending` to `body`.
    fn decode(&mut self) {
        if !self.chunked {
            self.body.append(&mut self.pending);
            return;
        }
        loop {
            let Some(line_end) = self.pending.windows(2).position(|w| w == b"\r\n") else {
                return;
            };
            let size_text = String::from_utf8_lossy(&self.pending[..line_end]).into_owned();
            let size = usize::from_str_radix(size_text.trim(), 16).unwrap();
            let needed = line_end + 2 + size + 2;
            if self.pending.len() < needed {
                return;
            }
            if size == 0 {
                self.ended = true;
            }
            self.body
                .extend_from_slice(&self.pending[line_end + 2..line_end + 2 + size]);
            self.pending.drain(..needed);
        }
    }

    /// Reads until `done` holds for the body text, the body ends, or the wait runs out.
    async fn read_until(&mut self, done: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !done(&self.text()) && !self.ended {
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout_at(deadline, self.tcp.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => self.ended = true,
                Ok(Ok(n)) => {
                    self.pending.extend_from_slice(&chunk[..n]);
                    self.decode();
                }
                Err(_) => panic!("timed out; body so far: {:?}", self.text()),
            }
        }
        self.text()
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

type Head = (u16, Vec<(String, String)>);

/// Reads a response head; returns it and the bytes read past it.
async fn read_head(tcp: &mut TcpStream, mut buf: Vec<u8>) -> (Head, Vec<u8>) {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        if let httparse::Status::Complete(len) = response.parse(&buf).unwrap() {
            let head = (
                response.code.unwrap(),
                response
                    .headers
                    .iter()
                    .map(|h| {
                        let value = String::from_utf8_lossy(h.value).into_owned();
                        (h.name.to_ascii_lowercase(), value)
                    })
                    .collect(),
            );
            return (head, buf.split_off(len));
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(WAIT, tcp.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "connection closed before a complete head");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Reads until `buf` holds `len` bytes; returns them and the rest.
async fn read_exact_from(tcp: &mut TcpStream, mut buf: Vec<u8>, len: usize) -> (Vec<u8>, Vec<u8>) {
    while buf.len() < len {
        let mut chunk = [0u8; 4096];
        let n = tcp.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed early");
        buf.extend_from_slice(&chunk[..n]);
    }
    let rest = buf.split_off(len);
    (buf, rest)
}

const STREAM: &str = "/api/events/stream";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_paths_answer_with_the_contract_headers_and_the_retry_hint() {
    let gateway = InProcess::start(|c| c.retry_ms = 1234).await;
    for path in PATHS {
        let mut stream = Response::open(gateway.addr, path, STREAM, "").await;
        assert_eq!(stream.status, 200, "{path:?}");
        for (name, value) in HEADERS {
            assert_eq!(stream.header(name), Some(value), "{path:?}: {name}");
        }
        // No --cors-origins: any origin may read the stream, as the seed allowed.
        assert_eq!(
            stream.header("access-control-allow-origin"),
            Some("*"),
            "{path:?}"
        );
        let body = stream.read_until(|t| t.contains("\n\n")).await;
        assert!(body.starts_with("retry: 1234\n\n"), "{path:?}: {body:?}");
    }
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_paths_answer_cors_for_listed_origins_only() {
    let gateway = InProcess::start(|c| {
        c.cors_origins = Some("https://app.example,http://localhost:3000".to_owned());
    })
    .await;
    for path in PATHS {
        let listed = "origin: https://app.example\r\n";
        let mut stream = Response::open(gateway.addr, path, STREAM, listed).await;
        assert_eq!(stream.status, 200, "{path:?}");
        assert_eq!(
            stream.header("access-control-allow-origin"),
            Some("https://app.example"),
            "{path:?}"
        );
        assert_eq!(
            stream.header("access-control-allow-credentials"),
            Some("true"),
            "{path:?}"
        );
        assert_eq!(stream.header("vary"), Some("Origin"), "{path:?}");
        stream.read_until(|t| t.contains("retry:")).await;

        let other = "origin: https://evil.example\r\n";
        let stream = Response::open(gateway.addr, path, STREAM, other).await;
        assert_eq!(stream.status, 200, "{path:?}");
        assert_eq!(
            stream.header("access-control-allow-origin"),
            None,
            "{path:?}"
        );
        assert_eq!(
            stream.header("access-control-allow-credentials"),
            None,
            "{path:?}"
        );
    }
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_paths_deliver_live_events_and_resume_after_an_id() {
    let gateway = InProcess::start(|_| {}).await;
    for path in PATHS {
        let first = gateway.publisher.publish("before", &1).await.unwrap();
        let mut live = Response::open(gateway.addr, path, STREAM, "").await;
        live.read_until(|t| t.contains("retry:")).await;
        // The stream is attached once its preamble is out; publish until it sees one.
        let mut sent = Vec::new();
        let body = loop {
            sent.push(
                gateway
                    .publisher
                    .publish("live", &sent.len())
                    .await
                    .unwrap(),
            );
            let deadline = tokio::time::Instant::now() + Duration::from_millis(200);
            let got =
                tokio::time::timeout_at(deadline, live.read_until(|t| t.contains("\"live\"")))
                    .await;
            if let Ok(body) = got {
                break body;
            }
        };
        assert!(
            body.contains("data: {\"type\":\"live\""),
            "{path:?}: {body}"
        );
        let resumed_header = format!("last-event-id: {first}\r\n");
        let mut resumed = Response::open(gateway.addr, path, STREAM, &resumed_header).await;
        let last = sent.last().unwrap().to_string();
        let body = resumed
            .read_until(|t| t.contains(&format!("id: {last}\n")))
            .await;
        assert!(
            !body.contains("\"before\""),
            "{path:?}: replayed the id itself: {body}"
        );
        for id in &sent {
            assert!(
                body.contains(&format!("id: {id}\n")),
                "{path:?}: {id} missing: {body}"
            );
        }
    }
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_paths_tell_a_client_with_an_unknown_id_and_serve_it_live() {
    let gateway = InProcess::start(|_| {}).await;
    gateway.publisher.publish("before", &1).await.unwrap();
    for path in PATHS {
        // An id no event ever had, ahead of all of them (what a forged one looks like).
        let forged = "last-event-id: 99999999999999-0\r\n";
        let mut resumed = Response::open(gateway.addr, path, STREAM, forged).await;
        let body = resumed
            .read_until(|t| t.contains("history_truncated"))
            .await;
        assert!(body.contains("\"history_truncated\""), "{path:?}: {body}");
        let id = gateway.publisher.publish("after", &2).await.unwrap();
        let body = resumed
            .read_until(|t| t.contains(&format!("id: {id}\n")))
            .await;
        assert!(body.contains("\"after\""), "{path:?}: {body}");
    }
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_paths_limit_streams_per_address_behind_trusted_proxies_only() {
    let behind_proxy = InProcess::start(|c| {
        c.max_clients_per_ip = 1;
        c.trusted_proxies = Some("127.0.0.0/8".to_owned());
    })
    .await;
    for (n, path) in PATHS.into_iter().enumerate() {
        let from = |host: u8| format!("x-forwarded-for: 6.6.6.6, 198.51.100.{host}\r\n");
        let client = 10 + n as u8 * 10;
        let mut first = Response::open(behind_proxy.addr, path, STREAM, &from(client)).await;
        assert_eq!(first.status, 200, "{path:?}");
        first.read_until(|t| t.contains("retry:")).await;
        let second = Response::open(behind_proxy.addr, path, STREAM, &from(client)).await;
        assert_eq!(
            second.status, 429,
            "{path:?}: a second stream from one address"
        );
        assert_eq!(second.header("retry-after"), Some("5"), "{path:?}");
        let other = Response::open(behind_proxy.addr, path, STREAM, &from(client + 1)).await;
        assert_eq!(
            other.status, 200,
            "{path:?}: another address behind the same proxy"
        );
        // The address's place comes back when its stream ends.
        drop(first);
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let again = Response::open(behind_proxy.addr, path, STREAM, &from(client)).await;
            if again.status == 200 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{path:?}: the place never came back"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    behind_proxy.stop().await;

    // No trusted proxy: the header is the client's own words, and the peer address counts.
    let direct = InProcess::start(|c| c.max_clients_per_ip = 1).await;
    for path in PATHS {
        let mut first =
            Response::open(direct.addr, path, STREAM, "x-forwarded-for: 1.1.1.1\r\n").await;
        assert_eq!(first.status, 200, "{path:?}");
        first.read_until(|t| t.contains("retry:")).await;
        let second =
            Response::open(direct.addr, path, STREAM, "x-forwarded-for: 2.2.2.2\r\n").await;
        assert_eq!(
            second.status, 429,
            "{path:?}: a forged header must not make room"
        );
        drop(first);
        let deadline = tokio::time::Instant::now() + WAIT;
        while Response::open(direct.addr, path, STREAM, "").await.status != 200 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{path:?}: the place never came back"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    direct.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_paths_refuse_a_full_replica_with_503_retry_after_and_a_json_body() {
    let gateway = InProcess::start(|c| c.max_clients = 1).await;
    let mut holder = Response::open(gateway.addr, Path::Fresh, STREAM, "").await;
    holder.read_until(|t| t.contains("retry:")).await;
    for path in PATHS {
        let mut refused = Response::open(gateway.addr, path, STREAM, "").await;
        assert_eq!(refused.status, 503, "{path:?}");
        assert_eq!(refused.header("retry-after"), Some("1"), "{path:?}");
        assert_eq!(
            refused.header("content-type"),
            Some("application/json"),
            "{path:?}"
        );
        let length: usize = refused.header("content-length").unwrap().parse().unwrap();
        let body = refused.read_until(|t| t.len() >= length).await;
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["error"], "unavailable", "{path:?}");
        assert!(json["message"].is_string(), "{path:?}");
    }
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_paths_end_with_a_retry_hint_at_shutdown() {
    let gateway = InProcess::start(|c| c.retry_ms = 5000).await;
    let mut streams = Vec::new();
    for path in PATHS {
        let mut stream = Response::open(gateway.addr, path, STREAM, "").await;
        stream.read_until(|t| t.contains("retry: 5000\n\n")).await;
        streams.push((path, stream));
    }
    gateway.shutdown.cancel();
    for (path, mut stream) in streams {
        let body = stream
            .read_until(|t| t.matches("retry:").count() >= 2)
            .await;
        let last = body.trim_end().rsplit("\n\n").next().unwrap();
        let hint: u64 = last
            .strip_prefix("retry: ")
            .unwrap_or_else(|| panic!("{path:?}: no final retry hint in {body:?}"))
            .parse()
            .unwrap();
        assert!((500..=5000).contains(&hint), "{path:?}: {hint}");
    }
    tokio::time::timeout(WAIT, gateway.serving)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
