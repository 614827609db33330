#!/usr/bin/env bash
# A real compiler worker through the bridge, measured: a generated TypeScript
# project (BENCH_TSC_MODULES modules, default 300, under target/bench-tsc/)
# built three ways, each a first build, an unchanged rebuild and a rebuild
# after a one-file edit:
#   cold    a fresh `tsc --project tsconfig.json` process per build;
#   bridge  the ts_project worker of @bazel/typescript (ci/ts-worker-install.sh)
#           behind `persistent-worker --bridge`, driven as Buck2 drives a
#           local worker (`worker-client buck2`, Worker.Execute on
#           WORKER_SOCKET);
#   bazel   the same worker driven directly over stdin/stdout as Bazel does
#           (`worker-client bazel`), so that bridge - bazel is the bridge's
#           own share.
# A worker way starts one worker per round and sends it the three builds as
# three requests; the edit is made between the second answer and the third
# request (`worker-client --before-request`). Build times are the requests'
# latencies (the first one includes starting node and the worker; the bridge
# starts its child on the first request), and the cold process's wall time;
# beside them the compiler's CPU time (user + system: the tsc process, or
# the worker process between samples before each request, so a build's
# figure includes the garbage collection the worker runs after answering),
# which a busy machine disturbs less than wall time, and the bridge
# process's own CPU time per build.
#
# usage: ci/bench-tsc.sh [ROUNDS]     (odd, default 5)
# Prints the medians over the rounds (ms, with min-max), the warm/cold
# ratios and bridge - bazel, and writes the raw figures and the machine's
# description to bench/results/tsc-DATE-COMMIT.json.
#
# Every build is checked before its figure counts: every module's .js
# exists (a first build wrote all of them), the edited module's .js has the
# edit, and through the bridge one child served the three requests. A build
# that did not compile stops the benchmark.
#
# BENCH_TSC_SETTLE_S (default 1): the pause before each rebuild, untimed and
# the same for every way. The worker learns of edits from fs.watch events,
# which it handles only when idle; nothing orders the edit's event before
# the next request, which would then compile the old text (not seen with
# BENCH_TSC_SETTLE_S=0 in 6 edits; docs/bridge-typescript.md). A rebuild
# after a pause is also what a user who edits a file sees.
# BENCH_PROFILE (default release; debug for a quick run without a release
# build): which build of persistent-worker and worker-client is measured.
# BENCH_TSC_WORKER_BIN, BENCH_TSC_CLIENT_BIN: paths of an already built
# persistent-worker and worker-client to measure instead (both or neither;
# nothing is built then). The client's own cost is tiny beside tsc's, so a
# debug worker-client serves; the bridge's share is the worker's, so
# persistent-worker should be a release build. The JSON names both.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
rounds=${1:-5}
if ! [[ $rounds =~ ^[0-9]+$ ]] || ((rounds % 2 == 0)); then
  echo "bench-tsc.sh: ROUNDS must be odd, so that the median is one round's figure" >&2
  exit 2
fi
modules=${BENCH_TSC_MODULES:-300}
settle=${BENCH_TSC_SETTLE_S:-1}
profile=${BENCH_PROFILE:-release}
worker_bin=${BENCH_TSC_WORKER_BIN:-}
client_bin=${BENCH_TSC_CLIENT_BIN:-}
if [ -n "$worker_bin" ] || [ -n "$client_bin" ]; then
  if [ -z "$worker_bin" ] || [ -z "$client_bin" ]; then
    echo "bench-tsc.sh: give both BENCH_TSC_WORKER_BIN and BENCH_TSC_CLIENT_BIN, or neither" >&2
    exit 2
  fi
  for b in "$worker_bin" "$client_bin"; do
    [ -x "$b" ] || { echo "bench-tsc.sh: $b is not an executable" >&2; exit 2; }
  done
  worker_bin=$(realpath "$worker_bin")
  client_bin=$(realpath "$client_bin")
  profile=given
else
  case $profile in
    release) cargo build --release --quiet --bins ;;
    debug) cargo build --quiet --bins ;;
    *)
      echo "bench-tsc.sh: BENCH_PROFILE must be release or debug" >&2
      exit 2
      ;;
  esac
  worker_bin="$root/target/$profile/persistent-worker"
  client_bin="$root/target/$profile/worker-client"
fi
work="$root/target/bench-tsc"
project="$work/project"
helper=(python3 "$root/ci/bench_tsc.py")
mkdir -p "$work"

worker_line=$(ci/ts-worker-install.sh "$work/ts-worker")
eval "worker=($worker_line)"
node=${worker[0]}
tsc=("$node" "$work/ts-worker/node_modules/typescript/bin/tsc")
rm -rf "$project"
"${helper[@]}" generate "$project" "$modules"
raw="$work/raw.tsv"
: >"$raw"
load_before=$(cut -d' ' -f1-3 /proc/loadavg)

# The worker ways' --before-request hook: before request N, check request
# N-1's build, make the edit before the third, pause, sample the worker's
# (and bridge's) CPU time so far, stamp. A fourth request (an unchanged
# rebuild, not reported) closes the third's CPU window. The counts of .js
# files written go to WRITTEN-FILE, the CPU samples to CPU-FILE (stdout is
# worker-client's).
hook="$work/before-request.sh"
cat >"$hook" <<EOF
#!/bin/sh
# worker-client --before-request for ci/bench-tsc.sh: N MARK WRITTEN-FILE CPU-FILE
set -e
case \$1 in
  1) ${helper[*]} check "$project" first >>"\$3" ;;
  2) ${helper[*]} check "$project" unchanged >>"\$3"
     ${helper[*]} edit "$project" "\$2" ;;
  3) ${helper[*]} check "$project" edit "\$2" >>"\$3" ;;
