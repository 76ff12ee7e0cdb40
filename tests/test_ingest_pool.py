"""The backfill path: whole lines read in chunks, classified in a worker process, committed in order.

Each test ingests the same real bytes twice, through the worker pool (``pool_bytes=1``: every
backlog is a backfill) and through the in-process path (``workers=0``), and asserts both databases
hold the same rows: the two paths cannot drift apart, and the in-process path is the one the other
tests check case by case.
"""

from __future__ import annotations

import json
import os
import time

import pytest
from sqlalchemy import text

from conftest import agent_line, wait_until
from lacd import db
from lacd.ingest import tailer as tailer_mod
from lacd.ingest.store import Store
from lacd.ingest.tailer import Tailer
from lacd.samples import generate_lines
from secrets_corpus import corpus

TABLES = {
    "lessons": "SELECT offset, length, format, conversation, raw, conv_hash, status, reason FROM lessons ORDER BY id",
    "rejects": "SELECT offset, length, reason, prefix FROM rejects ORDER BY id",
    "findings": "SELECT offset, kind, field, turn FROM secret_findings ORDER BY offset, kind, field, turn",
    "sources": "SELECT offset, state FROM sources ORDER BY id",
}


class Ingest:
    """A log and a database; ``pool`` picks the path every sync takes."""

    def __init__(self, root, pool: bool, max_line: int = 1 << 20, batch_lines: int = 25, store_class=Store):
        root.mkdir()
        self.log = root / "agent_interactions.jsonl"
        self.engine = db.write_engine(root / "state" / "lacd.db")
        db.migrate(self.engine)
        self.tailer = Tailer(self.log, store_class(self.engine, {}), max_line=max_line, rotate_wait=0,
                             batch_lines=batch_lines, pool_bytes=1 if pool else 1 << 40, workers=1 if pool else 0)
        self.tailer.start()

    def write(self, data: bytes) -> None:
        with open(self.log, "ab") as fh:
            fh.write(data)

    def sync(self):
        return self.tailer.sync()

    def rows(self) -> dict[str, list[tuple]]:
        with self.engine.connect() as conn:
            return {name: [tuple(r) for r in conn.execute(text(sql))] for name, sql in TABLES.items()}

    def close(self) -> None:
        self.tailer.close()


def both(tmp_path, data: bytes, **kw) -> tuple[dict, dict]:
    """Ingest ``data`` through each path; the rows each database holds."""
    out = []
    for pool in (True, False):
        ing = Ingest(tmp_path / ("pool" if pool else "inline"), pool, **kw)
        ing.write(data)
        ing.sync()
        out.append(ing.rows())
        ing.close()
    return out[0], out[1]


def test_a_backfill_stores_what_the_in_process_path_stores(tmp_path):
    secrets, _ = corpus(seed=0, rounds=1)
    ordinary = list(generate_lines(150, seed=3, noise=0.3))
    lines = [l.encode() for l in ordinary[:60] + secrets + ordinary[60:] + ordinary[:5]]  # duplicates too
    cap = max(len(l) for l in lines) + 100
    lines[3] += b"\r"  # CRLF
    lines[10:10] = [b"", b"   ", b"{not json", b"\xff\xfe\xc3\x28 garbage", b'{"hello": "world"}',
                    json.dumps({"user_prompt": "x" * cap, "ai_responses": ["ok"]}).encode()]  # over the cap
    data = b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n"
    pooled, inline = both(tmp_path, data, max_line=cap)
    assert pooled == inline
    assert len(pooled["lessons"]) == len(lines) - 6 and len(pooled["rejects"]) == 4  # 2 blank lines
    assert {l[6] for l in pooled["lessons"]} == {"pending", "excluded"}
    assert sum(l[7] == "duplicate" for l in pooled["lessons"]) >= 5
    assert len({f[0] for f in pooled["findings"]}) >= len(secrets)  # every planted line, redacted by the worker
    assert pooled["sources"] == [(len(data), "active")]


