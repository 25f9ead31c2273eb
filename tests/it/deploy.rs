//! The deployment files (`Dockerfile`, `docker-compose.yml`, `deploy/nginx/`, `k8s/`)
//! checked against what the binary really reads and serves, so that renaming a flag, a
//! probe path or a port breaks the build rather than a rollout.
//!
//! The files are read line by line (they are kept in a plain block style for that);
//! schema validation is `.ci/validate-manifests`' job.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::harness::{GatewayBuilder, RedisProc, eventually, free_port, unique_namespace};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(relative: &str) -> String {
    let path = repo().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// `k8s/*.yaml`, sorted.
fn k8s_files() -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(repo().join("k8s"))
        .expect("k8s/ exists")
        .filter_map(|entry| {
            let name = entry.ok()?.file_name().into_string().ok()?;
            name.ends_with(".yaml").then(|| format!("k8s/{name}"))
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no k8s/*.yaml files");
    files
}

/// Every `EVENTFABRIC_*` and `REDIS_URL` token in `text`.
fn env_names(text: &str) -> BTreeSet<String> {
    let bytes = text.as_bytes();
    let is_name = |b: u8| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_';
    let mut names = BTreeSet::new();
    for (start, _) in text.char_indices() {
        let rest = &text[start..];
        if !(rest.starts_with("EVENTFABRIC_") || rest.starts_with("REDIS_URL")) {
            continue;
        }
        if start > 0 && (is_name(bytes[start - 1]) || bytes[start - 1].is_ascii_lowercase()) {
            continue;
        }
        let len = rest.bytes().take_while(|b| is_name(*b)).count();
        names.insert(rest[..len].to_owned());
    }
    names
}

/// The environment variables `eventfabric --help` documents (`[env: NAME=...]`).
fn variables_the_binary_reads() -> BTreeSet<String> {
    let output = Command::new(env!("CARGO_BIN_EXE_eventfabric"))
        .arg("--help")
        .env_clear()
        .output()
        .expect("run eventfabric --help");
    assert!(output.status.success(), "eventfabric --help failed");
    let help = String::from_utf8_lossy(&output.stdout);
    let names: BTreeSet<String> = help
        .split("[env: ")
        .skip(1)
        .filter_map(|rest| {
            let end = rest.find(['=', ']'])?;
            Some(rest[..end].to_owned())
        })
        .collect();
    assert!(
        names.contains("EVENTFABRIC_LISTEN") && names.contains("REDIS_URL"),
        "unexpected --help output:\n{help}"
    );
    names
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

fn unquote(value: &str) -> String {
    let value = value.trim();
    let value = match value.find(" #") {
        Some(comment) => value[..comment].trim_end(),
        None => value,
    };
    value.trim_matches('"').trim_matches('\'').to_owned()
}

/// The `key: value` pairs directly under the first mapping key `block` (e.g. `data`, or
/// `x-gateway-environment` with an anchor), in order. Comments and merges are skipped.
fn mapping(text: &str, block: &str) -> Vec<(String, String)> {
    let mut lines = text.lines();
    let header = lines
        .by_ref()
        .find(|l| {
            let t = l.trim_start();
            t.strip_prefix(block)
                .and_then(|r| r.strip_prefix(':'))
                .is_some_and(|r| r.trim().is_empty() || r.trim().starts_with('&'))
        })
        .unwrap_or_else(|| panic!("no `{block}:` block"));
    let parent = indent(header);
    let mut child = None;
    let mut pairs = Vec::new();
    for line in lines {
        let t = line.trim_start();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        if indent(line) <= parent {
            break;
        }
        let level = *child.get_or_insert(indent(line));
        if indent(line) != level || t.starts_with("<<:") {
            continue;
        }
        if let Some((k, v)) = t.split_once(':') {
            pairs.push((k.trim().to_owned(), unquote(v)));
        }
    }
    pairs
}

fn lookup<'a>(pairs: &'a [(String, String)], key: &str) -> &'a str {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("{key} not set"))
}

/// Values of every `key: value` line (also `- key: value`), in order.
fn values(text: &str, key: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| {
            let t = l.trim_start().trim_start_matches("- ");
            let rest = t.strip_prefix(key)?.strip_prefix(':')?;
            Some(unquote(rest))
        })
        .filter(|v| !v.is_empty())
        .collect()
}

fn only_value(text: &str, key: &str, file: &str) -> String {
    let found = values(text, key);
    assert_eq!(
        found.len(),
        1,
        "{file}: expected one `{key}:`, found {found:?}"
    );
    found[0].clone()
}

/// `path:` and `port:` of a probe (`readinessProbe`, ...) in a manifest.
fn probe(text: &str, name: &str) -> Option<(String, String)> {
    let mut lines = text.lines().skip_while(|l| l.trim() != format!("{name}:"));
    let header = lines.next()?;
    let body: Vec<&str> = lines
        .take_while(|l| l.trim().is_empty() || indent(l) > indent(header))
        .collect();
    let body = body.join("\n");
    Some((
        values(&body, "path").first()?.clone(),
        values(&body, "port").first()?.clone(),
    ))
}

fn listen_addr(value: &str, file: &str) -> SocketAddr {
    value
        .parse()
        .unwrap_or_else(|e| panic!("{file}: EVENTFABRIC_LISTEN={value} is not an address: {e}"))
}

/// `15s` → (15, "s"): a whole number and the unit letters after it.
fn number_and_unit(value: &str) -> (u64, &str) {
    let value = value.trim();
    let (number, unit) = value.split_at(value.trim_end_matches(char::is_alphabetic).len());
    let n = number
        .parse()
        .unwrap_or_else(|_| panic!("not a number with a unit: {value}"));
    (n, unit)
}

/// `15s`, `1h`, `3600` (seconds) → seconds.
fn seconds(value: &str) -> u64 {
    let (n, unit) = number_and_unit(value);
    match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => panic!("unknown duration unit in {value}"),
    }
}

fn configmap() -> Vec<(String, String)> {
    mapping(&read("k8s/configmap.yaml"), "data")
}

fn compose_environment() -> Vec<(String, String)> {
    mapping(&read("docker-compose.yml"), "x-gateway-environment")
}

/// The Dockerfile's `HEALTHCHECK ... CMD [...]` as an argument vector.
fn dockerfile_healthcheck() -> Vec<String> {
    let dockerfile = read("Dockerfile").replace("\\\n", " ");
    let line = dockerfile
        .lines()
        .find(|l| l.starts_with("HEALTHCHECK"))
        .expect("Dockerfile has a HEALTHCHECK");
    let json = &line[line.find("CMD").expect("HEALTHCHECK ... CMD") + 3..];
    serde_json::from_str(json.trim()).expect("HEALTHCHECK CMD is an exec-form JSON array")
}

#[test]
fn deployment_files_only_use_variables_the_binary_reads() {
    let known = variables_the_binary_reads();
    let mut files = vec![
        "Dockerfile".to_owned(),
        "docker-compose.yml".to_owned(),
        "deploy/nginx/nginx.conf".to_owned(),
    ];
    files.extend(k8s_files());
    let mut used = BTreeSet::new();
    for file in &files {
        let names = env_names(&read(file));
        let unknown: Vec<_> = names.difference(&known).collect();
        assert!(
            unknown.is_empty(),
            "{file} uses {unknown:?}, which `eventfabric --help` does not list (it reads {known:?})"
        );
        used.extend(names);
    }
    // The ConfigMap and compose keys are the settings themselves: each must be read.
    for (file, pairs) in [
        ("k8s/configmap.yaml", configmap()),
        ("docker-compose.yml", compose_environment()),
    ] {
        for (key, _) in &pairs {
            assert!(
                known.contains(key) || key == "RUST_LOG",
                "{file} sets {key}, which the binary does not read"
            );
        }
    }
    for must in ["EVENTFABRIC_LISTEN", "REDIS_URL", "EVENTFABRIC_REPLICA_ID"] {
        assert!(used.contains(must), "no deployment file sets {must}");
    }
}

#[test]
fn every_container_port_is_the_listen_port() {
    let config = configmap();
    let k8s_listen = listen_addr(lookup(&config, "EVENTFABRIC_LISTEN"), "k8s/configmap.yaml");
    let compose_env = compose_environment();
    let compose_listen = listen_addr(
        lookup(&compose_env, "EVENTFABRIC_LISTEN"),
        "docker-compose.yml",
    );
    let dockerfile = read("Dockerfile");
    let image_listen = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("ENV EVENTFABRIC_LISTEN="))
        .map(|v| listen_addr(v.trim(), "Dockerfile"))
        .expect("Dockerfile sets ENV EVENTFABRIC_LISTEN=");
    for (file, addr) in [
        ("k8s/configmap.yaml", k8s_listen),
        ("docker-compose.yml", compose_listen),
        ("Dockerfile", image_listen),
    ] {
        assert!(
            addr.ip().is_unspecified(),
            "{file}: EVENTFABRIC_LISTEN={addr} is unreachable from outside the container"
        );
    }
    let port = k8s_listen.port();
    assert_eq!(
        compose_listen.port(),
        port,
        "compose and k8s listen ports differ"
    );
    assert_eq!(
        image_listen.port(),
        port,
        "image and k8s listen ports differ"
    );

    let exposed = only_value(
        &dockerfile.replace("EXPOSE ", "EXPOSE: "),
        "EXPOSE",
        "Dockerfile",
    );
    assert_eq!(exposed, port.to_string(), "Dockerfile EXPOSE");

    let deployment = read("k8s/deployment.yaml");
    let admin = listen_addr(
        lookup(&config, "EVENTFABRIC_ADMIN_LISTEN"),
        "k8s/configmap.yaml",
    );
    assert!(
        admin.ip().is_unspecified(),
        "the kubelet must reach {admin}"
    );
    assert_ne!(admin.port(), port, "the admin port is a port of its own");
    let container_ports = values(&deployment, "containerPort");
    assert_eq!(
        container_ports,
        [port.to_string(), admin.port().to_string()],
        "deployment containerPorts: http, then admin"
    );
    let scrape_port = only_value(&deployment, "prometheus.io/port", "k8s/deployment.yaml");
    assert_eq!(
        scrape_port,
        admin.port().to_string(),
        "prometheus.io/port annotation: /metrics is on the admin address"
    );
    let port_names = values(&deployment, "name");
    for name in ["http", "admin"] {
        assert!(
            port_names.iter().any(|n| n == name),
            "no container port named {name}"
        );
    }
    // Probes ask the admin port: the public one no longer serves them.
    for name in ["startupProbe", "readinessProbe", "livenessProbe"] {
        let (_, probe_port) = probe(&deployment, name).unwrap_or_else(|| panic!("no {name}"));
        assert!(
            probe_port == "admin" || probe_port == admin.port().to_string(),
            "{name} port {probe_port}"
        );
    }
    let compose_admin = listen_addr(
        lookup(&compose_env, "EVENTFABRIC_ADMIN_LISTEN"),
        "docker-compose.yml",
    );
    assert!(
        compose_admin.ip().is_unspecified(),
        "compose admin {compose_admin}"
    );
    // The Service (and so the Ingress) exposes the public port alone.
    let service = read("k8s/service.yaml");
    assert_eq!(
        only_value(&service, "targetPort", "k8s/service.yaml"),
        "http"
    );

    let compose = read("docker-compose.yml");
    assert!(
        compose.contains(&format!("- \"{port}\"")),
        "docker-compose.yml gateways must expose {port}"
    );
    // nginx's upstream points at the same port of every compose gateway.
    let nginx = read("deploy/nginx/nginx.conf");
    let upstreams: Vec<&str> = nginx
        .lines()
        .filter_map(|l| l.trim().strip_prefix("server gateway-"))
        .collect();
    let gateways = compose
        .lines()
        .filter(|l| l.starts_with("  gateway-") && l.trim_end().ends_with(':'))
        .count();
    assert_eq!(
        upstreams.len(),
        gateways,
        "nginx upstream servers vs compose gateways"
    );
    for server in upstreams {
        let hostport = server.split_whitespace().next().unwrap_or("");
        assert!(
            hostport.ends_with(&format!(":{port}")),
            "nginx upstream gateway-{hostport} is not on port {port}"
        );
    }
}

#[test]
fn shutdown_fits_in_the_grace_periods() {
    let deployment = read("k8s/deployment.yaml");
    let grace: u64 = only_value(&deployment, "terminationGracePeriodSeconds", "deployment")
        .parse()
        .expect("terminationGracePeriodSeconds is a number");
    let pre_stop = deployment
        .split("preStop:")
        .nth(1)
        .expect("the gateway has a preStop hook");
    let sleep: u64 = values(pre_stop, "seconds")
        .first()
        .expect("preStop sleep seconds")
        .parse()
        .expect("a number");
    let drain: u64 = lookup(&configmap(), "EVENTFABRIC_DRAIN_SECS")
        .parse()
        .expect("a number");
    // The contract: exit within --drain-secs + 1 s of SIGTERM.
    assert!(
        sleep + drain + 1 < grace,
        "preStop sleep {sleep}s + drain {drain}s (+1s) does not fit in \
         terminationGracePeriodSeconds {grace}s"
    );
    // The sleep must outlast endpoint propagation, which takes a few seconds.
    assert!(
        sleep >= 3,
        "preStop sleep {sleep}s is too short to leave the endpoints first"
    );

    let compose = read("docker-compose.yml");
    let stop_grace = seconds(&only_value(
        &compose,
        "stop_grace_period",
        "docker-compose.yml",
    ));
    let compose_drain: u64 = lookup(&compose_environment(), "EVENTFABRIC_DRAIN_SECS")
        .parse()
        .expect("a number");
    assert!(
        compose_drain + 1 < stop_grace,
        "compose stop_grace_period {stop_grace}s does not cover a drain of {compose_drain}s"
    );
}

#[test]
fn proxies_wait_longer_than_the_heartbeat() {
    let heartbeats = [
        lookup(&configmap(), "EVENTFABRIC_HEARTBEAT_SECS")
            .parse::<u64>()
            .expect("a number"),
        lookup(&compose_environment(), "EVENTFABRIC_HEARTBEAT_SECS")
            .parse()
            .expect("a number"),
    ];
    let heartbeat = heartbeats.into_iter().max().unwrap();
    let locations = read("deploy/nginx/eventfabric-locations.conf");
    let stream = locations
        .split("location = /api/events/stream {")
        .nth(1)
        .and_then(|rest| rest.split('}').next())
        .expect("a `location = /api/events/stream` block");
    let directive = |name: &str| {
        stream
            .lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .map(|v| v.trim().trim_end_matches(';').trim().to_owned())
            .unwrap_or_else(|| panic!("the stream location has no {name}"))
    };
    assert!(seconds(&directive("proxy_read_timeout")) >= 4 * heartbeat);
    assert_eq!(directive("proxy_buffering"), "off");
    assert_eq!(directive("gzip"), "off");
    assert_eq!(directive("proxy_http_version"), "1.1");
    assert_eq!(directive("proxy_set_header Connection"), "\"\"");
    assert_eq!(directive("proxy_pass"), "http://eventfabric");

    let ingress = read("k8s/ingress.yaml");
    let read_timeout = only_value(
        &ingress,
        "nginx.ingress.kubernetes.io/proxy-read-timeout",
        "k8s/ingress.yaml",
    );
    assert!(
        seconds(&read_timeout) >= 4 * heartbeat,
        "ingress read timeout {read_timeout}"
    );
    let buffering = only_value(
        &ingress,
        "nginx.ingress.kubernetes.io/proxy-buffering",
        "k8s/ingress.yaml",
    );
    assert_eq!(buffering, "off");
}

#[test]
fn compose_nginx_runs_the_shared_proxy_settings() {
    let nginx = read("deploy/nginx/nginx.conf");
    assert!(
        nginx.contains("include /etc/nginx/eventfabric-locations.conf;"),
        "deploy/nginx/nginx.conf must include the shared locations file"
    );
    assert!(
        nginx.contains("upstream eventfabric {"),
        "the upstream must be named eventfabric"
    );
    let compose = read("docker-compose.yml");
    for mount in [
        "./deploy/nginx/nginx.conf:/etc/nginx/nginx.conf:ro",
        "./deploy/nginx/eventfabric-locations.conf:/etc/nginx/eventfabric-locations.conf:ro",
    ] {
        assert!(
            compose.contains(mount),
            "docker-compose.yml does not mount {mount}"
        );
    }
    // The shared file holds only locations, so it fits inside any server block.
    let locations = read("deploy/nginx/eventfabric-locations.conf");
    for line in locations.lines().map(str::trim) {
        assert!(
            !line.starts_with("upstream")
                && !line.starts_with("server ")
                && !line.starts_with("listen"),
            "eventfabric-locations.conf must not define `{line}`"
        );
    }
    // Kustomize only applies what it lists.
    let kustomization = read("k8s/kustomization.yaml");
    let listed: BTreeSet<String> = kustomization
        .lines()
        .skip_while(|l| !l.starts_with("resources:"))
        .skip(1)
        .take_while(|l| l.starts_with("  -"))
        .map(|l| format!("k8s/{}", l.trim_start_matches("  -").trim()))
        .collect();
    let on_disk: BTreeSet<String> = k8s_files()
        .into_iter()
        .filter(|f| f != "k8s/kustomization.yaml")
        .collect();
    assert_eq!(
        listed, on_disk,
        "k8s/kustomization.yaml resources vs k8s/*.yaml"
    );
}

/// Starts a gateway with `settings` as its environment (plus a test Redis and port) and
/// checks each `(probe, path)` answers 200 and the image's HEALTHCHECK command passes.
async fn settings_serve_the_probes(
    source: &str,
    settings: &[(String, String)],
    probes: &[(String, String)],
) {
    let redis = RedisProc::start();
    // --listen, --redis-url and --namespace flags win over the file's values, which only
    // make sense inside a cluster; every other setting comes from the file.
    let mut builder = GatewayBuilder::new()
        .redis_url(redis.url())
        .namespace(&unique_namespace("deploy"));
    // The admin address moves to a free loopback port the same way.
    let admin = settings
        .iter()
        .any(|(key, _)| key == "EVENTFABRIC_ADMIN_LISTEN")
        .then(|| SocketAddr::from(([127, 0, 0, 1], free_port())));
    for (key, value) in settings {
        match (key.as_str(), admin) {
            ("EVENTFABRIC_ADMIN_LISTEN", Some(admin)) => {
                builder = builder.env(key, admin.to_string())
            }
            _ => builder = builder.env(key, value),
        }
    }
    let gateway = builder.spawn();
    let api = match admin {
        Some(admin) => {
            // Moved off the public port.
            assert_eq!(gateway.api().get("/healthz").await.0, 404, "{source}");
            crate::harness::Api::new(&format!("http://{admin}"))
        }
        None => gateway.api(),
    };
    for (probe, path) in probes {
        let what = format!("{source}: {probe} {path} answers 200");
        eventually(&what, Duration::from_secs(15), || async {
            let (status, _) = api.get(path).await;
            (status == 200).then_some(())
        })
        .await;
    }

    // The image's HEALTHCHECK, run as Docker would (the image sets EVENTFABRIC_LISTEN).
    let argv = dockerfile_healthcheck();
    assert!(
        argv[0].ends_with("/eventfabric"),
        "HEALTHCHECK runs {argv:?}"
    );
    let healthcheck = |listen: String| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_eventfabric"));
        command
            .args(&argv[1..])
            .env_clear()
            .env("EVENTFABRIC_LISTEN", listen);
        if let Some(admin) = admin {
            command.env("EVENTFABRIC_ADMIN_LISTEN", admin.to_string());
        }
        command.output().expect("run the healthcheck command")
    };
    let ok = tokio::task::block_in_place(|| healthcheck(gateway.addr().to_string()));
    assert!(
        ok.status.success(),
        "{source}: HEALTHCHECK {argv:?} failed against a serving gateway: {}",
        String::from_utf8_lossy(&ok.stderr)
    );
    drop(gateway);
    let down = tokio::task::block_in_place(|| {
        healthcheck(SocketAddr::from(([127, 0, 0, 1], free_port())).to_string())
    });
    assert!(
        !down.status.success(),
        "HEALTHCHECK passes with nothing listening"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_settings_start_a_gateway_that_serves_the_probes() {
    let deployment = read("k8s/deployment.yaml");
    let mut settings = configmap();
    // What the Deployment's downward API gives each pod.
    assert!(deployment.contains("fieldPath: metadata.name"));
    settings.push((
        "EVENTFABRIC_REPLICA_ID".into(),
        "eventfabric-6c9f7d8b5-x2x7k".into(),
    ));
    let mut probes = Vec::new();
    for (name, expected) in [
        ("startupProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
        ("livenessProbe", "/healthz"),
    ] {
        let (path, _) = probe(&deployment, name).unwrap_or_else(|| panic!("no {name}"));
        assert_eq!(path, expected, "{name} should check {expected}");
        probes.push((name.to_owned(), path));
    }
    settings_serve_the_probes("k8s", &settings, &probes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compose_settings_start_a_gateway_that_serves_the_probes() {
    let mut settings = compose_environment();
    settings.push(("EVENTFABRIC_REPLICA_ID".into(), "gateway-1".into()));
    // nginx's own healthcheck is answered by nginx (the gateways' probes are on their
    // admin port, which nginx does not proxy).
    let compose = read("docker-compose.yml");
    let nginx_check = compose
        .lines()
        .find(|l| l.contains("http://127.0.0.1/"))
        .and_then(|l| l.split("http://127.0.0.1").nth(1))
        .and_then(|rest| rest.split('"').next())
        .expect("the nginx service has an HTTP healthcheck");
    let nginx = read("deploy/nginx/nginx.conf");
    assert!(
        nginx.contains(&format!("location = {nginx_check} {{")),
        "deploy/nginx/nginx.conf answers the compose healthcheck {nginx_check} itself"
    );
    let probes = vec![
        ("image HEALTHCHECK".to_owned(), "/healthz".to_owned()),
        ("readiness".to_owned(), "/readyz".to_owned()),
    ];
    settings_serve_the_probes("docker-compose", &settings, &probes).await;
}

/// `512Mi`, `1Gi`, `900mb`, `1gb` → bytes (Kubernetes quantities and Redis memory sizes).
fn memory_bytes(value: &str) -> u64 {
    let (n, unit) = number_and_unit(value);
    n * match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "ki" => 1 << 10,
        "mi" => 1 << 20,
        "gi" => 1 << 30,
        "k" | "kb" => 1000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        _ => panic!("unknown memory unit in {value}"),
    }
}

#[test]
fn the_redis_manifest_holds_the_history_the_gateways_keep() {
    let redis = read("k8s/redis.yaml");
    // `args: [...]`, a flow sequence that may span lines.
    let start = redis
        .find("args: [")
        .expect("k8s/redis.yaml gives redis-server its args")
        + 6;
    let end = start + redis[start..].find(']').expect("args ends with ]") + 1;
    let args: Vec<String> =
        serde_json::from_str(&redis[start..end]).expect("args is a JSON-style list");
    assert_eq!(args.first().map(String::as_str), Some("redis-server"));
    let flag = |name: &str| -> String {
        let at = args
            .iter()
            .position(|a| a == name)
            .unwrap_or_else(|| panic!("k8s/redis.yaml: redis-server has no {name}"));
        args[at + 1].clone()
    };
    assert_eq!(
        flag("--maxmemory-policy"),
        "noeviction",
        "evicting would drop events"
    );
    let maxmemory = memory_bytes(&flag("--maxmemory"));
    let limit = memory_bytes(lookup(&mapping(&redis, "limits"), "memory"));
    let config = configmap();
    let history: u64 = lookup(&config, "EVENTFABRIC_HISTORY")
        .parse()
        .expect("a number");
    let largest: u64 = lookup(&config, "EVENTFABRIC_MAX_EVENT_BYTES")
        .parse()
        .expect("a number");
    // The README's formula: stream entries of up to `largest` bytes plus ~60 B, and at
    // most 100,000 idempotency keys of at most 200 bytes (~600 B each).
    let needed = history * (largest + 64) + 100_000 * 600;
    assert!(
        maxmemory >= needed,
        "k8s/redis.yaml: --maxmemory {maxmemory} B cannot hold {history} events of {largest} B \
         plus the idempotency keys ({needed} B)"
    );
    assert!(
        maxmemory + 64 * (1 << 20) <= limit,
        "k8s/redis.yaml: --maxmemory {maxmemory} B leaves too little of the {limit} B container limit"
    );
}
