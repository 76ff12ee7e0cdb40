"""watchdog on the log's directory wakes the tailer; a dead observer is restarted."""

from __future__ import annotations

import threading

from conftest import wait_until
from lacd.ingest.watcher import Watcher


def test_events_on_the_log_wake_and_a_dead_observer_is_restarted(tmp_path):
    wake = threading.Event()
    log = tmp_path / "logs" / "agent_interactions.jsonl"
    watcher = Watcher(str(log), wake)
    watcher.supervise()
    assert watcher.observer is None  # the directory does not exist yet: polling covers it
    log.parent.mkdir()
    watcher.supervise()
    assert watcher.observer is not None and watcher.observer.is_alive()
    try:
        (tmp_path / "logs" / "unrelated.txt").write_text("x")
        log.write_text("{}\n")
        assert wait_until(wake.is_set, 5)
        wake.clear()
        watcher.observer.stop()  # the observer dies
        watcher.observer.join(5)
        watcher.supervise()
        assert watcher.restarts == 1 and watcher.observer.is_alive()
        with open(log, "a") as fh:
            fh.write("{}\n")
        assert wait_until(wake.is_set, 5)
    finally:
        watcher.stop()


def test_unrelated_files_do_not_wake(tmp_path):
    wake = threading.Event()
    watcher = Watcher(str(tmp_path / "agent_interactions.jsonl"), wake)
    watcher.supervise()
    try:
        (tmp_path / "notes.md").write_text("x")
        assert not wait_until(wake.is_set, 1)
    finally:
        watcher.stop()
