#!/usr/bin/env bash
# Builds examples/buck2 with a real buck2 in the three local scenarios and checks
# that the demo actions ran
#   1. no-workers:               locally, one-shot   (stderr has ONE-SHOT START)
#   2. local-persistent-workers: through one Buck2 persistent worker process
#                                (stderr starts with "Buck2 persistent worker")
#   3. local-bridge:             through `persistent-worker --bridge` in front of
#                                the Node @bazel/worker program in testdata/
#                                (or `persistent-worker` itself without npm)
# from `buck2 log what-ran`, from the build's own stderr and from the outputs.
# Any mismatch fails the script with the evidence printed.
#
# Without a `buck2` on PATH it says that it skipped, and why, and exits 0.
# The remote (BuildBuddy) scenarios need credentials and an image: they are
# described in examples/buck2/README.md and not run here.
#
# Usage: ci/buck2-example.sh
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)

if ! command -v buck2 >/dev/null 2>&1; then
  {
    echo "SKIPPED: ci/buck2-example.sh: no 'buck2' on PATH."
    echo "SKIPPED: the Buck2 example (examples/buck2) was NOT built or checked."
    echo "SKIPPED: install buck2 (https://buck2.build/docs/getting_started/install/) and run it again."
  } >&2
  exit 0
fi

for tool in cargo python3; do
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

