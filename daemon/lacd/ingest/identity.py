"""Is this open file still the one a cursor describes? (the way Fluent Bit's tail input decides)

A cursor remembers a hash of the file's first bytes (up to HEAD_BYTES, never past the offset) and a
marker hash of the MARKER_BYTES just before its offset. A file continues the cursor when it is at
least `offset` long and both hashes still match: that tells truncation, copytruncate, rotation,
delete-and-recreate (with a reused inode too), atomic replace and a rewrite made while the daemon
was stopped apart from a file that simply grew.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

HEAD_BYTES = 4096
MARKER_BYTES = 256


@dataclass
class Cursor:
    """How far one file generation has been read; mirrors a row of the sources table."""

    source_id: int | None
    path: str
    dev: int
    inode: int
    offset: int = 0
    head_len: int = 0
    head_hash: str = ""
    marker_len: int = 0
    marker_hash: str = ""

    def advance(self, fd: int, offset: int) -> None:
        """Move to `offset` (just after a complete line) and re-take the hashes there."""
        self.offset = offset
        if self.head_len < min(offset, HEAD_BYTES):
            self.head_len = min(offset, HEAD_BYTES)
            self.head_hash = _hash_range(fd, 0, self.head_len)
        self.marker_len = min(offset, MARKER_BYTES)
        self.marker_hash = _hash_range(fd, offset - self.marker_len, self.marker_len)


def continues(fd: int, cursor: Cursor) -> bool:
    """True when the file behind `fd` holds exactly the bytes the cursor has already read."""
    if os.fstat(fd).st_size < cursor.offset:
        return False
    if _hash_range(fd, 0, cursor.head_len) != cursor.head_hash:
        return False
    start = cursor.offset - cursor.marker_len
    return _hash_range(fd, start, cursor.marker_len) == cursor.marker_hash


def _hash_range(fd: int, start: int, length: int) -> str:
    if length == 0:
        return ""
    data = os.pread(fd, length, start)
    return hashlib.blake2b(data, digest_size=16).hexdigest() if len(data) == length else "short"


def find_continuation(directory: str, cursor: Cursor, skip: set[tuple[int, int]], limit: int = 200) -> str | None:
    """A file next to the log that continues `cursor` (a rotated or copied-away generation).

    Checked only among regular files whose name starts with the log's stem (agent_interactions*),
    the same inode first, then copies (copytruncate leaves the unread tail in the copy).
    """
    stem = os.path.basename(cursor.path).split(".")[0]
    candidates = []
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.name.startswith(stem) and entry.is_file(follow_symlinks=False):
                    st = entry.stat(follow_symlinks=False)
                    if (st.st_dev, st.st_ino) not in skip and st.st_size >= cursor.offset:
                        same = (st.st_dev, st.st_ino) == (cursor.dev, cursor.inode)
                        candidates.append((not same, entry.path))
                if len(candidates) >= limit:
                    break
    except FileNotFoundError:
        return None
    for _, path in sorted(candidates):
        if _file_continues(path, cursor):
            return path
    return None


def _file_continues(path: str, cursor: Cursor) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        return continues(fd, cursor)
    finally:
        os.close(fd)


def find_generation(fd: int, cursors: list[Cursor]) -> Cursor | None:
    """The generation among `cursors` that the file behind `fd` continues, the most read first: a
    file lacd read before, back at the log path (moved back, a symlink pointed back at it, made
    readable again). One hash of the file's head per distinct head length, then the marker."""
    heads: dict[int, str] = {}
    size = os.fstat(fd).st_size
    for cursor in sorted(cursors, key=lambda c: -c.offset):
        if cursor.offset == 0 or cursor.offset > size:
            continue
        if cursor.head_len not in heads:
            heads[cursor.head_len] = _hash_range(fd, 0, cursor.head_len)
        if heads[cursor.head_len] == cursor.head_hash and continues(fd, cursor):
            return cursor
    return None
