"""Runs in the database: create one with its lesson snapshot, move it through its stages, end it.

The only module that writes the runs, run_stages and run_lessons tables (model versions:
lacd.versions). Rows are returned as frozen dataclasses (RunRow, StageRow), a stage's result as
its typed lacd.pipeline.results class, and a run's outcome as a RunOutcome. Every
state change is one short BEGIN IMMEDIATE transaction, so `lacd status` always sees a consistent
run and a killed daemon finds exactly where it stopped.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, func, insert, select, update

from lacd.models import Lesson, Run, RunLesson, RunStage
from lacd.pipeline.results import PromoteStageResult, StageResult

R = TypeVar("R", bound=StageResult)
T = TypeVar("T")


class _Stored(str, Enum):
    """A status column's values: each member is its stored text."""

    def __str__(self) -> str:  # the stored text, also in f-strings on every Python version
        return self.value


class StageStatus(_Stored):
    """A stage's status as stored in run_stages.status."""

    RUNNING = "running"
    DONE = "done"  # its output is in place and its result stored: never run again
    FAILED = "failed"  # its last attempt failed or must wait; the run is `waiting` for the retry
    PAUSED = "paused"  # stepped aside for the agent; that attempt does not count


class RunOutcome(_Stored):
    """A run's status as stored in runs.status (the first seven), or what RunExecutor.execute
    returned when it stopped before the run ended (interrupted, stopped after a stage)."""

    QUEUED = "queued"
    RUNNING = "running"
    WAITING = "waiting"
    PAUSED = "paused"
    DONE = "done"
    REJECTED = "rejected"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    STOPPED_AFTER_FORMAT = "stopped after format"
    STOPPED_AFTER_TRAIN = "stopped after train"
    STOPPED_AFTER_EXPORT = "stopped after export"
    STOPPED_AFTER_REGISTER = "stopped after register"
    STOPPED_AFTER_EVALUATE = "stopped after evaluate"
    STOPPED_AFTER_PROMOTE = "stopped after promote"

    @classmethod
    def stopped_after(cls, stage: str) -> "RunOutcome":
        return cls(f"stopped after {stage}")


ACTIVE = tuple(o.value for o in (RunOutcome.QUEUED, RunOutcome.RUNNING, RunOutcome.WAITING, RunOutcome.PAUSED))


def frozen_row(cls: type[T], row: Any) -> T:
    """A database row (a select of a whole table) as the frozen dataclass cls with the same column names."""
    values = row._mapping
    return cls(**{f.name: values[f.name] for f in fields(cls)})


@dataclass(frozen=True)
class RunRow:
    """One runs row; progress is the JSON text the worker stored (progress_dict() reads it)."""

    id: int
    status: str  # a RunOutcome value
    stage: str | None
    created_at: float
    finished_at: float | None
    lesson_count: int
    error: str | None
    progress: str | None
    reason: str
    started_at: float | None
    next_try_at: float | None
    waiting_for: str | None

    def progress_dict(self) -> dict:
        return json.loads(self.progress) if self.progress else {}


@dataclass(frozen=True)
class StageRow:
    """One run_stages row; result is the stored JSON text (RunStore.result reads it typed)."""

    run_id: int
    stage: str
    status: str  # a StageStatus value
    attempts: int
    started_at: float | None
    finished_at: float | None
    error: str | None
    result: str | None


@dataclass(frozen=True)
class SnapshotLesson:
    id: int
    conv_hash: str
    messages: list[dict]


