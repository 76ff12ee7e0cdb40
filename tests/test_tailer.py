"""The tailer on real files: every way a log can grow, rotate, shrink or be replaced.

Each test writes real bytes to a real file, runs the tailer against a real SQLite database, and
checks the stored lessons are exactly the complete lines written, in order, none twice.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
from sqlalchemy import select

from conftest import FIXTURES, agent_line
from lacd import db
from lacd.ingest.store import Store
from lacd.ingest.tailer import Tailer
from lacd.models import Lesson, Reject, Source


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class Harness:
    def __init__(self, tmp_path, max_line=1 << 20, rules=None):
        self.dir = tmp_path / "logs"
        self.dir.mkdir()
        self.log = self.dir / "agent_interactions.jsonl"
        self.engine = db.write_engine(tmp_path / "state" / "lacd.db")
        db.migrate(self.engine)
        self.clock = Clock()
        self.max_line = max_line
        self.rules = rules or {}
        self.tailer = self.start()

    def start(self) -> Tailer:
        """A new tailer on the same database: what a restarted daemon does."""
        t = Tailer(self.log, Store(self.engine, self.rules), max_line=self.max_line, rotate_wait=5.0,
                   batch_lines=3, clock=self.clock)
        t.start()
        return t

    def restart(self) -> None:
        self.tailer.close()
        self.tailer = self.start()

    def sync(self, advance: float = 0.0):
        self.clock.now += advance
        return self.tailer.sync()

    def write(self, text: str | bytes, path=None, mode="ab") -> None:
        data = text.encode() if isinstance(text, str) else text
        with open(path or self.log, mode) as fh:
            fh.write(data)

    def lines(self, *ids: int) -> str:
        return "".join(agent_line(i) + "\n" for i in ids)

    def stored(self) -> list[str]:
        with self.engine.connect() as conn:
            return list(conn.execute(select(Lesson.raw).order_by(Lesson.id)).scalars())

    def stored_ids(self) -> list[int]:
        return [int(json.loads(r)["user_prompt"].split("notes")[1].split(".")[0]) for r in self.stored()]

    def rejects(self) -> list[tuple[int, str]]:
        with self.engine.connect() as conn:
            return [(r.offset, r.reason) for r in conn.execute(select(Reject).order_by(Reject.id))]

    def sources(self):
        with self.engine.connect() as conn:
            return conn.execute(select(Source).order_by(Source.id)).all()


@pytest.fixture
def h(tmp_path):
    return Harness(tmp_path)


def test_append_while_running(h):
    h.write(h.lines(1, 2))
    h.sync()
    h.write(h.lines(3, 4, 5, 6, 7))  # more than one batch (batch_lines=3)
    h.sync()
    h.sync()
    assert h.stored_ids() == [1, 2, 3, 4, 5, 6, 7]


def test_partial_line_waits_for_its_newline_even_across_a_restart(h):
    full = agent_line(2)
    h.write(h.lines(1) + full[:40])
    h.sync()
    assert h.stored_ids() == [1]
    h.restart()
    h.sync()
    assert h.stored_ids() == [1]
    h.write(full[40:] + "\n")
    h.sync()
    assert h.stored_ids() == [1, 2]


def test_missing_file_at_start_is_waited_for(h):
    h.sync()
    assert h.stored() == [] and h.sources() == []
    h.write(h.lines(1))
    h.sync()
    assert h.stored_ids() == [1]


def test_truncate_while_running_starts_a_new_generation(h):
    h.write(h.lines(1, 2, 3))
    h.sync()
    with open(h.log, "r+b") as fh:
        fh.truncate(0)
    h.write(h.lines(4))
    h.sync()
    assert h.stored_ids() == [1, 2, 3, 4]
    assert [s.state for s in h.sources()] == ["lost", "active"]


def test_truncate_and_rewrite_longer_while_stopped(h):
    h.write(h.lines(1, 2))
    h.sync()
    h.tailer.close()
    with open(h.log, "wb") as fh:  # same inode, different and longer content
        fh.write(h.lines(10, 11, 12, 13).encode())
    h.tailer = h.start()
    h.sync()
    assert h.stored_ids() == [1, 2, 10, 11, 12, 13]


def test_rewrite_in_place_while_running_is_detected_by_the_marker(h):
    h.write(h.lines(1, 2))
    h.sync()
    with open(h.log, "r+b") as fh:  # same inode, same size or longer, other bytes
        fh.write(h.lines(7, 8, 9).encode())
    h.sync()
    assert h.stored_ids() == [1, 2, 7, 8, 9]


def test_rename_rotation_with_the_writer_still_appending_to_the_old_file(h):
    h.write(h.lines(1, 2))
    h.sync()
    rotated = h.dir / "agent_interactions.jsonl.1"
    old = open(h.log, "ab")  # the writer keeps its descriptor across the rename
    os.rename(h.log, rotated)
    h.write(h.lines(3))  # a new file at the path
    h.sync(advance=1)
    old.write(h.lines(100).encode())  # late write to the rotated file
    old.flush()
    h.sync(advance=1)
    h.write(h.lines(4))
    h.sync(advance=10)  # past rotate_wait: the old generation is closed
    old.write(h.lines(101).encode())
    old.close()
    h.sync(advance=1)
    assert sorted(h.stored_ids()) == [1, 2, 3, 4, 100]
    assert [s.state for s in h.sources()] == ["done", "active"]


def test_rotation_while_stopped_finishes_the_old_file_first(h):
    h.write(h.lines(1, 2))
    h.sync()
    h.tailer.close()
    h.write(h.lines(3))  # written after the last read, before the rotation
    os.rename(h.log, h.dir / "agent_interactions.jsonl.1")
    h.write(h.lines(4, 5))
    h.tailer = h.start()
    h.sync()
    assert h.stored_ids() == [1, 2, 3, 4, 5]


def test_copytruncate_reads_the_tail_from_the_copy(h):
    h.write(h.lines(1, 2))
    h.sync()
    h.write(h.lines(3))  # not read yet when the rotator copies and truncates
    shutil.copyfile(h.log, h.dir / "agent_interactions.jsonl.1")
    with open(h.log, "r+b") as fh:
        fh.truncate(0)
    h.write(h.lines(4))
    h.sync()
    h.sync(advance=10)
    assert h.stored_ids() == [1, 2, 3, 4]


def test_delete_and_recreate_while_running(h):
    h.write(h.lines(1, 2))
    h.sync()
    os.unlink(h.log)
    h.sync()
    h.write(h.lines(3))
    h.sync()
    assert h.stored_ids() == [1, 2, 3]


def test_delete_and_recreate_while_stopped_with_inode_reuse(h):
    h.write(h.lines(1, 2))
    h.sync()
    h.tailer.close()
    inode = os.stat(h.log).st_ino
    os.unlink(h.log)
    for _ in range(50):  # ext4, xfs and btrfs soon hand the freed inode to a new file
        h.write(h.lines(3, 4, 5, 6))
        if os.stat(h.log).st_ino == inode:
            break
        os.unlink(h.log)
    assert os.stat(h.log).st_ino == inode, "the file system never reused the inode: the case was not tested"
    h.tailer = h.start()
    h.sync()
    assert h.stored_ids() == [1, 2, 3, 4, 5, 6]


def test_atomic_replace_with_new_content(h):
    h.write(h.lines(1, 2))
    h.sync()
    tmp = h.dir / "agent_interactions.jsonl.tmp"
    h.write(h.lines(3), path=tmp)
    os.replace(tmp, h.log)
    h.sync(advance=10)
    h.sync()
    assert h.stored_ids() == [1, 2, 3]


def test_atomic_replace_that_keeps_the_content_is_a_continuation(h):
    h.write(h.lines(1, 2))
    h.sync()
    tmp = h.dir / "agent_interactions.jsonl.tmp"
    shutil.copyfile(h.log, tmp)
    h.write(h.lines(3), path=tmp)
    os.replace(tmp, h.log)
    h.sync()
    h.write(h.lines(4))
    h.sync(advance=10)
    assert h.stored_ids() == [1, 2, 3, 4]


def test_blank_lines_crlf_and_bom(h):
    h.write(b"\xef\xbb\xbf" + agent_line(1).encode() + b"\r\n\n   \n\r\n" + agent_line(2).encode() + b"\r\n")
    h.sync()
    assert h.stored_ids() == [1, 2]
    assert h.rejects() == []
    assert all(not r.endswith("\r") and not r.startswith("\ufeff") for r in h.stored())


def test_bad_lines_are_rejected_with_reasons_and_ingestion_goes_on(h):
    bad = [b"{not json\n", b"\xff\xfe garbage \xc3\x28\n", b'["a list"]\n', b'{"hello": "world"}\n',
           b'{"user_prompt": 5, "ai_responses": []}\n']
    h.write(agent_line(1).encode() + b"\n" + b"".join(bad) + agent_line(2).encode() + b"\n")
    h.sync()
    assert h.stored_ids() == [1, 2]
    reasons = [r for _, r in h.rejects()]
    assert reasons[0].startswith("invalid JSON")
    assert reasons[1].startswith("invalid UTF-8")
    assert all(r.startswith("unknown shape") for r in reasons[2:])
    assert len(reasons) == 5


def test_overlong_line_is_rejected_without_holding_it(tmp_path):
    h = Harness(tmp_path, max_line=4096)
    huge = json.dumps({"user_prompt": "x" * (3 << 20), "ai_responses": ["ok"]})
    h.write(h.lines(1) + huge + "\n" + h.lines(2))
    h.sync()
    assert h.stored_ids() == [1, 2]
    [(offset, reason)] = h.rejects()
    assert offset == len(h.lines(1)) and reason.startswith("line longer than the cap")


def test_overlong_line_still_being_written_is_not_consumed(tmp_path):
    h = Harness(tmp_path, max_line=1024)
    h.write(h.lines(1) + "y" * 5000)
    h.sync()
    assert h.rejects() == []
    h.write("\n" + h.lines(2))
    h.sync()
    assert h.stored_ids() == [1, 2] and len(h.rejects()) == 1


def test_restart_never_reads_a_line_twice(h):
    for i in range(1, 8):
        h.write(h.lines(i))
        h.sync()
        h.restart()
    h.sync()
    assert h.stored_ids() == list(range(1, 8))


def test_curation_excludes_with_reasons(tmp_path):
    h = Harness(tmp_path)
    lines = [
        agent_line(1),
        agent_line(1),  # duplicate conversation
        json.dumps({"user_prompt": "", "ai_responses": ["hi"], "tool_executions": []}),
        json.dumps({"user_prompt": "hello", "ai_responses": ["", " "], "tool_executions": []}),
        json.dumps({"user_prompt": "write it", "ai_responses": ["<tool_code>\nwrite_file('a', 'b')\n</tool_code>\n<tool_output>done</tool_output>"],
                    "tool_executions": [{"tool_call": "write_file('a', 'b')", "tool_output": "<tool_output>ok</tool_output>"}]}),
        json.dumps({"user_message": "list", "ai_responses": ["<tool_code>\nlist_directory('.')\n</tool_code>", "It failed."],
                    "tool_executions": [{"tool_call": "list_directory('.')", "tool_output": "<tool_error>EACCES</tool_error>"}]}),
    ]
    h.write("".join(l + "\n" for l in lines))
    h.sync()
    with h.engine.connect() as conn:
        got = [(r.status, r.reason) for r in conn.execute(select(Lesson).order_by(Lesson.id))]
    assert got == [("pending", None), ("excluded", "duplicate"), ("excluded", "empty_prompt"),
                   ("excluded", "no_reply"), ("excluded", "fabricated_output"), ("excluded", "all_tools_failed")]


def test_curation_rules_can_be_switched_off(tmp_path):
    h = Harness(tmp_path, rules={"duplicate": False})
    h.write(h.lines(1, 1))
    h.sync()
    with h.engine.connect() as conn:
        assert list(conn.execute(select(Lesson.status)).scalars()) == ["pending", "pending"]


@pytest.mark.skipif(not FIXTURES.exists(), reason="shared/fixtures is not beside this checkout")
def test_real_fixture_lines(h):
    data = (FIXTURES / "agent_interactions.jsonl").read_bytes()
    h.write(data)
    h.sync()
    raw = [l for l in data.decode().split("\n") if l.strip()]
    assert h.stored() == raw
    assert h.rejects() == []
    with h.engine.connect() as conn:
        statuses = list(conn.execute(select(Lesson.status)).scalars())
    assert statuses.count("pending") >= 10 and statuses.count("excluded") >= 10


class FailingOnce(Store):
    """A store whose second commit fails, as a full disk or a locked database would."""

    def __init__(self, engine, rules):
        super().__init__(engine, rules)
        self.commits = 0

    def commit(self, cursor, batch, bulk=False):
        self.commits += 1
        if self.commits == 2:
            raise OSError(28, "No space left on device")
        return super().commit(cursor, batch, bulk)


def test_a_failed_commit_rewinds_to_what_the_database_holds(h):
    store = FailingOnce(h.engine, {})
    h.tailer.close()
    h.tailer = Tailer(h.log, store, max_line=1 << 20, rotate_wait=5.0, batch_lines=3, clock=h.clock)
    h.tailer.start()
    h.write(h.lines(*range(1, 12)))  # four batches; the second fails, the read-ahead is dropped
    with pytest.raises(OSError, match="No space left"):
        h.sync()
    assert h.stored_ids() == [1, 2, 3]
    h.sync()
    assert h.stored_ids() == list(range(1, 12))


@pytest.fixture
def no_dedup(tmp_path):
    """Duplicates stored as rows (`[curation] duplicate = false`): a line read twice shows."""
    return Harness(tmp_path, rules={"duplicate": False})


def test_a_symlinked_log_retargeted_to_another_file_and_back_is_read_once(no_dedup):
    h = no_dedup
    first, second = h.dir / "agent_interactions-a.jsonl", h.dir / "agent_interactions-b.jsonl"
    h.write(h.lines(*range(6)), path=first)
    h.write(h.lines(*range(6, 11)), path=second)
    h.log.symlink_to(first)
    h.sync()
    for target in (second, first, second, first):
        h.log.unlink()
        h.log.symlink_to(target)
        h.sync()
        h.sync(advance=10)  # past rotate_wait each time: the other file is finished
    h.write(h.lines(11), path=first)
    h.sync()
    h.restart()
    h.sync()
    assert h.stored_ids() == list(range(12))  # 11 lines written before, 17 rows before the fix
    assert [(s.state, s.offset) for s in h.sources()] == [("active", first.stat().st_size),
                                                          ("done", second.stat().st_size)]
    assert all("lost" not in (s.note or "") for s in h.sources())


def test_a_log_moved_away_and_back_after_rotate_wait_is_read_once(no_dedup):
    h = no_dedup
    h.write(h.lines(*range(6)))
    h.sync()
    away = h.dir.parent / "elsewhere.jsonl"
    os.rename(h.log, away)
    h.sync()
    h.sync(advance=10)  # past rotate_wait: the generation is done
    assert [s.state for s in h.sources()] == ["done"]
    os.rename(away, h.log)
    h.sync()
    h.write(h.lines(6))
    h.sync()
    assert h.stored_ids() == list(range(7))  # 6 lines, 12 rows before the fix
    [source] = h.sources()
    assert (source.state, source.note) == ("active", f"came back to the log path: read before, up to offset {len(h.lines(*range(6)))}")


def test_a_database_locked_through_the_fall_back_is_read_again_only_once_free(tmp_path, monkeypatch):
    """A sync that fails because the database is locked cannot reload its cursors from it either:
    the next sync does, and reads nothing twice (it used to start the file again from 0)."""
    import sqlite3

    monkeypatch.setattr(db, "BUSY_TIMEOUT_MS", 200)
    h = Harness(tmp_path, rules={"duplicate": False})
    h.write(h.lines(1))
    h.sync()
    holder = sqlite3.connect(tmp_path / "state" / "lacd.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    h.write(h.lines(2))
    for _ in range(2):
        with pytest.raises(Exception, match="database is locked"):
            h.sync()
    holder.execute("ROLLBACK")
    holder.close()
    h.sync()
    h.write(h.lines(3))
    h.sync()
    assert h.stored_ids() == [1, 2, 3]
    assert [s.state for s in h.sources()] == ["active"]


def test_files_coming_back_through_the_real_cli_are_not_read_twice(tmp_path):
    from conftest import lacd_env, run_cli

    logs = tmp_path / "logs"
    logs.mkdir()
    path, first, second = logs / "agent_interactions.jsonl", logs / "agent_interactions-a.jsonl", tmp_path / "b.jsonl"
    first.write_text("".join(agent_line(i) + "\n" for i in range(6)))
    second.write_text("".join(agent_line(i) + "\n" for i in range(6, 11)))
    env = lacd_env(tmp_path, path, LACD_CURATION_DUPLICATE="false")

    def ingest() -> str:
        result = run_cli("ingest", env=env)
        assert result.returncode == 0, result.stderr
        return result.stdout

    path.symlink_to(first)
    assert ingest().startswith("ingested 6 lessons")
    for target in (second, first, second):  # retargeted and back
        path.unlink()
        path.symlink_to(target)
        ingest()
    path.unlink()
    os.rename(second, path)  # the other file moved in, away, and back
    ingest()
    os.rename(path, tmp_path / "away.jsonl")
    ingest()
    os.rename(tmp_path / "away.jsonl", path)
    assert ingest() == "ingested 0 lessons (0 usable, excluded: none), rejected 0 lines\n"
    status = json.loads(run_cli("status", "--json", env=env).stdout)
    assert status["lessons_total"] == 11  # 17 before
    assert not [s for s in status["sources"] if s["state"] == "lost"]
