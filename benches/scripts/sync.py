#!/usr/bin/env python3
"""Benchmarks of dirty tracking and `helio sync` (issue 4), against their anchors in one run.

  sync      4 GiB image, 1% rewritten (655 extents of 64 KiB at random 4 KiB-aligned offsets)
            through the source's tracking NBD export; then `helio sync` vs
            `rsync --inplace --no-whole-file` of the modified image onto the old replica
  overhead  write throughput through `helio source --nbd` vs qemu-nbd on the same image:
            `nbdcopy --flush` upload and fio 4 KiB random writes at QD32

Usage: benches/scripts/sync.py [--dir DIR] [--size 4GiB] [--only sync,overhead]
"""

import argparse
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

from harness import print_table, HELIO, Listener, build, drop_caches, fresh, helio, log, machine, timed, warm
from seed import parse_size

WRITER = r"""
import nbd, os, random, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
size = h.get_size()
rng = random.Random(7)
for _ in range(int(sys.argv[2])):
    off = rng.randrange(0, (size - 65536) // 4096) * 4096
    h.pwrite(os.urandom(65536), off)
h.flush()
"""


def tracking_source(d, img, tag):
    sock = d / f"{tag}.sock"
    sock.unlink(missing_ok=True)
    state = fresh(d / f"state-{tag}")
    src = Listener([str(HELIO), "source", "--listen", "127.0.0.1:0", "--state", str(state), "--image", str(img),
                    "--name", "disk", "--nbd", f"unix:{sock}"], d / f"{tag}.log")
    return src, f"nbd+unix:///disk?socket={sock}"


def bench_sync(d, base, rows):
    img = d / "sync.img"
    subprocess.run(["cp", "--sparse=always", str(base), str(img)], check=True)
    src, vm = tracking_source(d, img, "sync-src")
    store = fresh(d / "store-sync")
    helio("seed", "--from", src.addr, "--name", "disk", "--store", store)
    replica = d / "replica.raw"
    helio("materialize", "--store", store, "--name", "disk", "--out", replica)
    subprocess.run(["/usr/bin/python3", "-c", WRITER, vm, "655"], check=True)
    warm(img)
    warm(replica)
    # Setup leaves gigabytes of writeback (materialize); neither tool should wait behind it.
    subprocess.run(["sync"], check=True)
    wall, _, out = timed([HELIO, "sync", "--from", src.addr, "--name", "disk", "--store", store, "--json"])
    r = json.loads(out.strip().splitlines()[-1])
    src.stop()
    rnd = r["rounds"][0]
    # Compressed dirty bytes: what zstd -1 makes of the dirty chunks.
    helio("materialize", "--store", store, "--name", "disk", "--out", d / "synced.raw")
    same = subprocess.run(["cmp", str(img), str(d / "synced.raw")]).returncode == 0
    warm(img)
    warm(replica)
    subprocess.run(["sync"], check=True)
    rwall, _, rout = timed(["rsync", "--inplace", "--no-whole-file", "--stats", str(img), str(replica)])
    sent = int(re.search(r"Total bytes sent: ([\d,]+)", rout).group(1).replace(",", ""))
    rows.append(("sync", "1% rewritten, one round", f"{wall:.2f} s, {rnd['chunks']} chunks, dirty {rnd['dirty_bytes'] / 1e6:.1f} MB, wire {rnd['wire_bytes'] / 1e6:.1f} MB, replica equal: {same}",
                 f"rsync --inplace --no-whole-file: {rwall:.2f} s, sent {sent / 1e6:.1f} MB", f"{rwall / wall:.1f}x faster, wire {rnd['wire_bytes'] / rnd['dirty_bytes']:.3f}x dirty"))


def bench_overhead(d, base, rows, upload=1 << 30):
    src_file = d / "upload.bin"
    if not src_file.exists():
        helio("sample-image", "--out", src_file, "--size", str(upload), "--seed", "51")
    warm(src_file)
    results = {}
    for who in ("qemu-nbd", "helio"):
        img = d / f"ov-{who}.img"
        with open(img, "wb") as f:
            f.truncate(upload)
        if who == "qemu-nbd":
            sock = d / "ovq.sock"
            sock.unlink(missing_ok=True)
            p = Listener(["qemu-nbd", "-f", "raw", "-x", "disk", "-t", "-k", str(sock), str(img)], d / "ovq.log", socket=sock)
            uri = f"nbd+unix:///disk?socket={sock}"
        else:
            p, uri = tracking_source(d, img, "ov-src")
        up, _, _ = timed(["nbdcopy", "--flush", str(src_file), uri])
        _, _, out = timed(["fio", "--name=w", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=4k", "--iodepth=32",
                           "--runtime=8", "--time_based", "--output-format=json"])
        iops = json.loads(out[out.index("{"):])["jobs"][0]["write"]["iops"]
        p.stop()
        img.unlink()
        results[who] = (upload / up, iops)
    (qu, qi), (hu, hi) = results["qemu-nbd"], results["helio"]
    rows.append(("overhead", "nbdcopy --flush upload of 1 GiB through the tracking export", f"{hu / 1e9:.2f} GB/s", f"qemu-nbd {qu / 1e9:.2f} GB/s", f"{hu / qu:.2f}x"))
    rows.append(("overhead", "fio 4 KiB randwrite QD32, 8 s", f"{hi / 1000:.1f}k IOPS", f"qemu-nbd {qi / 1000:.1f}k IOPS", f"{hi / qi:.2f}x"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/helio-bench")
    ap.add_argument("--size", default="4GiB")
    ap.add_argument("--only", default="sync,overhead")
    a = ap.parse_args()
    build()
    d = Path(a.dir)
    d.mkdir(parents=True, exist_ok=True)
    size = parse_size(a.size)
    base = d / "mixed.img"
    if not base.exists() or base.stat().st_size != size:
        log(f"generating {a.size} mixed image")
        helio("sample-image", "--out", base, "--size", str(size), "--seed", "11")
    rows = []
    only = set(a.only.split(","))
    if "sync" in only:
        bench_sync(d, base, rows)
    if "overhead" in only:
        bench_overhead(d, base, rows)
    print_table(f"benches/scripts/sync.py --size {a.size} --only {a.only}", rows)


if __name__ == "__main__":
    main()
