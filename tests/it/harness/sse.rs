//! SSE test clients and an HTTP API helper.
//!
//! - [`SseClient`]: reqwest 0.12 byte stream parsed by `eventsource_stream::Eventsource`. It
//!   first checks the `retry: N\n\n` prelude on the raw bytes, then hands the rest of the
//!   stream to the parser. The parser drops comments, so heartbeats need [`RawSse`].
//! - [`RawSse`]: the unparsed body, for byte-exact checks (framing, heartbeats, final retry).
//! - [`SseBlocks`], [`blocks`], [`parse_block`]: a raw body cut into `\n\n`-terminated
//!   blocks and their fields, written the way the gateway writes them.
//! - [`Api`]: `POST /api/events`, stats, metrics and arbitrary requests;
//!   [`assert_json_error`] checks the contract's error body.

use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use eventsource_stream::{EventStreamError, Eventsource};
use futures::{Stream, StreamExt};
use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::eventually;

/// Time allowed for response headers of a stream request.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for the `retry:` prelude after the headers.
pub const PRELUDE_TIMEOUT: Duration = Duration::from_secs(5);

/// How to open `GET /api/events/stream`.
#[derive(Debug, Default, Clone)]
pub struct ConnectOpts {
    /// `?types=...` (sent literally, e.g. `a,b`).
    pub types: Option<String>,
    /// `Last-Event-ID` request header.
    pub last_event_id_header: Option<String>,
    /// `?lastEventId=...` query parameter.
    pub last_event_id_query: Option<String>,
}

impl ConnectOpts {
    /// Only these types.
    pub fn types(t: &str) -> Self {
        ConnectOpts {
            types: Some(t.to_string()),
            ..Default::default()
        }
    }

    /// Resume with the `Last-Event-ID` header.
    pub fn header(id: &str) -> Self {
        ConnectOpts {
            last_event_id_header: Some(id.to_string()),
            ..Default::default()
        }
    }

    /// Resume with the `lastEventId` query parameter.
    pub fn query(id: &str) -> Self {
        ConnectOpts {
            last_event_id_query: Some(id.to_string()),
            ..Default::default()
        }
    }

    fn url(&self, base: &str) -> String {
        let mut url = format!("{base}/api/events/stream");
        let mut params: Vec<String> = Vec::new();
        if let Some(t) = &self.types {
            params.push(format!("types={t}"));
        }
        if let Some(id) = &self.last_event_id_query {
            let enc: String = form_urlencoded::byte_serialize(id.as_bytes()).collect();
            params.push(format!("lastEventId={enc}"));
        }
        if !params.is_empty() {
            url.push('?');
            url.push_str(&params.join("&"));
        }
        url
    }
}

/// One parsed SSE message.
#[derive(Debug, Clone)]
pub struct SseEvent {
    /// Value of the last `id:` field seen (per the SSE spec the id buffer persists, so an
    /// event without its own `id:` line carries the previous one; empty if none yet).
    pub id: String,
    /// `event:` field; the parser reports `message` when there is none.
    pub event: String,
    /// `data` parsed as JSON (`Value::Null` if it is not JSON).
    pub json: Value,
}

impl SseEvent {
    /// JSON `type`.
    pub fn ty(&self) -> &str {
        self.json["type"].as_str().unwrap_or("")
    }

    /// JSON `id`.
    pub fn json_id(&self) -> &str {
        self.json["id"].as_str().unwrap_or("")
    }

    /// `data.seq` of events published by [`Api::publish_seq`].
    pub fn seq(&self) -> Option<u64> {
        self.json["data"]["seq"].as_u64()
    }

    fn short(&self) -> String {
        format!(
            "{}#{}@{}",
            self.ty(),
            self.seq().map_or(-1, |s| s as i64),
            self.id
        )
    }
}

/// Result of waiting for the next message.
#[derive(Debug)]
pub enum Next {
    /// A message.
    Event(SseEvent),
    /// The stream ended cleanly.
    End,
    /// The stream failed (connection reset, parse error, ...).
    Error(String),
    /// Nothing arrived before the deadline.
    Timeout,
}

type EventStream = Pin<
    Box<
        dyn Stream<Item = Result<eventsource_stream::Event, EventStreamError<reqwest::Error>>>
            + Send,
    >,
>;