def test_chunk_edges_long_lines_and_a_partial_last_line(tmp_path, monkeypatch):
    monkeypatch.setattr(tailer_mod, "FIRST_READ", 2048)  # chunks far smaller than some lines
    monkeypatch.setattr(tailer_mod, "CHUNK", 2048)
    monkeypatch.setattr(tailer_mod, "BATCH_BYTES", 8192)
    long_ok = json.dumps({"user_prompt": "long " + "y" * 20000, "ai_responses": ["fine"]})  # longer than a chunk
    too_long = json.dumps({"user_prompt": "z" * 40000, "ai_responses": ["no"]})  # longer than the cap too
    head = "".join(agent_line(i) + "\n" for i in range(40)) + long_ok + "\n" + too_long + "\n"
    tail = "".join(agent_line(i) + "\n" for i in range(40, 60))
    results = []
    for pool in (True, False):
        ing = Ingest(tmp_path / ("pool" if pool else "inline"), pool, max_line=30000, batch_lines=7)
        ing.write((head + tail + agent_line(60)[:50]).encode())
        ing.sync()
        before = ing.rows()
        ing.write((agent_line(60)[50:] + "\n").encode())
        ing.sync()
        results.append((before, ing.rows()))
        ing.close()
    (pool_before, pool_after), (inline_before, inline_after) = results
    assert pool_before == inline_before and pool_after == inline_after
    assert len(pool_before["lessons"]) == 61 and len(pool_after["lessons"]) == 62  # the partial line waited
    [(offset, length, reason, _)] = pool_after["rejects"]
    assert reason.startswith("line longer than the cap") and length == len(too_long) + 1


def test_a_failed_commit_during_a_backfill_rewinds_and_the_next_sync_finishes(tmp_path):
    class FailingOnce(Store):
        commits = 0

        def commit(self, cursor, batch, bulk=False):
            FailingOnce.commits += 1
            if FailingOnce.commits == 2:
                raise OSError(28, "No space left on device")
            return super().commit(cursor, batch, bulk)

    ing = Ingest(tmp_path / "pool", True, batch_lines=10, store_class=FailingOnce)
    ing.write("".join(agent_line(i) + "\n" for i in range(35)).encode())
    with pytest.raises(OSError, match="No space left"):
        ing.sync()
    expected = [f"read the file notes{i}.txt" for i in range(35)]
    assert [json.loads(r[4])["user_prompt"] for r in ing.rows()["lessons"]] == expected[:10]  # the first batch only
    ing.sync()
    prompts = [json.loads(r[4])["user_prompt"] for r in ing.rows()["lessons"]]
    ing.close()
    assert prompts == expected


def test_lines_end_counts_whole_lines():
    data = b"a\nbb\nccc\nd"
    assert [tailer_mod.lines_end(data, n) for n in (0, 1, 2, 3, 4)] == [0, 2, 5, 9, 9]
    assert tailer_mod.lines_end(b"no newline", 5) == 0


def test_the_wal_flusher_follows_the_wal_and_lets_go_of_it(tmp_path):
    path = tmp_path / "lacd.db"
    wal = tmp_path / "lacd.db-wal"

    def held() -> bool:
        """Does this process have the WAL open?"""
        for fd in os.listdir("/proc/self/fd"):
            try:
                if os.readlink(f"/proc/self/fd/{fd}") == str(wal):
                    return True
            except OSError:  # closed while we looked
                pass
        return False

    with db.WalFlusher(path, interval=0.01):
        time.sleep(0.05)
        assert not held()  # no WAL yet: nothing opened
        wal.write_bytes(b"frames")
        assert wait_until(held, timeout=5)
    assert not held()


def test_an_unfinished_long_line_starts_no_worker_process_while_it_waits(tmp_path, monkeypatch):
    """The daemon's own thresholds: a 33 MB line still being written is a backlog of pool size."""
    started = []

    class CountedPool(tailer_mod.ClassifierPool):
        def __init__(self, *args, **kw):
            started.append(1)
            super().__init__(*args, **kw)

    monkeypatch.setattr(tailer_mod, "ClassifierPool", CountedPool)
    ing = Ingest(tmp_path / "pool", False, max_line=16 << 20)
    ing.tailer.pool_bytes, ing.tailer.workers = tailer_mod.POOL_BYTES, 1
    ing.write((agent_line(0) + "\n").encode())
    ing.sync()
    unfinished = b'{"user_prompt": "' + b"w" * (33 << 20)  # the writer has not finished it
    ing.write(unfinished[: 20 << 20])
    ing.sync()
    ing.write(unfinished[20 << 20:])
    for _ in range(5):  # polls while it waits for its newline
        ing.sync()
    assert started == [] and len(ing.rows()["lessons"]) == 1
    assert ing.tailer.current.no_newline_to == os.path.getsize(ing.log)  # each byte looked at once
    ing.write(b'", "ai_responses": ["done"]}\n' + (agent_line(1) + "\n").encode())
    ing.sync()
    rows = ing.rows()
    assert len(started) == 1 and len(rows["lessons"]) == 2
    assert [r[2].split(" (")[0] for r in rows["rejects"]] == ["line longer than the cap"]
    ing.close()
