#!/usr/bin/env bash
# bench/pg-ceiling.sh [SECONDS] — what PostgreSQL alone does with one INSERT per transaction of a
# row shaped like a stored message (the store's messages table: stream, seq, mid, sender,
# recipient, room, body of 100 bytes, ts), with pgbench: 64 clients, 2 threads, prepared
# statements. Prints pgbench's transactions per second. A stored direct message is one such
# transaction with two rows (recipient's and sender's stream) plus the streams counters, so
# compare it with `switchyard-bench direct --rate 0` against a cluster whose store is this
# PostgreSQL (BENCHMARKS.md). Uses SWITCHYARD_TEST_POSTGRES's server (default: the machine's).
set -euo pipefail
SECONDS_TO_RUN=${1:-20}
URL=${SWITCHYARD_TEST_POSTGRES:-postgres://postgres@127.0.0.1:5432/test}
SCHEMA=pgceiling_$$
psql -q "$URL" <<SQL
CREATE SCHEMA $SCHEMA;
CREATE TABLE $SCHEMA.messages (
  stream text NOT NULL, seq bigint NOT NULL, mid text NOT NULL, sender text NOT NULL,
  recipient text, room text, body text NOT NULL, ts bigint NOT NULL,
  PRIMARY KEY (stream, seq));
SQL
trap 'psql -q "$URL" -c "DROP SCHEMA $SCHEMA CASCADE"' EXIT
BODY=$(printf 'x%.0s' $(seq 100))
SCRIPT=$(mktemp)
cat > "$SCRIPT" <<SQL
\set n random(1, 9000000000000000)
INSERT INTO $SCHEMA.messages VALUES (concat('user_', :n::bigint % 200), :n::bigint, concat('m', :n::bigint), 'alice', 'bob', NULL, '"$BODY"', 1763800000000);
SQL
pgbench -n -M prepared -c 64 -j 2 -T "$SECONDS_TO_RUN" -f "$SCRIPT" "$URL" | grep -E "^(tps|latency)"
rm -f "$SCRIPT"