/// A parsed SSE stream.
pub struct SseClient {
    /// The raw prelude block (`retry: N\n\n`).
    pub prelude: String,
    /// `retry:` value from the prelude.
    pub retry_ms: u64,
    stream: EventStream,
    /// Every message received so far.
    pub received: Vec<SseEvent>,
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .build()
        .expect("build reqwest client")
}

async fn open(base: &str, opts: &ConnectOpts) -> reqwest::Response {
    let mut req = http_client().get(opts.url(base));
    if let Some(id) = &opts.last_event_id_header {
        req = req.header("Last-Event-ID", id.as_str());
    }
    match tokio::time::timeout(CONNECT_TIMEOUT, req.send()).await {
        Ok(Ok(resp)) => resp,
        Ok(Err(e)) => panic!("GET {} failed: {e}", opts.url(base)),
        Err(_) => panic!(
            "GET {} sent no response headers within {CONNECT_TIMEOUT:?}",
            opts.url(base)
        ),
    }
}

impl SseClient {
    /// Opens the stream, asserts `200 text/event-stream`, reads the `retry:` prelude.
    pub async fn connect(base: &str, opts: ConnectOpts) -> SseClient {
        let resp = open(base, &opts).await;
        let status = resp.status();
        let headers = resp.headers().clone();
        assert_eq!(
            status,
            StatusCode::OK,
            "GET {} returned {status}",
            opts.url(base)
        );
        let ct = headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        assert!(
            ct.starts_with("text/event-stream"),
            "content-type {ct:?} is not text/event-stream"
        );
        let mut bytes = resp.bytes_stream();
        let mut buf: Vec<u8> = Vec::new();
        let deadline = Instant::now() + PRELUDE_TIMEOUT;
        let end = loop {
            if let Some(pos) = find(&buf, b"\n\n") {
                break pos + 2;
            }
            match tokio::time::timeout_at(deadline, bytes.next()).await {
                Ok(Some(Ok(chunk))) => buf.extend_from_slice(&chunk),
                Ok(Some(Err(e))) => panic!("stream error before the retry prelude: {e}"),
                Ok(None) => panic!(
                    "stream ended before a complete retry prelude; got {:?}",
                    String::from_utf8_lossy(&buf)
                ),
                Err(_) => panic!(
                    "no complete `retry: N\\n\\n` prelude within {PRELUDE_TIMEOUT:?}; got {:?}",
                    String::from_utf8_lossy(&buf)
                ),
            }
        };
        let rest = Bytes::copy_from_slice(&buf[end..]);
        let prelude = String::from_utf8_lossy(&buf[..end]).to_string();
        let retry_ms = prelude
            .strip_prefix("retry: ")
            .and_then(|r| r.strip_suffix("\n\n"))
            .and_then(|r| r.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("body does not start with `retry: N\\n\\n`: {prelude:?}"));
        let chained = futures::stream::iter([Ok::<Bytes, reqwest::Error>(rest)]).chain(bytes);
        SseClient {
            prelude,
            retry_ms,
            stream: Box::pin(chained.eventsource()),
            received: Vec::new(),
        }
    }

    /// Waits up to `timeout` for the next message.
    pub async fn next(&mut self, timeout: Duration) -> Next {
        match tokio::time::timeout(timeout, self.stream.next()).await {
            Err(_) => Next::Timeout,
            Ok(None) => Next::End,
            Ok(Some(Err(e))) => Next::Error(e.to_string()),
            Ok(Some(Ok(ev))) => {
                let json = serde_json::from_str(&ev.data).unwrap_or(Value::Null);
                let e = SseEvent {
                    id: ev.id,
                    event: ev.event,
                    json,
                };
                self.received.push(e.clone());
                Next::Event(e)
            }
        }
    }

    /// The next message; panics on timeout, end or error.
    pub async fn expect_event(&mut self, timeout: Duration) -> SseEvent {
        match self.next(timeout).await {
            Next::Event(e) => e,
            other => panic!(
                "expected an event, got {other:?}; received so far: {}",
                self.summary()
            ),
        }
    }

