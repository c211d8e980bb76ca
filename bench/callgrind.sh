#!/usr/bin/env bash
# bench/callgrind.sh BIN SCENARIO [REDIS_PORT] — instructions per delivered message on a cluster
# node, the figure of BENCHMARKS.md ("Issue 10", "What the profile showed").
#
# BIN is a directory holding the server build to measure (`switchyard`); SCENARIO is `fanout`
# (`switchyard-bench fanout --rooms 10 --members 30 --rate 100`), `direct` (`switchyard-bench
# direct --pairs 100 --rate 500`) or `api` (`switchyard-bench api --rooms 10 --members 30 --rate
# 300`, every request posted to node 1). Starts a private redis-server on REDIS_PORT (default 6394)
# and three nodes on it (`--rate-limit 0`, ports 9301-9303), node 1 under `valgrind
# --tool=callgrind`, and runs the load against all three. Once node 1 delivers, it waits 2 s,
# zeroes the counters (`callgrind_control -z`), waits 8 s and dumps them (`callgrind_control -d`);
# the instructions of that dump (Ir) divided by node 1's `switchyard_messages_out_total` delta
# over the same window is the figure printed on the last line:
#
#   <scenario> <instructions per message> <Ir> <messages> <dump file>
#
# The load generator is BENCH (default: the `switchyard-bench` next to this script's release
# build, target/release), so that both sides of a comparison are driven by the same one. Dumps
# and logs stay in OUT (default /tmp/switchyard-callgrind); `callgrind_annotate` on a dump shows
# where the instructions went. Instruction counts do not depend on machine load; alternate the
# builds compared (OLD, NEW, OLD, NEW, …) anyway, and take medians of at least 4 runs each.
#
# PROTOCOL (default `switchyard`, the JSON protocol) is the generator's `--protocol`: with
# `PROTOCOL=stomp` every client speaks STOMP to the same nodes (BENCHMARKS.md, "Issue 13"), so
# that one build's cost per delivery can be compared across protocols; alternate those too.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=$(cd "${1:?usage: bench/callgrind.sh BIN SCENARIO [REDIS_PORT]}" && pwd)
SCENARIO=${2:?usage: bench/callgrind.sh BIN SCENARIO [REDIS_PORT]}
PORT=${3:-6394}
BENCH=${BENCH:-$ROOT/target/release/switchyard-bench}
OUT=${OUT:-/tmp/switchyard-callgrind}
PROTOCOL=${PROTOCOL:-switchyard}
case "$SCENARIO" in
  fanout) LOAD=(fanout --rooms 10 --members 30 --rate 100) ;;
  direct) LOAD=(direct --pairs 100 --rate 500) ;;
  # Every request to node 1's server API, so that its count holds the API's work on each message.
  api) LOAD=(api --rooms 10 --members 30 --connections 3 --rate 300 --api http://127.0.0.1:9301) ;;
  *) echo "callgrind.sh: SCENARIO is fanout, direct or api" >&2; exit 2 ;;
esac
mkdir -p "$OUT"
RUN=$OUT/$SCENARIO.$PROTOCOL.$(date +%H%M%S).$$
source "$ROOT/bench/redis.sh"

PREFIX=cg$$
for n in 1 2 3; do
  cmd=("$BIN/switchyard" serve --redis "redis://127.0.0.1:$PORT/0" --redis-prefix "$PREFIX" --rate-limit 0
    --listen "127.0.0.1:930$n" --node-id "node-$n" --data-dir "$(mktemp -d)")
  if [ "$n" = 1 ]; then
    cmd=(valgrind --tool=callgrind "--callgrind-out-file=$RUN.callgrind.%p" "${cmd[@]}")
  fi
  "${cmd[@]}" >"$RUN.node$n.log" 2>&1 &
  pids+=("$!")
  nodes[n]=$!
done
for n in 1 2 3; do
  for _ in $(seq 600); do curl -sf --max-time 2 "http://127.0.0.1:930$n/readyz" >/dev/null && break; sleep 0.2; done
  curl -sf --max-time 2 "http://127.0.0.1:930$n/readyz" >/dev/null || { echo "callgrind.sh: node $n is not ready" >&2; exit 1; }
done
# Under valgrind, node 1's pid is valgrind's own, which callgrind_control also takes.
VG=${nodes[1]}

# Messages node 1 wrote to sockets so far, every kind.
delivered() {
  curl -sf --max-time 10 http://127.0.0.1:9301/metrics |
    awk '/^switchyard_messages_out_total/ { n += $NF } END { printf "%d\n", n }'
}

"$BENCH" "${LOAD[@]}" --target ws://127.0.0.1:9301,ws://127.0.0.1:9302,ws://127.0.0.1:9303 \
  --pid "${nodes[1]},${nodes[2]},${nodes[3]}" --protocol "$PROTOCOL" >"$RUN.bench.txt" 2>&1 &
BENCHPID=$!
pids+=("$BENCHPID")

# The load has started once node 1 delivers.
start=$(delivered)
for _ in $(seq 1200); do
  [ "$(delivered)" -gt "$start" ] && break
  kill -0 "$BENCHPID" 2>/dev/null || { echo "callgrind.sh: the load generator ended early" >&2; cat "$RUN.bench.txt" >&2; exit 1; }
  sleep 0.1
done
sleep 2
callgrind_control -z "$VG" >/dev/null 2>&1
before=$(delivered)
sleep 8
after=$(delivered)
callgrind_control -d "$VG" >/dev/null 2>&1
wait "$BENCHPID" || { echo "callgrind.sh: the load generator failed" >&2; cat "$RUN.bench.txt" >&2; exit 1; }

# The dump asked for is part 1 (`<file>.<pid>.1`); the whole run's comes at exit, unused.
DUMP=$RUN.callgrind.$VG.1
for _ in $(seq 100); do [ -s "$DUMP" ] && grep -q '^totals:' "$DUMP" && break; sleep 0.1; done
IR=$(grep -m1 '^totals:' "$DUMP" | awk '{ print $2 }')
MESSAGES=$((after - before))
[ "$MESSAGES" -gt 0 ] || { echo "callgrind.sh: node 1 delivered nothing in the window" >&2; exit 1; }
echo "$SCENARIO $((IR / MESSAGES)) $IR $MESSAGES $DUMP"
