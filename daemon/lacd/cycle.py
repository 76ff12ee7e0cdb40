"""What a user asks of the learning cycle by hand: a run now (through the running daemon, or in
the foreground), or pointing the served model back at an earlier version.

`lacd train`, `lacd quickstart` and `lacd rollback` call these; the daemon's own runs go through
the scheduler.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

from lacd import db, lock
from lacd.config import Settings
from lacd.runs import RunOutcome, RunStore
from lacd.service import prepare_state_dir
from lacd.versions import VersionRow, VersionStore
from lacd.worker import RunExecutor


class NothingToTrain(Exception):
    """No usable lesson yet: nothing for a run to learn from."""


@dataclass(frozen=True)
class Outcome:
    run_id: int
    status: RunOutcome  # done | rejected | failed | waiting | queued (handed to the daemon) | stopped after export (no Ollama)
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
    return Outcome(_new_or_active(store, "manual", settings.queue.max_lessons), RunOutcome.QUEUED, via_daemon=True)


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
        while status is RunOutcome.WAITING:  # a retry with backoff, as the daemon would do it
            time.sleep(max(0.0, (store.get(run_id).next_try_at or 0) - time.time()))
            status = executor.execute(run_id, until)
        return Outcome(run_id, status)
    finally:
        state_lock.release()


class RollbackError(Exception):
    """`lacd rollback` cannot point latest where asked; the message says why and that nothing changed."""


@dataclass(frozen=True)
class Rollback:
    name: str
    from_tag: str
    to_tag: str
    note: str | None  # the target's gate note, e.g. that it was rejected by the gate
    served: str | None = None  # `lacd status`'s line about the agent's name ([model] serve_as), if set


def rollback(settings: Settings, version: int | None = None) -> Rollback:
    """Point <name>:latest at v<version> (default: the promoted version before the active one).

    Ollama first (a copy to latest), then the database in one transaction, so `lacd status` and
    `lacd models` never name a version Ollama does not serve as latest.
    """
    from lacd.pipeline import register

    name = settings.model.name
    db.require_schema(db.read_engine(settings.db_path), "model_versions")  # no database: a clear error
    engine = db.write_engine(settings.db_path)
    versions, runs = VersionStore(engine), RunStore(engine)
    active = versions.active(name)
    if active is None:
        raise RollbackError(f"no version of {name} has been promoted yet: there is nothing to roll back")
    lagging = _served_elsewhere(settings, engine, active.tag) if version == active.version else None
    if lagging:  # after `rollback --original`, or a follow that failed: the agent's name catches up
        client = register.make_client(settings.ollama.host, timeout_s=60)
        return Rollback(name, active.tag, active.tag, None, _follow(settings, engine, client, active.tag))
    target = _rollback_target(versions.all(name), active, version, name)
    forgotten = runs.forgotten_in_run(target.run_id) if target.run_id is not None else 0
    if forgotten:
        raise RollbackError(f"{target.tag} was trained on {forgotten} lessons that `lacd forget` erased: "
                            f"it must not be served again; nothing changed")
    running = runs.active()
    if running is not None and running.stage == "promote":
        raise RollbackError(f"run #{running.id} is deciding on a new version right now; try again in a moment")
    client = register.make_client(settings.ollama.host, timeout_s=60)
    try:
        if target.version not in register.list_versions(client, name):
            raise RollbackError(f"{target.tag} is no longer in Ollama at {settings.ollama.host}; nothing changed")
        register.promote(client, name, target.tag)
    except register.OllamaError as exc:
        raise RollbackError(f"{exc}; nothing changed") from exc
    versions.activate(name, target.version,
                      replaced_note=f"rolled back to {target.tag} at {time.strftime('%Y-%m-%d %H:%M:%S')}")
    served = _follow(settings, engine, client, target.tag)
    return Rollback(name, active.tag, target.tag, target.note if target.status == "rejected" else None, served)


def _rollback_target(versions: list[VersionRow], active: VersionRow, version: int | None, name: str) -> VersionRow:
    """The version row to make active (see rollback)."""
    if version is None:
        older = [v for v in versions if v.status == "promoted" and v.version < active.version]
        if not older:
            raise RollbackError(f"{active.tag} is the only promoted version still in Ollama: "
                                f"nothing to roll back to (`lacd models` lists every version)")
        return older[0]
    target = next((v for v in versions if v.version == version), None)
    if target is None:
        raise RollbackError(f"there is no {name}:v{version} (`lacd models` lists every version)")
    if target.active:
        raise RollbackError(f"{target.tag} is already {name}:latest")
    if target.status == "removed":
        raise RollbackError(f"{target.tag} was removed from Ollama ([ollama] keep_versions); nothing changed")
    if target.status not in ("promoted", "rejected", "registered"):
        raise RollbackError(f"{target.tag} was never fully registered (status {target.status})")
    return target


def _follow(settings: Settings, engine, client, tag: str) -> str | None:
    """Point the agent's own name ([model] serve_as) where latest now points."""
    from lacd import served
    from lacd.pipeline import register

    try:
        row = served.follow(settings, engine, client, tag)
        return served.describe(row.to_dict()) if row else None
    except (register.OllamaError, served.ServeError) as exc:
        raise RollbackError(f"{settings.model.name}:latest now points at {tag}, but {settings.model.serve_as} "
                            f"could not follow: {exc}; `lacd rollback {tag.rsplit(':', 1)[-1]}` tries again") from exc


def rollback_original(settings: Settings, for_good: bool = False):
    """`lacd rollback --original` / `lacd hand-back`: the agent's name serves the user's own model again."""
    from lacd import served
    from lacd.pipeline import register

    db.require_schema(db.read_engine(settings.db_path), "served_names")
    engine = db.write_engine(settings.db_path)
    client = register.make_client(settings.ollama.host, timeout_s=60)
    try:
        return served.to_original(settings, engine, client, for_good)
    except register.OllamaError as exc:
        raise RollbackError(f"{exc}; `lacd status` shows what the agent's name serves now") from exc
    except served.ServeError as exc:
        raise RollbackError(str(exc)) from exc


def _served_elsewhere(settings: Settings, engine, tag: str) -> str | None:
    """What the agent's name serves when it is not tag (and lacd still serves under it), else None."""
    from lacd import served

    row = served.get(engine, settings.model.serve_as) if settings.model.serve_as else None
    if row is None or row.state != "serving" or row.serving == served.label(tag):
        return None
    return row.serving
