#!/usr/bin/env bash
# Tails under background load, side by side with minimal Python workers and
# the floors: one client in lockstep, Bazel (proto, each request writes a
# file, beside ci/python_bazel_worker.py and examples/bench_floor_proto
# --write) and Buck2 (Execute no-op, beside ci/python_noop_worker.py and
# examples/bench_floor_grpc, plain and --answer-from-pool), on a quiet
# machine, beside `nice -n 19` CPU hogs (two per core: a build the kernel
# was told matters less) and beside normal-priority hogs (two per core: a
# build that matters as much). The floor rows are the transport's own tail,
# waiting for requests as the worker waits: what a worker cannot get under.
# Each build runs ROUNDS times in turn under each load; prints, per load,
# protocol and build, the medians over the rounds of the mean, p50, p99,
# p99.9 and the share of requests over 2 ms (about one scheduler tick at
# 250 Hz: the figure a p99 flips with), and each round's share and p99.
# Usage: ci/bench-tail.sh REQUESTS ROUNDS NAME=WORKER-BINARY...
#   e.g. ci/bench-tail.sh 10000 3 worker=target/x86_64-unknown-linux-gnu/release/persistent-worker
# A WORKER-BINARY may be a command with arguments (quoted as one word).
# Needs python3 with venv (grpcio from PyPI into target/bench/python on
# first use) and stress-ng. TAIL_LOADS picks loads (default
# "quiet niced normal"); TAIL_PROTOCOLS picks protocols (default
# "bazel buck2"). Writes target/bench/tail.json; BENCH_STORE=1 keeps it under
# bench/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
if (($# < 3)); then
  sed -n '2,21p' "$0" >&2
  exit 2
fi
requests=$1 rounds=$2
shift 2
release=target/x86_64-unknown-linux-gnu/release
client=$release/worker-client
floor_proto=$release/examples/bench_floor_proto
floor_grpc=$release/examples/bench_floor_grpc
[[ -x $client && -x $floor_proto && -x $floor_grpc ]] || ci/release.sh --examples >&2
command -v stress-ng >/dev/null || {
  echo "bench-tail.sh: stress-ng is needed for the loaded rows" >&2
  exit 2
}
venv=target/bench/python
if [[ ! -x $venv/bin/python ]] || ! "$venv/bin/python" -c 'import grpc' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet grpcio >&2
fi
work=$(mktemp -d)
write_root=/dev/shm
[[ -d $write_root && -w $write_root ]] || write_root=$work
files=$(mktemp -d "$write_root/bench-tail.XXXXXX")
load_pid=
stop_load() {
  if [[ -n $load_pid ]]; then
    kill "$load_pid" 2>/dev/null || true
    wait "$load_pid" 2>/dev/null || true
    load_pid=
  fi
}
trap 'stop_load; rm -rf "$work" "$files"' EXIT
printf '#!/bin/sh\nexec %q %q\n' "$PWD/$venv/bin/python" "$PWD/ci/python_noop_worker.py" >"$work/python-grpc"
printf '#!/bin/sh\nexec python3 %q "$@"\n' "$PWD/ci/python_bazel_worker.py" >"$work/python-bazel"
chmod +x "$work/python-grpc" "$work/python-bazel"
hogs=$((2 * $(nproc)))
# The floors ask for the worker's time slice, as the worker does: beside
# normal-priority hogs a floor without it waits out slices the worker
# preempts (examples/floor_support).
export FLOOR_WORKER_SLICE=1
# Taken before the run: the commit measured, and the CPU time so far (the
# share the hypervisor steals during the run is printed and stored with it).
commit=$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src examples ci Cargo.toml || echo "-dirty")
cpu_before=$(ci/cpu-stolen.sh)
raw="$work/raw.tsv"
: >"$raw"

measure() {
  local load=$1 round b protocol python
  shift
  for ((round = 1; round <= rounds; round++)); do
    for protocol in ${TAIL_PROTOCOLS:-bazel buck2}; do
      # Buck2's two floors: answered on gRPC's thread, and from a thread of
      # the worker's own pool (beside normal-priority hogs the first had
      # 10-14 % of requests over 2 ms where the worker had 7-12 %).
      python=$work/python-grpc
      floors=("floor=$floor_grpc" "floor-pool=$floor_grpc --answer-from-pool")
      [[ $protocol == buck2 ]] || python=$work/python-bazel floors=("floor=$floor_proto --write")
      for b in "python=$python" "${floors[@]}" "$@"; do
        local name=${b%%=*} cmd
        read -r -a cmd <<<"${b#*=}"
        local request=(--request --noop)
        if [[ $protocol == bazel ]]; then
          request=(--request "$(mktemp -d "$files/f.XXXXXX")/out-{n}.txt")
        fi
        if ! "$client" "$protocol" "${request[@]}" --requests "$requests" \
          --json-out "$work/r.json" -q -- "${cmd[@]}" >"$work/out.txt" 2>&1; then
          echo "bench-tail.sh: $name ($protocol, $load) failed:" >&2
          cat "$work/out.txt" >&2
          exit 1
        fi
        python3 -c 'import json, sys
d = json.load(open(sys.argv[1]))
if d["failed"]:
    sys.exit(str(d["failed"]) + " request(s) failed")
l = d["latency_ms"]
print("\t".join(sys.argv[2:5] + [str(l[k] * 1000) for k in ("mean", "p50", "p99", "p999")]
                + [str(l["over_2ms_share"]), str(d["requests"])]))' \
          "$work/r.json" "$load" "$protocol" "$name" >>"$raw"
      done
    done
  done
}

for load in ${TAIL_LOADS:-quiet niced normal}; do
  case $load in
    quiet) ;;
    niced)
      nice -n 19 stress-ng --cpu "$hogs" --quiet &
      load_pid=$!
      ;;
    normal)
      stress-ng --cpu "$hogs" --quiet &
      load_pid=$!
      ;;
    *)
      echo "bench-tail.sh: unknown load $load (quiet, niced, normal)" >&2
      exit 2
      ;;
  esac
  echo "load: $load" >&2
  measure "$load" "$@"
  stop_load
