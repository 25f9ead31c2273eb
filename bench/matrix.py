#!/usr/bin/env python3
"""Benchmark matrix: eventfabric (Redis mode) vs Nginx + Nchan (Redis mode), same generator.

Runs a fixed list of scenarios, each repeated (--reps, default 3) with FRESH servers per run
(so RSS per connection means something), alternating which system goes first per
repetition. Every loadgen JSON line (plus scenario/system/rep fields) goes to
bench/results/<timestamp>.jsonl; a markdown summary (median [min-max] per system and the
eventfabric/nchan ratio) is printed and written to bench/results/<timestamp>.md.

Topology per run: one redis-server (started once by this script, FLUSHALL between runs),
2 eventfabric replicas or 2 nginx instances of 1 worker each; clients spread over both
(except where a scenario says one replica); events published by HTTP POST to instance 1.

Python 3 standard library only. See bench/README.md ("The scenario matrix").
"""

import argparse
import datetime
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RELEASE = ROOT / "target" / "release"
NCHAN_SO = Path("/usr/lib/nginx/modules/ngx_nchan_module.so")
NCHAN_TEMPLATE = BENCH / "nchan" / "nginx.conf.template"

EF = "eventfabric"
NCHAN = "nchan"

# ---------------------------------------------------------------------------------------
# Scenarios. `quick` overrides apply with --quick (1 repetition, shorter runs).

SCENARIOS = {
    "idle_1k": dict(kind="idle", clients=1000, idle_secs=5, quick=dict(idle_secs=2)),
    "idle_10k": dict(kind="idle", clients=10000, idle_secs=5, quick=dict(idle_secs=2)),
    # The most one replica can hold: 19,000 of its 20,000 descriptors (one process).
    "idle_max": dict(kind="idle", clients=19000, replicas=1, idle_secs=5, quick=dict(idle_secs=2)),
    "fanout_100b": dict(kind="fanout", clients=1000, rate=100, secs=10, payload=100,
                        quick=dict(secs=3)),
    "fanout_1k": dict(kind="fanout", clients=1000, rate=100, secs=10, payload=1024,
                      quick=dict(secs=3)),
    "fanout_10k": dict(kind="fanout", clients=10000, rate=10, secs=10, payload=100,
                       quick=dict(secs=5)),
    # Ascending rates at 1,000 clients; the result is the highest deliveries/s of a step
    # with p99 < 100 ms and zero loss (the search stops at the first failing step).
    "max_throughput": dict(kind="search", clients=1000, payload=100, secs=3,
                           rates=[50, 100, 200, 300, 400, 600, 800, 1200, 1600, 3200],
                           quick=dict(secs=2, rates=[100, 200, 400])),
    # One replica at its file-descriptor limit (20,000): 19,000 clients all get every event.
    "fd_limit": dict(kind="fanout", clients=19000, replicas=1, rate=2, events=20, payload=100,
                     systems=[EF], source_ips="127.0.0.1,127.0.0.2",
                     quick=dict(events=10)),
    # 10,000 clients on replica A; A is killed (SIGKILL) some seconds into publishing; the
    # clients reconnect to B with Last-Event-ID and must catch up without loss in 5 s.
    "reconnect_storm": dict(kind="storm", clients=10000, rate=20, secs=15, kill_after=5,
                            payload=100, quick=dict(secs=10, kill_after=3)),
    # Only with --soak-mins N.
    "soak": dict(kind="soak", clients=1000, rate=10, payload=100, sample_secs=30),
}
DEFAULT_ORDER = ["idle_1k", "idle_10k", "idle_max", "fanout_100b", "fanout_1k", "fanout_10k",
                 "max_throughput", "fd_limit", "reconnect_storm"]

# Which figures the summary shows per scenario kind, and whether higher is better.
METRICS = {
    "idle": ["connected", "rss_per_conn_kb", "rss_idle_kb"],
    "fanout": ["connected", "lost", "dup", "p50_ms", "p99_ms", "p999_ms", "max_ms",
               "deliveries_per_s", "server_cpu_per_delivery_us", "rss_per_conn_kb"],
    "search": ["best_deliveries_per_s", "best_rate", "best_p99_ms"],
    "storm": ["connected", "lost", "dup", "reconnects", "not_caught_up", "caught_up_ms",
              "reconnect_p50_ms", "reconnect_p99_ms", "reconnect_max_ms", "p99_ms"],
    "soak": ["lost", "p99_ms", "rss_slope_kb_per_min", "rss_end_kb"],
}


