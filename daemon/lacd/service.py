"""The daemon: one process per state dir, a clear start, loop and stop.

    initialize()  (state dir locked) migrate, catch up on the log, start the watcher, READY=1
    loop_once()   supervise the watcher, read the log to its end, commit (the health check)
    shutdown()    STOPPING=1, stop the watcher, close files, release the lock

:meth:`Service.run` owns the loop and its error policy; signal handlers only set a flag and wake
the loop, so SIGTERM is answered within one poll interval and never interrupts a transaction.

What a failure does (one line each, never a traceback; ``lacd status`` shows it while it lasts):

* what a restart cannot fix (a state dir lacd cannot use, a log path that is not a regular file,
  a damaged database) ends ``lacd run`` with exit status 2, which the systemd units do not restart;
* what passes by itself (a database locked too long, a full disk, an unreadable log) keeps the
  daemon up: it retries after 2, 4, 8 ... up to 30 s, really waiting that long (file events do not
  cut the wait short), and keeps answering the watchdog, since the loop itself is healthy.
"""

from __future__ import annotations

import dataclasses
import errno
from contextlib import contextmanager
import os
import signal
import threading
import time

import structlog

from lacd import db
from lacd.config import Settings
from lacd.health import Health
from lacd.ingest.classifier import ClassifierSpec
from lacd.ingest.store import Store
from lacd.ingest.tailer import LogPathError, SyncStats, Tailer, check_log_path
from lacd.ingest.watcher import Watcher
from lacd.lock import StateLock
from lacd.systemd import Notifier

log = structlog.get_logger(__name__)

MAX_BACKOFF = 30.0


class StateDirError(Exception):
    """The state dir cannot be used (not creatable, not writable, readable by others); the message says the fix."""


def prepare_state_dir(settings: Settings) -> None:
    """Create the state dir private to its owner (0700); refuse one that others can read, or that
    this user cannot write."""
    state = settings.state.dir
    try:
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = state.stat()
    except FileExistsError:
        raise StateDirError(f"the state dir {state} is a file, not a directory; set [state] dir to a folder this "
                            "user can write") from None
    except OSError as exc:
        raise StateDirError(f"cannot create the state dir {state}: {exc.strerror}; set [state] dir to a "
                            "folder this user can write") from None
    mode = st.st_mode & 0o777
    if mode & 0o077:
        raise StateDirError(f"state dir {state} is open to other users (mode {mode:04o}) and lessons hold your code: "
                            f"run `chmod 700 {state}`")
    if not os.access(state, os.W_OK | os.X_OK):
        raise StateDirError(f"cannot write the state dir {state} (owned by uid {st.st_uid}, this is uid {os.getuid()}"
                            f"{', a read-only file system' if _read_only(state) else ''}): run lacd as its owner "
                            "or set [state] dir to a folder this user can write")


def _read_only(path) -> bool:
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)


def warn_if_remote_ollama(host: str) -> bool:
    """Models hold the user's code: say so when they are sent to another machine."""
    import ipaddress
    import socket
    from urllib.parse import urlsplit

    name = urlsplit(host if "://" in host else f"http://{host}").hostname or ""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(name, None)}
        local = all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)
    except (OSError, ValueError):
        local = name == "localhost"
    if not local:
        log.warning("ollama_not_loopback", host=host,
                    reason="models trained on your lessons will be uploaded to another machine")
    return not local


def open_tailer(settings: Settings, engine, interrupted=lambda: False) -> Tailer:
    rules = dataclasses.asdict(settings.curation)
    w = settings.watch
    return Tailer(w.log, Store(engine, rules), max_line=w.max_line_bytes, rotate_wait=w.rotate_wait,
                  batch_lines=w.batch_lines, interrupted=interrupted, spec=ClassifierSpec.from_settings(settings))


def catch_up(settings: Settings) -> SyncStats:
    """One ingest pass through the daemon's own code (``lacd ingest``); needs the daemon stopped."""
    prepare_state_dir(settings)
    check_log_path(settings.watch.log)
    lock = StateLock(settings.lock_path)
    lock.acquire()
    try:
        with explained(settings):
            engine = db.write_engine(settings.db_path)
            db.migrate(engine)
            tailer = open_tailer(settings, engine)
            tailer.start()
            tailer.rotate_wait = 0  # a one-shot pass does not wait for late writers
            try:
                stats = tailer.sync()
            finally:
                tailer.close()
        if tailer.waiting:
            raise LogPathError(tailer.waiting)
        return stats
    finally:
        lock.release()


@contextmanager
def explained(settings: Settings):
    """Turns a SQLite failure or a full disk into the one-line error that says what to do."""
    try:
        yield
    except Exception as exc:
        found = explain(exc, settings)
        if found is None:
            raise
        raise found from None


def explain(exc: BaseException, settings: Settings) -> Exception | None:
    """The one-line form of a failure lacd knows (None: an unexpected one, logged with its type)."""
    found = db.explain(exc, settings.db_path)
    if found is None and isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        found = db.DatabaseError(f"the disk holding {settings.state.dir} is full ({exc.strerror}): free some space")
    return found


