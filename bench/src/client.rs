//! One SSE subscriber: a raw `TcpStream`, a hand-written request, and the streaming parsers.
//!
//! Cost per client is kept to the socket, one task and a few words of parser and tracker
//! state. Reads go into a per-thread scratch buffer (not a per-client one) and are parsed in
//! place inside the poll, so an idle client holds no buffer at all.

use std::cell::RefCell;
use std::future::poll_fn;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};

use crate::http::{BodyKind, ChunkedDecoder, MAX_HEAD, parse_response_head};
use crate::latency::Recorder;
use crate::seqtrack::SeqTracker;
use crate::sse::{EventId, SseEvent, SseParser};
use crate::stop::StopSignal;
use crate::url::HttpUrl;

/// Per-thread read buffer. 64 KiB holds many small events or one large one per read.
const SCRATCH_BYTES: usize = 64 * 1024;

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; SCRATCH_BYTES]);
}

/// Wall-clock now in unix microseconds (the publisher stamps `t` with the same clock).
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// One stream URL with its request bytes prepared once for all its clients.
#[derive(Debug)]
pub struct Target {
    /// Where to connect.
    pub url: HttpUrl,
    /// The complete GET request.
    pub request: Vec<u8>,
}

impl Target {
    /// Builds the `GET` for `url`, with an optional `Last-Event-ID`.
    pub fn new(url: HttpUrl, last_event_id: Option<&str>) -> Self {
        let request = request_bytes(&url, last_event_id);
        Self { url, request }
    }
}

/// The stream request for `url`, with an optional `Last-Event-ID`.
fn request_bytes(url: &HttpUrl, last_event_id: Option<&str>) -> Vec<u8> {
    let mut req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n",
        url.path, url.authority
    );
    if let Some(id) = last_event_id {
        req.push_str(&format!("Last-Event-ID: {id}\r\n"));
    }
    req.push_str("\r\n");
    req.into_bytes()
}

/// Reconnect mode (`--reconnect`) settings and counters, shared by all clients.
#[derive(Debug)]
pub struct Reconnect {
    /// Every stream URL, in `--url` order; a client moves to the next one when its stream ends.
    pub targets: Vec<Arc<Target>>,
    /// The id the first requests carried (`--last-event-id`), as the parsers' starting point.
    pub initial_id: EventId,
    /// Highest sequence number the publish endpoint has acknowledged so far.
    pub published_hi: Arc<AtomicU64>,
    /// Earliest stream end of the run, unix µs (`u64::MAX` = none yet).
    pub first_end_us: AtomicU64,
    /// Successful reconnections (a new `200` head after a stream ended).
    pub reconnects: AtomicU64,
    /// Reconnect attempts that failed (refused, timed out, non-200).
    pub failures: AtomicU64,
    /// Streams that ended with an id the generator cannot store (sent no `Last-Event-ID`).
    pub unsupported_ids: AtomicU64,
    /// Stream end to new response head, µs, one sample per reconnection.
    pub times: Mutex<Histogram<u64>>,
}

impl Reconnect {
    /// Reconnect state over `targets`.
    pub fn new(
        targets: Vec<Arc<Target>>,
        initial_id: EventId,
        published_hi: Arc<AtomicU64>,
    ) -> Self {
        Self {
            targets,
            initial_id,
            published_hi,
            first_end_us: AtomicU64::new(u64::MAX),
            reconnects: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            unsupported_ids: AtomicU64::new(0),
            times: Mutex::new(crate::latency::new_histogram()),
        }
    }
}

/// State shared by all clients of a run.
pub struct Shared {
    /// Events the publisher will send (sequence numbers `1..=events`).
    pub events: u64,
    /// Run start, unix µs: events stamped earlier come from an older run and are ignored.
    pub start_us: u64,
    /// Bound on TCP connect plus response head.
    pub connect_timeout: Duration,
    /// Latency histograms.
    pub latency: Recorder,
    /// Clients that got a `200` head.
    pub connected: AtomicUsize,
    /// Clients that failed to connect.
    pub failed: AtomicUsize,
    /// Connected clients that have every event `1..=events`.
    pub complete: AtomicUsize,
    /// Connected clients whose stream ended before they were complete.
    pub closed: AtomicUsize,
    /// The first connect error seen, and how many errors there were of each kind (capped).
    pub errors: Mutex<Vec<(String, usize)>>,
    /// Set in `--reconnect` mode.
    pub reconnect: Option<Reconnect>,
}

