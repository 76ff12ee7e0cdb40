"""Starting a learning cycle by hand: through the running daemon, or in the foreground.

`lacd train` and `lacd quickstart` call these; the daemon's own runs go through the scheduler.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

from lacd import db, lock
from lacd.config import Settings
from lacd.runs import RunStore
from lacd.service import prepare_state_dir
from lacd.worker import RunExecutor


class NothingToTrain(Exception):
    """No usable lesson yet: nothing for a run to learn from."""


@dataclass(frozen=True)
class Outcome:
    run_id: int
    status: str  # done | failed | waiting | queued (handed to the daemon) | exported (no Ollama)
    via_daemon: bool = False


def _new_or_active(store: RunStore, reason: str, max_lessons: int) -> int:
    run_id = store.create(reason, max_lessons)
    if run_id is None:
        active = store.active()
        if active is None:
            raise NothingToTrain("no usable lessons yet: `lacd lessons` shows why lessons were excluded")
        run_id = active.id
    return run_id


def request_run(settings: Settings) -> Outcome | None:
    """Queue a run for the running daemon; None when no daemon runs."""
    if lock.holder(settings.lock_path) is None:
        return None
    store = RunStore(db.write_engine(settings.db_path))
    return Outcome(_new_or_active(store, "manual", settings.queue.max_lessons), "queued", via_daemon=True)


def run_foreground(settings: Settings, on_progress: Callable[[str, dict], None] | None = None,
                   register: bool = True) -> Outcome:
    """Run a whole cycle in this process, holding the state dir's lock (no daemon may start)."""
    prepare_state_dir(settings)
    state_lock = lock.StateLock(settings.lock_path)
    state_lock.acquire()
    try:
        engine = db.write_engine(settings.db_path)
        db.migrate(engine)
        store = RunStore(engine)
        run_id = _new_or_active(store, "manual", settings.queue.max_lessons)
        executor = RunExecutor(settings, store, threading.Event(), on_progress=on_progress)
        until = None if register else "export"
        status = executor.execute(run_id, until)
        while status == "waiting":  # a retry with backoff, as the daemon would do it
            time.sleep(max(0.0, (store.get(run_id).next_try_at or 0) - time.time()))
            status = executor.execute(run_id, until)
        return Outcome(run_id, status)
    finally:
        state_lock.release()
