"""lacd.artifacts: one temporary-name convention (.NAME.PID.tmp), atomic files and folders, and the
sweep of what killed writers leave, with real processes."""

import signal
import subprocess
import sys
import time

import pytest

from lacd.artifacts import atomic_folder, sweep_leftovers, write_text_atomic
from lacd.child import child_env
from lacd.idle import Verdict
from lacd.runs import RunOutcome
from test_worker import fake_stages, make_executor

WRITER = """
import sys, time
from pathlib import Path
from lacd.artifacts import atomic_folder
with atomic_folder(Path(sys.argv[1])) as tmp:
    (tmp / "adapter_model.safetensors").write_bytes(b"half an adapter")
    print(tmp, flush=True)
    time.sleep(60)
"""


class Agent:
    """Stands in for lacd.idle.IdleMonitor: the agent is busy until the test says it is idle."""

    clock = staticmethod(time.monotonic)

    def __init__(self):
        self.busy = True

    def verdict(self) -> Verdict:
        return Verdict(idle=not self.busy, reason="agent active" if self.busy else "idle")

    def activity(self, since: float) -> None:
        return None


def _writer(final):
    """A real process stopped inside atomic_folder(final); returns it and its temporary folder."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(final)], env=child_env(), stdout=subprocess.PIPE,
                            text=True)
    return proc, type(final)(proc.stdout.readline().strip())


def test_a_sigkilled_writers_leftover_is_swept_when_a_run_starts_and_a_live_writers_is_kept(tmp_path, monkeypatch):
    executor = make_executor(tmp_path)
    run_id = executor.store.create("threshold", 10)
    run_dir = executor.run_dir(run_id)
    killed, leftover = _writer(run_dir / "adapter")
    alive, in_progress = _writer(run_dir / "checkpoints" / "checkpoint-2")
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        assert leftover.name == f".adapter.{killed.pid}.tmp" and (leftover / "adapter_model.safetensors").is_file()
        assert not (run_dir / "adapter").exists()
        fake_stages(monkeypatch)
        executor.execute(run_id)
        assert not leftover.exists()
        assert (in_progress / "adapter_model.safetensors").is_file()  # its writer still runs
    finally:
        alive.kill()
        alive.wait()
    assert sweep_leftovers(tmp_path) == [in_progress]


def test_a_paused_or_stopped_execute_sweeps_nothing_and_the_resume_sweeps_once(tmp_path, monkeypatch):
    """The worker calls execute every poll while a run is paused: those calls start no stage and
    must not walk the state folder; the call that resumes the run removes the leftover."""
    executor = make_executor(tmp_path)
    executor.monitor = agent = Agent()
    swept = []
    monkeypatch.setattr("lacd.worker.sweep_leftovers", lambda root: swept.append(root) or sweep_leftovers(root))
    fake_stages(monkeypatch)
    run_id = executor.store.create("threshold", 10)
    assert executor.execute(run_id) is RunOutcome.PAUSED  # format ran (one sweep); train waits for the agent
    assert swept == [executor.settings.state.dir] and executor.store.get(run_id).status == "paused"
    killed, leftover = _writer(executor.run_dir(run_id) / "adapter")
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert executor.execute(run_id) is RunOutcome.PAUSED
    executor.stop.set()
    assert executor.execute(run_id) is RunOutcome.INTERRUPTED
    assert len(swept) == 1 and leftover.exists()
    executor.stop.clear()
    agent.busy = False
    assert executor.execute(run_id) is RunOutcome.REJECTED  # resumed: train to promote (the fake gate rejects)
    assert len(swept) == 2 and not leftover.exists()


def test_an_atomic_folder_appears_complete_or_not_at_all(tmp_path):
    final = tmp_path / "adapter"
    with atomic_folder(final) as tmp:
        (tmp / "a").write_text("old")
    with pytest.raises(RuntimeError), atomic_folder(final) as tmp:
        (tmp / "a").write_text("half")
        raise RuntimeError("the writer failed")
    assert (final / "a").read_text() == "old"
    with atomic_folder(final) as tmp:
        (tmp / "b").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["b"]
    with pytest.raises(OSError), atomic_folder(final, replace=False) as tmp:
        (tmp / "c").write_text("another writer's")
    assert sorted(p.name for p in final.iterdir()) == ["b"]
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary name left


def test_write_text_atomic_replaces_the_file_and_leaves_no_temporary_name(tmp_path):
    path = tmp_path / "deep" / "evaluation.json"
    write_text_atomic(path, "first")
    write_text_atomic(path, "second é")
    assert path.read_text(encoding="utf-8") == "second é"
    assert [p.name for p in path.parent.iterdir()] == ["evaluation.json"]  # no temporary name left
