"""What the running daemon is doing, for `lacd status`: ok, waiting for the log, or failing.

The daemon writes one small JSON object to ``<state dir>/lacd.health`` whenever that changes. The
file is allocated once at start and then only overwritten in place, so the daemon can still say
"the disk is full" on a full disk. A reader that catches a write half done sees no health, never
a wrong one.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

SIZE = 4096


class Health:
    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None
        self.last: tuple | None = None

    def open(self) -> None:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.posix_fallocate(self.fd, 0, SIZE)
        except OSError:  # a full disk at start, or a file system without it: written as far as it goes
            pass

    def set(self, state: str, message: str | None = None, retry_in: float | None = None) -> None:
        """`state`: ok, waiting or failing; written only when it (or the message) changes."""
        if self.fd is None or self.last == (state, message, retry_in):
            return
        data = json.dumps({"state": state, "message": message, "retry_in": retry_in, "since": time.time(),
                           "pid": os.getpid()}).encode()[:SIZE]
        try:
            os.pwrite(self.fd, data.ljust(SIZE), 0)
        except OSError:
            return  # the journal still has it
        self.last = (state, message, retry_in)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.path.unlink(missing_ok=True)


def read(path: Path, pid: int | None) -> dict | None:
    """The running daemon's health (None: not running, not written yet, or being written)."""
    if pid is None:
        return None
    try:
        found = json.loads(path.read_bytes().strip() or b"null")
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) and found.get("pid") == pid else None
