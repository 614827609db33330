#!/usr/bin/env python3
"""The TypeScript benchmark's helpers (ci/bench-tsc.sh): the generated
project, the checks that a build really compiled, and the report.

usage: bench_tsc.py generate DIR MODULES
       bench_tsc.py edit DIR MARK         one-file edit: module EDITED's body
       bench_tsc.py stamp DIR             mark "before this build"
       bench_tsc.py check DIR PHASE [MARK]  the build since the stamp compiled
       bench_tsc.py run DIR CMD...        wall and CPU ms of CMD run in DIR
       bench_tsc.py cpu ENTRY             CPU ms so far of the worker running
                                          ENTRY, and of its bridge if any
       bench_tsc.py report RAW.tsv OUT.json META.json

The project is MODULES modules src/mNNN.ts, each importing the module
before it and the one at half its number, so that the import graph is deep
and wide, with an interface, a generic class and functions that use the
imported ones: the type checker has real work in every file. The edit
changes a string inside a function body of the middle module (its
declarations, and so its dependents' types, stay the same), as a one-line
fix would.
"""

import json
import os
import resource
import statistics
import subprocess
import sys
import time

# The check's outputs: the tsconfig's outDir, and what the edit changes.
OUT = "out"
ORIGINAL_MARK = "v0"


def module_name(i):
    return f"m{i:03d}"


def edited(modules):
    return modules // 2


def module_source(i, version):
    deps = sorted({i - 1, i // 2} - {i}) if i > 0 else []
    name = module_name(i)
    lines = [f"// Generated module {i}: see ci/bench_tsc.py."]
    for d in deps:
        dn = module_name(d)
        lines.append(
            f'import {{ Shape{d}, Registry{d}, make{d}, area{d} }} from "./{dn}";'
        )
    uses = " + ".join(f"area{d}(make{d}(size + {k}))" for k, d in enumerate(deps)) or "0"
    nested = (
        " | ".join(f"Shape{d}" for d in deps) if deps else f"Shape{i}"
    )
    lines += [
        "",
        f"export interface Shape{i} {{",
        f'  readonly kind: "s{i}";',
        "  readonly size: number;",
        "  readonly tags: ReadonlyArray<string>;",
        f"  readonly parent?: {nested};",
        "}",
        "",
        f"export type Pair{i} = readonly [Shape{i}, Shape{i} | undefined];",
        "",
        f"export class Registry{i}<T extends {{ readonly size: number }}> {{",
        "  private readonly items = new Map<string, T>();",
        "",
        "  add(key: string, item: T): this {",
        "    this.items.set(key, item);",
        "    return this;",
        "  }",
        "",
        "  total(): number {",
        "    let sum = 0;",
        "    for (const item of this.items.values()) {",
        "      sum += item.size;",
        "    }",
        "    return sum;",
        "  }",
        "",
        "  find(match: (item: T) => boolean): T | undefined {",
        "    for (const item of this.items.values()) {",
        "      if (match(item)) {",
        "        return item;",
        "      }",
        "    }",
        "    return undefined;",
        "  }",
        "",
        "  map<U>(f: (item: T, key: string) => U): U[] {",
        "    return [...this.items.entries()].map(([key, item]) => f(item, key));",
        "  }",
        "}",
        "",
        f"export function make{i}(size: number, tags: string[] = []): Shape{i} {{",
        f'  return {{ kind: "s{i}", size, tags }};',
        "}",
        "",
        f"export function area{i}(shape: Shape{i}): number {{",
        "  const size = shape.size;",
        f"  return size * size + ({uses}) % 97;",
        "}",
        "",
        f"export function version{i}(): string {{",
        f'  return "{name}:{version}";',
        "}",
        "",
        f"export function describe{i}(pair: Pair{i}): string {{",
        "  const [first, second] = pair;",
        f"  const registry = new Registry{i}<Shape{i}>().add(\"first\", first);",
        "  if (second !== undefined) {",
        '    registry.add("second", second);',
        "  }",
        f"  return `${{version{i}()}}: ${{registry.total()}} ${{registry.map((s, k) => k + s.tags.join()).join()}}`;",
        "}",
    ]
    for d in deps:
        lines += [
            "",
            f"export function lift{i}from{d}(inner: Shape{d}): Shape{i} {{",
            f"  const registry = new Registry{d}<Shape{d}>().add(\"inner\", inner);",
            f"  return {{ ...make{i}(registry.total(), [...inner.tags]), parent: inner }};",
            "}",
        ]
    return "\n".join(lines) + "\n"


def generate(directory, modules):
    src = os.path.join(directory, "src")
    os.makedirs(src, exist_ok=True)
    for i in range(modules):
        with open(os.path.join(src, module_name(i) + ".ts"), "w") as f:
            f.write(module_source(i, ORIGINAL_MARK))
    tsconfig = {
        "compilerOptions": {
            "target": "es2019",
            "module": "commonjs",
            "strict": True,
            "declaration": True,
            "rootDir": "src",
            "outDir": OUT,
        },
        "include": ["src"],
    }
    with open(os.path.join(directory, "tsconfig.json"), "w") as f:
        json.dump(tsconfig, f, indent=2)
    with open(os.path.join(directory, "modules"), "w") as f:
        f.write(f"{modules}\n")


def modules_of(directory):
    with open(os.path.join(directory, "modules")) as f:
        return int(f.read())


def edit(directory, mark):
    modules = modules_of(directory)
    i = edited(modules)
    with open(os.path.join(directory, "src", module_name(i) + ".ts"), "w") as f:
        f.write(module_source(i, mark))


def stamp(directory):
    path = os.path.join(directory, "stamp")
    with open(path, "w") as f:
        f.write("")
    # A build whose writes land within the file system's timestamp
    # granularity of the stamp would look unwritten; nanosecond ext4 and
    # tmpfs make this moot, but the stamp is backdated a little anyway.
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns - 1_000_000, st.st_mtime_ns - 1_000_000))


