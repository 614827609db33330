#!/usr/bin/env bash
# Builds of the worker side by side (another opt-level, another link, another
# pool): the rows a build change moves, each run for every build in turn and
# the whole round repeated, so that a noisy machine disturbs all builds alike.
# Prints, per row and build, the medians over the rounds of p50, p99 and
# requests/s (and p99.9). One ci/bench.sh run is one sample; this is what a before/after
# figure should come from.
# Usage: ci/bench-ab.sh REQUESTS ROUNDS NAME=WORKER-BINARY...
#   e.g. ci/bench-ab.sh 3000 5 old=/tmp/persistent-worker.old new=target/x86_64-unknown-linux-gnu/release/persistent-worker
# The client is the static worker-client of ci/release.sh (built if missing).
# AB_LOAD=N runs `stress-ng --cpu N` throughout: the tail under a loaded
# machine (a build runs beside its workers), not only on a quiet one.
set -euo pipefail
cd "$(dirname "$0")/.."
if (($# < 3)); then
  sed -n '2,10p' "$0" >&2
  exit 2
fi
requests=$1 rounds=$2
shift 2
client=target/x86_64-unknown-linux-gnu/release/worker-client
[[ -x $client ]] || ci/release.sh >&2
work=$(mktemp -d)
trap 'rm -rf "$work"; [[ -z ${load_pid-} ]] || kill "$load_pid" 2>/dev/null || true' EXIT
if [[ -n ${AB_LOAD-} ]]; then
  stress-ng --cpu "$AB_LOAD" --quiet &
  load_pid=$!
  echo "load: stress-ng --cpu $AB_LOAD" >&2
fi

# NAME|WORKER-CLIENT ARGS|WORKER ARGS
rows=(
  "bazel proto singleplex noop|bazel --request --noop|"
  "bazel json singleplex noop|bazel --json --request --noop|--worker-protocol json"
  "bazel proto multiplex 4 noop|bazel --concurrency 4 --request --noop|--concurrency 4"
  "buck2 Execute c1|buck2 --request --noop|"
  "buck2 Execute c4|buck2 --concurrency 4 --request --noop|--concurrency 4"
  "buck2 ExecuteStream 16|buck2 --stream --concurrency 16 --request --noop|--concurrency 16"
)
for ((round = 1; round <= rounds; round++)); do
  echo "round $round/$rounds" >&2
  for spec in "${rows[@]}"; do
    IFS='|' read -r name client_args worker_args <<<"$spec"
    for build in "$@"; do
      label=${build%%=*} bin=${build#*=}
      file="$work/$round-$(echo "$name $label" | tr -c 'a-zA-Z0-9\n' '_').json"
      # shellcheck disable=SC2086 # the argument lists are word lists
      if ! "$client" $client_args --requests "$requests" --json-out "$file" \
        -- "$bin" $worker_args >"$file.txt" 2>&1; then
        echo "bench-ab.sh: $name with $label failed:" >&2
        cat "$file.txt" >&2
        exit 1
      fi
      printf '%s\t%s\t%s\n' "$name" "$label" "$file" >>"$work/index.tsv"
    done
  done
done

python3 - "$work/index.tsv" "$rounds" <<'EOF'
import json, statistics, sys
from collections import defaultdict

samples = defaultdict(list)
for line in open(sys.argv[1]):
    name, label, path = line.rstrip("\n").split("\t")
    raw = json.load(open(path))
    samples[(name, label)].append(
        tuple(raw["latency_ms"][p] * 1000 for p in ("p50", "p99", "p999")) + (raw["throughput_per_s"],)
    )
print(f"median of {sys.argv[2]} rounds")
print(f"{'row':32} {'build':10} {'p50 µs':>8} {'p99 µs':>8} {'p99.9 µs':>9} {'req/s':>8}")
for (name, label), runs in samples.items():
    p50, p99, p999, rps = (statistics.median(r[i] for r in runs) for i in range(4))
    print(f"{name:32} {label:10} {p50:8.1f} {p99:8.1f} {p999:9.1f} {rps:8.0f}")
EOF