    /// Exactly `n` messages within `timeout` overall; panics with what arrived otherwise.
    pub async fn collect(&mut self, n: usize, timeout: Duration) -> Vec<SseEvent> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left).await {
                Next::Event(e) => out.push(e),
                other => panic!(
                    "wanted {n} events within {timeout:?}, got {} then {other:?}: {}",
                    out.len(),
                    summarize(&out)
                ),
            }
        }
        out
    }

    /// Waits for the stream to finish (clean end or connection error) within `timeout`.
    /// Returns `Ok(())` for a clean end and `Err(reason)` for an error end; panics if it
    /// is still open or delivers more events.
    pub async fn expect_end(&mut self, timeout: Duration) -> Result<(), String> {
        match self.next(timeout).await {
            Next::End => Ok(()),
            Next::Error(e) => Err(e),
            Next::Timeout => panic!("stream still open after {timeout:?}"),
            Next::Event(e) => panic!("expected end of stream, got event {e:?}"),
        }
    }

    /// Short description of every message received so far.
    pub fn summary(&self) -> String {
        summarize(&self.received)
    }
}

fn summarize(evs: &[SseEvent]) -> String {
    let v: Vec<String> = evs.iter().map(SseEvent::short).collect();
    format!("[{}]", v.join(", "))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The raw body of a stream, for byte-exact assertions.
pub struct RawSse {
    /// Response status.
    pub status: StatusCode,
    /// Response headers.
    pub headers: HeaderMap,
    stream: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    /// Everything received so far (lossy UTF-8).
    pub text: String,
    /// Set once the body ended: `Some(None)` clean end, `Some(Some(err))` error end.
    pub ended: Option<Option<String>>,
}

impl RawSse {
    /// Opens the stream; does not assert anything about the response.
    pub async fn connect(base: &str, opts: ConnectOpts) -> RawSse {
        let resp = open(base, &opts).await;
        RawSse {
            status: resp.status(),
            headers: resp.headers().clone(),
            stream: Box::pin(resp.bytes_stream()),
            text: String::new(),
            ended: None,
        }
    }

    /// Reads until `pred(&text)` holds; returns false on timeout or end of stream.
    pub async fn read_until(&mut self, timeout: Duration, pred: impl Fn(&str) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if pred(&self.text) {
                return true;
            }
            if self.ended.is_some() {
                return false;
            }
            match tokio::time::timeout_at(deadline, self.stream.next()).await {
                Err(_) => return false,
                Ok(None) => self.ended = Some(None),
                Ok(Some(Err(e))) => self.ended = Some(Some(e.to_string())),
                Ok(Some(Ok(chunk))) => self.text.push_str(&String::from_utf8_lossy(&chunk)),
            }
        }
    }

    /// Reads until the body ends; returns false if it is still open after `timeout`.
    pub async fn read_to_end(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.ended.is_none() {
            match tokio::time::timeout_at(deadline, self.stream.next()).await {
                Err(_) => return false,
                Ok(None) => self.ended = Some(None),
                Ok(Some(Err(e))) => self.ended = Some(Some(e.to_string())),
                Ok(Some(Ok(chunk))) => self.text.push_str(&String::from_utf8_lossy(&chunk)),
            }
        }
        true
    }
}

/// Complete `\n\n`-terminated blocks of a raw SSE body, in order (an unterminated tail is
/// left out).
pub fn blocks(text: &str) -> Vec<&str> {
    let mut out: Vec<&str> = text.split("\n\n").collect();
    out.pop(); // the (possibly empty) unterminated tail
    out
}

/// Blocks that are not comments (heartbeats) and not a lone `retry:` hint.
pub fn event_blocks(text: &str) -> Vec<&str> {
    blocks(text)
        .into_iter()
        .filter(|b| !b.starts_with(':') && !b.starts_with("retry:"))
        .collect()
}

/// The fields of one SSE block, read the way the gateway writes them: `name: value` lines
/// with one space after the colon, and comment lines starting with `:`.
#[derive(Debug, Clone, Default)]
pub struct SseBlock {
    /// The `id: ` line's value.
    pub id: Option<String>,
    /// The `data: ` lines' values, joined with `\n`.
    pub data: Option<String>,
    /// The `retry: ` line's value.
    pub retry: Option<u64>,
    /// Whether the block holds a comment line (a heartbeat).
    pub comment: bool,
}

impl SseBlock {
    /// `data` parsed as JSON; panics if the block has none or it is not JSON.
    pub fn json(&self) -> Value {
        let data = self
            .data
            .as_deref()
            .unwrap_or_else(|| panic!("block {self:?} has no `data:` line"));
        serde_json::from_str(data)
            .unwrap_or_else(|e| panic!("block {self:?} has no JSON data: {e}"))
    }
}

