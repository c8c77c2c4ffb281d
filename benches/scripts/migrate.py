#!/opt/heliotrope-tools/bin/python3
"""`helio migrate` against QEMU's own storage migration (issue 13), side by side in one run.

Both move the same VM (the sample guest: 512 MiB, a 4 GiB disk holding the benches' mixed image,
the guest keeping 256 MiB of random data in RAM and rewriting ~4 MiB/s of it, writing 2 MiB/s of
O_DSYNC records to its disk, printing a tick every 10 ms) over the same emulated link (helio
wan-proxy, 50 ms RTT, 200 Mbit/s each way), with the same downtime limit (300 ms):

  helio   two agents with mutual TLS; the disk pre-seeded to B (timed apart), then
          POST /v1/migrations until the VM runs at B; then the way back (B -> A)
  qemu    what libvirt's --copy-storage-all does: the destination QEMU started with -incoming
          and an empty disk exported writable by its own NBD server; the source mirrors into it
          (blockdev-mirror, sync full, copy-mode write-blocking) through the link until ready,
          then migrates, and the mirror is ended (block-job-cancel) at the switchover. The NBD
          mirror and the migration stream share one link (wan-proxy --route).

Measured for each: time from the command to the VM running at B, bytes over the link (both
directions, from the command to completion), QEMU's downtime, the longest gap between two guest
console ticks seen from the host, the memory stream's bytes. Trials interleave (helio, qemu,
qemu, helio, ...): this machine's speed drifts within the hour.

Usage: benches/scripts/migrate.py [--dir DIR] [--trials 1] [--disk 4GiB]
Needs scripts/install-deps --bench (QEMU, the qemu.qmp client in /opt/heliotrope-tools).
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import threading
import time
from pathlib import Path

from qemu.qmp.legacy import QEMUMonitorProtocol

from agent import AgentProc, UnixHTTP, call, wait_done
from harness import HELIO, ROOT, build, fresh, helio, log, print_table

RTT, BW, DOWNTIME_MS = "50ms", "200Mbit", 300
WORKLOAD = "helio.disk=/dev/vda helio.disk_rate=512 helio.mem_mib=256 helio.mem_rate=1000"
SETTLE_S = 20


class TickWatch:
    """The longest time between two new ticks on either console, polled every millisecond."""

    def __init__(self, files):
        self.files, self.worst, self.stop_flag = [Path(f) for f in files], 0.0, False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        offsets, last = [0] * len(self.files), None
        while not self.stop_flag:
            for i, f in enumerate(self.files):
                try:
                    size = f.stat().st_size
                except FileNotFoundError:
                    continue
                if size <= offsets[i]:
                    continue
                with open(f, "rb") as fh:
                    fh.seek(offsets[i])
                    fresh_bytes = fh.read(size - offsets[i])
                offsets[i] = size
                if b"tick " in fresh_bytes:
                    now = time.perf_counter()
                    if last is not None:
                        self.worst = max(self.worst, now - last)
                    last = now
            time.sleep(0.001)

    def finish(self):
        self.stop_flag = True
        self.thread.join()
        return self.worst * 1000


class Proxy:
    """helio wan-proxy: one link, one or more routes; its byte counters are read when stopped."""

    def __init__(self, d, name, to, routes=(), listen="127.0.0.1:0"):
        self.log_path = d / f"{name}.log"
        args = [str(HELIO), "wan-proxy", "--listen", listen, "--to", to, "--rtt", RTT, "--bandwidth", BW]
        for r in routes:
            args += ["--route", r]
        self.log = open(self.log_path, "w")
        env = dict(os.environ, HELIO_LOG="info")
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        self.addrs = []
        for line in self.proc.stdout:
            m = re.match(r"listening on (\S+)", line)
            if m:
                self.addrs.append(m.group(1))
            if len(self.addrs) == 1 + len(routes):
                break

    def stop(self):
        """Stops the link; bytes it carried (both directions)."""
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()
        text = self.log_path.read_text()
        up = re.findall(r"to_target\D+(\d+)", text)
        down = re.findall(r"to_client\D+(\d+)", text)
        if not up or not down:
            raise RuntimeError(f"no link counters in {self.log_path}")
        return int(up[-1]) + int(down[-1])


def guest():
    out = ROOT / "target" / "sample-guest"
    subprocess.run([str(ROOT / "scripts" / "sample-guest"), str(out)], check=True, capture_output=True)
    return out / "vmlinuz", out / "initrd.img"


def wait(what, cond, limit=1800, every=0.05):
    deadline = time.time() + limit
    while time.time() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(every)
    raise RuntimeError(f"timed out waiting for {what}")


def acked(serial):
    """The guest's last 'disk acked SEQ' (every record up to SEQ is on its disk)."""
    try:
        seqs = re.findall(r"disk acked (\d+)", Path(serial).read_text(errors="replace"))
    except FileNotFoundError:
        return 0
    return int(seqs[-1]) if seqs else 0


