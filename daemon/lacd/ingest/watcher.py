"""Wake the tailer when the log's directory changes.

watchdog watches the log's directory (not the file: a file watch dies with rotation), and any
event naming the log or a sibling of it only means "read from the checkpoint to the end". The
service loop also polls on a timer, so a missed event, an unsupported file system or a dead
observer costs latency, never data. :meth:`Watcher.supervise` restarts a dead observer and starts
one once the directory exists.
"""

from __future__ import annotations

import os
import threading

import structlog
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

log = structlog.get_logger(__name__)


class _Wake(FileSystemEventHandler):
    def __init__(self, stem: str, wake: threading.Event):
        self.stem = stem
        self.wake = wake

    def on_any_event(self, event: FileSystemEvent) -> None:
        for p in (event.src_path, getattr(event, "dest_path", "")):
            if p and os.path.basename(os.fsdecode(p)).startswith(self.stem):
                self.wake.set()
                return


class Watcher:
    def __init__(self, log_path: str, wake: threading.Event):
        self.directory = os.path.dirname(os.path.abspath(log_path))
        self.handler = _Wake(os.path.basename(log_path).split(".")[0], wake)
        self.observer: Observer | None = None
        self.restarts = 0
        self.unavailable: str | None = None  # why the last start failed (said once, retried each poll)

    def supervise(self) -> None:
        """Start the observer if it is not running (first call, dead thread, directory created)."""
        if self.observer is not None and self.observer.is_alive():
            return
        if self.observer is not None:
            self.restarts += 1
            log.warning("watcher_restarted", directory=self.directory, restarts=self.restarts)
            self._stop_observer()
        if not os.path.isdir(self.directory):
            return  # polling covers it until the directory exists
        observer = Observer()
        observer.schedule(self.handler, self.directory, recursive=False)
        observer.daemon = True
        try:
            observer.start()
        except OSError as exc:  # inotify limits, an unreadable folder and the like: polling still works
            if str(exc) != self.unavailable:
                log.warning("watcher_unavailable", directory=self.directory, error=str(exc))
            self.unavailable = str(exc)
            return
        self.observer, self.unavailable = observer, None

    def stop(self) -> None:
        self._stop_observer()

    def _stop_observer(self) -> None:
        observer, self.observer = self.observer, None
        if observer is None:
            return
        try:
            observer.stop()
            observer.join(timeout=2)
        except Exception as exc:  # a dead observer may fail to stop; it is discarded either way
            log.warning("watcher_stop_failed", error=str(exc))
