#!/usr/bin/env python3
"""Two helio builds side by side, for a change that must not cost speed (the durability work of
issue 11 added commits to the export's write path and to sync rounds).

  sync    a tracking source's disk (--size), 1% rewritten in 64 KiB extents through its NBD
          export, then one `helio sync` round: wall time
  write   a complete replica served by `helio export`: `nbdcopy --flush` upload of a file of
          --size, and fio 4 KiB random writes at QD32 for 8 s
  read    the same export: `nbdcopy URI null:`

Every trial runs both builds, alternating which goes first (this host drifts 1.5-2x within an
hour); the ratio new/old is taken per trial and the median reported with its range.

Usage: benches/scripts/versus.py --old PATH --new PATH [--dir DIR] [--size 1GiB] [--trials 3]
"""

import argparse
import statistics
import subprocess
from pathlib import Path

from harness import Listener, fresh, log, machine, print_table, timed, warm, write_trial
from seed import parse_size
from sync import WRITER, tracking_source


def run(binary, *args):
    return subprocess.run([str(binary), *map(str, args)], check=True, capture_output=True, text=True)


def sync_round(binary, d, base, size, seed):
    """Seconds of one sync round after 1% of the disk was rewritten."""
    img = d / "sync.img"
    subprocess.run(["cp", "--sparse=always", str(base), str(img)], check=True)
    src, vm = tracking_source(d, img, "sync-src", binary)
    store = fresh(d / "store-sync")
    run(binary, "seed", "--from", src.addr, "--name", "disk", "--store", store)
    extents = max(1, size // 100 // 65536)
    writer = WRITER.replace("random.Random(7)", f"random.Random({seed})")
    subprocess.run(["/usr/bin/python3", "-c", writer, vm, str(extents)], check=True)
    subprocess.run(["sync"], check=True)
    wall, _, _ = timed([binary, "sync", "--from", src.addr, "--name", "disk", "--store", store, "--json"])
    src.stop()
    return wall


def export_io(binary, d, base, upload, size):
    """(upload bytes/s, fio IOPS, read bytes/s) against a complete replica's export."""
    src = Listener([str(binary), "source", "--listen", "127.0.0.1:0", "--state", str(fresh(d / "state-ex")),
                    "--image", str(base), "--name", "disk"], d / "ex-src.log")
    store = fresh(d / "store-ex")
    run(binary, "seed", "--from", src.addr, "--name", "disk", "--store", store)
    src.stop()
    sock = d / "ex.sock"
    sock.unlink(missing_ok=True)
    exp = Listener([str(binary), "export", "--store", str(store), "--name", "disk", "--nbd", f"unix:{sock}"], d / "ex.log")
    uri = f"nbd+unix:///disk?socket={sock}"
    up, iops = write_trial(upload, uri)
    subprocess.run(["sync"], check=True)
    rd, _, _ = timed(["nbdcopy", uri, "null:"])
    exp.stop()
    return size / up, iops, size / rd


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", required=True)
    ap.add_argument("--new", required=True)
    ap.add_argument("--dir", default="/tmp/helio-versus")
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--trials", type=int, default=3)
    a = ap.parse_args()
    d = Path(a.dir)
    d.mkdir(parents=True, exist_ok=True)
    size = parse_size(a.size)
    bins = {"old": Path(a.old), "new": Path(a.new)}
    base = d / "base.img"
    if not base.exists():
        run(bins["new"], "sample-image", "--out", base, "--size", size, "--seed", "61")
    upload = d / "upload.bin"
    if not upload.exists():
        run(bins["new"], "sample-image", "--out", upload, "--size", size, "--seed", "62")
    warm(base)
    warm(upload)
    figures = {k: {"sync": [], "upload": [], "fio": [], "read": []} for k in bins}
    for t in range(a.trials):
        order = ("old", "new") if t % 2 == 0 else ("new", "old")
        for who in order:
            figures[who]["sync"].append(sync_round(bins[who], d, base, size, 7 + t))
            up, iops, rd = export_io(bins[who], d, base, upload, size)
            figures[who]["upload"].append(up)
            figures[who]["fio"].append(iops)
            figures[who]["read"].append(rd)
        log(f"trial {t + 1}: " + ", ".join(f"{k} old {figures['old'][k][-1]:.4g} new {figures['new'][k][-1]:.4g}"
                                            for k in figures["old"]))
    med = statistics.median
    rows = []
    what = {
        "sync": ("sync round after 1% rewritten (s, lower is better)", lambda v: f"{v:.2f} s"),
        "upload": ("export: nbdcopy --flush upload", lambda v: f"{v / 1e9:.2f} GB/s"),
        "fio": ("export: fio 4 KiB randwrite QD32, 8 s", lambda v: f"{v / 1000:.1f}k IOPS"),
        "read": ("export: nbdcopy URI null:", lambda v: f"{v / 1e9:.2f} GB/s"),
    }
    for k, (label, fmt) in what.items():
        o, n = figures["old"][k], figures["new"][k]
        # Speed ratio new/old (> 1: the new build is faster); for times it is old/new.
        ratios = [(x / y) if k == "sync" else (y / x) for x, y in zip(o, n)]
        rows.append((k, f"{label}, median of {a.trials}", fmt(med(n)), f"old {fmt(med(o))}",
                     f"{med(ratios):.2f}x (trials {min(ratios):.2f}-{max(ratios):.2f}x)"))
    print_table(f"benches/scripts/versus.py --old {a.old} --new {a.new} --size {a.size} --trials {a.trials}; {machine()}", rows)


if __name__ == "__main__":
    main()
