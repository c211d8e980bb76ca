#!/usr/bin/env bash
# bench/storm.sh [RUNS] — the reconnect storm of issue 11: 3 nodes (--quiet-prefix q:) on a
# private Redis, 15,000 clients in one room on node 1, 5 messages/s, node 1 SIGKILLed 3 s in;
# every client reconnects to the other two and resumes. A fresh cluster per run. Prints, per
# run, the p50 and p99 from the kill to caught up, and what was delivered; keeps each run's JSON
# under $OUT (default /tmp/switchyard-storm). $SERVER and $BENCH name other builds; $CLIENTS
# another size. Needs `ulimit -n` of at least 20,000.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
RUNS=${1:-3}
OUT=${OUT:-/tmp/switchyard-storm}
PORT=${REDIS_PORT:-6397}
SERVER=${SERVER:-target/release/switchyard}
BENCH=${BENCH:-target/release/switchyard-bench}
CLIENTS=${CLIENTS:-15000}
mkdir -p "$OUT"
rm -f "$OUT"/*.json

# shellcheck source=bench/redis.sh
source bench/redis.sh

for run in $(seq "$RUNS"); do
  list="" targets="" nodes=()
  for n in 1 2 3; do
    "$SERVER" serve --redis "redis://127.0.0.1:$PORT/0" --redis-prefix "storm$$-$run" --rate-limit 0 \
      --quiet-prefix q: --listen "127.0.0.1:$((9140 + n))" --node-id "storm-$n" --data-dir "$(mktemp -d)" \
      --log-format json >"$OUT/node$n.$run.log" 2>&1 &
    nodes+=("$!")
    pids+=("$!")
    list="$list${list:+,}$!"
    targets="$targets${targets:+,}ws://127.0.0.1:$((9140 + n))"
  done
  for _ in $(seq 100); do curl -fs -o /dev/null "http://127.0.0.1:9143/readyz" && break; sleep 0.2; done
  "$BENCH" resume --target "$targets" --pid "$list" --also-pid "$REDIS" --clients "$CLIENTS" --stream room \
    --room-prefix q: --rate 5 --kill-pid "${nodes[0]}" --kill-target 0 --kill-after 3 --duration 10 --json \
    >"$OUT/storm.$run.json"
  python3 - "$OUT/storm.$run.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
c, v = d["recovery"]["catch_up_us"], d["delivery"]
print(f"caught up: p50 {c['p50'] / 1e6:.2f} s, p99 {c['p99'] / 1e6:.2f} s; "
      f"delivered {v['received']} of {v['expected']}, duplicates {v['duplicates']}, "
      f"reconnect failures {sum(d['reconnect_failures'].values())}")
PY
  kill "${nodes[1]}" "${nodes[2]}" 2>/dev/null || true
  wait "${nodes[1]}" "${nodes[2]}" 2>/dev/null || true
done
