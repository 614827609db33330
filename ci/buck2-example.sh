#!/usr/bin/env bash
# Builds examples/buck2 with a real buck2 and checks, from what Buck2 itself
# recorded (`buck2 log what-ran`, the action spans of `buck2 log show`, the
# build's stderr and exit status, the outputs), that
#   1. no-workers: every demo action ran locally, one-shot (ONE-SHOT START);
#   2. local-persistent-workers: one Buck2 worker process served all 4 demo
#      actions, and all 4 were running at one instant (concurrency 4); the
#      same check is shown to fail at concurrency 3;
#   3. a build with another work_ms is served by a new worker started with
#      it: another pid, and every action runs at least the new work_ms;
#   4. local-bridge: the bridge in front of the Node @bazel/worker program in
#      testdata/node_worker (or persistent-worker itself without npm) served
#      them;
#   5. when a worker fails: an action past its timeout_seconds is reported
#      as timed out by the worker, at once; a worker killed with SIGKILL in
#      the middle of a build fails its actions (no hang) and the next build
#      gets a new one; after Ctrl-C on the client, every request the worker
#      had is cancelled or runs to its end (this Buck2 lets them run) and the
#      worker stops; `buck2 kill` in the middle of a build leaves no worker
#      and no bridge child behind.
# Any mismatch fails the script with the evidence printed. It takes about a
# minute.
#
# Without a `buck2` on PATH it says that it skipped, and why, and exits 0;
# with REQUIRE_BUCK2=1 (CI) that is a failure instead. The remote (BuildBuddy)
# scenarios need credentials and an image: they are described in
# examples/buck2/README.md and not run here.
#
# Usage: [REQUIRE_BUCK2=1] ci/buck2-example.sh
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
check="$repo/ci/buck2_example_check.py"

if ! command -v buck2 >/dev/null 2>&1; then
  if [[ "${REQUIRE_BUCK2:-}" == 1 ]]; then
    echo "FAIL: ci/buck2-example.sh: REQUIRE_BUCK2=1 but there is no 'buck2' on PATH." >&2
    exit 1
  fi
  {
    echo "SKIPPED: ci/buck2-example.sh: no 'buck2' on PATH."
    echo "SKIPPED: the Buck2 example (examples/buck2) was NOT built or checked."
    echo "SKIPPED: install buck2 (https://buck2.build/docs/getting_started/install/) and run it again."
  } >&2
  exit 0
fi

for tool in cargo python3 timeout; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "FAIL: ci/buck2-example.sh needs '$tool' on PATH" >&2
    exit 1
  fi
done

echo "== buck2: $(command -v buck2) ($(buck2 --version 2>/dev/null || echo 'version unknown'))" >&2

# The example finds the tool on PATH: put this checkout's build first on it.
echo "== building persistent-worker" >&2
(cd "$repo" && cargo build --quiet --bin persistent-worker)
bin_dir="${CARGO_TARGET_DIR:-$repo/target}/debug"
if [[ "$bin_dir" != /* ]]; then
  bin_dir="$repo/$bin_dir"
fi
if [[ ! -x "$bin_dir/persistent-worker" ]]; then
  echo "FAIL: no executable at $bin_dir/persistent-worker after cargo build" >&2
  exit 1
fi
export PATH="$bin_dir:$PATH"

# Every buck2 command is bounded: a hang fails the script instead of CI.
b2_timeout=${BUCK2_EXAMPLE_TIMEOUT:-120}

# Work on a copy, so the checkout's .buckconfig.local and buck-out stay as the
# user left them, and so the buck2 daemon for it is ours (started with the PATH
# above) and can be stopped at the end.
work=$(mktemp -d "${TMPDIR:-/tmp}/buck2-example.XXXXXX")
project="$work/project"
background=()
cleanup() {
  local pid
  for pid in "${background[@]}"; do
    kill -9 "$pid" 2>/dev/null || true
  done
  if [[ -d "$project" ]]; then
    (cd "$project" && timeout 60 buck2 kill >/dev/null 2>&1) || true
  fi
  # Buck2 leaves each worker's directory (socket, stdout, stderr) behind.
  local id
  for id in $(cat "$work"/*/build.stderr 2>/dev/null | sed -n 's/.*Build ID: \([0-9a-f-]*\).*/\1/p'); do
    rm -rf /tmp/buck2_worker/"$id"-*
  done
  rm -rf "$work"
}
trap cleanup EXIT