impl Shared {
    /// Creates the shared state for a run starting now.
    pub fn new(events: u64, connect_timeout: Duration) -> Self {
        Self {
            events,
            start_us: now_us(),
            connect_timeout,
            latency: Recorder::default(),
            connected: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
            complete: AtomicUsize::new(0),
            closed: AtomicUsize::new(0),
            errors: Mutex::default(),
            reconnect: None,
        }
    }

    /// Counts an error under its message (only the first 16 distinct messages are kept).
    fn note_error(&self, msg: String) {
        let mut errors = self.errors.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(e) = errors.iter_mut().find(|(m, _)| *m == msg) {
            e.1 += 1;
        } else if errors.len() < 16 {
            errors.push((msg, 1));
        }
    }
}

/// What one client saw, returned when it stops.
#[derive(Debug, Default, Clone)]
pub struct ClientResult {
    /// Got a `200` response head.
    pub connected: bool,
    /// The stream ended (EOF, error, end of body) before the run stopped it.
    pub closed_early: bool,
    /// Sequence bookkeeping.
    pub seq: SeqTracker,
    /// Distinct sequence numbers within `1..=events`.
    pub in_range: u64,
    /// Messages stamped before the run started (left over from an earlier run).
    pub stale: u64,
    /// Data messages without a sequence number (e.g. `history_truncated`).
    pub other: u64,
    /// Unix µs of the last new in-range delivery.
    pub last_recv_us: u64,
    /// Reconnections of this client.
    pub reconnects: u32,
    /// After the latest reconnection: the sequence number it must hold a complete prefix
    /// up to (everything acknowledged before its new response head) and has not yet.
    pub catchup_target: Option<u64>,
    /// Unix µs when the client last became caught up after a reconnection (0 = never).
    pub caught_up_us: u64,
}

impl ClientResult {
    /// Accounts one parsed message received at `now` (unix µs).
    fn on_event(&mut self, ev: SseEvent, now: u64, hist: &mut Histogram<u64>, shared: &Shared) {
        let Some(seq) = ev.seq else {
            self.other += 1;
            return;
        };
        if ev.t.is_some_and(|t| t < shared.start_us) {
            self.stale += 1;
            return;
        }
        if !self.seq.record(seq) || !(1..=shared.events).contains(&seq) {
            return;
        }
        if let Some(t) = ev.t {
            hist.saturating_record(now.saturating_sub(t));
        }
        self.last_recv_us = now;
        self.in_range += 1;
        if self.in_range == shared.events {
            shared.complete.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(target) = self.catchup_target
            && self.seq.has_prefix(target)
        {
            self.catchup_target = None;
            self.caught_up_us = now;
        }
    }

    /// Notes a new stream after a reconnection whose head arrived at `now` (unix µs).
    fn on_reconnected(&mut self, now: u64, published_hi: u64) {
        self.reconnects += 1;
        if self.seq.has_prefix(published_hi) {
            self.catchup_target = None;
            self.caught_up_us = now;
        } else {
            self.catchup_target = Some(published_hi);
        }
    }
}

/// The response body after the head: framing plus SSE parsing.
struct Body {
    framing: Framing,
    sse: SseParser,
}

/// Body framing of the stream response.
enum Framing {
    Chunked(ChunkedDecoder),
    Length(u64),
    UntilClose,
}

impl Body {
    fn new(kind: BodyKind, last_id: EventId) -> Self {
        let framing = match kind {
            BodyKind::Chunked => Framing::Chunked(ChunkedDecoder::default()),
            BodyKind::Length(n) => Framing::Length(n),
            BodyKind::UntilClose => Framing::UntilClose,
        };
        Self {
            framing,
            sse: SseParser::with_last_id(last_id),
        }
    }

