"""Checks for ci/buck2-example.sh, from what a real Buck2 recorded.

    ran MODE WHAT_RAN_JSONL BUILD_STDOUT BUILD_STDERR PROJECT [OUT]
        every demo action ran as MODE says (one-shot, worker, bridge): from
        `buck2 log what-ran`, the build's stderr and the outputs; writes the
        serving worker's pid to OUT.pid and the command Buck2 started it with
        (what-ran's WorkerInit entry) to OUT.command
    timing LOG_SHOW_JSONL [--peak N] [--min-ms MS] [--span-below-ms MS]
        from the action spans of `buck2 log show`: how many demo actions
        were running at one instant (--peak: at least N), each one's run
        time (--min-ms: none shorter), first start to last end
        (--span-below-ms: shorter than MS)
    procs PROJECT [--workers] [--match REGEX] [--exclude PID,PID...]
        lists the processes working for PROJECT (working directory at or
        under it, or PROJECT in the command line), with --workers only the
        Buck2 workers among them (WORKER_SOCKET in their environment), with
        --match only those whose command line REGEX matches, with --exclude
        none of the PIDs listed, as "PID<TAB>WORKER_SOCKET<TAB>COMMAND";
        exit 1 when there is none
    count FILE TEXT N
        exit 0 when FILE holds TEXT at least N times

Exit status 0 when the check passes, 1 with the reasons on stdout.
"""

import json
import os
import re
import sys

TARGETS = ["demo-%d" % i for i in range(4)]


def target_of(identity):
    m = re.match(r"root//:(demo-\d+)(?:\D|$)", identity or "")
    return m.group(1) if m else None


def done(errors, ok_message):
    if errors:
        print("FAIL:")
        for e in errors:
            print("  - " + e)
        sys.exit(1)
    print(ok_message)


