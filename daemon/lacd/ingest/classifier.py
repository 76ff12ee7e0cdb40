"""From a complete log line to what is stored: a lesson (secrets redacted, curation decided), a
reject (reason + redacted prefix), or nothing (a blank line).

Everything here is a pure function of the line and the settings (:class:`ClassifierSpec`), so it
can run in another process: :class:`Classifier` does it in this one, :class:`ClassifierPool`
in worker processes while a large backlog is read (parsing and scanning are most of a backfill's
CPU; the tailer's committer thread meanwhile writes earlier batches to SQLite).

Order of the work on a line: decode (BOM, CRLF, UTF-8), parse into the canonical conversation
(:func:`lacd.ingest.lessons.parse_line`), redact secrets in the raw line and the conversation
together (:class:`lacd.ingest.secrets.Scrubber`), hash the *redacted* conversation (duplicates
are found on what is stored), then curation: a secret kind configured to ``exclude`` first
(reason ``secret:<kind>``), then the lesson flaws. The duplicate rule needs the database and is
applied by :class:`lacd.ingest.store.Store` when the batch is committed.

A batch's answer is a :class:`Classified`: plain lists and tuples (lessons as rows in the lessons
table's column order), cheap to send between processes. A worker is sent a :class:`Chunk` (the
bytes of whole lines, read once by the tailer) and leaves out a lesson's raw text when it is the
line as read: the tailer's process decodes it again from the chunk it kept (:meth:`ChunkWork.result`).
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import signal
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field

import structlog

from lacd.ingest.lessons import LineRejected, canonical, flaw, parse_line
from lacd.ingest.secrets import DEFAULT_SECRET_PATHS, KINDS, Scrubber

log = structlog.get_logger(__name__)

PREFIX_CHARS = 200
BOM = b"\xef\xbb\xbf"

LESSON_COLUMNS = ("source_id", "offset", "length", "ingested_at", "format", "conversation", "raw", "conv_hash",
                  "status", "reason", "trained_run_id")
"""A lesson travels as a list in the lessons table's column order: the classifier fills what the line
decides, the store the rest (source, time, status, duplicates) just before the insert."""
SOURCE, OFFSET, LENGTH, INGESTED_AT, FORMAT, CONVERSATION, RAW, CONV_HASH, STATUS, REASON, TRAINED_RUN = range(11)


@dataclass
class Line:
    """A complete line of the log: where it is, and its bytes (None: longer than the cap, only
    ``prefix`` was kept)."""

    offset: int
    length: int  # including the newline
    data: bytes | None
    prefix: bytes = b""


@dataclass
class Chunk:
    """Whole lines read in one piece for a worker: ``data`` starts at file offset ``start`` and
    ends with a newline. ``max_line``: the cap on a line's length (without its newline)."""

    start: int
    data: bytes
    max_line: int


@dataclass
class Classified:
    """A batch's answer. ``lessons``: one row per lesson, in file order, in LESSON_COLUMNS order
    (``reason``: the curation flaw, if any; ``raw`` None: the line's text as read, filled in by
    :func:`fill_raw`; source, time and status: None until the store sets them);
    ``rejects``: ``(offset, length, reason, prefix)``; ``findings``: ``(offset, kind, field, turn)``
    for lessons and rejects alike."""

    lessons: list[list] = field(default_factory=list)
    rejects: list[tuple] = field(default_factory=list)
    findings: list[tuple] = field(default_factory=list)


@dataclass(frozen=True)
class ClassifierSpec:
    """The settings classification depends on (picklable: it is what a worker process is given).

    ``rules``: curation rule -> on/off (``[curation]``); ``scan``: redact secrets at all;
    ``exclude``: secret kinds whose lessons are excluded instead of redacted; the rest mirrors
    ``[secrets]``.
    """

    rules: dict[str, bool] = field(default_factory=dict)
    scan: bool = True
    exclude: tuple[str, ...] = ()
    paths: tuple[str, ...] = DEFAULT_SECRET_PATHS
    entropy_limit: float = 4.5
    hex_limit: float = 0.0

    @classmethod
    def from_settings(cls, settings) -> "ClassifierSpec":
        from lacd.config import split_list

        s = settings.secrets
        exclude = split_list(s.exclude)
        return cls(rules=dict(vars(settings.curation)), scan=s.scan,
                   exclude=tuple(KINDS) if "all" in exclude else tuple(exclude), paths=tuple(split_list(s.paths)),
                   entropy_limit=s.entropy_limit, hex_limit=s.hex_limit)


def line_bytes(offset: int, data: bytes) -> bytes:
    """A line's content without its BOM (at the file's start) and CR: what is decoded and stored."""
    if offset == 0 and data.startswith(BOM):
        data = data[3:]
    return data[:-1] if data.endswith(b"\r") else data


def fill_raw(out: Classified, chunk: Chunk) -> Classified:
    """Put back the raw text a worker left out (the line as read) from the chunk it was sent."""
    data, start = chunk.data, chunk.start
    for row in out.lessons:
        if row[RAW] is None:
            at = row[OFFSET] - start
            row[RAW] = line_bytes(row[OFFSET], data[at:at + row[LENGTH] - 1]).decode("utf-8")
    return out


