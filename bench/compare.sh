#!/usr/bin/env bash
# bench/compare.sh [RUNS] — Switchyard (3 nodes) against Socket.IO + redis-adapter (3 instances),
# the ws + Redis relay (3 instances) and socketioxide + socketioxide-redis (3 instances), same
# scenarios, same machine, same Redis, one session.
#
# Runs each scenario RUNS times (default 3) per system, interleaved (S, SIO, relay, SIOX, S, ...)
# so that drift on a shared machine hits all four alike, keeps every run's JSON under $OUT
# (default /tmp/switchyard-compare) and prints medians and the spread with bench/summarize.py.
# $SERVER and $BENCH name other builds of the server and the generator.
# Needs: release builds (cargo build --release -p switchyard -p switchyard-bench), node + npm
# (npm ci in each peer directory), cargo (the socketioxide peer is built here if missing, see
# bench/peers/socketioxide/build.sh), redis-server.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
RUNS=${1:-3}
OUT=${OUT:-/tmp/switchyard-compare}
# $SYSTEMS picks the systems by name (default: all four).
SYSTEMS=${SYSTEMS:-switchyard socketio relay socketioxide}
has() { [[ " $SYSTEMS " == *" $1 "* ]]; }
PORT=${REDIS_PORT:-6391}
BENCH=${BENCH:-target/release/switchyard-bench}
SERVER=${SERVER:-target/release/switchyard}
mkdir -p "$OUT"
rm -f "$OUT"/*.json

for peer in socketio ws-relay; do
  has "${peer/ws-/}" || continue
  [ -d "bench/peers/$peer/node_modules" ] || (cd "bench/peers/$peer" && npm ci --silent)
done
# Build before anything starts (a cold build takes minutes; start_peer waits 20 s).
if has socketioxide; then bench/peers/socketioxide/build.sh >/dev/null; fi

# shellcheck source=bench/redis.sh
source bench/redis.sh
PREFIX=cmp$$
# socketioxide's adapter channels: $SIO_PREFIX-request#/#… (Socket.IO's are socket.io#/#…, the
# relay's ws-relay), so no system sees another's traffic on the shared Redis.
export SIO_PREFIX="$PREFIX-sioxide"

# shellcheck source=bench/nodes.sh
source bench/nodes.sh
start_nodes node "$SERVER" 9100 "$PREFIX"
SY=$TARGET_node
SYP=$PIDS_node

# A peer's launcher prints "node=... pid=P port=..." per instance, then "ready".
start_peer() {
  local dir=$1 log=$2
  REDIS_URL="redis://127.0.0.1:$PORT" "bench/peers/$dir/run.sh" 3 >"$log" 2>&1 &
  pids+=("$!")
  for _ in $(seq 100); do grep -q '^ready' "$log" && break; sleep 0.2; done
  grep -q '^ready' "$log" || { echo "compare.sh: $dir did not start" >&2; cat "$log" >&2; exit 1; }
}
peer_pids() { grep '^node=' "$1" | grep -o 'pid=[0-9]*' | cut -d= -f2 | paste -sd,; }
if has socketio; then
  start_peer socketio "$OUT/socketio.log"
  SIOP=$(peer_pids "$OUT/socketio.log")
fi
SIO=ws://127.0.0.1:3101,ws://127.0.0.1:3102,ws://127.0.0.1:3103
if has relay; then
  start_peer ws-relay "$OUT/relay.log"
  RELP=$(peer_pids "$OUT/relay.log")
fi
REL=ws://127.0.0.1:3201,ws://127.0.0.1:3202,ws://127.0.0.1:3203
if has socketioxide; then
  start_peer socketioxide "$OUT/socketioxide.log"
  SIOXP=$(peer_pids "$OUT/socketioxide.log")
fi
SIOX=ws://127.0.0.1:3301,ws://127.0.0.1:3302,ws://127.0.0.1:3303
for _ in $(seq 100); do curl -fs -o /dev/null http://127.0.0.1:9103/readyz && break; sleep 0.2; done

# run NAME ARGS...: one scenario against all four, RUNS times, interleaved.
run() {
  local name=$1
  shift
  for i in $(seq "$RUNS"); do
    if has switchyard; then
      "$BENCH" "$@" --json --target "$SY" --pid "$SYP" --also-pid "$REDIS" >"$OUT/$name.switchyard.$i.json"
    fi
    if has socketio; then
      "$BENCH" "$@" --json --protocol socketio --target "$SIO" --pid "$SIOP" --also-pid "$REDIS" \
        >"$OUT/$name.socketio.$i.json"
    fi
    if has relay; then
      "$BENCH" "$@" --json --protocol relay --target "$REL" --pid "$RELP" --also-pid "$REDIS" \
        >"$OUT/$name.relay.$i.json"
    fi
    if has socketioxide; then
      "$BENCH" "$@" --json --protocol socketio --target "$SIOX" --pid "$SIOXP" --also-pid "$REDIS" \
        >"$OUT/$name.socketioxide.$i.json"
    fi
  done
}

run fanout-rate fanout --rooms 10 --members 100 --rate 1000
run fanout-flat fanout --rooms 10 --members 100 --rate 0 --window 4
run direct-rate direct --pairs 100 --rate 5000
python3 bench/summarize.py "$OUT"
