"""Durable, atomic writes of the files and folders lacd produces.

One convention for every temporary name: ``.NAME.PID.tmp`` next to the final NAME, PID being
the writer's process. A file is written under it (write_bytes_atomic, write_text_atomic,
write_json_atomic), optionally fsynced, then renamed over the final path, so a reader or a
crash never sees half a file under the final name. A folder is built under it (atomic_folder),
every file in it fsynced, then renamed into place. After a rename the parent directory is
fsynced so the rename itself survives a power loss. What a killed writer leaves behind carries
its dead PID; sweep_leftovers removes those when a run starts (worker.RunExecutor.execute).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterator, Mapping

import structlog

log = structlog.get_logger(__name__)

_TEMPORARY_NAME = re.compile(r"^\..+\.(\d+)\.tmp$")


def temporary_sibling(path: Path) -> Path:
    """The hidden temporary name (.NAME.PID.tmp) a file or folder is written under before it is
    renamed to path."""
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


def write_text_atomic(path: Path, text: str, *, durable: bool = True) -> None:
    """write_bytes_atomic of text in UTF-8."""
    write_bytes_atomic(path, text.encode("utf-8"), durable=durable)


def write_json_atomic(path: Path, payload: Mapping[str, Any], *, durable: bool = True) -> None:
    """write_bytes_atomic of payload as JSON (keys sorted, UTF-8)."""
    write_bytes_atomic(path, json.dumps(payload, sort_keys=True).encode("utf-8"), durable=durable)


def commit_folder(tmp: Path, final: Path, *, replace: bool = True) -> None:
    """fsync every file of the finished folder tmp, then rename it to final (replacing an old one;
    with replace=False an existing non-empty final is left alone and the rename raises OSError)."""
    for item in tmp.rglob("*"):
        if item.is_file():
            fsync_path(item)
    fsync_dir(tmp)
    if replace and final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(final.parent)


@contextlib.contextmanager
def temporary_folder(near: Path) -> Iterator[Path]:
    """An empty scratch folder named temporary_sibling(near), removed when the block ends."""
    tmp = temporary_sibling(Path(near))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(final: Path, *, replace: bool = True) -> Iterator[Path]:
    """Build the folder final under its temporary name: yields that empty folder; when the block
    succeeds, commit_folder renames it to final, else it is removed (final untouched)."""
    with temporary_folder(final) as tmp:
        yield tmp
        commit_folder(tmp, Path(final), replace=replace)


def _alive(pid: int) -> bool:
    """Whether a process with this pid exists (a zombie counts: its parent has not reaped it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_leftovers(root: Path, *, name: str | None = None) -> list[Path]:
    """Remove every temporary file or folder under root (.NAME.PID.tmp) whose writer is dead: what
    a killed or crashed writer left. A live writer's are kept. name: only the leftovers of
    root/name (a file written outside the state folder, such as `lacd export`'s). Returns what
    was removed."""
    removed = []
    found = Path(root).glob(f".{glob.escape(name)}.*.tmp") if name else Path(root).rglob(".*.tmp")
    for path in sorted(found):
        match = _TEMPORARY_NAME.match(path.name)
        if match is None or _alive(int(match.group(1))) or any(p in removed for p in path.parents):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    if removed:
        log.info("leftovers_swept", root=str(root), removed=[str(p) for p in removed])
    return removed
