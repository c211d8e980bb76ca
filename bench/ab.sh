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

SYSTEMS="old new"
declare -A ALSO=([old]="$REDIS" [new]="$REDIS")

run fanout-rate fanout --rooms 10 --members 100 --rate 1000
run fanout-flat fanout --rooms 10 --members 100 --rate 0 --window 4
run direct-rate direct --pairs 100 --rate 5000
run direct-flat direct --pairs 100 --rate 0 --window 4

# The server API: 4 keep-alive connections posting room messages to the nodes' APIs, 8 requests in
# flight on each, flat out, delivered to 10 rooms of 30 members.
run api-flat api --rooms 10 --members 30 --connections 4 --pipeline 8 --rate 0
python3 bench/summarize.py "$OUT"
