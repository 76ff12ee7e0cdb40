"""The training child steps aside on request: checkpoint at the next step boundary, exit, and a
resumed run ends with the adapter bit-identical to an uninterrupted one."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

from lacd.pipeline.checkpoint import complete_checkpoints
from lacd.pipeline.train import TrainYielded, run_training, train_in_child
from test_evaluate import tiny  # noqa: F401 - fixture
from test_train import _one_thread, adapter_weights, dataset_dir, make_spec, tiny_dir  # noqa: F401 - fixtures


def test_a_paused_child_checkpoints_its_step_exits_and_resumes_bit_identical(tiny_dir, dataset_dir, tmp_path):
    straight = run_training(make_spec(tiny_dir, dataset_dir, tmp_path / "straight", checkpoint_every=1000))
    spec = make_spec(tiny_dir, dataset_dir, tmp_path / "paused", checkpoint_every=1000)  # only pauses checkpoint
    pause = threading.Event()
    seen = []

    def on_progress(progress):
        seen.append(progress.get("step"))
        if progress.get("phase") == "train" and progress["step"] >= 3:
            pause.set()

    asked = time.monotonic()
    with pytest.raises(TrainYielded, match="checkpointed its last step"):
        train_in_child(spec, on_progress, poll_s=0.05, pause=pause, yield_s=60)
    took = time.monotonic() - asked
    steps = [s for s, _ in complete_checkpoints(spec.checkpoint_dir)]
    assert len(steps) == 1 and 3 <= steps[0] < straight.steps, (steps, straight.steps, took)
    assert not spec.out_dir.exists()
    events = [json.loads(line) for line in (spec.checkpoint_dir / "child.log").read_text().splitlines() if line.startswith("{")]
    assert events[-1]["event"] == "train_paused" and events[-1]["step"] == steps[0]  # os._exit came after the flush

    resumed = train_in_child(spec, poll_s=0.05)
    assert resumed.resumed_from_step == steps[0]
    a, b = adapter_weights(tmp_path / "straight" / "adapter"), adapter_weights(spec.out_dir)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_a_child_that_does_not_reach_a_step_boundary_is_ended_after_yield_s(tiny_dir, dataset_dir, tmp_path):
    sleeper = tmp_path / "sleepy-python"
    sleeper.write_text("#!/bin/sh\nexec sleep 60\n")  # never reads its pause line
    sleeper.chmod(0o755)
    pause = threading.Event()
    threading.Timer(0.3, pause.set).start()
    started = time.monotonic()
    with pytest.raises(TrainYielded, match="no step boundary within 0.8 s"):
        train_in_child(make_spec(tiny_dir, dataset_dir, tmp_path), python=str(sleeper), poll_s=0.05,
                       pause=pause, yield_s=1)
    assert time.monotonic() - started < 30


def test_evaluation_steps_aside_the_same_way(tiny, tmp_path):
    """The evaluate stage's child is ended on a pause request; the stage is redone when idle again."""
    from lacd.pipeline.evaluate import EvalSpec, EvaluateInterrupted, ModelRef, evaluate_in_child, incumbent_ref

    spec = EvalSpec(base_dir=tiny["base"], dataset_dir=tiny["root"] / "dataset", family="chatml",
                    max_tokens=4, max_seq_len=256, device="cpu", threads=1)
    pause = threading.Event()
    threading.Timer(0.5, pause.set).start()
    started = time.monotonic()
    with pytest.raises(EvaluateInterrupted):
        evaluate_in_child(spec, tiny["cases"], ModelRef("coder:v1", adapter_dir=tiny["adapter"]),
                          incumbent_ref(None, None), tmp_path / "evaluation.json", pause=pause, poll_s=0.1)
    assert time.monotonic() - started < 15
    assert not (tmp_path / "evaluation.json").exists()


def test_slow_steps_are_checkpointed_by_time_so_an_ended_child_loses_little(tiny_dir, dataset_dir, tmp_path,
                                                                            monkeypatch):
    from lacd.pipeline import train as train_mod

    spec = make_spec(tiny_dir, dataset_dir, tmp_path / "timed", checkpoint_every=1000, epochs=1)
    monkeypatch.setattr(train_mod, "CHECKPOINT_MAX_S", -1.0)  # every step is "overdue"
    result = run_training(spec)
    assert [s for s, _ in complete_checkpoints(spec.checkpoint_dir)] == [result.steps - 1, result.steps]
    monkeypatch.setattr(train_mod, "CHECKPOINT_MAX_S", 3600.0)
    again = make_spec(tiny_dir, dataset_dir, tmp_path / "steps", checkpoint_every=1000, epochs=1)
    assert [s for s, _ in complete_checkpoints(run_training(again) and again.checkpoint_dir)] == [result.steps]


def test_a_step_longer_than_yield_s_is_ended_and_loses_only_that_step(tiny_dir, dataset_dir, tmp_path, monkeypatch):
    """Steps of 3 s against yield_s = 1 s: the child checkpoints after every such long step, the pause
    cannot wait for the step in flight, so the child is SIGKILLed; the newest checkpoint is the last
    finished step, and resuming from it ends with the uninterrupted run's adapter, bit for bit."""
    from lacd.pipeline import train as train_mod

    straight = run_training(make_spec(tiny_dir, dataset_dir, tmp_path / "straight", checkpoint_every=1000))
    spec = make_spec(tiny_dir, dataset_dir, tmp_path / "long", checkpoint_every=1000)
    monkeypatch.setenv(train_mod.TEST_SLOW_STEP_ENV, "3")
    pause = threading.Event()
    finished = []

    def on_progress(progress):
        if progress.get("phase") == "train":
            finished.append(progress["step"])

    def pause_inside_step_3():  # not at step 2's progress: the child may still be writing step 2's
        for _ in range(3000):  # checkpoint, then it meets the boundary and exits in time (76, nothing lost)
            if any(step >= 2 for step, _ in complete_checkpoints(spec.checkpoint_dir)):
                time.sleep(0.3)  # past the boundary check: inside step 3's 3 s
                return pause.set()
            time.sleep(0.01)

    threading.Thread(target=pause_inside_step_3, daemon=True).start()
    with pytest.raises(TrainYielded, match="no step boundary within 0.8 s"):
        train_in_child(spec, on_progress, poll_s=0.05, pause=pause, yield_s=1)
    steps = [s for s, _ in complete_checkpoints(spec.checkpoint_dir)]
    assert steps and steps[-1] == max(finished) == 2, (steps, finished)  # every finished step is kept

    monkeypatch.delenv(train_mod.TEST_SLOW_STEP_ENV)
    resumed = train_in_child(spec, poll_s=0.05)
    assert resumed.resumed_from_step == 2
    a, b = adapter_weights(tmp_path / "straight" / "adapter"), adapter_weights(spec.out_dir)
    assert a.keys() == b.keys() and straight.steps == resumed.steps
    assert all(torch.equal(a[name], b[name]) for name in a)
