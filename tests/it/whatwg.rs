//! A client nobody here wrote: the `eventsource` package for Node.js, an implementation of
//! the WHATWG `EventSource` interface, as a browser would use the stream. It must receive
//! every event through `onmessage`, and when its replica restarts it must reconnect by
//! itself, send `Last-Event-ID`, and end with every event exactly once, in order.
//!
//! Needs `node` and the package, which `.ci/install-test-deps` installs where
//! `tools::node_eventsource` looks; without them the test reports itself skipped.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::{GatewayBuilder, RedisProc, tools, unique_namespace};

const SCRIPT: &str = r#"
const { EventSource } = require('eventsource');
const [url, want] = [process.argv[2], Number(process.argv[3])];
const source = new EventSource(url);
const got = [];
let opens = 0;
const say = (line) => process.stdout.write(JSON.stringify(line) + '\n');
source.onopen = () => { opens += 1; say({ open: opens }); };
source.onmessage = (message) => {
  const event = JSON.parse(message.data);
  got.push({ id: message.lastEventId, type: event.type, seq: event.data.seq });
  if (got.length === want) {
    source.close();
    say({ done: got, opens });
    process.exit(0);
  }
};
setTimeout(() => { say({ timeout: got, opens }); process.exit(2); }, 30000);
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whatwg_eventsource_resumes_across_a_replica_restart_without_loss() {
    let Some(modules) = tools::require(tools::node_eventsource()) else {
        return;
    };
    let redis = RedisProc::start();
    let ns = unique_namespace("whatwg");
    let replica = GatewayBuilder::new()
        .redis_url(redis.url())
        .namespace(&ns)
        .opt("--retry-ms", 300)
        .opt("--heartbeat-secs", 1)
        .env("RUST_LOG", "eventfabric=info");
    let mut a = replica.clone().spawn();
    let b = replica.spawn();
    let (api_a, api_b) = (a.api(), b.api());
    for api in [&api_a, &api_b] {
        api.wait_ready(Duration::from_secs(15)).await;
    }

    let script = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(script.path(), SCRIPT).expect("write script");
    let mut node = Command::new("node")
        .arg(script.path())
        .arg(format!("{}/api/events/stream", a.base_url()))
        .arg("30")
        .env("NODE_PATH", &modules)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start node");
    let stdout = node.stdout.take().expect("node stdout");
    let (tx, rx) = mpsc::channel::<Value>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(value) = serde_json::from_str(&line) {
                let _ = tx.send(value);
            }
        }
    });
    let next_line = |rx: &mpsc::Receiver<Value>| {
        rx.recv_timeout(Duration::from_secs(20))
            .expect("a line from the EventSource client")
    };
    assert_eq!(next_line(&rx), json!({"open": 1}));
    api_a.wait_active_clients(1, Duration::from_secs(10)).await;

    let mut ids = Vec::new();
    for seq in 0..10 {
        ids.push(api_a.publish("before", json!({ "seq": seq })).await);
    }
    // Replica A goes away; events keep coming through replica B meanwhile.
    a.stop_within(Duration::from_secs(15));
    for seq in 10..20 {
        ids.push(api_b.publish("during", json!({ "seq": seq })).await);
    }
    a.restart();
    assert_eq!(next_line(&rx), json!({"open": 2}), "the client reconnected");
    for seq in 20..30 {
        ids.push(api_b.publish("after", json!({ "seq": seq })).await);
    }

    let done = next_line(&rx);
    let _ = node.wait();
    let got = done["done"]
        .as_array()
        .unwrap_or_else(|| panic!("client did not finish: {done}"));
    let seqs: Vec<u64> = got.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(
        seqs,
        (0..30).collect::<Vec<_>>(),
        "every event once, in order"
    );
    let got_ids: Vec<&str> = got.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(
        got_ids, ids,
        "lastEventId of each message is the publish id"
    );
    assert_eq!(done["opens"], 2);
}
