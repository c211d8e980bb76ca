#!/usr/bin/env bash
# scripts/wsfuzz-smoke.sh
#
# CI smoke test of the WebSocket fuzzer. Starts one dev-mode node from the debug build that
# `cargo test` made ($CARGO_TARGET_DIR/debug/switchyard, default target/) on a free loopback port
# with a throwaway data dir, runs `switchyard-bench wsfuzz` against it for 20 s, then checks that
# the node is still alive and its log has no panic, and stops it with SIGTERM (it must exit 0).
# Half the fuzzing connections speak JSON (PROTOCOL.md §2-§4) and half STOMP 1.2 over WebSocket
# (§7: `--stomp-share 0.5`, every second connection upgrades on /stomp or with v12.stomp, sends
# CONNECT and runs STOMP cases); both sorts share the node, its health checks and the verdict.
# Exits non-zero on any failure: an anomaly or a failed health check in the fuzzer, a dead node,
# a panic, an unclean stop. Server bugs the fuzzer knows of and tolerates are printed as
# `KNOWN: …` lines and do not fail the run.
#
# Environment: WSFUZZ_DURATION (seconds, default 20), WSFUZZ_CONNECTIONS (default 8),
# WSFUZZ_STOMP_SHARE (share of the connections that speak STOMP, default 0.5; 0 for JSON only),
# WSFUZZ_SEED (default random; printed), WSFUZZ_SAVE (where anomalous cases go; default a temp
# dir, kept and printed when something failed).
set -euo pipefail

ROOT=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
cd "$ROOT"
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=$TARGET_DIR/debug/switchyard
DURATION=${WSFUZZ_DURATION:-20}
CONNECTIONS=${WSFUZZ_CONNECTIONS:-8}
STOMP_SHARE=${WSFUZZ_STOMP_SHARE:-0.5}
SEED=${WSFUZZ_SEED:-$(od -An -N6 -tu8 /dev/urandom | tr -d ' ')}
[ -x "$BIN" ] || { echo "wsfuzz-smoke: $BIN is missing: build it first (cargo test or cargo build)" >&2; exit 1; }

# The fuzzer first, so that compiling it does not count against the node.
cargo build -q -p switchyard-bench

DATA=$(mktemp -d)
LOG=$(mktemp)
SAVE=${WSFUZZ_SAVE:-$(mktemp -d)}
NODE_PID=""
FAILED=0
cleanup() {
  if [ -n "$NODE_PID" ] && kill -0 "$NODE_PID" 2>/dev/null; then kill -KILL "$NODE_PID" 2>/dev/null || true; fi
  rm -rf "$DATA" "$LOG"
  if [ "$FAILED" = 0 ] && [ -z "${WSFUZZ_SAVE:-}" ]; then rm -rf "$SAVE"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

fail() { echo "wsfuzz-smoke: $*" >&2; FAILED=1; }
# Running and not a zombie (kill -0 succeeds on a child that died and was not reaped yet).
alive() { local s; s=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1); [ -n "$s" ] && [ "$s" != Z ] && [ "$s" != X ]; }

# Port 0: the node picks a free port and prints it in its banner.
"$BIN" serve --listen 127.0.0.1:0 --data-dir "$DATA" >"$LOG" 2>&1 &
NODE_PID=$!
PORT=""
for _ in $(seq 300); do
  PORT=$(sed -n 's|.*listening on http://127\.0\.0\.1:\([0-9]*\).*|\1|p' "$LOG" | head -n1)
  [ -n "$PORT" ] && break
  alive "$NODE_PID" || { cat "$LOG" >&2; echo "wsfuzz-smoke: the node exited at start" >&2; exit 1; }
  sleep 0.1
done
[ -n "$PORT" ] || { cat "$LOG" >&2; echo "wsfuzz-smoke: no listening banner after 30 s" >&2; exit 1; }
echo "wsfuzz-smoke: node $NODE_PID on port $PORT; fuzzing for $DURATION s with seed $SEED" \
  "(STOMP share $STOMP_SHARE)"

cargo run -q -p switchyard-bench -- wsfuzz --target "ws://127.0.0.1:$PORT" --pid "$NODE_PID" \
  --duration "$DURATION" --connections "$CONNECTIONS" --stomp-share "$STOMP_SHARE" --seed "$SEED" \
  --save "$SAVE" \
  || fail "the fuzzer reported failures (seed $SEED, STOMP share $STOMP_SHARE; cases in $SAVE)"

alive "$NODE_PID" || fail "the node is gone after fuzzing"
if grep -q panicked "$LOG"; then
  grep -n -B2 -A8 panicked "$LOG" >&2 || true
  fail "the node's log has a panic"
fi

if alive "$NODE_PID"; then
  kill -TERM "$NODE_PID"
  for _ in $(seq 200); do alive "$NODE_PID" || break; sleep 0.1; done
  if alive "$NODE_PID"; then
    fail "the node did not stop within 20 s of SIGTERM"
  else
    set +e
    wait "$NODE_PID"
    rc=$?
    set -e
    [ "$rc" = 0 ] || fail "the node exited with status $rc after SIGTERM"
  fi
fi
NODE_PID=""

if [ "$FAILED" != 0 ]; then
  echo "--- node log (last 50 lines) ---" >&2
  tail -n 50 "$LOG" >&2
  exit 1
fi
echo "wsfuzz-smoke: ok"
