#!/usr/bin/env bash
# Buck2 Execute no-op, one client, side by side with a Python gRPC worker
# (ci/python_noop_worker.py): the tail on a quiet machine and with
# `stress-ng --cpu N` keeping every core busy (a build beside its workers).
# Each build runs ROUNDS times in turn; prints, per build, the medians over
# the rounds of p50, p99, p99.9 and the mean, and each round's p99.
# Usage: ci/bench-tail.sh REQUESTS ROUNDS NAME=WORKER-BINARY...
#   e.g. ci/bench-tail.sh 2000 5 worker=target/x86_64-unknown-linux-gnu/release/persistent-worker
# Needs python3 with venv; grpcio is installed from PyPI into
# target/bench/python on first use. TAIL_LOAD=N sets the load (default: one
# hog per core).
set -euo pipefail
cd "$(dirname "$0")/.."
if (($# < 3)); then
  sed -n '2,11p' "$0" >&2
  exit 2
fi
requests=$1 rounds=$2
shift 2
client=target/x86_64-unknown-linux-gnu/release/worker-client
[[ -x $client ]] || ci/release.sh >&2
venv=target/bench/python
if [[ ! -x $venv/bin/python ]] || ! "$venv/bin/python" -c 'import grpc' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet grpcio >&2
fi
work=$(mktemp -d)
trap 'rm -rf "$work"; [[ -z ${load_pid-} ]] || kill "$load_pid" 2>/dev/null || true' EXIT
printf '#!/bin/sh\nexec %q %q\n' "$PWD/$venv/bin/python" "$PWD/ci/python_noop_worker.py" >"$work/python-worker"
chmod +x "$work/python-worker"
builds=("python=$work/python-worker" "$@")

measure() {
  local round b
  for ((round = 1; round <= rounds; round++)); do
    for b in "${builds[@]}"; do
      "$client" buck2 --request --noop --requests "$requests" --json-out "$work/r.json" -q \
        -- "${b#*=}" >/dev/null
      python3 -c 'import json, sys
d = json.load(open(sys.argv[1]))["latency_ms"]
print(sys.argv[2], d["p50"] * 1000, d["p99"] * 1000, d["p999"] * 1000, d["mean"] * 1000)' "$work/r.json" "${b%%=*}"
    done
  done | python3 -c 'import collections, statistics as s, sys
rows = collections.defaultdict(list)
for line in sys.stdin:
    name, *values = line.split()
    rows[name].append([float(v) for v in values])
print("build         p50 µs    p99 µs  p99.9 µs   mean µs   p99 of each round, µs")
for name, values in rows.items():
    p50, p99, p999, mean = (s.median(c) for c in zip(*values))
    each = " ".join(f"{v[1]:.0f}" for v in values)
    print(f"{name:10s} {p50:9.1f} {p99:9.1f} {p999:9.1f} {mean:9.1f}   {each}")'
}

echo "Buck2 Execute no-op, 1 client, $requests requests, medians of $rounds rounds"
echo "quiet:"
measure
load=${TAIL_LOAD:-$(nproc)}
stress-ng --cpu "$load" --quiet &
load_pid=$!
echo "loaded (stress-ng --cpu $load):"
measure
