#!/usr/bin/env bash
# Slow request heads: what 5,000 connections sending their head one byte a second cost a
# gateway, and whether clients already streaming keep their latency. Runs the release
# build on a free port: loadgen alone, then loadgen beside slowloris. See bench/README.md.
#
#   cargo build --release -p eventfabric -p eventfabric-bench && bench/slowloris.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ulimit -n 20000
PORT=${PORT:-5611}
DRIBBLERS=${DRIBBLERS:-5000}
SECS=${SECS:-30}
target/release/eventfabric serve --listen "127.0.0.1:$PORT" --log-format json \
  >/tmp/slowloris-gateway.log 2>&1 &
GW=$!
trap 'kill $GW 2>/dev/null || true' EXIT
for _ in $(seq 50); do
  curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null && break
  sleep 0.1
done
loadgen() {
  target/release/loadgen --url "http://127.0.0.1:$PORT/api/events/stream" \
    --clients 200 --events $((SECS * 20)) --rate 20 --server-pid "$GW"
}
echo "== streaming alone" >&2
loadgen > /tmp/slowloris-alone.json
echo "== streaming beside $DRIBBLERS slow heads" >&2
target/release/slowloris --addr "127.0.0.1:$PORT" --connections "$DRIBBLERS" \
  --ramp-secs 5 --measure-secs "$SECS" --server-pid "$GW" > /tmp/slowloris.json &
LORIS=$!
sleep 7
loadgen > /tmp/slowloris-beside.json
wait $LORIS
python3 - <<'PY'
import json
alone = json.load(open('/tmp/slowloris-alone.json'))
beside = json.load(open('/tmp/slowloris-beside.json'))
loris = json.load(open('/tmp/slowloris.json'))
def pick(run):
    return {k: v for k, v in run.items() if any(s in k for s in ('p50', 'p99', 'cpu', 'lost', 'delivered'))}
print(json.dumps({'alone': pick(alone), 'beside_slow_heads': pick(beside), 'slowloris': loris}, indent=1))
PY