def log(msg):
    print(f"[matrix {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------
# Process bookkeeping: every started PID is registered and killed in `finally`.

class Procs:
    def __init__(self):
        self.pids = {}  # pid -> label

    def add(self, pid, label):
        self.pids[pid] = label

    def forget(self, pid):
        self.pids.pop(pid, None)

    def kill(self, pid, sig=signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def kill_all(self):
        for pid in list(self.pids):
            self.kill(pid)
        self.pids.clear()


PROCS = Procs()


def start(cmd, label, log_path, pin=None, **kw):
    if pin is not None:
        cmd = ["taskset", "-c", str(pin)] + cmd
    out = open(log_path, "ab")
    # A session of its own: Ctrl-C reaches only this script, whose `finally` kills it.
    p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                         start_new_session=True, **kw)
    out.close()
    PROCS.add(p.pid, label)
    return p


def stop_proc(p, sig=signal.SIGTERM, wait=5.0):
    if p.poll() is None:
        PROCS.kill(p.pid, sig)
        try:
            p.wait(wait)
        except subprocess.TimeoutExpired:
            PROCS.kill(p.pid, signal.SIGKILL)
            p.wait(5)
    PROCS.forget(p.pid)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_status(url, timeout=1.0):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (OSError, ValueError):
        return None


def wait_until(pred, secs, what, alive=None):
    end = time.monotonic() + secs
    while time.monotonic() < end:
        if pred():
            return
        if alive is not None and alive.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {alive.returncode}")
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


def children_of(pid):
    kids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if int(fields[1]) == pid:
            kids.append(int(d))
    return kids


# ---------------------------------------------------------------------------------------
# Redis (a minimal RESP client is enough for PING and FLUSHALL).

def redis_cmd(port, *args):
    payload = f"*{len(args)}\r\n" + "".join(f"${len(a)}\r\n{a}\r\n" for a in args)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(payload.encode())
        return s.recv(4096).decode(errors="replace").strip()


class Redis:
    def __init__(self, workdir, pin):
        self.port = free_port()
        self.proc = start(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                           "--save", "", "--appendonly", "no", "--maxclients", "20000"],
                          "redis", workdir / "redis.log", pin)

        def up():
            try:
                return redis_cmd(self.port, "PING") == "+PONG"
            except OSError:
                return False

        wait_until(up, 10, "redis-server", self.proc)

    def flushall(self):
        r = redis_cmd(self.port, "FLUSHALL")
        if r != "+OK":
            raise RuntimeError(f"FLUSHALL answered {r!r}")

    def stop(self):
        stop_proc(self.proc)


# ---------------------------------------------------------------------------------------
# The systems under test. A cluster exposes stream URLs, the publish flags, the PIDs to
# measure, and per instance the PIDs a "kill this instance" must SIGKILL.

class Cluster:
    def __init__(self, system):
        self.system = system
        self.procs = []
        self.stream_urls = []
        self.publish_args = []
        self.measure_pids = []
        self.kill_pids = []  # per instance

    def kill_instance(self, i):
        for pid in self.kill_pids[i]:
            PROCS.kill(pid, signal.SIGKILL)

    def stop(self):
        for p in self.procs:
            stop_proc(p, signal.SIGTERM, 12)
        # nginx workers of a SIGKILLed master are orphans: make sure they are gone.
        for pids in self.kill_pids:
            for pid in pids:
                PROCS.kill(pid, signal.SIGKILL)
                PROCS.forget(pid)


def start_eventfabric(n, redis, ns, workdir, pin):
    c = Cluster(EF)
    for i in range(1, n + 1):
        port = free_port()
        p = start([str(RELEASE / "eventfabric"), "--listen", f"127.0.0.1:{port}",
                   "--redis-url", f"redis://127.0.0.1:{redis.port}", "--namespace", ns,
                   "--replica-id", f"ef{i}"],
                  f"eventfabric ef{i}", workdir / f"{ns}-ef{i}.log", pin)
        c.procs.append(p)
        wait_until(lambda: http_status(f"http://127.0.0.1:{port}/readyz") == 200, 20,
                   f"eventfabric ef{i} /readyz", p)
        c.stream_urls.append(f"http://127.0.0.1:{port}/api/events/stream")
        c.measure_pids.append(p.pid)
        c.kill_pids.append([p.pid])
    c.publish_args = ["--publish", "http",
                      "--publish-url", c.stream_urls[0].replace("/events/stream", "/events")]
    return c


