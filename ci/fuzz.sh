#!/usr/bin/env bash
# Runs one fuzz target for a while: ci/fuzz.sh TARGET SECONDS
# Builds it first if needed (cargo-fuzz; the stable toolchain is enough, with
# RUSTC_BOOTSTRAP=1 for the sanitizer flags). Seeds come from
# testdata/fuzz/TARGET, new inputs go to fuzz/corpus/TARGET, a crash to
# fuzz/artifacts/TARGET and a non-zero exit. Prints libFuzzer's last status
# line (execs, cov, ft) and a one-line summary.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -ne 2 ]; then
  echo "usage: ci/fuzz.sh TARGET SECONDS" >&2
  exit 2
fi
target=$1
seconds=$2
export RUSTC_BOOTSTRAP=1
corpus=fuzz/corpus/$target
seeds=testdata/fuzz/$target
# Without seeds a short run starts from nothing and reaches little; a
# misspelt target or a lost folder must not pass as a fuzz run.
if [ ! -d "$seeds" ] || [ -z "$(ls -A "$seeds")" ]; then
  echo "fuzz $target: no seed inputs in $seeds; refusing to fuzz from nothing" >&2
  exit 2
fi
mkdir -p "$corpus"
# Leaks libFuzzer checks for between inputs, less glibc's own bookkeeping
# (ci/lsan.supp says which and why).
export LSAN_OPTIONS="suppressions=$PWD/ci/lsan.supp${LSAN_OPTIONS:+:$LSAN_OPTIONS}"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
# -rss_limit_mb: the targets keep their own limits far below it, so going
# past it is a finding, not noise.
cargo fuzz run --fuzz-dir fuzz "$target" "$corpus" "$seeds" -- \
  -max_total_time="$seconds" -rss_limit_mb=1024 -timeout=10 -print_final_stats=1 \
  >"$log" 2>&1 || status=$?
grep -aE '^#[0-9]+' "$log" | tail -n 1 || true
execs=$(grep -aE '^stat::number_of_executed_units:' "$log" | awk '{print $2}')
peak=$(grep -aE '^stat::peak_rss_mb:' "$log" | awk '{print $2}')
if [ "$status" -ne 0 ]; then
  # The whole sanitizer report (a leak's allocation stacks come first and
  # run long), or the log's end when there is none.
  if grep -qaE '^==[0-9]+==ERROR' "$log"; then
    sed -n '/^==[0-9]*==ERROR/,$p' "$log" | head -n 600 >&2
  else
    tail -n 60 "$log" >&2
  fi
  echo "fuzz $target: FAILED after ${execs:-?} executions (exit $status)" >&2
  exit "$status"
fi
echo "fuzz $target: ${seconds}s, ${execs:-?} executions, peak RSS ${peak:-?} MB, no crash"