mkdir "$project"
(
  cd "$repo/examples/buck2"
  tar -cf - \
    --exclude=./buck-out \
    --exclude=./.buckconfig.local \
    --exclude=./.envrc.private \
    .
) | (cd "$project" && tar -xf -)

fail() {
  echo "FAIL: $*" >&2
  exit 1
}

# show FILE TITLE: prints a log file as evidence.
show() {
  echo "---- $2 ----" >&2
  cat "$1" >&2 || true
}

# evidence FILE REGEX TITLE: prints the lines of FILE that REGEX matches,
# once each, without Buck2's timestamps.
evidence() {
  echo "---- $3 ----" >&2
  grep -E "$2" "$1" | sed 's/^\[[^]]*\] //' | awk '!seen[$0]++' >&2 || true
}

# wait_for SECONDS WHAT COMMAND...: until COMMAND succeeds, at most SECONDS.
wait_for() {
  local secs=$1 what=$2
  shift 2
  if ! timeout "$secs" bash -c 'until "$@" >/dev/null 2>&1; do sleep 0.1; done' _ "$@"; then
    fail "no $what within ${secs}s"
  fi
}

# wait_exit SECONDS PID: waits for a background job to end, at most SECONDS;
# sets `status` to its exit status.
wait_exit() {
  if ! timeout "$1" tail --pid="$2" -f /dev/null; then
    kill -9 "$2" 2>/dev/null || true
    fail "process $2 still running after ${1}s"
  fi
  status=0
  wait "$2" || status=$?
}

# use CONFIG: selects .buckconfig.CONFIG for the next builds.
use() {
  printf '<file:.buckconfig.%s>\n' "$1" >"$project/.buckconfig.local"
}

# Buck2 runs at most -j (default: the number of cores) local actions at once,
# worker actions included, whatever a WorkerInfo's concurrency: 4 at once
# need -j 4 on a smaller machine.
jobs=(-j 4)

# build LOGS [BUCK2 BUILD ARGS...]: builds in the project with every action's
# stderr shown; LOGS gets build.stdout, build.stderr, what-ran.jsonl and
# log-show.jsonl. Fails the script if the build fails.
build() {
  local logs=$1
  shift
  mkdir -p "$logs"
  if ! (cd "$project" && timeout -k 10 "$b2_timeout" buck2 build "${jobs[@]}" -v stderr --show-full-output "$@" \
    >"$logs/build.stdout" 2>"$logs/build.stderr"); then
    show "$logs/build.stderr" "buck2 build stderr"
    fail "buck2 build $* failed"
  fi
  logs_of_last "$logs"
}

# logs_of_last LOGS: what Buck2 recorded of the last command.
logs_of_last() {
  (
    cd "$project"
    timeout 60 buck2 log what-ran --show-std-err --format json >"$1/what-ran.jsonl" 2>"$1/what-ran.stderr"
    timeout 60 buck2 log show >"$1/log-show.jsonl" 2>"$1/log-show.stderr"
  )
}

# ran MODE LOGS: the what-ran, stderr and output checks.
ran() {
  if ! python3 "$check" ran "$1" "$2/what-ran.jsonl" "$2/build.stdout" "$2/build.stderr" \
    "$project" "$2/worker" >&2; then
    show "$2/build.stderr" "buck2 build stderr"
    show "$2/what-ran.jsonl" "buck2 log what-ran"
    fail "the actions did not run as expected ($1), see above"
  fi
}

# timing LOGS CHECK-OPTIONS...: the checks on Buck2's action spans.
timing() {
  local logs=$1
  shift
  if ! python3 "$check" timing "$logs/log-show.jsonl" "$@" >&2; then
    fail "Buck2's event log does not show the expected timing, see above"
  fi
}

# scenario CONFIG MODE [BUCK2 BUILD OPTIONS...]: a clean build in CONFIG.
scenario() {
  local config=$1 mode=$2
  shift 2
  echo >&2
  echo "== scenario $config (expect: $mode)" >&2
  use "$config"
  (cd "$project" && timeout 120 buck2 clean >/dev/null 2>&1) || true
  build "$work/$config" : "$@"
  ran "$mode" "$work/$config"
}