def write_rate(serial, seconds):
    """Records a second the guest acknowledged over its last `seconds` seconds (its console says
    'disk acked SEQ' once a guest second)."""
    try:
        seqs = [int(x) for x in re.findall(r"disk acked (\d+)", Path(serial).read_text(errors="replace"))]
    except FileNotFoundError:
        return None
    tail = seqs[-(seconds + 1):]
    return (tail[-1] - tail[0]) / max(len(tail) - 1, 1) if len(tail) > 1 else None


def copy_image(img, dst):
    shutil.copyfile(img, dst)
    subprocess.run(["sync"], check=True)


# ---- heliotrope -------------------------------------------------------------------------------


class Fresh:
    """An agent's API, a new connection per request: the agent closes idle keep-alive
    connections (its header timeout), and a trial idles for minutes between calls."""

    def __init__(self, agent):
        self.sock = agent.sock

    def request(self, *a, **kw):
        self.conn = UnixHTTP(self.sock)
        return self.conn.request(*a, **kw)

    def getresponse(self):
        return self.conn.getresponse()


def pki(d):
    ca = d / "pki" / "ca"
    if not (d / "pki" / "b").exists():
        helio("pki", "init", ca)
        for n in ("a", "b"):
            helio("pki", "issue", "--ca", ca, "--name", n, "--out", d / "pki" / n)
    return d / "pki"


def migration_done(conn, mid, on_running=None):
    """Polls a migration until it completes; calls on_running once when the VM runs at B."""
    seen_running = False

    def done():
        nonlocal seen_running
        _, m = call(conn, "GET", f"/v1/migrations/{mid}")
        if m["phase"] in ("failed", "cancelled"):
            raise RuntimeError(f"migration {mid}: {json.dumps(m)[:2000]}")
        if not seen_running and m["phase"] in ("running_at_destination", "completed"):
            seen_running = True
            if on_running:
                on_running()
        return m if m["phase"] == "completed" else None

    return wait(f"migration {mid}", done, every=0.01)


def helio_trial(d, img, kernel, initrd):
    """One heliotrope trial: pre-seed, A -> B, B -> A. Its figures."""
    t = fresh(d / "helio")
    t.mkdir(parents=True)
    p = pki(d)
    a = AgentProc(t, "a", ["--tls", p / "a"])
    b = AgentProc(t, "b", ["--tls", p / "b"])
    ca, cb = Fresh(a), Fresh(b)
    disk = t / "d1.raw"
    copy_image(img, disk)
    call(ca, "POST", "/v1/disks", {"name": "d1", "path": str(disk)})
    cmdline = f"console=ttyS0 quiet {WORKLOAD}"
    spec = {"name": "g1", "memory_mib": 512, "boot": {"kernel": str(kernel), "initrd": str(initrd), "cmdline": cmdline},
            "disks": ["d1"]}
    status, vm = call(ca, "POST", "/v1/vms", spec)
    assert status == 201, vm
    serial_a, serial_b = a.state / "vms/g1/serial.log", b.state / "vms/g1/serial.log"
    wait("the guest's first disk records", lambda: acked(serial_a) > 0, limit=300)
    time.sleep(SETTLE_S)
    r = {}
    try:
        links = [Proxy(t, "to-b", b.addr), Proxy(t, "to-a", a.addr)]
        to_b, to_a = links[0].addrs[0], links[1].addrs[0]
        start = time.perf_counter()
        _, job = call(cb, "POST", "/v1/jobs", {"kind": "seed", "disk": "d1", "from": to_a})
        j = wait_done(cb, job["id"])
        r["preseed_s"] = time.perf_counter() - start
        r["preseed_wan"] = sum(x.stop() for x in links)
        log(f"helio: pre-seed {r['preseed_s']:.1f} s, {r['preseed_wan'] / 1e6:.0f} MB, {j['figures']}")
        # The same addresses again, fresh counters: the migration's own bytes.
        links = [Proxy(t, "mig-to-b", b.addr, listen=to_b), Proxy(t, "mig-to-a", a.addr, listen=to_a)]
        r.update(move(ca, {"vm": "g1", "to": to_b, "source_addr": to_a, "max_downtime_ms": DOWNTIME_MS},
                      [serial_a, serial_b]))
        r["wan"] = sum(x.stop() for x in links)
        log(f"helio: A -> B {r['time_s']:.1f} s, {r['wan'] / 1e6:.0f} MB, downtime {r['qemu_downtime_ms']} ms, "
            f"tick gap {r['tick_gap_ms']:.0f} ms")
        time.sleep(SETTLE_S)
        links = [Proxy(t, "back-to-b", b.addr, listen=to_b), Proxy(t, "back-to-a", a.addr, listen=to_a)]
        back = move(cb, {"vm": "g1", "to": to_a, "source_addr": to_b, "max_downtime_ms": DOWNTIME_MS},
                    [serial_b, serial_a])
        back["wan"] = sum(x.stop() for x in links)
        r["back"] = back
        log(f"helio: B -> A {back['time_s']:.1f} s, {back['wan'] / 1e6:.0f} MB, return {back['return']}")
    finally:
        # The agents' QEMUs outlive them by design: the trial's VM goes with the trial.
        subprocess.run(["pkill", "-9", "-f", "process=helio-vm-g1"], check=False)
        a.stop()
        b.stop()
    return r


