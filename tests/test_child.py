"""lacd.child: the code the train and evaluate children share, with real processes."""

import os
import signal
import subprocess
import sys
import time

import psutil

from lacd.child import EXIT_ERROR, PARENT_PID_ENV, HeapWatch, child_env, error_from_log, read_tail, trim_heap

SLEEPER = "from lacd.child import die_with_parent; import time; die_with_parent(); print('ready', flush=True); time.sleep(60)"
PARENT = f"""
import subprocess, sys, time
from lacd.child import child_env
child = subprocess.Popen([sys.executable, "-c", {SLEEPER!r}], env=child_env())
print(child.pid, flush=True)
time.sleep(60)
"""


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_child_dies_with_its_parent_when_the_parent_is_sigkilled():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], env=child_env(), stdout=subprocess.PIPE, text=True)
    try:
        lines = {parent.stdout.readline().strip() for _ in range(2)}  # the child's pid, and its 'ready'
        assert "ready" in lines  # past die_with_parent
        (pid,) = (int(line) for line in lines - {"ready"})
        assert not _gone(pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 20
        while not _gone(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(pid), "the child outlived its SIGKILLed parent"
    finally:
        parent.kill()
        parent.wait()


def test_a_child_whose_parent_is_already_gone_exits_at_once():
    dead = subprocess.Popen(["true"])
    dead.wait()
    env = child_env() | {PARENT_PID_ENV: str(dead.pid)}  # a parent that died before the child looked
    done = subprocess.run([sys.executable, "-c", SLEEPER], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == EXIT_ERROR and "ready" not in done.stdout


def test_the_error_line_is_read_from_the_log_tail(tmp_path):
    log = tmp_path / "child.log"
    log.write_text("x" * 10_000 + "\nlacd train: error: first\nnoise\nlacd train: error: the last one\nmore noise\n")
    tail = read_tail(log)
    assert len(tail) == 4000 and tail.endswith("more noise\n")
    assert error_from_log(tail, "lacd train: error: ") == "the last one"
    assert error_from_log(tail, "lacd evaluate: error: ") is None
    assert read_tail(tmp_path / "missing.log") == ""


def test_children_get_the_allocator_settings_unless_the_user_chose_their_own(monkeypatch):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    env = child_env()
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert env["MALLOC_MMAP_THRESHOLD_"] == "65536"
    train = child_env(lean_heap=False)  # the train child keeps glibc's own heap: 1.7x faster CPU steps
    assert "MALLOC_MMAP_THRESHOLD_" not in train and train["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert child_env()["MALLOC_MMAP_THRESHOLD_"] == child_env(lean_heap=False)["MALLOC_MMAP_THRESHOLD_"] == "131072"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    assert child_env()["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"


def test_trim_heap_gives_freed_heap_pages_back():
    """Freed buffers in the middle of glibc's heap (the last one still held, so the heap's top is
    not free) stay resident until trim_heap hands their pages back."""
    def resident() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    buffers = [bytearray(b"x" * 100_000) for _ in range(2000)]  # ~200 MB of 100 KB heap chunks
    last = buffers.pop()
    del buffers
    before = resident()
    assert trim_heap() is True
    assert before - resident() > 100_000_000
    assert len(last) == 100_000


def test_the_heap_is_trimmed_only_once_it_has_grown_past_the_bound():
    watch = HeapWatch(growth=1.5)
    assert watch.check(1000) is False and watch.first == 1000  # the first check sets the bound
    assert watch.check(1500) is False  # grown by half: not past it
    assert watch.check(1501) is True  # past it: trimmed (glibc here)
    assert watch.check() is True and watch.first == 1000  # this process's own resident size is far past it
    assert HeapWatch().check() is False  # a new watch's first check only sets its bound