/// Reads the fields of one block (without its terminating blank line).
pub fn parse_block(block: &str) -> SseBlock {
    let mut out = SseBlock::default();
    for line in block.lines() {
        if line.starts_with(':') {
            out.comment = true;
        } else if let Some(id) = line.strip_prefix("id: ") {
            out.id = Some(id.to_owned());
        } else if let Some(d) = line.strip_prefix("data: ") {
            match &mut out.data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(d);
                }
                None => out.data = Some(d.to_owned()),
            }
        } else if let Some(ms) = line.strip_prefix("retry: ") {
            out.retry = ms.parse().ok();
        }
    }
    out
}

/// Cuts a body that arrives in chunks into parsed blocks (the gateway ends lines with `\n`).
#[derive(Debug, Default)]
pub struct SseBlocks {
    buf: Vec<u8>,
}

impl SseBlocks {
    /// Adds a chunk; returns the blocks it completed.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<SseBlock> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(end) = find(&self.buf, b"\n\n") {
            let block: Vec<u8> = self.buf.drain(..end + 2).collect();
            out.push(parse_block(&String::from_utf8_lossy(&block[..end])));
        }
        out
    }
}

/// HTTP helper for one gateway.
#[derive(Clone)]
pub struct Api {
    base: String,
    client: reqwest::Client,
}

/// Per-request timeout for [`Api`] calls.
pub const API_TIMEOUT: Duration = Duration::from_secs(10);

impl Api {
    /// A producer that posts `{"type": "t", "data": {"seq": n}}` every `every` for `during`
    /// (what the failover tests run through a fault) and returns the ids acknowledged with
    /// `202`, in order; refused posts are left out.
    pub fn spawn_producer(
        &self,
        every: Duration,
        during: Duration,
    ) -> tokio::task::JoinHandle<Vec<String>> {
        let api = self.clone();
        tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut tick = tokio::time::interval(every);
            let until = Instant::now() + during;
            let mut seq = 0u64;
            while Instant::now() < until {
                tick.tick().await;
                seq += 1;
                let body = json!({"type": "t", "data": {"seq": seq}}).to_string();
                let (status, answer) = api.post_raw(body, "application/json").await;
                if status == StatusCode::ACCEPTED {
                    let answer: Value = serde_json::from_str(&answer).expect("a JSON answer");
                    acked.push(answer["id"].as_str().expect("an id").to_owned());
                }
            }
            acked
        })
    }

    /// Helper for the gateway at `base` (`http://IP:PORT`).
    pub fn new(base: &str) -> Api {
        Api {
            base: base.trim_end_matches('/').to_string(),
            client: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                .timeout(API_TIMEOUT)
                // Below the gateway's keep-alive limit (--request-timeout-secs, 10 s):
                // a connection reused just as the gateway closes it fails the request.
                .pool_idle_timeout(Duration::from_secs(5))
                .build()
                .expect("build reqwest client"),
        }
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// `POST /api/events` with `{"type": ty, "data": data}`; asserts `202 {"id"}`.
    pub async fn publish(&self, ty: &str, data: Value) -> String {
        let body = json!({"type": ty, "data": data});
        let (status, text) = self.post_raw(body.to_string(), "application/json").await;
        assert_eq!(
            status,
            StatusCode::ACCEPTED,
            "publish {body} returned {status}: {text}"
        );
        let v: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("publish response {text:?} is not JSON: {e}"));
        v["id"]
            .as_str()
            .unwrap_or_else(|| panic!("publish response {text} has no string `id`"))
            .to_string()
    }

    /// Publishes `{"seq": seq}` (plus optional padding) as type `ty`; returns the id.
    pub async fn publish_seq(&self, ty: &str, seq: u64) -> String {
        self.publish(ty, json!({ "seq": seq })).await
    }

    /// Publishes `{"seq": n}` events of type `ty` for every `n` in `seqs`, in order;
    /// returns their ids.
    pub async fn publish_seqs(&self, ty: &str, seqs: std::ops::RangeInclusive<u64>) -> Vec<String> {
        let mut ids = Vec::new();
        for seq in seqs {
            ids.push(self.publish_seq(ty, seq).await);
        }
        ids
    }

    /// `POST /api/events` with an arbitrary body; returns status and body text.
    pub async fn post_raw(
        &self,
        body: impl Into<reqwest::Body>,
        content_type: &str,
    ) -> (StatusCode, String) {
        let resp = self
            .client
            .post(format!("{}/api/events", self.base))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST /api/events failed: {e:?}"));
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        (status, text)
    }

    /// Any method on any path; returns status, headers and body text.
    pub async fn request(&self, method: &str, path: &str) -> (StatusCode, HeaderMap, String) {
        let m = reqwest::Method::from_bytes(method.as_bytes()).expect("valid method");
        let resp = self
            .client
            .request(m, format!("{}{path}", self.base))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path} failed: {e}"));
        let status = resp.status();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap_or_default();
        (status, headers, text)
    }

    /// `GET path`; returns status and body.
    pub async fn get(&self, path: &str) -> (StatusCode, String) {
        let (s, _, t) = self.request("GET", path).await;
        (s, t)
    }

    /// Polls `GET /readyz` until it answers `status` (200 ready, 503 not ready).
    pub async fn wait_readyz(&self, status: StatusCode, timeout: Duration) {
        let what = format!("{} /readyz to answer {status}", self.base);
        eventually(&what, timeout, || async move {
            (self.get("/readyz").await.0 == status).then_some(())
        })
        .await
    }

    /// Polls `GET /readyz` until it answers 200.
    pub async fn wait_ready(&self, timeout: Duration) {
        self.wait_readyz(StatusCode::OK, timeout).await
    }

    /// `GET /api/events/stats` as JSON (asserts 200).
    pub async fn stats(&self) -> Value {
        let (status, text) = self.get("/api/events/stats").await;
        assert_eq!(status, StatusCode::OK, "stats returned {status}: {text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("stats {text:?} is not JSON: {e}"))
    }

    /// `active_clients` from the stats.
    pub async fn active_clients(&self) -> u64 {
        let s = self.stats().await;
        s["active_clients"]
            .as_u64()
            .unwrap_or_else(|| panic!("stats has no integer active_clients: {s}"))
    }

    /// Polls the stats until `active_clients == n`; panics with the last value otherwise.
    pub async fn wait_active_clients(&self, n: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let c = self.active_clients().await;
            if c == n {
                return;
            }
            if Instant::now() >= deadline {
                panic!("active_clients is {c}, expected {n} within {timeout:?}");
            }
            tokio::time::sleep(super::POLL_INTERVAL).await;
        }
    }

    /// Polls `/metrics` until `name` is at least `min`; returns the value.
    pub async fn wait_metric_at_least(&self, name: &str, min: f64, timeout: Duration) -> f64 {
        let what = format!("metric {name} >= {min}");
        eventually(&what, timeout, || async move {
            self.metric(name).await.filter(|v| *v >= min)
        })
        .await
    }

    /// `GET /metrics` text (asserts 200).
    pub async fn metrics(&self) -> String {
        let (status, text) = self.get("/metrics").await;
        assert_eq!(status, StatusCode::OK, "/metrics returned {status}");
        text
    }

    /// Sum of every sample of metric `name` (any labels); `None` if there is none.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        metric_value(&self.metrics().await, name)
    }
}

