"""The tailer's side of the database: file generations (sources) and batch commits.

:meth:`Store.commit` is the exactly-once point: the lessons and rejects of a run of complete lines
and the source's new offset and hashes are written in one BEGIN IMMEDIATE transaction, so after any
crash the offset covers exactly the rows that exist.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import structlog
from sqlalchemy import Engine, insert, select, update

from lacd.ingest.identity import Cursor
from lacd.ingest.classifier import LineLesson, LineReject
from lacd.models import Lesson, Reject, Source

log = structlog.get_logger(__name__)

LESSON_COLUMNS = ("source_id", "offset", "length", "ingested_at", "format", "conversation", "raw", "conv_hash",
                  "status", "reason", "trained_run_id")
LESSON_INSERT = (f"INSERT INTO lessons ({', '.join(LESSON_COLUMNS)}) "
                 f"VALUES ({', '.join('?' for _ in LESSON_COLUMNS)})")
FINDING_INSERT = "INSERT INTO secret_findings (source_id, offset, kind, field, turn, created_at) VALUES (?, ?, ?, ?, ?, ?)"


@dataclass
class CommitStats:
    lessons: int = 0
    pending: int = 0
    rejected: int = 0
    excluded: Counter = field(default_factory=Counter)
    secrets: Counter = field(default_factory=Counter)  # findings by kind


class Store:
    def __init__(self, engine: Engine, rules: dict[str, bool]):
        self.engine = engine
        self.rules = rules

    def open_sources(self, path: str) -> tuple[Cursor | None, list[Cursor]]:
        """The active generation of `path` (if any) and the generations still being drained."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(Source).where(Source.state.in_(("active", "draining")))).all()
        active = [r for r in rows if r.state == "active" and r.path == path]
        draining = [_cursor(r) for r in rows if r.state == "draining"]
        for extra in active[:-1]:  # never expected; keep the newest, drain the others
            draining.append(_cursor(extra))
        return (_cursor(active[-1]) if active else None), draining

    def new_source(self, path: str, dev: int, inode: int) -> Cursor:
        now = time.time()
        with self.engine.begin() as conn:
            sid = conn.execute(
                insert(Source).values(path=path, dev=dev, inode=inode, head_len=0, head_hash="", offset=0,
                                      marker_len=0, marker_hash="", state="active", created_at=now, updated_at=now)
            ).inserted_primary_key[0]
        log.info("source_opened", source=sid, path=path, inode=inode)
        return Cursor(sid, path, dev, inode)

    def set_state(self, cursor: Cursor, state: str, note: str | None = None) -> None:
        values = dict(state=state, path=cursor.path, dev=cursor.dev, inode=cursor.inode, updated_at=time.time())
        if note is not None:
            values["note"] = note
        with self.engine.begin() as conn:
            conn.execute(update(Source).where(Source.id == cursor.source_id).values(**values))
        log.info("source_state", source=cursor.source_id, state=state, note=note, offset=cursor.offset)

    def commit(self, cursor: Cursor, lessons: list[LineLesson], rejects: list[LineReject]) -> CommitStats:
        """Store rows and the cursor that covers them, atomically; curation decided here."""
        now = time.time()
        stats = CommitStats(rejected=len(rejects))
        with self.engine.begin() as conn:
            seen = self._known_hashes(conn, [l.conv_hash for l in lessons])
            rows = [self._lesson_row(cursor, l, seen, now, stats) for l in lessons]
            if rows:  # the hot path of a backfill: straight to the driver's executemany
                conn.exec_driver_sql(LESSON_INSERT, [tuple(r[c] for c in LESSON_COLUMNS) for r in rows])
            if rejects:
                conn.execute(insert(Reject), [dict(source_id=cursor.source_id, offset=r.offset, length=r.length,
                                                   reason=r.reason, prefix=r.prefix, created_at=now) for r in rejects])
            findings = [(cursor.source_id, r.offset, f.kind, f.field, f.turn, now)
                        for r in (*lessons, *rejects) for f in r.findings]
            if findings:
                conn.exec_driver_sql(FINDING_INSERT, findings)
                stats.secrets.update(f[2] for f in findings)
            conn.execute(update(Source).where(Source.id == cursor.source_id).values(
                offset=cursor.offset, head_len=cursor.head_len, head_hash=cursor.head_hash,
                marker_len=cursor.marker_len, marker_hash=cursor.marker_hash,
                dev=cursor.dev, inode=cursor.inode, path=cursor.path, updated_at=now))
        self._log_decisions(cursor, lessons, rows, rejects)
        return stats

    def _known_hashes(self, conn, hashes: list[str]) -> set[str]:
        if not self.rules.get("duplicate", True) or not hashes:
            return set()
        found: set[str] = set()
        unique = list(set(hashes))
        for i in range(0, len(unique), 500):
            chunk = unique[i:i + 500]
            found.update(conn.execute(select(Lesson.conv_hash).where(Lesson.conv_hash.in_(chunk))).scalars())
        return found

    def _lesson_row(self, cursor: Cursor, line: LineLesson, seen: set[str], now: float, stats: CommitStats) -> dict:
        reason = line.flaw
        if reason is None and self.rules.get("duplicate", True) and line.conv_hash in seen:
            reason = "duplicate"
        seen.add(line.conv_hash)
        stats.lessons += 1
        if reason:
            stats.excluded[reason] += 1
        else:
            stats.pending += 1
        return dict(source_id=cursor.source_id, offset=line.offset, length=line.length, ingested_at=now,
                    format=line.format, conversation=line.conversation, raw=line.raw, conv_hash=line.conv_hash,
                    status="excluded" if reason else "pending", reason=reason, trained_run_id=None)

    def _log_decisions(self, cursor, lessons, rows, rejects) -> None:
        for r in rejects:
            log.info("line_rejected", source=cursor.source_id, offset=r.offset, length=r.length, reason=r.reason)
        for row in rows:
            if row["reason"]:
                log.info("lesson_excluded", source=cursor.source_id, offset=row["offset"], reason=row["reason"])
        for record in (*lessons, *rejects):
            if record.findings:  # kinds and places only: never the secret, never the text around it
                log.info("secrets_redacted", source=cursor.source_id, offset=record.offset,
                         kinds=sorted({f.kind for f in record.findings}), count=len(record.findings))


def _cursor(row) -> Cursor:
    return Cursor(row.id, row.path, row.dev, row.inode, row.offset, row.head_len, row.head_hash,
                  row.marker_len, row.marker_hash)
