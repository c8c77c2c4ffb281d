#!/usr/bin/env python3
"""Benchmarks of `helio agent` (issue 12).

  seed      the same seed run through an agent (POST /v1/jobs, until done) and through
            `helio seed` directly, interleaved trials, loopback and through helio wan-proxy;
            the goal is within 5%
  api       p50/p99 latency of GET /v1/jobs/{id} (keep-alive, over the unix socket) with 10
            jobs running and 100 Server-Sent-Events subscribers
  idle      an idle agent's RSS and CPU over 30 s (with one disk and its replication listener)

Usage: benches/scripts/agent.py [--dir DIR] [--size 1GiB] [--trials 5] [--only seed,api,idle]
Prints a Markdown table for docs/BENCHMARKS.md.
"""

import argparse
import http.client
import json
import selectors
import socket
import statistics
import time
from pathlib import Path

from harness import HELIO, Listener, build, fresh, helio, log, print_table, timed, warm


class UnixHTTP(http.client.HTTPConnection):
    """http.client over the agent's unix socket (a client we did not write, with keep-alive)."""

    def __init__(self, path):
        super().__init__("agent", timeout=120)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.path)


def call(conn, method, path, body=None):
    headers = {"content-type": "application/json"} if body is not None else {}
    conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
    r = conn.getresponse()
    data = r.read()
    return r.status, (json.loads(data) if data else None)


class AgentProc:
    def __init__(self, d, name, extra=()):
        self.state = fresh(d / name)
        self.sock = str(self.state / "api.sock")
        self.l = Listener([str(HELIO), "agent", "--name", name, "--state", str(self.state),
                           "--listen", "127.0.0.1:0", *map(str, extra)], d / f"{name}.log")
        self.addr = self.l.addr

    def conn(self):
        return UnixHTTP(self.sock)

    def stop(self):
        self.l.stop()


def wait_done(conn, job_id, limit=3600):
    deadline = time.time() + limit
    while time.time() < deadline:
        _, j = call(conn, "GET", f"/v1/jobs/{job_id}")
        if j["phase"] in ("done", "failed", "cancelled"):
            if j["phase"] != "done":
                raise RuntimeError(f"job {job_id}: {j}")
            return j
        time.sleep(0.02)
    raise RuntimeError(f"job {job_id} did not end")


def med(xs):
    return statistics.median(xs)


def bench_seed(d, size, trials, rows, which=("loopback", "wan")):
    img = d / "seed.img"
    if not img.exists():
        helio("sample-image", "--out", img, "--size", size, "--seed", "12")
    warm(img)
    src = AgentProc(d, "src")
    c = src.conn()
    call(c, "POST", "/v1/disks", {"name": "disk", "path": str(img)})
    links = [("loopback", src.addr, None)]
    wan = Listener([str(HELIO), "wan-proxy", "--listen", "127.0.0.1:0", "--to", src.addr, "--rtt", "20ms",
                    "--bandwidth", "400Mbit"], d / "wan.log")
    links.append(("wan 20 ms, 400 Mbit/s", wan.addr, wan))
    for label, addr, _ in links:
        if label.split()[0] not in which:
            continue
        direct, agent = [], []
        for t in range(trials):
            # Interleaved: the machine's speed drifts within the hour.
            store = fresh(d / "direct-store")
            wall, _, out = timed([HELIO, "seed", "--from", addr, "--name", "disk", "--store", store, "--json"])
            direct.append(wall)
            dst = AgentProc(d, "dst")
            dc = dst.conn()
            start = time.perf_counter()
            _, job = call(dc, "POST", "/v1/jobs", {"kind": "seed", "disk": "disk", "from": addr})
            wait_done(dc, job["id"])
            agent.append(time.perf_counter() - start)
            dst.stop()
            log(f"{label} trial {t}: direct {wall:.2f} s, agent {agent[-1]:.2f} s")
        r = med(agent) / med(direct)
        rows.append([f"seed {label}", f"{size} mixed image, POST /v1/jobs until done vs `helio seed`",
                     f"agent {med(agent):.2f} s (range {min(agent):.2f}–{max(agent):.2f})",
                     f"helio seed {med(direct):.2f} s (range {min(direct):.2f}–{max(direct):.2f})",
                     f"{r:.3f}× time ({'within' if r <= 1.05 else 'outside'} 5%)"])
    wan.stop()
    src.stop()


