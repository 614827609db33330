#!/usr/bin/env bash
# Soak and load: first the fault and integration tests with every core kept
# busy by other work (a timing assumption that only holds on an idle machine
# shows up here as a failure), then through each front end N requests to let
# memory settle and 4N more with nothing lost and threads/RSS flat (see
# tests/soak.rs).
# Usage: ci/soak.sh [N]          (default 10000)
#   SOAK_PROFILE=debug|release   build to test (default debug)
set -euo pipefail
cd "$(dirname "$0")/.."
requests=${1:-10000}
profile=${SOAK_PROFILE:-debug}
release=()
if [ "$profile" = release ]; then
    release=(--release)
fi

cores=$(nproc)
hogs=()
stop_hogs() {
    for pid in "${hogs[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${hogs[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    hogs=()
}
trap stop_hogs EXIT
# Each load process must still run: a stress-ng that died (a refused option,
# a kill) would leave the "loaded" tests running on an idle machine.
check_hogs() {
    for pid in "${hogs[@]}"; do
        state=$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1) || state=
        if [ -z "$state" ] || [ "$state" = Z ]; then
            echo "soak.sh: load process $pid is gone; $1 would not be under load" >&2
            exit 1
        fi
    done
}
cargo test "${release[@]}" --no-run --quiet --test faults --test bazel_worker --test buck2_worker --test soak
if command -v stress-ng >/dev/null; then
    stress-ng --cpu "$cores" --quiet &
    hogs+=($!)
    echo "load: stress-ng --cpu $cores"
else
    for _ in $(seq "$cores"); do
        sh -c 'while :; do :; done' &
        hogs+=($!)
    done
    echo "load: $cores busy loops"
fi
check_hogs "the test run"
cargo test "${release[@]}" --quiet --test faults --test bazel_worker --test buck2_worker
check_hogs "all of the test run"
stop_hogs

echo "soak: $requests requests per front end to settle, then 4x$requests measured, $profile build"
SOAK_REQUESTS=$requests cargo test "${release[@]}" --quiet --test soak -- --ignored --nocapture --test-threads 1 \
    | grep -oE 'soak [a-z].*|test result.*'
