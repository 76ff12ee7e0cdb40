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
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import signal
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field

import orjson
import structlog

from lacd.ingest.lessons import LineRejected, flaw, parse_line
from lacd.ingest.secrets import DEFAULT_SECRET_PATHS, KINDS, Finding, Scrubber

log = structlog.get_logger(__name__)

PREFIX_CHARS = 200
BOM = b"\xef\xbb\xbf"


@dataclass
class Line:
    """A complete line of the log: where it is, and its bytes (None: longer than the cap, only
    ``prefix`` was kept)."""

    offset: int
    length: int  # including the newline
    data: bytes | None
    prefix: bytes = b""


@dataclass
class LineLesson:
    """A line that became a lesson: what the lessons table stores, secrets already redacted."""

    offset: int
    length: int
    raw: str
    format: str
    conversation: str
    conv_hash: str
    flaw: str | None = None  # the curation reason that excludes it (duplicates: decided at commit)
    findings: tuple[Finding, ...] = ()


@dataclass
class LineReject:
    """A line that could not become a lesson: its reason and a redacted prefix."""

    offset: int
    length: int
    reason: str
    prefix: str
    findings: tuple[Finding, ...] = ()


Record = LineLesson | LineReject | None


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


class Classifier:
    """Classifies lines in this process."""

    def __init__(self, spec: ClassifierSpec | None = None):
        self.spec = spec or ClassifierSpec()
        s = self.spec
        self.scrubber = (Scrubber({k: "exclude" for k in s.exclude}, s.paths, s.entropy_limit, s.hex_limit)
                         if s.scan else None)

    def classify(self, line: Line) -> Record:
        """A lesson, a reject, or None for a blank line."""
        if line.data is None:
            text = line.prefix.decode("utf-8", "replace")
            return self._reject(line, f"line longer than the cap ({line.length - 1} bytes)", text)
        data = line.data[3:] if line.offset == 0 and line.data.startswith(BOM) else line.data
        if data.endswith(b"\r"):
            data = data[:-1]
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            return self._reject(line, f"invalid UTF-8 at byte {exc.start}", data[:PREFIX_CHARS * 4].decode("utf-8", "replace"))
        if not text.strip():
            return None
        try:
            parsed = parse_line(text)
        except LineRejected as exc:
            return self._reject(line, exc.reason, text)
        return self._lesson(line, text, parsed)

    def classify_many(self, lines: list[Line]) -> list[Record]:
        return [self.classify(line) for line in lines]

    def submit(self, lines: list[Line]) -> Future:
        """Classify now; the answer as an already finished future (the pool's interface)."""
        done: Future = Future()
        try:
            done.set_result(self.classify_many(lines))
        except BaseException as exc:  # handed to whoever asks for the result
            done.set_exception(exc)
        return done

    def close(self) -> None:
        """Nothing to release in this process."""

    def _lesson(self, line: Line, text: str, parsed) -> LineLesson:
        raw, conversation, conv_hash, findings, secret = text, parsed.conversation, parsed.conv_hash, (), None
        messages = parsed.messages
        if self.scrubber is not None:
            scrubbed = self.scrubber.scrub_lesson(text, parsed.messages)
            if scrubbed.findings:
                raw, messages, findings = scrubbed.raw, scrubbed.messages, tuple(scrubbed.findings)
                encoded = orjson.dumps({"messages": messages})
                conversation, conv_hash = encoded.decode(), hashlib.blake2b(encoded, digest_size=16).hexdigest()
                if scrubbed.exclude:
                    secret = next(f"secret:{f.kind}" for f in findings if f.kind in self.spec.exclude)
        reason = secret or flaw(messages, self.spec.rules)
        return LineLesson(line.offset, line.length, raw, parsed.format, conversation, conv_hash, reason, findings)

    def _reject(self, line: Line, reason: str, text: str) -> LineReject:
        findings: tuple[Finding, ...] = ()
        if self.scrubber is None:
            prefix = text[:PREFIX_CHARS]
        else:
            prefix, kinds = self.scrubber.scrub_prefix(text, PREFIX_CHARS)
            findings = tuple(Finding(kind, "prefix", -1) for kind in kinds)
        return LineReject(line.offset, line.length, reason, prefix, findings)


_worker: Classifier | None = None


def _init_worker(spec: ClassifierSpec) -> None:
    global _worker
    # SIGTERM/SIGINT go to the whole process group (systemd, Ctrl-C): the daemon decides when to
    # stop and shuts the pool down itself; a worker whose parent died sees its queue close and exits
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker = Classifier(spec)


def _classify_in_worker(lines: list[Line]) -> list[Record]:
    assert _worker is not None
    return _worker.classify_many(lines)


class ClassifierPool:
    """Classifies batches in worker processes (spawned: the daemon has threads, so no fork).

    Results come back as futures in submission order; the tailer's committer waits on them in
    that order, so rows are still committed in file order. Closing waits for running batches.
    """

    def __init__(self, spec: ClassifierSpec, workers: int):
        self.spec = spec
        self.workers = workers
        self.executor = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_init_worker, initargs=(spec,))
        log.info("classifier_pool_started", workers=workers)

    def submit(self, lines: list[Line]) -> Future:
        return self.executor.submit(_classify_in_worker, lines)

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)
        log.info("classifier_pool_stopped", workers=self.workers)


def pool_workers() -> int:
    """Worker processes for a backfill: every core but the one that reads and commits, at least one."""
    return max(1, (os.cpu_count() or 2) - 1)
