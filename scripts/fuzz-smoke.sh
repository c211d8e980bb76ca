#!/usr/bin/env bash
# Fuzz smoke test for CI: every cargo-fuzz target in fuzz/ (the parsers of untrusted bytes:
# client commands, API bodies, JWTs, config, WebSocket frames, STOMP frames, names) runs for a
# short while from its committed corpus, and any crash, failed invariant, timeout or
# out-of-memory fails the script. It catches regressions the corpus already covers plus what a
# short run finds; long runs are for people (see fuzz/README.md).
#
# Steps: install cargo-fuzz if missing (`cargo install --locked cargo-fuzz`), build all targets,
# then run each for FUZZ_SECONDS (default 30) on a scratch copy of fuzz/corpus/<target>/, so
# the committed corpus is left as it is. A failing input is saved under fuzz/artifacts/<target>/.
#
# The stable toolchain is enough: RUSTC_BOOTSTRAP=1 lets cargo-fuzz pass -Zsanitizer=address
# (set FUZZ_SANITIZER=none to build without AddressSanitizer). One target runs at a time, on one
# core. With the build cached it takes about 3.5 minutes (3m11s measured on 2 cores before
# stomp_frames added its run); a cold build of the targets adds about 15 minutes there.
set -euo pipefail

cd "$(dirname "$0")/.."
seconds="${FUZZ_SECONDS:-30}"
sanitizer="${FUZZ_SANITIZER:-address}"

if ! command -v cargo-fuzz >/dev/null 2>&1; then
    cargo install --locked cargo-fuzz
fi

export RUSTC_BOOTSTRAP=1
# FUZZ_TARGET_DIR: build outside fuzz/target (CI keeps it across fresh clones).
dir_args=()
[ -n "${FUZZ_TARGET_DIR:-}" ] && dir_args=(--target-dir "$FUZZ_TARGET_DIR")
cargo fuzz build --sanitizer "$sanitizer" "${dir_args[@]}"

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
export TMPDIR="$scratch" # the config and jwt targets write their files there
failed=()
for target in $(cargo fuzz list); do
    mkdir -p "$scratch/$target"
    echo "== fuzz $target for ${seconds}s"
    # -max_len: the frame decoder needs frames larger than its first 4 KiB read.
    if ! cargo fuzz run --sanitizer "$sanitizer" "${dir_args[@]}" "$target" "$scratch/$target" "fuzz/corpus/$target" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=20000 -print_final_stats=1 \
        >"$scratch/$target.log" 2>&1; then
        failed+=("$target")
        grep -A2 -E 'panicked at|ERROR: libFuzzer|ERROR: AddressSanitizer' "$scratch/$target.log" | head -n 20 || true
        tail -n 25 "$scratch/$target.log"
    fi
    grep -E '^(Done|stat::number_of_executed_units)' "$scratch/$target.log" || true
done

if ((${#failed[@]})); then
    echo "fuzz smoke test FAILED: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
    exit 1
fi
echo "fuzz smoke test passed"
