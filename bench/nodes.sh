# Sourced by the bench scripts after bench/redis.sh: start_nodes NAME SERVER BASE_PORT PREFIX
# [BACKEND_ARGS...] starts 3 Switchyard nodes of the build SERVER (a `switchyard` binary) on the
# private Redis on $PORT (or on BACKEND_ARGS, e.g. `--nats nats://…`) under prefix PREFIX, on
# ports BASE_PORT+1..3, logs in $OUT/NAME1..3.log; waits until the third is ready and sets TARGET_<NAME> (their ws:// URLs) and PIDS_<NAME> (their pids,
# comma-separated, also added to `pids` for cleanup).
start_nodes() {
  local name=$1 server=$2 base=$3 prefix=$4 list="" targets=""
  shift 4
  local backend=("$@")
  [ ${#backend[@]} -gt 0 ] || backend=(--redis "redis://127.0.0.1:$PORT/0")
  for n in 1 2 3; do
    "$server" serve "${backend[@]}" --prefix "$prefix" --rate-limit 0 \
      --listen "127.0.0.1:$((base + n))" --node-id "$name-$n" --data-dir "$(mktemp -d)" --log-format json \
      >"$OUT/$name$n.log" 2>&1 &
    pids+=("$!")
    list="$list${list:+,}$!"
    targets="$targets${targets:+,}ws://127.0.0.1:$((base + n))"
  done
  for _ in $(seq 150); do curl -fs -o /dev/null "http://127.0.0.1:$((base + 3))/readyz" && break; sleep 0.2; done
  printf -v "PIDS_$name" %s "$list"
  printf -v "TARGET_$name" %s "$targets"
}

# run NAME ARGS...: the generator's scenario ARGS, RUNS times on every system of $SYSTEMS,
# interleaved (a, b, a, b, ...), when $SCENARIOS names NAME; each run's JSON in
# $OUT/NAME.SYSTEM.RUN.json. Uses TARGET_<system> and PIDS_<system> (start_nodes) and the
# associative array ALSO (the backend servers' pids of each system). The nodes' HTTP bases go in
# --api, which the api scenario posts to and the others ignore.
run() {
  local name=$1
  shift
  [[ " $SCENARIOS " == *" $name "* ]] || return 0
  for i in $(seq "$RUNS"); do
    for system in $SYSTEMS; do
      local target="TARGET_$system" pid="PIDS_$system"
      "$BENCH" "$@" --json --target "${!target}" --api "${!target//ws:/http:}" --pid "${!pid}" \
        --also-pid "${ALSO[$system]}" >"$OUT/$name.$system.$i.json"
    done
  done
}
