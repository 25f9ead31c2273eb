//! What one client, or a crowd of stalled ones, may hold (issue 9, finding 4): request
//! bodies and idle keep-alive connections have a deadline, connections that are not
//! streams have a cap of their own with a reserve that keeps `/healthz` and `/metrics`
//! answering at it, and a stream's request head is bounded on both paths.
//!
//! Every exchange here is written by hand on a socket, so the test controls exactly when
//! bytes stop arriving; every wait is bounded.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::sse::metric_value;
use crate::harness::wire::{closed_within, once, read_answer};
use crate::harness::{GatewayBuilder, GatewayProc, eventually};

/// Longest wait for anything that should happen at once.
const T: Duration = Duration::from_secs(5);

/// The request timeout the deadline tests run with.
const TIMEOUT_SECS: u64 = 2;

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
}

fn post(body: &str) -> String {
    format!(
        "POST /api/events HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
}

const EVENT: &str = r#"{"type":"limits","data":1}"#;

/// A `POST` whose head is complete and whose body stops after a few bytes.
async fn stalled_post(addr: SocketAddr) -> TcpStream {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(
        b"POST /api/events HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n\
          content-length: 100\r\n\r\n{\"type\":",
    )
    .await
    .unwrap();
    tcp
}

async fn metric(addr: SocketAddr, name: &str) -> Option<f64> {
    let answer = once(addr, &get("/metrics")).await?;
    metric_value(&String::from_utf8_lossy(&answer.body), name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_post_body_gets_408_within_the_deadline_and_the_connection_closes() {
    let gw = GatewayBuilder::new()
        .opt("--request-timeout-secs", TIMEOUT_SECS)
        .spawn();
    let start = Instant::now();
    let mut tcp = stalled_post(gw.addr()).await;
    let answer = read_answer(&mut tcp, Duration::from_secs(TIMEOUT_SECS) + T)
        .await
        .expect("an answer to the stalled POST");
    let took = start.elapsed();
    answer.assert_error(408, "request_timeout");
    assert_eq!(answer.header("connection"), Some("close"), "{answer:?}");
    assert!(
        took >= Duration::from_millis(TIMEOUT_SECS * 1000 - 200)
            && took < Duration::from_secs(TIMEOUT_SECS + 2),
        "408 after {took:?}, deadline {TIMEOUT_SECS} s"
    );
    assert!(
        closed_within(&mut tcp, T).await.is_some(),
        "connection still open after the 408"
    );
    // Nothing was stored, and the next producer is served normally.
    let answer = once(gw.addr(), &post(EVENT)).await.unwrap();
    assert_eq!(answer.status, 202, "{answer:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_silent_connections_are_closed_after_the_request_timeout() {
    let gw = GatewayBuilder::new()
        .opt("--request-timeout-secs", TIMEOUT_SECS)
        .spawn();
    let deadline = Duration::from_secs(TIMEOUT_SECS);
    let bound = deadline + Duration::from_secs(2);

    // Idle between requests: a keep-alive connection that got its answer, then went quiet.
    let mut idle = TcpStream::connect(gw.addr()).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nhost: t\r\n\r\n")
        .await
        .unwrap();
    let answer = read_answer(&mut idle, T).await.unwrap();
    assert_eq!(answer.status, 200);
    assert_ne!(answer.header("connection"), Some("close"), "{answer:?}");
    // Used again within the timeout, it still serves (the timer restarts per request).
    tokio::time::sleep(deadline / 2).await;
    idle.write_all(b"GET /healthz HTTP/1.1\r\nhost: t\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_answer(&mut idle, T).await.unwrap().status, 200);
    let took = closed_within(&mut idle, bound + T)
        .await
        .expect("idle keep-alive connection never closed");
    assert!(
        took >= deadline - Duration::from_millis(200) && took < bound,
        "idle connection closed after {took:?}, timeout {deadline:?}"
    );

    // Silent from the start: connected, never sent a byte.
    let mut silent = TcpStream::connect(gw.addr()).await.unwrap();
    let took = closed_within(&mut silent, bound + T)
        .await
        .expect("silent connection never closed");
    assert!(took < bound, "silent connection closed after {took:?}");

    // Half a head, then nothing.
    let mut partial = TcpStream::connect(gw.addr()).await.unwrap();
    partial
        .write_all(b"GET /healthz HTTP/1.1\r\nho")
        .await
        .unwrap();
    let took = closed_within(&mut partial, bound + T)
        .await
        .expect("half-sent head never closed");
    assert!(took < bound, "half-sent head closed after {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_connection_cap_health_answers_other_requests_are_refused_and_service_resumes() {
    const CAP: usize = 4;
    let gw = GatewayBuilder::new()
        .opt("--max-other-connections", CAP)
        .opt("--request-timeout-secs", 30)
        .spawn();
    let addr = gw.addr();
    // The gauge is read on one keep-alive connection that holds its general place for the
    // whole test: a /metrics request on a new connection would take a place itself, racing
    // a stalled POST whose head the gateway has not read yet.
    let scraper = Arc::new(tokio::sync::Mutex::new(
        TcpStream::connect(addr).await.unwrap(),
    ));
    let metric = |_addr: SocketAddr, name: &'static str| {
        let scraper = Arc::clone(&scraper);
        async move {
            let mut tcp = scraper.lock().await;
            tcp.write_all(b"GET /metrics HTTP/1.1\r\nhost: t\r\n\r\n")
                .await
                .ok()?;
            let answer = read_answer(&mut tcp, T).await?;
            metric_value(&String::from_utf8_lossy(&answer.body), name)
        }
    };
    assert!(
        metric(addr, "eventfabric_other_connections")
            .await
            .is_some()
    );

    let mut stalled = Vec::new();
    for _ in 1..CAP {
        stalled.push(stalled_post(addr).await);
    }
    eventually("the stalled POSTs fill the cap", T, || async {
        (metric(addr, "eventfabric_other_connections").await? >= CAP as f64).then_some(())
    })
    .await;
    // Probes are answered once, from the room streams have left (or the reserve).
    for path in ["/healthz", "/readyz", "/metrics"] {
        let answer = once(addr, &get(path)).await.expect(path);
        assert_eq!(answer.status, 200, "{path}: {answer:?}");
        assert_eq!(answer.header("connection"), Some("close"), "{path}");
    }
    // Anything else gets a quick 503 that says when to come back.
    let start = Instant::now();
    let answer = once(addr, &post(EVENT)).await.expect("an answer to a POST");
    let took = start.elapsed();
    answer.assert_error(503, "unavailable");
    assert_eq!(answer.header("retry-after"), Some("1"));
    assert_eq!(answer.header("connection"), Some("close"));
    assert!(took < Duration::from_secs(1), "refusal took {took:?}");
    // A stream still opens: streams are capped by --max-clients, not by this cap.
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /api/events/stream HTTP/1.1\r\nhost: t\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 15];
    tokio::time::timeout(T, stream.read_exact(&mut head))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&head, b"HTTP/1.1 200 OK");
    let refused = metric(addr, "eventfabric_connections_refused_total")
        .await
        .unwrap();
    assert!(refused >= 1.0, "refusals not counted: {refused}");

    // The stalled producers go; service resumes.
    drop(stalled);
    eventually("a POST is accepted again", T, || async {
        let answer = once(addr, &post(EVENT)).await?;
        (answer.status == 202).then_some(())
    })
    .await;
    // Only the scraper's connection is counted once the others have closed.
    eventually("the gauge falls back", T, || async {
        (metric(addr, "eventfabric_other_connections").await? == 1.0).then_some(())
    })
    .await;
    drop(stream);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_the_cap_and_its_reserve_connections_are_closed_at_once_and_probes_recover() {
    // The reserve holds 16 connections; a silent one leaves it after 1 s. Silent
    // connections may also hold the room streams have left: one, with --max-clients 1.
    const RESERVE: usize = 16;
    const STREAM_ROOM: usize = 1;
    let gw = GatewayBuilder::new()
        .opt("--max-other-connections", 1)
        .opt("--max-clients", STREAM_ROOM)
        .opt("--request-timeout-secs", 30)
        .spawn();
    let addr = gw.addr();
    // The POST takes the general place once its head is read; a probe that arrives first
    // takes it instead and the POST is refused (whoever comes first gets the last place),
    // so a refused POST is sent again. A probe that asks to be kept alive and is not
    // (served once, from the room streams have left) shows the POST holds the place.
    let stalled = tokio::sync::Mutex::new(stalled_post(addr).await);
    eventually("the stalled POST takes the cap", T, || async {
        let mut post = stalled.lock().await;
        let mut peek = [0u8; 1];
        if !matches!(post.try_read(&mut peek), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
        {
            *post = stalled_post(addr).await;
            return None;
        }
        let mut tcp = TcpStream::connect(addr).await.ok()?;
        tcp.write_all(b"GET /metrics HTTP/1.1\r\nhost: t\r\n\r\n")
            .await
            .ok()?;
        let answer = read_answer(&mut tcp, T).await?;
        let taken = metric_value(
            &String::from_utf8_lossy(&answer.body),
            "eventfabric_other_connections",
        )? >= 1.0;
        (taken && answer.header("connection") == Some("close")).then_some(())
    })
    .await;
    let mut silent = Vec::new();
    for _ in 0..STREAM_ROOM + RESERVE {
        silent.push(TcpStream::connect(addr).await.unwrap());
    }
    // Every place is taken: a new connection is answered (or just closed) at once.
    let mut extra = TcpStream::connect(addr).await.unwrap();
    let _ = extra.write_all(get("/healthz").as_bytes()).await;
    let start = Instant::now();
    let mut seen = Vec::new();
    let _ = tokio::time::timeout(T, extra.read_to_end(&mut seen)).await;
    let took = start.elapsed();
    assert!(took < Duration::from_secs(1), "closed after {took:?}");
    let text = String::from_utf8_lossy(&seen);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 503"),
        "unexpected answer beyond the reserve: {text}"
    );
    // The silent connections time out of the reserve; probes answer again.
    eventually("/healthz answers once the reserve frees up", T, || async {
        let answer = once(addr, &get("/healthz")).await?;
        (answer.status == 200).then_some(())
    })
    .await;
    drop((silent, stalled));
}

/// A head with one padding header making it about `size` bytes.
fn stream_request(size: usize) -> String {
    let pad = "a".repeat(size.saturating_sub(60));
    format!("GET /api/events/stream HTTP/1.1\r\nhost: t\r\nx-pad: {pad}\r\n\r\n")
}

fn rss_kib(gw: &GatewayProc) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", gw.pid())).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_stream_head_is_refused_with_431_on_both_paths() {
    let gw = GatewayBuilder::new().spawn();
    let addr = gw.addr();
    let huge = stream_request(300_000);

    // Fresh connection (raw path): the JSON error body.
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut reader, mut writer) = tcp.into_split();
    let request = huge.clone();
    let sending = tokio::spawn(async move {
        let _ = writer.write_all(request.as_bytes()).await;
        writer
    });
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(T, reader.read_to_end(&mut buf)).await;
    let _ = sending.await;
    let text = String::from_utf8_lossy(&buf);
    assert!(
        text.starts_with("HTTP/1.1 431"),
        "fresh connection: {:.200}",
        text
    );
    let json: Value = serde_json::from_str(text.split_once("\r\n\r\n").unwrap().1).unwrap();
    assert_eq!(json["error"], "headers_too_large");

    // Reused keep-alive connection (hyper path): hyper's own 431.
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nhost: t\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_answer(&mut tcp, T).await.unwrap().status, 200);
    let (mut reader, mut writer) = tcp.into_split();
    let sending = tokio::spawn(async move {
        let _ = writer.write_all(huge.as_bytes()).await;
        writer
    });
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(T, async {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = reader.read(&mut chunk).await {
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await;
    let _ = sending.await;
    let text = String::from_utf8_lossy(&buf);
    assert!(
        text.starts_with("HTTP/1.1 431"),
        "reused connection: {:.200}",
        text
    );
    assert_eq!(
        metric(addr, "eventfabric_clients_connected").await,
        Some(0.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_with_a_large_head_under_the_limit_costs_what_any_stream_costs() {
    const STREAMS: usize = 200;
    let gw = GatewayBuilder::new().spawn();
    let addr = gw.addr();
    // Warm up the allocator and the runtime with one normal stream.
    let mut warm = TcpStream::connect(addr).await.unwrap();
    warm.write_all(stream_request(100).as_bytes())
        .await
        .unwrap();
    let mut head = [0u8; 15];
    warm.read_exact(&mut head).await.unwrap();
    let before = rss_kib(&gw);
    let mut streams = Vec::new();
    for _ in 0..STREAMS {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(stream_request(14_000).as_bytes())
            .await
            .unwrap();
        let answer = tokio::time::timeout(T, async {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 1024];
            while !String::from_utf8_lossy(&buf).contains("retry:") {
                let n = tcp.read(&mut chunk).await.unwrap();
                assert!(n > 0, "closed: {}", String::from_utf8_lossy(&buf));
                buf.extend_from_slice(&chunk[..n]);
            }
            String::from_utf8_lossy(&buf).to_string()
        })
        .await
        .unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        // Served on the raw socket: no chunked framing, the body ends with the connection.
        assert!(!answer.contains("transfer-encoding"), "{answer}");
        streams.push(tcp);
    }
    eventually("every stream is counted", T, || async {
        (metric(addr, "eventfabric_clients_connected").await? >= (STREAMS + 1) as f64).then_some(())
    })
    .await;
    let per_stream = (rss_kib(&gw).saturating_sub(before)) as f64 / STREAMS as f64;
    // A stream served by hyper after a 14 KB head kept ~18 KiB before the limit existed.
    // Alone this measures under 8 KiB; with the whole suite running beside it, up to 8.2
    // (more heads are read at once, and the allocator keeps the freed buffers' pages).
    assert!(
        per_stream < 9.0,
        "{per_stream:.1} KiB per stream with a 14 KB head"
    );
    drop(streams);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_storm_larger_than_the_other_cap_is_admitted_without_a_503() {
    // Clients of a dead replica arrive all at once, and none has sent its head yet when
    // the next is accepted. A browser's EventSource gives up for good on a 503, so they
    // must fit in the room streams have left, not in the cap for other connections.
    const STORM: usize = 200;
    let gw = GatewayBuilder::new()
        .opt("--max-other-connections", 4)
        .spawn();
    let addr = gw.addr();
    let mut sockets = Vec::new();
    for _ in 0..STORM {
        sockets.push(TcpStream::connect(addr).await.unwrap());
    }
    for socket in &mut sockets {
        socket
            .write_all(b"GET /api/events/stream HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
    }
    let mut statuses = std::collections::BTreeMap::new();
    for socket in &mut sockets {
        let mut head = vec![0u8; 12];
        let status = match tokio::time::timeout(T, socket.read_exact(&mut head)).await {
            Ok(Ok(_)) => String::from_utf8_lossy(&head[9..12]).into_owned(),
            _ => "closed".to_owned(),
        };
        *statuses.entry(status).or_insert(0) += 1;
    }
    assert_eq!(statuses.get("200"), Some(&STORM), "answers: {statuses:?}");
    // And once they are streams, the cap for other connections is free again.
    eventually("other connections back to 1 (this request)", T, || async {
        (metric(addr, "eventfabric_other_connections").await? <= 1.0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_headers_get_431_and_a_long_target_414_on_both_paths() {
    let gw = GatewayBuilder::new().spawn();
    let addr = gw.addr();
    let many_headers = {
        let fields: String = (0..70).map(|i| format!("x-h{i}: v\r\n")).collect();
        format!("GET /api/events/stream HTTP/1.1\r\nhost: t\r\n{fields}\r\n")
    };
    let long_target = format!(
        "GET /api/events/stream?types={} HTTP/1.1\r\nhost: t\r\n\r\n",
        "a".repeat(9 * 1024)
    );
    // A fresh connection (the raw path): the JSON error bodies.
    once(addr, &many_headers)
        .await
        .expect("an answer to 70 header fields")
        .assert_error(431, "headers_too_large");
    once(addr, &long_target)
        .await
        .expect("an answer to a 9 KiB target")
        .assert_error(414, "uri_too_long");
    // 64 fields (62 here, host and connection) are still fine.
    let fields: String = (0..62).map(|i| format!("x-h{i}: v\r\n")).collect();
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(
        format!("GET /healthz HTTP/1.1\r\nhost: t\r\n{fields}connection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(read_answer(&mut tcp, T).await.map(|a| a.status), Some(200));

    // A reused keep-alive connection (hyper): the same statuses.
    for (request, status) in [(&many_headers, 431), (&long_target, 414)] {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET /healthz HTTP/1.1\r\nhost: t\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(read_answer(&mut tcp, T).await.unwrap().status, 200);
        tcp.write_all(request.as_bytes()).await.unwrap();
        let answer = read_answer(&mut tcp, T)
            .await
            .expect("an answer on the reused connection");
        assert_eq!(answer.status, status, "{answer:?}");
        if status == 414 {
            answer.assert_error(414, "uri_too_long");
        }
    }
}
