#!/usr/bin/env python3
"""What one namespace costs the Redis Cluster shard that holds it.

Starts a cluster of three primaries with a replica each on loopback (redis-server and
redis-cli from PATH), R gateways (target/release/eventfabric) on it with the namespace
`eventfabric` (slot 7337), and for each R runs loadgen: clients spread over the gateways,
events published with FCALL straight to the slot's primary at a fixed rate, then as fast
as the shard acknowledges. It reports the CPU the slot's primary spent per event (from
/proc) and so the events per second one Redis core carries for R replicas, and the
highest rate reached here with every client getting every event.

    cargo build --release -p eventfabric -p eventfabric-bench
    python3 bench/cluster_shard.py [--replicas 1,2,4] [--clients 100] [--events 10000]
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
GATEWAY = os.path.join(TARGET, "release", "eventfabric")
LOADGEN = os.path.join(TARGET, "release", "loadgen")
SLOT = 7337
TICKS = os.sysconf("SC_CLK_TCK")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(port, *args):
    return subprocess.run(["redis-cli", "-p", str(port), *args], check=True,
                          capture_output=True, text=True, timeout=30).stdout


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def wait(what, check, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if check():
                return
        except (subprocess.SubprocessError, OSError):
            pass
        time.sleep(0.1)
    sys.exit(f"timed out waiting for {what}")


def start_cluster(workdir, procs):
    ports = [free_port() for _ in range(6)]
    pids = {}
    for port in ports:
        d = os.path.join(workdir, str(port))
        os.makedirs(d)
        p = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", d,
             "--save", "", "--appendonly", "no", "--cluster-enabled", "yes",
             "--cluster-port", str(free_port()), "--cluster-config-file", "nodes.conf"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(p)
        pids[port] = p.pid
    for port in ports:
        wait(f"redis on {port}", lambda port=port: "PONG" in cli(port, "PING"))
    subprocess.run(["redis-cli", "--cluster", "create", *[f"127.0.0.1:{p}" for p in ports],
                    "--cluster-replicas", "1", "--cluster-yes"],
                   check=True, capture_output=True, timeout=60)
    for port in ports:
        wait("cluster_state:ok", lambda port=port: "cluster_state:ok" in cli(port, "CLUSTER", "INFO"))
    owner = None
    for line in cli(ports[0], "CLUSTER", "NODES").splitlines():
        parts = line.split()
        if "master" not in parts[2]:
            continue
        for r in parts[8:]:
            a, _, b = r.partition("-")
            if a.isdigit() and int(a) <= SLOT <= int(b or a):
                owner = int(parts[1].split("@")[0].rsplit(":", 1)[1])
    return ports, pids, owner


def start_gateways(n, url, procs):
    apis = []
    for i in range(n):
        port = free_port()
        p = subprocess.Popen(
            [GATEWAY, "serve", "--listen", f"127.0.0.1:{port}", "--redis-url", url,
             "--namespace", "eventfabric", "--replica-id", f"bench-{i}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, "RUST_LOG": "eventfabric=warn"})
        procs.append(p)
        apis.append((f"http://127.0.0.1:{port}", p.pid))
    for base, _ in apis:
        wait(f"{base} ready", lambda base=base: subprocess.run(
            ["curl", "-sf", f"{base}/readyz"], capture_output=True).returncode == 0, 60)
    return apis


def idle_rate(pid, secs=5.0):
    """CPU seconds per second the shard spends with the gateways connected and no events
    (canaries, heartbeats, the cluster bus)."""
    before, start = cpu_seconds(pid), time.time()
    time.sleep(secs)
    return (cpu_seconds(pid) - before) / (time.time() - start)


def run(apis, owner, owner_pid, clients, events, rate):
    before, start = cpu_seconds(owner_pid), time.time()
    out = subprocess.run(
        [LOADGEN, "--url", ",".join(f"{b}/api/events/stream" for b, _ in apis),
         "--clients", str(clients), "--events", str(events), "--rate", str(rate),
         "--publish", "fcall", "--redis-url", f"redis://127.0.0.1:{owner}",
         "--namespace", "eventfabric", "--drain-secs", "10",
         *sum((["--server-pid", str(pid)] for _, pid in apis), [])],
        capture_output=True, text=True, timeout=600)
    spent = cpu_seconds(owner_pid) - before
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result, spent, time.time() - start


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--replicas", default="1,2,4")
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--events", type=int, default=10000)
    ap.add_argument("--rate", type=float, default=2000)
    args = ap.parse_args()
    for tool in ("redis-server", "redis-cli", "curl"):
        if not shutil.which(tool):
            sys.exit(f"{tool} not found")
    for binary in (GATEWAY, LOADGEN):
        if not os.path.exists(binary):
            sys.exit(f"{binary} missing: cargo build --release -p eventfabric -p eventfabric-bench")
    rows = []
    for r in [int(x) for x in args.replicas.split(",")]:
        procs = []
        workdir = tempfile.mkdtemp(prefix="eventfabric-cluster-bench-")
        try:
            ports, pids, owner = start_cluster(workdir, procs)
            url = "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports[:3])
            apis = start_gateways(r, url, procs)
            idle = idle_rate(pids[owner])
            fixed, spent, took = run(apis, owner, pids[owner], args.clients, args.events, args.rate)
            fast, fast_spent, fast_took = run(apis, owner, pids[owner], args.clients, args.events, 0)
            # The marginal cost of an event: what the run spent beyond the idle rate.
            per_event_us = max(spent - idle * took, 0) / max(fixed["published"], 1) * 1e6
            fast_us = max(fast_spent - idle * fast_took, 0) / max(fast["published"], 1) * 1e6
            rows.append({
                "replicas": r,
                "clients": fixed["connected"],
                "idle_shard_cpu_share": round(idle, 4),
                "shard_cpu_us_per_event": round(per_event_us, 1),
                "fixed_rate": args.rate,
                "fixed_lost": fixed["lost"],
                "fixed_p99_ms": fixed["p99_ms"],
                "max_publish_rate": round(fast["published"] / max(fast["publish_secs"], 1e-9)),
                "max_lost": fast["lost"],
                "max_p99_ms": fast["p99_ms"],
                "max_shard_cpu_us_per_event": round(fast_us, 1),
                "events_per_s_per_shard_core": round(1e6 / max(fast_us, 1e-9)),
            })
            print(json.dumps(rows[-1]), flush=True)
        finally:
            for p in procs:
                p.kill()
            for p in procs:
                p.wait()
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
