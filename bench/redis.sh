# Sourced by the bench scripts: a private redis-server on $PORT for one run, and cleanup on exit
# of it and of every process whose pid the script adds to `pids`. Sets REDIS to its pid.
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  redis-cli -p "$PORT" shutdown nosave >/dev/null 2>&1 || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

redis-server --port "$PORT" --bind 127.0.0.1 --save "" --appendonly no --daemonize yes \
  --pidfile "/tmp/redis-$PORT.pid" >/dev/null
for _ in $(seq 50); do redis-cli -p "$PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
REDIS=$(cat "/tmp/redis-$PORT.pid")