def move(conn, spec, serials):
    """POST /v1/migrations until completed: time to running at the destination, its figures."""
    watch = TickWatch(serials)
    start = time.perf_counter()
    running = {"rate": None}

    def at_destination():
        running["t"] = time.perf_counter()
        running["rate"] = write_rate(serials[0], max(int(running["t"] - start) - 2, 1))
    status, m = call(conn, "POST", "/v1/migrations", spec)
    assert status == 201, m
    m = migration_done(conn, m["id"], at_destination)
    gap = watch.finish()
    f = m["figures"]
    ram = f.get("ram") or {}
    return {"time_s": running["t"] - start, "qemu_downtime_ms": f.get("downtime_ms"), "tick_gap_ms": gap,
            "memory_qemu_bytes": ram.get("transferred"), "memory_tunnel_bytes": f.get("tunnel_bytes_sent"),
            "memory_wire_bytes": f.get("tunnel_wire_bytes_sent"),
            "return": f.get("return"), "seed": f.get("seed"), "migration": m,
            "guest_writes_per_s": running["rate"]}


# ---- QEMU's own storage migration (the anchor) ----------------------------------------------


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Qemu:
    """A QEMU of the same shape as the agent's (q35, TCG, virtio-blk, serial to a file)."""

    def __init__(self, t, name, disk, kernel, initrd, incoming=False):
        self.qmp_path, self.serial = t / f"{name}.qmp", t / f"{name}-serial.log"
        args = ["qemu-system-x86_64", "-name", f"{name},process=helio-bench-{name}", "-machine", "q35",
                "-accel", "tcg", "-m", "512", "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none",
                "-chardev", f"socket,id=qmp,path={self.qmp_path},server=on,wait=off", "-mon", "chardev=qmp,mode=control",
                "-chardev", f"file,id=serial0,path={self.serial},append=on", "-serial", "chardev:serial0",
                "-kernel", str(kernel), "-initrd", str(initrd), "-append", f"console=ttyS0 quiet {WORKLOAD}",
                "-blockdev", json.dumps({"driver": "file", "filename": str(disk), "node-name": "file0", "cache": {"direct": False}}),
                "-blockdev", json.dumps({"driver": "raw", "file": "file0", "node-name": "disk0"}),
                "-device", "virtio-blk-pci,drive=disk0,id=vd0"]
        if incoming:
            args += ["-incoming", "defer"]
        self.log = open(t / f"{name}.log", "w")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
        wait(f"{name}'s QMP socket", lambda: self.qmp_path.exists(), limit=30)
        self.qmp = QEMUMonitorProtocol(str(self.qmp_path))
        self.qmp.connect()

    def cmd(self, command, **args):
        r = self.qmp.cmd_raw(command, args or None)
        if "error" in r:
            raise RuntimeError(f"QMP {command} {args}: {r['error']}")
        return r["return"]

    def stop(self):
        try:
            self.qmp.close()
        except Exception:  # QEMU may be gone already; it is killed next anyway
            pass
        self.proc.kill()
        self.proc.wait()
        self.log.close()


