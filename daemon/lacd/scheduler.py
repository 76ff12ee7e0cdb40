"""Decides when a run starts: an APScheduler 3 interval job that only decides, never trains.

A run starts when `pending >= [queue] threshold`, no run is active, the clock is inside the
optional training window, the cool-down since the last run has passed, and (with a `monitor`,
lacd.idle) the agent is idle. Each decision is logged and kept in the daemon's state file with the
idle signals it read (shown by `lacd status`).
"""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path
from typing import Callable

import structlog
from apscheduler.schedulers.background import BackgroundScheduler

from lacd import forget, listings
from lacd.artifacts import write_json_atomic
from lacd.config import Settings, parse_window
from lacd.runs import RunOutcome, RunStore

log = structlog.get_logger(__name__)


def in_window(window: str, now: datetime) -> bool:
    """True when `now` falls inside 'HH:MM-HH:MM' (which may wrap past midnight); empty: always."""
    if not window:
        return True
    start, end = parse_window(window)
    minute = now.hour * 60 + now.minute
    return start <= minute < end if start < end else (minute >= start or minute < end)


class Scheduler:
    def __init__(self, settings: Settings, store: RunStore, on_new_run: Callable[[int], None],
                 now: Callable[[], datetime] = datetime.now, monitor=None):
        self.settings = settings
        self.monitor = monitor
        self.idle: dict | None = None  # the last idle verdict, recorded with the decision
        self.store = store
        self.on_new_run = on_new_run
        self.now = now
        self.state_file = Path(settings.state.dir) / "scheduler.json"
        self.scheduler: BackgroundScheduler | None = None

    def start(self) -> None:
        self.scheduler = BackgroundScheduler(daemon=True)
        self.scheduler.add_job(self.check, "interval", seconds=self.settings.schedule.interval, max_instances=1,
                               coalesce=True, next_run_time=self.now(), id="lacd-check")
        self.scheduler.start()

    def stop(self) -> None:
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)

    def check(self) -> str:
        """Decide once; returns (and records) the reason for what was decided."""
        self.idle = None
        decision, run_id = self._decide()
        self._record(decision)
        if run_id is not None:
            log.info("run_scheduled", run=run_id, reason=decision)
            self.on_new_run(run_id)
        return decision

    def _decide(self) -> tuple[str, int | None]:
        s = self.settings
        active = self.store.active()
        if active is not None and active.status == RunOutcome.PAUSED and self.monitor is not None:
            return f"run #{active.id} paused; {self._idle_verdict().reason}", None
        if active is not None:
            return "a run is already active", None
        with self.store.engine.connect() as conn:
            pending = listings.pending_count(conn)
            retrain = forget.retrain_due(conn)
        if retrain:  # the model in use was trained on forgotten lessons: no threshold, no cool-down
            return self._retrain_without_forgotten()
        if pending < s.queue.threshold:
            return f"waiting for lessons: {pending} pending, threshold {s.queue.threshold}", None
        now = self.now()
        if not in_window(s.schedule.window, now):
            return f"{pending} pending, outside the training window {s.schedule.window}", None
        last = self.store.last_finished_at()
        if last and s.schedule.cooldown and time.time() - last < s.schedule.cooldown * 60:
            return f"{pending} pending, cooling down after the last run", None
        if self.monitor is not None and not (verdict := self._idle_verdict()).idle:
            return f"{pending} pending, {verdict.reason}", None
        run_id = self.store.create("threshold", s.queue.max_lessons)
        if run_id is None:
            return "no run created (a run became active)", None
        return f"run #{run_id} started: {pending} pending >= threshold {s.queue.threshold}", run_id

    def _idle_verdict(self):
        verdict = self.monitor.verdict()
        self.idle = {**verdict.to_dict(), "hardware": self.monitor.describe_hardware(), "gpu": self.monitor.gpu.available}
        return verdict

    def _retrain_without_forgotten(self) -> tuple[str, int | None]:
        window = self.settings.schedule.window
        if not in_window(window, self.now()):
            return f"retrain without forgotten lessons due, outside the training window {window}", None
        run_id = self.store.create("forget", self.settings.queue.max_lessons)
        if run_id is None:
            return "retrain without forgotten lessons due, but no usable lesson is left", None
        return f"run #{run_id} started: retrain without forgotten lessons", run_id

    def _record(self, decision: str) -> None:
        write_json_atomic(self.state_file, {"decision": decision, "at": time.time(), "idle": self.idle})
