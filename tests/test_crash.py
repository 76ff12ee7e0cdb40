"""SIGKILL the daemon at random moments while another process appends: nothing lost, nothing twice."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time

from conftest import lacd_env, run_cli, wait_until
from lacd.samples import write_log

WRITER = r"""
import json, sys, time, random
import os
path, stop = sys.argv[1], sys.argv[2]
rng = random.Random(7)
i = 0
with open(path, "ab", buffering=0) as fh:
    while not os.path.exists(stop):  # writes until the test has done all its kills
        line = (json.dumps({"user_prompt": f"task {i}", "ai_responses": [f"<tool_code>\nread_file('f{i}')\n</tool_code>", f"done {i}"],
                            "tool_executions": [{"tool_call": f"read_file('f{i}')", "tool_output": f"<tool_output>{i}</tool_output>"}]}) + "\n").encode()
        if rng.random() < 0.3:  # a line written in two pieces: the daemon may see half of it
            cut = rng.randrange(1, len(line))
            fh.write(line[:cut]); time.sleep(0.002); fh.write(line[cut:])
        else:
            fh.write(line)
        time.sleep(rng.random() * 0.004)
        i += 1
print(i)
"""


def test_sigkill_at_random_moments_loses_and_repeats_nothing(tmp_path):
    """Each daemon is killed only after it has stored a lesson of its own (start-up alone takes
    longer than the old fixed delays), so every kill lands in the ingest loop, while the writer
    is still appending."""
    log = tmp_path / "agent_interactions.jsonl"
    env = lacd_env(tmp_path, log, LACD_WATCH_POLL_INTERVAL="0.05", LACD_WATCH_BATCH_LINES="7", LACD_LOG_LEVEL="warning")
    stop = tmp_path / "stop-writing"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(log), str(stop)], stdout=subprocess.PIPE, text=True)
    rng = random.Random(1)
    stored: list[int] = []
    try:
        for _ in range(12):  # each daemon must start up (imports: seconds on a busy machine) before its kill
            daemon = subprocess.Popen([sys.executable, "-m", "lacd", "run"], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            before = stored[-1] if stored else 0
            wait_until(lambda: daemon.poll() is not None or lessons(tmp_path) > before, timeout=60, interval=0.02)
            time.sleep(rng.random() * 0.3)  # somewhere in the ingest loop, a few batches after it resumed
            daemon.send_signal(signal.SIGKILL)
            daemon.wait()
            stored.append(lessons(tmp_path))
    finally:
        stop.touch()
        n_lines = int(writer.communicate(timeout=120)[0])
    assert run_cli("ingest", env=env).returncode == 0

    con = sqlite3.connect(tmp_path / "state" / "lacd.db")
    prompts = [json.loads(raw)["user_prompt"] for (raw,) in con.execute("SELECT raw FROM lessons ORDER BY id")]
    assert all(a < b for a, b in zip([0, *stored], stored)), stored  # every daemon stored lessons before its kill
    assert stored[-1] < n_lines  # and was killed before the writer had finished
    assert prompts == [f"task {i}" for i in range(n_lines)]
    assert con.execute("SELECT count(*) FROM rejects").fetchone()[0] == 0


BACKFILL = r"""
import sys
from pathlib import Path

from lacd import db
from lacd.ingest.store import Store
from lacd.ingest.tailer import Tailer


def main():
    log, state = sys.argv[1], Path(sys.argv[2])
    engine = db.write_engine(state / "lacd.db")
    db.migrate(engine)
    tailer = Tailer(log, Store(engine, {}), max_line=1 << 20, rotate_wait=0, batch_lines=40, pool_bytes=1, workers=1)
    tailer.start()
    tailer.sync()
    tailer.close()


if __name__ == "__main__":
    main()
"""


def lessons(tmp_path) -> int:
    try:
        con = sqlite3.connect(f"file:{tmp_path / 'state' / 'lacd.db'}?mode=ro", uri=True)
        try:
            return con.execute("SELECT count(*) FROM lessons").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:  # not created or not migrated yet
        return 0


def test_sigkill_during_a_backfill_through_the_worker_pool_loses_and_repeats_nothing(tmp_path):
    """The backfill path (chunks classified in a worker process, committed on a thread) killed with
    its worker at random moments: every line is stored once, in file order."""
    log = tmp_path / "agent_interactions.jsonl"
    # 32 MB (~30k lines): on a quiet machine a resumed backfill stores ~2,000 lines between two kills,
    # so the sixth kill still lands inside it (with 8 MB it could finish first)
    write_log(log, size_bytes=32 << 20, seed=4, noise=0.1)
    script = tmp_path / "backfill.py"
    script.write_text(BACKFILL)
    env = lacd_env(tmp_path, log)
    command = [sys.executable, str(script), str(log), str(tmp_path / "state")]
    rng = random.Random(2)
    stored = []
    for _ in range(6):
        child = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        wait_until(lambda: child.poll() is not None or lessons(tmp_path) > (stored[-1] if stored else 0), timeout=60,
                   interval=0.02)
        time.sleep(rng.random() * 0.1)  # somewhere in the backfill, a few batches after it resumed
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)  # the worker process dies with it
        child.wait()
        stored.append(lessons(tmp_path))
    subprocess.run(command, env=env, check=True, capture_output=True, timeout=120)

    data, starts = log.read_bytes(), []
    while len(starts) == 0 or starts[-1] < len(data):
        starts.append(data.index(b"\n", starts[-1] if starts else 0) + 1)
    starts = [0] + starts[:-1]
    con = sqlite3.connect(tmp_path / "state" / "lacd.db")
    assert [o for (o,) in con.execute("SELECT offset FROM lessons ORDER BY id")] == starts
    assert con.execute("SELECT count(*) FROM rejects").fetchone()[0] == 0
    assert len(set(stored)) == 6 and stored[-1] < len(starts)  # each kill landed in the backfill, not after it
