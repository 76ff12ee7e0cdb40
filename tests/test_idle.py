"""The idle signals (lacd/idle.py): the agent's log, Ollama's /api/ps (the stand-in), NVML or the
CPU, their failures, and a clock jump."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lacd import config
from lacd.idle import CpuActivity, GpuActivity, IdleMonitor, LogActivity, OllamaActivity, lacd_pids
from ollama_standin import StandIn, hold_loaded


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def settings(tmp_path, **env):
    base = {"LACD_STATE_DIR": str(tmp_path / "state"), "LACD_WATCH_LOG": str(tmp_path / "agent.jsonl")}
    return config.load(env={**base, **{k: str(v) for k, v in env.items()}})


def test_log_quiet_time_comes_from_its_mtime_then_from_changes(tmp_path):
    log = tmp_path / "agent.jsonl"
    clock = Clock()
    activity = LogActivity(log, clock=clock)
    assert activity.poll() is None  # no log yet: nothing says the agent is active
    log.write_text("{}\n")
    os.utime(log, (time.time() - 3600, time.time() - 3600))
    assert activity.poll() == pytest.approx(3600, abs=5)
    clock.now += 30
    assert activity.poll() == pytest.approx(3630, abs=5)
    with open(log, "a") as fh:
        fh.write("{}\n")
    assert activity.poll() == 0
    clock.now += 12
    assert activity.poll() == 12


def test_a_log_modified_in_the_future_is_activity_now_and_idle_after_the_period(tmp_path):
    log = tmp_path / "agent.jsonl"
    log.write_text("{}\n")
    future = time.time() + 7 * 24 * 3600  # the wall clock jumped back a week since the last line
    os.utime(log, (future, future))
    clock = Clock()
    s = settings(tmp_path, LACD_SCHEDULE_IDLE_MINUTES=1, LACD_SCHEDULE_CPU_OTHER_PCT=0,
                 LACD_SCHEDULE_ON_OLLAMA_ERROR="idle", LACD_OLLAMA_HOST="http://127.0.0.1:9")
    monitor = IdleMonitor(s, clock=clock)
    verdict = monitor.verdict()
    assert not verdict.idle
    assert "last activity 0 s ago, needs 1 min" in verdict.reason and "clock jump" in verdict.reason
    clock.now += 61  # the monotonic clock moves on: no hang until the wall clock catches up
    assert monitor.verdict().idle


@pytest.fixture
def standin(tmp_path):
    with StandIn(tmp_path / "ollama") as s:
        yield s


def test_ollama_ps_a_loaded_model_of_the_agent_is_recent_use(standin):
    ps = OllamaActivity(standin.host, "lacd-coder")
    assert ps.read() == ps.read().__class__("ollama", False, "Ollama has no model of the agent loaded")
    hold_loaded(standin, "lacd-coder:v3", 300)  # lacd's own model (its evaluation) is not the agent
    assert not ps.read().busy
    hold_loaded(standin, "codellama:7b", -1)  # keep_alive -1: loaded for good, says nothing about use
    assert not ps.read().busy
    hold_loaded(standin, "codellama:7b", 300)
    reading = ps.read()
    assert reading.busy and not reading.error
    assert reading.detail == "Ollama has codellama:7b loaded"


class Garbage(BaseHTTPRequestHandler):
    replies = [b"<html>busy</html>", b'{"models": "none"}', b'{"models": [{"name": "x", "expires_at": "soon"}]}',
               b'{"nothing": []}']

    def do_GET(self):  # noqa: N802
        body = self.replies[self.server.count % len(self.replies)]
        self.server.count += 1
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_ollama_garbage_or_unreachable_is_an_error_that_the_policy_turns_busy_or_idle(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Garbage)
    server.count = 0
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        ps = OllamaActivity(f"http://127.0.0.1:{server.server_address[1]}", "lacd-coder")
        readings = [ps.read() for _ in Garbage.replies]
    finally:
        server.shutdown()
        server.server_close()
    assert all(r.error and r.busy and "/api/ps answered something unexpected" in r.detail for r in readings), readings

    (tmp_path / "agent.jsonl").write_text("")
    os.utime(tmp_path / "agent.jsonl", (0, 0))
    down = {"LACD_OLLAMA_HOST": "http://127.0.0.1:9", "LACD_SCHEDULE_CPU_OTHER_PCT": 0}
    busy = IdleMonitor(settings(tmp_path, **down)).verdict()
    assert not busy.idle
    assert "Ollama unreachable at http://127.0.0.1:9" in busy.reason
    assert "treated as busy ([schedule] on_ollama_error = busy)" in busy.reason
    idle = IdleMonitor(settings(tmp_path, LACD_SCHEDULE_ON_OLLAMA_ERROR="idle", **down)).verdict()
    assert idle.idle and "treated as idle" in idle.reason
    assert json.dumps(idle.to_dict())  # recorded for `lacd status --json`


def test_without_nvml_the_gpu_signal_says_why_and_the_cpu_is_watched(tmp_path):
    gpu = GpuActivity(512)
    if gpu.available:
        pytest.skip("this machine has an NVIDIA GPU")
    assert "NVML" in gpu.why_not  # not installed, or installed without a driver: both name NVML
    monitor = IdleMonitor(settings(tmp_path, LACD_OLLAMA_HOST="http://127.0.0.1:9"))
    assert monitor.cpu is not None and [r.signal for r in monitor.readings()] == ["ollama", "cpu"]
    assert "watching CPU use instead" in monitor.describe_hardware()


BURN = "import time\nend = time.time() + 30\nwhile time.time() < end: pass\n"


def test_cpu_used_by_lacds_own_children_is_not_other_use():
    burner = subprocess.Popen([sys.executable, "-c", BURN])
    try:
        assert burner.pid in lacd_pids()
        cpu = CpuActivity(threshold_pct=0)
        cpu.read()
        time.sleep(1.5)
        then = cpu.last
        cpu.read()
        now = cpu.last
        burned = now[2][burner.pid] - then[2][burner.pid]
        assert burned > 0  # the burner's CPU time is in lacd's share, which is taken off the machine's
    finally:
        burner.kill()
        burner.wait()


def test_activity_during_a_run_names_a_new_log_line(tmp_path):
    log = tmp_path / "agent.jsonl"
    log.write_text("{}\n")
    os.utime(log, (0, 0))
    clock = Clock()
    s = settings(tmp_path, LACD_SCHEDULE_IDLE_MINUTES=0, LACD_SCHEDULE_CPU_OTHER_PCT=0,
                 LACD_SCHEDULE_ON_OLLAMA_ERROR="idle", LACD_OLLAMA_HOST="http://127.0.0.1:9")
    monitor = IdleMonitor(s, clock=clock)
    since = clock.now
    assert monitor.activity(since) is None
    clock.now += 5
    with open(log, "a") as fh:
        fh.write("{}\n")
    assert monitor.activity(since) == "new log line"


def test_the_report_draws_the_pauses_on_a_time_line(tmp_path):
    from lacd.report import load_pauses, write_report

    t0 = 1_700_000_000.0
    (tmp_path / "pauses.jsonl").write_text("\n".join(json.dumps(e) for e in [
        {"since": t0 + 60, "stage": "train", "step": 12, "reason": "new log line"},
        {"until": t0 + 240, "stage": "train"},
        {"since": t0 + 300, "stage": "evaluate", "step": None, "reason": "Ollama has codellama:7b loaded"},
        "cut by a cra",
    ]) + "\n")
    pauses = load_pauses(tmp_path)
    assert [(p["since"] - t0, p["until"] and p["until"] - t0) for p in pauses] == [(60, 240), (300, None)]
    history = [{"phase": "train", "step": i, "loss": 2.0, "updated_at": t0 + 5 * i} for i in range(1, 30)]
    page = write_report(tmp_path, {"id": 1, "started_at": t0, "finished_at": t0 + 400}, {}, {}, history, {}, None,
                        lengths={}, pauses=pauses).read_text()
    assert "Pauses for the agent" in page and "time line with pauses" in page
    assert "for 3.0 min, at train step 12: new log line" in page
    assert "at evaluate: Ollama has codellama:7b loaded" in page
    plain = write_report(tmp_path, {"id": 1}, {}, {}, history, {}, None, lengths={}).read_text()
    assert "Pauses for the agent" not in plain


class FakeNvml:
    """pynvml's calls as NVML answers them (this machine has no NVIDIA driver): one GPU, its processes."""

    class NVMLError(Exception):
        pass

    def __init__(self, procs):
        self.procs = procs

    def nvmlInit(self):  # noqa: N802 - pynvml's names
        pass

    def nvmlDeviceGetCount(self):  # noqa: N802
        return 1

    def nvmlDeviceGetHandleByIndex(self, index):  # noqa: N802
        return index

    def nvmlDeviceGetComputeRunningProcesses(self, handle):  # noqa: N802
        if self.procs is None:
            raise self.NVMLError("GPU is lost")
        return [type("P", (), {"pid": pid, "usedGpuMemory": mb * 2**20})() for pid, mb in self.procs]

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle):  # noqa: N802
        return []


