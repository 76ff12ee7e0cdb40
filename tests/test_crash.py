"""SIGKILL the daemon at random moments while another process appends: nothing lost, nothing twice."""

from __future__ import annotations

import json
import random
import signal
import sqlite3
import subprocess
import sys
import time

from conftest import lacd_env, run_cli

WRITER = r"""
import json, sys, time, random
path, n = sys.argv[1], int(sys.argv[2])
rng = random.Random(7)
with open(path, "ab", buffering=0) as fh:
    for i in range(n):
        line = (json.dumps({"user_prompt": f"task {i}", "ai_responses": [f"<tool_code>\nread_file('f{i}')\n</tool_code>", f"done {i}"],
                            "tool_executions": [{"tool_call": f"read_file('f{i}')", "tool_output": f"<tool_output>{i}</tool_output>"}]}) + "\n").encode()
        if rng.random() < 0.3:  # a line written in two pieces: the daemon may see half of it
            cut = rng.randrange(1, len(line))
            fh.write(line[:cut]); time.sleep(0.002); fh.write(line[cut:])
        else:
            fh.write(line)
        time.sleep(rng.random() * 0.004)
"""


def test_sigkill_at_random_moments_loses_and_repeats_nothing(tmp_path):
    log = tmp_path / "agent_interactions.jsonl"
    env = lacd_env(tmp_path, log, LACD_WATCH_POLL_INTERVAL="0.05", LACD_WATCH_BATCH_LINES="7", LACD_LOG_LEVEL="warning")
    n_lines = 12000  # about 30 s of writing: the writer runs through all the kills
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(log), str(n_lines)])
    rng = random.Random(1)
    kills = 0
    try:
        while kills < 50:
            daemon = subprocess.Popen([sys.executable, "-m", "lacd", "run"], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.4 + rng.random() * 0.6)  # past start-up, somewhere in the ingest loop
            daemon.send_signal(signal.SIGKILL)
            daemon.wait()
            kills += 1
    finally:
        writer.wait(timeout=120)
    assert run_cli("ingest", env=env).returncode == 0

    con = sqlite3.connect(tmp_path / "state" / "lacd.db")
    prompts = [json.loads(raw)["user_prompt"] for (raw,) in con.execute("SELECT raw FROM lessons ORDER BY id")]
    assert kills == 50
    assert prompts == [f"task {i}" for i in range(n_lines)]
    assert con.execute("SELECT count(*) FROM rejects").fetchone()[0] == 0
