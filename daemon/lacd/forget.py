"""`lacd forget`: remove lessons by id or by a text pattern, and retrain without them.

A forgotten lesson keeps its row (its place in the log is what keeps ingestion exactly-once) but
loses its content: raw line, conversation and hash are blanked with SQLite's secure_delete on, so
the old bytes are overwritten in the database file, and the WAL is truncated afterwards when no
reader holds it. What finished runs that held such a lesson kept of lesson text (dataset,
checkpoints, the evaluation's cases) is deleted. The
models trained on them still hold what they learned: the active model is reported as trained on
forgotten lessons (``lacd status``) and a run with reason ``forget`` retrains without them, now if
no run is active, else as soon as the active one ends (the scheduler's :func:`retrain_due`).

The pattern is matched on a lesson's text as stored (after redaction: a secret was never stored,
so it cannot be matched), case-sensitively: the prompt, the replies, the tool calls (name and
argument values) and the tool outputs, each a string of the decoded conversation. Never on JSON
syntax, keys or roles: ``"``, ``_`` or ``tool`` match only lessons whose text holds them. A
rejected line has no conversation; its stored prefix is matched as written. A pattern matching
more than ``[forget] max_share`` of the lessons and rejected lines is refused unless the
caller asks for all of them (``--all-matching``). The pattern itself is never stored or logged.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import structlog
from sqlalchemy import Connection, Engine, func, insert, select, text, update

from lacd.models import Forget, Lesson, ModelVersion, Reject, Run, RunLesson
from lacd.runs import ACTIVE, RunStore

log = structlog.get_logger(__name__)

EMPTY_CONVERSATION = '{"messages":[]}'
SAMPLES = 3  # matching lessons shown before the user confirms

TEXT_MATCHES = """
    FROM lessons l, json_tree(l.conversation, '$.messages') t
    WHERE l.status != 'forgotten' AND t.type = 'text' AND instr(t.atom, :pattern) > 0
      AND NOT (t.key = 'role' AND instr(substr(t.path, 11), '.') = 0)"""
"""Every string of a lesson's conversation holding the pattern: contents, tool-call names and
argument values; never a key, never the JSON around them, never a message's role."""


class ForgetError(Exception):
    """Nothing to forget, or a bad request; the message says which."""


@dataclass(frozen=True)
class Matches:
    """What a pattern matches, before anything is erased."""

    lessons: list[int]
    live_lessons: int  # lessons not yet forgotten: the share is taken of these
    rejects: list[int]
    all_rejects: int
    samples: list[tuple[int, str]]  # (lesson id, the matching text around the first match)


@dataclass(frozen=True)
class Forgotten:
    lessons: int
    versions: list[str]  # model tags trained on at least one of them
    retrain_run: int | None  # the run queued now, if any
    waits_for_run: int | None  # the active run the retrain waits for, if any
    purged_runs: list[int]  # finished runs whose dataset folder was deleted
    wal_truncated: bool
    rejects: int = 0  # rejected lines whose stored prefix was erased


def matching(conn: Connection, pattern: str, max_share: float = 1.0, all_matching: bool = False) -> Matches:
    """The lessons and rejected lines `pattern` matches; ForgetError when none, or when it matches
    more than `max_share` of all lessons and rejected lines and `all_matching` is off."""
    if not pattern:
        raise ForgetError("the pattern is empty: it would match every lesson")
    lessons = sorted(conn.execute(text(f"SELECT DISTINCT l.id {TEXT_MATCHES}"), {"pattern": pattern}).scalars())
    rejects = sorted(conn.execute(select(Reject.id).where(Reject.prefix != "",
                                                          func.instr(Reject.prefix, pattern) > 0)).scalars())
    if not lessons and not rejects:
        raise ForgetError("no stored lesson or rejected line contains that text "
                          "(matching is case-sensitive, on the redacted text)")
    live = conn.execute(select(func.count()).select_from(Lesson).where(Lesson.status != "forgotten")).scalar_one()
    all_rejects = conn.execute(select(func.count()).select_from(Reject).where(Reject.prefix != "")).scalar_one()
    if not all_matching:
        _check_share(len(lessons) + len(rejects), live + all_rejects, max_share)
    samples = conn.execute(text(f"SELECT l.id, t.atom {TEXT_MATCHES} GROUP BY l.id ORDER BY l.id DESC LIMIT {SAMPLES}"),
                           {"pattern": pattern}).all()
    return Matches(lessons, live, rejects, all_rejects, [(i, _around(atom, pattern)) for i, atom in samples])


def _check_share(n: int, total: int, max_share: float) -> None:
    if total and n / total > max_share:
        raise ForgetError(f"the pattern matches {n} of {total} lessons and rejected lines ({n / total:.0%}), more "
                          f"than [forget] max_share ({max_share:.0%}): give a longer pattern, or pass --all-matching "
                          "to forget every one of them")


def _around(atom: str, pattern: str, context: int = 30) -> str:
    """The matching text with `context` characters either side, on one line."""
    at = atom.find(pattern)
    start, end = max(0, at - context), at + len(pattern) + context
    snippet = ("..." if start else "") + atom[start:end] + ("..." if end < len(atom) else "")
    return " ".join(snippet.split())


def forget(engine: Engine, runs_dir: Path, max_lessons: int, *, ids: list[int] | None = None,
           pattern: str | None = None, max_share: float = 1.0, all_matching: bool = False,
           clock=time.time) -> Forgotten:
    """Forget the lessons named by `ids`, or the lessons and rejected lines containing `pattern`
    (see :func:`matching`); queue a retrain when needed."""
    if bool(ids) == bool(pattern):
        raise ForgetError("name lesson ids or give --pattern TEXT (one of the two)")
    with engine.begin() as conn:
        conn.exec_driver_sql("PRAGMA secure_delete = ON")
        if ids:
            chosen, rejects = _choose(conn, ids), []
        else:
            found = matching(conn, pattern, max_share, all_matching)
            chosen, rejects = found.lessons, found.rejects
        for part in _chunks(chosen):
            conn.execute(update(Lesson).where(Lesson.id.in_(part)).values(
                status="forgotten", reason="forgotten", raw="", conversation=EMPTY_CONVERSATION, conv_hash=""))
        for part in _chunks(rejects):
            conn.execute(update(Reject).where(Reject.id.in_(part)).values(prefix=""))
        if chosen:  # rejected lines alone were never trained on: no retrain for them
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
    log.info("lessons_forgotten", lessons=len(chosen), rejects=len(rejects), versions=len(versions),
             retrain_run=retrain, purged_runs=len(purged), wal_truncated=truncated)
    return Forgotten(len(chosen), versions, retrain, waits, purged, truncated, len(rejects))


def _choose(conn: Connection, ids: list[int]) -> list[int]:
    found = set(conn.execute(select(Lesson.id).where(Lesson.id.in_(ids), Lesson.status != "forgotten")).scalars())
    missing = sorted(set(ids) - found)
    if missing:
        raise ForgetError(f"no lesson to forget with id {', '.join(map(str, missing))} "
                          "(unknown or already forgotten; `lacd lessons` lists ids)")
    return sorted(found)


def _chunks(ids: list[int], size: int = 500):
    """Ids in pieces small enough for one statement's parameters."""
    for i in range(0, len(ids), size):
        yield ids[i:i + size]


def _runs_with(conn: Connection, lesson_ids: list[int]) -> list[int]:
    found: set[int] = set()
    for chunk in _chunks(lesson_ids):
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
