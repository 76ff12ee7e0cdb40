"""Read the agent's log from the last committed offset to its end, through every rotation.

The tailer is the only writer of lessons. One call of :meth:`Tailer.sync` looks at what the log
path names now (same file grown, truncated, rewritten, rotated away, replaced, deleted), reads
complete lines from every file it follows, and commits them batch by batch through the Store.

Files it follows: ``current`` (the file at the path) and ``draining`` (earlier generations that
were rotated, deleted or replaced; read until nothing new arrived for ``rotate_wait`` seconds,
so a writer still appending to a renamed file loses nothing).

Two ways to read, the same rows either way: an ordinary append is split into lines and classified
in this process (:func:`iter_lines`); a backlog of ``pool_bytes`` or more (a backfill) is read in
chunks of whole lines that a worker process classifies while this process commits the chunks before
(:meth:`Tailer._read_chunks`). Either way each batch commits its rows with the cursor that covers
them, in file order, on the committer thread.
"""

from __future__ import annotations

import gc
import os
import queue
import stat
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

import structlog

from lacd.ingest.classifier import PREFIX_CHARS, Chunk, Classifier, ClassifierPool, ClassifierSpec, Line, pool_workers
from lacd.ingest.identity import Cursor, continues, find_continuation, find_generation
from lacd.ingest.store import CommitStats, Store

log = structlog.get_logger(__name__)

CHUNK = 1 << 20
BATCH_BYTES = 8 << 20
POOL_BYTES = 32 << 20  # a backlog this large is classified in worker processes
FIRST_READ = 1 << 20  # the first chunk read for worker processes; later ones fit `batch_lines` lines
COMMIT_DEPTH = 2  # batches read ahead of the one being committed: enough to keep a worker busy, and memory low


KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
         (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


class LogPathError(Exception):
    """The log path names something lacd must not read (a directory, a FIFO, ...), or cannot."""


def check_log_path(path: os.PathLike) -> None:
    """Refuse a log path that is not a regular file (a missing one is waited for): a FIFO would
    block the agent's writes, a directory would read as an empty log."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, PermissionError):
        return  # waited for; an unreadable one is reported by the tailer while it waits
    except OSError as exc:
        raise LogPathError(f"cannot use the log path {path}: {exc.strerror}; set [watch] log to the agent's "
                           "JSONL file") from None
    kind = next((name for test, name in KINDS if test(st.st_mode)), None)
    if kind is not None:
        raise LogPathError(f"the log path {path} is {kind}, not a regular file: set [watch] log to the agent's "
                           "JSONL file")


@dataclass
class Tracked:
    cursor: Cursor
    fd: int
    since: float  # when it was opened or last grew or was retired (for rotate_wait)
    draining: bool = False
    no_newline_to: int = 0  # the bytes from the cursor's offset to here hold no newline (an unfinished line)


@dataclass
class SyncStats:
    lessons: int = 0
    pending: int = 0
    rejected: int = 0
    excluded: Counter = field(default_factory=Counter)
    secrets: Counter = field(default_factory=Counter)

    def add(self, c: CommitStats) -> None:
        self.lessons += c.lessons
        self.pending += c.pending
        self.rejected += c.rejected
        self.excluded.update(c.excluded)
        self.secrets.update(c.secrets)


def iter_lines(fd: int, start: int, end: int, max_line: int) -> Iterator[Line]:
    """Complete lines between `start` and `end`; a line over `max_line` bytes is never held whole."""
    pos = line_start = start
    parts: list[bytes] = []
    held = 0
    too_long = False
    prefix = b""
    while pos < end:
        buf = os.pread(fd, min(CHUNK, end - pos), pos)
        if not buf:
            break
        i = 0
        while True:
            j = buf.find(b"\n", i)
            piece = buf[i:] if j < 0 else buf[i:j]
            if not too_long and held + len(piece) > max_line:
                too_long, prefix, parts, held = True, (b"".join(parts) + piece)[:PREFIX_CHARS * 4], [], 0
            elif not too_long:
                parts.append(piece)
                held += len(piece)
            if j < 0:
                break
            stop = pos + j + 1
            yield Line(line_start, stop - line_start, None if too_long else b"".join(parts), prefix)
            line_start, parts, held, too_long, prefix, i = stop, [], 0, False, b"", j + 1
        pos += len(buf)


def lines_end(data: bytes, n: int) -> int:
    """Where the first `n` complete lines of `data` end (0: not one complete line)."""
    if data.count(b"\n") <= n:
        return data.rfind(b"\n") + 1
    end = 0
    for _ in range(n):
        end = data.index(b"\n", end) + 1
    return end


class Committer:
    """Commits batches in order on a thread of its own.

    SQLite releases the GIL while it writes, so committing batch N overlaps with parsing batch
    N+1 and a backfill uses both cores. At most `depth` batches wait. Each batch still commits its
    rows and the cursor that covers them in one transaction; a failed commit stops the committer,
    and :meth:`drain` raises it so the tailer can fall back to what the database holds.
    """

    def __init__(self, store: Store, depth: int = COMMIT_DEPTH):
        self.store = store
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None

    def submit(self, cursor: Cursor, work, stats: SyncStats, bulk: bool = False) -> None:
        """Commit the batch `work` answers (a classifier's future, or a worker's ChunkWork) with
        `cursor`, after the earlier ones; `bulk`: part of a backfill (see Store.commit)."""
        if self.error is not None:
            raise self.error
        if self.thread is None:
            self.thread = threading.Thread(target=self._loop, name="lacd-commit", daemon=True)
            self.thread.start()
        self.queue.put((cursor, work, stats, bulk))

    def drain(self) -> None:
        """Wait until every submitted batch is committed; raise the first failure."""
        self.queue.join()
        error, self.error = self.error, None
        if error is not None:
            raise error

    def close(self) -> None:
        if self.thread is not None:
            self.queue.put(None)
            self.thread.join(timeout=30)
            self.thread = None

    def _loop(self) -> None:
        while (item := self.queue.get()) is not None:
            try:
                if self.error is None:
                    self._commit(*item)
            except BaseException as exc:  # handed to the tailer's thread by drain()
                self.error = exc
            finally:
                self.queue.task_done()
        self.queue.task_done()

    def _commit(self, cursor: Cursor, work, stats: SyncStats, bulk: bool) -> None:
        result = self.store.commit(cursor, work.result(), bulk)
        stats.add(result)
        log.info("ingest_batch", source=cursor.source_id, offset=cursor.offset, lessons=result.lessons,
                 pending=result.pending, rejected=result.rejected, excluded=dict(result.excluded),
                 secrets=dict(result.secrets))


class Tailer:
    def __init__(self, path: os.PathLike, store: Store, *, max_line: int, rotate_wait: float,
                 batch_lines: int, clock: Callable[[], float] = time.monotonic,
                 interrupted: Callable[[], bool] = lambda: False, spec: ClassifierSpec | None = None,
                 pool_bytes: int = POOL_BYTES, workers: int | None = None):
        self.path = os.path.abspath(os.fspath(path))
        self.store = store
        self.spec = spec or ClassifierSpec(rules=store.rules)
        self.classifier = Classifier(self.spec)
        self.pool_bytes = pool_bytes  # a backlog at least this large goes to worker processes
        self.workers = pool_workers() if workers is None else workers  # 0: never use worker processes
        self.pool: ClassifierPool | None = None
        self.max_line = max_line
        self.rotate_wait = rotate_wait
        self.batch_lines = batch_lines
        self.clock = clock
        self.interrupted = interrupted  # checked between batches: a stop never waits for a backfill
        self.committer = Committer(store)
        self.current: Tracked | None = None
        self.draining: list[Tracked] = []
        self.saved: Cursor | None = None  # the active generation the database remembers
        self.waiting: str | None = None  # why the file at the path cannot be read now (retried each sync)
        self.rewind = False  # a sync failed: the next one first reloads the cursors from the database

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Pick up where the database says the last process stopped."""
        self.saved, draining = self.store.open_sources(self.path)
        for cursor in draining:
            self._resume_elsewhere(cursor, note="rotated away before a restart")

    def close(self) -> None:
        self.committer.close()
        self._close_pool()
        self._close_files()

    def _close_pool(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def _close_files(self) -> None:
        for t in self._followed():
            os.close(t.fd)
        self.current, self.draining = None, []

    def sync(self) -> SyncStats:
        """Follow the path, read every followed file to its last complete line, commit."""
        stats = SyncStats()
        try:
            if self.rewind:
                self.start()
                self.rewind = False
            self._follow()
            for t in list(self._followed()):
                self._read(t, stats)
            self.committer.drain()
            self._expire()
        except BaseException:
            self._fall_back()
            raise
        finally:
            self._close_pool()  # worker processes live for one large backlog, not while idle
        return stats

    def _fall_back(self) -> None:
        """After a failure, forget what was read ahead: the next sync starts from what the database
        holds (read then, since the database may be what failed: locked, full)."""
        try:
            self.committer.drain()
        except BaseException:  # noqa: S110 - the failure being handled is the one raised
            pass
        self._close_files()
        self.saved, self.rewind = None, True

    def _followed(self) -> list[Tracked]:
        """Older generations first, so lessons keep the order in which they were written."""
        return self.draining + ([self.current] if self.current else [])

    # -- what the path names now ------------------------------------------------------------------

    def _follow(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            st = None
        except PermissionError:
            self._wait(f"cannot look at the log {self.path}: permission denied on its directory")
            return
        if st is not None and not stat.S_ISREG(st.st_mode):
            st = None
        if st is None and self.saved:
            self._resume_elsewhere(self.saved, note="the log was missing when lacd started")
            self.saved = None
        cur = self.current
        if cur and st and (st.st_dev, st.st_ino) == (cur.cursor.dev, cur.cursor.inode):
            if not continues(cur.fd, cur.cursor):
                self._restart_generation(cur, st)
            return
        if cur:
            self._retire(cur)
        if st:
            self.current = self._adopt(st)
        if self.current or not st:
            self._wait(None)

    def _wait(self, reason: str | None) -> None:
        """Say once why the log cannot be read (or that it can again); the next polls retry."""
        if reason != self.waiting:
            if reason:
                log.warning("log_unreadable", path=self.path, reason=reason)
            elif self.waiting:
                log.info("log_readable", path=self.path)
        self.waiting = reason

    def _retire(self, t: Tracked) -> None:
        """The path no longer names this file: read it to its end, then keep draining it."""
        self._read(t, SyncStats())
        self.committer.drain()
        t.draining, t.since = True, self.clock()
        self.draining.append(t)
        self.current = None
        self.store.set_state(t.cursor, "draining", note="rotated, replaced or deleted")

    def _adopt(self, st: os.stat_result) -> Tracked | None:
        """Open the file at the path: the continuation of a known generation, or a new one."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        except PermissionError:
            self._wait(f"cannot read the log {self.path}: permission denied")
            return None
        if os.fstat(fd).st_ino != st.st_ino:
            os.close(fd)  # replaced between stat and open: the next sync looks again
            return None
        for t in list(self.draining):
            if t.cursor.offset and continues(fd, t.cursor):  # same bytes, new inode: an atomic replace
                self.draining.remove(t)
                os.close(t.fd)
                return self._continue(fd, st, t.cursor, "replaced by a file with the same content")
        saved, self.saved = self.saved, None
        if saved and continues(fd, saved):
            return self._continue(fd, st, saved, None)
        if saved:
            self._resume_elsewhere(saved, note="the file at the path changed while lacd was stopped", skip={(st.st_dev, st.st_ino)})
        known = find_generation(fd, self.store.known_generations({t.cursor.source_id for t in self.draining}))
        if known is not None:  # read before: never again from 0
            return self._continue(fd, st, known, f"came back to the log path: read before, up to offset {known.offset}")
        return Tracked(self.store.new_source(self.path, st.st_dev, st.st_ino), fd, self.clock())

    def _continue(self, fd: int, st: os.stat_result, cursor: Cursor, note: str | None) -> Tracked:
        cursor = replace(cursor, path=self.path, dev=st.st_dev, inode=st.st_ino)
        self.store.set_state(cursor, "active", note=note)
        return Tracked(cursor, fd, self.clock())

    def _restart_generation(self, cur: Tracked, st: os.stat_result) -> None:
        """Same inode, other bytes: truncated (copytruncate too) or rewritten in place."""
        old = cur.cursor
        self._resume_elsewhere(old, note="truncated or rewritten in place", skip={(st.st_dev, st.st_ino)})
        cur.cursor = self.store.new_source(self.path, st.st_dev, st.st_ino)
        cur.since = self.clock()

    def _resume_elsewhere(self, cursor: Cursor, note: str, skip: set | None = None) -> None:
        """Finish a generation from a file beside the log that still holds it, or record it lost."""
        found = find_continuation(os.path.dirname(cursor.path), cursor, skip or set())
        if found is None:
            lost = "its file is gone: lines written after the last read offset could not be read"
            self.store.set_state(cursor, "lost", note=f"{note}; {lost}")
            log.warning("source_lost", source=cursor.source_id, offset=cursor.offset, reason=note)
            return
        st = os.stat(found)
        cursor = replace(cursor, path=found, dev=st.st_dev, inode=st.st_ino)
        self.store.set_state(cursor, "draining", note=f"{note}; finishing it from {found}")
        self.draining.append(Tracked(cursor, os.open(found, os.O_RDONLY), self.clock(), draining=True))

    def _expire(self) -> None:
        now = self.clock()
        for t in list(self.draining):
            if now - t.since >= self.rotate_wait:
                self.draining.remove(t)
                os.close(t.fd)
                self.store.set_state(t.cursor, "done")

    # -- reading ------------------------------------------------------------------------------------

    def _read(self, t: Tracked, stats: SyncStats) -> None:
        size = os.fstat(t.fd).st_size
        if size <= t.cursor.offset or not self._complete_line_in(t, size):
            return
        if size - t.cursor.offset >= self.pool_bytes and self.workers >= 1:
            gc.freeze()  # the collector skips the daemon's own objects while millions of rows come and go
            try:
                with self.store.flushing():
                    self._read_chunks(t, size, stats)
            finally:
                gc.unfreeze()
            return
        batch: list[Line] = []
        batch_bytes = 0
        end = t.cursor.offset
        for line in iter_lines(t.fd, t.cursor.offset, size, self.max_line):
            batch.append(line)
            end = line.offset + line.length
            batch_bytes += line.length
            if len(batch) >= self.batch_lines or batch_bytes >= BATCH_BYTES:
                self._commit(t, end, self.classifier.submit(batch), stats)
                batch, batch_bytes = [], 0
                if self.interrupted():
                    return
        if end > t.cursor.offset:
            self._commit(t, end, self.classifier.submit(batch), stats)

    def _complete_line_in(self, t: Tracked, size: int) -> bool:
        """Does the unread part hold a newline? Only bytes not looked at before are read: an
        unfinished line of any size waiting for its newline costs nothing per poll, and starts
        no worker process."""
        pos = max(t.cursor.offset, t.no_newline_to)
        while pos < size:
            buf = os.pread(t.fd, min(CHUNK, size - pos), pos)
            if not buf:
                break
            if b"\n" in buf:
                return True
            pos += len(buf)
        t.no_newline_to = pos
        return False

    def _read_chunks(self, t: Tracked, size: int, stats: SyncStats) -> None:
        """A large backlog (a backfill): whole lines are read in chunks of `batch_lines` lines (at
        most BATCH_BYTES) and classified by worker processes while earlier chunks are committed.
        A line longer than a chunk is read the bounded way (:func:`iter_lines`) in this process."""
        if self.pool is None:
            self.pool = ClassifierPool(self.spec, self.workers)
        want = FIRST_READ
        while (pos := t.cursor.offset) < size:
            data = os.pread(t.fd, min(want, size - pos), pos)
            cut = lines_end(data, self.batch_lines)
            if cut:
                work = self.pool.submit_chunk(Chunk(pos, data[:cut], self.max_line))
                self._commit(t, pos + cut, work, stats, bulk=True)
                want = min(BATCH_BYTES, max(CHUNK, cut + cut // 4))
            elif len(data) == want and want < BATCH_BYTES:
                want = BATCH_BYTES  # a long line: look further before reading it on its own
                continue
            else:
                line = next(iter_lines(t.fd, pos, size, self.max_line), None)
                if line is None:
                    return  # only an incomplete last line is left
                self._commit(t, line.offset + line.length, self.classifier.submit([line]), stats)
            if self.interrupted():
                return

    def _commit(self, t: Tracked, end: int, work, stats: SyncStats, bulk: bool = False) -> None:
        moved = replace(t.cursor)
        moved.advance(t.fd, end)
        self.committer.submit(moved, work, stats, bulk)
        t.cursor, t.since = moved, self.clock()  # read ahead; on a failed commit, _fall_back rewinds