done

mkdir -p target/bench
# shellcheck disable=SC2086 # two numbers, split on purpose
stolen=$(ci/cpu-stolen.sh $cpu_before)
python3 - "$raw" target/bench/tail.json "$requests" "$rounds" "$hogs" "$stolen" <<'PY'
import collections, json, statistics as s, sys
raw, out, requests, rounds, hogs, stolen = sys.argv[1:7]
rows = collections.defaultdict(list)
for line in open(raw):
    load, protocol, name, *values = line.rstrip("\n").split("\t")
    rows[(load, protocol, name)].append([float(v) for v in values])
loads = {"quiet": "quiet", "niced": f"beside {hogs} niced hogs", "normal": f"beside {hogs} hogs"}
result = []
print(f"one client, {requests} requests per round, medians of {rounds} rounds "
      f"(Bazel: each request writes a file; Buck2: Execute no-op); {stolen}")
print(f"{'load':22s} {'protocol':8s} {'build':10s} {'mean µs':>9s} {'p50 µs':>8s} {'p99 µs':>8s} "
      f"{'p99.9 µs':>9s} {'>2 ms':>7s}   each round: >2 ms % / p99 µs")
for (load, protocol, name), values in rows.items():
    mean, p50, p99, p999, over, _ = (s.median(c) for c in zip(*values))
    each = "  ".join(f"{v[4] * 100:.2f}/{v[2]:.0f}" for v in values)
    print(f"{loads[load]:22s} {protocol:8s} {name:10s} {mean:9.1f} {p50:8.1f} {p99:8.1f} "
          f"{p999:9.1f} {over * 100:6.2f}%   {each}")
    result.append({"load": load, "protocol": protocol, "build": name, "mean_us": mean, "p50_us": p50,
                   "p99_us": p99, "p999_us": p999, "over_2ms_share": over,
                   "rounds": [{"mean_us": v[0], "p50_us": v[1], "p99_us": v[2], "p999_us": v[3],
                               "over_2ms_share": v[4], "requests": int(v[5])} for v in values]})
with open(out, "w") as f:
    json.dump(result, f, indent=1)
    f.write("\n")
PY
if [[ ${BENCH_STORE:-} == 1 ]]; then
  mkdir -p bench/results
  stored="bench/results/$(date -u +%Y-%m-%dT%H%M)-$commit-tail.json"
  python3 - target/bench/tail.json "$stored" "$commit" "$(nproc) cores, $(uname -sr)" "$requests requests x $rounds rounds; builds: $*; $stolen" <<'PY'
import datetime, json, sys
src, dst, commit, machine, run = sys.argv[1:6]
stored = {"commit": commit, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "machine": machine, "run": run, "rows": json.load(open(src))}
with open(dst, "w") as f:
    json.dump(stored, f, indent=1)
    f.write("\n")
PY
  echo "stored: $stored"
fi
