"""Is the developer using the workstation? The signals lacd reads before and during a run.

    LogActivity     the agent's log: any change of its size, mtime or inode is activity
    OllamaActivity  Ollama's /api/ps: a model other than lacd's loaded (expiry in the future) is recent use
    GpuActivity     NVML (nvidia-ml-py, optional): GPU memory held by processes outside lacd's tree
    CpuActivity     without NVIDIA: the share of the cores busy outside lacd's process tree
    IdleMonitor     combines them: `verdict()` before a run starts or resumes, `activity()` during one

Activity times are kept on the monotonic clock, so a wall-clock jump can neither make the agent
look idle for hours nor freeze lacd: a log modified "in the future" counts as activity now. A
signal that cannot be read (Ollama down, `/api/ps` answering garbage, NVML failing) is named in
the verdict, and `[schedule] on_ollama_error` / `on_gpu_error` decide whether it counts as busy
(the default: lacd never starts on a guess) or idle.
"""

from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

import structlog

log = structlog.get_logger(__name__)

PINNED_AFTER_S = 30 * 24 * 3600  # an expiry further away is keep_alive < 0: loaded for good, not a sign of use


@dataclass(frozen=True)
class Reading:
    """One signal read once: busy or not, why, and whether it could be read at all."""

    signal: str
    busy: bool
    detail: str
    error: bool = False


@dataclass
class Verdict:
    idle: bool
    reason: str  # the one line `lacd status` shows
    readings: list[Reading] = field(default_factory=list)
    last_activity_s: float | None = None

    def to_dict(self) -> dict:
        return {"idle": self.idle, "reason": self.reason, "last_activity_s": self.last_activity_s,
                "signals": [r.__dict__ for r in self.readings]}


class LogActivity:
    """When the agent's log last changed, on the monotonic clock."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time):
        self.path = Path(path)
        self.clock = clock
        self.wall = wall
        self.seen: tuple | None = None
        self.changed_at: float | None = None  # monotonic; None: the log never existed
        self.note = ""

    def poll(self) -> float | None:
        """Seconds since the log last changed (None if it does not exist and never did)."""
        try:
            st = self.path.stat()
        except OSError:
            return None if self.changed_at is None else self.clock() - self.changed_at
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        now = self.clock()
        if self.seen is None:  # first look: the file's own mtime says how long it has been quiet
            age = self.wall() - st.st_mtime
            self.note = "" if age >= 0 else "the log was modified in the future (clock jump?): counted as activity now"
            self.changed_at = now - max(age, 0.0)
        elif key != self.seen:
            self.changed_at = now
            self.note = ""
        self.seen = key
        return now - self.changed_at


class OllamaActivity:
    """Ollama's /api/ps: a model other than `own_name`'s loaded with an expiry ahead = used recently."""

    def __init__(self, host: str, own_name: str, timeout_s: float = 3.0, wall: Callable[[], float] = time.time):
        self.host = host.rstrip("/") if "://" in host else f"http://{host.rstrip('/')}"
        self.own = own_name
        self.timeout_s = timeout_s
        self.wall = wall
        self.own_vram = 0  # bytes of GPU memory Ollama holds for lacd's own models (its evaluation)

    def read(self) -> Reading:
        import httpx

        try:
            reply = httpx.get(f"{self.host}/api/ps", timeout=self.timeout_s)
            reply.raise_for_status()
            models = reply.json()["models"]
            in_use = [m["name"] for m in models if self._in_use(m)]
            self.own_vram = sum(int(m.get("size_vram") or 0) for m in models if str(m["name"]).startswith(f"{self.own}:"))
        except (httpx.HTTPError, OSError) as exc:
            return Reading("ollama", True, f"Ollama unreachable at {self.host} ({type(exc).__name__})", error=True)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            return Reading("ollama", True, f"Ollama's /api/ps answered something unexpected ({type(exc).__name__}: "
                                           f"{str(exc)[:80]})", error=True)
        if in_use:
            return Reading("ollama", True, f"Ollama has {', '.join(sorted(in_use))} loaded")
        return Reading("ollama", False, "Ollama has no model of the agent loaded")

    def _in_use(self, model: dict) -> bool:
        name = model.get("name") or model.get("model")
        if not isinstance(name, str):
            raise TypeError(f"a model without a name: {model!r}"[:120])
        if name.startswith(f"{self.own}:"):
            return False
        ahead = parse_go_time(str(model["expires_at"])) - self.wall()
        return 0 < ahead < PINNED_AFTER_S


def parse_go_time(text: str) -> float:
    """Go's RFC 3339 with nanoseconds ("2024-06-04T14:38:31.83753-07:00", "...Z") as a Unix time;
    Python 3.10's fromisoformat takes only 0, 3 or 6 fraction digits. ValueError if it is not one."""
    match = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", text.strip())
    if not match:
        raise ValueError(f"not an RFC 3339 time: {text[:40]!r}")
    zone = "+00:00" if match.group(3) == "Z" else match.group(3)
    when = datetime.fromisoformat(match.group(1) + zone)
    return when.timestamp() + float(f"0.{match.group(2) or 0}")