def check(directory, phase, mark):
    """Fails unless the build since the stamp compiled: every module's .js
    is there, and for an edit the edited module's .js has the new text.
    Prints how many .js files the build (re)wrote."""
    modules = modules_of(directory)
    since = os.stat(os.path.join(directory, "stamp")).st_mtime_ns
    written = 0
    for i in range(modules):
        path = os.path.join(directory, OUT, module_name(i) + ".js")
        try:
            st = os.stat(path)
        except FileNotFoundError:
            sys.exit(f"bench-tsc: {phase}: {path} is missing: the build did not compile")
        if st.st_mtime_ns >= since:
            written += 1
    if phase == "first" and written != modules:
        sys.exit(f"bench-tsc: first build wrote {written} of {modules} .js files")
    if phase == "edit":
        path = os.path.join(directory, OUT, module_name(edited(modules)) + ".js")
        with open(path) as f:
            text = f.read()
        if f'"{module_name(edited(modules))}:{mark}"' not in text:
            sys.exit(
                f"bench-tsc: edit build: {path} does not have the edit ({mark}): "
                "the worker compiled the old text"
            )
    print(written)


def run(directory, command):
    """Prints the wall time and the CPU time (user + system, the command
    and its children) of one cold build, in ms."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    status = subprocess.run(command, cwd=directory, stdout=sys.stderr, timeout=600).returncode
    wall = (time.monotonic() - start) * 1000
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if status != 0:
        sys.exit(f"bench-tsc: {' '.join(command)} exited with {status}")
    cpu = (after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) * 1000
    print(f"{wall:.1f} {cpu:.0f}")


def cpu_ms(pid):
    """User + system CPU of a process (all its threads) so far, in ms."""
    with open(f"/proc/{pid}/stat") as f:
        # The command name may hold spaces and parentheses: split after it.
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime
    return ticks * 1000 // os.sysconf("SC_CLK_TCK"), int(fields[1])  # ppid


def worker_cpu(entry):
    """Prints the CPU ms so far of the one process running ENTRY with
    --persistent_worker, and of its parent when that is the bridge ('-'
    when not): sampled before each request, the differences are each
    build's CPU."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if entry.encode() in argv and b"--persistent_worker" in argv:
            found.append(int(pid))
    if len(found) != 1:
        sys.exit(f"bench-tsc: expected one worker running {entry}, found {found}")
    node, parent = cpu_ms(found[0])
    bridge = "-"
    try:
        with open(f"/proc/{parent}/comm") as f:
            if f.read().strip().startswith("persistent-work"):
                bridge = str(cpu_ms(parent)[0])
    except OSError:
        pass
    print(f"{node} {bridge}")


WAYS = ["cold", "bridge", "bazel"]
PHASES = ["first", "unchanged", "edit"]
NAMES = {
    "cold": "cold tsc process per build",
    "bridge": "worker via bridge (buck2)",
    "bazel": "worker direct (bazel)",
}


def summarize(rows, figure):
    """Median and (min, max) over the rounds, per way and phase."""
    medians, spread = {}, {}
    for way in WAYS:
        for phase in PHASES:
            values = [figure(r) for r in rows if r["way"] == way and r["phase"] == phase]
            values = [v for v in values if v is not None]
            if values:
                medians.setdefault(way, {})[phase] = round(statistics.median(values), 1)
                spread.setdefault(way, {})[phase] = [min(values), max(values)]
    return medians, spread


def table(title, medians, spread):
    print(f"\n{title}")
    print(f"{'':30} {'first build':>22} {'unchanged rebuild':>22} {'one-file edit':>22}")
    for way in WAYS:
        if way not in medians:
            continue
        cells = []
        for phase in PHASES:
            m = medians[way].get(phase)
            lo, hi = spread[way].get(phase, [0, 0])
            cells.append(f"{m:.0f} ({lo:.0f}-{hi:.0f})" if m is not None else "-")
        print(f"{NAMES[way]:30} " + " ".join(f"{c:>22}" for c in cells))


