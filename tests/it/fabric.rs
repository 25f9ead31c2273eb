//! Several replicas sharing one Redis: fan-out from every producer path (Function call,
//! plain `PUBLISH`, HTTP on another replica), a 10,000-event burst, resume on another
//! replica, cluster-wide stats, a Redis restart under connected clients, garbage on the
//! channel, Redis absent at start-up, idempotent publishes, the operator CLI and a producer
//! in another language. Real processes only: an own `redis-server` (or `REDIS_URL`), real
//! gateways, real SSE clients; Redis commands come from the `redis` crate, as any other
//! client's would. Every expectation comes from `docs/contract.md` and the Redis contract.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use redis::aio::MultiplexedConnection;
use reqwest::StatusCode;
use reqwest_eventsource::{Event as EsEvent, EventSource};
use serde_json::{Value, json};

use crate::harness::sse::{Next, assert_json_error, blocks, event_blocks, parse_block, seqs};
use crate::harness::{
    Api, ConnectOpts, GatewayBuilder, GatewayProc, RawSse, RedisProc, SseClient, eventually,
    free_port, parse_stream_id, tools, unique_namespace,
};

/// Per-step wait for things that should happen "at once".
const T: Duration = Duration::from_secs(10);

/// How quickly the cluster stats must follow a client connecting or leaving.
const STATS_FOLLOW: Duration = Duration::from_secs(2);

/// How long a `kill -9`'d replica may stay in the stats (it should age out after 10 s).
const AGE_OUT_LIMIT: Duration = Duration::from_secs(30);

/// Metric counting messages dropped from the Redis channel.
const BAD_MESSAGES: &str = "eventfabric_bad_broker_messages_total";

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

fn stream_key(ns: &str) -> String {
    format!("{{{ns}}}:stream")
}

fn channel(ns: &str) -> String {
    format!("{{{ns}}}:events")
}

/// A replica of namespace `ns` on `redis_url`.
fn replica(redis_url: &str, ns: &str, id: &str) -> GatewayBuilder {
    GatewayBuilder::new()
        .redis_url(redis_url)
        .namespace(ns)
        .replica_id(id)
}

/// One Redis, one namespace, N replicas. Gateways are declared first so they are killed
/// before their Redis.
struct Fabric {
    gws: Vec<GatewayProc>,
    ns: String,
    redis: RedisProc,
}

impl Fabric {
    /// Starts Redis (own or `REDIS_URL`) and `n` replicas `<prefix>-1..n`, each built by
    /// `tune`, and waits until every replica is ready.
    async fn start(
        prefix: &str,
        n: usize,
        tune: impl Fn(GatewayBuilder) -> GatewayBuilder,
    ) -> Self {
        let redis = RedisProc::start();
        Self::start_on(redis, prefix, n, tune).await
    }

    async fn start_on(
        redis: RedisProc,
        prefix: &str,
        n: usize,
        tune: impl Fn(GatewayBuilder) -> GatewayBuilder,
    ) -> Self {
        let ns = unique_namespace(prefix);
        let gws: Vec<GatewayProc> = (1..=n)
            .map(|i| tune(replica(redis.url(), &ns, &format!("{prefix}-{i}"))).spawn())
            .collect();
        for gw in &gws {
            gw.api().wait_ready(T).await;
        }
        Fabric { gws, ns, redis }
    }

    fn api(&self, i: usize) -> Api {
        self.gws[i].api()
    }

    async fn conn(&self) -> MultiplexedConnection {
        redis_conn(self.redis.url()).await
    }
}

/// A multiplexed connection with generous timeouts (a 10,000-command pipeline takes a
/// while to answer; the crate's default response timeout is 500 ms).
async fn redis_conn(url: &str) -> MultiplexedConnection {
    let client = redis::Client::open(url).unwrap_or_else(|e| panic!("bad Redis URL {url}: {e}"));
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(Duration::from_secs(60)));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to Redis at {url}: {e}"))
}

fn fcall_cmd(ns: &str, ty: &str, data: &str, idempotency_key: Option<&str>) -> redis::Cmd {
    let mut cmd = redis::cmd("FCALL");
    cmd.arg("eventfabric_publish")
        .arg(1)
        .arg(stream_key(ns))
        .arg(ty)
        .arg(data);
    if let Some(key) = idempotency_key {
        cmd.arg(key);
    }
    cmd
}

/// `FCALL eventfabric_publish 1 {ns}:stream <type> <data> [<key>]`.
async fn try_fcall(
    conn: &mut MultiplexedConnection,
    ns: &str,
    ty: &str,
    data: &str,
    idempotency_key: Option<&str>,
) -> redis::RedisResult<String> {
    fcall_cmd(ns, ty, data, idempotency_key)
        .query_async(conn)
        .await
}

/// Like [`try_fcall`] with JSON data; panics on error and checks the id's shape.
async fn fcall(conn: &mut MultiplexedConnection, ns: &str, ty: &str, data: &Value) -> String {
    let id = try_fcall(conn, ns, ty, &data.to_string(), None)
        .await
        .unwrap_or_else(|e| panic!("FCALL eventfabric_publish {ty} {data} failed: {e}"));
    assert!(
        parse_stream_id(&id).is_some(),
        "FCALL returned {id:?}, not an id"
    );
    id
}

/// Plain `PUBLISH {ns}:events <payload>`; returns how many subscribers got it.
async fn publish_raw(conn: &mut MultiplexedConnection, ns: &str, payload: &[u8]) -> i64 {
    redis::cmd("PUBLISH")
        .arg(channel(ns))
        .arg(payload)
        .query_async(conn)
        .await
        .unwrap_or_else(|e| panic!("PUBLISH failed: {e}"))
}

/// Plain `PUBLISH` of `{"type": ty, "data": data}`; asserts at least `min_receivers`.
async fn publish_plain(
    conn: &mut MultiplexedConnection,
    ns: &str,
    ty: &str,
    data: &Value,
    min_receivers: i64,
) {
    let payload = json!({"type": ty, "data": data}).to_string();
    let n = publish_raw(conn, ns, payload.as_bytes()).await;
    assert!(
        n >= min_receivers,
        "PUBLISH reached {n} subscribers, expected at least {min_receivers} (one per replica)"
    );
}

/// Connects a parsed client (the session is registered once the prelude has arrived).
async fn client(api: &Api) -> SseClient {
    SseClient::connect(api.base(), ConnectOpts::default()).await
}

/// Polls the cluster stats (through `api`) until `active_clients == n`.
async fn wait_cluster_clients(api: &Api, n: u64, timeout: Duration) {
    let what = format!("cluster active_clients == {n} (stats of {})", api.base());
    eventually(&what, timeout, || async move {
        (api.active_clients().await == n).then_some(())
    })
    .await
}

/// `replicas` of the stats as id → active_clients.
fn replica_map(stats: &Value) -> BTreeMap<String, u64> {
    stats["replicas"]
        .as_array()
        .unwrap_or_else(|| panic!("stats have no `replicas` array: {stats}"))
        .iter()
        .map(|r| {
            let id = r["id"]
                .as_str()
                .unwrap_or_else(|| panic!("replica without string id: {r}"));
            let clients = r["active_clients"]
                .as_u64()
                .unwrap_or_else(|| panic!("replica without integer active_clients: {r}"));
            assert!(
                r["last_seen_ms"].as_u64().is_some(),
                "replica without integer last_seen_ms: {r}"
            );
            (id.to_string(), clients)
        })
        .collect()
}

