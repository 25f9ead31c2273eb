//! The deployment's proxy layer with real processes: `redis-server`, three gateway
//! replicas and nginx running the SSE settings that ship in
//! `deploy/nginx/eventfabric-locations.conf` (the file docker-compose's nginx includes).
//!
//! - Through nginx, events published with `FCALL` reach every client within 100 ms,
//!   heartbeats arrive on time (nothing buffers or compresses the stream), and the stats
//!   answer counts every client of every replica.
//! - A rolling restart (SIGTERM, exit 0, start again on the same port, one replica at a
//!   time) under 300 clients and a steady producer loses, duplicates and reorders nothing:
//!   clients reconnect through nginx and resume by `Last-Event-ID`. The reconnect time
//!   distribution and how the draining replica spread its clients' returns are printed.
//!
//! Needs nginx (`tools::nginx`); without it both tests report themselves skipped.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::harness::nginx::NginxProc;
use crate::harness::sse::{SseBlocks, metric_value};
use crate::harness::{
    GatewayBuilder, GatewayProc, RedisProc, eventually, parse_stream_id, tools, unique_namespace,
};

/// Replicas behind the proxy.
const REPLICAS: usize = 3;

/// The two tests here each run five processes and up to 300 streams; run one at a time so
/// the latency bound measures the proxy, not the other test.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Gateway settings for one test.
#[derive(Debug, Clone, Copy)]
struct Settings {
    heartbeat_secs: u64,
    retry_ms: u64,
    drain_secs: u64,
}

/// Replica `i`'s `--replica-id`.
fn replica_name(i: usize) -> String {
    format!("proxy-r{}", i + 1)
}

/// Redis, the replicas and nginx in front of them. Fields drop in order: the proxy first,
/// then the replicas, then Redis.
struct Cluster {
    nginx: NginxProc,
    replicas: Vec<GatewayProc>,
    redis: RedisProc,
    namespace: String,
    http: reqwest::Client,
}

impl Cluster {
    async fn start(nginx: &Path, settings: Settings) -> Cluster {
        let redis = RedisProc::start();
        let namespace = unique_namespace("proxy");
        let replicas: Vec<GatewayProc> = tokio::task::block_in_place(|| {
            (0..REPLICAS)
                .map(|i| {
                    GatewayBuilder::new()
                        .redis_url(redis.url())
                        .namespace(&namespace)
                        .replica_id(&replica_name(i))
                        .opt("--heartbeat-secs", settings.heartbeat_secs)
                        .opt("--retry-ms", settings.retry_ms)
                        .opt("--drain-secs", settings.drain_secs)
                        // Per-client debug lines from 300 clients would only slow the test.
                        .env("RUST_LOG", "eventfabric=info")
                        .spawn()
                })
                .collect()
        });
        let addrs: Vec<_> = replicas.iter().map(GatewayProc::addr).collect();
        let nginx = tokio::task::block_in_place(|| NginxProc::start(nginx, &addrs));
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .build()
            .expect("build reqwest client");
        let cluster = Cluster {
            nginx,
            replicas,
            redis,
            namespace,
            http,
        };
        for i in 0..REPLICAS {
            cluster.wait_ready(i).await;
        }
        cluster
    }

    /// Waits until replica `i` answers `/readyz` with 200 (directly, not through nginx).
    async fn wait_ready(&self, i: usize) {
        self.replicas[i]
            .api()
            .wait_ready(Duration::from_secs(15))
            .await;
    }

    fn stream_url(&self) -> String {
        format!("{}/api/events/stream", self.nginx.base_url())
    }

    /// `GET path` through nginx as JSON; `None` on any failure.
    async fn get_json_via_nginx(&self, path: &str) -> Option<Value> {
        let url = format!("{}{path}", self.nginx.base_url());
        let resp = self
            .http
            .get(url)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .ok()?;
        if resp.status() != 200 {
            return None;
        }
        resp.json().await.ok()
    }

