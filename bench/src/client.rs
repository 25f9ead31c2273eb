//! One SSE subscriber: a raw `TcpStream`, a hand-written request, and the streaming parsers.
//!
//! Cost per client is kept to the socket, one task and a few words of parser and tracker
//! state. Reads go into a per-thread scratch buffer (not a per-client one) and are parsed in
//! place inside the poll, so an idle client holds no buffer at all.

use std::cell::RefCell;
use std::future::poll_fn;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
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
use crate::sse::{SseEvent, SseParser};
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
        let mut req = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n",
            url.path, url.authority
        );
        if let Some(id) = last_event_id {
            req.push_str(&format!("Last-Event-ID: {id}\r\n"));
        }
        req.push_str("\r\n");
        Self {
            url,
            request: req.into_bytes(),
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
    fn new(kind: BodyKind) -> Self {
        let framing = match kind {
            BodyKind::Chunked => Framing::Chunked(ChunkedDecoder::default()),
            BodyKind::Length(n) => Framing::Length(n),
            BodyKind::UntilClose => Framing::UntilClose,
        };
        Self {
            framing,
            sse: SseParser::default(),
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

/// Runs one client until `stop` is signalled (or its stream ends) and returns what it saw.
pub async fn run(
    target: Arc<Target>,
    source: Option<IpAddr>,
    shared: Arc<Shared>,
    stop: Arc<StopSignal>,
) -> ClientResult {
    let mut result = ClientResult::default();
    let opened = tokio::select! {
        r = tokio::time::timeout(shared.connect_timeout, open(&target, source)) => r,
        _ = stop.stopped() => return result,
    };
    let (mut stream, head_kind, leftover) = match opened {
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

    let mut body = Body::new(head_kind);
    let mut open_body = true;
    let mut process = |bytes: &[u8], result: &mut ClientResult| -> bool {
        let now = now_us();
        shared
            .latency
            .with_local(|hist| body.feed(bytes, &mut |ev| result.on_event(ev, now, hist, &shared)))
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
    result.closed_early = true;
    if result.in_range < shared.events || shared.events == 0 {
        shared.closed.fetch_add(1, Ordering::Relaxed);
    }
    result
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
    target: &Target,
    source: Option<IpAddr>,
) -> anyhow::Result<(TcpStream, BodyKind, Vec<u8>)> {
    let addr = target.url.addr;
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .context("socket")?;
    if let Some(ip) = source {
        socket
            .bind((ip, 0).into())
            .with_context(|| format!("bind {ip}"))?;
    }
    let mut stream = socket.connect(addr).await.context("connect")?;
    stream.set_nodelay(true).context("nodelay")?;
    stream
        .write_all(&target.request)
        .await
        .context("write request")?;
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
