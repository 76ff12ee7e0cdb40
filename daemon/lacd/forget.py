"""`lacd forget`: remove lessons by id or by a text pattern, and retrain without them.

A forgotten lesson keeps its row (its place in the log is what keeps ingestion exactly-once) but
loses its content: raw line, conversation and hash are blanked with SQLite's secure_delete on, so
the old bytes are overwritten in the database file, and the WAL is truncated afterwards when no
reader holds it. What finished runs that held such a lesson kept of lesson text (dataset,
checkpoints, the evaluation's cases) is deleted. The
models trained on them still hold what they learned: the active model is reported as trained on
forgotten lessons (``lacd status``) and a run with reason ``forget`` retrains without them, now if
no run is active, else as soon as the active one ends (the scheduler's :func:`retrain_due`).

The pattern is matched on what is stored (after redaction: a secret was never stored, so it
cannot be matched), case-sensitively, anywhere in the raw line or the conversation. The pattern
itself is never stored or logged.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import structlog
from sqlalchemy import Connection, Engine, func, insert, select, text, update

from lacd.models import Forget, Lesson, ModelVersion, Run, RunLesson
from lacd.runs import ACTIVE, RunStore

log = structlog.get_logger(__name__)

EMPTY_CONVERSATION = '{"messages":[]}'


class ForgetError(Exception):
    """Nothing to forget, or a bad request; the message says which."""


@dataclass(frozen=True)
class Forgotten:
    lessons: int
    versions: list[str]  # model tags trained on at least one of them
    retrain_run: int | None  # the run queued now, if any
    waits_for_run: int | None  # the active run the retrain waits for, if any
    purged_runs: list[int]  # finished runs whose dataset folder was deleted
    wal_truncated: bool


def forget(engine: Engine, runs_dir: Path, max_lessons: int, *, ids: list[int] | None = None,
           pattern: str | None = None, clock=time.time) -> Forgotten:
    """Forget the lessons named by `ids` or containing `pattern`; queue a retrain when needed."""
    if bool(ids) == bool(pattern):
        raise ForgetError("name lesson ids or give --pattern TEXT (one of the two)")
    with engine.begin() as conn:
        conn.exec_driver_sql("PRAGMA secure_delete = ON")
        chosen = _choose(conn, ids, pattern)
        conn.execute(update(Lesson).where(Lesson.id.in_(chosen)).values(
            status="forgotten", reason="forgotten", raw="", conversation=EMPTY_CONVERSATION, conv_hash=""))
        conn.execute(insert(Forget).values(created_at=clock(), lessons=len(chosen), chosen_by="ids" if ids else "pattern"))
        runs = _runs_with(conn, chosen)
        versions = list(conn.execute(select(ModelVersion.tag).where(ModelVersion.run_id.in_(runs))
                                     .order_by(ModelVersion.version)).scalars())
        active = conn.execute(select(Run.id).where(Run.status.in_(ACTIVE))).scalar()
        due = retrain_due(conn)
    purged = _purge_datasets(runs_dir, [r for r in runs if r != active])
    retrain = RunStore(engine, clock).create("forget", max_lessons) if due and active is None else None
    waits = active if due and active is not None else None
    truncated = _truncate_wal(engine)
    log.info("lessons_forgotten", lessons=len(chosen), versions=len(versions), retrain_run=retrain,
             purged_runs=len(purged), wal_truncated=truncated)
    return Forgotten(len(chosen), versions, retrain, waits, purged, truncated)


def _choose(conn: Connection, ids: list[int] | None, pattern: str | None) -> list[int]:
    live = Lesson.status != "forgotten"
    if ids:
        found = set(conn.execute(select(Lesson.id).where(Lesson.id.in_(ids), live)).scalars())
        missing = sorted(set(ids) - found)
        if missing:
            raise ForgetError(f"no lesson to forget with id {', '.join(map(str, missing))} "
                              "(unknown or already forgotten; `lacd lessons` lists ids)")
        return sorted(found)
    chosen = list(conn.execute(select(Lesson.id).where(
        live, (func.instr(Lesson.raw, pattern) > 0) | (func.instr(Lesson.conversation, pattern) > 0))).scalars())
    if not chosen:
        raise ForgetError("no stored lesson contains that text (matching is case-sensitive, on the redacted text)")
    return chosen


def _runs_with(conn: Connection, lesson_ids: list[int]) -> list[int]:
    found: set[int] = set()
    for i in range(0, len(lesson_ids), 500):
        chunk = lesson_ids[i:i + 500]
        found.update(conn.execute(select(RunLesson.run_id).where(RunLesson.lesson_id.in_(chunk)).distinct()).scalars())
    return sorted(found)


LESSON_ARTIFACTS = ("dataset", "checkpoints", "evaluation.json", "evaluation.request.json")
"""What a run folder holds that is made of lesson text: the tokenized dataset, resume checkpoints,
and the evaluation's held-out cases (expected and generated calls)."""


def _purge_datasets(runs_dir: Path, run_ids: list[int]) -> list[int]:
    """Delete what finished runs that held forgotten lessons kept of their text (metrics stay in the DB)."""
    purged = []
    for run_id in run_ids:
        for name in LESSON_ARTIFACTS:
            path = runs_dir / str(run_id) / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
            else:
                continue
            purged.append(run_id)
    return sorted(set(purged))


def _truncate_wal(engine: Engine) -> bool:
    """Drop old page images (which may still hold the forgotten text) from the WAL file."""
    raw = engine.raw_connection()  # outside any transaction: a checkpoint cannot run inside one
    try:
        busy, _, _ = raw.driver_connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    finally:
        raw.close()
    return busy == 0


def forgotten_in_active(conn: Connection) -> tuple[str | None, int]:
    """The active model's tag and how many forgotten lessons it was trained on."""
    row = conn.execute(select(ModelVersion.tag, ModelVersion.run_id).where(ModelVersion.active == 1)).first()
    if row is None or row.run_id is None:
        return (row.tag if row else None), 0
    n = conn.execute(select(func.count()).select_from(RunLesson).join(Lesson, Lesson.id == RunLesson.lesson_id)
                     .where(RunLesson.run_id == row.run_id, Lesson.status == "forgotten")).scalar_one()
    return row.tag, n


def retrain_due(conn: Connection) -> bool:
    """The active model holds forgotten lessons and no retrain was started since the last forget."""
    _, n = forgotten_in_active(conn)
    if not n:
        return False
    last_forget = conn.execute(select(func.max(Forget.created_at))).scalar()
    last_retrain = conn.execute(select(func.max(Run.created_at)).where(Run.reason == "forget")).scalar()
    return last_forget is not None and (last_retrain is None or last_retrain < last_forget)


def summary(conn: Connection) -> dict:
    """For `lacd status`: forgotten lessons, and whether the active model still holds some."""
    forgotten = conn.execute(select(func.count()).select_from(Lesson).where(Lesson.status == "forgotten")).scalar_one()
    tag, in_active = forgotten_in_active(conn)
    retrain = conn.execute(select(Run.id, Run.status).where(Run.reason == "forget").order_by(Run.id.desc())).first()
    return {"forgotten": forgotten, "active_model_forgotten": in_active,
            "retrain_run": {"id": retrain.id, "status": retrain.status} if retrain and in_active else None,
            "retrain_due": retrain_due(conn)}
