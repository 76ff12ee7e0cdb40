"""`lacd forget`: lessons removed by id or by text, their bytes gone from the database file, the
model in use marked, a retrain queued (now, or by the scheduler once the active run ends), and the
next run's dataset without them."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from datetime import datetime
from pathlib import Path

import pytest

from conftest import agent_line, lacd_env, run_cli
from lacd import config, db
from lacd.forget import ForgetError, forget
from lacd.runs import RunStore
from lacd.versions import VersionStore
from lacd.scheduler import Scheduler
from lacd.service import catch_up
from lacd.worker import RunExecutor
from tiny import make_tiny_llama

PROMPT = "read the file payroll-{}.txt"


def ingest(tmp_path: Path, n: int = 8, **env) -> config.Settings:
    log = tmp_path / "agent_interactions.jsonl"
    log.write_text("".join(agent_line(i, PROMPT.format(i)) + "\n" for i in range(n)))
    settings = config.load(env={"LACD_STATE_DIR": str(tmp_path / "state"), "LACD_WATCH_LOG": str(log),
                                "LACD_QUEUE_THRESHOLD": "100", **{k: str(v) for k, v in env.items()}})
    catch_up(settings)
    return settings


def db_bytes(settings: config.Settings) -> bytes:
    return b"".join(p.read_bytes() for p in settings.state.dir.glob("lacd.db*"))


def promote_run_over_all_lessons(settings: config.Settings) -> int:
    """A finished run whose model is the active one (what a promoted cycle leaves)."""
    store = RunStore(db.write_engine(settings.db_path))
    run_id = store.create("threshold", 100)
    versions = VersionStore(store.engine)
    versions.activate("lacd-coder", versions.allocate(run_id, "lacd-coder", 8))
    store.succeed(run_id)
    return run_id


def test_forget_by_id_erases_the_text_from_the_database_file(tmp_path):
    s = ingest(tmp_path)
    assert PROMPT.format(3).encode() in db_bytes(s)
    done = forget(db.write_engine(s.db_path), s.runs_dir, 100, ids=[4])  # lesson 4 is line 3
    assert done.lessons == 1 and done.wal_truncated
    assert PROMPT.format(3).encode() not in db_bytes(s)
    assert PROMPT.format(2).encode() in db_bytes(s)
    env = lacd_env(tmp_path, s.watch.log)
    status = json.loads(run_cli("status", "--json", env=env).stdout)
    assert status["forgotten"] == 1 and status["lessons_total"] == 8 and status["pending"] == 7
    assert status["forget"]["active_model_forgotten"] == 0 and done.retrain_run is None  # no model yet


def test_forget_by_pattern_through_the_cli(tmp_path):
    s = ingest(tmp_path)
    env = lacd_env(tmp_path, s.watch.log)
    result = run_cli("forget", "--pattern", "payroll-1", "--yes", env=env)  # payroll-1 only (no payroll-1x)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["matches 1 of 8 lessons", "      2  read the file payroll-1.txt",
                                          "forgot 1 lesson; their text is erased"]
    listed = json.loads(run_cli("lessons", "--status", "forgotten", "--json", env=env).stdout)
    assert [(r["status"], r["reason"], r["prompt"]) for r in listed] == [("forgotten", "forgotten", "")]
    again = run_cli("forget", "--pattern", "payroll-1", "--yes", env=env)
    assert again.returncode == 2 and "no stored lesson or rejected line contains that text" in again.stderr
    unknown = run_cli("forget", "99", "--yes", env=env)
    assert unknown.returncode == 2 and "no lesson to forget with id 99" in unknown.stderr


def test_bad_requests_are_refused(tmp_path):
    s = ingest(tmp_path, 2)
    engine = db.write_engine(s.db_path)
    with pytest.raises(ForgetError, match="one of the two"):
        forget(engine, s.runs_dir, 100)
    with pytest.raises(ForgetError, match="one of the two"):
        forget(engine, s.runs_dir, 100, ids=[1], pattern="x")


def test_the_model_in_use_is_marked_and_a_retrain_without_them_is_queued(tmp_path):
    s = ingest(tmp_path)
    first = promote_run_over_all_lessons(s)
    dataset = s.runs_dir / str(first) / "dataset"
    dataset.mkdir(parents=True)
    (dataset / "train.jsonl").write_text(PROMPT.format(5))
    evaluation = s.runs_dir / str(first) / "evaluation.json"
    evaluation.write_text(json.dumps({"cases": [{"reference": PROMPT.format(5)}]}))
    done = forget(db.write_engine(s.db_path), s.runs_dir, 100, ids=[6])
    assert done.versions == ["lacd-coder:v1"] and done.purged_runs == [first]
    assert not dataset.exists() and not evaluation.exists()
    assert done.retrain_run == first + 1
    store = RunStore(db.write_engine(s.db_path))
    assert store.get(done.retrain_run).reason == "forget"
    assert 6 not in {l.id for l in store.lessons(done.retrain_run)} and len(store.lessons(done.retrain_run)) == 7
    env = lacd_env(tmp_path, s.watch.log)
    status = json.loads(run_cli("status", "--json", env=env).stdout)
    assert status["forget"]["active_model_forgotten"] == 1
    assert status["forget"]["retrain_run"] == {"id": done.retrain_run, "status": "queued"}
    assert "the model in use was trained on 1 of them: retrain run #2 queued" in run_cli("status", env=env).stdout


def test_a_retrain_waits_for_the_active_run_then_the_scheduler_starts_it(tmp_path):
    s = ingest(tmp_path)
    promote_run_over_all_lessons(s)
    engine = db.write_engine(s.db_path)
    store = RunStore(engine)
    busy = store.create("manual", 100)  # a run is active while the user forgets
    done = forget(engine, s.runs_dir, 100, pattern="payroll-2")
    assert done.retrain_run is None and done.waits_for_run == busy
    assert 3 not in {l.id for l in store.lessons(busy)}  # not formatted yet: it will not see the lesson
    started = []
    sched = Scheduler(s, store, started.append, now=lambda: datetime(2026, 11, 25, 12, 0))
    assert sched.check() == "a run is already active"
    store.fail(busy, "stopped by the test")
    assert sched.check().endswith("retrain without forgotten lessons")
    assert store.get(started[0]).reason == "forget"
    store.fail(started[0], "stopped by the test")
    assert sched.check().startswith("waiting for lessons")  # once per forget, even if the retrain fails


def test_the_next_runs_dataset_does_not_hold_a_forgotten_lesson(tmp_path):
    base = make_tiny_llama(tmp_path / "base", tokenizer="bpe")
    system = tmp_path / "system.txt"
    system.write_text("You are a coding agent.")  # the agent's own prompt is longer than the tiny context
    s = ingest(tmp_path, LACD_MODEL_BASE=base, LACD_MODEL_SYSTEM_PROMPT=system, LACD_RUN_MIN_FREE_GB=0,
               LACD_QUEUE_HELDOUT_PCT=0)
    promote_run_over_all_lessons(s)
    done = forget(db.write_engine(s.db_path), s.runs_dir, 100, pattern="payroll-7")
    executor = RunExecutor(s, RunStore(db.write_engine(s.db_path)), threading.Event())
    executor.execute(done.retrain_run, until="format")
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    splits = load_from_disk(str(s.runs_dir / str(done.retrain_run) / "dataset"))
    assert sorted(splits["train"]["lesson_id"]) == [1, 2, 3, 4, 5, 6, 7]  # lesson 8 (line 7) is gone
    text = AutoTokenizer.from_pretrained(base).decode(sum(splits["train"]["input_ids"], []))
    assert PROMPT.format(6) in text and PROMPT.format(7) not in text


def plain_line(i: int, prompt: str) -> str:
    """A lesson whose text holds no underscore, quote or the word tool: only its JSON does."""
    return json.dumps({"user_prompt": prompt, "ai_responses": [f"answer {i}"], "tool_executions": []})


def plain_log(tmp_path: Path, prompts: list[str], extra: str = "") -> dict:
    log = tmp_path / "agent_interactions.jsonl"
    log.write_text("".join(plain_line(i, p) + "\n" for i, p in enumerate(prompts)) + extra)
    env = lacd_env(tmp_path, log)
    assert run_cli("ingest", env=env).returncode == 0
    return env


def forgotten_count(env) -> int:
    return json.loads(run_cli("status", "--json", env=env).stdout)["forgotten"]


def test_a_pattern_matches_the_lessons_text_never_json_syntax_keys_or_roles(tmp_path):
    env = plain_log(tmp_path, [f"hello {i}" for i in range(35)])
    for pattern in ("_", "tool", '"', "user", "assistant", "role", "content", "messages", "prompt", "{"):
        result = run_cli("forget", "--pattern", pattern, "--yes", env=env)
        assert result.returncode == 2, (pattern, result.stdout)
        assert result.stderr == ("lacd: no stored lesson or rejected line contains that text "
                                 "(matching is case-sensitive, on the redacted text)\n")
    assert forgotten_count(env) == 0


def test_a_pattern_matching_too_large_a_share_is_refused_unless_all_matching(tmp_path):
    env = plain_log(tmp_path, [f"hello {i}" for i in range(9)] + ["goodbye"])
    refused = run_cli("forget", "--pattern", "hello", "--yes", env=env)
    assert refused.returncode == 2
    assert refused.stdout == ""
    assert refused.stderr == ("lacd: the pattern matches 9 of 10 lessons and rejected lines (90%), more than "
                              "[forget] max_share (20%): give a longer pattern, or pass --all-matching to "
                              "forget every one of them\n")
    assert forgotten_count(env) == 0
    done = run_cli("forget", "--pattern", "hello", "--all-matching", "--yes", env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["matches 9 of 10 lessons", "      9  hello 8", "      8  hello 7",
                                        "      7  hello 6", "    ... and 6 more (`lacd lessons` lists them)",
                                        "forgot 9 lessons; their text is erased"]
    assert forgotten_count(env) == 9
    lenient = {**env, "LACD_FORGET_MAX_SHARE": "1"}
    assert run_cli("forget", "--pattern", "goodbye", "--yes", env=lenient).returncode == 0
    assert forgotten_count(env) == 10


def test_the_count_and_samples_are_shown_before_asking_and_no_erases_nothing(tmp_path):
    env = plain_log(tmp_path, [f"hello {i}" for i in range(10)] + ["tell me about payroll \x1b[2J now"])
    asked = subprocess.run([sys.executable, "-m", "lacd", "forget", "--pattern", "payroll"], env=env,
                           input="n\n", capture_output=True, text=True, timeout=60)
    assert asked.returncode == 1
    assert asked.stdout == ("matches 1 of 11 lessons\n     11  tell me about payroll \\x1b[2J now\n"
                            "forget them? Their text is erased from the database [y/N]: ")
    assert forgotten_count(env) == 0
    agreed = subprocess.run([sys.executable, "-m", "lacd", "forget", "--pattern", "payroll"], env=env,
                            input="y\n", capture_output=True, text=True, timeout=60)
    assert agreed.returncode == 0 and agreed.stdout.endswith("forgot 1 lesson; their text is erased\n")
    assert forgotten_count(env) == 1


def test_a_rejected_lines_stored_prefix_can_be_forgotten(tmp_path):
    env = plain_log(tmp_path, [f"hello {i}" for i in range(9)], extra="not json: deploy the build zq81x\n")
    s = config.load(env=env)
    assert b"zq81x" in db_bytes(s)
    result = run_cli("forget", "--pattern", "zq81x", "--yes", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["matches 0 of 9 lessons and 1 of 1 rejected lines",
                                          "forgot 0 lessons and 1 rejected line; their text is erased"]
    rejects = json.loads(run_cli("rejects", "--json", env=env).stdout)
    assert [(r["reason"].split(":")[0], r["prefix"]) for r in rejects] == [("invalid JSON", "")]
    assert b"zq81x" not in db_bytes(s)
    assert forgotten_count(env) == 0


def test_forget_on_a_state_dir_without_a_database_creates_nothing(tmp_path):
    env = lacd_env(tmp_path, tmp_path / "agent_interactions.jsonl")
    for args in (("1", "--yes"), ("--pattern", "x", "--yes"), ("--pattern", "x")):
        result = run_cli("forget", *args, env=env)
        assert result.returncode == 2
        assert result.stderr == (f"lacd: no database at {tmp_path / 'state' / 'lacd.db'} yet: "
                                 "start the daemon or run `lacd migrate`\n")
    assert not (tmp_path / "state").exists()


def test_tool_calls_are_matched_by_name_and_argument_values_not_keys(tmp_path):
    call = {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "read_file", "arguments": json.dumps({"path": "quarterly-plan.md"})}}]}
    line = json.dumps({"messages": [{"role": "user", "content": "open it"}, call,
                                    {"role": "tool", "content": "the plan says ship"}, {"role": "assistant", "content": "ok"}]})
    env = plain_log(tmp_path, [f"hello {i}" for i in range(9)], extra=line + "\n")
    for pattern in ("path", "arguments", "function", "tool_calls"):  # keys of the call, not its text
        assert run_cli("forget", "--pattern", pattern, "--yes", env=env).returncode == 2, pattern
    named = run_cli("forget", "--pattern", "read_file", env=env)  # the call's name; no answer: nothing erased
    assert named.returncode == 1 and named.stdout.startswith("matches 1 of 10 lessons\n     10  read_file\n")
    found = run_cli("forget", "--pattern", "quarterly-plan", "--yes", env=env)  # an argument's value
    assert found.stdout.splitlines()[1:] == ["     10  quarterly-plan.md", "forgot 1 lesson; their text is erased"]
    by_name = run_cli("forget", "--pattern", "read_file", "--yes", env=env)  # the call's name: that lesson only
    assert by_name.returncode == 2 and "no stored lesson" in by_name.stderr
    assert forgotten_count(env) == 1