class Classifier:
    """Classifies lines in this process.

    ``keep_raw=False`` (worker processes): a lesson whose raw text is the line as read is answered
    without it (``raw`` None), so it is not sent back to the process that read the line.
    """

    def __init__(self, spec: ClassifierSpec | None = None, keep_raw: bool = True):
        self.spec = spec or ClassifierSpec()
        self.keep_raw = keep_raw
        s = self.spec
        self.scrubber = (Scrubber({k: "exclude" for k in s.exclude}, s.paths, s.entropy_limit, s.hex_limit)
                         if s.scan else None)

    def classify_many(self, lines) -> Classified:
        """Classify lines (in file order) into one batch answer."""
        out = Classified()
        for line in lines:
            self.classify_into(out, line.offset, line.length, line.data, line.prefix)
        return out

    def classify_chunk(self, chunk: Chunk) -> Classified:
        """Classify every line of a chunk (a line longer than the cap keeps only its prefix)."""
        out = Classified()
        data, start, cap = chunk.data, chunk.start, chunk.max_line
        pos, end = 0, len(data)
        while pos < end:
            stop = data.index(b"\n", pos)
            if stop - pos > cap:
                self.classify_into(out, start + pos, stop + 1 - pos, None, data[pos:pos + PREFIX_CHARS * 4])
            else:
                self.classify_into(out, start + pos, stop + 1 - pos, data[pos:stop])
            pos = stop + 1
        return out

    def classify_into(self, out: Classified, offset: int, length: int, data: bytes | None,
                      prefix: bytes = b"") -> None:
        """Add what one line becomes to ``out``: a lesson, a reject, or nothing (a blank line).
        ``length`` counts the newline; ``data`` None: the line is longer than the cap (``prefix``)."""
        if data is None:
            self._reject(out, offset, length, f"line longer than the cap ({length - 1} bytes)",
                         prefix.decode("utf-8", "replace"))
            return
        data = line_bytes(offset, data)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            self._reject(out, offset, length, f"invalid UTF-8 at byte {exc.start}",
                         data[:PREFIX_CHARS * 4].decode("utf-8", "replace"))
            return
        if not text.strip():
            return
        try:
            parsed = parse_line(data)
        except LineRejected as exc:
            self._reject(out, offset, length, exc.reason, text)
            return
        self._lesson(out, offset, length, text, parsed)

    def submit(self, lines: list[Line]) -> Future:
        """Classify now; the answer as an already finished future (what the committer waits on)."""
        done: Future = Future()
        try:
            done.set_result(self.classify_many(lines))
        except BaseException as exc:  # handed to whoever asks for the result
            done.set_exception(exc)
        return done

    def close(self) -> None:
        """Nothing to release in this process."""

    def _lesson(self, out: Classified, offset: int, length: int, text: str, parsed) -> None:
        raw, conversation, conv_hash, secret = text, parsed.conversation, parsed.conv_hash, None
        messages = parsed.messages
        tags = self.scrubber.gate(text) if self.scrubber is not None else None
        if tags:  # most lines: the gate finds nothing that could be a secret, and that is all
            scrubbed = self.scrubber.scrub_lesson(text, parsed.messages, tags)
            if scrubbed.findings:
                raw, messages = scrubbed.raw, scrubbed.messages
                conversation, conv_hash = canonical(messages)
                out.findings += [(offset, f.kind, f.field, f.turn) for f in scrubbed.findings]
                if scrubbed.exclude:
                    secret = next(f"secret:{f.kind}" for f in scrubbed.findings if f.kind in self.spec.exclude)
        reason = secret or flaw(messages, self.spec.rules)
        if raw is text and not self.keep_raw:
            raw = None
        out.lessons.append([None, offset, length, None, parsed.format, conversation, raw, conv_hash,
                            None, reason, None])

    def _reject(self, out: Classified, offset: int, length: int, reason: str, text: str) -> None:
        if self.scrubber is None:
            prefix = text[:PREFIX_CHARS]
        else:
            prefix, kinds = self.scrubber.scrub_prefix(text, PREFIX_CHARS)
            out.findings += [(offset, kind, "prefix", -1) for kind in kinds]
        out.rejects.append((offset, length, reason, prefix))


_worker: Classifier | None = None


def _init_worker(spec: ClassifierSpec) -> None:
    global _worker
    # SIGTERM/SIGINT go to the whole process group (systemd, Ctrl-C): the daemon decides when to
    # stop and shuts the pool down itself; a worker whose parent died sees its queue close and exits
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker = Classifier(spec, keep_raw=False)
    gc.freeze()  # modules and the scanner live as long as the worker: the collector need not scan them


def _classify_in_worker(chunk: Chunk) -> Classified:
    assert _worker is not None
    return _worker.classify_chunk(chunk)


class ChunkWork:
    """A chunk being classified by a worker; :meth:`result` answers the complete batch (raw text
    filled in from the chunk, which is kept here until then)."""

    def __init__(self, future: Future, chunk: Chunk):
        self.future = future
        self.chunk: Chunk | None = chunk

    def result(self) -> Classified:
        out = self.future.result()
        if self.chunk is not None:
            out, self.chunk = fill_raw(out, self.chunk), None
        return out


class ClassifierPool:
    """Classifies chunks in worker processes (spawned: the daemon has threads, so no fork).

    Results come back in submission order as the tailer's committer asks for them, so rows are
    still committed in file order. Closing waits for running batches.
    """

    def __init__(self, spec: ClassifierSpec, workers: int):
        self.spec = spec
        self.workers = workers
        self.executor = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_init_worker, initargs=(spec,))
        log.info("classifier_pool_started", workers=workers)

    def submit_chunk(self, chunk: Chunk) -> ChunkWork:
        return ChunkWork(self.executor.submit(_classify_in_worker, chunk), chunk)

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)
        log.info("classifier_pool_stopped", workers=self.workers)


def pool_workers() -> int:
    """Worker processes for a backfill: every core but the one that reads and commits, at least one."""
    return max(1, (os.cpu_count() or 2) - 1)
