//! The publisher: sends `--events` numbered, timestamped events at `--rate` per second.
//!
//! It runs on its own thread with a current-thread runtime so that 19,000 busy client tasks
//! cannot delay its schedule. Event `k` is due at `start + k / rate` (an absolute schedule, so
//! lateness never accumulates); whenever several events are due at once they go out as one
//! batch — pipelined HTTP requests on one keep-alive connection, or one Redis pipeline — which
//! keeps them in order and lets high rates through without more connections. Each event's
//! `t` is stamped just before its batch is written.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::time::{Instant, timeout};

use crate::client::now_us;
use crate::http::{BodyKind, ChunkedDecoder, parse_response_head};
use crate::url::HttpUrl;

/// Bound on any single publish round trip.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// How events are published.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// `POST` the eventfabric envelope `{"type":"bench","data":{..}}` over HTTP.
    Http,
    /// `POST` only the data object to an Nchan publisher endpoint.
    Nchan,
    /// Redis `FCALL eventfabric_publish 1 {ns}:stream bench <data>`.
    Fcall,
    /// Redis `PUBLISH {ns}:events <envelope>`.
    Publish,
}

/// Where and how to publish.
#[derive(Debug, Clone)]
pub enum Destination {
    /// HTTP POST endpoint (modes `http` and `nchan`).
    Http(HttpUrl),
    /// Redis URL and key/channel (modes `fcall` and `publish`).
    Redis {
        /// Redis connection URL.
        url: String,
        /// Stream key (`fcall`) or channel (`publish`).
        key: String,
    },
}

/// Everything the publisher needs.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Publish mode.
    pub mode: Mode,
    /// Destination matching the mode.
    pub dest: Destination,
    /// Number of events (sequence numbers `1..=events`).
    pub events: u64,
    /// Events per second; 0 = as fast as possible.
    pub rate: f64,
    /// Approximate size of each published body.
    pub payload_bytes: usize,
    /// Most events sent in one batch.
    pub max_batch: usize,
    /// Set to the highest sequence number sent and acknowledged so far (batch by batch).
    pub progress: Arc<AtomicU64>,
}

/// What the publisher did.
#[derive(Debug, Default, Clone)]
pub struct Outcome {
    /// Events acknowledged with success.
    pub published: u64,
    /// Events that failed (non-2xx, Redis error, I/O error).
    pub errors: u64,
    /// Unix µs when the first event was stamped.
    pub first_us: u64,
    /// Unix µs when the last batch was acknowledged.
    pub last_us: u64,
    /// First error message, if any.
    pub first_error: Option<String>,
    /// True if the run's deadline stopped publishing early.
    pub stopped: bool,
}

/// Handle to a publisher thread that has connected and waits for the go signal.
pub struct Publisher {
    go: oneshot::Sender<()>,
    done: oneshot::Receiver<Outcome>,
    stop: Arc<AtomicBool>,
}

impl Publisher {
    /// Starts the publisher thread and waits until it is connected.
    pub async fn start(plan: Plan) -> anyhow::Result<Self> {
        let (ready_tx, ready_rx) = oneshot::channel::<anyhow::Result<()>>();
        let (go_tx, go_rx) = oneshot::channel::<()>();
        let (done_tx, done_rx) = oneshot::channel::<Outcome>();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        std::thread::Builder::new()
            .name("publisher".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.into()));
                        return;
                    }
                };
                rt.block_on(async move {
                    let mut sink = match timeout(IO_TIMEOUT, Sink::connect(&plan)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                        Err(_) => {
                            let _ = ready_tx.send(Err(anyhow!("publisher connect timed out")));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(()));
                    if go_rx.await.is_err() {
                        return;
                    }
                    let outcome = publish_all(&plan, &mut sink, &stop2).await;
                    let _ = done_tx.send(outcome);
                });
            })
            .context("spawn publisher thread")?;
        ready_rx
            .await
            .map_err(|_| anyhow!("publisher thread died"))??;
        Ok(Self {
            go: go_tx,
            done: done_rx,
            stop,
        })
    }

    /// Starts publishing and waits for the last event, or until `deadline`.
    pub async fn run_until(self, deadline: Instant) -> Outcome {
        let _ = self.go.send(());
        let mut done = self.done;
        tokio::select! {
            r = &mut done => r.unwrap_or_default(),
            _ = tokio::time::sleep_until(deadline) => {
                self.stop.store(true, Ordering::Relaxed);
                // The publisher checks the flag between batches; each batch is bounded.
                match timeout(IO_TIMEOUT + Duration::from_secs(1), done).await {
                    Ok(Ok(o)) => o,
                    _ => Outcome { stopped: true, ..Outcome::default() },
                }
            }
        }
    }
}

