"""The daemon: one process per state dir, a clear start, loop and stop.

    initialize()  (state dir locked) migrate, catch up on the log, start the watcher, READY=1
    loop_once()   supervise the watcher, read the log to its end, commit (the health check)
    shutdown()    STOPPING=1, stop the watcher, close files, release the lock

:meth:`Service.run` owns the loop and its error policy; signal handlers only set a flag and wake
the loop, so SIGTERM is answered within one poll interval and never interrupts a transaction.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading

import structlog

from lacd import db
from lacd.config import Settings
from lacd.ingest.classifier import ClassifierSpec
from lacd.ingest.store import Store
from lacd.ingest.tailer import SyncStats, Tailer
from lacd.ingest.watcher import Watcher
from lacd.lock import StateLock
from lacd.systemd import Notifier

log = structlog.get_logger(__name__)

MAX_BACKOFF = 30.0


class StateDirError(Exception):
    """The state dir is readable by others; the message says how to fix it."""


def prepare_state_dir(settings: Settings) -> None:
    """Create the state dir private to its owner (0700); refuse one that others can read."""
    state = settings.state.dir
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    mode = state.stat().st_mode & 0o777
    if mode & 0o077:
        raise StateDirError(f"state dir {state} is open to other users (mode {mode:04o}) and lessons hold your code: "
                            f"run `chmod 700 {state}`")


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
    lock = StateLock(settings.lock_path)
    lock.acquire()
    try:
        engine = db.write_engine(settings.db_path)
        db.migrate(engine)
        tailer = open_tailer(settings, engine)
        tailer.start()
        tailer.rotate_wait = 0  # a one-shot pass does not wait for late writers
        try:
            return tailer.sync()
        finally:
            tailer.close()
    finally:
        lock.release()


class Service:
    def __init__(self, settings: Settings, notifier: Notifier | None = None):
        self.settings = settings
        self.notifier = notifier or Notifier()
        self.wake = threading.Event()
        self.stopping = False
        self.lock = StateLock(settings.lock_path)
        self.tailer: Tailer | None = None
        self.watcher = Watcher(str(settings.watch.log), self.wake)
        self.failures = 0
        self.worker = None
        self.scheduler = None

    def initialize(self) -> None:
        """Called with the state dir locked."""
        warn_if_remote_ollama(self.settings.ollama.host)
        engine = db.write_engine(self.settings.db_path)
        db.migrate(engine)
        self.tailer = open_tailer(self.settings, engine, interrupted=lambda: self.stopping)
        self.tailer.start()
        stats = self.tailer.sync()
        self.watcher.supervise()
        self._start_learning(engine)
        log.info("daemon_ready", pid=os.getpid(), log=str(self.settings.watch.log), lessons=stats.lessons,
                 pending=stats.pending, rejected=stats.rejected, state_dir=str(self.settings.state.dir))
        self.notifier.ready(f"watching {self.settings.watch.log}")

    def _start_learning(self, engine) -> None:
        """The run worker (resumes an unfinished run first) and the scheduler that starts new ones."""
        from lacd.runs import RunStore
        from lacd.scheduler import Scheduler
        from lacd.worker import RunExecutor, RunWorker

        store = RunStore(engine)
        self.worker = RunWorker(RunExecutor(self.settings, store, threading.Event()))
        self.worker.start()
        self.scheduler = Scheduler(self.settings, store, on_new_run=lambda _run: self.worker.wake())
        self.scheduler.start()

    def loop_once(self) -> None:
        self.watcher.supervise()
        self.tailer.sync()

    def run(self) -> None:
        """Run until SIGTERM/SIGINT; the only place that decides what a failure means."""
        self._install_signals()
        prepare_state_dir(self.settings)
        self.lock.acquire()
        try:
            self.initialize()
            while not self.stopping:
                delay = self._step()
                self.wake.wait(delay)
                self.wake.clear()
        finally:
            self.shutdown()

    def _step(self) -> float:
        try:
            self.loop_once()
        except Exception as exc:  # keep the daemon up; systemd's watchdog acts if this persists
            self.failures += 1
            delay = min(MAX_BACKOFF, 2.0 ** self.failures)
            log.error("ingest_failed", error=f"{type(exc).__name__}: {exc}", failures=self.failures, retry_in=delay)
            return delay
        self.failures = 0
        self.notifier.watchdog()
        return self.settings.watch.poll_interval

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
        self.lock.release()
        log.info("daemon_stopped", pid=os.getpid())

    def _install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
