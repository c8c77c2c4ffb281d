#!/usr/bin/env python3
"""The planner's predictions beside real moves (issue 14): for each helio trial of a migration
benchmark run (`benches/scripts/migrate.py`, its results.json), what `helio predict` says for
the same parameters, and the measured time and downtime.

The parameters are the benchmark's own: the guest's memory (512 MiB), the dirty rate and the
disk delta the agent measured when the migration began (`figures.prediction`), the emulated
link (200 Mbit/s, 50 ms RTT), the downtime limit (300 ms), the disk's wire ratio measured by
its pre-seed and the memory's by the tunnel (what it sent for what QEMU gave it). The fleet written for `helio predict` holds just that VM and two sites.

Usage: benches/scripts/predict.py RESULTS.json
"""

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import HELIO

MEMORY_MIB = 512
LINK = "200Mbit"
RTT_MS = 50
DOWNTIME_MS = 300
DISK_GIB = 4


def fleet(dirty_mib_s, wire_ratio, memory_ratio):
    return f"""
[policy]
disk_wire_ratio = {wire_ratio:.4f}
memory_wire_ratio = {memory_ratio:.4f}

[[sites]]
name = "a"
tz = "UTC"
capacity = {{ vcpus = 8, memory_mib = 8192, disk_gib = 64 }}

[[sites]]
name = "b"
tz = "UTC"
capacity = {{ vcpus = 8, memory_mib = 8192, disk_gib = 64 }}

[[links]]
a = "a"
b = "b"
bandwidth = "{LINK}"
rtt_ms = {RTT_MS}

[[regions]]
name = "users"
tz = "UTC"
rtt_ms = {{ a = 50, b = 1 }}

[[vms]]
name = "g1"
memory_mib = {MEMORY_MIB}
disk_gib = {DISK_GIB}
vcpus = 1
site = "a"
dirty_rate_mib_s = {dirty_mib_s}
users = {{ users = 1 }}
max_downtime_ms = {DOWNTIME_MS}
modes = ["live"]
"""


def predict(trial):
    p = trial["migration"]["figures"]["prediction"]
    wire_ratio = trial["preseed_wan"] / (DISK_GIB << 30)
    # helio's tunnel compresses QEMU's stream: what it sent for what QEMU gave it.
    memory_ratio = trial["memory_wire_bytes"] / trial["memory_tunnel_bytes"]
    with tempfile.NamedTemporaryFile("w", suffix=".toml") as f:
        f.write(fleet(p["dirty_rate_mib_s"], wire_ratio, memory_ratio))
        f.flush()
        out = subprocess.run([str(HELIO), "predict", "--fleet", f.name, "--vm", "g1", "--to", "b",
                              "--disk-delta", str(p["disk_bytes"]), "--json"],
                             capture_output=True, text=True, check=True).stdout
    return json.loads(out), p


def report(path):
    """Prints each helio trial of `path` (a results.json) beside its prediction."""
    results = json.loads(Path(path).read_text())
    rows = []
    for t in results["helio"]:
        if not t.get("migration"):
            continue
        pred, p = predict(t)
        rows.append((t["time_s"], pred["duration_s"], t["qemu_downtime_ms"], pred["downtime_ms"],
                     p["dirty_rate_mib_s"], p["disk_bytes"]))
        print(f"dirty {p['dirty_rate_mib_s']} MiB/s, disk delta {p['disk_bytes'] / 1e6:.0f} MB: "
              f"time {t['time_s']:.1f} s measured, {pred['duration_s']:.1f} s predicted "
              f"({pred['duration_s'] / t['time_s'] - 1:+.0%}); downtime {t['qemu_downtime_ms']} ms measured, "
              f"{pred['downtime_ms']:.0f} ms predicted ({pred['downtime_ms'] / t['qemu_downtime_ms'] - 1:+.0%})")
    if not rows:
        return
    med = lambda i: statistics.median(r[i] for r in rows)
    print(f"median: time {med(0):.1f} s measured, {med(1):.1f} s predicted ({med(1) / med(0) - 1:+.0%}); "
          f"downtime {med(2):.0f} ms measured, {med(3):.0f} ms predicted ({med(3) / med(2) - 1:+.0%})")


if __name__ == "__main__":
    report(sys.argv[1])
