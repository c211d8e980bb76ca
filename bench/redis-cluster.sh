#!/usr/bin/env bash
# bench/redis-cluster.sh [RUNS] — one build of Switchyard, 3 nodes, on one Redis and on a Redis
# Cluster, interleaved (redis, rcluster, redis, ...) so that drift on a shared machine hits all
# alike:
#   redis     --redis redis://…                 (a private redis-server: store, bus, presence)
#   rcluster  --redis redis+cluster://…         (a private 3-master Redis Cluster, no replicas:
#                                                sharded pub/sub, hash-tagged streams)
#   rwait     --redis redis+cluster://… --redis-wait-replicas 1
#                                               (3 masters with a replica each; every append
#                                                WAITs for its replica)
# Scenarios (SCENARIOS): direct-flat (stored direct messages per second, flat out), fanout-flat
# (fanout deliveries per second, flat out), direct-rate (100 pairs at 2,000/s, which every system carries: the cost of a
# stored message at equal load). Each run's JSON lands in $OUT (default
# /tmp/switchyard-rcluster); bench/summarize.py prints medians, and the table after it each Redis
# process's CPU seconds during the run (median over runs), masters and replicas apart.
# Needs release builds and redis-server/redis-cli (Redis 7).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
RUNS=${1:-3}
OUT=${OUT:-/tmp/switchyard-rcluster}
PORT=${REDIS_PORT:-6394}
SERVER=${SERVER:-target/release/switchyard}
BENCH=${BENCH:-target/release/switchyard-bench}
SCENARIOS=${SCENARIOS:-direct-flat fanout-flat direct-rate}
SYSTEMS=${SYSTEMS:-redis rcluster rwait}
has() { [[ " $SYSTEMS " == *" $1 "* ]]; }
mkdir -p "$OUT"
rm -f "$OUT"/*.json

# shellcheck source=bench/redis.sh
source bench/redis.sh
cluster_pids() { for p in $(seq "$1" $(($1 + $2 - 1))); do cat "/tmp/sy-bench-rc-$1/$p/redis.pid"; done | paste -sd, -; }
stop_clusters() {
  BASE=7300 MASTERS=3 REPLICAS=0 DIR=/tmp/sy-bench-rc-7300 scripts/redis-cluster.sh stop || true
  BASE=7310 MASTERS=3 REPLICAS=1 DIR=/tmp/sy-bench-rc-7310 scripts/redis-cluster.sh stop || true
}
trap 'cleanup; stop_clusters' EXIT
if has rcluster; then
  RC_URL=$(BASE=7300 MASTERS=3 REPLICAS=0 DIR=/tmp/sy-bench-rc-7300 scripts/redis-cluster.sh start)
  RC_PIDS=$(cluster_pids 7300 3)
fi
if has rwait; then
  RW_URL=$(BASE=7310 MASTERS=3 REPLICAS=1 DIR=/tmp/sy-bench-rc-7310 scripts/redis-cluster.sh start)
  RW_PIDS=$(cluster_pids 7310 6)
fi

# shellcheck source=bench/nodes.sh
source bench/nodes.sh

PREFIX=rc$$
if has redis; then start_nodes redis "$SERVER" 9250 "$PREFIX-r"; fi
if has rcluster; then start_nodes rcluster "$SERVER" 9260 "$PREFIX-c" --redis "$RC_URL"; fi
if has rwait; then start_nodes rwait "$SERVER" 9270 "$PREFIX-w" --redis "$RW_URL" --redis-wait-replicas 1; fi
declare -A ALSO=([redis]="$REDIS" [rcluster]="${RC_PIDS:-}" [rwait]="${RW_PIDS:-}")

run direct-flat direct --pairs 100 --rate 0 --window 4
run fanout-flat fanout --rooms 10 --members 100 --rate 0 --window 4
run direct-rate direct --pairs 100 --rate 2000
python3 bench/summarize.py "$OUT"
python3 - "$OUT" <<'EOF'
import glob, json, os, statistics, sys
from collections import defaultdict
cpu = defaultdict(list)
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.json"))):
    scenario, system, _ = os.path.basename(path).split(".")[:3]
    report = json.load(open(path))
    for n, other in enumerate(report.get("others", [])):
        cpu[(scenario, system, n)].append(other.get("cpu_run_s") or 0.0)
print("\nCPU seconds of each Redis process during a run (median over runs)")
print("| scenario | system | " + " | ".join(f"redis {n + 1}" for n in range(6)) + " |")
print("|---|---|" + "---|" * 6)
for scenario, system in sorted({(s, y) for s, y, _ in cpu}):
    cells = [f"{statistics.median(cpu[(scenario, system, n)]):.2f}" if (scenario, system, n) in cpu else "" for n in range(6)]
    print(f"| {scenario} | {system} | " + " | ".join(cells) + " |")
EOF
