#!/usr/bin/env python3
"""Benchmarks of `helio seed` (issue 2), each against its anchor in the same run.

  loopback  helio seed over loopback vs nbdcopy from qemu-nbd into a file, logical bytes/s
  wan       through helio wan-proxy (50 ms RTT, 200 Mbit/s): wire rate vs link, random and mixed
  dedup     a disk sharing 70% of its regions with one already stored: wire / logical
  cpu       CPU seconds per GB at source and destination (from the loopback run)

Usage: benches/scripts/seed.py [--dir DIR] [--size 4GiB] [--wan-size 512MiB] [--only loopback,wan,dedup]
Prints a Markdown table for docs/BENCHMARKS.md.
"""

import argparse
import json
import subprocess

from harness import print_table, HELIO, Listener, build, drop_caches, fresh, helio, log, machine, timed, warm

GIB = 1 << 30


def parse_size(s):
    units = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
    for u, f in units.items():
        if s.endswith(u):
            return int(float(s[: -len(u)]) * f)
    return int(s)


def source(dirp, disks, name="src"):
    args = [HELIO, "source", "--listen", "127.0.0.1:0", "--state", dirp / f"state-{name}"]
    for path, n in disks:
        args += ["--image", path, "--name", n]
    return Listener([str(a) for a in args], dirp / f"{name}.log")


def seed(addr, name, store, *extra):
    wall, cpu, out = timed([HELIO, "seed", "--from", addr, "--name", name, "--store", store, "--json", *extra])
    return wall, cpu, json.loads(out.strip().splitlines()[-1])


def bench_loopback(d, img, size, rows):
    warm(img)
    # Anchor: qemu-nbd serving the raw image, nbdcopy copying it into a file.
    sock = d / "q.sock"
    q = Listener(["qemu-nbd", "-f", "raw", "-x", "disk", "-t", "-r", "-k", str(sock), str(img)], d / "qemu-nbd.log", socket=sock)
    out = d / "nbdcopy.raw"
    out.unlink(missing_ok=True)
    wall_a, cpu_a, _ = timed(["nbdcopy", f"nbd+unix:///disk?socket={sock}", str(out)])
    out.unlink(missing_ok=True)
    drop_caches()
    warm(img)
    # Durable like helio seed, which syncs every batch before recording it.
    wall_f, _, _ = timed(["nbdcopy", "--flush", f"nbd+unix:///disk?socket={sock}", str(out)])
    q.stop()
    out.unlink(missing_ok=True)
    drop_caches()
    warm(img)
    src = source(d, [(img, "disk")])
    cpu0 = src.cpu()
    store = fresh(d / "store-loop")
    wall, cpu_dst, r = seed(src.addr, "disk", store)
    cpu_src = src.cpu() - cpu0
    src.stop()
    gb = size / 1e9
    rows.append(("loopback", "helio seed, 4 streams, durable", f"{size / wall / 1e9:.2f} GB/s logical ({wall:.1f} s, wire {r['wire_bytes'] / 1e9:.2f} GB)",
                  f"nbdcopy qemu-nbd -> file: {size / wall_a / 1e9:.2f} GB/s ({wall_a:.1f} s, page cache only)", f"{wall_a / wall:.2f}x"))
    rows.append(("loopback", "same run", "",
                  f"nbdcopy --flush: {size / wall_f / 1e9:.2f} GB/s ({wall_f:.1f} s, durable)", f"{wall_f / wall:.2f}x"))
    rows.append(("cpu", "CPU s per GB (logical)", f"source {cpu_src / gb:.2f}, destination {cpu_dst / gb:.2f}",
                  f"nbdcopy {cpu_a / gb:.2f} (client only)", ""))
    return r


def bench_wan(d, size, rows, rtt="50ms", bw="200Mbit"):
    link = 200e6 / 8
    for kind in ("random", "mixed"):
        img = d / f"wan-{kind}.img"
        if not img.exists():
            if kind == "mixed":
                helio("sample-image", "--out", img, "--size", f"{size}", "--seed", "21")
            else:
                with open(img, "wb") as f:
                    subprocess.run(["head", "-c", str(size), "/dev/urandom"], stdout=f, check=True)
        warm(img)
        src = source(d, [(img, kind)], name=f"wan-src-{kind}")
        proxy = Listener([str(HELIO), "wan-proxy", "--listen", "127.0.0.1:0", "--to", src.addr, "--rtt", rtt, "--bandwidth", bw], d / f"proxy-{kind}.log")
        store = fresh(d / f"store-wan-{kind}")
        wall, _, r = seed(proxy.addr, kind, store)
        proxy.stop()
        src.stop()
        wire_rate = r["wire_bytes"] / wall
        rows.append((f"wan {kind}", f"helio seed via wan-proxy {rtt} RTT, {bw}", f"wire {wire_rate * 8 / 1e6:.0f} Mbit/s, logical {size / wall * 8 / 1e6:.0f} Mbit/s ({wall:.1f} s)",
                     f"link {bw}", f"wire {wire_rate / link:.2f}x link, logical {size / wall / link:.2f}x link"))


def bench_dedup(d, rows, size=GIB):
    a, b = d / "dedup-a.img", d / "dedup-b.img"
    if not a.exists():
        helio("sample-image", "--out", a, "--size", str(size), "--seed", "31")
        helio("sample-image", "--out", b, "--base", a, "--replace", "0.3", "--seed", "32")
    src = source(d, [(a, "a"), (b, "b")], name="dedup-src")
    store = fresh(d / "store-dedup")
    seed(src.addr, "a", store)
    wall, _, r = seed(src.addr, "b", store)
    src.stop()
    ratio = r["wire_bytes"] / r["logical_bytes"]
    rows.append(("dedup", "second disk, 70% shared, after the first", f"wire/logical {ratio:.3f} ({r['chunks_fetched']} fetched, {r['chunks_deduplicated']} copied locally, {wall:.1f} s)",
                 "casync --seed: 0.355 (shared/ANCHORS.md); floor 0.30", f"{0.355 / ratio:.2f}x less than casync"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/helio-bench")
    ap.add_argument("--size", default="4GiB")
    ap.add_argument("--wan-size", default="512MiB")
    ap.add_argument("--only", default="loopback,wan,dedup")
    a = ap.parse_args()
    build()
    d = fresh(a.dir) if False else __import__("pathlib").Path(a.dir)
    d.mkdir(parents=True, exist_ok=True)
    only = set(a.only.split(","))
    size = parse_size(a.size)
    rows = []
    if "loopback" in only:
        img = d / "mixed.img"
        if not img.exists() or img.stat().st_size != size:
            log(f"generating {a.size} mixed image")
            helio("sample-image", "--out", img, "--size", str(size), "--seed", "11")
        bench_loopback(d, img, size, rows)
    if "wan" in only:
        bench_wan(d, parse_size(a.wan_size), rows)
    if "dedup" in only:
        bench_dedup(d, rows)
    print_table(f"benches/scripts/seed.py --size {a.size} --wan-size {a.wan_size} --only {a.only}", rows)


if __name__ == "__main__":
    main()
