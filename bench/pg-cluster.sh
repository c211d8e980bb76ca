#!/usr/bin/env bash
# bench/pg-cluster.sh [PORT] — stored direct messages per second on a 3-node cluster whose store
# is PostgreSQL (bus and presence on a private Redis), flat out: `switchyard-bench direct --pairs
# 100 --rate 0 --window 4`, with the release build. Alternate it with bench/pg-ceiling.sh in one
# session (BENCHMARKS.md). Uses SWITCHYARD_TEST_POSTGRES's server (default: the machine's) under
# a fresh schema, dropped at the end. PORT is the private Redis's (default 6393); nodes listen on
# 9201-9203.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PORT=${1:-6393}
BIN=${BIN:-$ROOT/target/release}
URL=${SWITCHYARD_TEST_POSTGRES:-postgres://postgres@127.0.0.1:5432/test}
PREFIX=pgcluster_$$
source "$ROOT/bench/redis.sh"
trap 'cleanup; psql -q "$URL" -c "DROP SCHEMA IF EXISTS $PREFIX CASCADE" >/dev/null 2>&1 || true' EXIT
nodes=()
for n in 1 2 3; do
  "$BIN/switchyard" serve --redis "redis://127.0.0.1:$PORT/0" --store "$URL" --prefix "$PREFIX" \
    --listen "127.0.0.1:920$n" --node-id "pg-$n" --rate-limit 0 --data-dir "$(mktemp -d)" \
    > "/tmp/pg-cluster-node$n.log" 2>&1 &
  pids+=($!); nodes+=($!)
done
for n in 1 2 3; do
  for _ in $(seq 300); do curl -sf --max-time 2 "http://127.0.0.1:920$n/readyz" >/dev/null && break; sleep 0.2; done
done
PG=$(head -1 "$(ls -d /var/lib/postgresql/*/main 2>/dev/null | head -1)/postmaster.pid" 2>/dev/null || true)
"$BIN/switchyard-bench" direct --target ws://127.0.0.1:9201,ws://127.0.0.1:9202,ws://127.0.0.1:9203 \
  --pid "$(IFS=,; echo "${nodes[*]}")" --also-pid "$REDIS${PG:+,$PG}" --pairs 100 --rate 0 --window 4 "${@:2}"
