"""Schema changes only through Alembic: up from empty, down to empty, up again."""

from __future__ import annotations

from sqlalchemy import inspect

from lacd import db
from lacd.models import Base


def tables(engine) -> set[str]:
    return set(inspect(engine).get_table_names()) - {"alembic_version"}


def test_upgrade_downgrade_upgrade(tmp_path):
    engine = db.write_engine(tmp_path / "lacd.db")
    assert db.current_revision(engine) is None
    db.migrate(engine)
    head = db.current_revision(engine)
    assert tables(engine) == set(Base.metadata.tables)
    db.downgrade(engine, "base")
    assert tables(engine) == set() and db.current_revision(engine) is None
    db.migrate(engine)
    assert db.current_revision(engine) == head


def test_migrations_match_the_models(tmp_path):
    """What the migrations build is what models.py declares (autogenerate finds no difference)."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    engine = db.write_engine(tmp_path / "lacd.db")
    db.migrate(engine)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_database_files_are_private(tmp_path):
    engine = db.write_engine(tmp_path / "state" / "lacd.db")
    db.migrate(engine)
    assert (tmp_path / "state" / "lacd.db").stat().st_mode & 0o077 == 0
    assert (tmp_path / "state").stat().st_mode & 0o077 == 0