def lacd_pids() -> set[int]:
    """This process and every descendant (training and evaluation children)."""
    import psutil

    me = psutil.Process()
    pids = {me.pid}
    try:
        pids |= {child.pid for child in me.children(recursive=True)}
    except psutil.Error:
        pass
    return pids


class GpuActivity:
    """GPU memory used by processes that are not lacd's, through NVML; `available` False without it."""

    def __init__(self, threshold_mb: float):
        self.threshold_mb = threshold_mb
        self.nvml = None
        self.why_not = ""
        try:
            import pynvml

            pynvml.nvmlInit()
            if pynvml.nvmlDeviceGetCount() < 1:
                raise RuntimeError("no GPU")
            self.nvml = pynvml
        except ImportError:
            self.why_not = "NVML not installed (pip install nvidia-ml-py)"
        except Exception as exc:  # noqa: BLE001 - pynvml's NVMLError_* (no driver, no library) or no GPU at all
            self.why_not = f"no NVIDIA GPU through NVML ({type(exc).__name__})"

    @property
    def available(self) -> bool:
        return self.nvml is not None

    def read(self, own_bytes: int = 0) -> Reading:
        """own_bytes: memory other processes hold for lacd (Ollama serving lacd's model to its evaluation)."""
        nv = self.nvml
        ours = lacd_pids()
        try:
            used = 0
            for index in range(nv.nvmlDeviceGetCount()):
                handle = nv.nvmlDeviceGetHandleByIndex(index)
                procs = nv.nvmlDeviceGetComputeRunningProcesses(handle) + nv.nvmlDeviceGetGraphicsRunningProcesses(handle)
                used += sum((p.usedGpuMemory or 0) for p in procs if p.pid not in ours)
        except Exception as exc:  # noqa: BLE001 - any NVMLError
            return Reading("gpu", True, f"NVML failed ({type(exc).__name__}: {exc})", error=True)
        mb = max(0, used - own_bytes) / 2**20
        if mb > self.threshold_mb:
            return Reading("gpu", True, f"other processes hold {mb:.0f} MB of GPU memory (> {self.threshold_mb:.0f})")
        return Reading("gpu", False, f"other processes hold {mb:.0f} MB of GPU memory")


class CpuActivity:
    """Cores busy outside lacd's process tree between two reads (psutil). The instantaneous form of
    'load average less lacd's share': the 1-minute load average lags a minute behind, and a run must
    step aside within seconds."""

    def __init__(self, threshold_pct: float, clock: Callable[[], float] = time.monotonic):
        self.threshold_pct = threshold_pct
        self.clock = clock
        self.last: tuple[float, float, dict[int, float]] | None = None
        self.reading = Reading("cpu", False, "CPU use of other processes: measuring")

    def _sample(self) -> tuple[float, float, dict[int, float]]:
        import psutil

        t = psutil.cpu_times()
        busy = t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0) + getattr(t, "steal", 0)
        mine = {}
        for pid in lacd_pids():
            try:
                c = psutil.Process(pid).cpu_times()
                mine[pid] = c.user + c.system
            except psutil.Error:
                pass
        return self.clock(), busy, mine

    def read(self) -> Reading:
        if self.last is not None and self.clock() - self.last[0] < 0.5:
            return self.reading  # read again too soon (several threads ask): the last measurement stands
        now, busy, mine = self._sample()
        previous, self.last = self.last, (now, busy, mine)
        if previous is None:
            return self.reading
        then, busy_then, mine_then = previous
        ours = sum(cpu - mine_then.get(pid, 0.0) for pid, cpu in mine.items())
        cores = os.cpu_count() or 1
        other_pct = max(0.0, (busy - busy_then) - ours) / ((now - then) * cores) * 100
        if other_pct > self.threshold_pct:
            self.reading = Reading("cpu", True, f"other processes use {other_pct:.0f}% of the CPU (> {self.threshold_pct:.0f}%)")
        else:
            self.reading = Reading("cpu", False, f"other processes use {other_pct:.0f}% of the CPU")
        return self.reading