def ran(mode, what_ran_path, stdout_path, stderr_path, project, out_prefix=None):
    errors = []
    fail = errors.append
    entries = []
    worker_commands = []
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
            if executor == "WorkerInit":
                command = ((entry.get("reproducer") or {}).get("details") or {}).get("command")
                worker_commands.append(" ".join(command or []))
            stderr = entry.get("std_err") or ""
            entries.append((name, executor, stderr))

    print("what-ran for the demo targets (%s):" % mode)
    for name, executor, stderr in entries:
        first = stderr.splitlines()[0] if stderr else ""
        print("  %-7s %-11s %s" % (name, executor, first))

    seen = {name for name, _, _ in entries}
    for t in TARGETS:
        if t not in seen:
            fail("no what-ran entry for root//:%s" % t)

    pids = set()
    if mode == "one-shot":
        for name, executor, stderr in entries:
            if executor != "Local":
                fail("%s ran on executor %r, expected 'Local'" % (name, executor))
            if "ONE-SHOT START" not in stderr:
                fail("%s stderr lacks ONE-SHOT START: %r" % (name, stderr[:300]))
            if "persistent worker" in stderr:
                fail("%s went through a worker: %r" % (name, stderr[:300]))
    elif mode in ("worker", "bridge"):
        served = set()
        for name, executor, stderr in entries:
            if executor not in ("Worker", "WorkerInit"):
                fail("%s ran on executor %r, expected 'Worker'" % (name, executor))
                continue
            if "ONE-SHOT START" in stderr:
                fail("%s ran one-shot under a worker executor: %r" % (name, stderr[:300]))
            if stderr.startswith("Buck2 persistent worker "):
                served.add(name)
                # "Buck2 persistent worker <hostname> <pid> <cwd>"
                fields = stderr.splitlines()[0].split(" ", 5)
                if len(fields) == 6:
                    pids.add(fields[4])
                    if os.path.realpath(fields[5]) != os.path.realpath(project):
                        fail("%s: worker cwd %r is not the project root %r"
                             % (name, fields[5], project))
                else:
                    fail("%s: cannot read host, pid and cwd from %r"
                         % (name, stderr.splitlines()[0]))
            elif executor == "Worker":
                fail("%s stderr does not start with 'Buck2 persistent worker': %r"
                     % (name, stderr[:300]))
        for t in TARGETS:
            if t not in served:
                fail("root//:%s has no response from the Buck2 persistent worker" % t)
        if len(pids) != 1:
            fail("expected one worker process to serve all demo actions, saw pids %s"
                 % sorted(pids))
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
        fail("build stderr: %d x ONE-SHOT START, %d x Buck2 persistent worker; "
             "expected >= 4 and 0" % (one_shot, buck2_worker))
    if mode in ("worker", "bridge") and (buck2_worker < 4 or one_shot):
        fail("build stderr: %d x Buck2 persistent worker, %d x ONE-SHOT START; "
             "expected >= 4 and 0" % (buck2_worker, one_shot))

    # The outputs: `--show-full-output` prints "<target> <absolute path>".
    outputs = {}
    with open(stdout_path, encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.split(None, 1)
            if len(parts) == 2:
                name = target_of(parts[0])
                if name:
                    outputs[name] = parts[1].strip()
    for t in TARGETS:
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

    for command in worker_commands:
        print("  worker started as: %s" % command)
    if mode in ("worker", "bridge") and len(worker_commands) != 1:
        fail("expected what-ran to show one worker start (WorkerInit), saw %d"
             % len(worker_commands))
    if out_prefix:
        with open(out_prefix + ".pid", "w", encoding="utf-8") as f:
            f.write("".join(p + "\n" for p in sorted(pids)))
        with open(out_prefix + ".command", "w", encoding="utf-8") as f:
            f.write("".join(c + "\n" for c in worker_commands))
    done(errors, "OK (%s): 4 demo actions, outputs correct" % mode)


def action_runs(log_show_path):
    """{target: [(start, end)]}: when each demo action's command ran, as the
    executor stages `Execute` (one-shot) and `WorkerExecute` of Buck2's own
    event log recorded them."""
    actions = {}  # span id -> target of a demo action
    stages = {}  # span id -> (action span id, start)
    ends = {}
    with open(log_show_path, encoding="utf-8") as f:
        for line in f:
            try:
                event = json.loads(line).get("Event")
            except ValueError:
                continue
            if not event:
                continue
            secs, nanos = event["timestamp"]
            ts = secs + nanos / 1e9
            data = event.get("data", {})
            span = event.get("span_id")
            if "SpanStart" in data:
                start = data["SpanStart"].get("data", {})
                if "ActionExecution" in start:
                    a = start["ActionExecution"]
                    if (a.get("name") or {}).get("category") != "demo":
                        continue
                    label = (((a.get("key") or {}).get("owner") or {})
                             .get("TargetLabel") or {}).get("label") or {}
                    if label.get("name") in TARGETS:
                        actions[span] = label["name"]
                elif "ExecutorStage" in start:
                    local = (start["ExecutorStage"].get("stage") or {}).get("Local") or {}
                    kind = next(iter(local.get("stage") or {}), None)
                    if kind in ("Execute", "WorkerExecute"):
                        stages[span] = (event.get("parent_id"), ts)
            elif "SpanEnd" in data:
                ends[span] = ts
    runs = {}
    for span, (parent, start) in stages.items():
        if parent in actions and span in ends:
            runs.setdefault(actions[parent], []).append((start, ends[span]))
    return runs


def timing(log_show_path, peak=None, min_ms=None, span_below_ms=None):
    errors = []
    runs = action_runs(log_show_path)
    intervals = []
    for t in TARGETS:
        got = runs.get(t, [])
        if len(got) != 1:
            errors.append("%d command span(s) for root//:%s in the event log, expected 1"
                          % (len(got), t))
        intervals += [(t, s, e) for s, e in got]
    if not intervals:
        done(errors, "")
    origin = min(s for _, s, _ in intervals)
    print("demo commands as Buck2 logged them (ms from the first start):")
    for t, s, e in sorted(intervals, key=lambda i: i[1]):
        print("  %-7s %7.0f .. %7.0f  (%5.0f ms)"
              % (t, (s - origin) * 1e3, (e - origin) * 1e3, (e - s) * 1e3))
    # The most commands running at one instant: at equal times an end
    # comes before a start, so touching spans do not count as overlapping.
    points = sorted([(s, 1) for _, s, _ in intervals] + [(e, -1) for _, _, e in intervals])
    running = most = 0
    for _, step in sorted(points, key=lambda p: (p[0], p[1])):
        running += step
        most = max(most, running)
    span_ms = (max(e for _, _, e in intervals) - origin) * 1e3
    print("  at most %d running at once; first start to last end %.0f ms" % (most, span_ms))
    if peak is not None and most < peak:
        errors.append("at most %d demo commands ran at once, expected %d" % (most, peak))
    if min_ms is not None:
        for t, s, e in intervals:
            if (e - s) * 1e3 < min_ms:
                errors.append("root//:%s ran %.0f ms, expected at least %d ms"
                              % (t, (e - s) * 1e3, min_ms))
    if span_below_ms is not None and span_ms >= span_below_ms:
        errors.append("the demo commands took %.0f ms from first start to last end, "
                      "expected less than %d ms" % (span_ms, span_below_ms))
    done(errors, "OK: timing as expected")


def procs(project, workers_only=False, match=None, exclude=()):
    project = os.path.realpath(project)
    # This process and the ones that started it (timeout, the script) may
    # name the project in their command lines: they are not what is sought.
    own = set()
    pid = os.getpid()
    while pid > 1 and pid not in own:
        own.add(pid)
        try:
            with open("/proc/%d/stat" % pid, encoding="utf-8") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    found = []
    for pid in sorted((p for p in os.listdir("/proc") if p.isdigit()), key=int):
        if int(pid) in own or int(pid) in exclude:
            continue
        try:
            with open("/proc/%s/stat" % pid, encoding="utf-8") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    # Exited, not yet reaped by its parent (Buck2's
                    # forkserver reaps stopped workers only when it exits).
                    continue
            cwd = os.readlink("/proc/%s/cwd" % pid)
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
            with open("/proc/%s/environ" % pid, "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:
            continue  # gone meanwhile, or not ours to read
        mine = cwd == project or cwd.startswith(project + "/") or project in cmdline
        if not mine:
            continue
        socket = ""
        for entry in environ:
            if entry.startswith(b"WORKER_SOCKET="):
                socket = entry[len(b"WORKER_SOCKET="):].decode("utf-8", "replace")
        if workers_only and not socket:
            continue
        if match is not None and not re.search(match, cmdline):
            continue
        found.append("%s\t%s\t%s" % (pid, socket or "-", cmdline[:300]))
    for line in found:
        print(line)
    sys.exit(0 if found else 1)


def count(path, text, n):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            have = f.read().count(text)
    except OSError:
        have = 0
    sys.exit(0 if have >= n else 1)


def main(argv):
    cmd, args = argv[1], argv[2:]
    if cmd == "ran":
        ran(*args)
    elif cmd == "timing":
        opts = {"--peak": None, "--min-ms": None, "--span-below-ms": None}
        path = args[0]
        rest = args[1:]
        while rest:
            opts[rest[0]] = int(rest[1])
            rest = rest[2:]
        timing(path, opts["--peak"], opts["--min-ms"], opts["--span-below-ms"])
    elif cmd == "procs":
        rest = args[1:]
        match = rest[rest.index("--match") + 1] if "--match" in rest else None
        exclude = rest[rest.index("--exclude") + 1] if "--exclude" in rest else ""
        procs(args[0], workers_only="--workers" in rest, match=match,
              exclude={int(p) for p in exclude.split(",") if p})
    elif cmd == "count":
        count(args[0], args[1], int(args[2]))
    else:
        sys.exit("unknown command %r" % cmd)


if __name__ == "__main__":
    main(sys.argv)
