"""The promotion gate in the real cycle: format, train, export, register, evaluate, promote.

Foreground runs (the code `lacd train` runs) of a tiny random Llama against the stand-in Ollama,
driven through the real `ollama` client; what the user sees is read back through the CLI
(`lacd status --json`, `lacd models --json`, `lacd rollback`, `lacd report`). One history, built
once for the module:

1. a good cycle: promoted, `lacd-coder:latest` = v1;
2. a cycle trained on corrupted targets (every assistant token of the training split replaced by
   one token): its held-out loss rises far beyond the guard, the gate rejects it, v2 is registered
   but latest still serves v1;
3. a good cycle with another seed: promoted, latest = v3;
4. `lacd rollback`: latest back to v1 (the rejected v2 is skipped), status and models agree;
   a second rollback has nothing to go back to.

A second module-level test runs a cycle with no held-out lesson under both `if_unmeasured` choices.
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from conftest import lacd_env, run_cli
from lacd import config
from lacd.cycle import run_foreground
from lacd.pipeline import register, stages
from lacd.samples import generate_lines
from lacd.service import catch_up
from ollama_standin import StandIn
from tiny import make_confident_tiny_llama

N_LESSONS = 12
SYSTEM = "You are a coding agent. Call tools in <tool_code> blocks."


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A tiny random Llama whose final norm is scaled up, so a few LoRA steps can make it confident.

    With the default tiny model, the final RMSNorm bounds every logit near zero: no amount of
    training moves held-out loss far from ln(vocab), and a good and a broken candidate look alike.
    """
    torch.set_num_threads(1)
    return make_confident_tiny_llama(tmp_path_factory.mktemp("tiny") / "base")


def gate_env(root: Path, base: Path, host: str, **extra) -> dict[str, str]:
    """The environment of every cycle and CLI call: a small CPU cycle, tiny evaluation budgets."""
    (root / "config.toml").write_text("")  # no user config leaks in, even outside the autouse fixture
    (root / "system.txt").write_text(SYSTEM)
    values = dict(
        LACD_CONFIG=root / "config.toml", LACD_MODEL_BASE=base, LACD_MODEL_SYSTEM_PROMPT=root / "system.txt",
        LACD_OLLAMA_HOST=host, LACD_QUEUE_HELDOUT_PCT=30, LACD_TRAIN_MAX_SEQ_LEN=256, LACD_TRAIN_EPOCHS=8,
        LACD_TRAIN_TOKENS_PER_BATCH=1024, LACD_TRAIN_LEARNING_RATE=0.01, LACD_TRAIN_THREADS=1,
        LACD_EVALUATE_MAX_CASES=2, LACD_EVALUATE_MAX_NEW_TOKENS=3, LACD_EVALUATE_THREADS=1,
        LACD_RUN_RETRIES=1, LACD_RUN_MIN_FREE_GB=0, LACD_LOG_LEVEL="warning",
    )
    return lacd_env(root, root / "agent_interactions.jsonl", **{**values, **extra})


def settings(env: dict[str, str], **overrides):
    return config.load(env={**env, **{k: str(v) for k, v in overrides.items()}})


def write_lessons(env: dict[str, str], n: int = N_LESSONS, seed: int = 5) -> None:
    with open(env["LACD_WATCH_LOG"], "a") as fh:
        fh.writelines(line + "\n" for line in generate_lines(n, seed=seed))
    catch_up(settings(env))


def corrupt_targets(dataset_dir: Path) -> None:
    """Replace every labelled token of the training split by the first one: a trainer fed garbage."""
    from datasets import load_from_disk

    splits = load_from_disk(str(dataset_dir))
    token = next(t for t in splits["train"][0]["labels"] if t != -100)
    splits["train"] = splits["train"].map(lambda row: {"labels": [t if t == -100 else token for t in row["labels"]]})
    tmp = dataset_dir.with_name("dataset.corrupt")
    splits.save_to_disk(str(tmp))
    shutil.copy(dataset_dir / "format.json", tmp / "format.json")
    shutil.rmtree(dataset_dir)
    tmp.rename(dataset_dir)


@contextmanager
def corrupted_training():
    """Train stages inside the block train on corrupted targets (then everything else is real)."""
    real = stages.STAGE_FUNCTIONS["train"]

    def train_on_garbage(ctx):
        corrupt_targets(ctx.run_dir / "dataset")
        return real(ctx)

    stages.STAGE_FUNCTIONS["train"] = train_on_garbage
    try:
        yield
    finally:
        stages.STAGE_FUNCTIONS["train"] = real


