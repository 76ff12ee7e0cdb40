"""Ingestion numbers: backfill speed and memory, append-to-queued latency, idle CPU.

    python bench/ingest.py                 # the README's numbers: a 1 GiB log (2^30 bytes)
    python bench/ingest.py --size 50MB     # a quick look (sizes as lacd.samples reads them: 1GB = 10^9)

1. Backfill: a generated log of realistic local-ai-coder lines (lacd.samples, 10% noise) is read
   by `lacd ingest` in a child process: lines/s, MiB/s, the CPU time of it and its classifier worker
   processes (user + system, so a number that other work on the machine disturbs less than the
   wall clock), and memory two ways: the peak RSS of the largest process (ru_maxrss) and the peak
   of the sum over the process tree (RSS, and PSS, which counts shared pages once), sampled.
2. Latency: `lacd run` on the same state; lines are appended one at a time at random intervals;
   latency = the lesson's ingested_at minus the moment the line was flushed (p50, p99).
3. Idle: the daemon's CPU time over a quiet period, as a percentage of one core.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lacd.samples import SamplesError, generate_lines, parse_size, write_log


def env_for(work: Path, log: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LACD_")}
    env.update(LACD_STATE_DIR=str(work / "state"), LACD_WATCH_LOG=str(log), LACD_LOG_LEVEL="warning",
               LACD_QUEUE_THRESHOLD=str(10**9),  # measure ingestion alone: no training run starts
               LACD_LOG_FORMAT="json")
    return env


def backfill(work: Path, log: Path, size: int) -> dict:
    started = time.perf_counter()
    lines = write_log(log, size_bytes=size, seed=1, noise=0.1)
    gen_s = time.perf_counter() - started
    nbytes = log.stat().st_size
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = os.getloadavg()[0]
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "lacd", "ingest"], env=env_for(work, log),
                             stdout=subprocess.DEVNULL)
    peaks = tree_memory(child)
    wall = time.perf_counter() - started
    if child.returncode:
        raise SystemExit(f"lacd ingest failed with exit code {child.returncode}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # workers are reaped by the child: counted too
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"lines": lines, "mb": nbytes / 2**20, "generate_s": gen_s, "wall_s": wall, "cpu_s": cpu,
            "cpu_us_per_line": cpu / lines * 1e6, "cores": cpu / wall, "load_before": load,
            "lines_per_s": lines / wall, "mb_per_s": nbytes / 2**20 / wall,
            "peak_rss_mb": after.ru_maxrss / 1024, **peaks}


def tree_memory(child: subprocess.Popen, every: float = 0.1) -> dict:
    """Wait for `child`, sampling the summed RSS (and, less often, PSS) of it and its descendants."""
    import psutil

    root = psutil.Process(child.pid)
    rss = pss = procs = 0
    tick = 0
    while child.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            break
        rss = max(rss, sum(_memory(p, "rss") for p in tree))
        if tick % 10 == 0:  # reading smaps is slow: once a second
            pss = max(pss, sum(_memory(p, "pss") for p in tree))
        procs = max(procs, len(tree))
        tick += 1
        time.sleep(every)
    child.wait()
    return {"sum_rss_mb": rss / 2**20, "sum_pss_mb": pss / 2**20, "processes": procs}


def _memory(proc, field: str) -> int:
    import psutil

    try:
        info = proc.memory_full_info() if field == "pss" else proc.memory_info()
        return getattr(info, field)
    except psutil.Error:
        return 0


def visible(con: sqlite3.Connection, prompt: str) -> bool:
    return con.execute("SELECT 1 FROM lessons WHERE id > (SELECT max(id) - 50 FROM lessons) AND raw LIKE ?",
                       (f"%{prompt}%",)).fetchone() is not None


def latency_and_idle(work: Path, log: Path, n: int, idle_s: float) -> dict:
    """Append one line at a time; the latency is until a reader sees it in the database."""
    import psutil

    env = env_for(work, log)
    daemon = subprocess.Popen([sys.executable, "-m", "lacd", "run"], env=env, stderr=subprocess.DEVNULL)
    try:
        time.sleep(5)  # start-up and catch-up
        con = sqlite3.connect(f"file:{work / 'state' / 'lacd.db'}?mode=ro", uri=True)
        rng = random.Random(3)
        template = json.loads(next(generate_lines(1, seed=9)))
        lat = []
        with open(log, "a") as fh:
            for i in range(n):
                template["user_prompt"] = f"latency probe {i}"
                fh.write(json.dumps(template) + "\n")
                fh.flush()
                start = time.perf_counter()
                while not visible(con, f"latency probe {i}\""):
                    if time.perf_counter() - start > 10:
                        break
                    time.sleep(0.001)
                lat.append(time.perf_counter() - start)
                time.sleep(rng.uniform(0.01, 0.2))
        con.close()
        lat.sort()
        proc = psutil.Process(daemon.pid)
        before = sum(proc.cpu_times()[:2])
        time.sleep(idle_s)
        idle_cpu = (sum(proc.cpu_times()[:2]) - before) / idle_s * 100
        rss_mb = proc.memory_info().rss / 2**20
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)
    return {"probes": n, "received": len(lat), "p50_ms": 1000 * statistics.median(lat),
            "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], "max_ms": 1000 * lat[-1],
            "idle_cpu_pct": idle_cpu, "daemon_rss_mb": rss_mb}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1GiB", help="size of the generated log: 1GiB (default), 500MB, ...")
    ap.add_argument("--probes", type=int, default=300, help="lines appended for the latency test")
    ap.add_argument("--idle", type=float, default=30.0, help="seconds of idleness measured")
    ap.add_argument("--dir", help="work folder (default: a temporary one, removed after)")
    args = ap.parse_args()
    try:
        size = parse_size(args.size)
    except SamplesError as exc:
        ap.error(str(exc))
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        work = Path(tmp)
        log = work / "agent_interactions.jsonl"
        b = backfill(work, log, size)
        lat = latency_and_idle(work, log, args.probes, args.idle)
    print(f"| backfill | {b['mb']:.0f} MiB, {b['lines']} lines | {b['wall_s']:.1f} s | {b['lines_per_s']:,.0f} lines/s | "
          f"{b['mb_per_s']:.1f} MiB/s | peak RSS {b['peak_rss_mb']:.0f} MB (largest process) |")
    print(f"| backfill CPU | {b['cpu_s']:.1f} s user+sys, {b['cpu_us_per_line']:.0f} us/line | {b['cores']:.2f} cores busy | "
          f"load average before: {b['load_before']:.2f} | {b['processes']} processes | "
          f"sum of RSS {b['sum_rss_mb']:.0f} MB, of PSS {b['sum_pss_mb']:.0f} MB |")
    print(f"| latency  | {lat['received']}/{lat['probes']} appended lines | p50 {lat['p50_ms']:.0f} ms | "
          f"p99 {lat['p99_ms']:.0f} ms | max {lat['max_ms']:.0f} ms | |")
    print(f"| idle     | {args.idle:.0f} s | {lat['idle_cpu_pct']:.2f}% of a core | RSS {lat['daemon_rss_mb']:.0f} MB | | |")


if __name__ == "__main__":
    main()
