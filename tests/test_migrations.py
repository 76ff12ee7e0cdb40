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


def test_a_populated_0001_database_upgrades_to_head_with_every_row(tmp_path):
    """A database written by the first release (schema 0001: a log source, lessons, a reject, a
    finished run) is upgraded in place; every row survives with its values, the new columns get
    their defaults, and today's code reads it (the queue counts, `lacd status` and `lacd lessons`)."""
    import json

    from sqlalchemy import text

    from conftest import agent_line, lacd_env, run_cli
    from lacd.ingest.lessons import parse_line

    state = tmp_path / "state"
    engine = db.write_engine(state / "lacd.db")
    db.migrate(engine, "0001")
    lines = [agent_line(i) for i in range(3)]
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO sources (id, path, dev, inode, head_len, head_hash, offset, marker_len, "
                          "marker_hash, state, note, created_at, updated_at) VALUES (1, :path, 1, 2, 10, 'h', 300, "
                          "10, 'm', 'active', NULL, 1.0, 2.0)"), {"path": str(tmp_path / "agent_interactions.jsonl")})
        for i, line in enumerate(lines):
            parsed = parse_line(line)
            conn.execute(text("INSERT INTO lessons (source_id, offset, length, ingested_at, format, conversation, raw, "
                              "conv_hash, status, reason, trained_run_id) VALUES (1, :o, :n, 3.0, :f, :c, :r, :h, "
                              ":s, NULL, :t)"),
                         {"o": i * 100, "n": len(line) + 1, "f": parsed.format, "c": parsed.conversation, "r": line,
                          "h": parsed.conv_hash, "s": "trained" if i == 0 else "pending", "t": 1 if i == 0 else None})
        conn.execute(text("INSERT INTO rejects (source_id, offset, length, reason, prefix, created_at) "
                          "VALUES (1, 300, 5, 'invalid JSON: unexpected character at column 1', 'nope', 4.0)"))
        conn.execute(text("INSERT INTO runs (id, status, stage, created_at, finished_at, lesson_count, error, progress) "
                          "VALUES (1, 'done', 'register', 5.0, 6.0, 1, NULL, NULL)"))
        before = {t: [tuple(r) for r in conn.execute(text(f"SELECT * FROM {t} ORDER BY 1"))]
                  for t in ("sources", "lessons", "rejects", "runs")}

    db.migrate(engine)
    assert db.current_revision(engine) != "0001" and tables(engine) == set(Base.metadata.tables)
    with engine.connect() as conn:
        for table, rows in before.items():
            width = len(rows[0])  # the 0001 columns come first; later migrations only add columns
            assert [tuple(r)[:width] for r in conn.execute(text(f"SELECT * FROM {table} ORDER BY 1"))] == rows, table
        assert conn.execute(text("SELECT reason, started_at FROM runs")).one() == ("threshold", None)

    env = lacd_env(tmp_path, tmp_path / "agent_interactions.jsonl")
    status = run_cli("status", "--json", env=env)
    assert status.returncode == 0, status.stderr
    status = json.loads(status.stdout)
    assert status["pending"] == 2 and status["runs"][0]["status"] == "done" and status["runs"][0]["reason"] == "threshold"
    listed = run_cli("lessons", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    assert sorted(lesson["id"] for lesson in json.loads(listed.stdout)) == [1, 2, 3]