def sse_subscribers(sock, n):
    sel = selectors.DefaultSelector()
    socks = []
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(sock)
        s.sendall(b"GET /v1/events HTTP/1.1\r\nHost: agent\r\nAccept: text/event-stream\r\n\r\n")
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        socks.append(s)
    return sel, socks


def drain(sel, seconds):
    got = 0
    end = time.time() + seconds
    while time.time() < end:
        for key, _ in sel.select(timeout=0.01):
            try:
                got += len(key.fileobj.recv(65536))
            except BlockingIOError:
                pass
    return got


def bench_api(d, rows):
    src = AgentProc(d, "src-api")
    c = src.conn()
    for i in range(10):
        img = d / f"api-{i}.img"
        if not img.exists():
            helio("sample-image", "--out", img, "--size", "256MiB", "--seed", str(100 + i))
        call(c, "POST", "/v1/disks", {"name": f"d{i}", "path": str(img)})
    # A slow link keeps the ten seeds running for the whole measurement.
    wan = Listener([str(HELIO), "wan-proxy", "--listen", "127.0.0.1:0", "--to", src.addr, "--rtt", "20ms",
                    "--bandwidth", "40Mbit"], d / "wan-api.log")
    dst = AgentProc(d, "dst-api")
    dc = dst.conn()
    ids = [call(dc, "POST", "/v1/jobs", {"kind": "seed", "disk": f"d{i}", "from": wan.addr})[1]["id"] for i in range(10)]
    sel, socks = sse_subscribers(dst.sock, 100)
    drain(sel, 2)
    lat = []
    for k in range(2000):
        t = time.perf_counter()
        status, j = call(dc, "GET", f"/v1/jobs/{ids[k % 10]}")
        lat.append((time.perf_counter() - t) * 1000)
        assert status == 200
        if k % 50 == 0:
            drain(sel, 0.001)
    running = sum(1 for i in ids if call(dc, "GET", f"/v1/jobs/{i}")[1]["phase"] == "transferring")
    got = drain(sel, 1)
    lat.sort()
    p50, p99 = lat[len(lat) // 2], lat[int(len(lat) * 0.99)]
    rows.append(["api", f"GET /v1/jobs/{{id}} ×2000 (keep-alive, unix socket), {running} jobs transferring, 100 SSE subscribers",
                 f"p50 {p50:.2f} ms, p99 {p99:.2f} ms, max {lat[-1]:.1f} ms", "—", f"SSE subscribers read {got} B in the last second"])
    for s in socks:
        s.close()
    dst.stop()
    wan.stop()
    src.stop()


def rss_kib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def bench_idle(d, rows):
    img = d / "idle.img"
    if not img.exists():
        helio("sample-image", "--out", img, "--size", "256MiB", "--seed", "3")
    a = AgentProc(d, "idle")
    call(a.conn(), "POST", "/v1/disks", {"name": "disk", "path": str(img)})
    time.sleep(2)
    cpu0, t0 = a.l.cpu(), time.time()
    time.sleep(30)
    cpu = a.l.cpu() - cpu0
    rss = rss_kib(a.l.proc.pid)
    rows.append(["idle", "agent with one 256 MiB disk, no jobs, 30 s", f"RSS {rss / 1024:.1f} MiB, CPU {100 * cpu / (time.time() - t0):.2f}%",
                 "—", "measured"])
    a.stop()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/var/tmp/helio-bench-agent")
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--only", default="seed,api,idle")
    ap.add_argument("--links", default="loopback,wan", help="the seed's links: loopback, wan")
    a = ap.parse_args()
    build()
    d = Path(a.dir)
    d.mkdir(parents=True, exist_ok=True)
    rows = []
    only = a.only.split(",")
    if "seed" in only:
        bench_seed(d, a.size, a.trials, rows, a.links.split(","))
    if "api" in only:
        bench_api(d, rows)
    if "idle" in only:
        bench_idle(d, rows)
    print_table(f"python3 benches/scripts/agent.py --size {a.size} --trials {a.trials} --only {a.only} --links {a.links}", rows)


if __name__ == "__main__":
    main()