def start_nchan(n, redis, ns, workdir, pin):
    c = Cluster(NCHAN)
    template = NCHAN_TEMPLATE.read_text()
    for i in range(1, n + 1):
        port = free_port()
        prefix = workdir / f"{ns}-nginx{i}"
        (prefix / "logs").mkdir(parents=True, exist_ok=True)
        (prefix / "tmp").mkdir(parents=True, exist_ok=True)
        conf = prefix / "nginx.conf"
        conf.write_text(template.replace("@PORT@", str(port))
                        .replace("@REDIS_PORT@", str(redis.port)))
        p = start(["nginx", "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"],
                  f"nginx{i}", prefix / "stderr.log", pin)
        c.procs.append(p)
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: http_status(base + "/ready") == 200, 20, f"nginx{i} /ready", p)
        # The publisher location answers channel info (404: no channel yet) once Redis works.
        wait_until(lambda: http_status(base + "/pub") in (200, 404), 20, f"nginx{i} redis", p)
        workers = []
        wait_until(lambda: workers.extend(children_of(p.pid)) or workers, 10,
                   f"nginx{i} worker", p)
        for w in workers:
            PROCS.add(w, f"nginx{i} worker")
        c.stream_urls.append(base + "/sub")
        c.measure_pids.extend(workers)
        c.kill_pids.append([p.pid] + workers)  # master first, so it cannot respawn a worker
    c.publish_args = ["--publish", "nchan", "--publish-url",
                      c.stream_urls[0].replace("/sub", "/pub")]
    return c


STARTERS = {EF: start_eventfabric, NCHAN: start_nchan}


# ---------------------------------------------------------------------------------------
# loadgen

def run_loadgen(args, timeout, workdir, tag, pin, on_publishing=None):
    cmd = [str(RELEASE / "loadgen")] + [str(a) for a in args] + ["--timeout-secs", str(timeout)]
    if pin is not None:
        cmd = ["taskset", "-c", str(pin)] + cmd
    logf = open(workdir / f"{tag}.loadgen.log", "w")
    logf.write(" ".join(cmd) + "\n")
    # stdout (the JSON line) goes to a file: this thread must not read the stderr pipe
    # that the pump thread watches for the "publishing" line.
    outf = tempfile.TemporaryFile(mode="w+")
    p = subprocess.Popen(cmd, stdout=outf, stderr=subprocess.PIPE,
                         stdin=subprocess.DEVNULL, start_new_session=True, text=True)
    PROCS.add(p.pid, "loadgen")

    def pump():
        for line in p.stderr:
            logf.write(line)
            logf.flush()
            if on_publishing and line.startswith("loadgen: publishing"):
                on_publishing()

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    try:
        p.wait(timeout=timeout + 30)
    except subprocess.TimeoutExpired:
        PROCS.kill(p.pid)
        p.wait()
    PROCS.forget(p.pid)
    t.join(5)
    logf.close()
    outf.seek(0)
    out = outf.read()
    outf.close()
    lines = [l for l in (out or "").splitlines() if l.startswith("{")]
    if not lines:
        log(f"  loadgen gave no JSON (exit {p.returncode}); see {workdir / (tag + '.loadgen.log')}")
        return None
    rep = json.loads(lines[-1])
    rep["exit_code"] = p.returncode
    return rep


def brief(r):
    if r is None:
        return "no result"
    s = f"conn {r['connected']}/{r['clients']}"
    if r.get("expected"):
        s += (f", {r['delivered']}/{r['expected']} lost {r['lost']} dup {r['dup']}"
              f", p50 {r['p50_ms']} p99 {r['p99_ms']} max {r['max_ms']} ms"
              f", {r['deliveries_per_s']:.0f} del/s")
    if r.get("rss_per_conn_kb"):
        s += f", {r['rss_per_conn_kb']} KiB/conn"
    if r.get("reconnects"):
        s += (f", {r['reconnects']} reconnects, p99 {r['reconnect_p99_ms']} ms"
              f", caught up {r['caught_up_ms']} ms")
    if r.get("rss_series_kb"):
        s += f", RSS slope {r['rss_slope_kb_per_min']} KiB/min"
    if r.get("timed_out"):
        s += ", TIMED OUT"
    if r.get("first_error"):
        s += f", errors: {r['first_error'][:120]}"
    return s