esac
if [ "\$1" != 0 ]; then
  sleep $settle
  ${helper[*]} cpu "${worker[1]}" >>"\$4"
fi
${helper[*]} stamp "$project"
EOF

# A fresh project state for a round: the edit undone, no outputs.
reset() {
  rm -rf "$project/out"
  "${helper[@]}" edit "$project" v0
}

cold() {
  local round=$1 mark=$2 phase ms cpu written
  reset
  for phase in first unchanged edit; do
    if [ "$phase" != first ]; then
      [ "$phase" = edit ] && "${helper[@]}" edit "$project" "$mark"
      sleep "$settle"
    fi
    "${helper[@]}" stamp "$project"
    read -r ms cpu < <("${helper[@]}" run "$project" "${tsc[@]}" --project tsconfig.json ||
      echo "failed")
    if [ "$ms" = failed ]; then
      echo "bench-tsc.sh: cold tsc failed ($phase build, round $round)" >&2
      exit 1
    fi
    written=$("${helper[@]}" check "$project" "$phase" "$mark")
    echo "$round cold $phase $ms $written $cpu -" >>"$raw"
  done
}

# warm ROUND MARK WAY: one worker, three requests.
warm() {
  local round=$1 mark=$2 way=$3 log="$work/$3.log" counts="$work/$3.written"
  local cpus="$work/$3.cpu"
  local -a client
  reset
  : >"$counts"
  : >"$cpus"
  client=(--timeout-ms 600000 --repeat 4 --request '--project tsconfig.json'
    --before-request "sh $hook {n} $mark $counts $cpus")
  if [ "$way" = bridge ]; then
    client=(buck2 "${client[@]}" -- "$worker_bin" --verbose --bridge -- "${worker[@]}")
  else
    client=(bazel "${client[@]}" -- "${worker[@]}")
  fi
  if ! (cd "$project" && "$client_bin" "${client[@]}") >"$log" 2>&1; then
    echo "bench-tsc.sh: worker-client $way failed (round $round); its output:" >&2
    tail -n 40 "$log" >&2
    exit 1
  fi
  local -a ms written node bridge
  mapfile -t ms < <(sed -n 's/^<- response [0-9]*: exit_code 0 after \([0-9.]*\) ms$/\1/p' "$log")
  mapfile -t written <"$counts"
  mapfile -t node < <(cut -d' ' -f1 "$cpus")
  mapfile -t bridge < <(cut -d' ' -f2 "$cpus")
  if [ "${#ms[@]}" != 4 ] || [ "${#written[@]}" != 3 ] || [ "${#node[@]}" != 3 ]; then
    echo "bench-tsc.sh: $way round $round: expected 4 successful responses, 3 checks and 3 CPU samples, got ${#ms[@]}, ${#written[@]} and ${#node[@]}; see $log" >&2
    exit 1
  fi
  if [ "$way" = bridge ]; then
    local children
    children=$(grep -o 'answered by child pid [0-9]*' "$log" | sort -u | wc -l)
    if [ "$children" != 1 ]; then
      echo "bench-tsc.sh: bridge round $round: $children children answered, expected 1 (warm); see $log" >&2
      exit 1
    fi
  fi
  # CPU per build: the samples' differences (the first from the worker's start).
  local -a phases=(first unchanged edit) bcpu
  local k prev=0 bprev=0
  for k in 0 1 2; do
    bcpu[k]=-
    if [ "${bridge[k]}" != - ]; then
      bcpu[k]=$((bridge[k] - bprev))
      bprev=${bridge[k]}
    fi
    echo "$round $way ${phases[k]} ${ms[k]} ${written[k]} $((node[k] - prev)) ${bcpu[k]}" >>"$raw"
    prev=${node[k]}
  done
}

# The ways take turns going first, so that a burst of load on the machine
# does not always land on the same one.
ways=(cold bridge bazel)
for ((round = 1; round <= rounds; round++)); do
  for ((k = 0; k < 3; k++)); do
    way=${ways[(round + k) % 3]}
    echo "round $round/$rounds: $way" >&2
    if [ "$way" = cold ]; then
      cold "$round" "edit$round"
    else
      warm "$round" "edit$round" "$way"
    fi
  done
done

commit=$(git rev-parse --short HEAD)
git diff --quiet HEAD -- src ci testdata || commit="$commit-dirty"
stamp=$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p bench/results
out="bench/results/tsc-$stamp-$commit.json"
meta="$work/meta.json"
python3 - "$meta" <<EOF
import json, sys
json.dump({
    "benchmark": "ci/bench-tsc.sh",
    "date_utc": "$stamp",
    "commit": "$commit",
    "profile": "$profile",
    "persistent_worker": "$worker_bin",
    "worker_client": "$client_bin",
    "nproc": $(nproc),
    "cpu": "$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)",
    "mem_total": "$(sed -n 's/^MemTotal:[[:space:]]*//p' /proc/meminfo)",
    "kernel": "$(uname -r)",
    "node": "$("$node" --version)",
    "tsc": "$("${tsc[@]}" --version | sed 's/^Version //')",
    "worker": "@bazel/typescript $(sed -n 's/^ *"version": "\(.*\)",$/\1/p' "$work/ts-worker/node_modules/@bazel/typescript/package.json") internal/worker/index.js",
    "modules": $modules,
    "rounds_run": $rounds,
    "settle_s": $settle,
    "loadavg_before": "$load_before",
    "loadavg_after": "$(cut -d' ' -f1-3 /proc/loadavg)",
}, open(sys.argv[1], "w"))
EOF
"${helper[@]}" report "$raw" "$out" "$meta"
