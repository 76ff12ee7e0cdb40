"""When a run starts: threshold, an active run, the training window, the cool-down."""

from __future__ import annotations

import time
from datetime import datetime

from sqlalchemy import update

from conftest import agent_line
from lacd import config, db
from lacd.ingest.store import Store
from lacd.ingest.tailer import Tailer
from lacd.models import Run
from lacd.runs import RunStore
from lacd.scheduler import Scheduler, in_window


def test_in_window():
    at = lambda h, m: datetime(2026, 11, 25, h, m)  # noqa: E731
    assert in_window("", at(12, 0))
    assert in_window("01:00-06:00", at(1, 0)) and in_window("01:00-06:00", at(5, 59))
    assert not in_window("01:00-06:00", at(6, 0)) and not in_window("01:00-06:00", at(0, 59))
    assert in_window("22:00-02:00", at(23, 30)) and in_window("22:00-02:00", at(1, 0))
    assert not in_window("22:00-02:00", at(12, 0))


def make(tmp_path, lessons: int, **env):
    log = tmp_path / "agent_interactions.jsonl"
    log.write_text("".join(agent_line(i) + "\n" for i in range(lessons)))
    settings = config.load(env={"LACD_STATE_DIR": str(tmp_path / "state"), "LACD_WATCH_LOG": str(log),
                                "LACD_QUEUE_THRESHOLD": "5", **env})
    engine = db.write_engine(settings.db_path)
    db.migrate(engine)
    tailer = Tailer(log, Store(engine, {}), max_line=1 << 20, rotate_wait=0, batch_lines=100)
    tailer.start()
    tailer.sync()
    started = []
    return Scheduler(settings, RunStore(engine), started.append, now=lambda: datetime(2026, 11, 25, 12, 0)), started


def test_below_threshold_waits(tmp_path):
    sched, started = make(tmp_path, 4)
    assert sched.check() == "waiting for lessons: 4 pending, threshold 5"
    assert started == []
    assert "4 pending" in (tmp_path / "state" / "scheduler.json").read_text()


def test_threshold_starts_one_run_and_only_one(tmp_path):
    sched, started = make(tmp_path, 6)
    assert sched.check().startswith("run #1 started: 6 pending >= threshold 5")
    assert sched.check() == "a run is already active"
    assert started == [1]
    assert sched.store.get(1).lesson_count == 6


def test_outside_the_window_waits(tmp_path):
    sched, started = make(tmp_path, 6, LACD_SCHEDULE_WINDOW="01:00-06:00")
    assert sched.check() == "6 pending, outside the training window 01:00-06:00"
    assert started == []


def test_cooldown_after_a_run(tmp_path):
    sched, started = make(tmp_path, 6, LACD_SCHEDULE_COOLDOWN="30")
    sched.check()
    with sched.store.engine.begin() as conn:  # the run ended a minute ago; its lessons count again
        conn.execute(update(Run).values(status="failed", finished_at=time.time() - 60))
    assert sched.check() == "6 pending, cooling down after the last run"
    assert started == [1]