# ---------------------------------------------------------------------------------------
# One scenario run for one system (fresh servers).

class Matrix:
    def __init__(self, opts, workdir, out_jsonl):
        self.opts = opts
        self.workdir = workdir
        self.out = out_jsonl
        self.redis = None
        self.rows = []
        self.k = 0
        self.server_pin = 0 if opts.taskset else None
        self.gen_pin = 1 if opts.taskset else None

    def record(self, row):
        self.rows.append(row)
        with open(self.out, "a") as f:
            f.write(json.dumps(row) + "\n")

    def cluster(self, system, n):
        self.k += 1
        ns = f"bench{self.k}"
        self.redis.flushall()
        return STARTERS[system](n, self.redis, ns, self.workdir, self.server_pin), ns

    def run(self, name, sc, system, rep):
        replicas = sc.get("replicas", 2)
        c, ns = self.cluster(system, replicas)
        meta = dict(scenario=name, system=system, rep=rep, replicas=replicas,
                    namespace=ns, time=datetime.datetime.now().isoformat(timespec="seconds"))
        try:
            getattr(self, "run_" + sc["kind"])(name, sc, c, meta)
        finally:
            c.stop()

    def common(self, sc, c, measure=None):
        a = ["--url", ",".join(c.stream_urls), "--clients", sc["clients"],
             "--connect-rate", 5000]
        for pid in (c.measure_pids if measure is None else measure):
            a += ["--server-pid", pid]
        if sc.get("source_ips"):
            a += ["--source-ips", sc["source_ips"]]
        return a

    def go(self, args, timeout, tag, meta, on_publishing=None):
        r = run_loadgen(args, timeout, self.workdir, tag, self.gen_pin, on_publishing)
        log(f"  {meta['scenario']} {meta['system']} rep {meta['rep']}"
            f"{' step ' + str(meta['step']) if 'step' in meta else ''}: {brief(r)}")
        if r is not None:
            self.record({**meta, **r})
        return r

    def tag(self, meta):
        return f"{meta['namespace']}-{meta['scenario']}-{meta['system']}" + (
            f"-{meta['step']}" if "step" in meta else "")

    def run_idle(self, name, sc, c, meta):
        args = self.common(sc, c) + ["--events", 0, "--idle-secs", sc["idle_secs"]]
        self.go(args, 120, self.tag(meta), meta)

    def run_fanout(self, name, sc, c, meta):
        events = sc.get("events") or int(sc["rate"] * sc["secs"])
        args = self.common(sc, c) + c.publish_args + [
            "--events", events, "--rate", sc["rate"], "--payload-bytes", sc["payload"],
            "--warmup-secs", 1, "--drain-secs", 10]
        self.go(args, events / sc["rate"] + 120, self.tag(meta), meta)

    def run_search(self, name, sc, c, meta):
        best = None
        for rate in sc["rates"]:
            m = {**meta, "step": rate}
            events = int(rate * sc["secs"])
            args = self.common(sc, c) + c.publish_args + [
                "--events", events, "--rate", rate, "--payload-bytes", sc["payload"],
                "--warmup-secs", 0.5, "--drain-secs", 5]
            r = self.go(args, sc["secs"] + 90, self.tag(m), m)
            ok = (r is not None and r["connected"] == sc["clients"] and r["lost"] == 0
                  and r["dup"] == 0 and r["p99_ms"] < 100 and not r["timed_out"]
                  and r["publish_errors"] == 0)
            if not ok:
                break
            if best is None or r["deliveries_per_s"] > best["deliveries_per_s"]:
                best = r
        row = {**meta, "summary": True,
               "best_deliveries_per_s": best["deliveries_per_s"] if best else 0,
               "best_rate": None,
               "best_p99_ms": best["p99_ms"] if best else None}
        if best is not None:
            row["best_rate"] = int(round(best["published"] / sc["secs"]))
        log(f"  {name} {meta['system']} rep {meta['rep']}: best "
            f"{row['best_deliveries_per_s']:.0f} deliveries/s at {row['best_rate']} ev/s")
        self.record(row)

    def run_storm(self, name, sc, c, meta):
        events = int(sc["rate"] * sc["secs"])
        # Measure only the survivor: the killed instance cannot be sampled at the end.
        a = self.common(sc, c, [p for p in c.measure_pids if p not in c.kill_pids[0]])
        args = a + c.publish_args + [
            "--reconnect", "--initial-url-only", "--events", events, "--rate", sc["rate"],
            "--payload-bytes", sc["payload"], "--warmup-secs", 1, "--drain-secs", 15]
        # Publishing goes to instance 1, which is killed: publish to the survivor instead.
        pub = c.publish_args[-1]
        survivor = c.stream_urls[1]
        if c.system == EF:
            args[args.index(pub)] = survivor.replace("/events/stream", "/events")
        else:
            args[args.index(pub)] = survivor.replace("/sub", "/pub")
        killed = {}

        def arm():
            def kill():
                time.sleep(sc["kill_after"])
                killed["at"] = time.time()
                c.kill_instance(0)
                log(f"  killed {c.system} instance 1 (pids {c.kill_pids[0]})")
            threading.Thread(target=kill, daemon=True).start()

        m = {**meta, "kill_after_s": sc["kill_after"]}
        self.go(args, events / sc["rate"] + 120, self.tag(meta), m, on_publishing=arm)

    def run_soak(self, name, sc, c, meta):
        secs = self.opts.soak_mins * 60
        events = int(sc["rate"] * secs)
        args = self.common(sc, c) + c.publish_args + [
            "--events", events, "--rate", sc["rate"], "--payload-bytes", sc["payload"],
            "--warmup-secs", 1, "--drain-secs", 10, "--rss-sample-secs", sc["sample_secs"]]
        self.go(args, secs + 180, self.tag(meta), meta)


