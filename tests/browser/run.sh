#!/usr/bin/env bash
# Runs the demo page's browser test (run.mjs) against an already built switchyard binary.
#
#   SWITCHYARD_BIN=path/to/switchyard tests/browser/run.sh
#
# Needs node, npm and Debian's chromium (/usr/bin/chromium; `apt-get install -y chromium`).
# Installs playwright-core (no browser download) and @stomp/stompjs when node_modules is missing
# or older than package-lock.json. The last line printed is always `browser: N passed, M failed`.
set -uo pipefail

cd "$(dirname "$0")"
export SWITCHYARD_BIN="${SWITCHYARD_BIN:-../../target/debug/switchyard}"
# playwright-core never downloads a browser, but make sure nothing tries to.
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1

# npm writes node_modules/.package-lock.json at each install: a lock file newer than it was
# changed since (a dependency added), and a node_modules without it is not npm's.
if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  if [ -f package-lock.json ]; then npm ci --no-audit --no-fund; else npm install --no-audit --no-fund; fi \
    || { echo "FAIL npm could not install the test's packages"; echo "browser: 0 passed, 1 failed"; exit 1; }
fi

out="$(mktemp)"
trap 'rm -f "$out"' EXIT
node run.mjs 2>&1 | tee "$out"
rc=${PIPESTATUS[0]}
# run.mjs prints the summary itself; if it died before that, say so in the same form.
if ! tail -n 1 "$out" | grep -Eq '^browser: [0-9]+ passed, [0-9]+ failed$'; then
  echo "FAIL run.mjs ended without a summary (exit $rc)"
  echo "browser: 0 passed, 1 failed"
  [ "$rc" -eq 0 ] && rc=1
fi
exit "$rc"
