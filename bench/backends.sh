#!/usr/bin/env bash
# bench/backends.sh [RUNS] — one build of Switchyard on each cluster backend, 3 nodes each, the
# scenarios of bench/compare.sh, interleaved (redis, nats, amqp, redis, ...) so that drift on a
# shared machine hits all alike:
#   redis  --redis redis://…                      (a private redis-server: store, bus, presence)
#   nats   --nats nats://…                        (a private nats-server -js: JetStream store, core
#                                                  NATS bus, key-value presence)
#   amqp   --bus amqp://… --store/--presence redis://…  (the machine's RabbitMQ, a unique prefix;
#                                                  store and presence on the private Redis)
# Each run measures the CPU of the nodes and of the backend servers it uses (--also-pid: Redis;
# nats-server; RabbitMQ's beam.smp and Redis). Keeps every run's JSON under $OUT (default
# /tmp/switchyard-backends) and prints medians and spread with bench/summarize.py ("Redis CPU s"
# is then the backend servers' CPU, "backend CPU s per 1M" the same per million deliveries).
# $SCENARIOS picks scenarios (default: fanout-rate fanout-flat direct-rate); $SYSTEMS picks
# backends (default: redis nats amqp). Needs release builds, redis-server, nats-server, and
# RabbitMQ on 127.0.0.1:5672 (guest/guest) for amqp.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
RUNS=${1:-3}
OUT=${OUT:-/tmp/switchyard-backends}
PORT=${REDIS_PORT:-6393}
NATS_PORT=${NATS_PORT:-4333}
SERVER=${SERVER:-target/release/switchyard}
BENCH=${BENCH:-target/release/switchyard-bench}
SCENARIOS=${SCENARIOS:-fanout-rate fanout-flat direct-rate}
SYSTEMS=${SYSTEMS:-redis nats amqp}
has() { [[ " $SYSTEMS " == *" $1 "* ]]; }
mkdir -p "$OUT"
rm -f "$OUT"/*.json

# shellcheck source=bench/redis.sh
source bench/redis.sh

NATS_DIR=$(mktemp -d)
nats-server -a 127.0.0.1 -p "$NATS_PORT" -js -sd "$NATS_DIR" >"$OUT/nats-server.log" 2>&1 &
NATS=$!
pids+=("$NATS")
for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$NATS_PORT") 2>/dev/null && break; sleep 0.1; done

# shellcheck source=bench/nodes.sh
source bench/nodes.sh

PREFIX=bk$$
if has redis; then start_nodes redis "$SERVER" 9150 "$PREFIX-r"; fi
if has nats; then start_nodes nats "$SERVER" 9160 "$PREFIX-n" --nats "nats://127.0.0.1:$NATS_PORT"; fi
if has amqp; then
  BEAM=$(pgrep -f beam.smp | head -1)
  start_nodes amqp "$SERVER" 9170 "$PREFIX-a" --bus "amqp://guest:guest@127.0.0.1:5672/%2f" \
    --store "redis://127.0.0.1:$PORT/0" --presence "redis://127.0.0.1:$PORT/0"
fi
declare -A ALSO=([redis]="$REDIS" [nats]="$NATS" [amqp]="${BEAM:-}${BEAM:+,}$REDIS")

run fanout-rate fanout --rooms 10 --members 100 --rate 1000
run fanout-flat fanout --rooms 10 --members 100 --rate 0 --window 4
run direct-rate direct --pairs 100 --rate 5000
run direct-flat direct --pairs 100 --rate 0 --window 4
python3 bench/summarize.py "$OUT"
rm -rf "$NATS_DIR"
