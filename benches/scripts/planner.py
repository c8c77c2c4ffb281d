#!/usr/bin/env python3
"""The planner's goals (issue 14), measured on fleets from scripts/gen-fleet.

  quality  examples/fleet-200.toml (3 sites on 3 continents, 200 VMs, users in 4 regions),
           7 days under every strategy: the planner's share of the oracle's latency gain over
           static, its violations, its business-hours bytes against naive's, naive's bytes
           over the budgets.
  scale    10,000 VMs over 20 sites (8 regions): `helio plan --hours 24` and `helio simulate
           --days 7 --strategy planner`, wall time of the whole process (parsing included).

Trials of each timed command alternate; median and range are printed (this host drifts).

Usage: benches/scripts/planner.py [--trials 3] [--only quality,scale]
"""

import argparse
import json
import os
import statistics
import subprocess

import time

from harness import HELIO, ROOT, build, log


def timed(args):
    """Runs a command, reading its output as it comes (plans are megabytes of JSON); returns
    (wall seconds, child CPU seconds, stdout)."""
    before = os.times()
    start = time.perf_counter()
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = os.times()
    if p.returncode != 0:
        raise RuntimeError(f"{args} failed: {p.stderr[-2000:]}")
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return wall, cpu, p.stdout

FROM = "2026-12-03T00:00:00Z"


def quality():
    fleet = ROOT / "examples" / "fleet-200.toml"
    _, _, out = timed([HELIO, "simulate", "--fleet", fleet, "--days", 7, "--from", FROM, "--json"])
    reports = {r["strategy"]: r for r in json.loads(out)}
    base, best = reports["static"]["user_ms_h"], reports["oracle"]["user_ms_h"]
    for name, r in reports.items():
        share = 100 * (base - r["user_ms_h"]) / (base - best) if base > best else 0
        over = sum(l["over_budget_bytes"] for l in r["links"]) / 1e9
        print(f"{name:8} share {share:5.1f}%  moves {len(r['moves']):4}  business-hours {r['business_hours_bytes'] / 1e9:9.1f} GB"
              f"  off-hours {r['off_hours_bytes'] / 1e9:9.1f} GB  over budget {over:9.1f} GB  violations {len(r['violations'])}")
    p, n = reports["planner"], reports["naive"]
    print(f"planner business-hours bytes / naive's: {p['business_hours_bytes'] / n['business_hours_bytes']:.3f}")


def scale(trials):
    fleet = ROOT / "target" / "fleets" / "f10k.toml"
    fleet.parent.mkdir(parents=True, exist_ok=True)
    with open(fleet, "w") as f:
        subprocess.run([ROOT / "scripts" / "gen-fleet", "--vms", "10000", "--sites", "20", "--regions", "8"],
                       stdout=f, check=True)
    cmds = {
        "plan 24 h": [HELIO, "plan", "--fleet", fleet, "--from", FROM, "--hours", 24, "--json"],
        "simulate 7 days": [HELIO, "simulate", "--fleet", fleet, "--from", FROM, "--days", 7,
                            "--strategy", "planner", "--json"],
    }
    times = {k: [] for k in cmds}
    for t in range(trials):
        for name, cmd in cmds.items():
            wall, cpu, out = timed(cmd)
            times[name].append(wall)
            log(f"trial {t}: {name} {wall:.2f} s (CPU {cpu:.2f} s)")
            if name == "plan 24 h":
                p = json.loads(out)
                log(f"  {len(p['moves'])} moves, {len(p['violations'])} violations")
    for name, ts in times.items():
        print(f"{name}: median {statistics.median(ts):.2f} s (range {min(ts):.2f}-{max(ts):.2f}, {len(ts)} trials)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--only", default="quality,scale")
    a = ap.parse_args()
    build()
    only = a.only.split(",")
    if "quality" in only:
        quality()
    if "scale" in only:
        scale(a.trials)


if __name__ == "__main__":
    main()