# ---------------------------------------------------------------------------------------
# Summary

def fmt(v):
    if v is None:
        return "–"
    if isinstance(v, float) and not v.is_integer():
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return f"{int(v)}"


def summarize(rows, scenarios, systems, header):
    out = [f"# eventfabric vs Nginx + Nchan benchmark matrix", "", header, ""]
    checks = []
    for name in scenarios:
        sc = SCENARIOS[name]
        kind = sc["kind"]
        sel = [r for r in rows if r["scenario"] == name and
               (kind != "search" or r.get("summary"))]
        if not sel:
            continue
        out += [f"## {name}", "", f"| metric | {' | '.join(systems)} |"
                + (" eventfabric/nchan |" if len(systems) == 2 else ""),
                "|---|" + "---|" * len(systems) + ("---|" if len(systems) == 2 else "")]
        for metric in METRICS[kind]:
            cells, medians = [], {}
            for system in systems:
                vals = [r.get(metric) for r in sel if r["system"] == system]
                vals = [v for v in vals if isinstance(v, (int, float)) and v is not None]
                if not vals:
                    cells.append("–")
                    continue
                med = statistics.median(vals)
                medians[system] = med
                cell = fmt(med)
                if len(vals) > 1 and min(vals) != max(vals):
                    cell += f" [{fmt(min(vals))}–{fmt(max(vals))}]"
                cells.append(cell + (f" (n={len(vals)})" if len(vals) != len(
                    [r for r in sel if r["system"] == system]) else ""))
            ratio = ""
            if len(systems) == 2:
                a, b = medians.get(EF), medians.get(NCHAN)
                ratio = f" {a / b:.2f} |" if a is not None and b else " – |"
            out.append(f"| {metric} | {' | '.join(cells)} |{ratio}")
        out.append("")
        for r in sel:
            verdict = check(name, sc, r)
            if verdict:
                checks.append(f"- {name} {r['system']} rep {r['rep']}: {verdict}")
    if checks:
        out += ["## Checks", ""] + checks + [""]
    return "\n".join(out)


def check(name, sc, r):
    """Pass/fail of a scenario's stated expectation, for one run ('' = no expectation)."""
    problems = []
    if r.get("timed_out"):
        problems.append("timed out")
    if sc["kind"] in ("fanout", "storm", "soak", "idle"):
        if r.get("connected") != sc["clients"]:
            problems.append(f"connected {r.get('connected')}/{sc['clients']}")
    if sc["kind"] in ("fanout", "storm", "soak"):
        if r.get("lost") or r.get("dup"):
            problems.append(f"lost {r.get('lost')} dup {r.get('dup')}")
    if sc["kind"] == "storm":
        cu = r.get("caught_up_ms")
        if cu is None or cu > 5000:
            problems.append(f"caught up {cu} ms (want <= 5000)")
        if not r.get("reconnects"):
            problems.append("no reconnects (was the instance killed?)")
    return "FAIL: " + "; ".join(problems) if problems else "ok"


