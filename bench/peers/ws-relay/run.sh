#!/usr/bin/env bash
# Start N ws + Redis relay instances on consecutive ports (default 3, from 3201), sharing one Redis.
#   usage: ./run.sh [N]; env: BASE_PORT, REDIS_URL (default redis://127.0.0.1:6379), HOST
# See ../run-instances.sh for what it prints and how it stops.
here="$(cd "$(dirname "$0")" && pwd)"
exec "$here/../run-instances.sh" "$here" relay 3201 "$@"