/// Asserts an error answer of the contract: status `expected` and a JSON body
/// `{"error": "<non-empty code>", "message": "<text>"}`.
pub fn assert_json_error(status: StatusCode, body: &str, expected: StatusCode, what: &str) {
    assert_eq!(status, expected, "{what}: status {status}, body {body:?}");
    let v: Value = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("{what}: error body {body:?} is not JSON: {e}"));
    assert!(
        v["error"].as_str().is_some_and(|s| !s.is_empty()),
        "{what}: error body {body} has no non-empty string `error`"
    );
    assert!(
        v["message"].is_string(),
        "{what}: error body {body} has no string `message`"
    );
}

/// Sum of every sample of `name` in Prometheus text (any labels); `None` if absent.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let rest = if let Some(r) = rest.strip_prefix('{') {
            match r.find('}') {
                Some(p) => &r[p + 1..],
                None => continue,
            }
        } else if rest.starts_with(' ') {
            rest
        } else {
            continue;
        };
        let Some(v) = rest.split_whitespace().next() else {
            continue;
        };
        if let Ok(v) = v.parse::<f64>() {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// The `data.seq` of each event, in order; panics on an event without one.
pub fn seqs(evs: &[SseEvent]) -> Vec<u64> {
    evs.iter()
        .map(|e| {
            e.seq()
                .unwrap_or_else(|| panic!("event without data.seq: {e:?}"))
        })
        .collect()
}
