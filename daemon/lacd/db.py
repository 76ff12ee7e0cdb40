"""SQLite through SQLAlchemy: the engine, its pragmas, transactions and migrations, in one place.

Writers (the tailer, the run executor, CLI commands that change state) use :func:`write_engine`,
whose transactions start with BEGIN IMMEDIATE so two writers never deadlock on a lock upgrade.
Readers (``lacd status`` and friends) use :func:`read_engine`: a read-only connection that can
never take the write lock and so never blocks the daemon.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.pool import NullPool

BUSY_TIMEOUT_MS = 10_000


class DatabaseError(Exception):
    """The database is missing, unreadable or not migrated; the message says what to do."""


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
        cur.execute("PRAGMA cache_size=-65536")  # 64 MiB: the conversation-hash index is inserted in random order
        cur.execute("PRAGMA wal_autocheckpoint=8192")  # checkpoint (and fsync) every 32 MiB of WAL, not 4
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    _private_files(path)
    return engine


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
