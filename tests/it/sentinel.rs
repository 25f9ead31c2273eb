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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_follows_a_sentinel_failover_after_the_primary_is_killed() {
    let mut primary = RedisProc::start();
    if tools::require(primary.killable()).is_none() {
        return;
    }
    let replica = RedisProc::start_with(&[
        "--replicaof".to_owned(),
        "127.0.0.1".to_owned(),
        primary.port().to_string(),
    ]);
    let dir = tempfile::tempdir().expect("temp dir");
    let sentinels: Vec<Sentinel> = (0..3)
        .map(|_| Sentinel::start(dir.path(), primary.port()))
        .collect();
    // A failover needs the replica known and a majority of Sentinels aware of each other.
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

    let hosts: Vec<String> = sentinels
        .iter()
        .map(|s| format!("127.0.0.1:{}", s.port))
        .collect();
    let url = format!("redis+sentinel://{}/mymaster", hosts.join(","));
    let ns = unique_namespace("sentinel");
    let gw = GatewayBuilder::new().redis_url(&url).namespace(&ns).spawn();
    let api = gw.api();
    api.wait_ready(T).await;
    let mut c = SseClient::connect(api.base(), ConnectOpts::default()).await;
    let before = api.publish("job_updated", json!({"seq": 1})).await;
    let got = c.expect_event(T).await;
    assert_eq!((got.seq(), got.id.as_str()), (Some(1), before.as_str()));

    // Kill the primary: readiness turns off at once, and on again on the new primary.
    primary.kill();
    let killed = Instant::now();
    api.wait_readyz(StatusCode::SERVICE_UNAVAILABLE, Duration::from_secs(5))
        .await;
    api.wait_readyz(StatusCode::OK, Duration::from_secs(45))
        .await;
    let failover = killed.elapsed();
    let state = master_state(&sentinels[1]).await.expect("Sentinel state");
    assert_eq!(
        state.get("port").map(String::as_str),
        Some(replica.port().to_string().as_str()),
        "Sentinel did not promote the replica: {state:?}"
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
