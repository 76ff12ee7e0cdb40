"""One daemon per state dir: an flock on <state dir>/lacd.lock that holds the owner's pid."""

from __future__ import annotations

import fcntl
import os
import time
from typing import Any


class LockHeld(Exception):
    """Another lacd daemon already runs on this state dir."""


def flock_within(fd: Any, wait: float, poll: float) -> bool:
    """Take an exclusive flock on fd (a descriptor or an open file), retrying every poll seconds
    for up to wait seconds. False when another process still holds it then."""
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll)


class StateLock:
    def __init__(self, path: os.PathLike):
        self.path = os.fspath(path)
        self.fd: int | None = None

    def acquire(self, wait: float = 2.0) -> None:
        """Take the lock, retrying briefly (a `lacd status` probe holds it for microseconds)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if not flock_within(fd, wait, poll=0.05):
            os.close(fd)
            pid = holder(self.path)
            raise LockHeld(f"another lacd daemon (pid {pid}) already runs on this state dir ({os.path.dirname(self.path)})")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = None


def holder(path: os.PathLike) -> int | None:
    """The pid of the daemon holding the lock, or None when no daemon runs."""
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
