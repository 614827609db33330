#!/usr/bin/env bash
# The whole test suite against the binaries that ship: builds the tests as
# usual (debug), puts the static release builds of ci/release.sh where the
# tests run them from (target/debug/persistent-worker and worker-client), runs
# every test binary directly, then puts the debug builds back.
# Usage: ci/test-static.sh [TEST-BINARY-ARGS...]   (after ci/release.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
triple=x86_64-unknown-linux-gnu
static="target/$triple/release"
for bin in persistent-worker worker-client; do
  if ! file -b "$static/$bin" | grep -q 'static'; then
    echo "test-static.sh: $static/$bin is not a static build; run ci/release.sh first" >&2
    exit 2
  fi
done
# Every test executable, as cargo would run it. Built in plain commands, not
# inside a process substitution, whose failure `set -e` never sees.
artifacts=$(mktemp)
build_log=$(mktemp)
if ! cargo test --no-run --message-format=json >"$artifacts" 2>"$build_log"; then
  tail -n 40 "$build_log" >&2
  echo "test-static.sh: cargo test --no-run failed" >&2
  exit 1
fi
executables=$(jq -r 'select(.reason == "compiler-artifact" and .profile.test == true) | .executable' "$artifacts")
rm -f "$artifacts" "$build_log"
mapfile -t tests <<<"$executables"
if [ -z "$executables" ]; then
  tests=()
fi
if ((${#tests[@]} == 0)); then
  echo "test-static.sh: cargo found no test executables" >&2
  exit 1
fi
saved=$(mktemp -d)
restore() {
  cp -p "$saved"/* target/debug/
  rm -rf "$saved"
}
for bin in persistent-worker worker-client; do
  cp -p "target/debug/$bin" "$saved/"
done
trap restore EXIT
for bin in persistent-worker worker-client; do
  cp "$static/$bin" "target/debug/$bin"
done
file -b target/debug/persistent-worker
failed=0
for test in "${tests[@]}"; do
  echo "== $(basename "$test")"
  # Cargo runs tests from the package root; so does this. The tests would
  # otherwise have Cargo rebuild the client over the static one.
  if ! WORKER_CLIENT_PREBUILT=1 "$test" "$@"; then
    failed=$((failed + 1))
  fi
done
if ((failed > 0)); then
  echo "test-static.sh: $failed test executable(s) failed against the static binaries" >&2
  exit 1
fi
echo "test-static.sh: every test executable passed against the static binaries"
