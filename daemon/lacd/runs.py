"""Runs in the database: create one with its lesson snapshot, move it through its stages, end it.

The only module that writes the runs, run_stages, run_lessons and model_versions tables. Every
state change is one short BEGIN IMMEDIATE transaction, so `lacd status` always sees a consistent
run and a killed daemon finds exactly where it stopped.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, func, insert, select, update

from lacd.models import Lesson, ModelVersion, Run, RunLesson, RunStage

ACTIVE = ("queued", "running", "waiting", "paused")


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
            run_id = conn.execute(insert(Run).values(status="queued", created_at=self.clock(), lesson_count=len(ids),
                                                     reason=reason)).inserted_primary_key[0]
            conn.execute(insert(RunLesson), [{"run_id": run_id, "lesson_id": i} for i in ids])
        return run_id

    # -- reading --------------------------------------------------------------------------------

    def get(self, run_id: int):
        with self.engine.connect() as conn:
            return conn.execute(select(Run).where(Run.id == run_id)).one()

    def newest_id(self) -> int | None:
        with self.engine.connect() as conn:
            return conn.execute(select(func.max(Run.id))).scalar()

    def active(self):
        with self.engine.connect() as conn:
            return conn.execute(select(Run).where(Run.status.in_(ACTIVE)).order_by(Run.id)).first()

    def runnable(self) -> int | None:
        """The active run whose next try is due, if any."""
        run = self.active()
        if run is None or (run.next_try_at and run.next_try_at > self.clock()):
            return None
        return run.id

    def last_finished_at(self) -> float | None:
        with self.engine.connect() as conn:
            return conn.execute(select(func.max(Run.finished_at))).scalar()

    def stages(self, run_id: int) -> dict[str, object]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(RunStage).where(RunStage.run_id == run_id)).all()
        return {r.stage: r for r in rows}

    def stage_result(self, run_id: int, stage: str) -> dict:
        row = self.stages(run_id).get(stage)
        return json.loads(row.result) if row is not None and row.result else {}

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
                conn.execute(insert(RunStage).values(run_id=run_id, stage=stage, status="running", attempts=1, started_at=now))
            else:
                conn.execute(update(RunStage).where(RunStage.run_id == run_id, RunStage.stage == stage)
                             .values(status="running", attempts=attempts, started_at=now, error=None))
            conn.execute(update(Run).where(Run.id == run_id).values(
                status="running", stage=stage, next_try_at=None, waiting_for=None,
                started_at=func.coalesce(Run.started_at, now)))
        return attempts

    def finish_stage(self, run_id: int, stage: str, result: dict) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(RunStage).where(RunStage.run_id == run_id, RunStage.stage == stage)
                         .values(status="done", finished_at=self.clock(), error=None, result=json.dumps(result)))
            conn.execute(update(Run).where(Run.id == run_id).values(progress=None))

    def wait(self, run_id: int, stage: str, error: str, retry_in: float, waiting_for: str | None) -> None:
        """The stage failed or cannot proceed yet; the run is retried after `retry_in` seconds."""
        with self.engine.begin() as conn:
            conn.execute(update(RunStage).where(RunStage.run_id == run_id, RunStage.stage == stage)
                         .values(status="failed", error=error))
            conn.execute(update(Run).where(Run.id == run_id).values(
                status="waiting", next_try_at=self.clock() + retry_in, waiting_for=waiting_for or f"retry of {stage}",
                error=error))

    def pause(self, run_id: int, stage: str, since: float, reason: str) -> bool:
        """The run steps aside for the agent (status `paused`, progress["paused"] says since when and why);
        the stage's attempt does not count. False when it was paused already (since is kept)."""
        with self.engine.begin() as conn:
            run = conn.execute(select(Run).where(Run.id == run_id)).one()
            progress = json.loads(run.progress) if run.progress else {}
            if run.status == "paused" and progress.get("paused"):
                return False
            progress["paused"] = {"since": since, "reason": reason, "stage": stage}
            conn.execute(update(RunStage).where(RunStage.run_id == run_id, RunStage.stage == stage,
                                                RunStage.status == "running")
                         .values(status="paused", attempts=RunStage.attempts - 1))
            conn.execute(update(Run).where(Run.id == run_id).values(
                status="paused", stage=stage, next_try_at=None, waiting_for="the agent to be idle",
                progress=json.dumps(progress)))
        return True

    def set_progress(self, run_id: int, progress: dict) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(Run).where(Run.id == run_id).values(progress=json.dumps(progress)))

    def succeed(self, run_id: int, status: str = "done") -> None:
        """End the run; its lessons count as trained (later lessons stay pending)."""
        with self.engine.begin() as conn:
            snapshot = select(RunLesson.lesson_id).where(RunLesson.run_id == run_id)
            conn.execute(update(Lesson).where(Lesson.id.in_(snapshot), Lesson.status == "pending")
                         .values(status="trained", trained_run_id=run_id))
            conn.execute(update(Run).where(Run.id == run_id).values(
                status=status, finished_at=self.clock(), next_try_at=None, waiting_for=None, error=None, progress=None))

    def fail(self, run_id: int, error: str) -> None:
        """End the run as failed; its lessons stay pending for the next run."""
        with self.engine.begin() as conn:
            conn.execute(update(Run).where(Run.id == run_id).values(
                status="failed", finished_at=self.clock(), error=error, next_try_at=None, waiting_for=None))

    # -- model versions -------------------------------------------------------------------------

    def version_for(self, run_id: int, name: str, lesson_count: int) -> int:
        """The version number this run registers as: allocated once, the same on every retry."""
        with self.engine.begin() as conn:
            row = conn.execute(select(ModelVersion).where(ModelVersion.run_id == run_id)).first()
            if row:
                return row.version
            version = (conn.execute(select(func.max(ModelVersion.version)).where(ModelVersion.name == name)).scalar() or 0) + 1
            conn.execute(insert(ModelVersion).values(
                name=name, version=version, tag=f"{name}:v{version}", run_id=run_id, created_at=self.clock(),
                status="registering", active=0, lesson_count=lesson_count))
        return version

    def version_of(self, run_id: int):
        """The model_versions row of a run (None before its register stage)."""
        with self.engine.connect() as conn:
            return conn.execute(select(ModelVersion).where(ModelVersion.run_id == run_id)).first()

    def active_version(self, name: str):
        """The version <name>:latest names (None before the first promotion)."""
        with self.engine.connect() as conn:
            return conn.execute(select(ModelVersion).where(ModelVersion.name == name, ModelVersion.active == 1)).first()

    def versions(self, name: str) -> list:
        """Every version of a model, newest first."""
        with self.engine.connect() as conn:
            return list(conn.execute(select(ModelVersion).where(ModelVersion.name == name)
                                     .order_by(ModelVersion.version.desc())).all())

    def activate(self, name: str, version: int, note: str) -> None:
        """Make <name>:v<version> the active (promoted) one in one transaction; note it on the one it replaces."""
        with self.engine.begin() as conn:
            conn.execute(update(ModelVersion).where(ModelVersion.name == name, ModelVersion.active == 1)
                         .values(active=0, note=func.coalesce(ModelVersion.note + "; ", "") + note))
            conn.execute(update(ModelVersion).where(ModelVersion.name == name, ModelVersion.version == version)
                         .values(active=1, status="promoted"))

    def mark_removed(self, name: str, versions: list[int]) -> None:
        """Versions deleted from Ollama (pruned to keep_versions); never the active one."""
        if versions:
            with self.engine.begin() as conn:
                conn.execute(update(ModelVersion).where(ModelVersion.name == name, ModelVersion.version.in_(versions),
                                                        ModelVersion.active == 0).values(status="removed"))

    def forgotten_in_run(self, run_id: int) -> int:
        """How many of a run's lessons were forgotten since (`lacd forget`)."""
        with self.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(RunLesson).join(Lesson, Lesson.id == RunLesson.lesson_id)
                                .where(RunLesson.run_id == run_id, Lesson.status == "forgotten")).scalar_one()

    def excluded_counts(self) -> dict[str, int]:
        """Lessons excluded at ingestion, by curation reason."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(Lesson.reason, func.count()).where(Lesson.status == "excluded")
                                .group_by(Lesson.reason)).all()
        return {reason or "unknown": n for reason, n in rows}

    def mark_version(self, run_id: int, status: str, *, digest: str | None = None, metrics: dict | None = None,
                     note: str | None = None, active: bool = False) -> None:
        values: dict = {"status": status}
        if digest:
            values["digest"] = digest
        if metrics is not None:
            values["metrics"] = json.dumps(metrics)
        if note is not None:
            values["note"] = note
        with self.engine.begin() as conn:
            if active:
                name = conn.execute(select(ModelVersion.name).where(ModelVersion.run_id == run_id)).scalar_one()
                conn.execute(update(ModelVersion).where(ModelVersion.name == name).values(active=0))
                values["active"] = 1
            conn.execute(update(ModelVersion).where(ModelVersion.run_id == run_id).values(**values))


def gate_decisions(conn: Connection, run_ids: list[int]) -> dict[int, dict]:
    """{run id: {"tag", "promoted", "decision"}} for the runs whose promote stage is done (for `lacd status`)."""
    if not run_ids:
        return {}
    rows = conn.execute(select(RunStage.run_id, RunStage.result).where(
        RunStage.run_id.in_(run_ids), RunStage.stage == "promote", RunStage.status == "done")).all()
    out = {}
    for run_id, text in rows:
        result = json.loads(text or "{}")
        if result.get("decision"):
            out[run_id] = {"tag": result.get("tag"), "promoted": result.get("promoted"), "decision": result["decision"]}
    return out
