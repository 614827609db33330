#!/usr/bin/env python3
"""Turns the raw figures of ci/bench.sh into one table and results.json.

usage: bench_report.py ROWS.tsv RESULTS.json MACHINE-NOTE

ROWS.tsv has one line per measured row: name, floor row ('-' for none),
kind (latency, startup, memory, size:SECTION:BYTES, copy:pipe, copy:socket), the JSON file that
worker-client (or bench_spawn, bench_pipe_copy) wrote for it, and a file with
the run's CPU time ("USER SYSTEM WALL" seconds, client and worker together)
or '-'. A row measured in several rounds has a line per round; its figures
are the medians of the rounds. A row's ratio to its floor is computed in each
round (the row and its floor ran in the same round) and the median of those
ratios is reported, for p50 and for p99.
"""

import json
import os
import statistics
import sys

MIB = 1 << 20


def load(path):
    with open(path) as f:
        return json.load(f)


def median(raws, figure):
    return statistics.median(figure(raw) for raw in raws)


def fit_slope(points):
    """Least-squares slope of (x, y) points."""
    n = len(points)
    if n < 2:
        return None
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    if var == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in points) / var


def main():
    rows_tsv, results_path, machine = sys.argv[1], sys.argv[2], sys.argv[3]
    rows = []
    by_name = {}
    sizes = {}
    memory = []
    rounds = {}
    copy_points = {"pipe": [], "socket": []}
    with open(rows_tsv) as f:
        for line in f:
            if line.strip():
                name, floor, kind, path, cpu = line.rstrip("\n").split("\t")
                raw = load(path)
                if cpu != "-":
                    with open(cpu) as times:
                        user, system, wall = (float(x) for x in times.read().split()[-3:])
                    raw["cpu_s"], raw["wall_s"] = user + system, wall
                if kind.startswith("copy:"):
                    copy_points[kind.split(":", 1)[1]].extend(tuple(p) for p in raw["points"])
                    continue
                rounds.setdefault((name, floor, kind), []).append(raw)
    raws_by_name = {name: raws for (name, _, _), raws in rounds.items()}
    for (name, floor, kind), raws in rounds.items():
        raw = raws[0]
        row = {
            "row": name,
            "p50_us": None,
            "p99_us": None,
            "p999_us": None,
            "requests_per_s": None,
        }
        if kind == "startup":
            row["p50_us"] = median(raws, lambda r: r["startup_median_ms"] * 1000)
            row["runs"] = raw["startup_runs"]
        elif kind != "memory":
            row["p50_us"] = median(raws, lambda r: r["latency_ms"]["p50"] * 1000)
            row["p99_us"] = median(raws, lambda r: r["latency_ms"]["p99"] * 1000)
            # Indexed, not .get(): a figure the client did not write is an
            # error in the report, never a zero in the table.
            row["p999_us"] = median(raws, lambda r: r["latency_ms"]["p999"] * 1000)
            # Every round's tail, the worst included: a median alone would
            # hide the round that met a scheduler tick.
            row["p99_us_rounds"] = [r["latency_ms"]["p99"] * 1000 for r in raws]
            row["requests_per_s"] = median(raws, lambda r: r["throughput_per_s"])
            row["requests"] = raw["requests"]
            if all("cpu_s" in r for r in raws):
                # Start-up and the warm-up request are in these too: small
                # beside thousands of requests, not at a few dozen.
                row["cpu_us_per_request"] = median(raws, lambda r: r["cpu_s"] * 1e6 / r["requests"])
                row["cores_busy"] = median(raws, lambda r: r["cpu_s"] / r["wall_s"])
        if len(raws) > 1:
            row["rounds"] = len(raws)
        if floor != "-":
            row["floor"] = floor
        if kind.startswith("size:"):
            _, section, size = kind.split(":")
            row["size_bytes"] = int(size)
            # Every round's point: the slope is fitted from all of them.
            for r in raws:
                sizes.setdefault(section, []).append(
                    (int(size) / MIB, r["latency_ms"]["p50"] * 1000)
                )
        mem = raw.get("memory_kib")
        if kind == "memory" and mem:
            memory.append((name, raw, mem))
        elif mem:
            row["peak_rss_kib"] = mem["peak_rss"]
        if kind != "memory":
            rows.append(row)
            by_name[name] = row

    # Memory: idle from the shortest run of each mode, then after each count.
    seen_idle = set()
    for name, raw, mem in memory:
        mode = raw["mode"]
        if mode not in seen_idle:
            seen_idle.add(mode)
            rows.append(memory_row(f"memory {mode} idle", mem["idle_rss"], mem["idle_anon"]))
        rows.append(memory_row(name, mem["after_rss"], mem["after_anon"]))
    for mode in ("bazel", "buck2"):
        big = by_name.get(f"size {mode} request 16384 KiB")
        if big and "peak_rss_kib" in big:
            peak = memory_row(f"memory {mode} peak with a 16 MiB request", None, None)
            peak["peak_rss_kib"] = big["peak_rss_kib"]
            rows.append(peak)

    # Size scaling: fitted cost per MiB, against a real copy through the same
    # transport: the same bytes written into a pipe (Bazel) or a Unix socket
    # (Buck2) and read out (bench_pipe_copy), fitted from every round's points.
    slopes = {section: fit_slope(points) for section, points in sizes.items()}
    one_way = {}
    for transport, points in copy_points.items():
        one_way[transport] = fit_slope(points)
        if one_way[transport]:
            row = cost_row(f"{transport} copy cost per MiB", one_way[transport], None)
            row["points"] = len(points)
            rows.append(row)
    echo = slopes.get("floor pipe")
    if echo:
        rows.append(cost_row("floor pipe echo cost per MiB", echo, None))
    grpc = slopes.get("floor grpc")
    if grpc:
        rows.append(cost_row("floor grpc echo cost per MiB", grpc, None))
    for section in ("bazel request", "bazel response", "buck2 request", "buck2 response"):
        if slopes.get(section) is not None:
            transport = "socket" if section.startswith("buck2") else "pipe"
            rows.append(cost_row(f"{section} cost per MiB", slopes[section], one_way.get(transport),
                                 f"{transport} copy cost per MiB"))

    for row in rows:
        floor = by_name.get(row.get("floor", ""))
        if not (floor and row["p50_us"] and floor["p50_us"]):
            continue
        mine, theirs = raws_by_name.get(row["row"]), raws_by_name.get(floor["row"])
        if "runs" in row:
            # Start-up: medians of many starts, one figure each. Its "rate"
            # is starts per time, so that the floor check below reads the
            # same: the floor (a bare server) should start no slower. (These
            # raws carry their one request's latency too, which ratios once
            # used by mistake: a start-up 1.27x its floor's showed as 0.90.)
            row["ratio_to_floor"] = row["p50_us"] / floor["p50_us"]
            row["throughput_to_floor"] = floor["p50_us"] / row["p50_us"]
        elif mine and theirs and len(mine) == len(theirs) and "latency_ms" in mine[0]:
            # Round by round: the row and its floor met the same noise.
            def per_round(figure):
                return [figure(a) / figure(b) for a, b in zip(mine, theirs) if figure(b)]
            p50s = per_round(lambda r: r["latency_ms"]["p50"])
            p99s = per_round(lambda r: r["latency_ms"]["p99"])
            rps = per_round(lambda r: r["throughput_per_s"])
            row["ratio_to_floor_rounds"] = p50s
            row["ratio_to_floor"] = statistics.median(p50s)
            row["p99_ratio_to_floor"] = statistics.median(p99s)
            row["throughput_to_floor"] = statistics.median(rps)
        else:
            row["ratio_to_floor"] = row["p50_us"] / floor["p50_us"]
            if row["requests_per_s"] and floor["requests_per_s"]:
                row["throughput_to_floor"] = row["requests_per_s"] / floor["requests_per_s"]

    with open(results_path, "w") as f:
        json.dump(rows, f, indent=1)
        f.write("\n")
    print_table(rows, machine)
    print_targets(by_name, rows)
    print(f"\nwritten: {results_path}")


