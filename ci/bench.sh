#!/usr/bin/env bash
# Throughput and latency of every front end, measured with worker-client
# against the release build, in one run so the figures can be compared.
# Usage: ci/bench.sh [REQUESTS]      (default 10000)
set -euo pipefail
cd "$(dirname "$0")/.."
requests=${1:-10000}
cargo build --release --quiet --bins
root=$PWD
client="$root/target/release/worker-client"
worker="$root/target/release/persistent-worker"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

# Each request writes its own small file, as the demo tool does.
# Usage: bench MODE [MODE OPTIONS] -- WORKER...
bench() {
  local mode=$1
  shift
  "$client" "$mode" --bench --requests "$requests" --request 'out-{n}.txt' "$@" | tail -n 1
}

echo "worker: $worker ($requests requests per row; the demo tool writes one file per request)"
"$client" bazel --bench --requests 1 --request warm -- "$worker" | sed -n 2p
bench bazel -- "$worker"
bench bazel --concurrency 4 -- "$worker" --concurrency 4
bench bazel --json -- "$worker" --worker-protocol json
echo out-remote.txt > remote.args
"$client" remote --bench --requests "$requests" -- "$worker" @remote.args | tail -n 1
bench buck2 -- "$worker"
bench buck2 --concurrency 4 -- "$worker" --concurrency 4
bench buck2 --concurrency 16 -- "$worker" --concurrency 16
bench buck2 --stream --concurrency 16 -- "$worker" --concurrency 16
# The bridge in front of the same worker run as a Bazel-protocol child
# (compare with the direct buck2 rows above: the difference is the bridge).
echo "bridge: buck2 Execute -> persistent-worker --bridge -> persistent-worker --persistent_worker"
bench buck2 -- "$worker" --concurrency 1 --bridge -- "$worker"
bench buck2 --concurrency 4 -- "$worker" --concurrency 4 --bridge -- "$worker"

echo
echo "one-shot, the same request as a process start each (200 runs):"
for i in $(seq 1 200); do
  t0=$(date +%s%N)
  "$worker" "oneshot-$i.txt" 2>/dev/null
  echo $(($(date +%s%N) - t0))
done | sort -n | awk -v n="$requests" '
  { t[NR] = $1 }
  END { p50 = t[int(NR / 2)] / 1e6; printf "  p50 %.3f ms per run; %d requests that way: %.1f s\n", p50, n, p50 * n / 1000 }'
