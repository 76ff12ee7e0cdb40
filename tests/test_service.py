"""The daemon as systemd runs it: a real process, a real notify socket, real signals."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import agent_line, lacd_env, run_cli, wait_until


@pytest.fixture
def notify_socket(tmp_path):
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.2)
    yield path, sock
    sock.close()


class Notifications:
    """Everything the daemon sent to the notify socket so far."""

    def __init__(self, sock):
        self.sock = sock
        self.seen: list[str] = []

    def has(self, message: str) -> bool:
        while True:
            try:
                self.seen.extend(self.sock.recv(4096).decode().split("\n"))
            except (socket.timeout, BlockingIOError):
                return message in self.seen


def start_daemon(env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lacd", "run"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def status(env) -> dict:
    result = run_cli("status", "--json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_daemon_lifecycle_under_systemd_notify(tmp_path, notify_socket):
    path, sock = notify_socket
    log = tmp_path / "agent_interactions.jsonl"
    log.write_text(agent_line(1) + "\n")
    env = lacd_env(tmp_path, log, NOTIFY_SOCKET=path, WATCHDOG_USEC="400000", LACD_WATCH_POLL_INTERVAL="30")
    daemon = start_daemon(env)
    notes = Notifications(sock)
    try:
        assert wait_until(lambda: notes.has("READY=1"), 20)
        assert status(env)["lessons_total"] == 1  # READY comes after the first catch-up
        assert wait_until(lambda: notes.has("WATCHDOG=1"), 5)
        # poll interval is 30 s: only the watchdog event can make this lesson appear quickly
        with open(log, "a") as fh:
            fh.write(agent_line(2) + "\n")
        assert wait_until(lambda: status(env)["lessons_total"] == 2, 10)
        s = status(env)
        assert s["daemon"] == {"running": True, "pid": daemon.pid}
        started = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=10) == 0
        assert time.monotonic() - started < 5
        assert notes.has("STOPPING=1")
    finally:
        daemon.kill()
    assert status(env)["daemon"] == {"running": False, "pid": None}


def test_a_second_daemon_on_the_same_state_dir_is_refused(tmp_path):
    log = tmp_path / "agent_interactions.jsonl"
    env = lacd_env(tmp_path, log)
    first = start_daemon(env)
    try:
        assert wait_until(lambda: status(env)["daemon"]["running"], 20)
        second = subprocess.run([sys.executable, "-m", "lacd", "run"], env=env, capture_output=True, text=True, timeout=30)
        assert second.returncode == 2
        assert f"another lacd daemon (pid {first.pid}) already runs" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=10) == 0


def test_sigterm_during_a_long_backfill_commits_and_exits(tmp_path):
    log = tmp_path / "agent_interactions.jsonl"
    n = 40000
    with open(log, "w") as fh:
        for i in range(n):
            fh.write(agent_line(i) + "\n")
    env = lacd_env(tmp_path, log, LACD_WATCH_BATCH_LINES="50", LACD_LOG_LEVEL="warning")
    daemon = start_daemon(env)
    assert wait_until(lambda: (tmp_path / "state" / "lacd.db").exists(), 20)
    time.sleep(0.3)
    started = time.monotonic()
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=15) == 0
    stopped_after = time.monotonic() - started
    # whatever was committed is a prefix of the log; a catch-up pass completes it exactly
    assert run_cli("ingest", env=env).returncode == 0
    assert status(env)["lessons_total"] == n
    assert stopped_after < 5, f"SIGTERM took {stopped_after:.1f} s to stop a backfill"
