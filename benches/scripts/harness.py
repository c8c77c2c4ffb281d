"""Shared pieces of heliotrope's end-to-end benchmarks: processes, timing, CPU accounting.

Each benchmark runs helio and its anchor tool in the same run on the same files, so results
are compared as ratios (this machine varies 15-30% between runs).
"""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HELIO = ROOT / "target" / "release" / "helio"
CLK = os.sysconf("SC_CLK_TCK")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def build():
    subprocess.run(["cargo", "build", "--release", "--bin", "helio"], cwd=ROOT, check=True)


def helio(*args, **kw):
    return subprocess.run([str(HELIO), *map(str, args)], check=True, capture_output=True, text=True, **kw)


def cpu_of(pid):
    """User+system CPU seconds of a live process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


class Listener:
    """A helio (or other) process that prints `listening on ADDR`, or a socket path to wait for."""

    def __init__(self, args, log_path, socket=None, env=None):
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        self.addr = None
        if socket:
            deadline = time.time() + 60
            while not Path(socket).exists():
                if time.time() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"{args[0]} did not create {socket}")
                time.sleep(0.05)
            self.addr = socket
        else:
            for line in self.proc.stdout:
                m = re.match(r"listening on (\S+)", line)
                if m:
                    self.addr = m.group(1)
                    break
            if not self.addr:
                raise RuntimeError(f"{args} did not start: see {log_path}")

    def cpu(self):
        return cpu_of(self.proc.pid)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def timed(args, **kw):
    """Runs a command; returns (wall seconds, child CPU seconds, stdout)."""
    start = time.perf_counter()
    p = subprocess.Popen([str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - start
    out = p.stdout.read()
    err = p.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{args} failed: {err[-2000:]}")
    return wall, ru.ru_utime + ru.ru_stime, out


def warm(path):
    """Reads a file once so the page cache holds it (the anchors were measured warm)."""
    with open(path, "rb") as f:
        while f.read(16 << 20):
            pass


def drop_caches():
    subprocess.run(["sync"])
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass


def fresh(path):
    shutil.rmtree(path, ignore_errors=True)
    return Path(path)


def machine():
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = int(Path("/proc/meminfo").read_text().split()[1]) // (1024 * 1024)
    return f"{os.cpu_count()} vCPU {cpu}, {mem} GiB"


def print_table(command, rows):
    """Prints results as the Markdown table docs/BENCHMARKS.md takes, with date, machine, command."""
    import datetime
    print(f"\n{datetime.date.today()} · {machine()} · `{command}`\n")
    print("| case | what | helio | anchor | ratio |")
    print("|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


def write_trial(src_file, uri):
    """Seconds of an `nbdcopy --flush` upload of src_file to uri, then fio 4 KiB random-write
    IOPS at QD32 for 8 s against it. Synced before each: fio leaves ~600 MB of dirty pages
    (it does not flush), whose writeback slowed whatever ran next 2-7x."""
    import json
    subprocess.run(["sync"], check=True)
    up, _, _ = timed(["nbdcopy", "--flush", str(src_file), uri])
    subprocess.run(["sync"], check=True)
    _, _, out = timed(["fio", "--name=w", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=4k", "--iodepth=32",
                       "--runtime=8", "--time_based", "--output-format=json"])
    iops = json.loads(out[out.index("{"):])["jobs"][0]["write"]["iops"]
    return up, iops
