#!/usr/bin/env bash
# The worker against its floors, in one run: every front end through
# worker-client, the floors (examples/bench_floor_*, a static "hello" for the
# process floor) through the same client, then start-up, memory and size
# scaling. Prints one table and writes target/bench/results.json (a list of
# rows: row, p50_us, p99_us, requests_per_s, and floor / ratio_to_floor where
# the row has a floor).
# Usage: ci/bench.sh [REQUESTS]      (default 10000 per latency row)
# BENCH_ROUNDS=N (default 3): the floor and worker latency rows are run N
# times over, round after round, and each figure is the median of the rounds,
# so that a row and its floor see the same noise and one burst of it does not
# decide a ratio.
# BENCH_WRITE_DIR=DIR: where the write rows write (default /dev/shm, a tmpfs,
# so that they measure the worker and the kernel's cost of creating a file
# rather than the disk under it; on this class of virtual machine an ext4
# file write took 60 µs on one boot of the machine and 350-450 µs on another).
# BENCH_PROFILE=static measures the static release binary of ci/release.sh;
# BENCH_PROFILE=debug measures the debug build instead: meaningless figures,
# but a quick check (CI) that every row still runs, without a release build.
set -euo pipefail
cd "$(dirname "$0")/.."
requests=${1:-10000}
rounds=${BENCH_ROUNDS:-3}
round=1
profile=${BENCH_PROFILE:-release}
root=$PWD
case $profile in
  release)
    cargo build --release --quiet --bins --examples
    release="$root/target/release"
    ;;
  static)
    # The binary that ships, its floors built with the same flags.
    ci/release.sh --examples >&2
    release="$root/target/x86_64-unknown-linux-gnu/release"
    ;;
  debug)
    cargo build --quiet --bins --examples
    release="$root/target/debug"
    ;;
  *)
    echo "bench.sh: BENCH_PROFILE must be release, static or debug" >&2
    exit 2
    ;;
esac
client="$release/worker-client"
# The share of CPU time stolen by the hypervisor during the run is printed
# and stored with it; and the commit is the one measured, not whatever is
# checked out when the run ends.
cpu_before=$(ci/cpu-stolen.sh)
commit=$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src examples ci Cargo.toml || echo "-dirty")
# BENCH_WORKER: another build of the worker (e.g. another opt-level) measured
# against the same client and floors.
worker="${BENCH_WORKER:-$release/persistent-worker}"
out="$root/target/bench"
rm -rf "$out/raw"
mkdir -p "$out/raw"
rows="$out/raw/rows.tsv"
: >"$rows"
work=$(mktemp -d)
write_root=${BENCH_WRITE_DIR:-/dev/shm}
[[ -d $write_root && -w $write_root ]] || write_root=$work
files=$(mktemp -d "$write_root/bench-files.XXXXXX")
trap 'rm -rf "$work" "$files"' EXIT
cd "$work"

# Start-up and memory rows use fixed counts so that REQUESTS only scales the
# latency rows; a reduced run (CI) caps the long ones.
min() { if (("$1" < "$2")); then echo "$1"; else echo "$2"; fi; }
starts=20
long=$((requests >= 10000 ? 100000 : requests * 10))

# Usage: row NAME FLOOR KIND WORKER-CLIENT-ARGS...
# KIND is latency, startup, memory or size:SECTION:BYTES. FLOOR is '-' for none.
# The row's CPU time (client and worker, which the client waits for: user,
# system, wall seconds) goes beside its figures: how busy the cores were.
row() {
  local name=$1 floor=$2 kind=$3
  shift 3
  local file TIMEFORMAT='%U %S %R'
  file="$out/raw/$(echo "$name" | tr -c 'a-zA-Z0-9\n' '_').$round.json"
  printf '%-40s' "$name" >&2
  # A row may start with `taskset -c CPUS CLIENT` instead of the client's mode.
  local cmd=("$client" "$1")
  if [[ $1 == taskset ]]; then
    cmd=("${@:1:5}")
    shift 4
  fi
  shift
  if ! { time "${cmd[@]}" --json-out "$file" "$@" >"$file.txt" 2>"$file.err"; } 2>"$file.cpu"; then
    echo " FAILED" >&2
    cat "$file.txt" "$file.err" >&2
    exit 1
  fi
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$floor" "$kind" "$file" "$file.cpu" >>"$rows"
  echo " ok" >&2
}

