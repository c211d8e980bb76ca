#!/usr/bin/env bash
# bench/ab.sh OLD_BIN_DIR NEW_BIN_DIR [RUNS] — an old build of Switchyard against a new one, 3
# nodes each on one private Redis, the scenarios of bench/compare.sh, interleaved (old, new,
# old, ...) so that drift on a shared machine hits both alike: the "no regression" check.
#
# A BIN_DIR holds release builds of `switchyard` and `switchyard-bench` (the new dir's generator
# drives both). Keeps every run's JSON under $OUT (default /tmp/switchyard-ab) and prints medians
# and spread with bench/summarize.py; systems are named `old` and `new`. $SCENARIOS picks
# scenarios by name (default: fanout-rate fanout-flat direct-rate; direct-flat, 100 pairs flat out,
# and api-flat, room messages posted to the server API flat out, are there too).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OLD=${1:?usage: bench/ab.sh OLD_BIN_DIR NEW_BIN_DIR [RUNS]}
NEW=${2:?usage: bench/ab.sh OLD_BIN_DIR NEW_BIN_DIR [RUNS]}
RUNS=${3:-3}
OUT=${OUT:-/tmp/switchyard-ab}
PORT=${REDIS_PORT:-6394}
SCENARIOS=${SCENARIOS:-fanout-rate fanout-flat direct-rate}
BENCH=$NEW/switchyard-bench
mkdir -p "$OUT"
rm -f "$OUT"/*.json

# shellcheck source=bench/redis.sh
source bench/redis.sh

# shellcheck source=bench/nodes.sh
source bench/nodes.sh
start_nodes old "$OLD/switchyard" 9110 "ab$$old"
start_nodes new "$NEW/switchyard" 9120 "ab$$new"

run() {
  local name=$1
  shift
  [[ " $SCENARIOS " == *" $name "* ]] || return 0
  for i in $(seq "$RUNS"); do
    "$BENCH" "$@" --json --target "$TARGET_old" --pid "$PIDS_old" --also-pid "$REDIS" >"$OUT/$name.old.$i.json"
    "$BENCH" "$@" --json --target "$TARGET_new" --pid "$PIDS_new" --also-pid "$REDIS" >"$OUT/$name.new.$i.json"
  done
}

run fanout-rate fanout --rooms 10 --members 100 --rate 1000
run fanout-flat fanout --rooms 10 --members 100 --rate 0 --window 4
run direct-rate direct --pairs 100 --rate 5000
run direct-flat direct --pairs 100 --rate 0 --window 4

# The server API: keep-alive connections posting room messages to every node's API (api-flat: 8
# requests in flight on each of 4 connections, flat out), delivered to 10 rooms of 30 members.
run_api() {
  local name=$1
  shift
  [[ " $SCENARIOS " == *" $name "* ]] || return 0
  for i in $(seq "$RUNS"); do
    for system in old new; do
      local target="TARGET_$system" pid="PIDS_$system"
      "$BENCH" api "$@" --json --target "${!target}" --api "${!target//ws:/http:}" --pid "${!pid}" \
        --also-pid "$REDIS" >"$OUT/$name.$system.$i.json"
    done
  done
}
run_api api-flat --rooms 10 --members 30 --connections 4 --pipeline 8 --rate 0
python3 bench/summarize.py "$OUT"
