"""The tailer's side of the database: file generations (sources) and batch commits.

:meth:`Store.commit` is the exactly-once point: the lessons and rejects of a run of complete lines
and the source's new offset and hashes are written in one BEGIN IMMEDIATE transaction, so after any
crash the offset covers exactly the rows that exist.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from collections import Counter
from dataclasses import dataclass, field

import structlog
from sqlalchemy import Engine, insert, select, update

from lacd.db import WalFlusher, set_bulk
from lacd.ingest.classifier import (CONV_HASH, INGESTED_AT, LESSON_COLUMNS, OFFSET, REASON, SOURCE, STATUS,
                                   Classified)
from lacd.ingest.identity import Cursor
from lacd.models import Source

log = structlog.get_logger(__name__)

LESSON_INSERT = (f"INSERT INTO lessons ({', '.join(LESSON_COLUMNS)}) "
                 f"VALUES ({', '.join('?' for _ in LESSON_COLUMNS)})")
FINDING_INSERT = "INSERT INTO secret_findings (source_id, offset, kind, field, turn, created_at) VALUES (?, ?, ?, ?, ?, ?)"
REJECT_INSERT = "INSERT INTO rejects (source_id, offset, length, reason, prefix, created_at) VALUES (?, ?, ?, ?, ?, ?)"
KNOWN_CHUNK = 500  # hashes looked up per query


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

    def known_generations(self, following: set[int]) -> list[Cursor]:
        """Generations read before and not followed now (finished, lost, or draining in the
        database only): a file at the log path may be one of them come back."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(Source).where(Source.state.in_(("done", "lost", "draining")), Source.offset > 0,
                                                     Source.id.not_in(following))).all()
        return [_cursor(r) for r in rows]

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

    def flushing(self) -> WalFlusher:
        """For a backfill: the WAL written to disk as the batches come (see WalFlusher)."""
        return WalFlusher(Path(self.engine.url.database))

    def commit(self, cursor: Cursor, batch: Classified, bulk: bool = False) -> CommitStats:
        """Store a batch's rows and the cursor that covers them, atomically; duplicates decided here.
        ``bulk``: part of a backfill, checkpointed less often (:func:`lacd.db.set_bulk`)."""
        now = time.time()
        sid = cursor.source_id
        stats = CommitStats(rejected=len(batch.rejects))
        with self.engine.begin() as conn:
            set_bulk(conn, bulk)
            cur = conn.connection.cursor()  # the hot path of a backfill: the driver's cursor, same transaction
            rows = self._lesson_rows(cur, sid, batch.lessons, now, stats)
            if rows:
                cur.executemany(LESSON_INSERT, rows)
            if batch.rejects:
                cur.executemany(REJECT_INSERT, [(sid, *r, now) for r in batch.rejects])
            if batch.findings:
                cur.executemany(FINDING_INSERT, [(sid, *f, now) for f in batch.findings])
                stats.secrets.update(f[1] for f in batch.findings)
            cur.close()
            conn.execute(update(Source).where(Source.id == sid).values(
                offset=cursor.offset, head_len=cursor.head_len, head_hash=cursor.head_hash,
                marker_len=cursor.marker_len, marker_hash=cursor.marker_hash,
                dev=cursor.dev, inode=cursor.inode, path=cursor.path, updated_at=now))
        self._log_decisions(sid, rows, batch)
        return stats

    def _lesson_rows(self, cur, sid: int, lessons: list[list], now: float, stats: CommitStats) -> list[list]:
        """Complete the classifier's rows (source, time, status); a lesson whose conversation is
        already stored (or earlier in the batch) is a duplicate unless another reason excludes it."""
        dedup = self.rules.get("duplicate", True)
        seen = self._known_hashes(cur, [row[CONV_HASH] for row in lessons]) if dedup else set()
        excluded = stats.excluded
        for row in lessons:
            row[SOURCE], row[INGESTED_AT] = sid, now
            if dedup:
                if row[REASON] is None and row[CONV_HASH] in seen:
                    row[REASON] = "duplicate"
                seen.add(row[CONV_HASH])
            if row[REASON]:
                row[STATUS] = "excluded"
                excluded[row[REASON]] += 1
            else:
                row[STATUS] = "pending"
        stats.lessons = len(lessons)
        stats.pending = stats.lessons - sum(excluded.values())
        return lessons

    def _known_hashes(self, cur, hashes: list[str]) -> set[str]:
        """Which of these conversation hashes the lessons table already holds."""
        found: set[str] = set()
        unique = list(set(hashes))
        for i in range(0, len(unique), KNOWN_CHUNK):
            chunk = unique[i:i + KNOWN_CHUNK]
            cur.execute(f"SELECT conv_hash FROM lessons WHERE conv_hash IN ({', '.join('?' * len(chunk))})", chunk)
            found.update(h for (h,) in cur.fetchall())
        return found

    def _log_decisions(self, sid: int, rows: list[list], batch: Classified) -> None:
        if not log.is_enabled_for(logging.INFO):  # each call binds the lazy logger: skip the loop
            return
        for r in batch.rejects:
            log.info("line_rejected", source=sid, offset=r[0], length=r[1], reason=r[2])
        for row in rows:
            if row[REASON]:
                log.info("lesson_excluded", source=sid, offset=row[OFFSET], reason=row[REASON])
        kinds: dict[int, list[str]] = {}
        for f in batch.findings:  # kinds and places only: never the secret, never the text around it
            kinds.setdefault(f[0], []).append(f[1])
        for offset, found in kinds.items():
            log.info("secrets_redacted", source=sid, offset=offset, kinds=sorted(set(found)), count=len(found))


def _cursor(row) -> Cursor:
    return Cursor(row.id, row.path, row.dev, row.inode, row.offset, row.head_len, row.head_hash,
                  row.marker_len, row.marker_hash)
