"""lacd.artifacts: one temporary-name convention (.NAME.PID.tmp), atomic files and folders, and the
sweep of what killed writers leave, with real processes."""

import signal
import subprocess
import sys

import pytest

from lacd.artifacts import atomic_folder, sweep_leftovers, write_text_atomic
from lacd.child import child_env
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
