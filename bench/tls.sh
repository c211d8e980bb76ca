#!/usr/bin/env bash
# bench/tls.sh [RUNS] — what native TLS costs (BENCHMARKS.md, "Issue 14: TLS"): one Switchyard
# node on its embedded store, driven over ws:// (plain) and over wss:// (`--tls-cert`), same
# build, same generator, one session.
#
# Each scenario runs RUNS times (default 3) per system, interleaved (plain, tls, plain, …), each
# run on a freshly started node (`switchyard serve --rate-limit 0 --data-dir $(mktemp -d)`, port
# $NODE_PORT, default 9190). Scenarios ($SCENARIOS, default `fanout idle`):
#   fanout   switchyard-bench fanout $FANOUT_SHAPE --rate $FANOUT_RATE
#            (defaults `--rooms 10 --members 100`, 1000/s: 100,000 deliveries/s)
#   idle     switchyard-bench idle -n $IDLE_N --settle 5 --connect-concurrency 64 (19,500)
# Systems ($SYSTEMS, default `plain tls`): `tls` starts the node with a certificate for
# localhost made here by `openssl` (EC P-256, signed by a CA of the run's own) and points the
# generator at wss:// with SWITCHYARD_BENCH_TLS_CA set to that CA.
# Keeps every run's JSON under $OUT (default /tmp/switchyard-tls) and prints medians and spreads
# with bench/summarize.py, then the idle bytes per session. $SERVER and $BENCH name the builds
# (default target/release/…).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
RUNS=${1:-3}
OUT=${OUT:-/tmp/switchyard-tls}
SERVER=${SERVER:-target/release/switchyard}
BENCH=${BENCH:-target/release/switchyard-bench}
SCENARIOS=${SCENARIOS:-fanout idle}
SYSTEMS=${SYSTEMS:-plain tls}
NODE_PORT=${NODE_PORT:-9190}
IDLE_N=${IDLE_N:-19500}
FANOUT_SHAPE=${FANOUT_SHAPE:---rooms 10 --members 100}
FANOUT_RATE=${FANOUT_RATE:-1000}
mkdir -p "$OUT"
rm -rf "$OUT"/*.json "$OUT/idle"

CERTS=$(mktemp -d)
(
  cd "$CERTS"
  EC=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
  openssl req -x509 "${EC[@]}" -keyout ca.key -out ca.pem -days 2 -subj "/CN=bench CA" 2>/dev/null
  openssl req "${EC[@]}" -keyout server.key -out server.csr -subj /CN=localhost 2>/dev/null
  echo "subjectAltName=DNS:localhost,IP:127.0.0.1" >san.ext
  openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile san.ext \
    -out server.pem 2>/dev/null
)

NODE=""
DATA=""
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
  rm -rf "$CERTS"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start_node plain|tls
start_node() {
  stop_node
  DATA=$(mktemp -d)
  local tls=() scheme=http
  if [ "$1" = tls ]; then
    tls=(--tls-cert "$CERTS/server.pem" --tls-key "$CERTS/server.key")
    scheme=https
  fi
  "$SERVER" serve --listen "127.0.0.1:$NODE_PORT" --data-dir "$DATA" --rate-limit 0 --log-format json "${tls[@]}" \
    >"$OUT/node.log" 2>&1 &
  NODE=$!
  local url="$scheme://localhost:$NODE_PORT/readyz"
  for _ in $(seq 150); do curl -fs --cacert "$CERTS/ca.pem" -o /dev/null "$url" && break; sleep 0.2; done
  curl -fs --cacert "$CERTS/ca.pem" -o /dev/null "$url" || { echo "tls.sh: the node did not start" >&2; cat "$OUT/node.log" >&2; exit 1; }
}

# run NAME ARGS...: the scenario RUNS times per system, interleaved.
run() {
  local name=$1
  shift
  [[ " $SCENARIOS " == *" $name "* ]] || return 0
  for i in $(seq "$RUNS"); do
    for system in $SYSTEMS; do
      local target="ws://127.0.0.1:$NODE_PORT"
      [ "$system" = tls ] && target="wss://127.0.0.1:$NODE_PORT"
      start_node "$system"
      SWITCHYARD_BENCH_TLS_CA="$CERTS/ca.pem" "$BENCH" "$@" --json --target "$target" --pid "$NODE" \
        >"$OUT/$name.$system.$i.json"
      stop_node
    done
  done
}

# shellcheck disable=SC2086
run fanout fanout $FANOUT_SHAPE --rate "$FANOUT_RATE"
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
