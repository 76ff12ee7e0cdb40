"""Secrets at ingestion, through the real CLI and the real tailer: redacted before anything is
stored, counted by kind, excluded when configured, and the same whether a backlog is classified in
this process or in worker processes."""

from __future__ import annotations

import json
import os
import sqlite3
from collections import Counter
from pathlib import Path

import pytest

from conftest import agent_line, lacd_env, run_cli
from lacd import db
from lacd.ingest.classifier import ClassifierSpec
from lacd.ingest.store import Store
from lacd.ingest.tailer import Tailer
from lacd.samples import generate_lines
from secrets_corpus import corpus, leaked


def state_bytes(state_dir: Path) -> str:
    """Every byte lacd left in its state dir (database, WAL, runs), as one searchable text."""
    parts = []
    for path in sorted(state_dir.rglob("*")):
        if path.is_file():
            parts.append(path.read_bytes().decode("latin-1"))
    return "\n".join(parts)


@pytest.fixture
def secret_log(tmp_path):
    lines, planted = corpus(seed=11)
    log = tmp_path / "agent_interactions.jsonl"
    ordinary = list(generate_lines(20, seed=3))
    log.write_text("\n".join(ordinary[:10] + lines + ordinary[10:]) + "\n")
    return log, planted


def test_no_planted_secret_reaches_the_database_or_the_logs(tmp_path, secret_log):
    log, planted = secret_log
    env = lacd_env(tmp_path, log, LACD_LOG_LEVEL="info")
    result = run_cli("ingest", env=env)
    assert result.returncode == 0, result.stderr
    status = json.loads(run_cli("status", "--json", env=env).stdout)
    stored = state_bytes(tmp_path / "state")
    logs = result.stdout + result.stderr
    for p in planted:
        assert not leaked(p.secret, stored), f"{p.kind} from line {p.line} is in the state dir"
        assert not leaked(p.secret, logs), f"{p.kind} from line {p.line} is in the logs"
    assert set(status["secrets"]) >= {p.kind for p in planted}
    assert status["secret_lines"] == len({p.line for p in planted})
    assert "secrets_redacted" in result.stderr  # each redaction is an event: kinds and place only


def test_findings_are_recorded_by_kind_and_place_and_listed(tmp_path, secret_log):
    log, planted = secret_log
    env = lacd_env(tmp_path, log)
    assert run_cli("ingest", env=env).returncode == 0
    con = sqlite3.connect(tmp_path / "state" / "lacd.db")
    rows = con.execute("SELECT f.kind, f.field, f.turn, l.raw FROM secret_findings f "
                       "JOIN lessons l ON l.source_id = f.source_id AND l.offset = f.offset").fetchall()
    assert rows and all(f"<redacted:{kind}>" in raw or kind == "secret-file" for kind, _, _, raw in rows)
    assert {field for _, field, _, _ in rows} <= {"user", "assistant", "tool", "tool_calls", "raw"}
    listed = json.loads(run_cli("lessons", "--secrets", "--limit", "500", "--json", env=env).stdout)
    assert len(listed) == len({p.line for p in planted})
    assert all(r["secrets"] for r in listed)
    text = run_cli("lessons", "--secrets", env=env).stdout
    assert text.startswith("secrets redacted:") and "[redacted:" in text
    assert "secrets     " in run_cli("status", env=env).stdout


def test_a_kind_set_to_exclude_excludes_the_lesson_with_its_reason(tmp_path, secret_log):
    log, planted = secret_log
    env = lacd_env(tmp_path, log, LACD_SECRETS_EXCLUDE="private-key")
    assert run_cli("ingest", env=env).returncode == 0
    status = json.loads(run_cli("status", "--json", env=env).stdout)
    key_lines = {p.line for p in planted if p.kind == "private-key"}
    assert status["excluded"].get("secret:private-key") == len(key_lines)
    excluded = json.loads(run_cli("lessons", "--reason", "secret:private-key", "--json", env=env).stdout)
    assert len(excluded) == len(key_lines) and all(r["status"] == "excluded" for r in excluded)
    stored = state_bytes(tmp_path / "state")
    assert not any(leaked(p.secret, stored) for p in planted)  # excluded lessons are redacted too


def test_a_rejected_line_keeps_only_a_redacted_prefix(tmp_path):
    log = tmp_path / "agent_interactions.jsonl"
    key = "AKIA" + "Q3EGRWIKZ7TXN5PL"
    log.write_text('{"user_prompt": "deploy with ' + key + ' now", broken json\n' + agent_line(1) + "\n")
    env = lacd_env(tmp_path, log)
    assert run_cli("ingest", env=env).returncode == 0
    rejects = json.loads(run_cli("rejects", "--json", env=env).stdout)
    assert len(rejects) == 1 and "invalid JSON" in rejects[0]["reason"]
    assert key not in rejects[0]["prefix"] and "<redacted:aws-access-key>" in rejects[0]["prefix"]
    assert key not in state_bytes(tmp_path / "state")
    assert json.loads(run_cli("status", "--json", env=env).stdout)["secrets"] == {"aws-access-key": 1}