scenario no-workers one-shot

# All 4 actions at once: 4 x 1000 ms of work in well under 2000 ms, and an
# instant when Buck2 had all 4 commands in flight.
scenario local-persistent-workers worker
timing "$work/local-persistent-workers" --peak 4 --span-below-ms 2000
first_pid=$(cat "$work/local-persistent-workers/worker.pid")
grep -q -- "--work-ms 1000 --concurrency 4" "$work/local-persistent-workers/worker.command" ||
  fail "unexpected worker command: $(cat "$work/local-persistent-workers/worker.command")"

echo >&2
echo "== new flags, new worker: work_ms 2500 without buck2 clean" >&2
build "$work/work-ms" : -c persistent_worker.work_ms=2500 -c build.cache_silo_key=work-ms-2500
ran worker "$work/work-ms"
pid=$(cat "$work/work-ms/worker.pid")
[[ "$pid" != "$first_pid" ]] || fail "the work_ms 2500 build was served by the earlier worker (pid $pid)"
grep -q -- "--work-ms 2500 " "$work/work-ms/worker.command" ||
  fail "Buck2 did not start the worker with --work-ms 2500: $(cat "$work/work-ms/worker.command")"
echo "worker pid $pid, before it $first_pid" >&2
timing "$work/work-ms" --peak 4 --min-ms 2500 --span-below-ms 5000

echo >&2
echo "== control: the concurrency check fails at concurrency 3" >&2
build "$work/concurrency-3" : -c persistent_worker.concurrency=3 -c build.cache_silo_key=concurrency-3
ran worker "$work/concurrency-3"
echo "the concurrency check of 4 at concurrency 3 (must FAIL):" >&2
if python3 "$check" timing "$work/concurrency-3/log-show.jsonl" --peak 4 --span-below-ms 2000 >&2; then
  fail "the concurrency check passed at concurrency 3: it cannot tell 3 from 4"
fi
echo "(failed as it must: Buck2 let only 3 in at once)" >&2

# The project is a copy: point the bridge at the checkout's Node worker.
node_worker="$repo/testdata/node_worker"
if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 &&
  { [[ -d "$node_worker/node_modules/@bazel/worker" ]] ||
    (cd "$node_worker" && timeout 300 npm ci --no-audit --no-fund >&2); }; then
  export BRIDGE_EXPECT="node worker (pid"
  bridge_child="node $node_worker/worker.js"
  child_pattern="node_worker/worker\\.js"
else
  echo "NOTE: no node/npm: scenario local-bridge runs persistent-worker behind the bridge" >&2
  export BRIDGE_EXPECT="demo: wrote"
  bridge_child="persistent-worker --work-ms 1000"
  child_pattern="--work-ms 1000 --persistent_worker"
fi
scenario local-bridge bridge -c "persistent_worker.bridge=$bridge_child"

# ---------------------------------------------------------------------------
# When a worker fails. A package of the copy only: a worker that logs every
# request (--verbose) and actions that ask for more work than usual, one of
# them with a timeout. examples/buck2/README.md ("What the real Buck2 does
# when a worker fails") describes what these steps show.
mkdir "$project/faults"
cat >"$project/faults/defs.bzl" <<'BZL'
load("@prelude//utils:argfile.bzl", "at_argfile")

def _worker_impl(ctx):
    command = cmd_args("persistent-worker", "--verbose", "--concurrency", str(ctx.attrs.concurrency))
    return [
        DefaultInfo(),
        RunInfo(args = command),
        WorkerInfo(exe = command, concurrency = ctx.attrs.concurrency),
    ]

fault_worker = rule(impl = _worker_impl, attrs = {"concurrency": attrs.int()})

def _slow_impl(ctx):
    out = ctx.actions.declare_output(ctx.label.name)
    argfile = at_argfile(
        actions = ctx.actions,
        name = ctx.label.name + ".args",
        args = cmd_args("--work-ms", str(ctx.attrs.work_ms), out.as_output()),
    )
    tool = ctx.attrs.worker
    ctx.actions.run(
        cmd_args(argfile),
        category = "slow",
        exe = WorkerRunInfo(worker = tool[WorkerInfo], exe = tool[RunInfo].args),
        env = {"CACHE_SILO_KEY": ctx.attrs.cache_silo_key},
        timeout_seconds = ctx.attrs.timeout_seconds,
    )
    return [DefaultInfo(default_output = out)]

