"""The gate's primary metric decides, in CI: exact-call accuracy 1.00 against 0.00, both ways.

Every held-out reply of these lessons is the same call, ``read_file('main.py')``, so a model can
learn to write it exactly. One history of foreground runs (the code `lacd train` runs) of a tiny
random Llama against the stand-in Ollama, built once for the module:

1. a real training run (LoRA rank 32, 60 epochs) teaches the model the call; measured with
   transformers against the base model, exact-call accuracy is 1.00 against 0.00: promoted (v1);
2. a candidate whose LoRA B matrices are zero (the base model again) is measured against v1,
   both through the stand-in's /api/chat with the registered TEMPLATE: 0.00 against 1.00,
   rejected (the loss guard is switched off, so only the primary metric can reject it);
3. `lacd forget` queues a retrain; its candidate is the zeroed adapter again: the gate rejects it,
   and the forget run is promoted anyway (v3), with the gate's reason kept;
4. a candidate with v1's adapter is measured against v3 through /api/chat: 1.00 against 0.00,
   promoted (v4).
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
from lacd.pipeline import stages
from lacd.pipeline.results import TrainStageResult
from lacd.service import catch_up
from ollama_standin import StandIn
from test_gate_cycle import cli_json, look
from tiny import make_confident_tiny_llama

CALL = "read_file('main.py')"


def lesson_line(i: int) -> str:
    """A local-ai-coder v1 line whose first reply is CALL, whatever the task number."""
    return json.dumps({
        "user_prompt": f"task {i}: what does main.py do?",
        "ai_responses": [f"<tool_code>\n{CALL}\n</tool_code>", f"It prints {i}."],
        "tool_executions": [{"tool_call": CALL, "tool_output": f"<tool_output>print({i})</tool_output>"}],
    })


@pytest.fixture(scope="module")
def caller_base(tmp_path_factory):
    """The tiny random Llama with its final norm scaled up, so LoRA can make it confident (see
    test_gate_cycle.tiny_base)."""
    torch.set_num_threads(1)
    return make_confident_tiny_llama(tmp_path_factory.mktemp("tiny") / "base")


def metric_env(root: Path, base: Path, host: str) -> dict[str, str]:
    (root / "config.toml").write_text("")
    (root / "system.txt").write_text("You are a coding agent.")
    return lacd_env(
        root, root / "agent_interactions.jsonl", LACD_CONFIG=root / "config.toml", LACD_MODEL_BASE=base,
        LACD_MODEL_SYSTEM_PROMPT=root / "system.txt", LACD_OLLAMA_HOST=host, LACD_QUEUE_HELDOUT_PCT=40,
        LACD_TRAIN_MAX_SEQ_LEN=256, LACD_TRAIN_EPOCHS=60, LACD_TRAIN_LEARNING_RATE=0.01, LACD_TRAIN_LORA_R=32,
        LACD_TRAIN_LORA_ALPHA=64, LACD_TRAIN_TOKENS_PER_BATCH=1024, LACD_TRAIN_THREADS=1,
        LACD_EVALUATE_MAX_CASES=2, LACD_EVALUATE_MAX_NEW_TOKENS=48, LACD_EVALUATE_THREADS=1,  # the call is 37 tokens
        LACD_GATE_MAX_LOSS_INCREASE=1000, LACD_RUN_RETRIES=1, LACD_RUN_MIN_FREE_GB=0, LACD_LOG_LEVEL="warning",
    )


def write_lessons(env: dict[str, str], first: int, n: int) -> None:
    with open(env["LACD_WATCH_LOG"], "a") as fh:
        fh.writelines(lesson_line(i) + "\n" for i in range(first, first + n))
    catch_up(config.load(env=env))


@contextmanager
def candidate_adapter(adapter: Path, zero: bool):
    """Train stages inside the block copy `adapter` (with every LoRA B matrix zeroed: the base model)."""
    from safetensors.torch import load_file, save_file

    real = stages.STAGE_FUNCTIONS["train"]

    def copy(ctx):
        out = ctx.run_dir / "adapter"
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(adapter, out)
        if zero:
            weights = load_file(out / "adapter_model.safetensors")
            save_file({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in weights.items()},
                      out / "adapter_model.safetensors")
        return TrainStageResult.from_dict({"adapter_dir": str(out), "steps": 0})

    stages.STAGE_FUNCTIONS["train"] = copy
    try:
        yield
    finally:
        stages.STAGE_FUNCTIONS["train"] = real


pytestmark = pytest.mark.slow  # four cycles with a real training run: about a minute of CPU


@pytest.fixture(scope="module")
def history(tmp_path_factory, caller_base):
    root = tmp_path_factory.mktemp("metric")
    with StandIn(root / "ollama") as server:
        env = metric_env(root, caller_base, server.host)
        seen = {"env": env, "outcomes": []}
        write_lessons(env, 0, 16)
        seen["outcomes"].append(run_foreground(config.load(env=env)))
        seen["trained"] = look(env, server)
        caller = root / "caller-adapter"
        shutil.copytree(Path(env["LACD_STATE_DIR"]) / "runs" / "1" / "adapter", caller)
        write_lessons(env, 100, 16)
        with candidate_adapter(caller, zero=True):
            seen["outcomes"].append(run_foreground(config.load(env=env)))
            seen["rejected"] = look(env, server)
            seen["forget"] = run_cli("forget", "1", "--yes", env=env)
            seen["outcomes"].append(run_foreground(config.load(env=env)))
            seen["forgot"] = look(env, server)
        write_lessons(env, 200, 16)
        with candidate_adapter(caller, zero=False):
            seen["outcomes"].append(run_foreground(config.load(env=env)))
        seen["served"] = look(env, server)
        seen["runs"] = {r["id"]: r for r in cli_json(env, "status")["runs"]}
        yield seen


def metrics_of(view: dict, version: int) -> dict:
    return view["models"][f"lacd-coder:v{version}"]["metrics"]


def test_a_model_that_writes_the_call_scores_one_and_is_promoted_over_the_base(history):
    assert [o.status for o in history["outcomes"]] == ["done", "rejected", "done", "done"]
    m = metrics_of(history["trained"], 1)
    assert m["generator"] == "transformers" and m["n_cases"] == 2 and m["incumbent"]["label"] == "base model"
    assert m["candidate"]["exact_call_accuracy"] == 1.0 and m["incumbent"]["exact_call_accuracy"] == 0.0
    assert m["gate"]["promote"] and m["gate"]["reasons"][0] == "exact-call accuracy 1.00 >= 0.00 - 0.02"
    assert history["trained"]["latest"] == history["trained"]["versions"][1]


def test_a_candidate_that_writes_no_call_is_rejected_through_the_standin_chat(history):
    view = history["rejected"]
    m = metrics_of(view, 2)
    assert m["generators"] == {"candidate": "ollama", "incumbent": "ollama"}  # both through /api/chat
    assert m["candidate"]["exact_call_accuracy"] == 0.0 and m["incumbent"]["exact_call_accuracy"] == 1.0
    assert m["incumbent"]["label"] == "lacd-coder:v1"
    assert m["gate"]["reasons"][0] == "exact-call accuracy 0.00 < 1.00 - 0.02"
    assert [r for r in m["gate"]["reasons"] if " > " in r or " < " in r] == [m["gate"]["reasons"][0]]  # it alone decided
    assert view["models"]["lacd-coder:v2"]["status"] == "rejected"
    assert view["latest"] == view["versions"][1] and view["status"]["active_model"]["tag"] == "lacd-coder:v1"


def test_a_forget_run_is_promoted_although_the_gate_rejects_it(history):
    assert history["forget"].returncode == 0, history["forget"].stderr
    assert "retrain without them: run #3 queued" in history["forget"].stdout
    run = history["runs"][3]
    assert run["reason"] == "forget" and run["status"] == "done"
    view = history["forgot"]
    m = metrics_of(view, 3)
    assert m["candidate"]["exact_call_accuracy"] == 0.0 and m["incumbent"]["exact_call_accuracy"] == 1.0
    assert m["gate"]["promote"] is True
    assert m["gate"]["reasons"][:2] == ["a forget run replaces the model in use whatever the gate says",
                                        "exact-call accuracy 0.00 < 1.00 - 0.02"]
    assert view["models"]["lacd-coder:v3"]["status"] == "promoted"
    assert view["latest"] == view["versions"][3] and view["status"]["active_model"]["tag"] == "lacd-coder:v3"


def test_a_model_that_writes_the_call_is_promoted_through_the_standin_chat(history):
    view = history["served"]
    m = metrics_of(view, 4)
    assert m["generators"] == {"candidate": "ollama", "incumbent": "ollama"}
    assert m["candidate"]["exact_call_accuracy"] == 1.0 and m["incumbent"]["exact_call_accuracy"] == 0.0
    assert m["incumbent"]["label"] == "lacd-coder:v3"
    assert m["gate"]["promote"] and m["gate"]["reasons"][0] == "exact-call accuracy 1.00 >= 0.00 - 0.02"
    assert view["latest"] == view["versions"][4] and view["status"]["active_model"]["tag"] == "lacd-coder:v4"
