#!/usr/bin/env bash
# Runs a local Redis Cluster for tests and benchmarks: MASTERS masters with REPLICAS replicas each,
# on ports BASE, BASE+1, ..., each in its own directory under DIR, no persistence.
#
#   scripts/redis-cluster.sh start   # prints the redis+cluster:// URL once every slot is served
#   scripts/redis-cluster.sh stop
#   scripts/redis-cluster.sh url
#
# Environment: BASE (7000), MASTERS (3), REPLICAS (1), DIR (/tmp/switchyard-redis-cluster-$BASE),
# NODE_TIMEOUT (ms, 2000).
set -euo pipefail

BASE=${BASE:-7000}
MASTERS=${MASTERS:-3}
REPLICAS=${REPLICAS:-1}
DIR=${DIR:-/tmp/switchyard-redis-cluster-$BASE}
NODE_TIMEOUT=${NODE_TIMEOUT:-2000}
COUNT=$((MASTERS * (1 + REPLICAS)))

ports() { seq "$BASE" $((BASE + COUNT - 1)); }

url() {
  local hosts
  hosts=$(ports | head -n "$MASTERS" | sed 's/^/127.0.0.1:/' | paste -sd, -)
  echo "redis+cluster://$hosts"
}

start() {
  mkdir -p "$DIR"
  for port in $(ports); do
    if redis-cli -p "$port" ping >/dev/null 2>&1; then
      echo "port $port is taken: stop what runs there, or choose BASE" >&2
      exit 1
    fi
    mkdir -p "$DIR/$port"
    redis-server --port "$port" --bind 127.0.0.1 --daemonize yes --save "" --appendonly no \
      --dir "$DIR/$port" --cluster-enabled yes --cluster-config-file "$DIR/$port/nodes.conf" \
      --cluster-node-timeout "$NODE_TIMEOUT" --logfile "$DIR/$port/redis.log" --pidfile "$DIR/$port/redis.pid"
  done
  for port in $(ports); do
    for _ in $(seq 100); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.05; done
  done
  # shellcheck disable=SC2046
  redis-cli --cluster create $(ports | sed 's/^/127.0.0.1:/') --cluster-replicas "$REPLICAS" --cluster-yes >"$DIR/create.log"
  for _ in $(seq 200); do
    local ok=1
    for port in $(ports); do
      redis-cli -p "$port" cluster info | grep -q 'cluster_state:ok' || ok=0
    done
    [ "$ok" = 1 ] && break
    sleep 0.1
  done
  # A replica that has not finished its first sync refuses to take over from a dead master
  # ("disconnected from master for longer than allowed"): wait for every replication link.
  for _ in $(seq 300); do
    local synced=1
    for port in $(ports); do
      if redis-cli -p "$port" info replication | grep -q '^role:slave'; then
        redis-cli -p "$port" info replication | grep -q '^master_link_status:up' || synced=0
      fi
    done
    [ "$synced" = 1 ] && break
    sleep 0.1
  done
  url
}

stop() {
  for port in $(ports); do
    redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true
  done
  rm -rf "$DIR"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  url) url ;;
  *) echo "usage: $0 start|stop|url" >&2; exit 2 ;;
esac