def ratios_to_cold(medians):
    ratios = {}
    for way in ("bridge", "bazel"):
        for phase in PHASES:
            cold = medians.get("cold", {}).get(phase)
            warm = medians.get(way, {}).get(phase)
            if cold and warm is not None:
                ratios.setdefault(way, {})[phase] = round(warm / cold, 3)
    return ratios


def report(raw_path, out_path, meta_path):
    """RAW.tsv lines: round, way, phase, wall ms, .js files written, CPU ms
    of the compiler (the tsc process, or the worker during the build), CPU
    ms of the bridge during the build ('-' when there is none)."""
    rows = []
    with open(raw_path) as f:
        for line in f:
            rnd, way, phase, ms, written, cpu, bridge_cpu = line.split()
            rows.append(
                {
                    "round": int(rnd),
                    "way": way,
                    "phase": phase,
                    "wall_ms": float(ms),
                    "js_written": int(written),
                    "cpu_ms": int(cpu),
                    "bridge_cpu_ms": None if bridge_cpu == "-" else int(bridge_cpu),
                }
            )
    with open(meta_path) as f:
        meta = json.load(f)
    wall, wall_spread = summarize(rows, lambda r: r["wall_ms"])
    cpu, cpu_spread = summarize(rows, lambda r: r["cpu_ms"])
    bridge_cpu, bridge_cpu_spread = summarize(rows, lambda r: r["bridge_cpu_ms"])
    ratios = ratios_to_cold(wall)
    cpu_ratios = ratios_to_cold(cpu)
    bridge_share = {
        phase: round(wall["bridge"][phase] - wall["bazel"][phase], 1)
        for phase in PHASES
        if phase in wall.get("bridge", {}) and phase in wall.get("bazel", {})
    }
    result = dict(meta)
    result.update(
        {
            "unit": "ms",
            "wall_median": wall,
            "wall_min_max": wall_spread,
            "wall_warm_over_cold": ratios,
            "bridge_minus_bazel_wall_ms": bridge_share,
            "cpu_median": cpu,
            "cpu_min_max": cpu_spread,
            "cpu_warm_over_cold": cpu_ratios,
            "bridge_process_cpu_median": bridge_cpu.get("bridge", {}),
            "rounds": rows,
        }
    )
    with open(out_path, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")

    print(
        f"\n{meta['modules']} modules, {meta['rounds_run']} rounds, {meta['nproc']} cores "
        f"(load average {meta['loadavg_before']} before, {meta['loadavg_after']} after), "
        f"node {meta['node']}, tsc {meta['tsc']}, {meta['profile']} build"
    )
    table("wall ms, median (min-max)", wall, wall_spread)
    for way in ("bridge", "bazel"):
        cells = [f"{ratios.get(way, {}).get(p, float('nan')):.2f}" for p in PHASES]
        print(f"{way + ' / cold':30} " + " ".join(f"{c:>22}" for c in cells))
    cells = [f"{bridge_share.get(p, float('nan')):+.0f}" for p in PHASES]
    print(f"{'bridge - bazel':30} " + " ".join(f"{c:>22}" for c in cells))
    table("compiler CPU ms (user + system), median (min-max)", cpu, cpu_spread)
    for way in ("bridge", "bazel"):
        cells = [f"{cpu_ratios.get(way, {}).get(p, float('nan')):.2f}" for p in PHASES]
        print(f"{way + ' / cold':30} " + " ".join(f"{c:>22}" for c in cells))
    if "bridge" in bridge_cpu:
        cells = []
        for phase in PHASES:
            lo, hi = bridge_cpu_spread["bridge"][phase]
            cells.append(f"{bridge_cpu['bridge'][phase]:.0f} ({lo}-{hi})")
        print(f"{'bridge process CPU':30} " + " ".join(f"{c:>22}" for c in cells))
    print(f"\nwrote {out_path}")


def main(argv):
    if len(argv) >= 3 and argv[0] == "generate":
        generate(argv[1], int(argv[2]))
    elif len(argv) == 3 and argv[0] == "edit":
        edit(argv[1], argv[2])
    elif len(argv) == 2 and argv[0] == "stamp":
        stamp(argv[1])
    elif len(argv) in (3, 4) and argv[0] == "check":
        check(argv[1], argv[2], argv[3] if len(argv) == 4 else None)
    elif len(argv) >= 3 and argv[0] == "run":
        run(argv[1], argv[2:])
    elif len(argv) == 2 and argv[0] == "cpu":
        worker_cpu(argv[1])
    elif len(argv) == 4 and argv[0] == "report":
        report(argv[1], argv[2], argv[3])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
