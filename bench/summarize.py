#!/usr/bin/env python3
"""Medians and spread of switchyard-bench --json runs saved as SCENARIO.SYSTEM.RUN.json.

usage: bench/summarize.py DIR   (what bench/compare.sh writes)

Per scenario and system: deliveries/s, latency p50/p99/p99.9 (ms), lost and duplicates (summed
over runs), CPU seconds of the servers, of Redis and of the generator during the run, and server
CPU per million deliveries (the servers' cost, whatever the generator could drive). Each cell is
the median of the runs, with the min-max spread in brackets.
"""
import glob
import json
import os
import statistics
import sys
from collections import defaultdict


def figures(report):
    delivery = report["delivery"]
    latency = report.get("latency_us") or {}
    servers = report["servers_total"]["cpu_run_s"] or 0.0
    redis = sum(o.get("cpu_run_s") or 0.0 for o in report.get("others", []))
    received = delivery["received"]
    return {
        "deliveries/s": delivery["per_s"],
        "p50 ms": (latency.get("p50") or 0) / 1000,
        "p99 ms": (latency.get("p99") or 0) / 1000,
        "p99.9 ms": (latency.get("p999") or 0) / 1000,
        "server CPU s": servers,
        "Redis CPU s": redis,
        "generator CPU s": report["loadgen"]["cpu_run_s"],
        "server CPU s per 1M": servers / received * 1e6 if received else float("nan"),
        "backend CPU s per 1M": redis / received * 1e6 if received else float("nan"),
        "lost": delivery["lost"],
        "duplicates": delivery["duplicates"],
    }


def cell(values, total=False):
    if total:
        return str(int(sum(values)))
    med = statistics.median(values)
    fmt = (lambda v: f"{v / 1000:.1f}k") if med >= 10000 else (lambda v: f"{v:.2f}")
    return f"{fmt(med)} [{fmt(min(values))}–{fmt(max(values))}]" if len(values) > 1 else fmt(med)


def main(directory):
    runs = defaultdict(list)
    for path in sorted(glob.glob(os.path.join(directory, "*.json"))):
        scenario, system, _run, _ = os.path.basename(path).rsplit(".", 3)
        with open(path) as f:
            runs[(scenario, system)].append(figures(json.load(f)))
    for scenario in sorted({s for s, _ in runs}):
        systems = [sys_ for s, sys_ in runs if s == scenario]
        rows = list(next(iter(runs[(scenario, systems[0])])).keys())
        print(f"\n### {scenario} (median [min–max] of {len(runs[(scenario, systems[0])])} runs)\n")
        print("| | " + " | ".join(systems) + " |")
        print("|---|" + "---|" * len(systems))
        for row in rows:
            total = row in ("lost", "duplicates")
            name = row + (" (all runs)" if total else "")
            cells = [cell([r[row] for r in runs[(scenario, s)]], total) for s in systems]
            print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/switchyard-compare")
