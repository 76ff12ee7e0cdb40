"""`lacd rollback`, version pruning and `lacd models`, on a real database and the stand-in Ollama.

Versions are registered with small stub GGUFs (no training): what is under test is which version
latest names, in Ollama and in the database, and that both always agree.
"""

from __future__ import annotations

import json

import pytest
from sqlalchemy import insert

from conftest import lacd_env, run_cli
from lacd import config, db, status
from lacd.cycle import RollbackError, rollback
from lacd.models import Run
from lacd.pipeline import register
from lacd.pipeline.stages import prune_versions
from lacd.versions import VersionStore
from ollama_standin import stub_gguf

NAME = "lacd-coder"
METRICS = {"candidate": {"exact_call_accuracy": 0.9, "heldout_loss": 0.8},
           "incumbent": {"exact_call_accuracy": 0.5, "heldout_loss": 1.2}, "generator": "ollama", "n_cases": 4}


@pytest.fixture
def env(tmp_path, server):
    return lacd_env(tmp_path, tmp_path / "agent.jsonl", LACD_OLLAMA_HOST=server.host)


@pytest.fixture
def store(env):
    engine = db.write_engine(config.load(env=env).db_path)
    db.migrate(engine)
    return VersionStore(engine)


def add_version(store: VersionStore, client, tmp_path, status_: str) -> int:
    """A finished run whose version v<N> is registered in Ollama; promoted ones become latest."""
    with store.engine.begin() as conn:
        run_id = conn.execute(insert(Run).values(status="done" if status_ != "rejected" else "rejected",
                                                 created_at=1.0e9, lesson_count=10, reason="threshold")).inserted_primary_key[0]
    version = store.allocate(run_id, NAME, 10)
    gguf = stub_gguf(tmp_path / f"v{version}.gguf", name=f"run-{run_id}")
    tag = register.create_version(client, NAME, version, gguf, "{{ .Prompt }}", "", {})
    note = "promoted: exact-call accuracy 0.90 >= 0.50 - 0.02" if status_ == "promoted" else \
        "rejected by gate: exact-call accuracy 0.10 < 0.90 - 0.02"
    if status_ == "promoted":
        register.promote(client, NAME, tag)
    if status_ == "promoted":
        store.activate(NAME, version, metrics=METRICS, note=note)
    else:
        store.mark(run_id, status_, metrics=METRICS, note=note)
    return version


def serving(client) -> int | None:
    """The version Ollama's latest is a copy of."""
    latest = register.latest_digest(client, NAME)
    return next((n for n, digest in register.list_versions(client, NAME).items() if digest == latest), None)


def active_in_db(store: VersionStore) -> int | None:
    row = store.active(NAME)
    return row.version if row else None


@pytest.fixture
def three(store, server, tmp_path):
    """v1 promoted, v2 rejected, v3 promoted (latest)."""
    client = register.make_client(server.host)
    for status_ in ("promoted", "rejected", "promoted"):
        add_version(store, client, tmp_path, status_)
    assert serving(client) == 3 == active_in_db(store)
    return client


def test_rollback_goes_to_the_previous_promoted_version_skipping_rejected_ones(env, store, three):
    done = rollback(config.load(env=env))
    assert (done.from_tag, done.to_tag, done.note) == ("lacd-coder:v3", "lacd-coder:v1", None)
    assert serving(three) == 1 == active_in_db(store)
    v3 = next(v for v in store.all(NAME) if v.version == 3)
    assert v3.status == "promoted" and not v3.active
    assert v3.note.startswith("promoted: exact-call accuracy 0.90") and "; rolled back to lacd-coder:v1 at " in v3.note
    with pytest.raises(RollbackError, match="lacd-coder:v1 is the only promoted version still in Ollama"):
        rollback(config.load(env=env))
    assert serving(three) == 1 == active_in_db(store)