def memory_row(name, rss, anon):
    return {
        "row": name,
        "p50_us": None,
        "p99_us": None,
        "requests_per_s": None,
        "rss_kib": rss,
        "anon_kib": anon,
    }


def cost_row(name, us_per_mib, floor_us_per_mib, floor=None):
    row = {"row": name, "p50_us": None, "p99_us": None, "requests_per_s": None}
    row["us_per_mib"] = us_per_mib
    if floor_us_per_mib:
        row["floor"] = floor
        row["ratio_to_floor"] = us_per_mib / floor_us_per_mib
    return row


def copy_floor(row):
    """The copy a cost-per-MiB row is compared with: "pipe copy" or "socket copy"."""
    return row["floor"].removesuffix(" cost per MiB")


def num(x, fmt="{:.1f}"):
    return "" if x is None else fmt.format(x)


def print_table(rows, machine):
    print(f"machine: {machine}")
    header = ["row", "p50 µs", "p99 µs", "p99.9 µs", "req/s", "cpu µs", "cores", "floor", "×floor", "p99×floor"]
    table = [header]
    extra = []
    for r in rows:
        if "rss_kib" in r or "peak_rss_kib" in r and r["p50_us"] is None:
            rss = r.get("rss_kib")
            text = (
                f"RSS {rss / 1024:.2f} MiB, anonymous {r['anon_kib'] / 1024:.2f} MiB"
                if rss is not None
                else f"peak RSS {r['peak_rss_kib'] / 1024:.1f} MiB"
            )
            extra.append(f"  {r['row']:<44} {text}")
            continue
        if "us_per_mib" in r:
            ratio = num(r.get("ratio_to_floor"), "{:.2f}")
            extra.append(
                f"  {r['row']:<44} {r['us_per_mib']:.0f} µs/MiB"
                + (f" ({ratio}× the {copy_floor(r)})" if ratio else "")
            )
            continue
        table.append(
            [
                r["row"],
                num(r["p50_us"]),
                num(r["p99_us"]),
                num(r.get("p999_us")),
                num(r["requests_per_s"], "{:.0f}"),
                num(r.get("cpu_us_per_request")),
                num(r.get("cores_busy"), "{:.2f}"),
                r.get("floor", ""),
                num(r.get("ratio_to_floor"), "{:.2f}"),
                num(r.get("p99_ratio_to_floor"), "{:.2f}"),
            ]
        )
    widths = [max(len(str(line[i])) for line in table) for i in range(len(header))]
    for line in table:
        cells = [
            str(c).ljust(w) if i in (0, 7) else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(line, widths))
        ]
        print("  ".join(cells).rstrip())
    print()
    for line in extra:
        print(line)


