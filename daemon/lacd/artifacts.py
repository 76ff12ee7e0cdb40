"""Durable, atomic writes of the files and folders lacd produces.

A file is written under a hidden temporary name next to its final path
(``.NAME.PID.tmp``), optionally fsynced, then renamed over the final path, so a
reader or a crash never sees half a file under the final name. A folder is
built under a temporary name, every file in it fsynced, then renamed into place.
After a rename the parent directory is fsynced so the rename itself survives a
power loss.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping


def temporary_sibling(path: Path) -> Path:
    """The hidden temporary name a file is written under before it is renamed to path."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory: so the renames inside it are durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: Path) -> None:
    """fsync a directory so a rename or a new file in it is durable."""
    fsync_path(folder)


def write_bytes_atomic(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Write data to a temporary sibling, then rename it over path.

    durable: fsync the file before the rename and the folder after it (a file that
    must survive a power loss); False for files rewritten often whose loss is harmless
    (progress), where only the atomic rename matters.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def write_json_atomic(path: Path, payload: Mapping[str, Any], *, durable: bool = True) -> None:
    """write_bytes_atomic of payload as JSON (keys sorted, UTF-8)."""
    write_bytes_atomic(path, json.dumps(payload, sort_keys=True).encode("utf-8"), durable=durable)


def commit_folder(tmp: Path, final: Path) -> None:
    """fsync every file of the finished folder tmp, then rename it to final (replacing an old one)."""
    for item in tmp.rglob("*"):
        if item.is_file():
            fsync_path(item)
    fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(final.parent)