# ---------------------------------------------------------------------------------------

def nchan_available(opts):
    if shutil.which("nginx") and NCHAN_SO.exists():
        return True
    if opts.install_nchan and os.geteuid() == 0 and shutil.which("apt-get"):
        log("installing nginx-light and libnginx-mod-nchan")
        subprocess.run(["apt-get", "install", "-y", "nginx-light", "libnginx-mod-nchan"],
                       check=False)
        return bool(shutil.which("nginx")) and NCHAN_SO.exists()
    log("nginx or the nchan module is missing (apt-get install -y nginx-light "
        "libnginx-mod-nchan, or --install-nchan): eventfabric only")
    return False


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3, help="repetitions per scenario (default 3)")
    ap.add_argument("--only", default="", help="comma-separated scenario names")
    ap.add_argument("--skip-nchan", action="store_true", help="eventfabric only")
    ap.add_argument("--install-nchan", action="store_true",
                    help="apt-get install nginx-light libnginx-mod-nchan if missing")
    ap.add_argument("--quick", action="store_true", help="1 repetition, shorter runs (smoke test)")
    ap.add_argument("--taskset", action="store_true",
                    help="pin servers and redis to CPU 0 and loadgen to CPU 1")
    ap.add_argument("--soak-mins", type=float, default=0,
                    help="also run the soak scenario for this many minutes (default off)")
    ap.add_argument("--no-build", action="store_true", help="use the existing release binaries")
    opts = ap.parse_args()

    names = [s for s in opts.only.split(",") if s] or list(DEFAULT_ORDER)
    if opts.soak_mins > 0 and "soak" not in names:
        names.append("soak")
    for n in names:
        if n not in SCENARIOS:
            ap.error(f"unknown scenario {n!r}; known: {', '.join(SCENARIOS)}")
    if "soak" in names and opts.soak_mins <= 0:
        ap.error("the soak scenario needs --soak-mins N")
    reps = 1 if opts.quick else opts.reps

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 20000:
        sys.exit(f"the open-file hard limit is {hard}; the matrix needs 20,000")
    resource.setrlimit(resource.RLIMIT_NOFILE, (20000, hard))

    if not opts.no_build:
        log("building release binaries")
        subprocess.run(["cargo", "build", "--release", "-p", "eventfabric",
                        "-p", "eventfabric-bench"], cwd=ROOT, check=True)
    systems = [EF] + ([] if opts.skip_nchan or not nchan_available(opts) else [NCHAN])

    results = BENCH / "results"
    results.mkdir(exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    jsonl, md = results / f"{stamp}.jsonl", results / f"{stamp}.md"
    workdir = Path(tempfile.mkdtemp(prefix=f"efmatrix-{stamp}-"))
    log(f"logs in {workdir}; results in {jsonl}")

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    m = Matrix(opts, workdir, jsonl)
    interrupted = False
    try:
        m.redis = Redis(workdir, m.server_pin)
        for name in names:
            sc = dict(SCENARIOS[name])
            if opts.quick:
                sc.update(sc.get("quick", {}))
            sys_here = [s for s in systems if s in sc.get("systems", systems)]
            for rep in range(1, reps + 1):
                order = sys_here if rep % 2 == 1 else list(reversed(sys_here))
                for system in order:
                    log(f"{name} rep {rep}/{reps}: {system}")
                    try:
                        m.run(name, sc, system, rep)
                    except RuntimeError as e:
                        log(f"  {name} {system} rep {rep} FAILED to run: {e}")
                        m.record(dict(scenario=name, system=system, rep=rep, error=str(e)))
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: stopping everything")
    finally:
        PROCS.kill_all()
    header = (f"{stamp}; reps {reps}{' (quick)' if opts.quick else ''}; "
              f"{'taskset: servers CPU 0, loadgen CPU 1' if opts.taskset else 'no pinning'}; "
              f"{os.cpu_count()} CPUs; values are median [min–max]; raw runs: {jsonl.name}")
    text = summarize(m.rows, names, systems, header)
    md.write_text(text + "\n")
    print(text)
    log(f"wrote {md} and {jsonl}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
