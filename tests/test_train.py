"""The train stage: maths, packing equivalence, learning, checkpoints and resume, the child process."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from datasets import Dataset, DatasetDict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from lacd.pipeline import train as train_mod
from lacd.pipeline.packing import (
    IGNORE_INDEX,
    VARLEN_ATTENTION,
    collate_packed,
    collate_padded,
    common_prefix_length,
    labelled_token_count,
)
from lacd.artifacts import sweep_leftovers
from lacd.pipeline.checkpoint import checkpoint_lock, complete_checkpoints
from lacd.pipeline.loss import loss_sum
from lacd.pipeline.plan import auto_lr_scale, cpu_dtype, lr_factor, plan_steps, warmup_steps
from lacd.pipeline.train import (
    TrainError,
    TrainInterrupted,
    TrainResult,
    TrainSpec,
    halve_micro_batch,
    run_training,
    train_in_child,
)
from tiny import corpus_lines, make_tiny_llama, tiny_lora_model

ANSWER = "Prefer pathlib over os.path in new code."


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


def lesson_rows(base_dir: Path, count: int, offset: int = 0) -> list[dict]:
    """Chat-formatted lessons whose assistant always gives the same advice (learnable)."""
    tok = AutoTokenizer.from_pretrained(base_dir)
    lines = corpus_lines()
    rows = []
    for i in range(offset, offset + count):
        prompt = (
            "<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n"
            f"<|im_start|>user\n{lines[i % len(lines)]} {i}<|im_end|>\n<|im_start|>assistant\n"
        )
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tok(ANSWER + "<|im_end|>", add_special_tokens=False)["input_ids"]
        rows.append({
            "input_ids": prompt_ids + answer_ids,
            "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids,
            "lesson_id": i,
        })
    return rows


@pytest.fixture(scope="module")
def dataset_dir(tiny_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data") / "dataset"
    DatasetDict(
        train=Dataset.from_list(lesson_rows(tiny_dir, 24)),
        heldout=Dataset.from_list(lesson_rows(tiny_dir, 6, offset=100)),
    ).save_to_disk(str(folder))
    return folder


def make_spec(tiny_dir: Path, dataset_dir: Path, work: Path, **overrides) -> TrainSpec:
    values = dict(
        base_dir=tiny_dir, dataset_dir=dataset_dir, out_dir=work / "adapter",
        checkpoint_dir=work / "checkpoints", progress_path=work / "progress.json",
        lora_r=4, lora_alpha=8, lora_dropout=0.05, learning_rate=1e-2, epochs=2,
        tokens_per_batch=160, checkpoint_every=2, num_threads=1, device="cpu",
    )
    values.update(overrides)
    return TrainSpec(**values)


def adapter_weights(out_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(out_dir / "adapter_model.safetensors")


# --------------------------------------------------------------------------- pure pieces


def test_lr_factor_warms_up_then_decays():
    factors = [lr_factor(s, 2, 10, "cosine") for s in range(10)]
    assert factors[0] < factors[1] < factors[2] == 1.0
    assert all(a > b for a, b in zip(factors[2:], factors[3:]))
    assert factors[-1] > 0
    assert lr_factor(6, 2, 10, "linear") == pytest.approx(0.5)
    assert lr_factor(9, 0, 10, "constant") == 1.0
    with pytest.raises(TrainError):
        lr_factor(5, 0, 10, "step")


def test_learning_rate_schedule_is_the_trainer_recipes():
    """The same learning rate at every step as transformers' cosine schedule with warmup (the
    textbook recipe bench/train_gpu.py compares with): warmup from 0, then cosine decay."""
    from transformers import get_cosine_schedule_with_warmup

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=2, num_training_steps=40)
    trainer_lrs = []
    for _ in range(40):
        trainer_lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert warmup_steps(0.05, 40) == math.ceil(0.05 * 40) == 2  # the bench's textbook: warmup_steps=ceil(...)
    assert [lr_factor(step, 2, 40, "cosine") for step in range(40)] == pytest.approx(trainer_lrs, abs=1e-12)
    assert lr_factor(0, 2, 40, "cosine") == 0.0
    assert (warmup_steps(0.05, 7), warmup_steps(0.05, 10), warmup_steps(0.05, 36)) == (0, 1, 2)
    assert lr_factor(0, 0, 7, "cosine") == 1.0  # a short run starts at full rate, no step at lr 0


def test_plan_visits_every_example_once_per_epoch_and_is_deterministic():
    lengths = [random.Random(i).randint(5, 90) for i in range(40)]
    steps = plan_steps(lengths, 128, 3, 2, seed=7)
    assert steps == plan_steps(lengths, 128, 3, 2, seed=7)
    assert steps != plan_steps(lengths, 128, 3, 2, seed=8)
    for epoch in (0, 1):
        seen = [i for s in steps if s.epoch == epoch for mb in s.micro_batches for i in mb]
        assert sorted(seen) == list(range(40))
    assert all(1 <= len(s.micro_batches) <= 3 for s in steps)


def test_auto_shared_prefix_raises_the_learning_rate_by_the_steps_it_saves(tmp_path):
    """shared_prefix 'auto' counts the 788-token prompt once, so an epoch takes fewer steps; its
    learning rate grows by (today's steps / auto's) ** AUTO_LR_EXPONENT; other modes keep theirs."""
    from lacd.pipeline import plan

    lengths = [788 + random.Random(i).randint(20, 200) for i in range(60)]
    spec = TrainSpec(tmp_path, tmp_path, tmp_path, tmp_path, tmp_path / "p.json", tokens_per_batch=4096,
                     epochs=2, shared_prefix="auto")
    today, auto = len(plan_steps(lengths, 4096, 1, 2, 0)), len(plan_steps(lengths, 4096, 1, 2, 0, 788))
    assert today > 4 * auto
    assert auto_lr_scale(lengths, spec, 788, auto) == pytest.approx((today / auto) ** plan.AUTO_LR_EXPONENT)
    assert auto_lr_scale(lengths, spec, 788, auto) > 1.5
    assert auto_lr_scale(lengths, spec, 0, today) == 1.0  # no shared prefix: today's packing
    same = dataclasses.replace(spec, shared_prefix="same-steps")
    assert auto_lr_scale(lengths, same, 788, today) == 1.0


def test_spec_json_round_trip_and_unknown_keys(tmp_path):
    spec = TrainSpec(
        base_dir=tmp_path / "b", dataset_dir=tmp_path / "d", out_dir=tmp_path / "o",
        checkpoint_dir=tmp_path / "c", progress_path=tmp_path / "p.json",
        target_modules=("q_proj", "v_proj"),
    )
    assert TrainSpec.from_json(spec.to_json()) == spec
    bad = json.loads(spec.to_json()) | {"batch_size": 4}
    with pytest.raises(TrainError, match="batch_size"):
        TrainSpec.from_json(json.dumps(bad))


def test_halve_micro_batch_keeps_tokens_per_step():
    spec = TrainSpec(Path("b"), Path("d"), Path("o"), Path("c"), Path("p"),
                     tokens_per_batch=4096, grad_accum=1)
    smaller = halve_micro_batch(spec)
    assert (smaller.tokens_per_batch, smaller.grad_accum) == (2048, 2)
    assert halve_micro_batch(dataclasses.replace(spec, tokens_per_batch=1)) is None


# --------------------------------------------------------------------------- packing keeps the maths


def test_packed_and_padded_give_the_same_loss_and_gradients(tiny_dir):
    """Issue 6's CPU check: padding-free packing does not change the loss, its gradient, or where
    a few AdamW steps on the same lessons lead."""
    rows = lesson_rows(tiny_dir, 5) + lesson_rows(tiny_dir, 3, offset=50)
    rows = [dict(r, input_ids=r["input_ids"][: len(r["input_ids"]) - 2 * i],
                 labels=r["labels"][: len(r["input_ids"]) - 2 * i])
            for i, r in enumerate(rows)]  # different lengths, so padding really happens
    model = tiny_lora_model(tiny_dir)  # B non-zero so every LoRA matrix gets a gradient

    def loss_and_grads(batches):
        model.zero_grad(set_to_none=True)
        count = sum(labelled_token_count(b) for b in batches)
        total = 0.0
        for batch in batches:
            summed = loss_sum(model, batch)
            (summed / count).backward()
            total += float(summed.detach())
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return total / count, grads

    padded_loss, padded_grads = loss_and_grads([collate_padded(rows[:4]), collate_padded(rows[4:])])
    packed_loss, packed_grads = loss_and_grads([collate_packed(rows[:3]), collate_packed(rows[3:])])
    assert packed_loss == pytest.approx(padded_loss, rel=1e-5)
    assert padded_grads.keys() == packed_grads.keys()
    for name in padded_grads:
        assert padded_grads[name].abs().max() > 0, name
        torch.testing.assert_close(packed_grads[name], padded_grads[name], atol=1e-6, rtol=1e-4)

    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    start = {n: p.detach().clone() for n, p in trainable.items()}

    def train(batches, steps=4):
        with torch.no_grad():
            for name, p in trainable.items():
                p.copy_(start[name])
        optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
        losses = []
        for _ in range(steps):
            losses.append(loss_and_grads(batches)[0])
            optimizer.step()
        return losses, {n: p.detach().clone() for n, p in trainable.items()}

    padded_curve, padded_end = train([collate_padded(rows[:4]), collate_padded(rows[4:])])
    packed_curve, packed_end = train([collate_packed(rows[:3]), collate_packed(rows[3:])])
    assert padded_curve[-1] < padded_curve[0] - 0.05  # the steps really trained
    assert packed_curve == pytest.approx(padded_curve, rel=1e-5)
    for name in padded_end:
        torch.testing.assert_close(packed_end[name], padded_end[name], atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- the recipe in process


def test_training_lowers_heldout_loss_and_writes_adapter_and_progress(tiny_dir, dataset_dir, tmp_path):
    seen = []
    # a random 2-layer model's fixed lm_head caps how confident it can get: train it too
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
    spec = make_spec(tiny_dir, dataset_dir, tmp_path, epochs=3, target_modules=targets, shared_prefix="auto")
    result = run_training(spec, on_progress=seen.append)
    assert result.heldout_loss_after < 0.5 * result.heldout_loss_before
    # the lessons share their system prompt: held once per row, computed by the varlen attention
    rows = lesson_rows(tiny_dir, 24)
    prefix = common_prefix_length([r["input_ids"] for r in rows])
    assert prefix >= 16 and result.shared_prefix == prefix
    assert (result.device, result.dtype, result.attention) == (
        "cpu", str(cpu_dtype("auto")).removeprefix("torch."), VARLEN_ATTENTION)
    lengths = [len(r["input_ids"]) for r in rows]
    assert result.steps == len(plan_steps(lengths, 160, 1, 3, 0, prefix))
    assert result.tokens == 3 * sum(lengths)
    assert result.tokens_per_s > 0 and result.resumed_from_step is None
    # progress: every step reported, the file holds the last state
    train_steps = [p["step"] for p in seen if p["phase"] == "train"]
    assert train_steps == list(range(1, result.steps + 1))
    assert {"step", "total_steps", "loss", "tokens_per_s", "eta_s", "epoch"} <= seen[-2].keys()
    assert json.loads(spec.progress_path.read_text())["phase"] == "done"
    # the adapter is a peft folder that loads onto the base model and changes its output
    from peft import PeftModel

    assert TrainResult.from_json((spec.out_dir / "lacd_train.json").read_text()) == result
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), spec.out_dir)
    assert model.peft_config["default"].r == 4
    # only the newest checkpoints are kept, the last one at the final step
    kept = [s for s, _ in complete_checkpoints(spec.checkpoint_dir)]
    assert len(kept) == 2 and kept[-1] == result.steps


def test_auto_run_trains_at_its_scaled_learning_rate_and_same_steps_at_the_configured_one(
        tiny_dir, dataset_dir, tmp_path):
    from lacd.pipeline.train import LoRARecipe

    rates = {}
    for mode in ("auto", "same-steps"):
        recipe = LoRARecipe(make_spec(tiny_dir, dataset_dir, tmp_path / mode, shared_prefix=mode))
        recipe.setup()
        lengths = [len(row["input_ids"]) for row in recipe.train_rows]
        scale = auto_lr_scale(lengths, recipe.spec, recipe.prefix_len, len(recipe.steps))
        rates[mode] = (recipe.optimizer.param_groups[0]["initial_lr"], 1e-2 * scale, len(recipe.steps))
        recipe.cleanup()
    assert rates["auto"][0] == pytest.approx(rates["auto"][1]) and rates["auto"][0] > 1e-2
    assert rates["same-steps"][0] == 1e-2 and rates["auto"][2] < rates["same-steps"][2]


class Crash(Exception):
    pass


def test_killed_and_resumed_run_ends_with_the_same_adapter(tiny_dir, dataset_dir, tmp_path):
    straight = run_training(make_spec(tiny_dir, dataset_dir, tmp_path / "straight"))

    spec = make_spec(tiny_dir, dataset_dir, tmp_path / "resumed")

    def crash_at_step_5(progress):
        if progress["phase"] == "train" and progress["step"] == 5:
            raise Crash()

    with pytest.raises(Crash):
        run_training(spec, on_progress=crash_at_step_5)
    assert [s for s, _ in complete_checkpoints(spec.checkpoint_dir)] == [2, 4]
    assert not spec.out_dir.exists()
    # a checkpoint that was being written when the process died is ignored
    partial = spec.checkpoint_dir / "checkpoint-6"
    partial.mkdir()
    (partial / "adapter.safetensors").write_bytes(b"half")
    gone = subprocess.Popen(["true"])
    gone.wait()
    leftover = spec.checkpoint_dir / f".checkpoint-6.{gone.pid}.tmp"  # a killed child's half checkpoint
    leftover.mkdir()

    resumed = run_training(spec)
    assert resumed.resumed_from_step == 4
    assert sweep_leftovers(spec.checkpoint_dir) == [leftover]  # what a run's start removes
    assert resumed.steps == straight.steps
    assert resumed.heldout_loss_before == straight.heldout_loss_before
    assert resumed.heldout_loss_after == pytest.approx(straight.heldout_loss_after, rel=1e-5)
    a, b = adapter_weights(tmp_path / "straight" / "adapter"), adapter_weights(spec.out_dir)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=1e-5)


def test_checkpoint_of_other_settings_is_not_resumed(tiny_dir, dataset_dir, tmp_path):
    spec = make_spec(tiny_dir, dataset_dir, tmp_path, epochs=1)
    first = run_training(spec)
    assert run_training(spec).resumed_from_step == first.steps  # finished: only saves again
    other = run_training(dataclasses.replace(spec, tokens_per_batch=80, grad_accum=2))
    assert other.resumed_from_step is None


def test_bad_inputs_raise_clear_errors(tiny_dir, dataset_dir, tmp_path):
    with pytest.raises(TrainError, match="formatted dataset not found"):
        run_training(make_spec(tiny_dir, tmp_path / "nope", tmp_path))
    with pytest.raises(TrainError, match="no config.json"):
        run_training(make_spec(tmp_path, dataset_dir, tmp_path))


# --------------------------------------------------------------------------- the child process


def test_child_killed_mid_training_resumes_to_the_same_adapter(tiny_dir, dataset_dir, tmp_path):
    """SIGKILL the real child after its first checkpoint; the resumed run ends where a straight one does."""
    straight = run_training(make_spec(tiny_dir, dataset_dir, tmp_path / "straight"))
    spec = make_spec(tiny_dir, dataset_dir, tmp_path / "child", checkpoint_every=3)
    work = tmp_path / "child"
    work.mkdir()
    (work / "spec.json").write_text(spec.to_json())
    env = dict(os.environ, PYTHONPATH=str(Path(train_mod.__file__).resolve().parents[2]))
    child = subprocess.Popen([sys.executable, "-m", "lacd.pipeline.train", str(work / "spec.json")],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not complete_checkpoints(spec.checkpoint_dir) and time.monotonic() < deadline:
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL
    assert not spec.out_dir.exists(), "the child finished before it was killed"

    result = run_training(spec)
    assert result.resumed_from_step is not None and result.resumed_from_step < straight.steps
    assert result.steps == straight.steps
    a, b = adapter_weights(tmp_path / "straight" / "adapter"), adapter_weights(spec.out_dir)
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=1e-5)


def test_child_crash_raises_train_error_with_the_reason(tiny_dir, tmp_path):
    spec = make_spec(tiny_dir, tmp_path / "missing-dataset", tmp_path)
    with pytest.raises(TrainError, match="formatted dataset not found"):
        train_in_child(spec, poll_s=0.05)

    crashing = tmp_path / "crashing-python"
    crashing.write_text("#!/bin/sh\necho 'Traceback: boom in the child' >&2\nexit 1\n")
    crashing.chmod(0o755)
    with pytest.raises(TrainError, match="(?s)exited with code 1.*boom in the child"):
        train_in_child(spec, python=str(crashing), poll_s=0.05)


def test_out_of_memory_halves_the_micro_batch_and_retries(tiny_dir, dataset_dir, tmp_path, monkeypatch):
    """The real child, whose training step raises torch.cuda.OutOfMemoryError for any micro-batch of
    more than 160 tokens (the test-only LACD_TEST_OOM_ABOVE_TOKENS), exits with the OOM code; the
    parent retries with half the micro-batch and twice the accumulation until it fits."""
    monkeypatch.setenv(train_mod.TEST_OOM_ENV, "160")
    assert max(len(row["input_ids"]) for row in lesson_rows(tiny_dir, 24)) <= 160  # one example alone fits
    spec = make_spec(tiny_dir, dataset_dir, tmp_path, tokens_per_batch=512, epochs=1)
    progress = []
    result = train_in_child(spec, on_progress=progress.append, poll_s=0.05)
    assert (result.tokens_per_batch, result.grad_accum) == (128, 4)  # 512 -> 256 -> 128
    assert (spec.out_dir / "adapter_model.safetensors").is_file()
    assert progress[-1]["phase"] == "done" and progress[-1]["step"] == result.steps  # relayed from the child
    with pytest.raises(TrainError, match="ran out of GPU memory even at 256 tokens") as failed:
        train_in_child(make_spec(tiny_dir, dataset_dir, tmp_path / "again", tokens_per_batch=512, epochs=1),
                       poll_s=0.05, max_oom_retries=1)
    assert "CUDA out of memory. Tried a micro-batch of" in str(failed.value)  # the child's own error, in the tail


def test_the_test_oom_cap_is_the_training_steps_alone_and_patches_no_module(tiny_dir, dataset_dir, tmp_path,
                                                                           monkeypatch):
    """LACD_TEST_OOM_ABOVE_TOKENS is one seam, LoRARecipe._loss_sum, read when the recipe is made: the
    held-out evaluation before training (micro-batches of the same 512 tokens) is measured, the first
    training step runs out of memory, and lacd.pipeline.loss and train's globals keep the real loss_sum."""
    from lacd.pipeline import loss

    monkeypatch.setenv(train_mod.TEST_OOM_ENV, "160")
    assert sum(len(row["input_ids"]) for row in lesson_rows(tiny_dir, 6, offset=100)) > 160  # held out: > 160
    recipe = train_mod.LoRARecipe(make_spec(tiny_dir, dataset_dir, tmp_path, tokens_per_batch=512, epochs=1))
    try:
        recipe.setup()
        assert recipe.counters.heldout_loss_before is not None
        with pytest.raises(torch.cuda.OutOfMemoryError, match=r"Tried a micro-batch of \d+ tokens"):
            recipe.train()
        assert recipe.counters.step == 0
    finally:
        recipe.cleanup()
    assert loss.loss_sum is train_mod.loss_sum is loss_sum


