#!/usr/bin/env python3
"""Benchmarks of dirty tracking and `helio sync` (issue 4), against their anchors in one run.

  sync      4 GiB image, 1% rewritten (655 extents of 64 KiB at random 4 KiB-aligned offsets)
            through the source's tracking NBD export; then `helio sync` vs
            `rsync --inplace --no-whole-file` of the modified image onto the old replica;
            repeated for --rounds rounds, each rewriting another 1%
  overhead  write throughput through `helio source --nbd` vs qemu-nbd on the same image:
            `nbdcopy --flush` upload and fio 4 KiB random writes at QD32, --trials times,
            alternating which server goes first; the median ratio is reported with its range

Usage: benches/scripts/sync.py [--dir DIR] [--size 4GiB] [--only sync,overhead] [--rounds 3] [--trials 5]
"""

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
from pathlib import Path

from harness import print_table, HELIO, Listener, build, drop_caches, fresh, helio, log, machine, timed, warm, write_trial
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


def tracking_source(d, img, tag, binary=HELIO):
    sock = d / f"{tag}.sock"
    sock.unlink(missing_ok=True)
    state = fresh(d / f"state-{tag}")
    src = Listener([str(binary), "source", "--listen", "127.0.0.1:0", "--state", str(state), "--image", str(img),
                    "--name", "disk", "--nbd", f"unix:{sock}"], d / f"{tag}.log")
    return src, f"nbd+unix:///disk?socket={sock}"


def warm_tools(img, replica, store):
    """Both tools run warm: their inputs and destinations cached (the image, rsync's replica
    file, helio's store metadata) and their programs paged in. Warming gigabytes of images
    evicts the programs' pages; a cold start of helio cost 50-70 ms of a 0.3 s round.
    Setup also leaves gigabytes of writeback (materialize); neither tool should wait behind it."""
    warm(img)
    warm(replica)
    for f in sorted((Path(store) / "meta").iterdir()):
        if f.is_file():
            warm(f)
    subprocess.run([HELIO, "--version"], check=True, capture_output=True)
    subprocess.run(["rsync", "--version"], check=True, capture_output=True)
    subprocess.run(["sync"], check=True)


def bench_sync(d, base, rows, rounds):
    img = d / "sync.img"
    subprocess.run(["cp", "--sparse=always", str(base), str(img)], check=True)
    src, vm = tracking_source(d, img, "sync-src")
    store = fresh(d / "store-sync")
    helio("seed", "--from", src.addr, "--name", "disk", "--store", store)
    replica = d / "replica.raw"
    helio("materialize", "--store", store, "--name", "disk", "--out", replica)
    # Each round: 1% rewritten (a different 1% each time), then helio sync and rsync from the
    # same state. The first round follows the seed; later ones are a disk's steady state.
    for n in range(rounds):
        writer = WRITER.replace("random.Random(7)", f"random.Random({7 + n})")
        subprocess.run(["/usr/bin/python3", "-c", writer, vm, "655"], check=True)
        warm_tools(img, replica, store)
        wall, _, out = timed([HELIO, "sync", "--from", src.addr, "--name", "disk", "--store", store, "--json"])
        rnd = json.loads(out.strip().splitlines()[-1])["rounds"][0]
        warm_tools(img, replica, store)
        # --ignore-times: rsync's quick check (size and mtime) once skipped a round here
        # (0.03 s, nothing sent, and the next round sent both rounds' changes).
        rwall, _, rout = timed(["rsync", "--inplace", "--no-whole-file", "--ignore-times", "--stats", str(img), str(replica)])
        sent = int(re.search(r"Total bytes sent: ([\d,]+)", rout).group(1).replace(",", ""))
        rows.append(("sync", f"1% rewritten, round {n + 1}", f"{wall:.2f} s (round {rnd['elapsed_s']:.2f} s), {rnd['chunks']} chunks, dirty {rnd['dirty_bytes'] / 1e6:.1f} MB, wire {rnd['wire_bytes'] / 1e6:.1f} MB",
                     f"rsync --inplace --no-whole-file -I: {rwall:.2f} s, sent {sent / 1e6:.1f} MB", f"{rwall / wall:.1f}x faster, wire {rnd['wire_bytes'] / rnd['dirty_bytes']:.3f}x dirty"))
    src.stop()
    synced = d / "synced.raw"
    helio("materialize", "--store", store, "--name", "disk", "--out", synced)
    same = subprocess.run(["cmp", str(img), str(synced)]).returncode == 0
    synced.unlink()
    rows.append(("sync", "replica after the rounds", f"byte-identical to the image: {same}", "", ""))


def bench_overhead(d, base, rows, trials, upload=1 << 30):
    """Both servers stay up; trials alternate which goes first, so the host's drift (its speed
    swings up to 2x within the hour) falls on both. The ratio is taken per trial and the median
    reported with the range: one pair of runs said 0.77x-1.26x for the same two binaries."""
    src_file = d / "upload.bin"
    if not src_file.exists():
        helio("sample-image", "--out", src_file, "--size", str(upload), "--seed", "51")
    warm(src_file)
    servers = {}
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
        servers[who] = (p, uri, img)
    up_ratio, fio_ratio, figures = [], [], {"qemu-nbd": ([], []), "helio": ([], [])}
    for t in range(trials):
        res = {}
        for who in ("qemu-nbd", "helio") if t % 2 == 0 else ("helio", "qemu-nbd"):
            _, uri, _ = servers[who]
            up, iops = write_trial(src_file, uri)
            res[who] = (upload / up, iops)
            figures[who][0].append(upload / up)
            figures[who][1].append(iops)
        (qu, qi), (hu, hi) = res["qemu-nbd"], res["helio"]
        up_ratio.append(hu / qu)
        fio_ratio.append(hi / qi)
        log(f"overhead trial {t + 1}: upload {hu / qu:.2f}x, fio {hi / qi:.2f}x")
    for p, _, img in servers.values():
        p.stop()
        img.unlink()
    med = statistics.median
    (qu, qi), (hu, hi) = figures["qemu-nbd"], figures["helio"]
    span = lambda xs: f"{min(xs):.2f}-{max(xs):.2f}x"
    rows.append(("overhead", f"nbdcopy --flush upload of 1 GiB through the tracking export, median of {trials}", f"{med(hu) / 1e9:.2f} GB/s",
                 f"qemu-nbd {med(qu) / 1e9:.2f} GB/s", f"{med(up_ratio):.2f}x (trials {span(up_ratio)})"))
    rows.append(("overhead", f"fio 4 KiB randwrite QD32, 8 s, median of {trials}", f"{med(hi) / 1000:.1f}k IOPS",
                 f"qemu-nbd {med(qi) / 1000:.1f}k IOPS", f"{med(fio_ratio):.2f}x (trials {span(fio_ratio)})"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/helio-bench")
    ap.add_argument("--size", default="4GiB")
    ap.add_argument("--only", default="sync,overhead")
    ap.add_argument("--rounds", type=int, default=3, help="sync rounds, each against rsync")
    ap.add_argument("--trials", type=int, default=5, help="overhead trials, alternating which server goes first")
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
        bench_sync(d, base, rows, a.rounds)
    if "overhead" in only:
        bench_overhead(d, base, rows, a.trials)
    print_table(f"benches/scripts/sync.py --size {a.size} --only {a.only} --rounds {a.rounds} --trials {a.trials}", rows)


if __name__ == "__main__":
    main()