def test_scanning_can_be_switched_off(tmp_path, secret_log):
    log, planted = secret_log
    env = lacd_env(tmp_path, log, LACD_SECRETS_SCAN="false")
    assert run_cli("ingest", env=env).returncode == 0
    assert json.loads(run_cli("status", "--json", env=env).stdout)["secrets"] == {}
    assert any(leaked(p.secret, state_bytes(tmp_path / "state")) for p in planted)


def rows_of(engine) -> list[tuple]:
    with engine.connect() as conn:
        lessons = conn.exec_driver_sql("SELECT offset, length, format, conversation, raw, conv_hash, status, reason "
                                       "FROM lessons ORDER BY id").fetchall()
        rejects = conn.exec_driver_sql("SELECT offset, reason, prefix FROM rejects ORDER BY id").fetchall()
        findings = conn.exec_driver_sql("SELECT offset, kind, field, turn FROM secret_findings ORDER BY id").fetchall()
    return [tuple(r) for r in lessons + rejects + findings]


def test_worker_processes_store_exactly_what_this_process_stores(tmp_path, secret_log):
    log, _ = secret_log
    with open(log, "a") as fh:  # every kind of line: rejects, blank lines, duplicates, an over-long line
        fh.write("not json\n\n" + agent_line(1) + "\n" + agent_line(1) + "\n" + "x" * 5000 + "\n\xff\n")
    results = []
    for name, pool_bytes, workers in (("inline", 1 << 40, 0), ("pool", 1, 2)):
        engine = db.write_engine(tmp_path / name / "lacd.db")
        db.migrate(engine)
        store = Store(engine, {})
        tailer = Tailer(log, store, max_line=4096, rotate_wait=0, batch_lines=7, spec=ClassifierSpec(),
                        pool_bytes=pool_bytes, workers=workers)
        tailer.start()
        stats = tailer.sync()
        tailer.close()
        results.append((rows_of(engine), stats.lessons, stats.rejected, Counter(stats.secrets)))
    assert results[0] == results[1]
    assert results[0][1] > 20 and results[0][2] == 3 and results[0][3]


def _cut_around(line: str, secret: str) -> str | None:
    """A broken JSON line (a reject) holding the text around ``secret`` as the log has it (JSON
    escapes included), the secret 100 characters in and 60 after it."""
    escaped = json.dumps(secret)[1:-1]
    twice = json.dumps(escaped)[1:-1]  # a JSON string inside a JSON string (tool call arguments)
    for form, back in ((escaped, 0), (twice, 0), (secret.replace("\n", "\\\\n"), 0), (escaped[1:], 6),
                       (escaped[1:].replace("/", "\\/"), 6)):
        pos = line.find(form)
        if pos >= 0:
            start = max(0, pos - back - 100)
            return '{"user_prompt": "' + line[start:pos + len(form) + 60] + ' <the agent was killed here'
    return None


def test_issue_11_secrets_are_in_no_byte_of_the_database_its_wal_or_the_cli(tmp_path):
    """Every planted secret, in a lesson and in a rejected line around it: absent from the database
    file and from its write-ahead log while the writer still holds it, from ``lacd lessons`` and
    ``lacd rejects`` (``--json`` and text; the real CLI on the same state dir)."""
    lines, planted = corpus(seed=31)
    cuts = [(p, _cut_around(lines[p.line], p.secret)) for p in planted if p.kind != "secret-file"]
    assert all(cut for _, cut in cuts) and all(json.loads(lines[p.line]) for p, _ in cuts)
    log = tmp_path / "agent_interactions.jsonl"
    log.write_text("\n".join(lines + [cut for _, cut in cuts]) + "\n")
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    engine = db.write_engine(state / "lacd.db")
    db.migrate(engine)
    tailer = Tailer(log, Store(engine, {}), max_line=1 << 20, rotate_wait=0, batch_lines=5, spec=ClassifierSpec(),
                    pool_bytes=1 << 40, workers=0)
    tailer.start()
    stats = tailer.sync()
    wal = (state / "lacd.db-wal").read_bytes().decode("latin-1")
    stored = (state / "lacd.db").read_bytes().decode("latin-1")
    tailer.close()
    engine.dispose()
    assert stats.lessons == len(lines) and stats.rejected == len(cuts) and len(wal) > 4096
    env = lacd_env(tmp_path, log)
    listed = run_cli("lessons", "--json", "--limit", "1000", env=env)
    listed_secrets = run_cli("lessons", "--secrets", "--json", "--limit", "1000", env=env)
    rejects = run_cli("rejects", "--json", "--limit", "1000", env=env)
    texts = [run_cli(*args, "--limit", "1000", env=env) for args in (("lessons",), ("lessons", "--secrets"), ("rejects",))]
    assert listed.returncode == listed_secrets.returncode == rejects.returncode == 0, rejects.stderr
    assert all(t.returncode == 0 for t in texts)
    shown = listed.stdout + listed_secrets.stdout + "".join(t.stdout for t in texts)
    assert len(json.loads(listed.stdout)) == len(lines) and len(json.loads(rejects.stdout)) == len(cuts)
    for p in planted:
        for where, text in (("database", stored), ("WAL", wal), ("CLI text", shown), ("lacd rejects", rejects.stdout)):
            assert not leaked(p.secret, text), f"a {p.kind} from line {p.line} is in the {where}"
    assert "<redacted:" in rejects.stdout