def cli_json(env, *args) -> dict | list:
    result = run_cli(*args, "--json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def look(env: dict[str, str], server: StandIn) -> dict:
    """What the user and Ollama see now."""
    client = register.make_client(server.host)
    versions = register.list_versions(client, "lacd-coder")
    return {"status": cli_json(env, "status"), "models": {m["tag"]: m for m in cli_json(env, "models")},
            "versions": versions, "latest": register.latest_digest(client, "lacd-coder"),
            "status_text": run_cli("status", env=env).stdout}


@pytest.fixture(scope="module")
def history(tmp_path_factory, tiny_base):
    root = tmp_path_factory.mktemp("gate")
    with StandIn(root / "ollama") as server:
        env = gate_env(root, tiny_base, server.host)
        write_lessons(env)
        seen = {"env": env, "outcomes": []}
        seen["outcomes"].append(run_foreground(settings(env)))
        seen["first"] = look(env, server)
        with corrupted_training():
            seen["outcomes"].append(run_foreground(settings(env)))
        seen["broken"] = look(env, server)
        write_lessons(env, 8, seed=6)  # more lessons arrived: the next cycle learns from 20
        seen["outcomes"].append(run_foreground(settings(env)))
        seen["third"] = look(env, server)
        seen["rollback"] = run_cli("rollback", env=env)
        seen["rolled_back"] = look(env, server)
        seen["rollback_again"] = run_cli("rollback", env=env)
        seen["report"] = run_cli("report", "2", env=env)
        yield seen


def test_a_good_cycle_is_measured_and_promoted(history):
    assert [o.status for o in history["outcomes"]] == ["done", "rejected", "done"]
    first = history["first"]
    run = first["status"]["runs"][0]
    assert run["status"] == "done" and run["tag"] == "lacd-coder:v1" and run["gate"]["promote"] is True
    assert run["gate"]["reasons"][0] == "exact-call accuracy 0.00 >= 0.00 - 0.02"
    v1 = first["models"]["lacd-coder:v1"]
    assert v1["status"] == "promoted" and v1["active"] and v1["lessons"] == N_LESSONS
    metrics = v1["metrics"]
    assert metrics["incumbent"]["label"] == "base model" and metrics["generator"] == "transformers"
    assert metrics["n_cases"] == 2 and metrics["candidate"]["heldout_loss"] < metrics["incumbent"]["heldout_loss"]
    assert first["latest"] == first["versions"][1]  # Ollama's latest serves v1


def test_a_candidate_trained_on_corrupted_targets_is_rejected_and_latest_stays(history):
    first, broken = history["first"], history["broken"]
    run = broken["status"]["runs"][0]
    assert run["status"] == "rejected" and run["tag"] == "lacd-coder:v2" and run["error"] is None
    assert run["gate"]["promote"] is False
    reason = run["gate"]["reasons"][0]
    assert reason.startswith("held-out loss ") and " > " in reason and reason.endswith(" + 5%")
    candidate, in_use = (float(x) for x in reason.removeprefix("held-out loss ").removesuffix(" + 5%").split(" > "))
    assert candidate > 1.05 * in_use  # the numbers in the reason are the ones that decided
    assert f"gate: {reason}" in broken["status_text"]
    # Ollama: v2 registered, latest unchanged
    assert set(broken["versions"]) == {1, 2} and broken["latest"] == first["latest"] == broken["versions"][1]
    assert broken["status"]["active_model"]["tag"] == "lacd-coder:v1"
    v2 = broken["models"]["lacd-coder:v2"]
    assert v2["status"] == "rejected" and not v2["active"] and v2["note"] == f"rejected by gate: {reason}"
    assert v2["metrics"]["generator"] == "ollama"  # both models served: measured as the agent sees them
    assert v2["metrics"]["incumbent"]["label"] == "lacd-coder:v1"
    assert broken["status"]["pending"] == 0  # the rejected run's lessons are not retried forever


def test_the_run_report_is_written_for_a_rejected_run(history):
    result = history["report"]
    assert result.returncode == 0, result.stderr
    page = Path(result.stdout.strip())
    assert page.name == "report.html" and page.parent.name == "2"
    text = page.read_text()
    assert "rejected by gate" in text and "held-out loss" in text and "Generations from ollama" in text
    assert (page.parent / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (page.parent / "progress.jsonl").read_text().count('"phase": "train"') >= 1


def test_rollback_moves_latest_back_and_status_and_models_agree(history):
    third, after = history["third"], history["rolled_back"]
    assert third["status"]["active_model"]["tag"] == "lacd-coder:v3" and third["latest"] == third["versions"][3]
    assert third["versions"][3] != third["versions"][1]  # another seed: another model
    result = history["rollback"]
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "lacd-coder:latest now points at lacd-coder:v1 (was lacd-coder:v3)"
    assert after["latest"] == after["versions"][1]  # Ollama serves v1 again, the rejected v2 was skipped
    assert after["status"]["active_model"]["tag"] == "lacd-coder:v1"
    active = [tag for tag, m in after["models"].items() if m["active"]]
    assert active == ["lacd-coder:v1"]
    assert after["models"]["lacd-coder:v3"]["status"] == "promoted"
    assert "rolled back to lacd-coder:v1" in after["models"]["lacd-coder:v3"]["note"]
    assert "model       lacd-coder:v1 (latest)" in after["status_text"]
    again = history["rollback_again"]
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert "nothing to roll back to" in again.stderr


@pytest.mark.parametrize("choice, status", [("reject", "rejected"), ("promote", "done")])
def test_no_heldout_lesson_follows_if_unmeasured(tmp_path, tiny_base, choice, status):
    with StandIn(tmp_path / "ollama") as server:
        env = gate_env(tmp_path, tiny_base, server.host, LACD_QUEUE_HELDOUT_PCT=0, LACD_GATE_IF_UNMEASURED=choice)
        write_lessons(env, 6)
        outcome = run_foreground(settings(env))
        seen = look(env, server)
    assert outcome.status == status
    run = seen["status"]["runs"][0]
    assert run["gate"]["reasons"][0] == "exact-call accuracy could not be measured for the candidate (no held-out case)"
    assert seen["models"]["lacd-coder:v1"]["metrics"]["n_cases"] == 0
    assert set(seen["versions"]) == {1}
    assert (seen["latest"] is not None) == (choice == "promote")
