"""[model] serve_as: the agent's own model name serves the promoted version, and the user's model is
never lost. Driven through the real promote stage, `lacd rollback` / `lacd hand-back` processes and
the daemon's start, against the stand-in Ollama through the real `ollama` client; the agent's side is
a real /api/chat for its fixed name, and the stand-in says which model answered it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import ollama
import pytest
from sqlalchemy import insert, text

from conftest import lacd_env, run_cli, wait_until
from lacd import config, db, served, status
from lacd.cycle import RollbackError, rollback, rollback_original
from lacd.models import Run
from lacd.pipeline import register
from lacd.pipeline.stages import RunContext, promote_stage, resolve_base
from lacd.pipeline.results import EvaluateStageResult
from lacd.runs import RunStore
from lacd.versions import VersionStore

NAME = "lacd-coder"
AGENT = "codellama:latest"  # what local-ai-coder's cli.js asks for ('codellama')
BACKUP = "lacd-coder:original"


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory) -> list[Path]:
    """Six different tiny random Llamas as f16 GGUFs (a real model answers every /api/chat)."""
    import torch

    from lacd.export import export_gguf
    from tiny import make_tiny_llama

    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("served")
    return [export_gguf(make_tiny_llama(folder / f"hf{seed}", seed=seed), None, folder / f"m{seed}.gguf",
                        outtype="f16").path for seed in range(6)]  # fmt: skip


@pytest.fixture
def client(server):
    return register.make_client(server.host)


@pytest.fixture
def env(tmp_path, server):
    return lacd_env(tmp_path, tmp_path / "agent.jsonl", LACD_OLLAMA_HOST=server.host, LACD_MODEL_SERVE_AS="codellama")


@pytest.fixture
def settings(env):
    return config.load(env=env)


@pytest.fixture
def store(settings):
    engine = db.write_engine(settings.db_path)
    db.migrate(engine)
    return RunStore(engine)


def user_creates(client, gguf: Path, name: str = "codellama") -> str:
    """The user's own `ollama pull` / `ollama create`; returns the digest /api/tags lists for it."""
    client.create(model=name, files={"model.gguf": client.create_blob(gguf)}, template="{{ .Prompt }}")
    return register.tag_digest(client, name)


def run_promote(store: RunStore, client, settings, gguf: Path, accuracy: float, tmp_path: Path) -> str:
    """A run whose candidate is registered and measured; its real promote stage decides (vs 0.5)."""
    with store.engine.begin() as conn:
        run_id = conn.execute(insert(Run).values(status="running", created_at=1.0e9, lesson_count=10,
                                                 reason="threshold")).inserted_primary_key[0]  # fmt: skip
    versions = VersionStore(store.engine)
    version = versions.allocate(run_id, NAME, 10)
    tag = register.create_version(client, NAME, version, gguf, "{{ .Prompt }}", "", {})
    versions.mark(run_id, "registered", digest=register.file_digest(gguf))
    store.begin_stage(run_id, "evaluate")
    store.finish_stage(run_id, "evaluate", EvaluateStageResult(candidate={"exact_call_accuracy": accuracy},
                                                          incumbent={"exact_call_accuracy": 0.5}, n_cases=4))
    run_dir = tmp_path / "runs" / str(run_id)
    run_dir.mkdir(parents=True)
    ctx = RunContext(run_id, run_dir, settings, store, versions, lambda _p: None, threading.Event())
    assert promote_stage(ctx).promoted == (accuracy >= 0.5)
    return tag


def agent_chat(server, client) -> str:
    """The agent's request: /api/chat for its fixed name; the digest of the model that answered."""
    ollama.Client(host=server.host).chat(model="codellama", messages=[{"role": "user", "content": "hi"}],
                                         options={"num_predict": 1})  # fmt: skip
    answered = server.completions[-1]
    assert answered["model"] == AGENT
    return answered["digest"]


def digest(client, tag: str) -> str | None:
    """The digest /api/tags lists for tag (an Ollama copy lists its source's)."""
    return register.tag_digest(client, tag)


