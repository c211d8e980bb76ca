#!/usr/bin/env bash
# Start N socketioxide + socketioxide-redis instances on consecutive ports (default 3, from 3301), sharing one Redis.
#   usage: ./run.sh [N]; env: BASE_PORT, REDIS_URL (default redis://127.0.0.1:6379), HOST, SIO_PREFIX
# Builds the release binary first if it is missing (see build.sh).
# See ../run-instances.sh for what it prints and how it stops.
set -e
here="$(cd "$(dirname "$0")" && pwd)"
PEER_BIN="$("$here/build.sh")"
export PEER_BIN
exec "$here/../run-instances.sh" "$here" sioxide 3301 "$@"
