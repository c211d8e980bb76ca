#!/usr/bin/env bash
# Start N instances of one peer (the directory given) on consecutive ports, sharing one Redis.
# Each peer's run.sh calls this with its directory, its node id prefix and its default port.
#   usage: run-instances.sh DIR PREFIX DEFAULT_BASE_PORT [N]   (N defaults to 3)
#   env:   BASE_PORT, REDIS_URL (default redis://127.0.0.1:6379), HOST,
#          PEER_BIN (a program to start per instance instead of `node server.js`)
# Prints one "node=<NODE_ID> pid=<PID> port=<PORT>" line per instance, then "ready" once all
# ports accept connections. Ctrl-C / SIGTERM stops them all. Instances that die (e.g. killed
# by a benchmark) are not restarted; the script keeps running until signalled or all are gone.
set -u
cd "$1"
N="${4:-3}"
BASE_PORT="${BASE_PORT:-$3}"
export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379}"
PREFIX="$2"

PEER_BIN="${PEER_BIN:-}"
if [ -z "$PEER_BIN" ]; then
  [ -d node_modules ] || { echo "node_modules missing: run 'npm ci' in $(pwd)" >&2; exit 1; }
fi
# Raise the soft fd limit to the hard limit (idle benchmarks hold many sockets per process).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

pids=()
stop() {
  local rc="${1:-0}"
  trap - INT TERM EXIT
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done
  wait
  echo "stopped"
  exit "$rc"
}
trap "stop 0" INT TERM EXIT

for ((i = 0; i < N; i++)); do
  port=$((BASE_PORT + i))
  id="$PREFIX-$((i + 1))"
  if [ -n "$PEER_BIN" ]; then
    PORT="$port" NODE_ID="$id" "$PEER_BIN" &
  else
    PORT="$port" NODE_ID="$id" node server.js &
  fi
  pids+=("$!")
  echo "node=$id pid=$! port=$port"
done

for ((i = 0; i < N; i++)); do
  port=$((BASE_PORT + i))
  for ((t = 0; ; t++)); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    kill -0 "${pids[$i]}" 2>/dev/null || { echo "instance on port $port exited" >&2; stop 1; }
    ((t < 150)) || { echo "instance on port $port not listening after 15 s" >&2; stop 1; }
    sleep 0.1
  done
done
echo "ready"

wait