class IdleMonitor:
    """All signals together; thread-safe enough for the scheduler, the run worker and the pause watch."""

    def __init__(self, settings, clock: Callable[[], float] = time.monotonic):
        s = settings.schedule
        self.idle_s = s.idle_minutes * 60
        self.on_ollama_error = s.on_ollama_error
        self.on_gpu_error = s.on_gpu_error
        self.log = LogActivity(settings.watch.log, clock=clock)
        self.ollama = OllamaActivity(settings.ollama.host, settings.model.name)
        self.gpu = GpuActivity(s.gpu_other_mb)
        self.cpu = CpuActivity(s.cpu_other_pct) if (not self.gpu.available and s.cpu_other_pct > 0) else None
        self.clock = clock
        self.lock = threading.Lock()  # the scheduler, the run worker and the pause watch all ask

    def describe_hardware(self) -> str:
        if self.gpu.available:
            return "GPU through NVML"
        return f"{self.gpu.why_not}; " + ("watching CPU use instead" if self.cpu else "CPU use not watched ([schedule] cpu_other_pct = 0)")

    def readings(self) -> list[Reading]:
        """Ollama and GPU/CPU, with the error policy applied (an unreadable signal is busy or idle as configured)."""
        out = []
        if self.ollama is not None:
            out.append(self._policy(self.ollama.read(), self.on_ollama_error, "[schedule] on_ollama_error"))
        if self.gpu.available:
            own = self.ollama.own_vram if self.ollama is not None else 0
            out.append(self._policy(self.gpu.read(own), self.on_gpu_error, "[schedule] on_gpu_error"))
        elif self.cpu is not None:
            out.append(self.cpu.read())
        return out

    @staticmethod
    def _policy(reading: Reading, policy: str, key: str) -> Reading:
        if not reading.error:
            return reading
        what = "treated as busy" if policy == "busy" else "treated as idle"
        return Reading(reading.signal, policy == "busy", f"{reading.detail}: {what} ({key} = {policy})", error=True)

    def verdict(self) -> Verdict:
        """May a run start (or resume) now? Needs the log quiet for idle_minutes and nothing else busy."""
        with self.lock:
            return self._verdict()

    def _verdict(self) -> Verdict:
        quiet = self.log.poll()
        readings = self.readings()
        busy = [r for r in readings if r.busy]
        if quiet is not None and quiet < self.idle_s:
            ago = _minutes(quiet)
            reason = (f"waiting for the agent to be idle: last activity {ago} ago, needs {_minutes(self.idle_s)}"
                      + (f" ({self.log.note})" if self.log.note else ""))
            return Verdict(False, reason, readings, quiet)
        if busy:
            return Verdict(False, "waiting for the agent to be idle: " + "; ".join(r.detail for r in busy), readings, quiet)
        notes = [r.detail for r in readings if r.error]
        return Verdict(True, "idle" + (": " + "; ".join(notes) if notes else ""), readings, quiet)

    def activity(self, since: float) -> str | None:
        """During a run: what made the agent active since `since` (monotonic), or None."""
        with self.lock:
            return self._activity(since)

    def _activity(self, since: float) -> str | None:
        quiet = self.log.poll()
        if quiet is not None and self.clock() - quiet > since:
            return "new log line"
        busy = [r.detail for r in self.readings() if r.busy]
        return "; ".join(busy) if busy else None


def _minutes(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min"
