#!/usr/bin/env python3
"""Benchmarks of the memory migration engine (issue 5): a 512 MiB KVM guest over the emulated
1 Gbit/s, 20 ms RTT link, source and destination in separate processes with mutual TLS.

  downtime   pre-copy at d/r ≈ 0.1, 0.25, 0.5: downtime (target 25 ms) and total time against
             the d/r model's prediction for the same guest and link
  hot        a 16 MiB hot set: hot pages held for the stop-and-copy vs resent every round
  compress   bytes on the wire with zstd vs without; zero pages and references
  postcopy   post-copy fault latency (fault to page installed) against the RTT

There is no memory-migration tool to run beside helio here (no QEMU system emulator with KVM
migration on these machines), so the anchors are the model's own prediction and the
figures from the literature quoted in docs/BENCHMARKS.md.

Usage: benches/scripts/memory.py [--backend kvm] [--memory 512MiB] [--only downtime,hot,compress,postcopy]
"""

import argparse
import json
import subprocess

from harness import HELIO, build, log, print_table

LINK = ["--bandwidth=1Gbit", "--rtt=20ms"]


def demo(backend, memory, *extra):
    args = [str(HELIO), "memory", "demo", "--json", f"--backend={backend}", f"--memory={memory}", *LINK, *extra]
    log(" ".join(args[1:]))
    p = subprocess.run(args, capture_output=True, text=True)
    r = json.loads(p.stdout.strip().splitlines()[-1])
    if r["outcome"] != "migrated" or not r["verified"]["ok"]:
        raise RuntimeError(f"migration not verified: {p.stdout}\n{p.stderr[-2000:]}")
    return r


def live_rounds(r):
    return sum(1 for x in r["rounds"] if x["kind"] == "live")


def bench_downtime(backend, memory, rows):
    # Page writes per second for d/r ≈ 0.1, 0.25, 0.5 with the default fill (about 2 page
    # bytes per wire byte, so the page rate is about 60k/s on 1 Gbit/s).
    for rate in (6000, 15000, 30000):
        r = demo(backend, memory, f"--dirty-rate={rate}", "--downtime-target=20ms")
        p = r["predicted"]
        rows.append([
            f"pre-copy d/r {p['d_over_r']:.2f}",
            "downtime (target 20 ms)",
            f"{r['downtime_ms']:.1f} ms",
            "QEMU default target 300 ms",
            f"{r['downtime_ms'] / 300:.2f}×",
        ])
        rows.append([
            f"pre-copy d/r {p['d_over_r']:.2f}",
            f"total time, {live_rounds(r)} live rounds",
            f"{r['total_ms']:.0f} ms",
            f"model {p['total_ms']:.0f} ms, {p['rounds']} rounds",
            f"{r['total_ms'] / p['total_ms']:.3f}×",
        ])


def bench_hot(backend, memory, rows):
    hot = ["--hot-set=16MiB", "--hot-fraction=0.5", "--dirty-rate=30000", "--downtime-target=50ms"]
    held = demo(backend, memory, *hot)
    plain = demo(backend, memory, *hot, "--no-hold-hot")
    rows.append([
        "hot set 16 MiB, 50% of writes",
        "wire bytes (held vs resent)",
        f"{held['wire_bytes'] / 2**20:.1f} MiB",
        f"{plain['wire_bytes'] / 2**20:.1f} MiB",
        f"{held['wire_bytes'] / plain['wire_bytes']:.3f}×",
    ])
    rows.append([
        "hot set 16 MiB, 50% of writes",
        "downtime (held vs resent)",
        f"{held['downtime_ms']:.1f} ms",
        f"{plain['downtime_ms']:.1f} ms",
        f"{held['downtime_ms'] / plain['downtime_ms']:.2f}×",
    ])
    rows.append([
        "hot set 16 MiB, 50% of writes",
        "page sends saved by holding",
        str(held["saved"]["held_page_sends"]),
        "0",
        "",
    ])


def bench_compress(backend, memory, rows):
    z = demo(backend, memory, "--dirty-rate=6000")
    raw = demo(backend, memory, "--dirty-rate=6000", "--no-compress")
    rows.append([
        "compression (zstd -1, 64-page batches)",
        "wire bytes",
        f"{z['wire_bytes'] / 2**20:.1f} MiB",
        f"{raw['wire_bytes'] / 2**20:.1f} MiB uncompressed",
        f"{z['wire_bytes'] / raw['wire_bytes']:.3f}×",
    ])
    s = z["saved"]
    rows.append([
        "zero pages and references",
        "pages not sent as data",
        f"{s['zero_pages']} zero, {s['ref_pages']} refs",
        f"{z['memory_bytes'] // 4096} pages",
        f"{(s['zero_pages'] + s['ref_pages']) / (z['memory_bytes'] / 4096):.3f}",
    ])
    rows.append([
        "compression",
        "total time",
        f"{z['total_ms']:.0f} ms",
        f"{raw['total_ms']:.0f} ms uncompressed",
        f"{z['total_ms'] / raw['total_ms']:.3f}×",
    ])


def bench_postcopy(backend, memory, rows):
    r = demo(backend, memory, "--mode=postcopy", "--dirty-rate=30000")
    pc = r["postcopy"]
    rows.append([
        "post-copy",
        f"fault latency p50 ({pc['faults']} faults)",
        f"{pc['fault_p50_ms']:.1f} ms",
        f"RTT {r['rtt_ms']:.1f} ms",
        f"{pc['fault_p50_ms'] / r['rtt_ms']:.2f} RTT",
    ])
    rows.append([
        "post-copy",
        "fault latency p99",
        f"{pc['fault_p99_ms']:.1f} ms",
        f"RTT {r['rtt_ms']:.1f} ms",
        f"{pc['fault_p99_ms'] / r['rtt_ms']:.2f} RTT",
    ])
    rows.append([
        "post-copy",
        "downtime / total",
        f"{r['downtime_ms']:.1f} ms / {r['total_ms']:.0f} ms",
        f"model {r['predicted']['downtime_ms']:.1f} / {r['predicted']['total_ms']:.0f} ms",
        f"{r['total_ms'] / r['predicted']['total_ms']:.3f}×",
    ])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="kvm")
    ap.add_argument("--memory", default="512MiB")
    ap.add_argument("--only", default="downtime,hot,compress,postcopy")
    a = ap.parse_args()
    build()
    rows = []
    only = set(a.only.split(","))
    if "downtime" in only:
        bench_downtime(a.backend, a.memory, rows)
    if "hot" in only:
        bench_hot(a.backend, a.memory, rows)
    if "compress" in only:
        bench_compress(a.backend, a.memory, rows)
    if "postcopy" in only:
        bench_postcopy(a.backend, a.memory, rows)
    print_table(f"benches/scripts/memory.py --backend {a.backend} --memory {a.memory} --only {a.only}", rows)


if __name__ == "__main__":
    main()
