#!/usr/bin/env bash
# bench/redis-ceiling.sh PORT [CALLS] — what Redis alone does with Switchyard's stored direct
# message: redis-benchmark calling the append script (EVALSHA, taken from src/backend/redis/store.rs) with
# a direct message's arguments: two streams (recipient's and sender's; the same two on every call,
# since redis-benchmark randomizes each key on its own and a stream's seq and log must match),
# 100 byte body, 64 connections, no idempotency key. Prints redis-benchmark's calls/s.
# This is the ceiling for "stored direct messages per second" on this machine (BENCHMARKS.md).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PORT=${1:?usage: redis-ceiling.sh PORT [CALLS]}
CALLS=${2:-200000}
SCRIPT=$(python3 - "$ROOT/src/backend/redis/store.rs" <<'EOF'
import sys
source = open(sys.argv[1]).read()
start = source.index('const APPEND: &str = r#"') + len('const APPEND: &str = r#"')
print(source[start:source.index('"#;', start)])
EOF
)
SHA=$(redis-cli -p "$PORT" SCRIPT LOAD "$SCRIPT")
BODY=$(printf 'x%.0s' $(seq 100))
# The message's record (src/message.rs): "<ts> <mid> <from> <to>", a newline, the body.
RECORD=$(printf '1763800000000 0123456789abcdef alice bob\n"%s"' "$BODY")
P=ceiling:$$
# KEYS: idempotency, then seq and log per stream. ARGV: ts, key ttl, maxlen, ttl cutoff (0: none),
# stream ttl, entries, reply entry, mid, keyed, deadline (far), record, publish (1: the store is
# the bus), then per entry: channel, envelope head.
redis-benchmark -p "$PORT" -c 64 -n "$CALLS" -q \
  EVALSHA "$SHA" 5 "$P:idem" "$P:seq:r" "$P:log:r" "$P:seq:s" "$P:log:s" \
  1 86400000 1000 0 86400000 2 2 0123456789abcdef 0 99999999999999 "$RECORD" 1 \
  "$P:ch:r" "M - user:bob " "$P:ch:s" "M - user:alice "
