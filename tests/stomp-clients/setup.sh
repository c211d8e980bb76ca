#!/usr/bin/env bash
# Installs the real STOMP clients that tests/e2e/stomp_clients.rs drives:
#   node    @stomp/stompjs and ws, `npm ci` from package-lock.json into node_modules/
#   python  stomp.py and websocket-client, pinned in requirements.txt, `pip install --target`
#           into .pydeps/ (no venv, nothing in the system's site-packages)
#
#   tests/stomp-clients/setup.sh [node] [python]      (both when none is named)
#
# Idempotent and quick when nothing changed: each install is stamped with the hash of the file it
# came from and skipped while that matches. Runs one at a time (flock), so parallel tests and
# .ci/run may all call it. Exits non-zero, saying why on stderr, when a tool is missing
# (node/npm, python3/pip) or an install fails.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"
wanted=("$@")
[ ${#wanted[@]} -gt 0 ] || wanted=(node python)

exec 9>"$here/.setup.lock"
flock 9

stamp_of() { sha256sum "$1" | cut -d' ' -f1; }

setup_node() {
  command -v node >/dev/null || { echo "setup: node is not installed (apt-get install nodejs npm)" >&2; return 3; }
  command -v npm >/dev/null || { echo "setup: npm is not installed (apt-get install npm)" >&2; return 3; }
  local want
  want="$(stamp_of package-lock.json)"
  if [ "$(cat node_modules/.switchyard-stamp 2>/dev/null)" = "$want" ]; then
    return 0
  fi
  echo "setup: npm ci in tests/stomp-clients" >&2
  npm ci --no-audit --no-fund --loglevel=error >&2 || { echo "setup: npm ci failed" >&2; return 1; }
  echo "$want" > node_modules/.switchyard-stamp
}

setup_python() {
  command -v python3 >/dev/null || { echo "setup: python3 is not installed" >&2; return 3; }
  local want
  want="$(stamp_of requirements.txt)"
  if [ "$(cat .pydeps/.switchyard-stamp 2>/dev/null)" = "$want" ]; then
    return 0
  fi
  python3 -m pip --version >/dev/null 2>&1 \
    || { echo "setup: pip is not installed for python3 (apt-get install python3-pip)" >&2; return 3; }
  echo "setup: pip install --target .pydeps -r requirements.txt" >&2
  rm -rf .pydeps.tmp
  python3 -m pip install --quiet --disable-pip-version-check --no-input --root-user-action=ignore --only-binary=:all: \
    --target .pydeps.tmp -r requirements.txt >&2 \
    || { rm -rf .pydeps.tmp; echo "setup: pip install failed" >&2; return 1; }
  echo "$want" > .pydeps.tmp/.switchyard-stamp
  rm -rf .pydeps
  mv .pydeps.tmp .pydeps
}

for what in "${wanted[@]}"; do
  case "$what" in
    node) setup_node ;;
    python) setup_python ;;
    *) echo "setup: unknown part $what (node, python)" >&2; exit 2 ;;
  esac
done
