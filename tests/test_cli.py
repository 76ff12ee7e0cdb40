"""The CLI through real subprocesses: exit codes, exact keys, one-line errors."""

from __future__ import annotations

import json

import pytest

from conftest import FIXTURES, agent_line, lacd_env, run_cli

STATUS_KEYS = {"pending", "threshold", "lessons_total", "excluded", "rejected", "daemon", "current_run", "runs", "active_model"}


def test_status_before_anything_exists(tmp_path):
    env = lacd_env(tmp_path, tmp_path / "agent_interactions.jsonl")
    result = run_cli("status", "--json", env=env)
    assert result.returncode == 0, result.stderr
    s = json.loads(result.stdout)
    assert STATUS_KEYS <= set(s)
    assert s["pending"] == 0 and s["daemon"] == {"running": False, "pid": None} and s["current_run"] is None
    assert not (tmp_path / "state" / "lacd.db").exists()  # status never creates state


def test_ingest_then_status_lessons_and_rejects(tmp_path):
    log = tmp_path / "agent_interactions.jsonl"
    log.write_text(agent_line(1) + "\n" + agent_line(1) + "\n{broken\n" + agent_line(2) + "\n")
    env = lacd_env(tmp_path, log, LACD_QUEUE_THRESHOLD="8")
    result = run_cli("ingest", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ingested 3 lessons (2 usable, excluded: duplicate 1), rejected 1 lines"
    s = json.loads(run_cli("status", "--json", env=env).stdout)
    assert (s["pending"], s["threshold"], s["lessons_total"], s["excluded"], s["rejected"]) == (2, 8, 3, {"duplicate": 1}, 1)
    text = run_cli("status", env=env).stdout
    assert "2 pending / threshold 8" in text and "duplicate" in text
    excluded = json.loads(run_cli("lessons", "--status", "excluded", "--json", env=env).stdout)
    assert [(l["status"], l["reason"]) for l in excluded] == [("excluded", "duplicate")]
    rejects = json.loads(run_cli("rejects", "--json", env=env).stdout)
    assert len(rejects) == 1 and rejects[0]["reason"].startswith("invalid JSON") and rejects[0]["prefix"] == "{broken"
    assert run_cli("lessons", "--status", "bogus", env=env).returncode == 2


def test_bad_config_is_one_clear_line(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[queue]\nthreshold = -1\n")
    result = run_cli("--config", str(cfg), "status", env=lacd_env(tmp_path, tmp_path / "log"))
    assert result.returncode == 2
    assert result.stderr.strip() == f"lacd: [queue] threshold: must be >= 1 (got -1, from {cfg})"


def test_lessons_without_a_database_says_what_to_do(tmp_path):
    result = run_cli("lessons", env=lacd_env(tmp_path, tmp_path / "log"))
    assert result.returncode == 2
    assert "no database at" in result.stderr and "Traceback" not in result.stderr


def test_init_writes_a_config_that_loads(tmp_path):
    env = lacd_env(tmp_path, tmp_path / "log")
    target = tmp_path / "cfg" / "config.toml"
    assert run_cli("init", str(target), env=env).returncode == 0
    assert run_cli("init", str(target), env=env).returncode == 2  # no silent overwrite
    assert run_cli("--config", str(target), "status", "--json", env=env).returncode == 0


def test_migrate_up_and_down(tmp_path):
    env = lacd_env(tmp_path, tmp_path / "log")
    up = run_cli("migrate", env=env)
    assert up.returncode == 0 and "at revision" in up.stdout
    assert run_cli("migrate", "--downgrade", "base", env=env).returncode == 0
    down = run_cli("status", "--json", env=env)  # tables gone: status still answers, and says what to do
    assert down.returncode == 0 and "run `lacd migrate`" in json.loads(down.stdout)["note"]
    assert run_cli("lessons", env=env).returncode == 2
    assert run_cli("migrate", env=env).returncode == 0


@pytest.mark.skipif(not FIXTURES.exists(), reason="shared/fixtures is not beside this checkout")
def test_fixture_through_the_cli(tmp_path):
    env = lacd_env(tmp_path, FIXTURES / "agent_interactions.jsonl")
    assert run_cli("ingest", env=env).returncode == 0
    s = json.loads(run_cli("status", "--json", env=env).stdout)
    assert s["lessons_total"] == 33 and s["rejected"] == 0