    /// Replica `i`'s own count of connected clients, from its `/metrics`.
    async fn clients_of(&self, i: usize) -> Option<u64> {
        let url = format!("{}/metrics", self.replicas[i].base_url());
        let resp = self.http.get(url).send().await.ok()?;
        let text = resp.text().await.ok()?;
        metric_value(&text, "eventfabric_clients_connected").map(|v| v as u64)
    }

    async fn producer(&self) -> Producer {
        let client = redis::Client::open(self.redis.url()).expect("redis url");
        let conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect to redis");
        Producer {
            conn,
            stream_key: format!("{{{}}}:stream", self.namespace),
        }
    }
}

/// Publishes like any producer in any language: `FCALL eventfabric_publish` on Redis.
#[derive(Clone)]
struct Producer {
    conn: redis::aio::MultiplexedConnection,
    stream_key: String,
}

impl Producer {
    async fn publish(&mut self, event_type: &str, data: &Value) -> String {
        redis::cmd("FCALL")
            .arg("eventfabric_publish")
            .arg(1)
            .arg(&self.stream_key)
            .arg(event_type)
            .arg(data.to_string())
            .query_async::<String>(&mut self.conn)
            .await
            .unwrap_or_else(|e| panic!("FCALL eventfabric_publish failed: {e}"))
    }
}

/// One reconnect: when the client's stream ended and when the first byte of the next one
/// arrived, and the `retry:` delay the client honoured in between.
#[derive(Debug, Clone, Copy)]
struct Reconnect {
    ended: Instant,
    resumed: Instant,
    hint_ms: u64,
}

impl Reconnect {
    fn millis(&self) -> u64 {
        (self.resumed - self.ended).as_millis() as u64
    }
}

/// What one client saw.
#[derive(Debug, Default)]
struct Seen {
    ids: Vec<String>,
    received_at: Vec<Instant>,
    heartbeats: Vec<Instant>,
    /// Streams that delivered at least one byte.
    streams: u32,
    /// Requests that got no stream (an error status or a failed connection).
    failed_attempts: u32,
    reconnects: Vec<Reconnect>,
    /// Out-of-order or duplicate ids, id-less events, wrong headers.
    problems: Vec<String>,
}