class Service:
    def __init__(self, settings: Settings, notifier: Notifier | None = None):
        self.settings = settings
        self.notifier = notifier or Notifier()
        self.wake = threading.Event()
        self.stopping = False
        self.lock = StateLock(settings.lock_path)
        self.health = Health(settings.state.dir / "lacd.health")
        self.tailer: Tailer | None = None
        self.watcher = Watcher(str(settings.watch.log), self.wake)
        self.failures = 0
        self.worker = None
        self.scheduler = None

    def initialize(self) -> float:
        """Called with the state dir locked: the first catch-up, then READY=1 (also when it failed
        for a reason that passes: the daemon is up and says what it waits for). Returns the delay
        before the next step."""
        warn_if_remote_ollama(self.settings.ollama.host)
        try:
            self.health.open()
        except OSError as exc:  # `lacd status` cannot show the daemon's errors; the journal still has them
            log.warning("health_unavailable", error=str(exc))
        stats = SyncStats()
        delay = self._step(stats)
        log.info("daemon_ready", pid=os.getpid(), log=str(self.settings.watch.log), lessons=stats.lessons,
                 pending=stats.pending, rejected=stats.rejected, state_dir=str(self.settings.state.dir))
        problem = self.health.last[1] if self.health.last and self.health.last[0] != "ok" else None
        self.notifier.ready(problem or f"watching {self.settings.watch.log}")
        return delay

    def _open(self) -> None:
        """The database and the tailer (at start, and again until that succeeded)."""
        engine = db.write_engine(self.settings.db_path)
        db.migrate(engine)
        tailer = open_tailer(self.settings, engine, interrupted=lambda: self.stopping)
        tailer.start()
        self.tailer = tailer
        self._start_learning(engine)

    def _start_learning(self, engine) -> None:
        """The run worker (resumes an unfinished run first) and the scheduler that starts new ones."""
        from lacd.idle import IdleMonitor
        from lacd.runs import RunStore
        from lacd.scheduler import Scheduler
        from lacd.served import reconcile_configured
        from lacd.worker import RunExecutor, RunWorker

        reconcile_configured(self.settings, engine)  # a copy to the agent's model name cut short by a kill
        store = RunStore(engine)
        monitor = IdleMonitor(self.settings)  # runs start only while the agent is idle, and step aside
        log.info("idle_signals", hardware=monitor.describe_hardware(), idle_minutes=self.settings.schedule.idle_minutes)
        self.worker = RunWorker(RunExecutor(self.settings, store, threading.Event(), monitor=monitor))
        self.worker.start()
        self.scheduler = Scheduler(self.settings, store, on_new_run=lambda _run: self.worker.wake(), monitor=monitor)
        self.scheduler.start()

    def loop_once(self) -> SyncStats:
        self.watcher.supervise()
        if self.tailer is None:
            self._open()
        return self.tailer.sync()

    def run(self) -> None:
        """Run until SIGTERM/SIGINT; the only place that decides what a failure means."""
        self._install_signals()
        prepare_state_dir(self.settings)
        check_log_path(self.settings.watch.log)
        self.lock.acquire()
        try:
            delay = self.initialize()
            while not self.stopping:
                self._sleep(delay)
                delay = self._step()
        finally:
            self.shutdown()

    def _sleep(self, delay: float) -> None:
        """Wait `delay` seconds; a file event ends the wait early only while healthy (a failing
        step is retried when its backoff says, not at every write to the log)."""
        deadline = time.monotonic() + delay
        while not self.stopping:
            self.wake.wait(max(0.0, deadline - time.monotonic()))
            self.wake.clear()
            if not self.failures or time.monotonic() >= deadline:
                return

    def _step(self, stats: SyncStats | None = None) -> float:
        try:
            (stats or SyncStats()).add(self.loop_once())
        except Exception as exc:  # keep the daemon up unless a restart cannot help either
            return self._failed(exc)
        self.failures = 0
        waiting = self.tailer.waiting
        self.health.set("waiting" if waiting else "ok", waiting)
        self.notifier.watchdog()
        return self.settings.watch.poll_interval

    def _failed(self, exc: Exception) -> float:
        found = explain(exc, self.settings)
        if isinstance(found, db.DamagedDatabase):
            log.error("database_damaged", error=str(found))
            self.health.set("failing", str(found))
            raise found from None  # `lacd run` exits 2: a restart would find the same damage
        self.failures += 1
        delay = min(MAX_BACKOFF, 2.0 ** self.failures)
        message = str(found) if found is not None else f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        log.error("ingest_failed", error=message, failures=self.failures, retry_in=delay)
        self.health.set("failing", message, delay)
        self.notifier.send(f"STATUS=failing: {message}; retrying in {delay:.0f} s")
        self.notifier.watchdog()  # the loop is alive and backing off: no restart would help
        return delay

    def stop(self, *_args) -> None:
        self.stopping = True
        self.wake.set()

    def shutdown(self) -> None:
        self.notifier.stopping()
        if self.scheduler is not None:
            self.scheduler.stop()
        if self.worker is not None:
            self.worker.stop()
        self.watcher.stop()
        if self.tailer is not None:
            self.tailer.close()
        self.health.close()
        self.lock.release()
        log.info("daemon_stopped", pid=os.getpid())

    def _install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
