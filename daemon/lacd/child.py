"""Child processes of the daemon (the train and evaluate children): the parent's side (start with
the allocator environment and PYTHONPATH, relay progress, ask to pause, stop, read the log's tail)
and the child's side (die with the parent, watch for a pause request)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable


EXIT_ERROR = 2  # a child that cannot do its work (bad input or configuration, parent gone); message on stderr
PAUSE_REQUEST = threading.Event()  # set in the child by the parent's "pause" line on stdin (watch_pause_requests)
YIELD_SHARE = 0.75  # of yield_s, the time a paused child gets to reach a step boundary; the rest is the
# idle watch's poll (at most yield_s / 4 or 1 s) and the release of the child's memory after it exits
YIELD_BUDGET_ENV = "LACD_TRAIN_YIELD_BUDGET_S"  # that time, told to the child: a step longer than half of it
# is followed by a checkpoint, so a child ended mid-step loses that one step and nothing before it
PARENT_PID_ENV = "LACD_PARENT_PID"  # the parent's pid, set by child_env, read by die_with_parent


def child_env(lean_heap: bool = True) -> dict[str, str]:
    """The environment of a child: the parent's, with child_malloc_env(lean_heap), the lacd package
    first on PYTHONPATH (source_root) and the parent's pid for die_with_parent."""
    env = dict(os.environ) | child_malloc_env(lean_heap)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(source_root()), env.get("PYTHONPATH")]))
    env[PARENT_PID_ENV] = str(os.getpid())
    return env


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent (PARENT_PID_ENV) dies, so no orphan keeps
    training or holding models; exit at once if the parent died before the request took effect.
    Nothing when the variable is unset (a child started by hand)."""
    parent = os.environ.get(PARENT_PID_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != int(parent):
        os._exit(EXIT_ERROR)


def watch_pause_requests(fd: int) -> threading.Thread:
    """Child side: a thread that sets PAUSE_REQUEST when the parent writes to fd (or closes it).

    A pipe rather than a signal: a Python signal handler runs only between bytecodes, so it would
    wait for a long forward pass anyway, and a stray SIGUSR1 to an OpenMP thread kills the process.
    os.read, not sys.stdin: a daemon thread blocked in a buffered reader aborts interpreter exit."""

    def wait() -> None:
        with contextlib.suppress(OSError):
            os.read(fd, 64)
        PAUSE_REQUEST.set()

    thread = threading.Thread(target=wait, name="lacd-pause", daemon=True)
    thread.start()
    return thread


def child_malloc_env(lean_heap: bool = True) -> dict[str, str]:
    """Allocator settings for a training or evaluation child; a value already in the environment is kept.

    lean_heap (the evaluate child): glibc serves allocations of 64 KiB and more with mmap, so buffers
    freed after each layer go back to the system instead of staying in the heap. A checkpointed
    SmolLM2-135M forward of 1,665 tokens peaked at 1.23 GB RSS instead of 2.39; the evaluate stage's
    generations take as long either way (bench/eval_speed.py: 63.9 s with it, 61.8 s without).
    The train child does without it: every mmap'd activation buffer is faulted in again at each use,
    and a real CPU step (bench/train_step.py, SmolLM2 bf16, a 4,079-token row) took 41-44 s with a
    64 KiB threshold, 34-38 s with 4 MiB, 23-25 s with glibc's own (its threshold rises to 32 MiB as
    buffers are freed), for a peak RSS of 2.3 GiB against 4.0. A user short of memory sets
    MALLOC_MMAP_THRESHOLD_=65536 in the daemon's environment.

    On CUDA, PyTorch's caching allocator grows expandable segments: bitsandbytes dequantizes a whole
    frozen weight per layer (344 MiB on 34B), and with fixed segments a 34B NF4 run in a 24 GB cap
    ran out of memory with 1.99 GiB reserved but unused (bench/train_gpu.py, H100); the memory
    plan's margins assume it."""
    wanted = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    if lean_heap:
        wanted["MALLOC_MMAP_THRESHOLD_"] = "65536"
    return {name: value for name, value in wanted.items() if name not in os.environ}


def trim_heap() -> bool:
    """Give the heap's free pages back to the system (glibc's malloc_trim(0)); False where the C
    library has no malloc_trim (HeapWatch decides when)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    if trim is None:
        return False
    trim(0)
    return True


class HeapWatch:
    """Hands the heap's free pages back (trim_heap) once the process's resident size has grown past
    `growth` x what it was at the first check. The train child checks after each CPU step: on glibc's
    own heap (child_malloc_env(lean_heap=False)) the freed buffers of rows of other shapes stay
    resident, and a 240-lesson SmolLM2 cycle grew to 9.7 GB. Trimming after every step kept it at
    6.6 GB but cost ~4 s a 21 s step on this machine (a third of the CPU time in the kernel,
    faulting the pages in again), so it trims only when the size has grown."""

    def __init__(self, growth: float = 1.5) -> None:
        self.growth = growth
        self.first: int | None = None

    def check(self, resident: int | None = None) -> bool:
        """Trim if `resident` (default: this process's resident size now) passed the bound."""
        if resident is None:
            import psutil

            resident = psutil.Process().memory_info().rss
        if self.first is None:
            self.first = resident
            return False
        return resident > self.growth * self.first and trim_heap()


def source_root() -> Path:
    """The folder that holds the lacd package (daemon/ in a checkout)."""
    return Path(__file__).resolve().parents[1]


def read_tail(path: Path, limit: int = 4000) -> str:
    """The last `limit` characters of a text file ('' if missing)."""
    if not path.exists():
        return ""
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        handle.seek(max(0, handle.tell() - limit))
        return handle.read().decode("utf-8", errors="replace")


def error_from_log(tail: str, prefix: str) -> str | None:
    """The child's own one-line error: the last line of tail that starts with prefix, without it."""
    messages = [line for line in tail.splitlines() if line.startswith(prefix)]
    return messages[-1].removeprefix(prefix) if messages else None


def wait_any(events: list[threading.Event], timeout: float) -> bool:
    """True as soon as one of events is set (checked every 50 ms), False after timeout."""
    deadline = time.monotonic() + timeout
    while not any(e.is_set() for e in events):
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(0.05, left))
    return True


def yield_budget_s() -> float | None:
    """Child side: seconds it has to step aside once asked (YIELD_BUDGET_ENV), None when not told."""
    value = os.environ.get(YIELD_BUDGET_ENV)
    return float(value) if value else None


def yield_child(child: subprocess.Popen, yield_s: float) -> int | None:
    """Ask the training child to checkpoint at its next step boundary and exit; if it has not within
    YIELD_SHARE of yield_s, SIGKILL it: its checkpoints are committed by rename and a step longer than
    half that time was checkpointed when it ended, so it loses at most the step in flight. Returns
    its exit code."""
    with contextlib.suppress(OSError, ValueError):
        child.stdin.write(b"pause\n")
        child.stdin.flush()
    try:
        return child.wait(timeout=yield_s * YIELD_SHARE)
    except subprocess.TimeoutExpired:
        child.kill()
        return child.wait()


def stop_child(child: subprocess.Popen) -> None:
    """SIGTERM the child, then SIGKILL it if it has not exited within 10 s."""
    child.terminate()
    try:
        child.wait(timeout=10)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def relay_progress(path: Path, last_seen: str | None, on_progress: Callable[[dict], None] | None) -> str | None:
    """Call on_progress with the progress file's content if it changed; returns what was seen."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return last_seen
    if text != last_seen and on_progress is not None:
        with contextlib.suppress(ValueError):
            on_progress(json.loads(text))
    return text
