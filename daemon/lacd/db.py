"""SQLite through SQLAlchemy: the engine, its pragmas, transactions and migrations, in one place.

Writers (the tailer, the run executor, CLI commands that change state) use :func:`write_engine`,
whose transactions start with BEGIN IMMEDIATE so two writers never deadlock on a lock upgrade.
Readers (``lacd status`` and friends) use :func:`read_engine`: a read-only connection that can
never take the write lock and so never blocks the daemon.
"""

from __future__ import annotations

import os
import threading
from importlib import resources
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.pool import NullPool

BUSY_TIMEOUT_MS = 10_000
CACHE_KIB = 16 << 10
"""SQLite's page cache per connection. Small on purpose: during a backfill the random pages of the
conversation-hash index that miss it are read back from the OS's cache (measured: 16 MiB and 64 MiB
insert at the same speed into a 1 M-lesson database), and the daemon's memory stays low."""
CHECKPOINT_PAGES = 8192
BULK_CHECKPOINT_PAGES = 65536
"""WAL pages between automatic checkpoints: 32 MiB normally; 256 MiB while a backfill commits
(:func:`set_bulk`). Each batch rewrites hundreds of random index pages into the WAL; a checkpoint
copies each page once however often it was rewritten, so a larger WAL writes and fsyncs the database
far less (measured at 900 k lessons: 29 us per lesson instead of 53)."""
WAL_KEEP_BYTES = 64 << 20
"""After a checkpoint the WAL file is cut back to this size, except while a backfill commits: cutting
and growing it again each time cost 4 us of system time per lesson."""


class DatabaseError(Exception):
    """The database is missing, unreadable or not migrated; the message says what to do."""


class DamagedDatabase(DatabaseError):
    """SQLite says the file is not a database, or a damaged one: only moving it aside helps."""


def explain(exc: BaseException, path: Path) -> DatabaseError | None:
    """A SQLite failure (raw or wrapped by SQLAlchemy) as one line that says what to do; None for
    anything else. Lessons come from the log, so a damaged database can be rebuilt from it."""
    import sqlite3

    orig = getattr(exc, "orig", exc)
    if not isinstance(orig, sqlite3.Error):
        return None
    name = getattr(orig, "sqlite_errorname", "") or ""
    if name in ("SQLITE_CORRUPT", "SQLITE_NOTADB") or name.startswith("SQLITE_CORRUPT"):
        return DamagedDatabase(
            f"the database {path} is damaged ({orig}): stop lacd, move it aside "
            f"(mv {path} {path}.damaged, and its -wal and -shm files) and start lacd again: it is rebuilt "
            "from the log, which holds every lesson (runs and model versions are not)")
    if name.startswith("SQLITE_BUSY") or name.startswith("SQLITE_LOCKED"):
        return DatabaseError(f"the database {path} stayed locked by another process for more than "
                             f"{BUSY_TIMEOUT_MS / 1000:g} s ({orig})")
    if name == "SQLITE_FULL":
        return DatabaseError(f"the disk holding {path} is full ({orig}): free some space")
    if name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM", "SQLITE_AUTH")):
        return DatabaseError(f"cannot write the database {path} ({orig}): lacd needs to own its state dir")
    if name.startswith("SQLITE_IOERR"):
        return DatabaseError(f"the database {path} could not be read or written ({orig}; {name})")
    return None


def write_engine(path: Path) -> Engine:
    """An engine for writers: WAL, synchronous=NORMAL, busy timeout, BEGIN IMMEDIATE."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    engine = create_engine(f"sqlite+pysqlite:///{path}")  # pooled: one connection per thread, reused

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        cur.execute(f"PRAGMA wal_autocheckpoint={CHECKPOINT_PAGES}")
        cur.execute(f"PRAGMA journal_size_limit={WAL_KEEP_BYTES}")  # after a backfill's large WAL, give the disk back
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    _private_files(path)
    return engine


def set_bulk(conn, bulk: bool) -> None:
    """Checkpoint rarely and keep the WAL file's size while a backfill commits (``bulk``), or
    return to the defaults; for the database connection that `conn` (a SQLAlchemy connection) uses."""
    info = conn.connection.info
    if info.get("lacd_bulk", False) == bulk:
        return
    pages, keep = (BULK_CHECKPOINT_PAGES, -1) if bulk else (CHECKPOINT_PAGES, WAL_KEEP_BYTES)
    conn.exec_driver_sql(f"PRAGMA wal_autocheckpoint={pages}")
    conn.exec_driver_sql(f"PRAGMA journal_size_limit={keep}")
    info["lacd_bulk"] = bulk


class WalFlusher:
    """Writes the WAL to disk every `interval` seconds on a thread of its own while a backfill
    commits (a context manager).

    A checkpoint syncs the WAL before copying it into the database: with a backfill's 256 MiB of WAL
    since the last one, that sync held the committing thread about 0.2 s each time (22 times per GB
    of log; strace), and the worker process ran out of work meanwhile. Synced as it is written,
    little is left for the checkpoint's own sync. More syncs never weaken durability. Only the WAL:
    closing a descriptor of the database file itself would drop SQLite's POSIX locks on it.
    """

    def __init__(self, path: Path, interval: float = 0.1):
        self.path = Path(f"{path}-wal")
        self.interval = interval
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="lacd-wal-flush", daemon=True)

    def __enter__(self) -> "WalFlusher":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.thread.join()

    def _loop(self) -> None:
        fd = None
        try:
            while not self.stopping.wait(self.interval):
                if fd is None and self.path.exists():  # the WAL appears with the first write
                    fd = os.open(self.path, os.O_RDONLY)
                if fd is not None:
                    os.fdatasync(fd)
        finally:
            if fd is not None:
                os.close(fd)


def read_engine(path: Path) -> Engine:
    """A read-only engine; raises DatabaseError when there is no database yet."""
    if not path.exists():
        raise DatabaseError(f"no database at {path} yet: start the daemon or run `lacd migrate`")
    engine = create_engine(f"sqlite+pysqlite:///file:{path}?mode=ro&uri=true", poolclass=NullPool)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        dbapi_conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")

    return engine


def _private_files(path: Path) -> None:
    """Create the database file 0600 before SQLite does (SQLite would honour the umask)."""
    if not path.exists():
        fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
        os.close(fd)


def alembic_config(engine: Engine):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(resources.files("lacd.migrations")))
    cfg.attributes["engine"] = engine
    return cfg


def migrate(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to `revision` (default: the newest)."""
    from alembic import command

    command.upgrade(alembic_config(engine), revision)


def downgrade(engine: Engine, revision: str) -> None:
    from alembic import command

    command.downgrade(alembic_config(engine), revision)


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def require_schema(engine: Engine, *tables: str) -> None:
    """Raise DatabaseError when a table a reader needs is missing (the daemon never ran)."""
    names = set(inspect(engine).get_table_names())
    missing = [t for t in tables if t not in names]
    if missing:
        raise DatabaseError(f"the database has no {missing[0]} table yet: run `lacd migrate`")

