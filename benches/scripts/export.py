#!/usr/bin/env python3
"""Benchmarks of `helio export` (issue 3), each against its anchor in the same run.

  serve     complete replica: nbdcopy -> null: and fio 4 KiB randread QD1/QD32, helio vs qemu-nbd
  ondemand  empty replica, first full read over loopback: helio export --from vs
            nbdkit --filter=cache nbd over qemu-nbd
  wan       through helio wan-proxy (50 ms RTT, 1 Gbit/s): sequential first read vs link;
            cold 4 KiB random read latency in RTTs; p99 of present-block reads during the
            background copy vs idle

Usage: benches/scripts/export.py [--dir DIR] [--size 4GiB] [--wan-size 1GiB] [--only serve,ondemand,wan]
"""

import argparse
import json
import time
from pathlib import Path

from harness import print_table, HELIO, Listener, build, drop_caches, fresh, helio, log, machine, timed, warm
from seed import parse_size, seed, source


def uri(sock, name):
    return f"nbd+unix:///{name}?socket={sock}"


def nbdcopy_null(u):
    wall, _, _ = timed(["nbdcopy", u, "null:"])
    return wall


def fio(u, depth, secs=8, size=None, extra=()):
    args = ["fio", "--name=r", "--ioengine=nbd", f"--uri={u}", "--rw=randread", "--bs=4k", f"--iodepth={depth}",
            f"--runtime={secs}", "--time_based", "--output-format=json", *extra]
    if size:
        args.append(f"--size={size}")
    _, _, out = timed(args)
    job = json.loads(out[out.index("{"):])["jobs"][0]["read"]
    pct = job["clat_ns"].get("percentile", {})
    return job["iops"], pct.get("50.000000", 0) / 1e6, pct.get("99.000000", 0) / 1e6


def export(d, store, name, *extra, tag="e"):
    sock = d / f"{tag}.sock"
    sock.unlink(missing_ok=True)
    e = Listener([str(HELIO), "export", "--store", str(store), "--name", name, "--nbd", f"unix:{sock}", *map(str, extra)], d / f"{tag}.log")
    return e, sock


def wait_complete(store, name, limit=600):
    deadline = time.time() + limit
    while time.time() < deadline:
        try:
            if json.loads((Path(store) / "status" / f"{name}.json").read_text())["complete"]:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.2)
    raise RuntimeError("export did not complete")


def bench_serve(d, img, rows):
    src = source(d, [(img, "disk")], name="serve-src")
    store = fresh(d / "store-serve")
    seed(src.addr, "disk", store)
    src.stop()
    warm(img)
    qs = d / "q.sock"
    qs.unlink(missing_ok=True)
    q = Listener(["qemu-nbd", "-f", "raw", "-x", "disk", "-t", "-r", "-k", str(qs), str(img)], d / "qemu-nbd.log", socket=qs)
    e, hs = export(d, store, "disk", "--readonly", tag="serve")
    warm(store / "data" / "00000001.raw")
    tq = nbdcopy_null(uri(qs, "disk"))
    th = nbdcopy_null(uri(hs, "disk"))
    size = img.stat().st_size
    rows.append(("serve", "nbdcopy -> null:, complete replica", f"{size / th / 1e9:.2f} GB/s", f"qemu-nbd {size / tq / 1e9:.2f} GB/s", f"{tq / th:.2f}x"))
    for depth in (1, 32):
        iq, pq, _ = fio(uri(qs, "disk"), depth)
        ih, ph, _ = fio(uri(hs, "disk"), depth)
        rows.append(("serve", f"fio 4k randread QD{depth}", f"{ih / 1000:.1f}k IOPS (p50 {ph * 1000:.0f} us)", f"qemu-nbd {iq / 1000:.1f}k IOPS (p50 {pq * 1000:.0f} us)", f"{ih / iq:.2f}x"))
    e.stop()
    q.stop()


def bench_ondemand(d, img, rows):
    warm(img)
    size = img.stat().st_size
    qs, ks = d / "q2.sock", d / "k.sock"
    for s in (qs, ks):
        s.unlink(missing_ok=True)
    # -e 8: nbdkit opens one upstream connection per client connection, and qemu-nbd without
    # it serves one at a time (nbdcopy then hangs).
    q = Listener(["qemu-nbd", "-f", "raw", "-x", "disk", "-t", "-r", "-e", "8", "-k", str(qs), str(img)], d / "qemu-nbd2.log", socket=qs)
    k = Listener(["nbdkit", "-f", "-U", str(ks), "--filter=cache", "nbd", f"socket={qs}", "export=disk", "cache-on-read=true"], d / "nbdkit.log", socket=ks)
    tk = nbdcopy_null(f"nbd+unix:///?socket={ks}")
    k.stop()
    q.stop()
    src = source(d, [(img, "disk")], name="od-src")
    store = fresh(d / "store-od")
    e, hs = export(d, store, "disk", "--from", src.addr, tag="od")
    th = nbdcopy_null(uri(hs, "disk"))
    e.stop()
    src.stop()
    rows.append(("on-demand", "empty replica, first full read (nbdcopy -> null:)", f"{size / th / 1e9:.2f} GB/s", f"nbdkit cache over qemu-nbd {size / tk / 1e9:.2f} GB/s", f"{tk / th:.2f}x"))