    /// Feeds raw body bytes; returns false once the body has ended (or is malformed).
    fn feed(&mut self, input: &[u8], on_event: &mut impl FnMut(SseEvent)) -> bool {
        let sse = &mut self.sse;
        match &mut self.framing {
            Framing::Chunked(dec) => match dec.feed(input, &mut |s| sse.feed(s, on_event)) {
                Ok(_) => !dec.is_done(),
                Err(_) => false,
            },
            Framing::Length(left) => {
                let take = (*left).min(input.len() as u64) as usize;
                sse.feed(&input[..take], on_event);
                *left -= take as u64;
                *left > 0
            }
            Framing::UntilClose => {
                sse.feed(input, on_event);
                true
            }
        }
    }
}

/// Runs one client until `stop` is signalled (or, without `--reconnect`, its stream ends)
/// and returns what it saw. `index` seeds the reconnect jitter.
pub async fn run(
    target: Arc<Target>,
    source: Option<IpAddr>,
    shared: Arc<Shared>,
    stop: Arc<StopSignal>,
    index: usize,
) -> ClientResult {
    let mut result = ClientResult::default();
    let opened = tokio::select! {
        r = tokio::time::timeout(shared.connect_timeout, open(&target.url, &target.request, source)) => r,
        _ = stop.stopped() => return result,
    };
    let (mut stream, mut head_kind, mut leftover) = match opened {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            shared.failed.fetch_add(1, Ordering::Relaxed);
            shared.note_error(format!("{e:#}"));
            return result;
        }
        Err(_) => {
            shared.failed.fetch_add(1, Ordering::Relaxed);
            shared.note_error("connect timeout".into());
            return result;
        }
    };
    result.connected = true;
    shared.connected.fetch_add(1, Ordering::Relaxed);
    let mut last_id = shared
        .reconnect
        .as_ref()
        .map_or(EventId::Empty, |r| r.initial_id);
    // Position of the current URL in the reconnect list.
    let mut current = shared.reconnect.as_ref().map_or(0, |r| {
        r.targets
            .iter()
            .position(|t| Arc::ptr_eq(t, &target))
            .unwrap_or(0)
    });
    drop(target);
    let mut rng = Jitter::new(index);

    loop {
        let mut body = Body::new(head_kind, last_id);
        let mut open_body = true;
        let mut process = |bytes: &[u8], result: &mut ClientResult| -> bool {
            let now = now_us();
            shared.latency.with_local(|hist| {
                body.feed(bytes, &mut |ev| result.on_event(ev, now, hist, &shared))
            })
        };
        if !leftover.is_empty() {
            open_body = process(&leftover, &mut result);
        }
        drop(leftover);

        while open_body {
            match read_with(&mut stream, &stop, |b| process(b, &mut result)).await {
                Read::Stopped => return result,
                Read::Data(still_open) => open_body = still_open,
                Read::Closed => open_body = false,
            }
        }
        drop(stream);
        last_id = body.sse.last_id();
        result.closed_early = true;
        let Some(rc) = shared.reconnect.as_ref() else {
            if result.in_range < shared.events || shared.events == 0 {
                shared.closed.fetch_add(1, Ordering::Relaxed);
            }
            return result;
        };

        // Reconnect: the next URL first, then round-robin, with jittered backoff.
        let ended = now_us();
        rc.first_end_us.fetch_min(ended, Ordering::Relaxed);
        if last_id == EventId::Unsupported {
            rc.unsupported_ids.fetch_add(1, Ordering::Relaxed);
        }
        let header = last_id.header_value();
        let mut attempt: u32 = 0;
        (stream, head_kind, leftover) = loop {
            current = (current + 1) % rc.targets.len();
            let url = &rc.targets[current].url;
            let request = request_bytes(url, header.as_deref());
            let opened = tokio::select! {
                r = tokio::time::timeout(shared.connect_timeout, open(url, &request, source)) => r,
                _ = stop.stopped() => return result,
            };
            match opened {
                Ok(Ok(v)) => break v,
                Ok(Err(e)) => shared.note_error(format!("reconnect: {e:#}")),
                Err(_) => shared.note_error("reconnect: connect timeout".into()),
            }
            rc.failures.fetch_add(1, Ordering::Relaxed);
            let delay = rng.backoff(attempt);
            attempt += 1;
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.stopped() => return result,
            }
        };
        let head_at = now_us();
        rc.reconnects.fetch_add(1, Ordering::Relaxed);
        rc.times
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .saturating_record(head_at.saturating_sub(ended).max(1));
        result.on_reconnected(head_at, rc.published_hi.load(Ordering::Acquire));
    }
}

/// Sets `IP_BIND_ADDRESS_NO_PORT` so that binding to a source address leaves the port choice
/// to `connect`, which picks it per destination. Without it `bind(ip, 0)` needs a port that is
/// free on that address for every destination, including ports held in `TIME_WAIT` by an
/// earlier run, and fails with "Address already in use" long before the ephemeral range is
/// used up. Best effort: on failure the plain bind is still tried.
fn bind_address_no_port(socket: &TcpSocket) {
    use nix::sys::socket::{setsockopt, sockopt::IpBindAddressNoPort};
    let _ = setsockopt(socket, IpBindAddressNoPort, &true);
}

