#!/usr/bin/env bash
# scripts/autobahn.sh [run.sh options, e.g. --cases '1.*,2.*' --out DIR]
#
# Builds switchyard (release), starts a throwaway node with the Autobahn echo endpoint on a free
# loopback port and runs the Autobahn|Testsuite fuzzing client against ws://127.0.0.1:PORT/echo.
# Extra arguments go to the shared run.sh; exits with its exit code (0 only if no case failed).
# With TLS=1 the node serves wss:// (`--tls-cert`, a certificate for localhost made here by
# openssl) and the fuzzer connects to wss://127.0.0.1:PORT/echo (it does not check certificates).
set -euo pipefail

ROOT=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
SHARED="$ROOT/../shared"
[ -d "$SHARED/tools/autobahn" ] || SHARED=/work/shared
RUN="$SHARED/tools/autobahn/run.sh"
cd "$ROOT"

cargo build --release   # may wait on the cargo lock while others build

# A free port: bind port 0, read it, release it (tiny race, fine on loopback).
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
DATA=$(mktemp -d)   # throwaway store
LOG=$(mktemp)       # node output, shown if it fails to start
NODE_PID=""
cleanup() {
  if [ -n "$NODE_PID" ]; then kill "$NODE_PID" 2>/dev/null || true; wait "$NODE_PID" 2>/dev/null || true; fi
  rm -rf "$DATA" "$LOG"
}
trap cleanup EXIT
trap 'exit 130' INT TERM   # run the EXIT trap on Ctrl-C / kill too

TLS_ARGS=() HTTP=http WS=ws
if [ "${TLS:-0}" = 1 ]; then
  ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
  openssl req -x509 "${ec[@]}" -keyout "$DATA/cert.key" -out "$DATA/cert.pem" -days 2 -subj /CN=localhost \
    -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" 2>/dev/null
  TLS_ARGS=(--tls-cert "$DATA/cert.pem" --tls-key "$DATA/cert.key") HTTP=https WS=wss
fi
target/release/switchyard serve --autobahn-echo --listen "127.0.0.1:$PORT" --data-dir "$DATA/store" "${TLS_ARGS[@]}" \
  >"$LOG" 2>&1 &
NODE_PID=$!

# Wait (up to ~30 s) for the node to answer /healthz; bail out if it died.
for _ in $(seq 300); do
  curl -kfsS -o /dev/null "$HTTP://127.0.0.1:$PORT/healthz" 2>/dev/null && break
  kill -0 "$NODE_PID" 2>/dev/null || { echo "autobahn.sh: node exited early:" >&2; cat "$LOG" >&2; exit 1; }
  sleep 0.1
done
curl -kfsS -o /dev/null "$HTTP://127.0.0.1:$PORT/healthz" || { echo "autobahn.sh: node not healthy" >&2; cat "$LOG" >&2; exit 1; }

set +e
"$RUN" "$WS://127.0.0.1:$PORT/echo" "$@"
rc=$?
set -e
exit "$rc"
