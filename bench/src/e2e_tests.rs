//! End-to-end tests of a whole run against a throwaway in-process SSE server.
//!
//! The fake server fans each `POST` body out to every stream as `id:`/`data:` frames, and
//! deliberately cuts frames (and chunked-coding chunks) into pieces across several writes,
//! so the client parsers see events split at awkward places.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;

use crate::config::{Args, Config};
use crate::run;

/// Starts the fake server; `chunked` picks the stream body framing.
async fn fake_server(chunked: bool) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, _) = broadcast::channel::<Arc<Vec<u8>>>(4096);
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(handle(s, tx.clone(), chunked));
        }
    });
    addr
}

/// Reads one request head plus body from `s`, with `buf` carrying pipelined leftovers.
async fn read_request(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(String, Vec<u8>)> {
    loop {
        if let Some(end) = memchr::memmem::find(buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                if s.read_buf(buf).await.ok()? == 0 {
                    return None;
                }
            }
            let body = buf[end + 4..end + 4 + len].to_vec();
            buf.drain(..end + 4 + len);
            return Some((head, body));
        }
        if s.read_buf(buf).await.ok()? == 0 {
            return None;
        }
    }
}

async fn handle(mut s: TcpStream, tx: broadcast::Sender<Arc<Vec<u8>>>, chunked: bool) {
    let mut buf = Vec::new();
    let Some((head, first_body)) = read_request(&mut s, &mut buf).await else {
        return;
    };
    if head.starts_with("GET") {
        let mut rx = tx.subscribe();
        let framing = if chunked {
            "Transfer-Encoding: chunked\r\n"
        } else {
            "Connection: close\r\n"
        };
        let resp = format!("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n{framing}\r\n");
        s.write_all(resp.as_bytes()).await.unwrap();
        let mut n = 0u64;
        let send = |frame: Vec<u8>, n: u64| {
            // Cut the frame in three at positions that move with n.
            let a = (n as usize * 7) % frame.len();
            let b = a + (frame.len() - a) / 2;
            let pieces = [
                frame[..a].to_vec(),
                frame[a..b].to_vec(),
                frame[b..].to_vec(),
            ];
            let mut wire = Vec::new();
            for p in pieces.iter().filter(|p| !p.is_empty()) {
                if chunked {
                    wire.extend_from_slice(format!("{:x}\r\n", p.len()).as_bytes());
                    wire.extend_from_slice(p);
                    wire.extend_from_slice(b"\r\n");
                } else {
                    wire.extend_from_slice(p);
                }
            }
            wire
        };
        let hello = send(b"retry: 1000\n\n: hi\n\n".to_vec(), 0);
        if s.write_all(&hello).await.is_err() {
            return;
        }
        while let Ok(body) = rx.recv().await {
            n += 1;
            let mut frame = format!("id: {n}-0\ndata: ").into_bytes();
            frame.extend_from_slice(&body);
            frame.extend_from_slice(b"\n\n");
            let wire = send(frame, n);
            let (x, y) = wire.split_at(wire.len() / 3);
            if s.write_all(x).await.is_err() {
                return;
            }
            tokio::task::yield_now().await;
            if s.write_all(y).await.is_err() {
                return;
            }
        }
    } else {
        let mut next = Some((head, first_body));
        loop {
            let Some((_, body)) = next else { return };
            let _ = tx.send(Arc::new(body));
            let resp = b"HTTP/1.1 202 Accepted\r\nContent-Length: 12\r\n\r\n{\"id\":\"1-0\"}";
            if s.write_all(resp).await.is_err() {
                return;
            }
            next = read_request(&mut s, &mut buf).await;
        }
    }
}

async fn run_against(addr: SocketAddr, extra: &[&str]) -> crate::report::Report {
    let url = format!("http://{addr}/api/events/stream");
    let mut argv = vec![
        "loadgen",
        "--url",
        &url,
        "--warmup-secs",
        "0.2",
        "--drain-secs",
        "3",
    ];
    argv.extend_from_slice(extra);
    let cfg = Config::from_args(Args::try_parse_from(argv).unwrap()).unwrap();
    tokio::time::timeout(Duration::from_secs(30), run::run(cfg))
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_stream_delivers_everything() {
    let addr = fake_server(true).await;
    let r = run_against(
        addr,
        &[
            "--clients",
            "20",
            "--events",
            "200",
            "--rate",
            "2000",
            "--payload-bytes",
            "700",
        ],
    )
    .await;
    assert_eq!((r.connected, r.failed), (20, 0), "{r:?}");
    assert_eq!(r.published, 200, "{r:?}");
    assert_eq!(
        (r.expected, r.delivered, r.lost, r.dup, r.ooo),
        (4000, 4000, 0, 0, 0),
        "{r:?}"
    );
    assert_eq!(r.latency_samples, 4000);
    assert!(r.deliveries_per_s > 0.0);
    assert_eq!(r.disconnected, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_delimited_stream_and_unpaced_publisher() {
    let addr = fake_server(false).await;
    let r = run_against(
        addr,
        &[
            "--clients",
            "10",
            "--events",
            "300",
            "--rate",
            "0",
            "--publish-batch",
            "16",
        ],
    )
    .await;
    assert_eq!(r.connected, 10, "{r:?}");
    assert_eq!(
        (r.expected, r.delivered, r.lost, r.dup),
        (3000, 3000, 0, 0),
        "{r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connections_are_counted_as_failed() {
    // Bind then drop a listener to get a port that refuses connections.
    let addr = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let r = run_against(addr, &["--clients", "5", "--events", "0"]).await;
    assert_eq!((r.connected, r.failed), (0, 5), "{r:?}");
    assert!(r.first_error.contains("connect"), "{r:?}");
}