def test_gpu_memory_of_other_processes_counts_lacds_own_and_ollamas_share_for_lacd_do_not(tmp_path, monkeypatch):
    nvml = FakeNvml([(os.getpid(), 20000), (1, 300)])
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    gpu = GpuActivity(512)
    assert gpu.available
    assert not gpu.read().busy  # lacd's own 20 GB are not the agent's
    nvml.procs.append((2, 6000))  # the agent's Ollama loads codellama
    assert gpu.read().detail == "other processes hold 6300 MB of GPU memory (> 512)"
    assert not gpu.read(own_bytes=6000 * 2**20).busy  # ...unless Ollama serves lacd's own model to its evaluation
    nvml.procs = None
    s = settings(tmp_path, LACD_OLLAMA_HOST="http://127.0.0.1:9", LACD_SCHEDULE_ON_OLLAMA_ERROR="idle",
                 LACD_SCHEDULE_ON_GPU_ERROR="idle")
    reading = IdleMonitor(s).readings()[-1]
    assert (reading.signal, reading.busy, reading.error) == ("gpu", False, True)
    assert "NVML failed" in reading.detail and "treated as idle ([schedule] on_gpu_error = idle)" in reading.detail


def test_ollamas_times_parse_with_any_number_of_fraction_digits():
    from lacd.idle import parse_go_time

    assert parse_go_time("2024-06-04T14:38:31.83753-07:00") == pytest.approx(1717537111.83753)
    assert parse_go_time("2024-06-04T21:38:31Z") == 1717537111
    with pytest.raises(ValueError, match="not an RFC 3339 time"):
        parse_go_time("soon")
