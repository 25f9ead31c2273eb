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

/// A fake cluster for `--reconnect`: every listener shares one history, answers
/// `Last-Event-ID: <n>-0` with a replay after `n`, and ends each stream after `cut_after`
/// frames so clients keep reconnecting.
async fn resuming_server(listeners: usize, cut_after: usize) -> Vec<SocketAddr> {
    type History = Arc<std::sync::Mutex<Vec<Arc<Vec<u8>>>>>;
    let history: History = Arc::default();
    let (tx, _) = broadcast::channel::<(u64, Arc<Vec<u8>>)>(4096);
    let mut addrs = Vec::new();
    for _ in 0..listeners {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        addrs.push(listener.local_addr().unwrap());
        let (history, tx) = (history.clone(), tx.clone());
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let (history, tx) = (history.clone(), tx.clone());
                tokio::spawn(async move {
                    let mut s = s;
                    let mut buf = Vec::new();
                    let Some((head, body)) = read_request(&mut s, &mut buf).await else {
                        return;
                    };
                    if !head.starts_with("GET") {
                        let mut next = Some((head, body));
                        while let Some((_, body)) = next {
                            {
                                let mut h = history.lock().unwrap();
                                h.push(Arc::new(body));
                                let _ = tx.send((h.len() as u64, h[h.len() - 1].clone()));
                            }
                            let resp = b"HTTP/1.1 202 Accepted\r\nContent-Length: 2\r\n\r\n{}";
                            if s.write_all(resp).await.is_err() {
                                return;
                            }
                            next = read_request(&mut s, &mut buf).await;
                        }
                        return;
                    }
                    let after: u64 = head
                        .lines()
                        .find_map(|l| l.strip_prefix("Last-Event-ID: "))
                        .and_then(|v| v.strip_suffix("-0"))
                        .map_or(0, |v| v.parse().unwrap());
                    let mut rx = tx.subscribe();
                    let backlog: Vec<(u64, Arc<Vec<u8>>)> = {
                        let h = history.lock().unwrap();
                        (after as usize..h.len())
                            .map(|i| (i as u64 + 1, h[i].clone()))
                            .collect()
                    };
                    let mut sent = after;
                    let frame = |n: u64, body: &[u8]| {
                        let mut f = format!("id: {n}-0\ndata: ").into_bytes();
                        f.extend_from_slice(body);
                        f.extend_from_slice(b"\n\n");
                        f
                    };
                    let head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\nretry: 10\n\n";
                    if s.write_all(head).await.is_err() {
                        return;
                    }
                    let mut frames = 0;
                    for (n, body) in backlog {
                        if frames == cut_after || s.write_all(&frame(n, &body)).await.is_err() {
                            return;
                        }
                        sent = n;
                        frames += 1;
                    }
                    while let Ok((n, body)) = rx.recv().await {
                        if n <= sent {
                            continue;
                        }
                        // End the stream mid-frame: the partial event must not count.
                        let f = frame(n, &body);
                        if frames == cut_after {
                            let _ = s.write_all(&f[..f.len() / 2]).await;
                            return;
                        }
                        if s.write_all(&f).await.is_err() {
                            return;
                        }
                        sent = n;
                        frames += 1;
                    }
                });
            }
        });
    }
    addrs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_clients_resume_without_loss_or_duplicates() {
    let addrs = resuming_server(2, 23).await;
    let dead = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let urls = format!(
        "http://{}/s,http://{dead}/s,http://{}/s",
        addrs[0], addrs[1]
    );
    let publish = format!("http://{}/pub", addrs[0]);
    let argv = [
        "loadgen",
        "--url",
        &urls,
        "--reconnect",
        "--initial-url-only",
        "--publish-url",
        &publish,
        "--clients",
        "10",
        "--events",
        "150",
        "--rate",
        "300",
        "--warmup-secs",
        "0.2",
        "--drain-secs",
        "10",
    ];
    let cfg = Config::from_args(Args::try_parse_from(argv).unwrap()).unwrap();
    let r = tokio::time::timeout(Duration::from_secs(30), run::run(cfg))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((r.connected, r.failed), (10, 0), "{r:?}");
    assert_eq!(
        (r.expected, r.delivered, r.lost, r.dup, r.ooo),
        (1500, 1500, 0, 0, 0),
        "{r:?}"
    );
    // 150 events in streams of 23 frames: at least 6 reconnects per client.
    assert!(r.reconnects >= 60, "{r:?}");
    assert_eq!(r.reconnected_clients, 10, "{r:?}");
    // Every other reconnect first tries the dead URL.
    assert!(r.reconnect_failures >= 20, "{r:?}");
    assert_eq!((r.not_caught_up, r.unsupported_ids), (0, 0), "{r:?}");
    assert!(r.caught_up_ms.is_some_and(|ms| ms > 0.0), "{r:?}");
    assert!(r.reconnect_max_ms >= r.reconnect_p50_ms, "{r:?}");
}