/// A tiny xorshift generator for reconnect jitter (no shared state, no dependency).
struct Jitter(u64);

impl Jitter {
    fn new(index: usize) -> Self {
        Self((index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ now_us() | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Delay before retry `attempt` (0-based): 50 ms doubling to at most 1 s, each drawn
    /// from 50–100 % of that.
    fn backoff(&mut self, attempt: u32) -> Duration {
        let cap_ms = (50u64 << attempt.min(5)).min(1000);
        let ms = cap_ms / 2 + self.next() % (cap_ms / 2 + 1);
        Duration::from_millis(ms)
    }
}

/// Outcome of one [`read_with`].
enum Read {
    /// The stop signal fired.
    Stopped,
    /// Bytes were processed; `false` if the body has ended.
    Data(bool),
    /// EOF or a socket error.
    Closed,
}

/// Waits for the stop signal or for bytes; reads once into the thread's scratch buffer and
/// hands the bytes to `f` inside the poll (`f` says whether the body continues).
///
/// Using `poll_read` (not `readable` + `try_read`) matters: tokio clears read readiness
/// after a short read, saving the extra `EAGAIN` read syscall per wake-up.
async fn read_with(
    stream: &mut TcpStream,
    stop: &StopSignal,
    mut f: impl FnMut(&[u8]) -> bool,
) -> Read {
    poll_fn(|cx| {
        if stop.poll_stopped(cx).is_ready() {
            return Poll::Ready(Read::Stopped);
        }
        SCRATCH.with_borrow_mut(|buf| {
            let mut rb = ReadBuf::new(buf);
            match Pin::new(&mut *stream).poll_read(cx, &mut rb) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Ok(())) if !rb.filled().is_empty() => {
                    Poll::Ready(Read::Data(f(rb.filled())))
                }
                Poll::Ready(_) => Poll::Ready(Read::Closed),
            }
        })
    })
    .await
}

/// Connects, sends the request and reads the response head. Returns the stream, the body
/// framing and any body bytes that arrived with the head.
async fn open(
    url: &HttpUrl,
    request: &[u8],
    source: Option<IpAddr>,
) -> anyhow::Result<(TcpStream, BodyKind, Vec<u8>)> {
    let addr = url.addr;
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .context("socket")?;
    if let Some(ip) = source {
        bind_address_no_port(&socket);
        socket
            .bind((ip, 0).into())
            .with_context(|| format!("bind {ip}"))?;
    }
    let mut stream = socket.connect(addr).await.context("connect")?;
    stream.set_nodelay(true).context("nodelay")?;
    stream.write_all(request).await.context("write request")?;
    let mut buf = Vec::with_capacity(1024);
    loop {
        if stream.read_buf(&mut buf).await.context("read head")? == 0 {
            bail!("closed before response head");
        }
        if let Some(head) = parse_response_head(&buf)? {
            if head.status != 200 {
                bail!("status {}", head.status);
            }
            let rest = buf.split_off(head.len);
            return Ok((stream, head.body, rest));
        }
        if buf.len() > MAX_HEAD {
            bail!("response head too large");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_address_no_port_sets_the_socket_option() {
        use nix::sys::socket::{getsockopt, sockopt::IpBindAddressNoPort};
        let socket = TcpSocket::new_v4().expect("socket");
        assert!(!getsockopt(&socket, IpBindAddressNoPort).expect("getsockopt"));
        bind_address_no_port(&socket);
        assert!(getsockopt(&socket, IpBindAddressNoPort).expect("getsockopt"));
    }

    #[test]
    fn backoff_is_jittered_and_capped() {
        let mut j = Jitter::new(3);
        for attempt in 0..20 {
            let d = j.backoff(attempt).as_millis() as u64;
            let cap = (50u64 << attempt.min(5)).min(1000);
            assert!((cap / 2..=cap).contains(&d), "attempt {attempt}: {d} ms");
        }
    }

    #[test]
    fn catch_up_needs_the_whole_prefix() {
        let mut r = ClientResult::default();
        for s in [1, 2, 3] {
            r.seq.record(s);
        }
        r.on_reconnected(100, 3);
        assert_eq!(
            (r.reconnects, r.catchup_target, r.caught_up_us),
            (1, None, 100)
        );
        r.on_reconnected(200, 6);
        assert_eq!(r.catchup_target, Some(6));
    }
}