def test_rollback_to_a_named_version_through_the_cli(env, store, three):
    result = run_cli("rollback", "v2", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "lacd-coder:latest now points at lacd-coder:v2 (was lacd-coder:v3)",
        "note: lacd-coder:v2 had been rejected by gate: exact-call accuracy 0.10 < 0.90 - 0.02",
    ]
    assert serving(three) == 2 == active_in_db(store)
    models = json.loads(run_cli("models", "--json", env=env).stdout)
    assert [(m["tag"], m["status"], m["active"]) for m in models] == [
        ("lacd-coder:v3", "promoted", False), ("lacd-coder:v2", "promoted", True), ("lacd-coder:v1", "promoted", False)]
    st = json.loads(run_cli("status", "--json", env=env).stdout)
    assert st["active_model"]["tag"] == "lacd-coder:v2"


@pytest.mark.parametrize("args, message", [
    (["v3"], "lacd-coder:v3 is already lacd-coder:latest"),
    (["v9"], "there is no lacd-coder:v9"),
    (["three"], "'three' is not a version like v3"),
])
def test_rollback_refusals_are_one_line_and_change_nothing(env, store, three, args, message):
    result = run_cli("rollback", *args, env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert message in result.stderr
    assert serving(three) == 3 == active_in_db(store)


def test_rollback_with_ollama_down_or_the_version_gone_changes_nothing(env, store, three):
    three.delete("lacd-coder:v1")
    with pytest.raises(RollbackError, match="lacd-coder:v1 is no longer in Ollama at .*; nothing changed"):
        rollback(config.load(env=env))
    down = {**env, "LACD_OLLAMA_HOST": "http://127.0.0.1:9"}
    result = run_cli("rollback", "v2", env=down)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "Ollama is not reachable at http://127.0.0.1:9" in result.stderr and "nothing changed" in result.stderr
    assert serving(three) == 3 == active_in_db(store)


def test_nothing_promoted_yet(env, store, server, tmp_path):
    add_version(store, register.make_client(server.host), tmp_path, "rejected")
    with pytest.raises(RollbackError, match="no version of lacd-coder has been promoted yet"):
        rollback(config.load(env=env))


def test_pruning_keeps_the_newest_and_the_active_one_and_marks_the_rest_removed(env, store, three, tmp_path):
    rollback(config.load(env=env))  # latest = v1, the oldest
    add_version(store, three, tmp_path, "rejected")  # v4
    assert prune_versions(store, three, NAME, keep=2) == ["lacd-coder:v2"]
    assert set(register.list_versions(three, NAME)) == {1, 3, 4}
    assert {v.version: v.status for v in store.all(NAME)} == {4: "rejected", 3: "promoted", 2: "removed",
                                                                  1: "promoted"}
    with pytest.raises(RollbackError, match="lacd-coder:v2 was removed from Ollama"):
        rollback(config.load(env=env), 2)
    assert prune_versions(store, register.make_client("http://127.0.0.1:9", connect_timeout_s=0.5), NAME, 1) == []


def test_models_lists_every_version_with_its_metrics_and_gate_note(store, three):
    with store.engine.connect() as conn:
        from lacd import listings

        text = status.render_models(listings.model_versions(conn))
    lines = text.splitlines()
    assert lines[0].startswith("lacd-coder:v3") and "run #3" in lines[0] and "promoted" in lines[0]
    assert "exact-call 0.90 (in use 0.50), loss 0.800 (1.200), 4 prompts via ollama  <- latest" in lines[0]
    assert lines[3] == "    rejected by gate: exact-call accuracy 0.10 < 0.90 - 0.02"
    assert status.render_models([]) == "no model version yet"


def test_a_version_trained_on_forgotten_lessons_is_never_served_again(env, store, three):
    from lacd.models import Lesson, RunLesson, Source

    with store.engine.begin() as conn:
        source = conn.execute(insert(Source).values(path="log", dev=1, inode=1, state="active", created_at=1.0,
                                                    updated_at=1.0)).inserted_primary_key[0]
        lesson = conn.execute(insert(Lesson).values(
            source_id=source, offset=0, length=1, ingested_at=1.0, format="v1", conversation="", raw="",
            conv_hash="", status="forgotten")).inserted_primary_key[0]
        conn.execute(insert(RunLesson).values(run_id=1, lesson_id=lesson))
    with pytest.raises(RollbackError, match="lacd-coder:v1 was trained on 1 lessons that `lacd forget` erased"):
        rollback(config.load(env=env))
    assert serving(three) == 3 == active_in_db(store)
