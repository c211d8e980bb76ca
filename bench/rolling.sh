#!/usr/bin/env bash
# bench/rolling.sh [RUNS] — issue 14: delivery latency on the other nodes while one node drains.
#
# Per run, a fresh cluster: 3 nodes on a private Redis, node 1 started with --drain-delay 1
# --drain-seconds $DRAIN_SECONDS (default 10). $CLIENTS clients (default 3000) in one room on node 1
# receive 5 messages/s (`switchyard-bench resume`; the room is quiet, --quiet-prefix q:, as a room
# that size would be: else each client's move is a leave and a join event to 3,000 members), and a
# fanout load on nodes 2 and 3
# (`switchyard-bench fanout`, 10 rooms x 50 members, $RATE publishes/s, default 200) measures
# delivery latency over $MEASURE seconds (default 10). Twice per run:
#   before — the same load, nothing stopped;
#   during — node 1 gets SIGTERM so that its close window (after the 1 s delay) starts as the
#            fanout's measured seconds do (DRAIN_SECONDS=0: all closed at once, the old way): its $CLIENTS clients are closed with 1001 in even batches
#            and reconnect to nodes 2 and 3, resuming with `join` + `since`.
# Prints the fanout's p50 / p99 / p99.9 for both, and the drained clients' catch-up and delivery.
# JSON under $OUT (default /tmp/switchyard-rolling). $SERVER and $BENCH name other builds.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
RUNS=${1:-3}
OUT=${OUT:-/tmp/switchyard-rolling}
PORT=${REDIS_PORT:-6398}
SERVER=${SERVER:-target/release/switchyard}
BENCH=${BENCH:-target/release/switchyard-bench}
CLIENTS=${CLIENTS:-3000}
RATE=${RATE:-200}
DRAIN_SECONDS=${DRAIN_SECONDS:-10}
MEASURE=${MEASURE:-10}
mkdir -p "$OUT"
rm -f "$OUT"/*.json

# shellcheck source=bench/redis.sh
source bench/redis.sh

summary() {
  python3 - "$@" <<'PY'
import json, sys
label, fan, res = sys.argv[1], json.load(open(sys.argv[2])), json.load(open(sys.argv[3]))
l = fan["latency_us"]
v = res["delivery"]
c = res["recovery"]["catch_up_us"]
moved = sum(n for why, n in res["disconnects"].items())
print(f"{label:7} fanout on nodes 2+3: p50 {l['p50'] / 1000:.2f} ms, p99 {l['p99'] / 1000:.2f} ms, "
      f"p99.9 {l['p999'] / 1000:.2f} ms, lost {fan['delivery']['lost']}; "
      f"node-1 clients: moved {moved}, delivered {v['received']} of {v['expected']}, duplicates {v['duplicates']}"
      + (f", caught up p50 {c['p50'] / 1e6:.2f} s p99 {c['p99'] / 1e6:.2f} s" if moved else ""))
PY
}

for run in $(seq "$RUNS"); do
  for phase in before during; do
    nodes=() targets=""
    for n in 1 2 3; do
      "$SERVER" serve --redis "redis://127.0.0.1:$PORT/0" --redis-prefix "rolling$$-$run-$phase" --rate-limit 0 \
        --listen "127.0.0.1:$((9150 + n))" --node-id "rolling-$n" --data-dir "$(mktemp -d)" \
        --quiet-prefix q: --drain-delay 1 --drain-seconds "$DRAIN_SECONDS" --log-format json >"$OUT/node$n.$run.$phase.log" 2>&1 &
      nodes+=("$!")
      pids+=("$!")
    done
    for n in 1 2 3; do
      for _ in $(seq 100); do curl -fs -o /dev/null "http://127.0.0.1:$((9150 + n))/readyz" && break; sleep 0.2; done
    done
    kill_args=()
    [ "$phase" = during ] && kill_args=(--kill-pid "${nodes[0]}" --kill-signal term)
    # The resume clients publish for 5 s before the SIGTERM; the fanout starts measuring 1 s
    # after it (the drain delay), for the whole close window.
    "$BENCH" resume --target ws://127.0.0.1:9151,ws://127.0.0.1:9152,ws://127.0.0.1:9153 \
      --pid "${nodes[0]},${nodes[1]},${nodes[2]}" --also-pid "$REDIS" --clients "$CLIENTS" --stream room \
      --room-prefix q: --rate 5 --kill-target 0 --kill-after 5 "${kill_args[@]}" --duration $((MEASURE + 10)) --json \
      >"$OUT/resume.$run.$phase.json" &
    resume=$!
    sleep 3
    "$BENCH" fanout --target ws://127.0.0.1:9152,ws://127.0.0.1:9153 --pid "${nodes[1]},${nodes[2]}" \
      --also-pid "$REDIS" --rooms 10 --members 50 --rate "$RATE" --warmup 4 --duration "$MEASURE" --json \
      >"$OUT/fanout.$run.$phase.json"
    wait "$resume"
    summary "$phase" "$OUT/fanout.$run.$phase.json" "$OUT/resume.$run.$phase.json"
    kill "${nodes[@]}" 2>/dev/null || true
    wait "${nodes[@]}" 2>/dev/null || true
  done
done