class RunStore:
    def __init__(self, engine: Engine, clock=time.time):
        self.engine = engine
        self.clock = clock

    # -- creating -------------------------------------------------------------------------------

    def create(self, reason: str, max_lessons: int) -> int | None:
        """A queued run over the newest usable lessons; None when a run is active or none is usable."""
        with self.engine.begin() as conn:
            if conn.execute(select(Run.id).where(Run.status.in_(ACTIVE))).first():
                return None
            ids = list(conn.execute(select(Lesson.id).where(Lesson.status.in_(("pending", "trained")))
                                    .order_by(Lesson.id.desc()).limit(max_lessons)).scalars())
            if not ids:
                return None
            run_id = conn.execute(insert(Run).values(status=RunOutcome.QUEUED.value, created_at=self.clock(),
                                                     lesson_count=len(ids), reason=reason)).inserted_primary_key[0]
            conn.execute(insert(RunLesson), [{"run_id": run_id, "lesson_id": i} for i in ids])
        return run_id

    # -- reading --------------------------------------------------------------------------------

    def get(self, run_id: int) -> RunRow:
        with self.engine.connect() as conn:
            return frozen_row(RunRow, conn.execute(select(Run).where(Run.id == run_id)).one())

    def newest_id(self) -> int | None:
        with self.engine.connect() as conn:
            return conn.execute(select(func.max(Run.id))).scalar()

    def active(self) -> RunRow | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(Run).where(Run.status.in_(ACTIVE)).order_by(Run.id)).first()
        return frozen_row(RunRow, row) if row is not None else None

    def runnable(self) -> int | None:
        """The active run whose next try is due, if any."""
        run = self.active()
        if run is None or (run.next_try_at and run.next_try_at > self.clock()):
            return None
        return run.id

    def last_finished_at(self) -> float | None:
        with self.engine.connect() as conn:
            return conn.execute(select(func.max(Run.finished_at))).scalar()

    def stages(self, run_id: int) -> dict[str, StageRow]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(RunStage).where(RunStage.run_id == run_id)).all()
        return {r.stage: frozen_row(StageRow, r) for r in rows}

    def result(self, run_id: int, kind: type[R]) -> R | None:
        """The stored result of the run's stage kind.STAGE (None before that stage is done)."""
        row = self.stages(run_id).get(kind.STAGE)
        return kind.from_dict(json.loads(row.result)) if row is not None and row.result else None

    def lessons(self, run_id: int) -> list[SnapshotLesson]:
        """The run's lessons, newest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(Lesson.id, Lesson.conv_hash, Lesson.conversation)
                                .join(RunLesson, RunLesson.lesson_id == Lesson.id)
                                .where(RunLesson.run_id == run_id, Lesson.status != "forgotten")  # `lacd forget`
                                .order_by(Lesson.id.desc())).all()
        return [SnapshotLesson(r.id, r.conv_hash, json.loads(r.conversation)["messages"]) for r in rows]

    # -- moving ---------------------------------------------------------------------------------

    def begin_stage(self, run_id: int, stage: str) -> int:
        """Mark the stage running (one more attempt); returns the attempt number."""
        now = self.clock()
        with self.engine.begin() as conn:
            row = conn.execute(select(RunStage).where(RunStage.run_id == run_id, RunStage.stage == stage)).first()
            attempts = (row.attempts if row else 0) + 1
            if row is None:
                conn.execute(insert(RunStage).values(run_id=run_id, stage=stage, status=StageStatus.RUNNING.value,
                                                     attempts=1, started_at=now))
            else:
                conn.execute(update(RunStage).where(RunStage.run_id == run_id, RunStage.stage == stage)
                             .values(status=StageStatus.RUNNING.value, attempts=attempts, started_at=now, error=None))
            conn.execute(update(Run).where(Run.id == run_id).values(
                status=RunOutcome.RUNNING.value, stage=stage, next_try_at=None, waiting_for=None,
                started_at=func.coalesce(Run.started_at, now)))
        return attempts

    def finish_stage(self, run_id: int, stage: str, result: StageResult) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(RunStage).where(RunStage.run_id == run_id, RunStage.stage == stage)
                         .values(status=StageStatus.DONE.value, finished_at=self.clock(), error=None,
                                 result=json.dumps(result.to_dict())))
            conn.execute(update(Run).where(Run.id == run_id).values(progress=None))

    def wait(self, run_id: int, stage: str, error: str, retry_in: float, waiting_for: str | None) -> None:
        """The stage failed or cannot proceed yet; the run is retried after `retry_in` seconds."""
        with self.engine.begin() as conn:
            conn.execute(update(RunStage).where(RunStage.run_id == run_id, RunStage.stage == stage)
                         .values(status=StageStatus.FAILED.value, error=error))
            conn.execute(update(Run).where(Run.id == run_id).values(
                status=RunOutcome.WAITING.value, next_try_at=self.clock() + retry_in, waiting_for=waiting_for or f"retry of {stage}",
                error=error))

    def pause(self, run_id: int, stage: str, since: float, reason: str) -> bool:
        """The run steps aside for the agent (status `paused`, progress["paused"] says since when and why);
        the stage's attempt does not count. False when it was paused already (since is kept)."""
        with self.engine.begin() as conn:
            run = conn.execute(select(Run).where(Run.id == run_id)).one()
            progress = json.loads(run.progress) if run.progress else {}
            if run.status == RunOutcome.PAUSED and progress.get("paused"):
                return False
            progress["paused"] = {"since": since, "reason": reason, "stage": stage}
            conn.execute(update(RunStage).where(RunStage.run_id == run_id, RunStage.stage == stage,
                                                RunStage.status == StageStatus.RUNNING.value)
                         .values(status=StageStatus.PAUSED.value, attempts=RunStage.attempts - 1))
            conn.execute(update(Run).where(Run.id == run_id).values(
                status=RunOutcome.PAUSED.value, stage=stage, next_try_at=None, waiting_for="the agent to be idle",
                progress=json.dumps(progress)))
        return True

    def set_progress(self, run_id: int, progress: dict) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(Run).where(Run.id == run_id).values(progress=json.dumps(progress)))

    def succeed(self, run_id: int, status: RunOutcome = RunOutcome.DONE) -> None:
        """End the run; its lessons count as trained (later lessons stay pending)."""
        with self.engine.begin() as conn:
            snapshot = select(RunLesson.lesson_id).where(RunLesson.run_id == run_id)
            conn.execute(update(Lesson).where(Lesson.id.in_(snapshot), Lesson.status == "pending")
                         .values(status="trained", trained_run_id=run_id))
            conn.execute(update(Run).where(Run.id == run_id).values(
                status=status.value, finished_at=self.clock(), next_try_at=None, waiting_for=None, error=None, progress=None))

    def fail(self, run_id: int, error: str) -> None:
        """End the run as failed; its lessons stay pending for the next run."""
        with self.engine.begin() as conn:
            conn.execute(update(Run).where(Run.id == run_id).values(
                status=RunOutcome.FAILED.value, finished_at=self.clock(), error=error, next_try_at=None, waiting_for=None))

    def forgotten_in_run(self, run_id: int) -> int:
        """How many of a run's lessons were forgotten since (`lacd forget`)."""
        with self.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(RunLesson).join(Lesson, Lesson.id == RunLesson.lesson_id)
                                .where(RunLesson.run_id == run_id, Lesson.status == "forgotten")).scalar_one()


def gate_decisions(conn: Connection, run_ids: list[int]) -> dict[int, dict]:
    """{run id: {"tag", "promoted", "decision"}} for the runs whose promote stage is done (for `lacd status`)."""
    if not run_ids:
        return {}
    rows = conn.execute(select(RunStage.run_id, RunStage.result).where(
        RunStage.run_id.in_(run_ids), RunStage.stage == "promote", RunStage.status == StageStatus.DONE.value)).all()
    out = {}
    for run_id, text in rows:
        result = PromoteStageResult.from_dict(json.loads(text or "{}"))
        if result.decision:
            out[run_id] = {"tag": result.tag, "promoted": result.promoted, "decision": result.decision}
    return out