# Work on a copy, so the checkout's .buckconfig.local and buck-out stay as the
# user left them, and so the buck2 daemon for it is ours (started with the PATH
# above) and can be stopped at the end.
work=$(mktemp -d "${TMPDIR:-/tmp}/buck2-example.XXXXXX")
project="$work/project"
cleanup() {
  if [[ -d "$project" ]]; then
    (cd "$project" && buck2 kill >/dev/null 2>&1) || true
  fi
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

# check.py MODE WHAT_RAN_JSONL BUILD_STDOUT BUILD_STDERR PROJECT_DIR
cat >"$work/check.py" <<'PY'
import json
import os
import re
import sys

mode, what_ran_path, stdout_path, stderr_path, project = sys.argv[1:6]
targets = ["demo-%d" % i for i in range(4)]
errors = []


def fail(msg):
    errors.append(msg)


def target_of(identity):
    m = re.match(r"root//:(demo-\d+)(?:\D|$)", identity or "")
    return m.group(1) if m else None


entries = []
with open(what_ran_path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
        line = line.strip()
        if not line:
            continue
        try:
            entry = json.loads(line)
        except ValueError as e:
            fail("what-ran line %d is not JSON (%s): %r" % (n, e, line[:200]))
            continue
        name = target_of(entry.get("identity"))
        if name is None:
            continue
        executor = (entry.get("reproducer") or {}).get("executor")
        stderr = entry.get("std_err") or ""
        entries.append((name, executor, stderr))

print("what-ran for the demo targets (%s):" % mode)
for name, executor, stderr in entries:
    first = stderr.splitlines()[0] if stderr else ""
    print("  %-7s %-11s %s" % (name, executor, first))

seen = {name for name, _, _ in entries}
for t in targets:
    if t not in seen:
        fail("no what-ran entry for root//:%s" % t)

if mode == "one-shot":
    for name, executor, stderr in entries:
        if executor != "Local":
            fail("%s ran on executor %r, expected 'Local'" % (name, executor))
        if "ONE-SHOT START" not in stderr:
            fail("%s stderr lacks ONE-SHOT START: %r" % (name, stderr[:300]))
        if "persistent worker" in stderr:
            fail("%s went through a worker: %r" % (name, stderr[:300]))
elif mode in ("worker", "bridge"):
    served = {}
    pids = set()
    for name, executor, stderr in entries:
        if executor not in ("Worker", "WorkerInit"):
            fail("%s ran on executor %r, expected 'Worker'" % (name, executor))
            continue
        if "ONE-SHOT START" in stderr:
            fail("%s ran one-shot under a worker executor: %r" % (name, stderr[:300]))
        if stderr.startswith("Buck2 persistent worker "):
            served[name] = True
            # "Buck2 persistent worker <hostname> <pid> <cwd>"
            fields = stderr.splitlines()[0].split(" ", 5)
            if len(fields) == 6:
                pids.add(fields[4])
                cwd = fields[5]
                if os.path.realpath(cwd) != os.path.realpath(project):
                    fail("%s: worker cwd %r is not the project root %r" % (name, cwd, project))
            else:
                fail("%s: cannot read host, pid and cwd from %r" % (name, stderr.splitlines()[0]))
        elif executor == "Worker":
            fail("%s stderr does not start with 'Buck2 persistent worker': %r" % (name, stderr[:300]))
    for t in targets:
        if t not in served:
            fail("root//:%s has no response from the Buck2 persistent worker" % t)
    if len(pids) != 1:
        fail("expected one worker process to serve all demo actions, saw pids %s" % sorted(pids))
else:
    fail("unknown mode %r" % mode)
if mode == "bridge":
    # What the child behind the bridge writes for each request.
    expect = os.environ["BRIDGE_EXPECT"]
    for name, executor, stderr in entries:
        if executor == "Worker" and expect not in stderr:
            fail("%s: no %r from the bridge's child in %r" % (name, expect, stderr[:300]))

# The build's stderr (-v stderr shows every action's stderr).
with open(stderr_path, encoding="utf-8", errors="replace") as f:
    build_stderr = f.read()
one_shot = build_stderr.count("ONE-SHOT START")
buck2_worker = build_stderr.count("Buck2 persistent worker ")
if mode == "one-shot" and (one_shot < 4 or buck2_worker):
    fail("build stderr: %d x ONE-SHOT START, %d x Buck2 persistent worker; expected >= 4 and 0"
         % (one_shot, buck2_worker))
if mode in ("worker", "bridge") and (buck2_worker < 4 or one_shot):
    fail("build stderr: %d x Buck2 persistent worker, %d x ONE-SHOT START; expected >= 4 and 0"
         % (buck2_worker, one_shot))

# The outputs: `--show-full-output` prints "<target> <absolute path>".
outputs = {}
with open(stdout_path, encoding="utf-8", errors="replace") as f:
    for line in f:
        parts = line.split(None, 1)
        if len(parts) == 2:
            name = target_of(parts[0])
            if name:
                outputs[name] = parts[1].strip()
for t in targets:
    path = outputs.get(t)
    if path is None:
        fail("no output path reported for root//:%s" % t)
        continue
    try:
        with open(path, encoding="utf-8") as f:
            content = f.read()
    except OSError as e:
        fail("cannot read output of root//:%s: %s" % (t, e))
        continue
    if content != t + "\n":
        fail("output of root//:%s is %r, expected %r" % (t, content, t + "\n"))

if errors:
    print("FAIL (%s):" % mode)
    for e in errors:
        print("  - " + e)
    sys.exit(1)
print("OK (%s): 4 demo actions, outputs correct" % mode)
PY

# scenario CONFIG MODE [BUCK2 BUILD OPTIONS...]
scenario() {
  local config=$1 mode=$2
  shift 2
  local logs="$work/$config"
  mkdir -p "$logs"
  echo >&2
  echo "== scenario $config (expect: $mode)" >&2
  (
    cd "$project"
    printf '<file:.buckconfig.%s>\n' "$config" >.buckconfig.local
    buck2 clean >/dev/null 2>&1 || true
    if ! buck2 build : -v stderr --show-full-output "$@" \
      >"$logs/build.stdout" 2>"$logs/build.stderr"; then
      echo "FAIL: buck2 build failed in scenario $config; its stderr:" >&2
      cat "$logs/build.stderr" >&2
      exit 1
    fi
    buck2 log what-ran --show-std-err --format json >"$logs/what-ran.jsonl"
  )
  if ! python3 "$work/check.py" "$mode" "$logs/what-ran.jsonl" \
    "$logs/build.stdout" "$logs/build.stderr" "$project" >&2; then
    echo "FAIL: scenario $config: the actions did not run as expected ($mode)." >&2
    echo "---- buck2 build stderr ----" >&2
    cat "$logs/build.stderr" >&2
    echo "---- buck2 log what-ran ----" >&2
    cat "$logs/what-ran.jsonl" >&2
    exit 1
  fi
}

scenario no-workers one-shot
scenario local-persistent-workers worker

# The project is a copy: point the bridge at the checkout's Node worker.
node_worker="$repo/testdata/node_worker"
if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 &&
  { [[ -d "$node_worker/node_modules/@bazel/worker" ]] ||
    (cd "$node_worker" && npm ci --no-audit --no-fund >&2); }; then
  export BRIDGE_EXPECT="node worker (pid"
  scenario local-bridge bridge -c "persistent_worker.bridge=node $node_worker/worker.js"
else
  echo "NOTE: no node/npm: scenario local-bridge runs persistent-worker behind the bridge" >&2
  export BRIDGE_EXPECT="demo: wrote"
  scenario local-bridge bridge -c "persistent_worker.bridge=persistent-worker --work-ms 1000"
fi

echo >&2
echo "PASS: examples/buck2 ran one-shot without workers, through the Buck2 persistent worker with them, and through the bridge" >&2