/// Builds event bodies of the requested size.
struct Payload {
    /// Whether the body is the `{"type":"bench","data":..}` envelope or only the data object.
    envelope: bool,
    /// `,"pad":"xxx…"` or empty.
    pad: String,
}

impl Payload {
    fn new(mode: Mode, payload_bytes: usize) -> Self {
        let envelope = matches!(mode, Mode::Http | Mode::Publish);
        let mut p = Self {
            envelope,
            pad: String::new(),
        };
        // Size a typical body (a mid-size seq, a current timestamp) and pad up to the target.
        let base = p.body(1000, now_us()).len();
        let pad_field = r#","pad":"""#.len();
        if payload_bytes > base + pad_field {
            p.pad = format!(
                r#","pad":"{}""#,
                "x".repeat(payload_bytes - base - pad_field)
            );
        }
        p
    }

    /// The body for one event.
    fn body(&self, seq: u64, t: u64) -> String {
        let pad = &self.pad;
        if self.envelope {
            format!(r#"{{"type":"bench","data":{{"seq":{seq},"t":{t}{pad}}}}}"#)
        } else {
            format!(r#"{{"seq":{seq},"t":{t}{pad}}}"#)
        }
    }
}

/// Runs the absolute schedule until all events are sent or `stop` is set.
async fn publish_all(plan: &Plan, sink: &mut Sink, stop: &AtomicBool) -> Outcome {
    let payload = Payload::new(plan.mode, plan.payload_bytes);
    let mut out = Outcome::default();
    let start = Instant::now();
    let due = |k: u64| {
        if plan.rate > 0.0 {
            start + Duration::from_secs_f64(k as f64 / plan.rate)
        } else {
            start
        }
    };
    let max_batch = plan.max_batch.max(1) as u64;
    let mut next: u64 = 0; // events 0..next are sent; seq = index + 1
    let mut bodies = Vec::with_capacity(max_batch as usize);
    while next < plan.events {
        if stop.load(Ordering::Relaxed) {
            out.stopped = true;
            break;
        }
        tokio::time::sleep_until(due(next)).await;
        let now = Instant::now();
        let mut end = next + 1;
        while end < plan.events && end - next < max_batch && due(end) <= now {
            end += 1;
        }
        let t = now_us();
        if out.first_us == 0 {
            out.first_us = t;
        }
        bodies.clear();
        bodies.extend((next..end).map(|i| payload.body(i + 1, t)));
        let (ok, err) = match timeout(IO_TIMEOUT, sink.send(&bodies)).await {
            Ok(Ok(ok)) => (ok, None),
            Ok(Err(e)) => (0, Some(format!("{e:#}"))),
            Err(_) => (0, Some("publish timed out".into())),
        };
        if let Some(e) = err {
            sink.reset();
            out.first_error.get_or_insert(e);
        }
        let n = end - next;
        out.published += ok;
        out.errors += n - ok;
        plan.progress.store(end, Ordering::Release);
        if out.first_error.is_none() && ok < n {
            out.first_error = sink.last_error();
        }
        next = end;
    }
    out.last_us = now_us();
    out
}

/// A connected publishing endpoint.
enum Sink {
    Http(HttpSink),
    Redis(RedisSink),
}

impl Sink {
    async fn connect(plan: &Plan) -> anyhow::Result<Self> {
        Ok(match &plan.dest {
            Destination::Http(url) => {
                let mut s = HttpSink {
                    url: url.clone(),
                    stream: None,
                    rbuf: Vec::with_capacity(4096),
                    wbuf: Vec::new(),
                    last_status: None,
                };
                s.stream = Some(s.dial().await?);
                Sink::Http(s)
            }
            Destination::Redis { url, key } => {
                let client = redis::Client::open(url.as_str()).context("redis url")?;
                let conn = client
                    .get_multiplexed_async_connection()
                    .await
                    .with_context(|| format!("connect to redis at {url}"))?;
                Sink::Redis(RedisSink {
                    conn,
                    mode: plan.mode,
                    key: key.clone(),
                    last_error: None,
                })
            }
        })
    }

    /// Sends a batch in order; returns how many succeeded.
    async fn send(&mut self, bodies: &[String]) -> anyhow::Result<u64> {
        match self {
            Sink::Http(s) => s.send(bodies).await,
            Sink::Redis(s) => s.send(bodies).await,
        }
    }

    /// Drops a connection left in an unknown state after an error.
    fn reset(&mut self) {
        if let Sink::Http(s) = self {
            s.stream = None;
            s.rbuf.clear();
        }
    }

    fn last_error(&self) -> Option<String> {
        match self {
            Sink::Http(s) => s.last_status.map(|st| format!("publish got status {st}")),
            Sink::Redis(s) => s.last_error.clone(),
        }
    }
}

/// Raw HTTP/1.1 keep-alive publisher with request pipelining.
struct HttpSink {
    url: HttpUrl,
    stream: Option<TcpStream>,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    /// Last non-2xx status, for the error report.
    last_status: Option<u16>,
}

impl HttpSink {
    async fn dial(&self) -> anyhow::Result<TcpStream> {
        let addr: SocketAddr = self.url.addr;
        let s = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect to publish endpoint {addr}"))?;
        s.set_nodelay(true)?;
        Ok(s)
    }

    async fn send(&mut self, bodies: &[String]) -> anyhow::Result<u64> {
        if self.stream.is_none() {
            self.rbuf.clear();
            self.stream = Some(self.dial().await?);
        }
        self.wbuf.clear();
        for b in bodies {
            self.wbuf.extend_from_slice(
                format!(
                    "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                    self.url.path,
                    self.url.authority,
                    b.len()
                )
                .as_bytes(),
            );
            self.wbuf.extend_from_slice(b.as_bytes());
        }
        let Some(stream) = self.stream.as_mut() else {
            bail!("no connection");
        };
        stream.write_all(&self.wbuf).await.context("write")?;
        let mut ok = 0;
        let mut must_close = false;
        for _ in bodies {
            let (status, close) = read_response(stream, &mut self.rbuf).await?;
            if (200..300).contains(&status) {
                ok += 1;
            } else {
                self.last_status = Some(status);
            }
            if close {
                must_close = true;
                break;
            }
        }
        if must_close {
            self.stream = None;
            self.rbuf.clear();
        }
        Ok(ok)
    }
}

/// Reads one complete response from `stream` (with `buf` holding bytes already read) and
/// returns its status and whether the connection must be closed afterwards.
async fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> anyhow::Result<(u16, bool)> {
    let head = loop {
        if let Some(h) = parse_response_head(buf)? {
            break h;
        }
        read_more(stream, buf).await?;
    };
    buf.drain(..head.len);
    match head.body {
        BodyKind::Length(n) => {
            let n = usize::try_from(n)?;
            while buf.len() < n {
                read_more(stream, buf).await?;
            }
            buf.drain(..n);
        }
        BodyKind::Chunked => {
            let mut dec = ChunkedDecoder::default();
            loop {
                let used = dec.feed(buf, &mut |_| {})?;
                buf.drain(..used);
                if dec.is_done() {
                    break;
                }
                read_more(stream, buf).await?;
            }
        }
        BodyKind::UntilClose => {
            while stream.read_buf(buf).await? > 0 {}
            buf.clear();
            return Ok((head.status, true));
        }
    }
    Ok((head.status, head.close))
}

async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> anyhow::Result<()> {
    buf.reserve(4096);
    if stream.read_buf(buf).await? == 0 {
        bail!("publish connection closed by server");
    }
    Ok(())
}

/// Redis publisher over one multiplexed connection.
struct RedisSink {
    conn: redis::aio::MultiplexedConnection,
    mode: Mode,
    key: String,
    last_error: Option<String>,
}

impl RedisSink {
    async fn send(&mut self, bodies: &[String]) -> anyhow::Result<u64> {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for b in bodies {
            match self.mode {
                Mode::Fcall => pipe
                    .cmd("FCALL")
                    .arg("eventfabric_publish")
                    .arg(1)
                    .arg(&self.key)
                    .arg("bench")
                    .arg(b),
                _ => pipe.cmd("PUBLISH").arg(&self.key).arg(b),
            };
        }
        let results: Vec<redis::RedisResult<redis::Value>> =
            pipe.query_async(&mut self.conn).await?;
        let mut ok = 0;
        for r in results {
            match r {
                Ok(_) => ok += 1,
                Err(e) => {
                    self.last_error.get_or_insert_with(|| e.to_string());
                }
            }
        }
        Ok(ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_is_about_the_requested_size_and_parses() {
        for mode in [Mode::Http, Mode::Nchan] {
            let p = Payload::new(mode, 512);
            let body = p.body(1000, now_us());
            assert!((500..=520).contains(&body.len()), "{}", body.len());
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            let data = if mode == Mode::Http { &v["data"] } else { &v };
            assert_eq!(data["seq"], 1000);
        }
        // Too small to pad: no pad field at all.
        assert!(!Payload::new(Mode::Http, 10).body(1, 2).contains("pad"));
    }
}