/// Polls the stats of `api` until the replicas are exactly `want` (id → clients) and
/// `active_clients` is their sum; returns how long it took.
async fn wait_replicas(api: &Api, want: &[(&str, u64)], timeout: Duration) -> Duration {
    let start = Instant::now();
    let want: BTreeMap<String, u64> = want.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    let sum: u64 = want.values().sum();
    let deadline = start + timeout;
    loop {
        let stats = api.stats().await;
        let got = replica_map(&stats);
        if got == want && stats["active_clients"].as_u64() == Some(sum) {
            return start.elapsed();
        }
        if Instant::now() >= deadline {
            panic!(
                "stats of {} did not show replicas {want:?} (active_clients {sum}) within \
                 {timeout:?}; last: {stats}",
                api.base()
            );
        }
        tokio::time::sleep(crate::harness::POLL_INTERVAL).await;
    }
}

/// Asserts that no further message arrives on `c` within `quiet`.
async fn assert_quiet(c: &mut SseClient, quiet: Duration, what: &str) {
    match c.next(quiet).await {
        Next::Timeout => {}
        other => panic!(
            "{what}: expected nothing more, got {other:?}; received: {}",
            c.summary()
        ),
    }
}

/// One event block of a raw SSE body.
#[derive(Debug, Clone)]
struct RawEvent {
    id_line: Option<String>,
    json: Value,
}

impl RawEvent {
    fn seq(&self) -> Option<u64> {
        self.json["data"]["seq"].as_u64()
    }
}

/// The event blocks (not comments, not `retry:` hints) of a raw SSE body, in order; panics
/// on one whose data is not JSON.
fn raw_events(text: &str) -> Vec<RawEvent> {
    event_blocks(text)
        .into_iter()
        .map(|b| {
            let block = parse_block(b);
            RawEvent {
                json: block.json(),
                id_line: block.id,
            }
        })
        .collect()
}

/// How many `: heartbeat` comments a raw SSE body holds.
fn heartbeats(text: &str) -> usize {
    blocks(text)
        .into_iter()
        .filter(|b| b.starts_with(": heartbeat"))
        .count()
}

/// Runs the `eventfabric` binary with `args` (blocking, bounded); returns exit success,
/// stdout and stderr. `REDIS_URL` and `EVENTFABRIC_*` are scrubbed from its environment.
fn run_cli(args: &[&str], timeout: Duration) -> (bool, String, String) {
    let bin = env!("CARGO_BIN_EXE_eventfabric");
    let mut cmd = Command::new(bin);
    cmd.args(args).env_remove("REDIS_URL");
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("EVENTFABRIC_") {
            cmd.env_remove(&k);
        }
    }
    run_bounded(cmd, timeout)
}

/// Runs `cmd` with piped output, killing it after `timeout`.
fn run_bounded(mut cmd: Command, timeout: Duration) -> (bool, String, String) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{cmd:?} did not finish within {timeout:?}");
            }
            Err(e) => panic!("waiting for {cmd:?}: {e}"),
        }
    }
    let out = child.wait_with_output().expect("collect output");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// [`run_cli`] off the async worker threads.
async fn cli(args: &[&str]) -> (bool, String, String) {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        run_cli(&refs, T)
    })
    .await
    .expect("cli task")
}

// ---------------------------------------------------------------------------------------
// 1. Fan-out from every producer path
// ---------------------------------------------------------------------------------------

