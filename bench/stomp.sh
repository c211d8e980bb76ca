#!/usr/bin/env bash
# bench/stomp.sh [RUNS] — one Switchyard node on its embedded store, driven over its JSON protocol
# and over STOMP (`--protocol stomp`), same build, same generator, one session (BENCHMARKS.md,
# "Issue 13: STOMP"); optionally RabbitMQ's Web-STOMP plugin as the peer.
#
# Each scenario runs RUNS times (default 3) per system, interleaved (json, stomp, [rabbitmq,]
# json, …), each run on a freshly started node (`switchyard serve --rate-limit 0 --data-dir
# $(mktemp -d)`, port $NODE_PORT, default 9180), so that no run inherits another's store or
# allocator state. Scenarios ($SCENARIOS, default `fanout-flat fanout-rate direct-rate idle`):
#   fanout-flat   switchyard-bench fanout $FANOUT_SHAPE --rate 0 --window $FANOUT_WINDOW (4)
#                 ($FANOUT_SHAPE defaults to `--rooms 10 --members 100`: 1,010 connections)
#   fanout-rate   switchyard-bench fanout $FANOUT_SHAPE --rate $FANOUT_RATE (1000 publishes/s, so
#                 100,000 deliveries/s: below both protocols' flat-out rate, so that both get the
#                 same load and the server CPU per delivery compares like with like)
#   direct-rate   switchyard-bench direct --pairs 100 --rate 5000
#   idle          switchyard-bench idle -n $IDLE_N --settle 5 --connect-concurrency 64 (19,500)
# Systems ($SYSTEMS, default `json stomp`):
#   json      --protocol switchyard (a session is on its own stream from `welcome` on)
#   json-sync idle only: --protocol switchyard with `idle --sync` (each session has also sent
#             `sync` and had its reply, as a STOMP one has subscribed to its queue)
#   stomp     --protocol stomp (each session CONNECTed and subscribed to /user/queue/messages)
#   rabbitmq  --protocol stomp-rabbitmq against RabbitMQ's Web-STOMP (ws://127.0.0.1:15674/ws),
#             CPU of its beam.smp. If the plugin is off, it is enabled for the run and disabled
#             again at exit (`rabbitmq-plugins enable|disable rabbitmq_web_stomp`). RabbitMQ
#             shares its file descriptors (1,024 by default) between Web-STOMP clients and every
#             other user of 5672: past them it refuses connections and queues, so a run that would
#             take more than half is refused here (`FANOUT_SHAPE="--rooms 10 --members 30"` fits).
#             No idle run (beam's memory is not a session's).
# Keeps every run's JSON under $OUT (default /tmp/switchyard-stomp) and prints medians and
# spreads with bench/summarize.py, then the idle bytes per session. $SERVER and $BENCH name the
# builds (default target/release/…).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
RUNS=${1:-3}
OUT=${OUT:-/tmp/switchyard-stomp}
SERVER=${SERVER:-target/release/switchyard}
BENCH=${BENCH:-target/release/switchyard-bench}
SCENARIOS=${SCENARIOS:-fanout-flat fanout-rate direct-rate idle}
SYSTEMS=${SYSTEMS:-json stomp}
NODE_PORT=${NODE_PORT:-9180}
IDLE_N=${IDLE_N:-19500}
FANOUT_SHAPE=${FANOUT_SHAPE:---rooms 10 --members 100}
FANOUT_WINDOW=${FANOUT_WINDOW:-4}
FANOUT_RATE=${FANOUT_RATE:-1000}
mkdir -p "$OUT"
rm -f "$OUT"/*.json

NODE=""
DATA=""
ENABLED_WEB_STOMP=""
stop_node() {
  if [ -n "$NODE" ]; then
    kill "$NODE" 2>/dev/null || true
    wait "$NODE" 2>/dev/null || true
    NODE=""
  fi
  [ -z "$DATA" ] || rm -rf "$DATA"
  DATA=""
}
cleanup() {
  stop_node
  if [ -n "$ENABLED_WEB_STOMP" ]; then
    rabbitmq-plugins disable rabbitmq_web_stomp >/dev/null || echo "stomp.sh: could not disable rabbitmq_web_stomp" >&2
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start_node() {
  stop_node
  DATA=$(mktemp -d)
  "$SERVER" serve --listen "127.0.0.1:$NODE_PORT" --data-dir "$DATA" --rate-limit 0 --log-format json \
    >"$OUT/node.log" 2>&1 &
  NODE=$!
  for _ in $(seq 150); do curl -fs -o /dev/null "http://127.0.0.1:$NODE_PORT/readyz" && break; sleep 0.2; done
  curl -fs -o /dev/null "http://127.0.0.1:$NODE_PORT/readyz" || { echo "stomp.sh: the node did not start" >&2; cat "$OUT/node.log" >&2; exit 1; }
}

has() { [[ " $SYSTEMS " == *" $1 "* ]]; }
if has rabbitmq; then
  if ! (exec 3<>/dev/tcp/127.0.0.1/15674) 2>/dev/null; then
    rabbitmq-plugins enable rabbitmq_web_stomp >/dev/null
    ENABLED_WEB_STOMP=1
    for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/15674) 2>/dev/null && break; sleep 0.2; done
  fi
  BEAM=$(pgrep -f beam.smp | head -1)
  FDS=$(awk '/^Max open files/ { print $4 }' "/proc/$BEAM/limits")
  # shellcheck disable=SC2086
  set -- $FANOUT_SHAPE
  ROOMS=10 MEMBERS=100
  while [ $# -gt 0 ]; do
    case "$1" in --rooms) ROOMS=$2 ;; --members) MEMBERS=$2 ;; esac
    shift
  done
  if [ $((ROOMS * MEMBERS + ROOMS)) -gt $((FDS / 2)) ] || [ 200 -gt $((FDS / 2)) ]; then
    echo "stomp.sh: $((ROOMS * MEMBERS + ROOMS)) clients would take more than half of RabbitMQ's $FDS file descriptors; set a smaller FANOUT_SHAPE" >&2
    exit 2
  fi
fi

# run NAME ARGS...: the scenario RUNS times per system, interleaved.
run() {
  local name=$1
  shift
  [[ " $SCENARIOS " == *" $name "* ]] || return 0
  for i in $(seq "$RUNS"); do
    for system in $SYSTEMS; do
      case "$system" in
        json | stomp | json-sync)
          local proto=switchyard extra=()
          [ "$system" = stomp ] && proto=stomp
          if [ "$system" = json-sync ]; then
            [ "$name" = idle ] || continue
            extra=(--sync)
          fi
          start_node
          "$BENCH" "$@" "${extra[@]}" --json --protocol "$proto" --target "ws://127.0.0.1:$NODE_PORT" \
            --pid "$NODE" >"$OUT/$name.$system.$i.json"
          stop_node
          ;;
        rabbitmq)
          [ "$name" = idle ] && continue
          "$BENCH" "$@" --json --protocol stomp-rabbitmq --target ws://127.0.0.1:15674/ws --pid "$BEAM" \
            >"$OUT/$name.$system.$i.json"
          ;;
      esac
    done
  done
}

# shellcheck disable=SC2086
run fanout-flat fanout $FANOUT_SHAPE --rate 0 --window "$FANOUT_WINDOW"
# shellcheck disable=SC2086
run fanout-rate fanout $FANOUT_SHAPE --rate "$FANOUT_RATE"
run direct-rate direct --pairs 100 --rate 5000
if [[ " $SCENARIOS " == *" idle "* ]]; then
  run idle idle -n "$IDLE_N" --settle 5 --connect-concurrency 64
  mkdir -p "$OUT/idle"
  mv "$OUT"/idle.*.json "$OUT/idle/"
fi
python3 bench/summarize.py "$OUT"
if [ -d "$OUT/idle" ]; then
  echo
  echo "### idle: server RSS per session (B), established / asked"
  for f in "$OUT"/idle/idle.*.json; do
    jq -r --arg f "$(basename "$f" .json)" \
      '"\($f) \(.servers_total.rss_per_connection_bytes) \(.connections.established)/\(.params.connections)"' "$f"
  done
fi