def bench_wan(d, size, rows, rtt_ms=50, bw="1Gbit"):
    link = 1e9 / 8
    img = d / "wan-export.img"
    if not img.exists() or img.stat().st_size != size:
        helio("sample-image", "--out", img, "--size", str(size), "--seed", "41")
    warm(img)
    src = source(d, [(img, "disk")], name="wan-e-src")
    proxy = Listener([str(HELIO), "wan-proxy", "--listen", "127.0.0.1:0", "--to", src.addr, "--rtt", f"{rtt_ms}ms", "--bandwidth", bw], d / "wan-e-proxy.log")
    # 1. Sequential first read of an empty replica.
    store = fresh(d / "store-wan-seq")
    e, hs = export(d, store, "disk", "--from", proxy.addr, tag="wseq")
    t = nbdcopy_null(uri(hs, "disk"))
    st = json.loads((store / "status" / "disk.json").read_text())
    e.stop()
    wire = st["wire_bytes"] / t
    rows.append(("wan", f"sequential first read, {rtt_ms} ms RTT, {bw}", f"logical {size / t * 8 / 1e6:.0f} Mbit/s, wire {wire * 8 / 1e6:.0f} Mbit/s ({t:.1f} s)",
                 f"link {bw}", f"logical {size / t / link:.2f}x, wire {wire / link:.2f}x link"))
    # 2. Cold 4 KiB random reads: background copier held to a trickle so reads find holes.
    store = fresh(d / "store-wan-rand")
    e, hs = export(d, store, "disk", "--from", proxy.addr, "--bandwidth", "64KiB/s", tag="wrand")
    _, p50, p99 = fio(uri(hs, "disk"), 1, secs=8)
    e.stop()
    rows.append(("wan", "cold 4 KiB random read, QD1", f"p50 {p50:.1f} ms ({p50 / rtt_ms:.2f} RTT), p99 {p99:.1f} ms", f"RTT {rtt_ms} ms", f"{p50 / rtt_ms:.2f} RTT"))
    # 3. Present-block reads during the background copy vs idle.
    store = fresh(d / "store-wan-p99")
    e, hs = export(d, store, "disk", "--from", proxy.addr, "--bandwidth", "64KiB/s", tag="wp99")
    # Make the first 32 MiB present, then restart with an uncapped copier.
    timed(["qemu-io", "-f", "raw", "-c", "read 0 16M", "-c", "read 16M 16M", uri(hs, "disk")])
    e.stop()
    e, hs = export(d, store, "disk", "--from", proxy.addr, tag="wp99b")
    _, _, busy = fio(uri(hs, "disk"), 1, secs=4, size="32M")
    wait_complete(store, "disk")
    _, _, idle = fio(uri(hs, "disk"), 1, secs=4, size="32M")
    e.stop()
    proxy.stop()
    src.stop()
    rows.append(("wan", "p99 of present-block 4 KiB reads, during background copy vs idle", f"busy {busy:.3f} ms, idle {idle:.3f} ms", "idle", f"{busy / max(idle, 1e-9):.2f}x idle"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/helio-bench")
    ap.add_argument("--size", default="4GiB")
    ap.add_argument("--wan-size", default="1GiB")
    ap.add_argument("--only", default="serve,ondemand,wan")
    a = ap.parse_args()
    build()
    d = Path(a.dir)
    d.mkdir(parents=True, exist_ok=True)
    only = set(a.only.split(","))
    size = parse_size(a.size)
    img = d / "mixed.img"
    if not img.exists() or img.stat().st_size != size:
        log(f"generating {a.size} mixed image")
        helio("sample-image", "--out", img, "--size", str(size), "--seed", "11")
    rows = []
    if "serve" in only:
        bench_serve(d, img, rows)
    if "ondemand" in only:
        bench_ondemand(d, img, rows)
    if "wan" in only:
        bench_wan(d, parse_size(a.wan_size), rows)
    print_table(f"benches/scripts/export.py --size {a.size} --wan-size {a.wan_size} --only {a.only}", rows)


if __name__ == "__main__":
    main()
