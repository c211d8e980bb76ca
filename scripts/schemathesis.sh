#!/usr/bin/env bash
# Runs schemathesis, the OpenAPI fuzzer from PyPI, against the server API of a node: the document
# it serves at /api/openapi.json, every check, once with a fixed seed and once with a random one
# (printed, so that a failure can be replayed with SEED=<seed>).
#
#   scripts/schemathesis.sh                  # the debug build, 100 examples per operation
#   BIN=target/release/switchyard EXAMPLES=500 SEED=123 scripts/schemathesis.sh
#   REDIS=redis://127.0.0.1:6379/0 scripts/schemathesis.sh   # a cluster member over that Redis
#
# Strings are generated as ASCII (`--generation-codec ascii`): the document bounds `key` and
# `reason` with JSON Schema's maxLength, which counts characters, where the server counts UTF-8
# bytes (its limits are the bytes a close frame and the stores hold). For ASCII the two agree; a
# schema cannot say "bytes", so with other characters a schema-valid key of 256 characters could
# be refused. Bodies with any Unicode are exercised by the e2e tests and the cargo-fuzz targets.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${BIN:-target/debug/switchyard}
EXAMPLES=${EXAMPLES:-100}
FIXED_SEED=1
SEED=${SEED:-$(python3 -c 'import random; print(random.getrandbits(63))')}
KEY=schemathesis-key-$RANDOM$RANDOM

# schemathesis 4.3.18 with a hypothesis older than 6.140: later hypothesis releases crash its
# coverage phase ("'many' object has no attribute 'more'").
if ! python3 -c 'import schemathesis, hypothesis, sys; from importlib.metadata import version; sys.exit(version("schemathesis") != "4.3.18" or tuple(map(int, hypothesis.__version__.split(".")[:2])) >= (6, 140))' 2>/dev/null; then
  python3 -m pip install -q --disable-pip-version-check "schemathesis==4.3.18" "hypothesis<6.140"
fi
PATH="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"

[ -x "$BIN" ] || cargo build --locked --bin switchyard
DATA=$(mktemp -d /tmp/switchyard-schemathesis.XXXXXX)
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# With REDIS, the node is a cluster member (store, bus and presence on that Redis) under a prefix
# of its own; without, a single node with embedded storage.
backend=()
what="a single node"
if [ -n "${REDIS:-}" ]; then
  backend=(--redis "$REDIS" --prefix "schemathesis-$$-$RANDOM")
  what="a cluster member over $REDIS"
fi
"$BIN" serve --listen "127.0.0.1:$PORT" --api-key "$KEY" --data-dir "$DATA" "${backend[@]}" >"$DATA/node.log" 2>&1 &
NODE=$!
trap 'kill "$NODE" 2>/dev/null; wait "$NODE" 2>/dev/null; rm -rf "$DATA"' EXIT
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null && break; sleep 0.1; done
curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null || { cat "$DATA/node.log"; echo "the node did not start" >&2; exit 1; }

# Hypothesis keeps its example database and caches in ./.hypothesis unless told otherwise: keep
# them with the run's other files, out of the checkout.
export HYPOTHESIS_STORAGE_DIRECTORY=$DATA/hypothesis

run() {
  echo "== schemathesis, seed $1 ($2), $EXAMPLES examples per operation, $what"
  schemathesis run "http://127.0.0.1:$PORT/api/openapi.json" \
    --header "Authorization: Bearer $KEY" --checks all --max-examples "$EXAMPLES" \
    --generation-codec ascii --generation-database none --seed "$1" --no-color
}
run "$FIXED_SEED" fixed
run "$SEED" "random: replay with SEED=$SEED"