slow = rule(impl = _slow_impl, attrs = {
    "cache_silo_key": attrs.string(),
    "timeout_seconds": attrs.option(attrs.int(), default = None),
    "work_ms": attrs.int(),
    "worker": attrs.exec_dep(providers = [WorkerInfo, RunInfo]),
})
BZL
cat >"$project/faults/BUCK" <<'BUCK'
load(":defs.bzl", "fault_worker", "slow")

fault_worker(
    name = "worker",
    concurrency = int(read_root_config("faults", "concurrency", "2")),
)

# 30 s of work, 1 s allowed.
slow(
    name = "timeout",
    cache_silo_key = read_root_config("build", "cache_silo_key", ""),
    timeout_seconds = 1,
    work_ms = 30000,
    worker = ":worker",
)

[
    slow(
        name = "slow-{}".format(i),
        cache_silo_key = read_root_config("build", "cache_silo_key", ""),
        work_ms = int(read_root_config("faults", "work_ms", "30000")),
        worker = ":worker",
    )
    for i in range(2)
]
BUCK

# start_build LOGS [BUCK2 BUILD ARGS...]: a build in the background, its
# pid in `client` (the pid of timeout(1), whose child is the buck2 client).
start_build() {
  local logs=$1
  shift
  mkdir -p "$logs"
  # The workers of the command before may still be running: Buck2 sends
  # them SIGTERM only as this build starts. They are not this build's.
  workers_before=$(python3 "$check" procs "$project" --workers | cut -f1 | paste -sd, -) || true
  # A background job starts with SIGINT ignored: give it back to the client.
  (cd "$project" && exec env --default-signal=INT timeout -k 10 "$b2_timeout" \
    buck2 build "${jobs[@]}" -v stderr "$@" >"$logs/build.stdout" 2>"$logs/build.stderr") &
  client=$!
  background+=("$client")
}

# fault_worker_requests N: waits for the fault worker and N requests in it;
# sets `victim` (its pid) and `worker_log` (its stderr file, where Buck2
# redirects it).
fault_worker_requests() {
  local socket
  local ours=(procs "$project" --workers --match verbose --exclude "$workers_before")
  wait_for 60 "fault worker" python3 "$check" "${ours[@]}"
  read -r victim socket _ < <(python3 "$check" "${ours[@]}")
  worker_log="$(dirname "$socket")/stderr"
  wait_for 60 "$1 request(s) in the worker ($worker_log)" \
    python3 "$check" count "$worker_log" " started:" "$1"
}

use local-persistent-workers

echo >&2
echo "== fault: an action past its timeout_seconds" >&2
logs="$work/timeout"
mkdir -p "$logs"
start=$SECONDS
if (cd "$project" && timeout -k 10 "$b2_timeout" buck2 build -v stderr faults:timeout \
  -c build.cache_silo_key=timeout >"$logs/build.stdout" 2>"$logs/build.stderr"); then
  show "$logs/build.stderr" "buck2 build stderr"
  fail "30 s of work with timeout_seconds = 1 succeeded"
fi
took=$((SECONDS - start))
evidence "$logs/build.stderr" "Action failed|timed out|^demo: " "buck2 build stderr (excerpt)"
# The worker got timeout_s 1 and answered timed_out_after_s, which Buck2
# reports as a timeout; the action's stderr is the worker's answer.
grep -Eq "Command timed out after 1(\.0+)?s" "$logs/build.stderr" ||
  fail "Buck2 did not report the action as timed out after 1 s"
grep -q "demo: stopped before writing" "$logs/build.stderr" ||
  fail "the action's stderr is not the worker's answer to a timeout"
((took < 20)) || fail "the timed-out build took ${took}s: the timeout was not enforced"
echo "(timed out as it must; the build was over in ${took}s)" >&2

echo >&2
echo "== fault: the worker is killed with SIGKILL while an action runs" >&2
logs="$work/killed"
# Concurrency 1 and --keep-going: slow-1 waits for slow-0's slot, so it
# meets the dead worker after slow-0 failed.
start_build "$logs" --keep-going faults:slow-0 faults:slow-1 -c faults.concurrency=1 \
  -c build.cache_silo_key=killed