def qemu_trial(d, img, kernel, initrd):
    """One anchor trial: mirror + migrate through one link. Its figures."""
    t = fresh(d / "qemu")
    t.mkdir(parents=True)
    src_disk, dst_disk = t / "src.raw", t / "dst.raw"
    copy_image(img, src_disk)
    with open(dst_disk, "wb") as f:
        f.truncate(img.stat().st_size)
    src = Qemu(t, "src", src_disk, kernel, initrd)
    dst = Qemu(t, "dst", dst_disk, kernel, initrd, incoming=True)
    try:
        wait("the guest's first disk records", lambda: acked(src.serial) > 0, limit=300)
        time.sleep(SETTLE_S)
        nbd_port, mig_port = free_port(), free_port()
        dst.cmd("nbd-server-start", addr={"type": "inet", "data": {"host": "127.0.0.1", "port": str(nbd_port)}})
        dst.cmd("block-export-add", type="nbd", id="e0", **{"node-name": "disk0"}, name="disk0", writable=True)
        dst.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{mig_port}")
        link = Proxy(t, "link", f"127.0.0.1:{nbd_port}", routes=[f"127.0.0.1:0=127.0.0.1:{mig_port}"])
        nbd_addr, mig_addr = link.addrs
        r = anchor_move(src, dst, nbd_addr, mig_addr)
        r["wan"] = link.stop()
        log(f"qemu: {r['time_s']:.1f} s (mirror ready after {r['mirror_ready_s']:.1f} s), {r['wan'] / 1e6:.0f} MB, "
            f"downtime {r['qemu_downtime_ms']} ms, tick gap {r['tick_gap_ms']:.0f} ms")
        return r
    finally:
        src.stop()
        dst.stop()


def anchor_move(src, dst, nbd_addr, mig_addr):
    host, port = nbd_addr.rsplit(":", 1)
    watch = TickWatch([src.serial, dst.serial])
    start = time.perf_counter()
    src.cmd("blockdev-add", driver="nbd", **{"node-name": "target"},
            server={"type": "inet", "host": host, "port": port}, export="disk0")
    src.cmd("blockdev-mirror", **{"job-id": "m0", "copy-mode": "write-blocking"}, device="disk0", target="target",
            sync="full")
    wait("the mirror to be ready", lambda: any(j["ready"] for j in src.cmd("query-block-jobs")), every=0.2)
    ready = time.perf_counter() - start
    src.cmd("migrate-set-parameters", **{"downtime-limit": DOWNTIME_MS})
    host, port = mig_addr.rsplit(":", 1)
    src.cmd("migrate", uri=f"tcp:{host}:{port}")
    # The guest's disk writes while the mirror ran (write-blocking: each waits for the far side).
    rate = write_rate(src.serial, max(int(ready) - 2, 1))

    def completed():
        info = src.cmd("query-migrate")
        if info.get("status") in ("failed", "cancelled"):
            raise RuntimeError(f"QEMU migration: {info}")
        return info if info.get("status") == "completed" else None

    info = wait("QEMU's migration", completed, every=0.01)
    # libvirt's order: the migration done (the source paused), the mirror ends consistent.
    src.cmd("block-job-cancel", device="m0")
    wait("the destination to run", lambda: dst.cmd("query-status")["status"] == "running", every=0.01)
    took = time.perf_counter() - start
    wait("the mirror to end", lambda: not src.cmd("query-block-jobs"), every=0.05)
    dst.cmd("nbd-server-stop")
    time.sleep(2)
    gap = watch.finish()
    return {"time_s": took, "mirror_ready_s": ready, "qemu_downtime_ms": info.get("downtime"), "tick_gap_ms": gap,
            "memory_qemu_bytes": info.get("ram", {}).get("transferred"), "guest_writes_per_s": rate}


# ---- the report -------------------------------------------------------------------------------


def spread(xs, fmt):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "n/a"
    med = statistics.median(xs)
    return fmt(med) if len(xs) == 1 else f"{fmt(med)} (range {fmt(min(xs))}–{fmt(max(xs))})"


