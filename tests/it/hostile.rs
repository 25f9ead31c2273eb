//! Hostile and careless clients and producers (issue 9, finding 5): events the Redis
//! function would refuse are refused with `400` before they reach it, and a client
//! repeating an invalid `Last-Event-ID` cannot flood the log. Real processes only: an own
//! `redis-server` (or `REDIS_URL`) and the real gateway, its stderr captured by the harness.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::{Api, GatewayBuilder, GatewayProc, RedisProc, eventually, unique_namespace};

/// Per-step wait for things that should happen "at once".
const T: Duration = Duration::from_secs(10);

/// Stream requests in the log flood.
const FLOOD_REQUESTS: usize = 2_000;

/// Length of the invalid `Last-Event-ID` each flood request carries.
const FLOOD_ID_BYTES: usize = 8_000;

/// Most log bytes the whole flood may add. Unbounded, it was 19.4 MB (one line with the
/// whole id per request); cut short and rate-limited, it is one short line a second.
const FLOOD_LOG_BUDGET: usize = 64 * 1024;

/// Polls `/readyz` until it answers 200.
async fn wait_ready(api: &Api) {
    let what = format!("{} /readyz to answer 200", api.base());
    eventually(&what, T, || async move {
        let (status, _) = api.get("/readyz").await;
        (status == StatusCode::OK).then_some(())
    })
    .await
}

fn total_events(stats: &Value) -> u64 {
    stats["total_events_broadcast"]
        .as_u64()
        .unwrap_or_else(|| panic!("stats has no integer total_events_broadcast: {stats}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_redis_would_refuse_get_400_and_are_not_stored() {
    let redis = RedisProc::start();
    let mut gw = GatewayBuilder::new()
        .redis_url(redis.url())
        .namespace(&unique_namespace("hostile"))
        .spawn();
    let api = gw.api();
    wait_ready(&api).await;
    api.publish("fine", json!({"ok": true})).await;
    let before = total_events(&api.stats().await);

    let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
    let cases = [
        (
            "a lone high surrogate",
            r#"{"type":"t","data":"\ud800"}"#.to_owned(),
        ),
        (
            "a lone low surrogate",
            r#"{"type":"t","data":{"k":"x\udc00"}}"#.to_owned(),
        ),
        (
            "200-deep nesting",
            format!(r#"{{"type":"t","data":{deep}}}"#),
        ),
    ];
    for (what, body) in cases {
        let (status, text) = api.post_raw(body, "application/json").await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{what}: {text}");
        let error: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{what}: error body {text:?} is not JSON: {e}"));
        assert_eq!(error["error"], "bad_request", "{what}: {error}");
        assert!(error["message"].is_string(), "{what}: {error}");
    }

    // A valid surrogate pair is a character, and stored like any other.
    let (status, text) = api
        .post_raw(r#"{"type":"t","data":"\ud83d\ude00"}"#, "application/json")
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "a surrogate pair: {text}");
    assert_eq!(
        total_events(&api.stats().await),
        before + 1,
        "a refused event was stored"
    );
    assert!(
        !gw.log().contains("broker unavailable"),
        "a producer's mistake was logged as a broker failure:\n{}",
        gw.log()
    );
    gw.stop();
}

/// Sends `request` on `socket` and reads until `needle` has arrived; panics after [`T`].
async fn exchange(socket: &mut TcpStream, request: &[u8], needle: &[u8]) {
    socket.write_all(request).await.unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + T;
    while !seen.windows(needle.len()).any(|w| w == needle) {
        let left = deadline.saturating_duration_since(Instant::now());
        let n = tokio::time::timeout(left, socket.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no {:?} within {T:?}", String::from_utf8_lossy(needle)))
            .unwrap();
        assert!(n > 0, "connection closed before {needle:?}");
        seen.extend_from_slice(&buf[..n]);
    }
}

fn stream_request(last_event_id: &[u8]) -> Vec<u8> {
    let mut request = b"GET /api/events/stream HTTP/1.1\r\nHost: gw\r\nLast-Event-ID: ".to_vec();
    request.extend_from_slice(last_event_id);
    request.extend_from_slice(b"\r\n\r\n");
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_last_event_id_flood_writes_a_bounded_log() {
    // The harness runs the gateway at `eventfabric=debug`, the most a log would show.
    let mut gw = GatewayProc::start();
    let api = gw.api();
    let ascii = stream_request(&b"x".repeat(FLOOD_ID_BYTES));
    // 0xFF is not text, but it is allowed in a header value (obs-text), and was logged as
    // three characters each.
    let bytes = stream_request(&vec![0xFF; FLOOD_ID_BYTES]);
    let healthz = b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n";

    let log_before = gw.log().len();
    let started = Instant::now();
    for i in 0..FLOOD_REQUESTS {
        let mut socket = TcpStream::connect(gw.addr()).await.unwrap();
        let request = if i % 10 == 0 { &bytes } else { &ascii };
        if i % 2 == 1 {
            // A kept-alive connection: its stream is served by hyper, not the raw path.
            exchange(&mut socket, healthz, b"\r\n\r\n").await;
        }
        exchange(&mut socket, request, b"retry:").await;
    }
    let took = started.elapsed();
    api.stats().await;
    let log = gw.log();
    let grew = log.len() - log_before;
    eprintln!("{FLOOD_REQUESTS} invalid ids in {took:?}: the log grew {grew} bytes");

    assert!(
        grew < FLOOD_LOG_BUDGET,
        "the log grew {grew} bytes for {FLOOD_REQUESTS} requests; its last lines:\n{}",
        log.lines()
            .rev()
            .take(10)
            .map(|line| line.chars().take(200).collect::<String>())
            .collect::<Vec<_>>()
            .join("\n")
    );
    let lines: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("invalid Last-Event-ID"))
        .collect();
    assert!(!lines.is_empty(), "the invalid id was never logged:\n{log}");
    for line in &lines {
        assert!(line.len() < 400, "a line shows too much of the id: {line}");
        assert!(line.contains("suppressed="), "no suppressed count: {line}");
        assert!(line.contains("bytes)"), "no original length: {line}");
    }
    gw.stop();
}