def print_targets(by_name, rows):
    def p50(name):
        r = by_name.get(name)
        return r["p50_us"] if r else None

    def rps(name):
        r = by_name.get(name)
        return r["requests_per_s"] if r else None

    def ratio(a, b):
        return a / b if a is not None and b else None

    def field(name, key):
        r = by_name.get(name)
        return r.get(key) if r else None

    memo = {r["row"]: r for r in rows}
    checks = [
        ("Bazel proto no-op ≤ 1.5× protobuf floor (p50)",
         field("bazel proto singleplex noop", "ratio_to_floor"), "<=", 1.5),
        ("  beside: pinned to one core, Bazel proto no-op / floor (p50; the worker's code alone)",
         field("pinned bazel proto singleplex noop", "ratio_to_floor"), None, None),
        ("  beside: Bazel proto no-op / floor proto via thread (p50; the floor with the hop a multiplex request makes)",
         ratio(p50("bazel proto singleplex noop"), p50("floor proto via thread")), None, None),
        ("  beside: floor proto via thread / floor proto (p50; what that hop costs here)",
         ratio(p50("floor proto via thread"), p50("floor proto")), None, None),
        ("Bazel JSON no-op ≤ 1.5× proto no-op (p50)",
         ratio(p50("bazel json singleplex noop"), p50("bazel proto singleplex noop")), "<=", 1.5),
        ("Buck2 Execute no-op ≤ 1.2× gRPC floor (p50)",
         ratio(p50("buck2 Execute c1"), p50("floor grpc unary c1")), "<=", 1.2),
        ("  beside: Buck2 Execute no-op / Execute served as duplex floor (p50; no target)",
         ratio(p50("buck2 Execute c1"), p50("floor grpc unary as duplex c1")), None, None),
        ("  beside: unary as duplex floor / unary floor (p50; gRPC's price for seeing a dropped call)",
         ratio(p50("floor grpc unary as duplex c1"), p50("floor grpc unary c1")), None, None),
        ("ExecuteStream 16 throughput ≥ 0.9× streaming floor",
         field("buck2 ExecuteStream 16", "throughput_to_floor"), ">=", 0.9),
        ("ExecuteStream 64 throughput ≥ 0.9× streaming floor",
         field("buck2 ExecuteStream 64", "throughput_to_floor"), ">=", 0.9),
        # Judged against what the cores allow, not against singleplex: once a
        # singleplex request ran on the thread that read it, singleplex writes
        # went from 16k to 29k/s and take 1.4 of the 2 cores, so no worker
        # could reach 1.8x it here. Run one at a time, multiplex would make
        # about 0.65 of what the cores allow; spread, 0.9 and more.
        ("Multiplex 4 write throughput ≥ 0.8× what the cores allow (cores ÷ CPU per request)",
         ratio(rps("bazel proto multiplex 4 write"),
               ratio(os.cpu_count() * 1e6, field("bazel proto multiplex 4 write", "cpu_us_per_request"))),
         ">=", 0.8),
        ("  beside: multiplex 4 write throughput / singleplex write",
         ratio(rps("bazel proto multiplex 4 write"), rps("bazel proto singleplex write")), None, None),
        ("  beside: multiplex 4 write, cores busy (client and worker; at the core count the work is spread)",
         field("bazel proto multiplex 4 write", "cores_busy"), None, None),
        ("  beside: multiplex 4 write, CPU µs per request (client and worker)",
         field("bazel proto multiplex 4 write", "cpu_us_per_request"), None, None),
        ("  beside: multiplex 4 no-op throughput / singleplex no-op",
         ratio(rps("bazel proto multiplex 4 noop"), rps("bazel proto singleplex noop")), None, None),
        ("Start-up to first Bazel response ≤ 1500 µs",
         p50("start-up bazel to first response"), "<=", 1500),
        ("Start-up to accepting ≤ gRPC floor's + 500 µs (difference, µs)",
         None if p50("start-up buck2 to accepting") is None
         else p50("start-up buck2 to accepting") - p50("start-up floor grpc to accepting"), "<=", 500),
    ]
    for mode, anon_max in (("bazel", 1024), ("buck2", 2048)):
        idle = memo.get(f"memory {mode} idle")
        if idle:
            checks.append((f"{mode} idle anonymous ≤ {anon_max} KiB", idle["anon_kib"], "<=", anon_max))
            checks.append((f"{mode} idle RSS ≤ 5120 KiB", idle["rss_kib"], "<=", 5120))
        afters = sorted(
            (int(r["row"].rsplit(" ", 1)[1]), r)
            for r in rows
            if r["row"].startswith(f"memory {mode} after ")
        )
        if len(afters) >= 2:
            growth = afters[-1][1]["anon_kib"] - afters[0][1]["anon_kib"]
            checks.append(
                (f"{mode} anonymous growth {afters[0][0]} → {afters[-1][0]} requests ≤ 256 KiB",
                 growth, "<=", 256)
            )
    for r in rows:
        if r["row"].endswith("cost per MiB") and "ratio_to_floor" in r:
            copy = copy_floor(r)
            checks.append((f"{r['row']} ≤ 3× {copy}", r["ratio_to_floor"], "<=", 3.0))
            checks.append((f"floor no weaker than its row: {r['row']} / {copy}", r["ratio_to_floor"], ">=", 0.90))
    # A floor is the transport with nothing in the way: a row faster than its
    # floor means the floor is weaker than the worker, and its ratio proves
    # nothing. Said for every such row, not hidden in a median. "Faster" is
    # throughput, the inverse of the mean latency with one request in flight
    # and N over it with N in flight (Little's law): the whole cost. A p50
    # is not: a floor whose latencies spread differently can have the higher
    # p50 at the higher throughput (remote proto write's per-round p50 ratio
    # ran 0.82-1.80 in one run while its floor kept 1.25x its throughput).
    # 10 % for noise: rounds of one row moved by a third from one to the next
    # on a 2-core virtual machine, and a floor weaker by design was off by
    # far more (the alternating gRPC stream echo, 1.5-1.7x; a Bazel floor
    # that slept between requests, 2.5x).
    for r in rows:
        if "floor" in r and r["floor"] in by_name and r.get("throughput_to_floor") is not None:
            checks.append((f"floor no weaker than its row: {r['row']} / {r['floor']} (throughput)",
                           r["throughput_to_floor"], "<=", 1.10))
    print("\ntargets:")
    for label, value, op, limit in checks:
        if value is None:
            print(f"  n/a   {label}")
            continue
        if op is None:
            print(f"        {label}: {value:.2f}")
            continue
        ok = value <= limit if op == "<=" else value >= limit
        print(f"  {'met ' if ok else 'MISS'}  {label}: {value:.2f}")


if __name__ == "__main__":
    main()
