"""Read-only listings for the CLI and the scheduler: lesson counts, lessons, rejects, sources, runs, versions.

Every function takes an open SQLAlchemy connection, so callers decide read-only or write.
"""

from __future__ import annotations

import json

from sqlalchemy import Connection, func, select

from lacd.models import Lesson, ModelVersion, Reject, Run, SecretFinding, Source

STATUSES = ("pending", "trained", "excluded", "forgotten")


def pending_count(conn: Connection) -> int:
    return conn.execute(select(func.count()).select_from(Lesson).where(Lesson.status == "pending")).scalar_one()


def counts(conn: Connection) -> dict:
    """Totals by status, exclusions by reason, and the number of rejected lines."""
    by_status = dict(conn.execute(select(Lesson.status, func.count()).group_by(Lesson.status)).all())
    rejected = conn.execute(select(func.count()).select_from(Reject)).scalar_one()
    return {
        "lessons_total": sum(by_status.values()),
        "pending": by_status.get("pending", 0),
        "trained": by_status.get("trained", 0),
        "excluded": excluded_counts(conn),
        "rejected": rejected,
        "forgotten": by_status.get("forgotten", 0),
        **secret_counts(conn),
    }


def excluded_counts(conn: Connection) -> dict[str, int]:
    """Lessons excluded at ingestion, by curation reason (a run's report shows them)."""
    rows = conn.execute(select(Lesson.reason, func.count()).where(Lesson.status == "excluded")
                        .group_by(Lesson.reason)).all()
    return {reason or "unknown": n for reason, n in rows}


def secret_counts(conn: Connection) -> dict:
    """Secrets redacted at ingestion: findings by kind, and how many lines held at least one."""
    kinds = dict(conn.execute(select(SecretFinding.kind, func.count()).group_by(SecretFinding.kind)
                              .order_by(func.count().desc())).all())
    places = select(SecretFinding.source_id, SecretFinding.offset).distinct().subquery()
    lines = conn.execute(select(func.count()).select_from(places)).scalar_one()
    return {"secrets": kinds, "secret_lines": lines}


def list_lessons(conn: Connection, status: str | None = None, reason: str | None = None, limit: int = 50,
                 secrets_only: bool = False) -> list[dict]:
    q = select(Lesson.id, Lesson.source_id, Lesson.offset, Lesson.length, Lesson.ingested_at, Lesson.format,
               Lesson.status, Lesson.reason, Lesson.trained_run_id, Lesson.conversation)
    if status:
        q = q.where(Lesson.status == status)
    if reason:
        q = q.where(Lesson.reason == reason)
    if secrets_only:
        q = q.where(select(SecretFinding.id).where(SecretFinding.source_id == Lesson.source_id,
                                                   SecretFinding.offset == Lesson.offset).exists())
    rows = conn.execute(q.order_by(Lesson.id.desc()).limit(limit)).all()
    found = _findings_at(conn, [(r.source_id, r.offset) for r in rows])
    return [_lesson_dict(r, found.get((r.source_id, r.offset), {})) for r in rows]


def _findings_at(conn: Connection, places: list[tuple[int, int]]) -> dict[tuple[int, int], dict[str, int]]:
    """Secret kinds (with counts) found in the lines at these places."""
    out: dict[tuple[int, int], dict[str, int]] = {}
    for source_id in {s for s, _ in places}:
        offsets = [o for s, o in places if s == source_id]
        rows = conn.execute(select(SecretFinding.offset, SecretFinding.kind, func.count())
                            .where(SecretFinding.source_id == source_id, SecretFinding.offset.in_(offsets))
                            .group_by(SecretFinding.offset, SecretFinding.kind)).all()
        for offset, kind, n in rows:
            out.setdefault((source_id, offset), {})[kind] = n
    return out


def _lesson_dict(row, secrets: dict[str, int]) -> dict:
    messages = json.loads(row.conversation)["messages"]
    prompt = next((m["content"] for m in messages if m["role"] == "user"), "")
    return {
        "id": row.id, "source": row.source_id, "offset": row.offset, "length": row.length,
        "ingested_at": row.ingested_at, "format": row.format, "status": row.status, "reason": row.reason,
        "trained_run": row.trained_run_id, "turns": len(messages), "prompt": prompt, "secrets": secrets,
    }


def list_rejects(conn: Connection, limit: int = 50) -> list[dict]:
    rows = conn.execute(select(Reject).order_by(Reject.id.desc()).limit(limit)).all()
    return [{"id": r.id, "source": r.source_id, "offset": r.offset, "length": r.length,
             "reason": r.reason, "prefix": r.prefix, "created_at": r.created_at} for r in rows]


def sources(conn: Connection) -> list[dict]:
    rows = conn.execute(select(Source).order_by(Source.id.desc()).limit(20)).all()
    return [{"id": r.id, "path": r.path, "inode": r.inode, "offset": r.offset, "state": r.state,
             "note": r.note, "updated_at": r.updated_at} for r in rows]


def runs(conn: Connection, limit: int = 10) -> list[dict]:
    rows = conn.execute(select(Run).order_by(Run.id.desc()).limit(limit)).all()
    return [_run_dict(r) for r in rows]


def _run_dict(r) -> dict:
    return {"id": r.id, "status": r.status, "stage": r.stage, "reason": r.reason, "created_at": r.created_at,
            "started_at": r.started_at, "finished_at": r.finished_at, "lessons": r.lesson_count, "error": r.error,
            "waiting_for": r.waiting_for, "next_try_at": r.next_try_at,
            "progress": json.loads(r.progress) if r.progress else None}


def model_versions(conn: Connection) -> list[dict]:
    rows = conn.execute(select(ModelVersion).order_by(ModelVersion.version.desc())).all()
    return [_version_dict(r) for r in rows]


def active_model(conn: Connection) -> dict | None:
    row = conn.execute(select(ModelVersion).where(ModelVersion.active == 1)).first()
    return _version_dict(row) if row else None


def _version_dict(r) -> dict:
    return {"tag": r.tag, "name": r.name, "version": r.version, "run": r.run_id, "status": r.status,
            "active": bool(r.active), "lessons": r.lesson_count, "created_at": r.created_at, "digest": r.digest,
            "metrics": json.loads(r.metrics) if r.metrics else None, "note": r.note}
