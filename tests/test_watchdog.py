"""WATCHDOG=1 while the ingest loop runs, also while it backs off from a failure it reports (the
database locked by another process): a restart would not help, so systemd must not kill it
(README, "When something fails"); the failure is counted and the line lands once the lock goes.
A real Service on a real state dir and a real notify socket."""

from __future__ import annotations

import socket
import sqlite3

import pytest

from conftest import agent_line, lacd_env
from lacd import config, db
from lacd.service import Service, prepare_state_dir
from lacd.systemd import Notifier


@pytest.fixture
def notify(tmp_path):
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    yield path, sock
    sock.close()


def received(sock) -> list[str]:
    out = []
    while True:
        try:
            out.extend(sock.recv(4096).decode().split("\n"))
        except BlockingIOError:
            return out


def locked_then_released(tmp_path, path, sock, monkeypatch):
    """A Service (ingestion only) that syncs once, fails three loops on a locked database while a
    line is appended, then loops once more; returns (watchdog pings per loop, failures, lessons)."""
    monkeypatch.setattr(db, "BUSY_TIMEOUT_MS", 200)  # a locked database fails the loop in 0.2 s, not 10
    log = tmp_path / "agent_interactions.jsonl"
    log.write_text(agent_line(1) + "\n")
    settings = config.load(env=lacd_env(tmp_path, log, LACD_LOG_LEVEL="warning"))
    service = Service(settings, Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4"}))  # every healthy loop pings
    monkeypatch.setattr(service, "_start_learning", lambda engine: None)
    prepare_state_dir(settings)
    service.lock.acquire()
    pings, failures = [], []
    try:
        service.initialize()
        assert "READY=1" in received(sock)

        def loop() -> None:
            service._step()
            pings.append(received(sock).count("WATCHDOG=1"))
            failures.append(service.failures)

        loop()
        blocker = sqlite3.connect(settings.db_path, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")  # another process holds the database
        with open(log, "a") as fh:
            fh.write(agent_line(2) + "\n")
        for _ in range(3):
            loop()
        blocker.rollback()
        blocker.close()
        loop()
    finally:
        service.tailer.close()
        service.lock.release()
    with sqlite3.connect(settings.db_path) as con:
        lessons = con.execute("SELECT source_id, offset, status FROM lessons ORDER BY id").fetchall()
    return pings, failures, lessons


def test_watchdog_pings_go_on_while_ingest_backs_off_and_the_line_lands_after(tmp_path, notify, monkeypatch):
    pings, failures, lessons = locked_then_released(tmp_path, *notify, monkeypatch)
    assert failures == [0, 1, 2, 3, 0]
    assert pings == [1, 1, 1, 1, 1]  # a loop backing off from a reported failure is alive: systemd must not restart it
    second = len(agent_line(1)) + 1
    assert [(o, s) for _, o, s in lessons if o == second] == [(second, "pending")]  # the line waited, then landed


def test_a_sync_failed_on_a_locked_database_stores_no_line_twice(tmp_path, notify, monkeypatch):
    _, _, lessons = locked_then_released(tmp_path, *notify, monkeypatch)
    assert lessons == [(1, 0, "pending"), (1, len(agent_line(1)) + 1, "pending")]