def blob_sha(server, gguf: Path) -> str:
    """sha256 of the blob the stand-in keeps for a pushed file (the original's bytes)."""
    path = Path(server.server.store.blob_path(register.file_digest(gguf)))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_agent_name_follows_promotions_and_rollbacks_and_the_original_is_kept(
        server, client, env, settings, store, ggufs, tmp_path):
    original = user_creates(client, ggufs[0])
    original_bytes = hashlib.sha256(ggufs[0].read_bytes()).hexdigest()

    def kept() -> None:  # the user's model, byte for byte, under the backup tag
        assert digest(client, BACKUP) == original
        assert blob_sha(server, ggufs[0]) == original_bytes

    assert agent_chat(server, client) == original
    v1 = run_promote(store, client, settings, ggufs[1], 0.9, tmp_path)
    kept()
    assert digest(client, AGENT) == digest(client, v1) == agent_chat(server, client)
    assert served.get(store.engine, "codellama").serving == "v1"

    run_promote(store, client, settings, ggufs[2], 0.1, tmp_path)  # v2 rejected: nothing moves
    kept()
    assert agent_chat(server, client) == digest(client, v1)

    v3 = run_promote(store, client, settings, ggufs[3], 0.9, tmp_path)
    kept()
    assert agent_chat(server, client) == digest(client, v3) == digest(client, f"{NAME}:latest")
    line = f"codellama:latest serves v3; your model is kept as {BACKUP}"
    assert f"agent name  {line}" in status.render(status.snapshot(settings))
    models = run_cli("models", env=env).stdout.splitlines()
    assert models[0].startswith(f"{NAME}:v3") and models[0].endswith("<- latest  <- codellama:latest")
    assert models[-1] == f"{BACKUP:<24} your model from before lacd (codellama:latest)"
    listed = json.loads(run_cli("models", "--json", env=env).stdout)
    assert [(m["tag"], m["served_as"]) for m in listed] == [(v3, [AGENT]), (f"{NAME}:v2", []), (v1, [])]

    done = rollback(settings)  # to v1, the promoted one before v3
    assert (done.to_tag, done.served) == (v1, "codellama:latest serves v1; your model is kept as " + BACKUP)
    kept()
    assert agent_chat(server, client) == digest(client, v1)

    result = run_cli("rollback", "--original", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"codellama:latest now serves your original model again ({BACKUP})")
    kept()
    assert agent_chat(server, client) == original
    assert run_cli("models", env=env).stdout.splitlines()[-1].endswith("<- codellama:latest")
    snap = json.loads(run_cli("status", "--json", env=env).stdout)
    assert [(s["name"], s["serving"], s["state"]) for s in snap["served"]] == [(AGENT, "original", "serving")]

    assert run_cli("rollback", "v1", env=env).stdout == "codellama:latest serves v1; your model is kept as " \
                                                       f"{BACKUP}\n"  # latest is v1 already: the name catches up
    assert agent_chat(server, client) == digest(client, v1)
    v4 = run_promote(store, client, settings, ggufs[4], 0.9, tmp_path)
    kept()
    assert agent_chat(server, client) == digest(client, v4)
    assert run_cli("rollback", "v0", env=env).returncode == 0
    kept()
    assert agent_chat(server, client) == original


def test_a_name_changed_behind_lacds_back_is_left_alone(server, client, env, settings, store, ggufs, tmp_path):
    original = user_creates(client, ggufs[0])
    run_promote(store, client, settings, ggufs[1], 0.9, tmp_path)
    theirs = user_creates(client, ggufs[5])  # the user pulls a newer codellama over lacd's copy

    v2 = run_promote(store, client, settings, ggufs[2], 0.9, tmp_path)
    assert digest(client, f"{NAME}:latest") == digest(client, v2)  # lacd's own tags go on
    assert digest(client, AGENT) == theirs == agent_chat(server, client)
    assert digest(client, BACKUP) == original
    row = served.get(store.engine, "codellama")
    assert row.state == "released"
    assert "codellama:latest was changed outside lacd" in row.note and "no longer serves under it" in row.note
    assert f"agent name  codellama:latest left alone; your model is kept as {BACKUP}: codellama:latest was " \
           "changed outside lacd" in status.render(status.snapshot(settings))

    run_promote(store, client, settings, ggufs[3], 0.9, tmp_path)
    rollback(settings, 2)
    assert digest(client, AGENT) == theirs  # never again, whatever lacd promotes or rolls back
    result = run_cli("rollback", "--original", env=env)
    assert result.returncode == 2 and "lacd stopped serving under codellama:latest" in result.stderr
    assert digest(client, AGENT) == theirs and digest(client, BACKUP) == original


def test_hand_back_for_good_and_a_name_that_did_not_exist_before(server, client, env, settings, store, ggufs,
                                                                  tmp_path):
    with pytest.raises(RollbackError, match="lacd never changed codellama:latest"):
        rollback_original(settings)
    v1 = run_promote(store, client, settings, ggufs[1], 0.9, tmp_path)  # no codellama before lacd
    assert digest(client, AGENT) == digest(client, v1) and digest(client, BACKUP) is None
    assert served.get(store.engine, "codellama").original_digest is None

    result = run_cli("hand-back", env=env)
    assert result.returncode == 0, result.stderr
    assert digest(client, AGENT) is None  # back as it was: no such model
    run_promote(store, client, settings, ggufs[2], 0.9, tmp_path)
    assert digest(client, AGENT) is None  # handed back: later promotions leave the name alone
    assert served.get(store.engine, "codellama").state == "handed_back"
    assert "handed back" in run_cli("status", env=env).stdout
    again = run_cli("hand-back", env=env)
    assert again.returncode == 2 and "already handed back" in again.stderr


