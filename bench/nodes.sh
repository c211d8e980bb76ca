# Sourced by the bench scripts after bench/redis.sh: start_nodes NAME SERVER BASE_PORT PREFIX
# starts 3 Switchyard nodes of the build SERVER (a `switchyard` binary) on the private Redis on
# $PORT under key prefix PREFIX, on ports BASE_PORT+1..3, logs in $OUT/NAME1..3.log; waits until
# the third is ready and sets TARGET_<NAME> (their ws:// URLs) and PIDS_<NAME> (their pids,
# comma-separated, also added to `pids` for cleanup).
start_nodes() {
  local name=$1 server=$2 base=$3 prefix=$4 list="" targets=""
  for n in 1 2 3; do
    "$server" serve --redis "redis://127.0.0.1:$PORT/0" --redis-prefix "$prefix" --rate-limit 0 \
      --listen "127.0.0.1:$((base + n))" --node-id "$name-$n" --data-dir "$(mktemp -d)" --log-format json \
      >"$OUT/$name$n.log" 2>&1 &
    pids+=("$!")
    list="$list${list:+,}$!"
    targets="$targets${targets:+,}ws://127.0.0.1:$((base + n))"
  done
  for _ in $(seq 100); do curl -fs -o /dev/null "http://127.0.0.1:$((base + 3))/readyz" && break; sleep 0.2; done
  printf -v "PIDS_$name" %s "$list"
  printf -v "TARGET_$name" %s "$targets"
}