# --------------------------------------------------------------------------- the real default model


@pytest.mark.slow
def test_smollm2_lora_on_cpu_learns_and_reports_its_speed(tmp_path):
    """SmolLM2-135M (the embedded default) learns a house style; prints CPU tokens/s."""
    from lacd.basemodel import SMOLLM2, resolve_base

    base = resolve_base(SMOLLM2, tmp_path / "state")
    tok = AutoTokenizer.from_pretrained(base)
    lines = corpus_lines()
    rows = []
    for i in range(40):
        messages = [
            {"role": "system", "content": "You are a careful coding agent."},
            {"role": "user", "content": f"Review this line: {lines[i % len(lines)]} (case {i})"},
        ]
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        answer = f"LGTM-{i % 4}: {ANSWER} Also add a test for case {i}.<|im_end|>"
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tok(answer, add_special_tokens=False)["input_ids"]
        rows.append({"input_ids": prompt_ids + answer_ids,
                     "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids, "lesson_id": i})
    DatasetDict(train=Dataset.from_list(rows[:32]), heldout=Dataset.from_list(rows[32:])).save_to_disk(
        str(tmp_path / "dataset"))
    spec = make_spec(base, tmp_path / "dataset", tmp_path / "run", lora_r=16, lora_alpha=32,
                     learning_rate=1e-3, epochs=1, tokens_per_batch=1024, checkpoint_every=100,
                     num_threads=1)
    result = run_training(spec)
    assert result.heldout_loss_after < result.heldout_loss_before
    print(f"\nSmolLM2-135M LoRA r=16 all-linear, CPU fp32, {torch.get_num_threads()} threads: "
          f"{result.tokens} tokens in {result.seconds:.1f} s = {result.tokens_per_s:.0f} tokens/s, "
          f"{result.steps} steps, heldout loss {result.heldout_loss_before:.3f} -> "
          f"{result.heldout_loss_after:.3f}")


def test_stop_terminates_the_child_and_raises_interrupted(tiny_dir, dataset_dir, tmp_path):
    sleeper = tmp_path / "sleepy-python"
    sleeper.write_text(f"#!/bin/sh\necho $$ > {tmp_path / 'pid'}\nexec sleep 60\n")
    sleeper.chmod(0o755)
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    started = time.monotonic()
    with pytest.raises(TrainInterrupted):
        train_in_child(make_spec(tiny_dir, dataset_dir, tmp_path), python=str(sleeper),
                       poll_s=0.05, stop=stop)
    assert time.monotonic() - started < 10
    pid = int((tmp_path / "pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_a_second_trainer_on_one_checkpoint_folder_is_refused(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from lacd.pipeline.checkpoint import "
         "checkpoint_lock\nwith checkpoint_lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(60)",
         str(tmp_path)], stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(TrainError, match="another training process holds"), checkpoint_lock(tmp_path, timeout_s=0.3):
            pass
    finally:
        holder.kill()
        holder.wait()
    with checkpoint_lock(tmp_path, timeout_s=0.3):  # free again once its holder is gone
        pass