# Usage: spawn_row NAME FLOOR RUNS PROGRAM [ARGS...]
spawn_row() {
  local name=$1 floor=$2 runs=$3
  shift 3
  local file
  file="$out/raw/$(echo "$name" | tr -c 'a-zA-Z0-9\n' '_').$round.json"
  printf '%-40s' "$name" >&2
  "$release/examples/bench_spawn" "$runs" "$file" "$@" >/dev/null
  printf '%s\t%s\t%s\t%s\t-\n' "$name" "$floor" latency "$file" >>"$rows"
  echo " ok" >&2
}

floor_pipe="$release/examples/bench_floor_pipe"
floor_proto="$release/examples/bench_floor_proto"
floor_grpc="$release/examples/bench_floor_grpc"
noop=(--request --noop)
# Each write row writes new files in a directory of its own. Rewriting files
# that an earlier row left behind costs several times more on ext4 (truncating
# a file with data starts its writeback at close: auto_da_alloc), which made
# the later write rows look slow for a reason that is not the worker's.
fresh() { mktemp -d "$files/files.XXXXXX"; }
write() { write=(--request "$(fresh)/out-{n}.txt"); }
n=(--requests "$requests")

# The process floor: a static binary that prints "hello" and exits.
printf '#include <unistd.h>\nint main(void){return write(1,"hello\\n",6)!=6;}\n' >hello.c
cc -O2 -static -o hello hello.c

