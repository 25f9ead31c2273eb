//! `redis+sentinel://`: a gateway that finds its primary through three real Sentinels,
//! and follows a failover after the primary is killed with SIGKILL: readiness turns off,
//! then on again once the promoted replica is proven, and events flow again on the same
//! client connection.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;

use crate::harness::{
    ConnectOpts, GatewayBuilder, RedisProc, SseClient, eventually, free_port, tools,
    unique_namespace,
};

const T: Duration = Duration::from_secs(15);

/// A `redis-server --sentinel`, killed when dropped.
struct Sentinel {
    child: Child,
    port: u16,
}

impl Sentinel {
    fn start(dir: &Path, master_port: u16) -> Self {
        let port = free_port();
        let conf = dir.join(format!("sentinel-{port}.conf"));
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {dir}\n\
                 sentinel monitor mymaster 127.0.0.1 {master_port} 2\n\
                 sentinel down-after-milliseconds mymaster 1000\n\
                 sentinel failover-timeout mymaster 5000\n",
                dir = dir.display()
            ),
        )
        .expect("write sentinel.conf");
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server --sentinel");
        Sentinel { child, port }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `SENTINEL MASTER mymaster` as field → value.
async fn master_state(sentinel: &Sentinel) -> Option<std::collections::HashMap<String, String>> {
    let client = redis::Client::open(sentinel.url()).ok()?;
    let mut conn = client.get_multiplexed_async_connection().await.ok()?;
    let flat: Vec<String> = redis::cmd("SENTINEL")
        .arg("MASTER")
        .arg("mymaster")
        .query_async(&mut conn)
        .await
        .ok()?;
    Some(
        flat.chunks_exact(2)
            .map(|kv| (kv[0].clone(), kv[1].clone()))
            .collect(),
    )
}

/// A primary, one replica and three Sentinels watching them, ready to fail over.
struct Failover {
    primary: RedisProc,
    replica: RedisProc,
    sentinels: Vec<Sentinel>,
    _dir: tempfile::TempDir,
}

impl Failover {
    /// `None` (the test is skipped) when the Redis in use cannot be killed.
    async fn start() -> Option<Self> {
        // Its own servers (never a shared REDIS_URL): the primary gets killed. Without the
        // default 5 s delay before a full sync, the replica has the data at once.
        let primary =
            RedisProc::start_with(&["--repl-diskless-sync-delay".to_owned(), "0".to_owned()]);
        tools::require(primary.killable())?;
        let replica = RedisProc::start_with(&[
            "--replicaof".to_owned(),
            "127.0.0.1".to_owned(),
            primary.port().to_string(),
        ]);
        let replica_url = replica.url().to_owned();
        eventually(
            "the replica in sync with the primary",
            Duration::from_secs(30),
            || {
                let url = replica_url.clone();
                async move {
                    let client = redis::Client::open(url).ok()?;
                    let mut conn = client.get_multiplexed_async_connection().await.ok()?;
                    let info: String = redis::cmd("INFO")
                        .arg("replication")
                        .query_async(&mut conn)
                        .await
                        .ok()?;
                    info.contains("master_link_status:up").then_some(())
                }
            },
        )
        .await;
        let dir = tempfile::tempdir().expect("temp dir");
        let sentinels: Vec<Sentinel> = (0..3)
            .map(|_| Sentinel::start(dir.path(), primary.port()))
            .collect();
        // A failover needs the replica known and a majority of Sentinels aware of each
        // other.
        eventually(
            "Sentinels know the replica and each other",
            Duration::from_secs(30),
            || async {
                let state = master_state(&sentinels[0]).await?;
                (state.get("num-slaves").map(String::as_str) == Some("1")
                    && state.get("num-other-sentinels").map(String::as_str) == Some("2"))
                .then_some(())
            },
        )
        .await;
        Some(Failover {
            primary,
            replica,
            sentinels,
            _dir: dir,
        })
    }