fault_worker_requests 1
kill -9 "$victim"
killed_at=$SECONDS
echo "killed worker pid $victim" >&2
wait_exit 60 "$client"
took=$((SECONDS - killed_at))
evidence "$logs/build.stderr" "Action failed|Spawning executable" "buck2 build stderr (excerpt)"
((status != 0)) || fail "the build succeeded although its worker was killed"
for t in slow-0 slow-1; do
  grep -q "Action failed: root//faults:$t " "$logs/build.stderr" || fail "root//faults:$t did not fail"
done
# In flight: the call breaks; queued: Buck2 sees the worker gone.
grep -q "Error sending ExecuteCommand to worker" "$logs/build.stderr" ||
  fail "no broken call for the request in flight"
grep -q "Worker exited while running command" "$logs/build.stderr" ||
  fail "the queued action did not fail on the dead worker"
((took < 20)) || fail "the build took ${took}s to fail after the kill"
if python3 "$check" procs "$project" --workers >/dev/null; then
  fail "a worker is running after the build that lost its worker"
fi
echo "(both actions failed ${took}s after the kill, no worker started again)" >&2
build "$work/after-kill" faults:slow-0 faults:slow-1 -c faults.work_ms=100 -c build.cache_silo_key=after-kill
echo "(the next build got a new worker and succeeded)" >&2

echo >&2
echo "== fault: Ctrl-C (SIGINT) to the buck2 client while 2 actions run" >&2
logs="$work/interrupted"
start_build "$logs" faults:slow-0 faults:slow-1 -c faults.work_ms=8000 \
  -c build.cache_silo_key=interrupted
fault_worker_requests 2
python3 "$check" count "$worker_log" " finished:" 1 &&
  fail "a request finished before the interrupt: too slow a machine for this step"
buck2_client=$(pgrep -P "$client" -x buck2 || true)
[[ -n "$buck2_client" ]] || fail "cannot find the buck2 client under pid $client"
kill -INT "$buck2_client"
wait_exit 30 "$client"
((status != 0)) || fail "the interrupted build exited 0"
echo "(the client exited with status $status)" >&2
# Then the daemon: it finishes the worker's requests and stops the worker.
wait_for 60 "end of the worker $victim" bash -c '! python3 "$1" procs "$2" --workers --match verbose' \
  _ "$check" "$project"
show "$worker_log" "worker stderr"
cancelled=$(grep -c "ended by the client" "$worker_log" || true)
finished=$(grep -c "finished: exit code 0$" "$worker_log" || true)
grep -q "persistent-worker: stopped" "$worker_log" || fail "the worker did not stop cleanly"
if ((cancelled == 2)); then
  echo "(the cancel reached the worker: 2 calls ended by the client)" >&2
elif ((finished == 2 && cancelled == 0)); then
  echo "(the cancel did NOT reach the worker: both requests ran to the end, then Buck2 stopped it)" >&2
else
  fail "of 2 requests, $cancelled were cancelled and $finished finished"
fi

echo >&2
echo "== buck2 kill while a worker and the bridge's children run" >&2
logs="$work/killed-daemon"
use local-bridge
start_build "$logs" : faults:slow-0 -c "persistent_worker.bridge=$bridge_child" \
  -c build.cache_silo_key=daemon-killed
fault_worker_requests 1
wait_for 60 "bridge child" python3 "$check" procs "$project" --match "$child_pattern"
python3 "$check" procs "$project" >"$logs/before-kill" || true
show "$logs/before-kill" "processes of the project before buck2 kill"
(cd "$project" && timeout 60 buck2 kill >/dev/null 2>&1) || fail "buck2 kill failed"
wait_exit 60 "$client"
if ! timeout 30 bash -c 'while python3 "$1" procs "$2" >"$3"; do sleep 0.1; done' _ \
  "$check" "$project" "$logs/after-kill"; then
  show "$logs/after-kill" "processes of the project 30 s after buck2 kill"
  fail "buck2 kill left processes of the project behind"
fi
echo "(none left after buck2 kill)" >&2

echo >&2
echo "PASS: examples/buck2 ran one-shot without workers, through one Buck2 persistent worker with 4 actions at once, through a new worker when its flags changed, and through the bridge; Buck2 met a timeout, a killed worker, Ctrl-C and buck2 kill as expected" >&2