latency_rows() {
  echo "floors (round $round of $rounds)" >&2
  # Every floor waits for its next request awake, as the worker does
  # (examples/floor_support): a floor that slept would pay a core wake-up the
  # worker skips, and the worker would come out below it.
  row "floor pipe" - latency bazel "${n[@]}" "${noop[@]}" -- "$floor_pipe"
  row "floor proto" - latency bazel "${n[@]}" "${noop[@]}" -- "$floor_proto"
  # The same with the hop a multiplex request makes (the thread that reads
  # hands it to a pool thread; a short singleplex one runs on the reading
  # thread and skips it): what that hop costs on this machine.
  row "floor proto via thread" - latency bazel "${n[@]}" "${noop[@]}" -- "$floor_proto" --via-thread
  # The write rows' floors create the same files the demo tool does.
  write
  row "floor proto write" - latency bazel "${n[@]}" "${write[@]}" -- "$floor_proto" --write
  # As a remote executor drives it: one argument file naming one output file,
  # rewritten by every request (cheaper than creating a new file each time).
  echo "$(fresh)/out-remote.txt" >remote-floor.args
  row "floor remote write" - latency remote "${n[@]}" -- "$floor_proto" --write @remote-floor.args
  for c in 4 16 64; do
    row "floor proto multiplex $c" - latency bazel "${n[@]}" --concurrency "$c" "${noop[@]}" -- "$floor_proto"
    # Files written on every core, as the multiplexed worker writes them.
    write
    row "floor proto multiplex $c write" - latency \
      bazel "${n[@]}" --concurrency "$c" "${write[@]}" -- "$floor_proto" --write --threads "$(nproc)"
  done
  # Client and floor (then client and worker, below) pinned to one core: no
  # side waits for another core to wake, so the ratio is the worker's code.
  row "pinned floor proto" - latency taskset -c 0 "$client" bazel "${n[@]}" "${noop[@]}" -- "$floor_proto"
  for c in 1 4 16; do
    row "floor grpc unary c$c" - latency buck2 "${n[@]}" --concurrency "$c" "${noop[@]}" -- "$floor_grpc"
  done
  write
  row "floor grpc unary write c1" - latency buck2 "${n[@]}" "${write[@]}" -- "$floor_grpc" --write
  for c in 16 64; do
    row "floor grpc bidi $c" - latency buck2 "${n[@]}" --stream --concurrency "$c" "${noop[@]}" -- "$floor_grpc"
  done
  # Execute served as the worker serves it (a stream of one message each way,
  # so that a dropped call is seen while its request runs): the part of the gap
  # to the unary floor that is gRPC's price for that.
  row "floor grpc unary as duplex c1" - latency \
    buck2 "${n[@]}" "${noop[@]}" -- "$floor_grpc" --execute-as-duplex
  row "floor grpc client-streaming c1" - latency buck2 "${n[@]}" --exec "${noop[@]}" -- "$floor_grpc"
  spawn_row "floor process" - "$(min "$requests" 1000)" ./hello

  echo "worker (round $round of $rounds)" >&2
  row "bazel proto singleplex noop" "floor proto" latency bazel "${n[@]}" "${noop[@]}" -- "$worker"
  write
  row "bazel proto singleplex write" "floor proto write" latency bazel "${n[@]}" "${write[@]}" -- "$worker"
  row "pinned bazel proto singleplex noop" "pinned floor proto" latency \
    taskset -c 0 "$client" bazel "${n[@]}" "${noop[@]}" -- "$worker"
  row "bazel json singleplex noop" "bazel proto singleplex noop" latency \
    bazel "${n[@]}" --json "${noop[@]}" -- "$worker" --worker-protocol json
  write
  row "bazel json singleplex write" "bazel proto singleplex write" latency \
    bazel "${n[@]}" --json "${write[@]}" -- "$worker" --worker-protocol json
  write
  row "bazel proto multiplex 1 write" "floor proto write" latency \
    bazel "${n[@]}" --multiplex 1 "${write[@]}" -- "$worker"
  for c in 4 16 64; do
    row "bazel proto multiplex $c noop" "floor proto multiplex $c" latency \
      bazel "${n[@]}" --concurrency "$c" "${noop[@]}" -- "$worker" --concurrency "$c"
    write
    row "bazel proto multiplex $c write" "floor proto multiplex $c write" latency \
      bazel "${n[@]}" --concurrency "$c" "${write[@]}" -- "$worker" --concurrency "$c"
  done
  # Remote executors send the same argument file every time: one file rewritten.
  echo "$(fresh)/out-remote.txt" >remote.args
  row "remote proto write" "floor remote write" latency remote "${n[@]}" -- "$worker" @remote.args
  for c in 1 4 16; do
    row "buck2 Execute c$c" "floor grpc unary c$c" latency \
      buck2 "${n[@]}" --concurrency "$c" "${noop[@]}" -- "$worker" --concurrency "$c"
  done
  row "buck2 Exec c1" "floor grpc client-streaming c1" latency \
    buck2 "${n[@]}" --exec "${noop[@]}" -- "$worker"
  write
  row "buck2 Execute c1 write" "floor grpc unary write c1" latency buck2 "${n[@]}" "${write[@]}" -- "$worker"
  for c in 16 64; do
    row "buck2 ExecuteStream $c" "floor grpc bidi $c" latency \
      buck2 "${n[@]}" --stream --concurrency "$c" "${noop[@]}" -- "$worker" --concurrency "$c"
  done
  # The bridge in front of this same worker run as a Bazel-protocol child: its
  # "floor" is the direct row, so the ratio is what the bridge adds.
  for c in 1 4; do
    row "bridge buck2 Execute c$c" "buck2 Execute c$c" latency \
      buck2 "${n[@]}" --concurrency "$c" "${noop[@]}" -- "$worker" --concurrency "$c" --bridge -- "$worker"
  done
  spawn_row "oneshot write" "floor process" "$(min "$requests" 1000)" "$worker" "$(fresh)/oneshot-out.txt"
}
for ((round = 1; round <= rounds; round++)); do
  latency_rows
done
round=1

echo "start-up (median of $starts)" >&2
row "start-up bazel to first response" - startup \
  bazel --requests 1 --startup-runs "$starts" "${noop[@]}" -- "$worker"
row "start-up floor proto to first response" - startup \
  bazel --requests 1 --startup-runs "$starts" "${noop[@]}" -- "$floor_proto"
row "start-up buck2 to accepting" "start-up floor grpc to accepting" startup \
  buck2 --requests 1 --startup-runs "$starts" "${noop[@]}" -- "$worker"
row "start-up floor grpc to accepting" - startup \
  buck2 --requests 1 --startup-runs "$starts" "${noop[@]}" -- "$floor_grpc"

echo "memory" >&2
for count in 1000 "$long"; do
  row "memory bazel after $count" - memory bazel --requests "$count" "${noop[@]}" -- "$worker"
  row "memory buck2 after $count" - memory buck2 --requests "$count" "${noop[@]}" -- "$worker"
done