    fn url(&self) -> String {
        let hosts: Vec<String> = self
            .sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        format!("redis+sentinel://{}/mymaster", hosts.join(","))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_follows_a_sentinel_failover_after_the_primary_is_killed() {
    let Some(mut setup) = Failover::start().await else {
        return;
    };
    let url = setup.url();
    let ns = unique_namespace("sentinel");
    let gw = GatewayBuilder::new().redis_url(&url).namespace(&ns).spawn();
    let api = gw.api();
    api.wait_ready(T).await;
    let mut c = SseClient::connect(api.base(), ConnectOpts::default()).await;
    let before = api.publish("job_updated", json!({"seq": 1})).await;
    let got = c.expect_event(T).await;
    assert_eq!((got.seq(), got.id.as_str()), (Some(1), before.as_str()));

    // Once the replica has it (replication is asynchronous), kill the primary: readiness
    // turns off at once, and on again on the new primary.
    let replica_url = setup.replica.url().to_owned();
    let stream = format!("{{{ns}}}:stream");
    eventually("the replica holds the event", T, || {
        let (url, stream, before) = (replica_url.clone(), stream.clone(), before.clone());
        async move {
            let client = redis::Client::open(url).ok()?;
            let mut conn = client.get_multiplexed_async_connection().await.ok()?;
            let held: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
                .arg(&stream)
                .arg(&before)
                .arg(&before)
                .query_async(&mut conn)
                .await
                .ok()?;
            (!held.is_empty()).then_some(())
        }
    })
    .await;
    setup.primary.kill();
    let killed = Instant::now();
    api.wait_readyz(StatusCode::SERVICE_UNAVAILABLE, Duration::from_secs(5))
        .await;
    api.wait_readyz(StatusCode::OK, Duration::from_secs(45))
        .await;
    let failover = killed.elapsed();
    // Sentinels learn of the failover one by one; the replica itself knows at once.
    let client = redis::Client::open(setup.replica.url()).expect("replica URL");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect to the replica");
    let role: redis::Value = redis::cmd("ROLE")
        .query_async(&mut conn)
        .await
        .expect("ROLE");
    assert!(
        matches!(&role, redis::Value::Array(items)
            if matches!(items.first(), Some(redis::Value::BulkString(r)) if r.as_slice() == b"master")),
        "ready again, but the replica is not the primary: {role:?}"
    );
    eprintln!("sentinel failover: ready again {failover:?} after SIGKILL of the primary");

    let after = api.publish("job_updated", json!({"seq": 2})).await;
    let got = c.expect_event(T).await;
    assert_eq!(
        (got.seq(), got.id.as_str()),
        (Some(2), after.as_str()),
        "{}",
        c.summary()
    );
    // A resume from before the failover is served from the new primary's stream.
    let mut resumed = SseClient::connect(api.base(), ConnectOpts::header(&before)).await;
    let got = resumed.expect_event(T).await;
    assert_eq!(got.seq(), Some(2), "{}", resumed.summary());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_min_replicas_acknowledges_only_what_replicas_confirmed() {
    let primary = RedisProc::start();
    if tools::require(primary.killable()).is_none() {
        return;
    }
    let _replica = RedisProc::start_with(&[
        "--replicaof".to_owned(),
        "127.0.0.1".to_owned(),
        primary.port().to_string(),
    ]);
    let ns = unique_namespace("wait");
    let gateway = |min: u32| {
        GatewayBuilder::new()
            .redis_url(primary.url())
            .namespace(&ns)
            .opt("--publish-min-replicas", min)
            .opt("--publish-replica-timeout-ms", 300)
            .spawn()
    };
    let one = gateway(1);
    let api = one.api();
    api.wait_ready(T).await;
    // The replica may still be syncing: one confirmation arrives once it is.
    eventually("a publish confirmed by the replica", T, || async {
        let (status, _) = api
            .post_raw(
                json!({"type": "t", "data": 1}).to_string(),
                "application/json",
            )
            .await;
        (status == StatusCode::ACCEPTED).then_some(())
    })
    .await;

    // Two replicas wanted, one there: 503 that says the event may exist, with its id.
    let two = gateway(2);
    let api = two.api();
    api.wait_ready(T).await;
    let mut c = SseClient::connect(api.base(), ConnectOpts::default()).await;
    let (status, body) = api
        .post_raw(
            json!({"type": "t", "data": {"seq": 7}}).to_string(),
            "application/json",
        )
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).expect("a JSON error body");
    assert_eq!(body["error"], "not_replicated", "{body}");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("1 of 2") && message.contains("may still exist"),
        "{message}"
    );
    // It was stored on the primary, so it is delivered all the same.
    let got = c.expect_event(T).await;
    assert_eq!(got.seq(), Some(7), "{}", c.summary());
    assert!(
        message.contains(&got.id),
        "the message does not give the id: {message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_killed_primary_loses_at_100_events_a_second_is_counted_and_resumers_are_told() {
    let Some(mut setup) = Failover::start().await else {
        return;
    };
    let ns = unique_namespace("loss");
    let gw = GatewayBuilder::new()
        .redis_url(&setup.url())
        .namespace(&ns)
        .spawn();
    let api = gw.api();
    api.wait_ready(T).await;

    // A producer at 100 POST/s through the failover; it keeps what was acknowledged.
    let producer = api.spawn_producer(Duration::from_millis(10), Duration::from_secs(12));
    tokio::time::sleep(Duration::from_secs(2)).await;
    setup.primary.kill();
    let acked = producer.await.expect("producer task");
    api.wait_ready(T).await;

    // What the new primary's stream holds.
    let client = redis::Client::open(setup.replica.url()).expect("replica URL");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect to the new primary");
    let stored: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(format!("{{{ns}}}:stream"))
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .expect("XRANGE");
    let stored: std::collections::HashSet<String> = stored.into_iter().map(|(id, _)| id).collect();
    let lost: Vec<&String> = acked.iter().filter(|id| !stored.contains(*id)).collect();
    eprintln!(
        "failover at 100 ev/s: {} publishes acknowledged, {} of them lost with the primary",
        acked.len(),
        lost.len()
    );
    assert!(
        acked.len() > 500,
        "the producer hardly ran: {} acknowledged",
        acked.len()
    );
    // A browser whose last event was lost is told, never silently skipped ahead.
    if let Some(lost) = lost.first() {
        let mut c = SseClient::connect(api.base(), ConnectOpts::header(lost)).await;
        let first = c.expect_event(T).await;
        assert_eq!(
            first.ty(),
            "history_truncated",
            "resume from lost {lost}: {}",
            c.summary()
        );
    }
}