def rows_of(hs, qs):
    col = lambda rs, k: [r[k] for r in rs]
    med = lambda rs, k: statistics.median(col(rs, k))
    secs, mb, ms = (lambda v: f"{v:.1f} s"), (lambda v: f"{v / 1e6:.0f} MB"), (lambda v: f"{v:.0f} ms")
    rows = [
        ("time", "command → VM running at B", spread(col(hs, "time_s"), secs)
         + f"; pre-seed before it {spread(col(hs, 'preseed_s'), secs)}", spread(col(qs, "time_s"), secs)
         + f" (mirror ready {spread(col(qs, 'mirror_ready_s'), secs)})", f"{med(hs, 'time_s') / med(qs, 'time_s'):.3f}× (goal ≤ 0.15×)"),
        ("wan", "bytes over the link, command → completion", spread(col(hs, "wan"), mb)
         + f"; pre-seed {spread(col(hs, 'preseed_wan'), mb)}", spread(col(qs, "wan"), mb),
         f"{med(hs, 'wan') / med(qs, 'wan'):.3f}× (goal ≤ 0.15×)"),
        ("downtime", "QEMU's figure (same limit, 300 ms)", spread(col(hs, "qemu_downtime_ms"), ms),
         spread(col(qs, "qemu_downtime_ms"), ms), f"{med(hs, 'qemu_downtime_ms') - med(qs, 'qemu_downtime_ms'):+.0f} ms (goal ≤ +50 ms)"),
        ("tick gap", "longest pause of the guest's 10 ms ticks", spread(col(hs, "tick_gap_ms"), ms),
         spread(col(qs, "tick_gap_ms"), ms), f"{med(hs, 'tick_gap_ms') - med(qs, 'tick_gap_ms'):+.0f} ms (goal ≤ +50 ms)"),
        ("guest writes", "the guest's O_DSYNC 4 KiB records/s while its disk moved (asked: 512/s)",
         spread(col(hs, "guest_writes_per_s"), lambda v: f"{v:.0f}/s"), spread(col(qs, "guest_writes_per_s"), lambda v: f"{v:.0f}/s"),
         "the write-blocking mirror holds each write for a round trip"),
        ("memory", "memory stream bytes (QEMU's ram.transferred; helio: on the wire, zstd in its tunnel)",
         spread(col(hs, "memory_qemu_bytes"), mb) + f", on the wire {spread(col(hs, 'memory_wire_bytes'), mb)}",
         spread(col(qs, "memory_qemu_bytes"), mb), "QEMU's plain stream is not compressed"),
    ]
    backs = [h["back"] for h in hs]
    ret = [b["return"] or {} for b in backs]
    wire = [x.get("disk_wire_bytes", 0) for x in ret]
    written = [x.get("written_compressed_bytes", 0) for x in ret]
    ratios = [w / c for w, c in zip(wire, written) if c]
    rows.append(("way back", "B → A: disk bytes on the wire vs the chunks written at B (compressed)",
                 f"{spread(wire, lambda v: f'{v / 1e3:.1f} KB')} for {spread(written, lambda v: f'{v / 1e3:.1f} KB')}"
                 f" ({ret[0].get('chunks_written_here')} chunks); {spread(col(backs, 'time_s'), secs)}, "
                 f"{spread(col(backs, 'wan'), mb)} over the link",
                 "QEMU: the whole disk again", spread(ratios, lambda v: f"{v:.2f}×") + " (goal ≤ 1.1×)"))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/helio-bench-migrate")
    ap.add_argument("--trials", type=int, default=1)
    ap.add_argument("--disk", default="4GiB")
    ap.add_argument("--only", default="helio,qemu")
    a = ap.parse_args()
    build()
    d = Path(a.dir)
    d.mkdir(parents=True, exist_ok=True)
    kernel, initrd = guest()
    img = d / f"mixed-{a.disk}.img"
    if not img.exists():
        log(f"generating the {a.disk} mixed image")
        helio("sample-image", "--out", img, "--size", a.disk, "--seed", "41")
    only = set(a.only.split(","))
    hs, qs = [], []
    for t in range(a.trials):
        # Interleaved, alternating which goes first.
        order = [("helio", helio_trial, hs), ("qemu", qemu_trial, qs)]
        for name, trial, out in order if t % 2 == 0 else reversed(order):
            if name in only:
                log(f"trial {t}: {name}")
                out.append(trial(d, img, kernel, initrd))
    (d / "results.json").write_text(json.dumps({"helio": hs, "qemu": qs}, indent=1))
    if hs and qs:
        print_table(f"benches/scripts/migrate.py --trials {a.trials} --disk {a.disk}", rows_of(hs, qs))
    else:
        print(json.dumps({"helio": hs, "qemu": qs}, indent=1))
    if hs and a.disk == "4GiB":
        # The planner's prediction for the same parameters, beside each helio trial (issue 14).
        import predict
        print("\nThe planner's predictions (helio predict) for the same parameters:")
        predict.report(d / "results.json")


if __name__ == "__main__":
    main()