/// What a publish in test 1 should look like on every client.
#[derive(Debug)]
struct Expected {
    seq: u64,
    ty: &'static str,
    /// `Some(id)` for durable events (Function call or HTTP), `None` for plain PUBLISH.
    id: Option<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replica_receives_fcall_plain_publish_and_http_events_in_order() {
    let fab = Fabric::start("fan", 3, |b| b).await;
    let mut conn = fab.conn().await;
    let mut clients = Vec::new();
    for i in 0..3 {
        clients.push(client(&fab.api(i)).await);
    }
    let mut raw = RawSse::connect(fab.api(0).base(), ConnectOpts::default()).await;
    assert_eq!(raw.status, StatusCode::OK);
    wait_cluster_clients(&fab.api(2), 4, T).await;

    let mut expected: Vec<Expected> = Vec::new();
    for round in 0..2u64 {
        let base = round * 3;
        let id = fcall(&mut conn, &fab.ns, "job_updated", &json!({"seq": base})).await;
        expected.push(Expected {
            seq: base,
            ty: "job_updated",
            id: Some(id),
        });
        publish_plain(
            &mut conn,
            &fab.ns,
            "cache_updated",
            &json!({"seq": base + 1, "rebuild_complete": true}),
            3,
        )
        .await;
        expected.push(Expected {
            seq: base + 1,
            ty: "cache_updated",
            id: None,
        });
        // HTTP on a replica other than the first: 2nd replica, then 3rd.
        let api = fab.api(1 + round as usize);
        let id = api.publish("order_placed", json!({"seq": base + 2})).await;
        expected.push(Expected {
            seq: base + 2,
            ty: "order_placed",
            id: Some(id),
        });
    }

    for (r, c) in clients.iter_mut().enumerate() {
        let got = c.collect(expected.len(), T).await;
        for (e, want) in got.iter().zip(&expected) {
            assert_eq!(
                e.seq(),
                Some(want.seq),
                "replica {r}: order differs; got {}",
                c.summary()
            );
            assert_eq!(e.ty(), want.ty, "replica {r}: {e:?}");
            assert_eq!(e.event, "message", "no `event:` field expected: {e:?}");
            assert!(e.json["ts"].as_u64().is_some(), "no integer ts: {e:?}");
            if let Some(id) = &want.id {
                assert_eq!(&e.id, id, "replica {r}: SSE id differs from the publish id");
                assert_eq!(e.json_id(), id, "replica {r}: JSON id differs: {e:?}");
            }
        }
        assert_quiet(c, Duration::from_millis(300), &format!("replica {r}")).await;
    }

    // Byte level: durable events carry an `id:` line, plain PUBLISHes do not.
    let n = expected.len();
    assert!(
        raw.read_until(T, |t| raw_events(t).len() >= n).await,
        "raw client did not get {n} events; body so far: {:?}",
        raw.text
    );
    let evs = raw_events(&raw.text);
    for (e, want) in evs.iter().zip(&expected) {
        assert_eq!(e.seq(), Some(want.seq), "raw order: {evs:?}");
        assert_eq!(e.id_line, want.id, "raw `id:` line of {e:?}");
    }
}

// ---------------------------------------------------------------------------------------
// 2. A 10,000-event burst
// ---------------------------------------------------------------------------------------

/// A stalling client stops reading after this many events...
const PAUSE_AFTER: usize = 100;
/// ... for this long.
const STALL: Duration = Duration::from_millis(1500);
/// Padding per burst event, so that a stalled client's socket buffers fill up.
const PAD: usize = 2000;

/// What one auto-reconnecting client saw.
#[derive(Debug, Default)]
struct Consumed {
    ids: Vec<String>,
    seqs: Vec<u64>,
    opens: usize,
    errors: Vec<String>,
    timed_out: bool,
}

/// Reads `url` with `reqwest_eventsource` (which reconnects by itself and sends
/// `Last-Event-ID`) until `n` events arrived or `deadline`. Nothing is de-duplicated.
async fn consume(
    url: String,
    n: usize,
    pause: Option<Duration>,
    deadline: tokio::time::Instant,
) -> Consumed {
    let mut out = Consumed::default();
    let mut pause = pause;
    let open = |url: &str, last: Option<&str>| {
        let mut req = reqwest::Client::new().get(url);
        if let Some(last) = last {
            // Only used to reopen after the source closed itself (e.g. a 503 answer):
            // the query parameter, since the source always adds its own (empty) header.
            req = reqwest::Client::new().get(format!("{url}?lastEventId={last}"));
        }
        let mut es = EventSource::new(req).expect("clonable request");
        es.set_retry_policy(Box::new(reqwest_eventsource::retry::Constant::new(
            Duration::from_millis(100),
            None,
        )));
        es
    };
    let mut es = open(&url, None);
    while out.seqs.len() < n {
        match tokio::time::timeout_at(deadline, es.next()).await {
            Err(_) => {
                out.timed_out = true;
                break;
            }
            Ok(None) => {
                let last = out.ids.last().cloned();
                es = open(&url, last.as_deref());
            }
            Ok(Some(Ok(EsEvent::Open))) => out.opens += 1,
            Ok(Some(Ok(EsEvent::Message(m)))) => {
                if m.data.is_empty() {
                    continue;
                }
                let v: Value = serde_json::from_str(&m.data)
                    .unwrap_or_else(|e| panic!("event data {:?} is not JSON: {e}", m.data));
                let seq = v["data"]["seq"]
                    .as_u64()
                    .unwrap_or_else(|| panic!("unexpected event {v}"));
                out.ids.push(m.id);
                out.seqs.push(seq);
                if out.seqs.len() == PAUSE_AFTER
                    && let Some(p) = pause.take()
                {
                    // Stop reading for a while, as a client on a bad network would: the
                    // gateway may drop it as slow, and it must then resume by id.
                    tokio::time::sleep(p).await;
                }
            }
            Ok(Some(Err(e))) => out.errors.push(e.to_string()),
        }
    }
    es.close();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_of_10000_pipelined_fcalls_reaches_every_client_complete_in_order() {
    const N: usize = 10_000;
    const PER_REPLICA: usize = 2;
    let fab = Fabric::start("burst", 3, |b| {
        b.opt("--retry-ms", 100).opt("--history", 20_000)
    })
    .await;
    let mut conn = fab.conn().await;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(75);
    let mut tasks = Vec::new();
    for r in 0..3 {
        for k in 0..PER_REPLICA {
            let url = format!("{}/api/events/stream", fab.api(r).base());
            // The second client of each replica stalls once, early in the burst.
            let pause = (k == 1).then_some(STALL);
            tasks.push((r, tokio::spawn(consume(url, N, pause, deadline))));
        }
    }
    wait_cluster_clients(&fab.api(0), (3 * PER_REPLICA) as u64, T).await;

    let started = Instant::now();
    let pad = "p".repeat(PAD);
    let mut pipe = redis::pipe();
    for i in 0..N {
        pipe.add_command(fcall_cmd(
            &fab.ns,
            "burst",
            &format!(r#"{{"seq":{i},"pad":"{pad}"}}"#),
            None,
        ));
    }
    let ids: Vec<String> = pipe
        .query_async(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("pipelined FCALLs failed: {e}"));
    assert_eq!(ids.len(), N);
    eprintln!("published {N} events in {:?}", started.elapsed());

    let want_seqs: Vec<u64> = (0..N as u64).collect();
    for (r, task) in tasks {
        let got = task.await.expect("consumer task");
        eprintln!(
            "replica {r}: {} events, {} connections, errors {:?}",
            got.seqs.len(),
            got.opens,
            got.errors.iter().take(5).collect::<Vec<_>>()
        );
        if got.seqs != want_seqs {
            let first_bad = got
                .seqs
                .iter()
                .zip(&want_seqs)
                .position(|(a, b)| a != b)
                .unwrap_or(got.seqs.len().min(N));
            let around: Vec<u64> = got
                .seqs
                .iter()
                .skip(first_bad.saturating_sub(3))
                .take(8)
                .copied()
                .collect();
            panic!(
                "replica {r}: got {} events (timed out: {}), expected seq 0..{N} exactly once in \
                 order; first difference at index {first_bad}: {around:?}; {} connections",
                got.seqs.len(),
                got.timed_out,
                got.opens
            );
        }
        if let Some(i) = (0..N).find(|&i| got.ids[i] != ids[i]) {
            panic!(
                "replica {r}: event {i} has id {:?}, the publish returned {:?}",
                got.ids[i], ids[i]
            );
        }
    }
    for (r, gw) in fab.gws.iter().enumerate() {
        let slow = gw
            .api()
            .metric("eventfabric_slow_client_disconnects_total")
            .await
            .unwrap_or(0.0);
        eprintln!("replica {r}: {slow} slow-client disconnects");
    }
}

// ---------------------------------------------------------------------------------------
// 3. Resume on a different replica
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_on_another_replica_replays_exactly_the_missed_events_then_live() {
    let fab = Fabric::start("resume", 2, |b| b).await;
    let (a, b) = (fab.api(0), fab.api(1));
    let mut conn = fab.conn().await;

    let mut on_a = client(&a).await;
    wait_cluster_clients(&b, 1, T).await;
    let mut ids = Vec::new();
    for seq in 0..3 {
        ids.push(a.publish_seq("job_updated", seq).await);
    }
    let seen = on_a.collect(3, T).await;
    assert_eq!(seqs(&seen), vec![0, 1, 2]);
    drop(on_a);
    wait_cluster_clients(&b, 0, T).await;

    // Missed while disconnected: two through HTTP on B, two through the Function.
    for seq in 3..7 {
        let id = if seq % 2 == 1 {
            b.publish_seq("job_updated", seq).await
        } else {
            fcall(&mut conn, &fab.ns, "job_updated", &json!({"seq": seq})).await
        };
        ids.push(id);
    }

    let mut on_b = SseClient::connect(b.base(), ConnectOpts::header(&ids[2])).await;
    let replayed = on_b.collect(4, T).await;
    assert_eq!(seqs(&replayed), vec![3, 4, 5, 6], "{}", on_b.summary());
    let replayed_ids: Vec<&str> = replayed.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(
        replayed_ids,
        ids[3..7].iter().map(String::as_str).collect::<Vec<_>>()
    );

    let live_id = fcall(&mut conn, &fab.ns, "job_updated", &json!({"seq": 7})).await;
    let live = on_b.expect_event(T).await;
    assert_eq!(live.seq(), Some(7), "{}", on_b.summary());
    assert_eq!(live.id, live_id);
    assert_quiet(&mut on_b, Duration::from_millis(300), "resumed client on B").await;

    // The query-parameter form, back on A, from further back.
    let mut again = SseClient::connect(a.base(), ConnectOpts::query(&ids[0])).await;
    let all = again.collect(7, T).await;
    assert_eq!(
        seqs(&all),
        (1..=7).collect::<Vec<_>>(),
        "{}",
        again.summary()
    );
    ids.push(live_id);

    // A replica started after all of this has none of it in memory: it must replay from
    // the shared stream in Redis, then go live.
    let late = replica(fab.redis.url(), &fab.ns, "resume-late").spawn();
    let c = late.api();
    c.wait_ready(T).await;
    let mut on_c = SseClient::connect(c.base(), ConnectOpts::header(&ids[2])).await;
    let replayed = on_c.collect(5, T).await;
    assert_eq!(seqs(&replayed), vec![3, 4, 5, 6, 7], "{}", on_c.summary());
    let replayed_ids: Vec<&str> = replayed.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(
        replayed_ids,
        ids[3..8].iter().map(String::as_str).collect::<Vec<_>>()
    );
    let live_id = a.publish_seq("job_updated", 8).await;
    let live = on_c.expect_event(T).await;
    assert_eq!(live.seq(), Some(8), "{}", on_c.summary());
    assert_eq!(live.id, live_id);
    assert_quiet(&mut on_c, Duration::from_millis(300), "resumed client on C").await;
}

// ---------------------------------------------------------------------------------------
// 4. Cluster stats
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_sum_clients_over_replicas_and_drop_stopped_and_killed_replicas() {
    let mut fab = Fabric::start("stats", 3, |b| b.opt("--drain-secs", 2)).await;
    let ids = ["stats-1", "stats-2", "stats-3"];
    let mut conn = fab.conn().await;

    // 1 + 2 + 3 clients.
    let mut clients: Vec<Vec<SseClient>> = vec![Vec::new(), Vec::new(), Vec::new()];
    for (r, list) in clients.iter_mut().enumerate() {
        for _ in 0..=r {
            list.push(client(&fab.api(r)).await);
        }
    }
    for r in 0..3 {
        wait_replicas(
            &fab.api(r),
            &[(ids[0], 1), (ids[1], 2), (ids[2], 3)],
            STATS_FOLLOW,
        )
        .await;
    }

    // Disconnects and connects show up within two seconds, on every replica's stats.
    clients[2].truncate(1);
    let took = wait_replicas(
        &fab.api(0),
        &[(ids[0], 1), (ids[1], 2), (ids[2], 1)],
        STATS_FOLLOW,
    )
    .await;
    eprintln!("two disconnects visible after {took:?}");
    clients[0].push(client(&fab.api(0)).await);
    let took = wait_replicas(
        &fab.api(2),
        &[(ids[0], 2), (ids[1], 2), (ids[2], 1)],
        STATS_FOLLOW,
    )
    .await;
    eprintln!("one connect visible after {took:?}");

    // Event counters come from Redis: durable publishes only, whichever replica or client.
    fab.api(1).publish("job_updated", json!({"n": 1})).await;
    fcall(&mut conn, &fab.ns, "job_updated", &json!({"n": 2})).await;
    fcall(&mut conn, &fab.ns, "cache_updated", &json!({"n": 3})).await;
    publish_plain(&mut conn, &fab.ns, "cache_updated", &json!({"n": 4}), 3).await;
    for r in 0..3 {
        let s = fab.api(r).stats().await;
        assert_eq!(s["total_events_broadcast"], json!(3), "replica {r}: {s}");
        assert_eq!(
            s["events_by_type"],
            json!({"job_updated": 2, "cache_updated": 1}),
            "replica {r}: {s}"
        );
    }

    // SIGTERM: the replica removes itself at once.
    fab.gws[1].stop();
    let took = wait_replicas(
        &fab.api(2),
        &[(ids[0], 2), (ids[2], 1)],
        Duration::from_secs(2),
    )
    .await;
    eprintln!("gracefully stopped replica gone from the stats {took:?} after its exit");

    // kill -9: it ages out (10 s; the limit is 30 s).
    let killed_at = Instant::now();
    fab.gws[0].kill9();
    wait_replicas(&fab.api(2), &[(ids[2], 1)], AGE_OUT_LIMIT).await;
    eprintln!("kill -9'd replica aged out after {:?}", killed_at.elapsed());
    let s = fab.api(2).stats().await;
    assert_eq!(s["active_clients"], json!(1), "{s}");
    assert_eq!(s["total_events_broadcast"], json!(3), "{s}");
}

// ---------------------------------------------------------------------------------------
// 5. Redis killed and restarted under connected clients
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_under_connected_clients_loses_no_accepted_event() {
    let redis = RedisProc::start();
    if tools::require(redis.killable()).is_none() {
        return;
    }
    let mut fab = Fabric::start_on(redis, "outage", 2, |b| b.opt("--heartbeat-secs", 1)).await;
    let apis = [fab.api(0), fab.api(1)];
    let mut raws = Vec::new();
    for api in &apis {
        let r = RawSse::connect(api.base(), ConnectOpts::default()).await;
        assert_eq!(r.status, StatusCode::OK);
        raws.push(r);
    }
    wait_cluster_clients(&apis[0], 2, T).await;

    // Before: accepted on either replica.
    let mut accepted: Vec<(u64, String)> = Vec::new();
    for seq in 0..3u64 {
        let id = apis[seq as usize % 2].publish_seq("job_updated", seq).await;
        accepted.push((seq, id));
    }
    for r in raws.iter_mut() {
        assert!(
            r.read_until(T, |t| raw_events(t).len() >= 3).await,
            "events before the outage missing: {:?}",
            r.text
        );
    }

    // During: POST is refused with a JSON 503 (never 202), readiness drops, streams stay.
    fab.redis.kill();
    for (i, api) in apis.iter().enumerate() {
        let body = json!({"type": "job_updated", "data": {"seq": 100}}).to_string();
        let (status, text) = api.post_raw(body, "application/json").await;
        assert_json_error(
            status,
            &text,
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("POST on replica {i} right after kill"),
        );
    }
    for api in &apis {
        api.wait_readyz(StatusCode::SERVICE_UNAVAILABLE, T).await;
    }
    for (i, api) in apis.iter().enumerate() {
        let body = json!({"type": "job_updated", "data": {"seq": 101}}).to_string();
        let (status, text) = api.post_raw(body, "application/json").await;
        assert_json_error(
            status,
            &text,
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("POST on replica {i} while not ready"),
        );
    }
    for (i, r) in raws.iter_mut().enumerate() {
        let before = heartbeats(&r.text);
        assert!(
            r.read_until(Duration::from_secs(5), |t| heartbeats(t) >= before + 2)
                .await,
            "replica {i}: heartbeats stopped while Redis was down (ended: {:?}); body: {:?}",
            r.ended,
            r.text
        );
    }

    // After: once ready again, every path works.
    fab.redis.restart();
    for api in &apis {
        api.wait_ready(Duration::from_secs(20)).await;
    }
    for seq in 3..5u64 {
        let id = apis[seq as usize % 2].publish_seq("job_updated", seq).await;
        accepted.push((seq, id));
    }
    let mut conn = fab.conn().await;
    let id = fcall(&mut conn, &fab.ns, "job_updated", &json!({"seq": 5})).await;
    accepted.push((5, id));

    for (i, r) in raws.iter_mut().enumerate() {
        let n = accepted.len();
        assert!(
            r.read_until(T, |t| raw_events(t).len() >= n).await,
            "replica {i}: not all {n} accepted events arrived (ended: {:?}); body: {:?}",
            r.ended,
            r.text
        );
        // Nothing beyond them (no duplicates, none of the refused events).
        let _ = r.read_until(Duration::from_millis(300), |_| false).await;
        let got: Vec<(Option<u64>, Option<String>)> = raw_events(&r.text)
            .iter()
            .map(|e| (e.seq(), e.id_line.clone()))
            .collect();
        let want: Vec<(Option<u64>, Option<String>)> = accepted
            .iter()
            .map(|(s, id)| (Some(*s), Some(id.clone())))
            .collect();
        assert_eq!(
            got, want,
            "replica {i}: events differ from the accepted ones"
        );
        assert!(
            r.ended.is_none(),
            "replica {i}: the stream ended ({:?}); it must stay connected",
            r.ended
        );
    }
}

// ---------------------------------------------------------------------------------------
// 6. Garbage on the channel
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_channel_is_counted_and_dropped_and_delivery_continues() {
    let fab = Fabric::start("garbage", 2, |b| b.opt("--max-event-bytes", 1024)).await;
    let mut conn = fab.conn().await;
    let mut clients = [client(&fab.api(0)).await, client(&fab.api(1)).await];
    wait_cluster_clients(&fab.api(0), 2, T).await;
    let mut base = Vec::new();
    for r in 0..2 {
        base.push(fab.api(r).metric(BAD_MESSAGES).await.unwrap_or(0.0));
    }

    let oversized = format!(r#"{{"type":"big","data":"{}"}}"#, "x".repeat(4096));
    let garbage: Vec<(&str, Vec<u8>)> = vec![
        ("not JSON", b"hello, not json".to_vec()),
        ("JSON without type", br#"{"data":{"seq":-1}}"#.to_vec()),
        ("JSON that is not an object", b"[1,2,3]".to_vec()),
        (
            "invalid UTF-8",
            b"\xff\xfe{\"type\":\"x\",\"data\":\xc3}".to_vec(),
        ),
        ("over --max-event-bytes", oversized.into_bytes()),
    ];
    for (what, payload) in &garbage {
        let n = publish_raw(&mut conn, &fab.ns, payload).await;
        assert!(
            n >= 2,
            "PUBLISH of {what} reached {n} subscribers, expected 2"
        );
    }
    publish_plain(&mut conn, &fab.ns, "cache_updated", &json!({"seq": 1}), 2).await;
    let id = fcall(&mut conn, &fab.ns, "job_updated", &json!({"seq": 2})).await;

    for (r, c) in clients.iter_mut().enumerate() {
        let got = c.collect(2, T).await;
        assert_eq!(seqs(&got), vec![1, 2], "replica {r}: {}", c.summary());
        assert_eq!(got[1].id, id);
        assert_quiet(c, Duration::from_millis(300), &format!("replica {r}")).await;
        let api = fab.api(r);
        let want = base[r] + garbage.len() as f64;
        let now = api.wait_metric_at_least(BAD_MESSAGES, want, T).await;
        assert_eq!(
            now, want,
            "replica {r}: {BAD_MESSAGES} counted {now}, expected {want}"
        );
        let (status, _) = api.get("/readyz").await;
        assert_eq!(
            status,
            StatusCode::OK,
            "replica {r} not ready after garbage"
        );
        let log = fab.gws[r].log();
        assert!(
            log.lines().any(|l| l.contains("WARN")),
            "replica {r}: no warning logged for the garbage\n{log}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// 7. Redis absent at start-up
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_starts_without_redis_and_becomes_ready_when_it_appears() {
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}/");
    let ns = unique_namespace("absent");
    let gw = replica(&url, &ns, "absent-1").spawn();
    let api = gw.api();

    let (status, _) = api.get("/healthz").await;
    assert_eq!(status, StatusCode::OK, "/healthz while Redis is absent");
    let (status, body) = api.get("/readyz").await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "/readyz while Redis is absent: {body}"
    );
    let body = json!({"type": "job_updated", "data": {"seq": 0}}).to_string();
    let (status, text) = api.post_raw(body, "application/json").await;
    assert_json_error(
        status,
        &text,
        StatusCode::SERVICE_UNAVAILABLE,
        "POST while Redis is absent",
    );
    eventually("a warning about Redis in the log", T, || {
        let log = gw.log();
        async move {
            log.lines()
                .any(|l| l.contains("WARN") && l.to_lowercase().contains("redis"))
                .then_some(())
        }
    })
    .await;

    let redis = RedisProc::start_on_port(port);
    let appeared = Instant::now();
    api.wait_ready(T).await;
    eprintln!("ready {:?} after Redis appeared", appeared.elapsed());

    let mut c = client(&api).await;
    wait_cluster_clients(&api, 1, T).await;
    let id0 = api.publish_seq("job_updated", 0).await;
    let mut conn = redis_conn(redis.url()).await;
    let id1 = fcall(&mut conn, &ns, "job_updated", &json!({"seq": 1})).await;
    let got = c.collect(2, T).await;
    assert_eq!(seqs(&got), vec![0, 1]);
    assert_eq!(
        [got[0].id.as_str(), got[1].id.as_str()],
        [id0.as_str(), id1.as_str()]
    );
    drop(gw);
    drop(redis);
}

// ---------------------------------------------------------------------------------------
// 8. Idempotency and the Function's input checks
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_idempotency_key_yields_one_event_one_id_and_one_count() {
    let fab = Fabric::start("idem", 2, |b| b).await;
    let mut conn = fab.conn().await;
    let mut clients = [client(&fab.api(0)).await, client(&fab.api(1)).await];
    wait_cluster_clients(&fab.api(0), 2, T).await;

    let data = json!({"seq": 0, "job": "j-1"}).to_string();
    let first = try_fcall(&mut conn, &fab.ns, "job_updated", &data, Some("key-1"))
        .await
        .expect("first FCALL");
    let second = try_fcall(&mut conn, &fab.ns, "job_updated", &data, Some("key-1"))
        .await
        .expect("retried FCALL");
    assert_eq!(first, second, "the retry must return the first id");
    let other = fcall(&mut conn, &fab.ns, "marker", &json!({"seq": 1})).await;

    // Invalid input is refused with an `ERR` reply and stores nothing.
    for (ty, data, why) in [
        ("bad type!", "{}", "invalid type"),
        ("", "{}", "empty type"),
        ("job_updated", "{not json", "data not JSON"),
    ] {
        match try_fcall(&mut conn, &fab.ns, ty, data, None).await {
            Ok(id) => panic!("FCALL with {why} was accepted with id {id}"),
            Err(e) => assert_eq!(e.code(), Some("ERR"), "{why}: {e:?}"),
        }
    }

    for (r, c) in clients.iter_mut().enumerate() {
        let got = c.collect(2, T).await;
        assert_eq!(seqs(&got), vec![0, 1], "replica {r}: {}", c.summary());
        assert_eq!(got[0].id, first);
        assert_eq!(got[1].id, other);
        assert_quiet(c, Duration::from_millis(300), &format!("replica {r}")).await;
    }
    let s = fab.api(1).stats().await;
    assert_eq!(s["total_events_broadcast"], json!(2), "{s}");
    assert_eq!(
        s["events_by_type"],
        json!({"job_updated": 1, "marker": 1}),
        "{s}"
    );
    let len: u64 = redis::cmd("XLEN")
        .arg(stream_key(&fab.ns))
        .query_async(&mut conn)
        .await
        .expect("XLEN");
    assert_eq!(len, 2, "stream holds {len} entries");
}

// ---------------------------------------------------------------------------------------
// 9. The operator CLI
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_publish_and_stats_work_against_redis() {
    let fab = Fabric::start("cli", 1, |b| b).await;
    let (url, ns) = (fab.redis.url().to_string(), fab.ns.clone());
    let api = fab.api(0);
    let mut c = client(&api).await;
    wait_cluster_clients(&api, 1, T).await;
    let base = ["--redis-url", url.as_str(), "--namespace", ns.as_str()];

    let args = [
        &base[..],
        &["publish", "job_updated", r#"{"seq":0,"via":"cli"}"#],
    ]
    .concat();
    let (ok, out, err) = cli(&args).await;
    assert!(ok, "CLI publish failed: stdout {out:?}, stderr {err}");
    let id0 = out.trim().to_string();
    assert!(
        parse_stream_id(&id0).is_some(),
        "CLI printed {out:?}, not an id"
    );

    let args = [
        &base[..],
        &[
            "publish",
            "job_updated",
            r#"{"seq":1}"#,
            "--idempotency-key",
            "cli-k",
        ],
    ]
    .concat();
    let (ok1, out1, err1) = cli(&args).await;
    let (ok2, out2, err2) = cli(&args).await;
    assert!(ok1 && ok2, "CLI publish with a key failed: {err1} / {err2}");
    assert_eq!(out1.trim(), out2.trim(), "same key, different ids");
    let id1 = out1.trim().to_string();

    // Type without data: data is null.
    let (ok, out, err) = cli(&[&base[..], &["publish", "cache_updated"]].concat()).await;
    assert!(ok, "CLI publish without data failed: {err}");
    let id2 = out.trim().to_string();

    // Refused input: non-zero exit, nothing stored.
    let (ok, out, _) = cli(&[&base[..], &["publish", "job_updated", "{nope"]].concat()).await;
    assert!(!ok, "CLI accepted invalid JSON data and printed {out:?}");
    let (ok, out, _) = cli(&[&base[..], &["publish", "bad type", "{}"]].concat()).await;
    assert!(!ok, "CLI accepted an invalid type and printed {out:?}");

    let got = c.collect(3, T).await;
    let got_ids: Vec<&str> = got.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(
        got_ids,
        [id0.as_str(), id1.as_str(), id2.as_str()],
        "{}",
        c.summary()
    );
    assert_eq!(got[0].json["data"], json!({"seq": 0, "via": "cli"}));
    assert_eq!(got[2].ty(), "cache_updated");
    assert_eq!(got[2].json["data"], Value::Null);
    assert_quiet(&mut c, Duration::from_millis(300), "CLI events").await;

    let (ok, out, err) = cli(&[&base[..], &["stats"]].concat()).await;
    assert!(ok, "CLI stats failed: {err}");
    let s: Value = serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("CLI stats printed {out:?}, not JSON: {e}"));
    assert_eq!(s["total_events_broadcast"], json!(3), "{s}");
    assert_eq!(
        s["events_by_type"],
        json!({"job_updated": 2, "cache_updated": 1}),
        "{s}"
    );
    assert_eq!(s["active_clients"], json!(1), "{s}");
    assert_eq!(
        replica_map(&s),
        BTreeMap::from([("cli-1".to_string(), 1)]),
        "{s}"
    );
}

// ---------------------------------------------------------------------------------------
// 10. A producer in another language
// ---------------------------------------------------------------------------------------

const PY_PRODUCER: &str = r#"
import json, sys
import redis
url, ns = sys.argv[1], sys.argv[2]
r = redis.Redis.from_url(url)
i = r.fcall('eventfabric_publish', 1, '{%s}:stream' % ns, 'job_updated',
            json.dumps({'job': 'py-1', 'progress': 0.5, 'seq': 0}))
print(i.decode() if isinstance(i, bytes) else i)
n = r.publish('{%s}:events' % ns,
              json.dumps({'type': 'cache_updated', 'data': {'from': 'python', 'seq': 1}}))
print(n)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_producer_with_redis_py_reaches_clients() {
    let Some(python) = tools::require(tools::python_with_redis()) else {
        return;
    };
    let fab = Fabric::start("python", 2, |b| b).await;
    let mut clients = [client(&fab.api(0)).await, client(&fab.api(1)).await];
    wait_cluster_clients(&fab.api(0), 2, T).await;

    let (url, ns) = (fab.redis.url().to_string(), fab.ns.clone());
    let (ok, out, err) = tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new(python);
        cmd.args(["-c", PY_PRODUCER, &url, &ns]);
        run_bounded(cmd, T)
    })
    .await
    .expect("python task");
    assert!(ok, "python producer failed: stdout {out:?}, stderr {err}");
    let mut lines = out.lines();
    let id = lines.next().unwrap_or_default().trim().to_string();
    assert!(parse_stream_id(&id).is_some(), "python printed {out:?}");
    let receivers: i64 = lines
        .next()
        .unwrap_or_default()
        .trim()
        .parse()
        .unwrap_or(-1);
    assert!(
        receivers >= 2,
        "python PUBLISH reached {receivers} subscribers"
    );

    for (r, c) in clients.iter_mut().enumerate() {
        let got = c.collect(2, T).await;
        assert_eq!(seqs(&got), vec![0, 1], "replica {r}: {}", c.summary());
        assert_eq!(got[0].id, id);
        assert_eq!(got[0].ty(), "job_updated");
        assert_eq!(
            got[0].json["data"],
            json!({"job": "py-1", "progress": 0.5, "seq": 0})
        );
        assert_eq!(got[1].ty(), "cache_updated");
        assert_eq!(got[1].json["data"]["from"], "python");
    }
}

// ---------------------------------------------------------------------------------------
// 11. Resume from an id the shared stream no longer holds
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_from_an_id_trimmed_from_the_redis_stream_gets_history_truncated_then_live() {
    // `MAXLEN ~ 10` trims whole stream nodes (100 entries each), so 250 events are
    // enough to drop the first ones.
    let fab = Fabric::start("trim", 1, |b| b.opt("--history", 10)).await;
    let mut conn = fab.conn().await;
    let mut pipe = redis::pipe();
    for i in 0..250 {
        pipe.add_command(fcall_cmd(
            &fab.ns,
            "job_updated",
            &format!(r#"{{"seq":{i}}}"#),
            None,
        ));
    }
    let ids: Vec<String> = pipe.query_async(&mut conn).await.expect("pipelined FCALLs");
    let first_kept: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(stream_key(&fab.ns))
        .arg("-")
        .arg("+")
        .arg("COUNT")
        .arg(1)
        .query_async(&mut conn)
        .await
        .expect("XRANGE");
    assert_ne!(
        first_kept.first().map(|e| e.0.as_str()),
        Some(ids[0].as_str()),
        "the stream was not trimmed; the test cannot check truncation"
    );

    // A replica started afterwards holds nothing in memory, so Redis decides.
    let late = replica(fab.redis.url(), &fab.ns, "trim-late").spawn();
    let api = late.api();
    api.wait_ready(T).await;
    let mut c = SseClient::connect(api.base(), ConnectOpts::header(&ids[0])).await;
    let notice = c.expect_event(T).await;
    assert_eq!(notice.ty(), "history_truncated", "{}", c.summary());
    assert_eq!(
        notice.id, "",
        "history_truncated must not carry an `id:` line"
    );
    let live_id = fcall(&mut conn, &fab.ns, "job_updated", &json!({"seq": 250})).await;
    let live = c.expect_event(T).await;
    assert_eq!(live.seq(), Some(250), "{}", c.summary());
    assert_eq!(live.id, live_id);
    assert_quiet(
        &mut c,
        Duration::from_millis(300),
        "after history_truncated",
    )
    .await;
}

// ---------------------------------------------------------------------------------------
// 12. Hostile producers and resumers
// ---------------------------------------------------------------------------------------

/// Connections Redis has accepted since it started.
async fn connections_received(conn: &mut MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("stats")
        .query_async(conn)
        .await
        .expect("INFO stats");
    info.lines()
        .find_map(|l| l.strip_prefix("total_connections_received:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no total_connections_received in INFO: {info}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_stored_entry_is_skipped_and_stops_nothing() {
    let fab = Fabric::start("undecodable", 1, |b| b).await;
    let api = fab.api(0);
    let mut conn = fab.conn().await;

    // The function refuses data that is not UTF-8, as POST does.
    let refused: redis::RedisResult<String> = redis::cmd("FCALL")
        .arg("eventfabric_publish")
        .arg(1)
        .arg(stream_key(&fab.ns))
        .arg("bad_utf8")
        .arg(&b"\"\xff\xfe\""[..])
        .query_async(&mut conn)
        .await;
    let error = refused.expect_err("the function stored data that is not UTF-8");
    assert_eq!(error.code(), Some("ERR"), "{error:?}");
    // Overlong forms, encoded surrogates and bytes past U+10FFFF are refused too; two-,
    // three- and four-byte characters are not.
    for bad in [
        &b"\"\xc0\xaf\""[..],
        b"\"\xed\xa0\x80\"",
        b"\"\xf4\x90\x80\x80\"",
        b"\"\xe2\x82\"",
    ] {
        let refused: redis::RedisResult<String> = redis::cmd("FCALL")
            .arg("eventfabric_publish")
            .arg(1)
            .arg(stream_key(&fab.ns))
            .arg("bad_utf8")
            .arg(bad)
            .query_async(&mut conn)
            .await;
        assert!(refused.is_err(), "{bad:?} was stored");
    }

    // Anyone allowed to XADD can still store such an entry; it must stop nothing.
    let mut live = client(&api).await;
    let text = "café € 😀 ✓";
    fcall(&mut conn, &fab.ns, "utf8", &json!({"text": text})).await;
    let got = live.expect_event(T).await;
    assert_eq!(got.json["data"]["text"], text, "{}", live.summary());
    let before = fcall(&mut conn, &fab.ns, "job_updated", &json!({"seq": 0})).await;
    let got = live.expect_event(T).await;
    assert_eq!(got.seq(), Some(0), "{}", live.summary());
    let _: String = redis::cmd("XADD")
        .arg(stream_key(&fab.ns))
        .arg("*")
        .arg("type")
        .arg("bad_utf8")
        .arg("data")
        .arg(&b"\"\xff\xfe\""[..])
        .query_async(&mut conn)
        .await
        .expect("XADD");
    let bad_before = api.metric(BAD_MESSAGES).await.unwrap_or(0.0);

    // Cut the subscription: the replica must fill its gap across the entry.
    let _: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut conn)
        .await
        .expect("CLIENT KILL");
    let after = fcall(&mut conn, &fab.ns, "job_updated", &json!({"seq": 1})).await;
    let got = live.expect_event(T).await;
    assert_eq!(
        (got.seq(), got.id.as_str()),
        (Some(1), after.as_str()),
        "{}",
        live.summary()
    );
    api.wait_ready(T).await;

    // No reconnect storm: a settled replica opens next to no new connections.
    let connections = connections_received(&mut conn).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let opened = connections_received(&mut conn).await - connections;
    assert!(
        opened <= 5,
        "{opened} new Redis connections in 3 s: a reconnect loop"
    );

    // Resumes across the entry work, from memory and from Redis (a replica started now
    // holds nothing in memory).
    let mut resumed = SseClient::connect(api.base(), ConnectOpts::header(&before)).await;
    let got = resumed.expect_event(T).await;
    assert_eq!(got.seq(), Some(1), "{}", resumed.summary());
    let late = replica(fab.redis.url(), &fab.ns, "undecodable-late").spawn();
    late.api().wait_ready(T).await;
    let mut from_redis = SseClient::connect(late.api().base(), ConnectOpts::header(&before)).await;
    let got = from_redis.expect_event(T).await;
    assert_eq!(
        (got.seq(), got.id.as_str()),
        (Some(1), after.as_str()),
        "{}",
        from_redis.summary()
    );
    assert_quiet(
        &mut from_redis,
        Duration::from_millis(300),
        "resume across the entry",
    )
    .await;
    let bad = late.api().wait_metric_at_least(BAD_MESSAGES, 1.0, T).await;
    assert!(bad >= 1.0);
    let warned = late
        .log()
        .lines()
        .filter(|l| l.contains("not an event"))
        .count();
    assert!(
        warned >= 1,
        "the skipped entry was not logged:\n{}",
        late.log()
    );
    assert!(api.metric(BAD_MESSAGES).await.unwrap_or(0.0) >= bad_before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_id_on_the_channel_blinds_no_replica_and_a_resume_with_it_is_truncated() {
    let fab = Fabric::start("forged", 2, |b| b).await;
    let mut conn = fab.conn().await;
    let forged = "99999999999999-0";
    let mut clients = [client(&fab.api(0)).await, client(&fab.api(1)).await];
    let mut raw = RawSse::connect(fab.api(0).base(), ConnectOpts::default()).await;
    wait_cluster_clients(&fab.api(0), 3, T).await;

    let poison = format!(r#"{{"type":"poison","data":{{"seq":0}},"id":"{forged}"}}"#);
    assert!(publish_raw(&mut conn, &fab.ns, poison.as_bytes()).await >= 2);
    let durable = fcall(&mut conn, &fab.ns, "job_updated", &json!({"seq": 1})).await;
    let posted = fab.api(1).publish_seq("job_updated", 2).await;
    for (r, c) in clients.iter_mut().enumerate() {
        let got = c.collect(3, T).await;
        assert_eq!(seqs(&got), vec![0, 1, 2], "replica {r}: {}", c.summary());
        assert_ne!(got[0].id, forged, "replica {r} took the forged id");
        assert_eq!(got[1].id, durable, "replica {r}");
        assert_eq!(got[2].id, posted, "replica {r}");
    }
    assert!(
        raw.read_until(T, |t| raw_events(t).len() >= 3).await,
        "{}",
        raw.text
    );
    assert!(
        !raw.text.contains(forged),
        "the forged id reached the wire: {}",
        raw.text
    );

    // Older than the stream's first entry although nothing was ever trimmed: not an id of
    // this stream either (what a primary that lost its first events leaves behind).
    let mut c = SseClient::connect(fab.api(0).base(), ConnectOpts::header("1-0")).await;
    let first = c.expect_event(T).await;
    assert_eq!(first.ty(), "history_truncated", "{}", c.summary());

    // A browser that kept the forged id resumes with it: told, then served live.
    for r in 0..2 {
        let api = fab.api(r);
        let mut c = SseClient::connect(api.base(), ConnectOpts::header(forged)).await;
        let notice = c.expect_event(T).await;
        assert_eq!(
            notice.ty(),
            "history_truncated",
            "replica {r}: {}",
            c.summary()
        );
        let id = api.publish_seq("job_updated", 10 + r as u64).await;
        let live = c.expect_event(T).await;
        assert_eq!(
            (live.seq(), live.id.as_str()),
            (Some(10 + r as u64), id.as_str()),
            "replica {r}"
        );
    }
}

/// Resident memory of a process, in bytes.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kb * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_clients_that_do_not_read_neither_pin_memory_nor_starve_publishing() {
    const EVENTS: usize = 2_000;
    const CLIENTS: usize = 40;
    let fab = Fabric::start("replaystorm", 1, |b| b).await;
    let api = fab.api(0);
    let mut conn = fab.conn().await;
    let data = format!(r#""{}""#, "x".repeat(64 * 1024 - 64));
    let mut first = None;
    for chunk in 0..EVENTS / 100 {
        let mut pipe = redis::pipe();
        for _ in 0..100 {
            pipe.add_command(fcall_cmd(&fab.ns, "big", &data, None));
        }
        let ids: Vec<String> = pipe.query_async(&mut conn).await.expect("pipelined FCALLs");
        if chunk == 0 {
            first = Some(ids[0].clone());
        }
    }
    let first = first.expect("ids");
    // The replica's ring of recent events is full by now; settle, then measure.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pid = fab.gws[0].pid();
    let rss_before = rss_bytes(pid);

    // Clients that resume from the start and never read a byte.
    let mut sockets = Vec::new();
    for _ in 0..CLIENTS {
        let mut s = std::net::TcpStream::connect(fab.gws[0].addr()).expect("connect");
        let head =
            format!("GET /api/events/stream HTTP/1.1\r\nHost: x\r\nLast-Event-ID: {first}\r\n\r\n");
        std::io::Write::write_all(&mut s, head.as_bytes()).expect("send head");
        sockets.push(s);
    }
    api.wait_active_clients(CLIENTS as u64, T).await;

    // A producer at 20 POST/s for 5 s, while the replays run.
    let mut latencies = Vec::new();
    let mut failures = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    for seq in 0..100u64 {
        tick.tick().await;
        let started = Instant::now();
        let (status, body) = api
            .post_raw(
                json!({"type": "small", "data": {"seq": seq}}).to_string(),
                "application/json",
            )
            .await;
        latencies.push(started.elapsed());
        if status != StatusCode::ACCEPTED {
            failures.push(format!("{status}: {body}"));
        }
    }
    let rss_after = rss_bytes(pid);
    latencies.sort();
    let median = latencies[latencies.len() / 2];
    let p99 = latencies[latencies.len() * 99 / 100];
    let added_mb = rss_after.saturating_sub(rss_before) as f64 / 1e6;
    eprintln!(
        "replay storm: {CLIENTS} non-reading resumes over {EVENTS} x 64 KB: RSS +{added_mb:.1} MB; \
         POST median {median:?}, p99 {p99:?}"
    );
    assert!(
        failures.is_empty(),
        "publishes failed during the replays: {failures:?}"
    );
    assert!(
        added_mb <= 64.0,
        "the replays added {added_mb:.1} MB of RSS"
    );
    assert!(
        p99 < Duration::from_millis(250),
        "POST p99 {p99:?} during the replays"
    );
    drop(sockets);
}

// ---------------------------------------------------------------------------------------
// 13. Redis ACL users and passwords kept out of URLs
// ---------------------------------------------------------------------------------------

/// The commands the README grants a gateway user, besides those the function runs.
const GATEWAY_COMMANDS: &str = "+fcall +fcall_ro +function|load +xrange +xrevrange \
     +xinfo|stream +exists +subscribe +ping +unwatch +wait +role";
/// The commands the function library runs, which Redis checks against its caller.
const FUNCTION_COMMANDS: &str = "+xadd +hget +hset +hdel +hexists +hlen +hincrby +hgetall \
     +zadd +zrem +zrange +zrangebyscore +zcard +time +publish";

async fn acl_setuser(conn: &mut MultiplexedConnection, rules: &[String]) {
    let mut cmd = redis::cmd("ACL");
    cmd.arg("SETUSER");
    for rule in rules {
        cmd.arg(rule);
    }
    let _: () = cmd
        .query_async(conn)
        .await
        .unwrap_or_else(|e| panic!("ACL SETUSER {rules:?}: {e}"));
}

/// `ACL SETUSER` rules: a user with `password`, limited to namespace `ns`'s keys, the
/// channels matching `channels`, and `commands`.
fn acl_user(
    user: &str,
    password: &str,
    ns: &str,
    channels: &str,
    commands: &[&str],
) -> Vec<String> {
    let mut rules: Vec<String> = vec![
        user.to_owned(),
        "on".to_owned(),
        format!(">{password}"),
        "resetkeys".to_owned(),
        format!("~{{{ns}}}:*"),
        "resetchannels".to_owned(),
        format!("&{{{ns}}}:{channels}"),
        "-@all".to_owned(),
    ];
    rules.extend(
        commands
            .iter()
            .flat_map(|c| c.split_whitespace())
            .map(str::to_owned),
    );
    rules
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_privilege_acl_users_run_the_fabric_and_no_password_reaches_a_log() {
    let redis = RedisProc::start();
    // Turning the default user off would break anyone else on a shared Redis.
    if tools::require(redis.killable()).is_none() {
        return;
    }
    let ns = unique_namespace("acl");
    let mut admin = redis_conn(redis.url()).await;
    let all = ["admin", "on", ">admin-pw", "~*", "&*", "+@all"].map(str::to_owned);
    acl_setuser(&mut admin, &all).await;
    let gateway = acl_user(
        "gateway",
        "gw-secret-pw",
        &ns,
        "*",
        &[GATEWAY_COMMANDS, FUNCTION_COMMANDS],
    );
    acl_setuser(&mut admin, &gateway).await;
    let producer = acl_user(
        "producer",
        "prod-secret-pw",
        &ns,
        "events",
        &["+fcall", FUNCTION_COMMANDS],
    );
    acl_setuser(&mut admin, &producer).await;
    acl_setuser(&mut admin, &["default".to_owned(), "off".to_owned()]).await;
    let port = redis.port();
    let gateway_url = format!("redis://gateway@127.0.0.1:{port}/");

    // One replica with the password in the environment, one with it in a file.
    let dir = tempfile::tempdir().expect("temp dir");
    let password_file = dir.path().join("redis-password");
    std::fs::write(&password_file, "gw-secret-pw\n").expect("write password file");
    let gws = [
        replica(&gateway_url, &ns, "acl-1")
            .env("REDIS_PASSWORD", "gw-secret-pw")
            .spawn(),
        replica(&gateway_url, &ns, "acl-2")
            .opt("--redis-password-file", password_file.display())
            .spawn(),
    ];
    for gw in &gws {
        gw.api().wait_ready(T).await;
    }
    let mut clients = [client(&gws[0].api()).await, client(&gws[1].api()).await];
    wait_cluster_clients(&gws[0].api(), 2, T).await;

    // The producer user publishes through the function and on the channel...
    let mut producer = redis_conn(&format!(
        "redis://producer:prod-secret-pw@127.0.0.1:{port}/"
    ))
    .await;
    let id = fcall(&mut producer, &ns, "job_updated", &json!({"seq": 1})).await;
    publish_plain(&mut producer, &ns, "cache_updated", &json!({"seq": 2}), 2).await;
    let posted = gws[1].api().publish_seq("job_updated", 3).await;
    for (r, c) in clients.iter_mut().enumerate() {
        let got = c.collect(3, T).await;
        assert_eq!(seqs(&got), vec![1, 2, 3], "replica {r}: {}", c.summary());
        assert_eq!(
            (got[0].id.as_str(), got[2].id.as_str()),
            (id.as_str(), posted.as_str())
        );
    }
    // ...and nothing outside its namespace, and no administration.
    let other: redis::RedisResult<()> = redis::cmd("SET")
        .arg("{other}:key")
        .arg(1)
        .query_async(&mut producer)
        .await;
    assert!(other.is_err(), "the producer wrote outside its namespace");
    let flush: redis::RedisResult<()> = redis::cmd("FLUSHALL").query_async(&mut producer).await;
    assert!(flush.is_err(), "the producer could FLUSHALL");

    let stats = gws[0].api().stats().await;
    assert!(
        stats.get("degraded").is_none(),
        "stats need a permission the README omits: {stats}"
    );
    for gw in &gws {
        let log = gw.log();
        assert!(
            !log.contains("gw-secret-pw"),
            "a password reached the log:\n{log}"
        );
        assert!(
            !log.contains("NOPERM") && !log.contains("can't run"),
            "{log}"
        );
    }
    let (_, help, _) = run_cli(&["--help"], T);
    assert!(help.contains("--redis-password-file"), "{help}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_from_an_id_the_stream_does_not_hold_is_truncated_not_skipped() {
    // What a primary that died before replicating leaves behind: an id inside the
    // stream's range that the stream does not hold. XDEL makes one on purpose.
    let fab = Fabric::start("holed", 1, |b| b).await;
    let mut conn = fab.conn().await;
    let ids: Vec<String> = {
        let mut ids = Vec::new();
        for seq in 0..3 {
            ids.push(fcall(&mut conn, &fab.ns, "job_updated", &json!({"seq": seq})).await);
        }
        ids
    };
    let _: i64 = redis::cmd("XDEL")
        .arg(stream_key(&fab.ns))
        .arg(&ids[1])
        .query_async(&mut conn)
        .await
        .expect("XDEL");
    // A replica started now holds nothing in memory, so the stream decides.
    let late = replica(fab.redis.url(), &fab.ns, "holed-late").spawn();
    let api = late.api();
    api.wait_ready(T).await;
    let mut c = SseClient::connect(api.base(), ConnectOpts::header(&ids[1])).await;
    let first = c.expect_event(T).await;
    assert_eq!(first.ty(), "history_truncated", "{}", c.summary());
    let live = fcall(&mut conn, &fab.ns, "job_updated", &json!({"seq": 3})).await;
    let got = c.expect_event(T).await;
    assert_eq!(
        (got.seq(), got.id.as_str()),
        (Some(3), live.as_str()),
        "{}",
        c.summary()
    );
}
