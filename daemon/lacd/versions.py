"""Model versions in the database: the model_versions table, one row per <name>:v<N> registered.

The only module that writes model_versions. A version is allocated once per run (the same number
on every retry of its register stage), marked as it moves (registering -> registered ->
promoted | rejected -> removed), and made active, the one <name>:latest names, only through
``activate``: the promote stage and `lacd rollback` both call it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, func, insert, select, update

from lacd.models import ModelVersion
from lacd.runs import frozen_row


@dataclass(frozen=True)
class VersionRow:
    """One model_versions row; metrics is the JSON text the promote stage stored (None before)."""

    id: int
    name: str
    version: int
    tag: str
    run_id: int | None
    created_at: float
    status: str  # registering | registered | promoted | rejected | removed
    active: int  # 1 for the version <name>:latest names
    lesson_count: int
    digest: str | None
    metrics: str | None
    note: str | None


class VersionStore:
    def __init__(self, engine: Engine, clock=time.time):
        self.engine = engine
        self.clock = clock

    # -- reading --------------------------------------------------------------------------------

    def of_run(self, run_id: int) -> VersionRow | None:
        """The version a run registered (None before its register stage)."""
        return self._first(select(ModelVersion).where(ModelVersion.run_id == run_id))

    def active(self, name: str) -> VersionRow | None:
        """The version <name>:latest names (None before the first promotion)."""
        return self._first(select(ModelVersion).where(ModelVersion.name == name, ModelVersion.active == 1))

    def all(self, name: str) -> list[VersionRow]:
        """Every version of a model, newest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(ModelVersion).where(ModelVersion.name == name)
                                .order_by(ModelVersion.version.desc())).all()
        return [frozen_row(VersionRow, r) for r in rows]

    def _first(self, query) -> VersionRow | None:
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        return frozen_row(VersionRow, row) if row is not None else None

    # -- writing --------------------------------------------------------------------------------

    def allocate(self, run_id: int, name: str, lesson_count: int) -> int:
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

    def mark(self, run_id: int, status: str, *, digest: str | None = None, metrics: dict | None = None,
             note: str | None = None) -> None:
        """Set the status of a run's version (and its digest, gate metrics, note when given)."""
        with self.engine.begin() as conn:
            conn.execute(update(ModelVersion).where(ModelVersion.run_id == run_id)
                         .values(status=status, **_details(digest, metrics, note)))

    def activate(self, name: str, version: int, *, replaced_note: str | None = None, metrics: dict | None = None,
                 note: str | None = None) -> None:
        """Make <name>:v<version> the active (promoted) one in one transaction, with its gate metrics and
        note when given; replaced_note is appended to the note of the version it replaces."""
        replaced: dict[str, Any] = {"active": 0}
        if replaced_note is not None:
            replaced["note"] = func.coalesce(ModelVersion.note + "; ", "") + replaced_note
        with self.engine.begin() as conn:
            conn.execute(update(ModelVersion).where(ModelVersion.name == name, ModelVersion.active == 1).values(**replaced))
            conn.execute(update(ModelVersion).where(ModelVersion.name == name, ModelVersion.version == version)
                         .values(active=1, status="promoted", **_details(None, metrics, note)))

    def mark_removed(self, name: str, versions: list[int]) -> None:
        """Versions deleted from Ollama (pruned to keep_versions); never the active one."""
        if versions:
            with self.engine.begin() as conn:
                conn.execute(update(ModelVersion).where(ModelVersion.name == name, ModelVersion.version.in_(versions),
                                                        ModelVersion.active == 0).values(status="removed"))


def _details(digest: str | None, metrics: dict | None, note: str | None) -> dict[str, Any]:
    values: dict[str, Any] = {}
    if digest:
        values["digest"] = digest
    if metrics is not None:
        values["metrics"] = json.dumps(metrics)
    if note is not None:
        values["note"] = note
    return values
