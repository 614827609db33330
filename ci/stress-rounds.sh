#!/usr/bin/env bash
# The whole test suite, round after round, on a machine kept busy: the check
# that no test depends on an idle machine or on luck. A test that fails once
# in twenty loaded rounds fails a CI run sooner or later.
# Usage: ci/stress-rounds.sh ROUNDS [debug|static]
#   debug (default): `cargo test` as built; static: the shipped static
#   binaries in place of the debug ones (ci/test-static.sh, after
#   ci/release.sh).
#   STRESS_CPU=N    stress-ng CPU hogs at normal priority (default: one per core)
# Prints each round's result and, at the end, the failures counted per test.
set -euo pipefail
cd "$(dirname "$0")/.."
if (($# < 1)); then
  sed -n '5,10p' "$0" >&2
  exit 2
fi
rounds=$1 profile=${2:-debug}
case $profile in
  debug) run=(cargo test --quiet) ;;
  static) run=(ci/test-static.sh --quiet) ;;
  *)
    echo "stress-rounds.sh: profile must be debug or static, not $profile" >&2
    exit 2
    ;;
esac
hogs=${STRESS_CPU:-$(nproc)}
log=$(mktemp -d)
cleanup() {
  [[ -z ${load_pid-} ]] || kill "$load_pid" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup EXIT
# Built before the load starts, so the rounds time tests, not the compiler.
cargo test --no-run --quiet
stress-ng --cpu "$hogs" --quiet &
load_pid=$!
failed_rounds=0
for ((round = 1; round <= rounds; round++)); do
  # A load process that died would leave the round unloaded.
  if ! kill -0 "$load_pid" 2>/dev/null; then
    echo "stress-rounds.sh: stress-ng is gone; round $round would not be loaded" >&2
    exit 1
  fi
  start=$SECONDS
  if "${run[@]}" >"$log/$round.txt" 2>&1; then
    echo "round $round/$rounds ($profile, $hogs hogs): ok in $((SECONDS - start)) s"
  else
    failed_rounds=$((failed_rounds + 1))
    echo "round $round/$rounds ($profile, $hogs hogs): FAILED in $((SECONDS - start)) s; log $log/$round.txt"
    grep -E '^test .* FAILED$|panicked at' "$log/$round.txt" | head -20 || true
  fi
done
echo "$failed_rounds of $rounds round(s) failed ($profile, stress-ng --cpu $hogs)"
if ((failed_rounds > 0)); then
  echo "failing tests, counted over all rounds:"
  cat "$log"/*.txt | grep -E '^test .* FAILED$' | sort | uniq -c | sort -rn
  exit 1
fi
rm -rf "$log"