def test_sigkill_between_the_backup_and_the_copy(server, client, env, settings, store, ggufs, tmp_path):
    """A `lacd rollback` process killed after it kept the original and recorded its copy to the agent's
    name, before that copy reached Ollama: the original stays, and the daemon's start finishes the copy."""
    original = user_creates(client, ggufs[0])
    plain = {**env, "LACD_MODEL_SERVE_AS": ""}  # two promotions before serve_as was set
    for gguf in ggufs[1:3]:
        run_promote(store, client, config.load(env=plain), gguf, 0.9, tmp_path)
    hold_and_kill(server, AGENT, ["rollback", "v1"], env)
    assert digest(client, BACKUP) == original  # kept before anything else
    assert digest(client, AGENT) == original  # the copy never happened
    row = served.get(store.engine, "codellama")
    assert (row.state, row.serving, row.digest) == ("serving", "original", original)
    with store.engine.connect() as conn:  # the intent was in the database before the copy was sent
        pending = conn.execute(text("SELECT pending_tag, pending_digest FROM served_names")).one()
    assert tuple(pending) == (f"{NAME}:v1", digest(client, f"{NAME}:v1"))
    assert "codellama:latest serves original; your model is kept as lacd-coder:original (moving to v1 was cut " \
           "short: the daemon finishes it when it starts)" in run_cli("status", env=env).stdout

    daemon = subprocess.Popen([sys.executable, "-m", "lacd", "run"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        assert wait_until(lambda: digest(client, AGENT) == digest(client, f"{NAME}:v1"), timeout=60)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
    row = served.get(store.engine, "codellama")
    assert (row.state, row.serving) == ("serving", "v1")
    assert digest(client, BACKUP) == original
    assert agent_chat(server, client) == digest(client, f"{NAME}:v1")


def hold_and_kill(server, destination: str, args: list[str], env: dict) -> None:
    """Run `lacd ARGS`, SIGKILL it while its copy to destination is in flight; that copy never lands."""
    held = {"arrived": threading.Event(), "release": threading.Event()}
    server.server.hold_copies[destination] = held
    child = subprocess.Popen([sys.executable, "-m", "lacd", *args], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)  # fmt: skip
    try:
        assert held["arrived"].wait(60), child.stderr.read1().decode() if child.poll() is not None else "no copy"
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
    finally:
        held["release"].set()
        server.server.hold_copies.clear()
    assert child.returncode == -signal.SIGKILL


def test_sigkill_while_keeping_the_original(server, client, env, settings, store, ggufs, tmp_path):
    """Killed after recording the intent to keep the original, before the backup copy landed: the name
    was never touched, the daemon's start makes the backup, and the next change serves the version."""
    original = user_creates(client, ggufs[0])
    plain = {**env, "LACD_MODEL_SERVE_AS": ""}
    for gguf in ggufs[1:3]:
        run_promote(store, client, config.load(env=plain), gguf, 0.9, tmp_path)
    hold_and_kill(server, BACKUP, ["rollback", "v1"], env)
    assert digest(client, BACKUP) is None and digest(client, AGENT) == original
    row = served.get(store.engine, "codellama")
    assert (row.state, row.original_digest, row.digest) == ("backing_up", original, original)

    daemon = subprocess.Popen([sys.executable, "-m", "lacd", "run"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        assert wait_until(lambda: digest(client, BACKUP) == original, timeout=60)
        assert wait_until(lambda: served.get(store.engine, "codellama").state == "serving", timeout=10)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
    assert digest(client, AGENT) == original  # latest is v1; the agent's name catches up on the next change
    result = run_cli("rollback", "v1", env=env)
    assert result.returncode == 0, result.stderr
    assert agent_chat(server, client) == digest(client, f"{NAME}:v1") and digest(client, BACKUP) == original


def test_a_base_named_like_the_agent_name_is_read_from_the_original(client, settings, store, ggufs, tmp_path):
    from lacd.basemodel import ollama_blob

    shared = dataclasses.replace(settings, model=dataclasses.replace(settings.model, base="ollama:codellama"))
    assert served.base_source(shared, store.engine) is None  # lacd never touched the name yet
    user_creates(client, ggufs[0])
    run_promote(store, client, settings, ggufs[1], 0.9, tmp_path)
    assert served.base_source(shared, store.engine) == BACKUP
    assert served.base_source(settings, store.engine) is None  # another base: untouched
    folder = resolve_base(shared)  # the format stage's own resolution (converts the GGUF once)
    blob = Path(json.loads((folder / "lacd_source.json").read_text())["source_gguf"])
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == hashlib.sha256(ggufs[0].read_bytes()).hexdigest()
    assert ollama_blob("codellama", client) != blob  # the name itself serves v1 now


@pytest.mark.parametrize("value, ok", [("codellama", True), ("codellama:7b-instruct", True),
                                       ("library/codellama:latest", True), ("bad name!", False), (":7b", False)])
def test_serve_as_must_be_a_model_name(tmp_path, value, ok):
    env = lacd_env(tmp_path, tmp_path / "agent.jsonl", LACD_MODEL_SERVE_AS=value)
    if ok:
        assert config.load(env=env).model.serve_as == value
    else:
        with pytest.raises(config.ConfigError, match=r"\[model\] serve_as: must be a model name"):
            config.load(env=env)