/// A fleet of light reconnecting SSE clients on one shared reqwest client, behaving like
/// browsers' `EventSource`: honour `retry:`, resume with `Last-Event-ID`.
struct Clients {
    seen: Vec<Arc<Mutex<Seen>>>,
    open: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl Clients {
    fn spawn(cluster: &Cluster, n: usize) -> Clients {
        let open = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let seen: Vec<_> = (0..n)
            .map(|_| Arc::new(Mutex::new(Seen::default())))
            .collect();
        for s in &seen {
            tokio::spawn(run_client(
                cluster.http.clone(),
                cluster.stream_url(),
                Arc::clone(s),
                Arc::clone(&open),
                stop.clone(),
            ));
        }
        Clients { seen, open, stop }
    }

    fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    async fn wait_open(&self, n: usize, timeout: Duration) {
        let what = format!("{n} streams open through nginx");
        eventually(&what, timeout, || async {
            (self.open() == n).then_some(())
        })
        .await;
    }

    /// Waits until every client's last id is `last`.
    async fn wait_all_have(&self, last: &str, timeout: Duration) {
        let what = format!("every client received {last}");
        eventually(&what, timeout, || async {
            let behind = self
                .seen
                .iter()
                .filter(|s| s.lock().unwrap().ids.last().map(String::as_str) != Some(last))
                .count();
            (behind == 0).then_some(())
        })
        .await;
    }
}

impl Drop for Clients {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Sleeps `ms`, or returns false at once if the test is over.
async fn pause(stop: &CancellationToken, ms: u64) -> bool {
    tokio::select! {
        _ = stop.cancelled() => false,
        _ = tokio::time::sleep(Duration::from_millis(ms)) => true,
    }
}

async fn run_client(
    http: reqwest::Client,
    url: String,
    seen: Arc<Mutex<Seen>>,
    open: Arc<AtomicUsize>,
    stop: CancellationToken,
) {
    let mut last_id: Option<String> = None;
    // EventSource's usual default until the server's first `retry:` line.
    let mut retry_ms: u64 = 3000;
    // When the previous stream ended (kept across failed attempts) and the hint then.
    let mut ended: Option<(Instant, u64)> = None;
    loop {
        let mut request = http
            .get(&url)
            .header("accept", "text/event-stream")
            .header("accept-encoding", "gzip")
            .header("cache-control", "no-cache");
        if let Some(id) = &last_id {
            request = request.header("last-event-id", id);
        }
        let response = tokio::select! {
            _ = stop.cancelled() => return,
            response = request.send() => response,
        };
        let response = match response {
            Ok(r) if r.status() == 200 => r,
            _ => {
                seen.lock().unwrap().failed_attempts += 1;
                if ended.is_none() {
                    ended = Some((Instant::now(), retry_ms));
                }
                if !pause(&stop, retry_ms).await {
                    return;
                }
                continue;
            }
        };
        check_headers(&response, &seen);
        let mut body = response.bytes_stream();
        let mut parser = SseBlocks::default();
        let mut opened = false;
        loop {
            let chunk = tokio::select! {
                _ = stop.cancelled() => {
                    if opened {
                        open.fetch_sub(1, Ordering::SeqCst);
                    }
                    return;
                }
                chunk = body.next() => chunk,
            };
            let Some(Ok(bytes)) = chunk else { break };
            let now = Instant::now();
            let mut seen = seen.lock().unwrap();
            if !opened {
                opened = true;
                seen.streams += 1;
                open.fetch_add(1, Ordering::SeqCst);
                if let Some((at, hint_ms)) = ended.take() {
                    seen.reconnects.push(Reconnect {
                        ended: at,
                        resumed: now,
                        hint_ms,
                    });
                }
            }
            for block in parser.push(&bytes) {
                if let Some(ms) = block.retry {
                    retry_ms = ms;
                }
                match (block.data, block.id) {
                    (None, _) => {
                        if block.comment {
                            seen.heartbeats.push(now);
                        }
                    }
                    (Some(data), None) => {
                        seen.problems.push(format!("event without an id: {data}"));
                    }
                    (Some(_), Some(id)) => {
                        let newer = match (&last_id, parse_stream_id(&id)) {
                            (_, None) => false,
                            (None, Some(_)) => true,
                            (Some(prev), Some(this)) => parse_stream_id(prev) < Some(this),
                        };
                        if !newer {
                            let prev = last_id.as_deref().unwrap_or("-");
                            seen.problems
                                .push(format!("id {id} after {prev}: duplicate or out of order"));
                        }
                        seen.ids.push(id.clone());
                        seen.received_at.push(now);
                        last_id = Some(id);
                    }
                }
            }
        }
        if opened {
            open.fetch_sub(1, Ordering::SeqCst);
        }
        if ended.is_none() {
            ended = Some((Instant::now(), retry_ms));
        }
        if !pause(&stop, retry_ms).await {
            return;
        }
    }
}

/// The stream must come through as an event stream, never compressed.
fn check_headers(response: &reqwest::Response, seen: &Mutex<Seen>) {
    let headers = response.headers();
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mut problems = Vec::new();
    if !content_type.starts_with("text/event-stream") {
        problems.push(format!("content-type {content_type:?} through nginx"));
    }
    if let Some(encoding) = headers.get("content-encoding") {
        problems.push(format!("stream compressed through nginx: {encoding:?}"));
    }
    if !problems.is_empty() {
        seen.lock().unwrap().problems.extend(problems);
    }
}

/// The value at quantile `q` of sorted `values`.
fn quantile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((sorted.len() as f64) * q).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn distribution(values: &[u64]) -> String {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    format!(
        "n={} min={} p50={} p90={} p99={} max={}",
        sorted.len(),
        sorted.first().copied().unwrap_or(0),
        quantile(&sorted, 0.50),
        quantile(&sorted, 0.90),
        quantile(&sorted, 0.99),
        sorted.last().copied().unwrap_or(0)
    )
}

/// Waits until the stats answer through nginx counts `clients` in total, lists every
/// replica, and each replica's entry equals that replica's own count. Returns the entries.
async fn wait_stats_cover_every_client(cluster: &Cluster, clients: u64) -> BTreeMap<String, u64> {
    let what = format!("stats through nginx report {clients} clients over {REPLICAS} replicas");
    eventually(&what, Duration::from_secs(15), || async {
        let stats = cluster.get_json_via_nginx("/api/events/stats").await?;
        if stats["active_clients"].as_u64()? != clients {
            return None;
        }
        let entries: BTreeMap<String, u64> = stats["replicas"]
            .as_array()?
            .iter()
            .filter_map(|r| Some((r["id"].as_str()?.to_owned(), r["active_clients"].as_u64()?)))
            .collect();
        if entries.len() != REPLICAS || entries.values().sum::<u64>() != clients {
            return None;
        }
        for i in 0..REPLICAS {
            if entries.get(&replica_name(i)) != Some(&cluster.clients_of(i).await?) {
                return None;
            }
        }
        Some(entries)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stream_through_nginx_is_unbuffered_and_reaches_every_client_within_100ms() {
    let Some(nginx) = tools::require(tools::nginx()) else {
        return;
    };
    const CLIENTS: usize = 30;
    const EVENTS: usize = 10;
    let settings = Settings {
        heartbeat_secs: 1,
        retry_ms: 1000,
        drain_secs: 5,
    };
    let _serial = ONE_AT_A_TIME.lock().await;
    let cluster = Cluster::start(&nginx, settings).await;
    let clients = Clients::spawn(&cluster, CLIENTS);
    clients.wait_open(CLIENTS, Duration::from_secs(10)).await;

    // Stats through the proxy count every client of every replica, and nginx spread them.
    let entries = wait_stats_cover_every_client(&cluster, CLIENTS as u64).await;
    for (name, count) in &entries {
        assert!(*count > 0, "nginx sent no client to {name}: {entries:?}");
    }
    eprintln!("clients per replica through nginx: {entries:?}");

    // Heartbeats arrive one interval apart: nothing between gateway and client buffers.
    eventually(
        "three heartbeats on every client",
        Duration::from_secs(10),
        || async {
            let fewest = clients
                .seen
                .iter()
                .map(|s| s.lock().unwrap().heartbeats.len())
                .min()?;
            (fewest >= 3).then_some(())
        },
    )
    .await;
    // A buffering or compressing proxy holds them far longer (gzip: until the stream ends);
    // twice the interval leaves room for a loaded CI machine.
    let limit = Duration::from_secs(2 * settings.heartbeat_secs);
    for (n, seen) in clients.seen.iter().enumerate() {
        let seen = seen.lock().unwrap();
        for pair in seen.heartbeats.windows(2) {
            let gap = pair[1] - pair[0];
            assert!(
                gap <= limit,
                "client {n}: heartbeats {gap:?} apart through nginx (every {}s sent)",
                settings.heartbeat_secs
            );
        }
    }

    // Events published with FCALL reach every client within 100 ms.
    let mut producer = cluster.producer().await;
    let mut published = Vec::new();
    for n in 0..EVENTS {
        let sent = Instant::now();
        let id = producer.publish("proxy_probe", &json!({ "n": n })).await;
        published.push((id, sent));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let last = published.last().unwrap().0.clone();
    clients.wait_all_have(&last, Duration::from_secs(5)).await;
    let mut latencies = Vec::new();
    for (n, seen) in clients.seen.iter().enumerate() {
        let seen = seen.lock().unwrap();
        assert!(seen.problems.is_empty(), "client {n}: {:?}", seen.problems);
        let ids: Vec<&str> = published.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(
            seen.ids, ids,
            "client {n} did not get exactly the published events"
        );
        for ((_, sent), received) in published.iter().zip(&seen.received_at) {
            latencies.push((*received - *sent).as_micros() as u64);
        }
    }
    latencies.sort_unstable();
    eprintln!(
        "FCALL -> client through nginx, {CLIENTS} clients x {EVENTS} events, latency us: {}",
        distribution(&latencies)
    );
    let worst = *latencies.last().unwrap();
    assert!(
        worst < 100_000,
        "an event took {worst} us from FCALL to a client through nginx (limit 100 ms)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rolling_restart_behind_nginx_loses_no_event() {
    let Some(nginx) = tools::require(tools::nginx()) else {
        return;
    };
    const CLIENTS: usize = 300;
    const PUBLISH_EVERY: Duration = Duration::from_millis(50);
    let settings = Settings {
        heartbeat_secs: 2,
        retry_ms: 1000,
        drain_secs: 5,
    };
    let _serial = ONE_AT_A_TIME.lock().await;
    let started = Instant::now();
    let mut cluster = Cluster::start(&nginx, settings).await;
    let clients = Clients::spawn(&cluster, CLIENTS);
    clients.wait_open(CLIENTS, Duration::from_secs(20)).await;
    let before = wait_stats_cover_every_client(&cluster, CLIENTS as u64).await;
    eprintln!("clients per replica before the restarts: {before:?}");

    // A steady producer, straight to Redis, for the whole restart.
    let published = Arc::new(Mutex::new(Vec::<String>::new()));
    let producing = CancellationToken::new();
    let producer_task = {
        let mut producer = cluster.producer().await;
        let published = Arc::clone(&published);
        let producing = producing.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(PUBLISH_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut seq = 0u64;
            loop {
                tokio::select! {
                    _ = producing.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let id = producer
                    .publish("rolling_restart", &json!({ "seq": seq }))
                    .await;
                published.lock().unwrap().push(id);
                seq += 1;
            }
        })
    };
    let publishing = |n: usize| {
        let published = Arc::clone(&published);
        async move { (published.lock().unwrap().len() >= n).then_some(()) }
    };
    eventually("the producer is publishing", Duration::from_secs(5), || {
        publishing(10)
    })
    .await;

    // One replica at a time: SIGTERM, wait for exit 0, start it again on the same port,
    // wait until it is ready and every client has a stream again.
    let drain_deadline = Duration::from_secs(settings.drain_secs + 3);
    let mut restarts = Vec::new();
    for i in 0..REPLICAS {
        let clients_before = cluster.clients_of(i).await.unwrap_or(0);
        let sigterm = Instant::now();
        let drained =
            tokio::task::block_in_place(|| cluster.replicas[i].stop_within(drain_deadline));
        tokio::task::block_in_place(|| cluster.replicas[i].restart());
        cluster.wait_ready(i).await;
        clients.wait_open(CLIENTS, Duration::from_secs(10)).await;
        eprintln!(
            "restarted {}: {clients_before} clients, drained in {} ms, back after {} ms",
            replica_name(i),
            drained.as_millis(),
            sigterm.elapsed().as_millis()
        );
        restarts.push((sigterm, clients_before));
        let target = published.lock().unwrap().len() + 10;
        eventually(
            "publishing between restarts",
            Duration::from_secs(5),
            || publishing(target),
        )
        .await;
    }

    // Stop publishing; every client must catch up with the last event.
    producing.cancel();
    producer_task.await.expect("producer task");
    let published = published.lock().unwrap().clone();
    let last = published.last().expect("events were published").clone();
    clients.wait_all_have(&last, Duration::from_secs(15)).await;
    let after = wait_stats_cover_every_client(&cluster, CLIENTS as u64).await;

    let mut reconnects = Vec::new();
    let mut failed_attempts = 0;
    for (n, seen) in clients.seen.iter().enumerate() {
        let seen = seen.lock().unwrap();
        assert!(seen.problems.is_empty(), "client {n}: {:?}", seen.problems);
        if seen.ids != published {
            let missing: Vec<_> = published
                .iter()
                .filter(|id| !seen.ids.contains(id))
                .collect();
            panic!(
                "client {n} got {} events, {} were published; missing {:?}",
                seen.ids.len(),
                published.len(),
                missing
            );
        }
        failed_attempts += seen.failed_attempts;
        reconnects.extend(seen.reconnects.iter().copied());
    }
    let moved: u64 = restarts.iter().map(|(_, c)| c).sum();
    assert!(
        reconnects.len() as u64 >= moved,
        "{} reconnects for {moved} clients of restarted replicas",
        reconnects.len()
    );

    // Reconnect times, and how each draining replica spread its clients' returns.
    let millis: Vec<u64> = reconnects.iter().map(Reconnect::millis).collect();
    let hints: Vec<u64> = reconnects.iter().map(|r| r.hint_ms).collect();
    let proxy_ms: Vec<u64> = reconnects
        .iter()
        .map(|r| r.millis().saturating_sub(r.hint_ms))
        .collect();
    eprintln!(
        "rolling restart: {CLIENTS} clients, {} events published at {} ms intervals, \
         {REPLICAS} replicas restarted, test took {} ms so far",
        published.len(),
        PUBLISH_EVERY.as_millis(),
        started.elapsed().as_millis()
    );
    eprintln!(
        "reconnect ms (stream end -> first byte of next stream): {}",
        distribution(&millis)
    );
    eprintln!(
        "  retry: hint ms honoured:                              {}",
        distribution(&hints)
    );
    eprintln!(
        "  beyond the hint (proxy + replica) ms:                 {}",
        distribution(&proxy_ms)
    );
    eprintln!("  requests that got no stream (error or refused): {failed_attempts}");
    for (k, (sigterm, clients_before)) in restarts.iter().enumerate() {
        let next = restarts.get(k + 1).map(|(t, _)| *t);
        let returns: Vec<u64> = reconnects
            .iter()
            .filter(|r| r.ended >= *sigterm && next.is_none_or(|t| r.ended < t))
            .map(|r| (r.resumed - *sigterm).as_millis() as u64)
            .collect();
        let mut buckets = BTreeMap::<u64, usize>::new();
        for ms in &returns {
            *buckets.entry(ms / 100).or_default() += 1;
        }
        let busiest = buckets.values().copied().max().unwrap_or(0);
        eprintln!(
            "  restart {}: {clients_before} clients moved; returns after SIGTERM ms: {}; \
             busiest 100 ms: {busiest}",
            k + 1,
            distribution(&returns)
        );
        // Spread over the drain's `retry:` window (10-100 % of --retry-ms): no instant
        // takes a large share of the herd.
        assert!(
            returns.len() < 20 || busiest * 100 <= returns.len() * 35,
            "restart {}: {busiest} of {} reconnects within one 100 ms window",
            k + 1,
            returns.len()
        );
    }
    eprintln!("clients per replica after the restarts: {after:?}");
    // A refused or 503 replica is nginx's to skip (proxy_next_upstream); no client may see
    // an error for it.
    assert_eq!(
        failed_attempts,
        0,
        "stream requests through nginx failed during the rolling restart:\n{}",
        cluster.nginx.access_log()
    );
    let worst = millis.iter().copied().max().unwrap_or(0);
    assert!(
        worst < settings.retry_ms + 4000,
        "a client needed {worst} ms to get a stream again"
    );
}