echo "size scaling" >&2
# A request file whose one request is --noop plus 1 KiB arguments up to SIZE.
padded() {
  python3 -c 'import sys
size = int(sys.argv[1]); head = sys.argv[2:]
print(" ".join(head + ["a" * 1023] * max(1, size // 1024)))' "$@"
}
sizes=(1 64 1024 16384)
for kib in "${sizes[@]}"; do
  bytes=$((kib * 1024))
  padded "$bytes" --noop >"req-$kib"
  padded 1024 --noop --reply-bytes "$bytes" >"reply-$kib"
  padded "$bytes" >"echo-$kib"
done
# The copy floors: the same bytes written into a pipe (or a socket) and read
# out into one buffer, several sizes, several times each; the fitted slope is
# what a MiB of message costs to move through that transport at all.
# The Buck2 rows' transport is a Unix socket, whose copy costs less per MiB
# than a pipe's: their floor is the same copy through a socket pair.
copy_row() {
  local transport file
  for transport in pipe socket; do
    file="$out/raw/${transport}_copy.$round.json"
    printf '%-40s' "$transport copy (round $round)" >&2
    "$release/examples/bench_pipe_copy" 5 "$file" $([[ $transport == socket ]] && echo --socket)
    printf '%s\t-\tcopy:%s\t%s\t-\n' "$transport copy" "$transport" "$file" >>"$rows"
    echo " ok" >&2
  done
}
# Every size row runs in every round: each slope is fitted from all the
# rounds' points, not from one run of a few 16 MiB requests.
size_rows() {
  copy_row
  for kib in "${sizes[@]}"; do
    bytes=$((kib * 1024))
    count=$(min "$requests" $((kib <= 64 ? 1000 : kib <= 1024 ? 50 : 8)))
    sized=(--requests "$count" --timeout-ms 120000)
    row "size floor pipe ${kib} KiB" - "size:floor pipe:$bytes" \
      bazel "${sized[@]}" --requests-file "echo-$kib" -- "$floor_pipe"
    row "size floor grpc ${kib} KiB" - "size:floor grpc:$bytes" \
      buck2 "${sized[@]}" --requests-file "echo-$kib" -- "$floor_grpc"
    row "size bazel request ${kib} KiB" - "size:bazel request:$bytes" \
      bazel "${sized[@]}" --requests-file "req-$kib" -- "$worker"
    row "size bazel response ${kib} KiB" - "size:bazel response:$bytes" \
      bazel "${sized[@]}" --requests-file "reply-$kib" -- "$worker"
    row "size buck2 request ${kib} KiB" - "size:buck2 request:$bytes" \
      buck2 "${sized[@]}" --requests-file "req-$kib" -- "$worker"
    row "size buck2 response ${kib} KiB" - "size:buck2 response:$bytes" \
      buck2 "${sized[@]}" --requests-file "reply-$kib" -- "$worker"
  done
}
for ((round = 1; round <= rounds; round++)); do
  size_rows
done

cd "$root"
# shellcheck disable=SC2086 # two numbers, split on purpose
stolen=$(ci/cpu-stolen.sh $cpu_before)
python3 ci/bench_report.py "$rows" "$out/results.json" \
  "$(nproc) cores, $(uname -sr), $profile build, $requests requests per latency row, median of $rounds rounds, files written to $(stat -f -c %T "$files"), $stolen" |
  tee "$out/report.txt"

# BENCH_STORE=1: keep this run under bench/results/ with its commit, machine
# and date; README and docs/performance.md quote figures from those files.
if [[ ${BENCH_STORE:-} == 1 ]]; then
  mkdir -p bench/results
  stored="bench/results/$(date -u +%Y-%m-%dT%H%M)-$commit-$profile.json"
  python3 - "$out/results.json" "$stored" "$commit" "$(nproc) cores, $(uname -sr), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')" \
    "$profile build, $requests requests per latency row, $rounds rounds, $stolen" <<'PY'
import datetime, json, sys
src, dst, commit, machine, run = sys.argv[1:6]
with open(src) as f:
    rows = json.load(f)
stored = {"commit": commit, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "machine": machine, "run": run, "rows": rows}
with open(dst, "w") as f:
    json.dump(stored, f, indent=1)
    f.write("\n")
PY
  cp "$out/report.txt" "${stored%.json}.txt"
  echo "stored: $stored and ${stored%.json}.txt"
fi
