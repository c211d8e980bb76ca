#!/usr/bin/env bash
# bench/soak.sh [SECONDS] — the soak scenario against a 3-node cluster on a private Redis.
#
# Starts redis-server on $REDIS_PORT (default 6393) and three release nodes (ports BASE_PORT+1 to
# BASE_PORT+3, default 9111-9113)
# with their default limits, runs `switchyard-bench soak` for SECONDS (default 3600) with the
# options in $SOAK_ARGS, and leaves in $OUT (default bench/results):
#   soak.csv   one sample every 10 s: RSS, fds and CPU of each node and of Redis
#   soak.txt   the report (delivered/lost, reconnects, errors, memory trend per process)
#   soak.svg   RSS and fds over time (bench/plot_soak.py)
# and the nodes' logs in $LOGS (default /tmp/switchyard-soak); the script fails if a node
# panicked or died, or if a message was lost, duplicated or unexpected.
# Needs: cargo build --release -p switchyard -p switchyard-bench, redis-server. PROFILE=debug uses
# the debug builds instead (CI runs a short soak that way).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
SECS=${1:-3600}
OUT=${OUT:-bench/results}
PORT=${REDIS_PORT:-6393}
BASE=${BASE_PORT:-9110}
PROFILE=${PROFILE:-release}
BENCH=${CARGO_TARGET_DIR:-target}/$PROFILE/switchyard-bench
SERVER=${CARGO_TARGET_DIR:-target}/$PROFILE/switchyard
LOGS=${LOGS:-/tmp/switchyard-soak}
mkdir -p "$OUT" "$LOGS"

# shellcheck source=bench/redis.sh
source bench/redis.sh
PREFIX=soak$$

NODES=""
for n in 1 2 3; do
  "$SERVER" serve --redis "redis://127.0.0.1:$PORT/0" --redis-prefix "$PREFIX" \
    --listen "127.0.0.1:$((BASE + n))" --node-id "soak-$n" --data-dir "$(mktemp -d)" --log-format json \
    >"$LOGS/node$n.log" 2>&1 &
  pids+=("$!")
  NODES="$NODES${NODES:+,}$!"
done
for n in 1 2 3; do
  for _ in $(seq 100); do curl -fs -o /dev/null "http://127.0.0.1:$((BASE + n))/readyz" && break; sleep 0.2; done
done

status=0
# shellcheck disable=SC2086
"$BENCH" soak --target "ws://127.0.0.1:$((BASE + 1)),ws://127.0.0.1:$((BASE + 2)),ws://127.0.0.1:$((BASE + 3))" \
  --pid "$NODES" --also-pid "$REDIS" --duration "$SECS" --samples "$OUT/soak.csv" \
  ${SOAK_ARGS:-} | tee "$OUT/soak.txt" || status=$?
python3 bench/plot_soak.py "$OUT/soak.csv" >"$OUT/soak.svg"

for n in 1 2 3; do
  if grep -q 'panicked' "$LOGS/node$n.log"; then
    echo "soak.sh: node $n panicked" >&2
    status=1
  fi
  echo "node $n log: $(grep -c '"level":"WARN"' "$LOGS/node$n.log" || true) warnings, $(grep -c '"level":"ERROR"' "$LOGS/node$n.log" || true) errors" | tee -a "$OUT/soak.txt"
done
exit "$status"
