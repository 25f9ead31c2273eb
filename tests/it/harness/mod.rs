//! Test harness: real gateway, Redis and nginx processes, an SSE test client, the programs
//! some tests need ([`tools`]) and polling helpers.

pub mod gateway;
pub mod nginx;
pub mod redis;
pub mod sse;
pub mod tokens;
pub mod tools;
pub mod wire;

use std::future::Future;
use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use gateway::{GatewayBuilder, GatewayProc};
pub use redis::RedisProc;
pub use sse::{Api, ConnectOpts, RawSse, SseClient, SseEvent};

/// How often [`eventually`] re-checks its condition.
pub const POLL_INTERVAL: Duration = Duration::from_millis(25);

/// Polls `check` until it returns `Some`, or panics with `what` after `timeout`.
///
/// This is the only way tests wait for a condition; there are no fixed sleeps.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago (the probe socket is closed again),
/// for a process that must listen on a port chosen in advance.
pub fn free_port() -> u16 {
    let probe = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    probe.local_addr().expect("local addr").port()
}

/// A key namespace unique to this test run, so tests sharing one Redis never collide.
pub fn unique_namespace(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{prefix}-{}-{n}-{nanos:x}", std::process::id())
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

/// Parses a Redis-stream-like id `<ms>-<seq>`; `None` if it does not have that shape.
pub fn parse_stream_id(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    if ms.is_empty() || seq.is_empty() {
        return None;
    }
    if !ms.bytes().all(|b| b.is_ascii_digit()) || !seq.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((ms.parse().ok()?, seq.parse().ok()?))
}
