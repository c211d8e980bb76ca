#!/usr/bin/env bash
# Build the socketioxide peer's release binary if it is missing, then print its path.
# The target dir is $CARGO_TARGET_DIR if set, else bench/peers/socketioxide/target.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bin="${CARGO_TARGET_DIR:-$here/target}/release/switchyard-peer-socketioxide"
if [ ! -x "$bin" ]; then
  echo "building $bin (cargo build --release --locked)" >&2
  (cd "$here" && cargo build --release --locked >&2)
fi
echo "$bin"
