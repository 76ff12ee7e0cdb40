"""Training on several processes (torchrun + FSDP2): devices, the gloo proof, a killed rank.

The CPU proof of issue 16: two gloo processes train the tiny model with the same global batch
as one process (paused and resumed on the way), and the adapter and the GGUF are the same; their checkpoints (gathered, in the
one-device layout) resume on one process; a rank killed by SIGKILL ends the attempt (torchrun
ends the other rank) and the run resumes from its last checkpoint on two ranks again.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from lacd import config
from lacd.export import export_gguf
from lacd.pipeline import distributed
from lacd.pipeline import train as train_mod
from lacd.pipeline.checkpoint import complete_checkpoints
from lacd.pipeline.train import run_training, train_in_child
from lacd.pipeline.trainspec import TrainError, TrainResult, TrainYielded
from test_train import dataset_dir, make_spec, tiny_dir  # noqa: F401  (module-scoped fixtures, shared)

# dropout 0: a rank draws its own dropout masks, so only then are the runs the same maths;
# three micro-batches a step: rank 0 takes two, rank 1 one and a zero-weighted pass; fp32 (a CPU
# with native bf16 trains in bf16 by default, where another reduction order is not within fp32 rounding)
SAME_BATCH = dict(lora_dropout=0.0, tokens_per_batch=80, grad_accum=3, base_precision="float32")
# the gradients are summed in the one-device order ((g1 + g2) + g3), so in practice the adapters
# are bit-identical; the tolerance allows fp32 rounding of a different reduction order
ATOL, RTOL = 1e-6, 1e-5


@pytest.fixture(scope="module")
def one_device(tiny_dir, dataset_dir, tmp_path_factory) -> Path:
    """The reference: one process, the same global batch."""
    work = tmp_path_factory.mktemp("one")
    run_training(make_spec(tiny_dir, dataset_dir, work, **SAME_BATCH))
    return work


def assert_same_adapter(a_dir: Path, b_dir: Path) -> None:
    a, b = (load_file(d / "adapter_model.safetensors") for d in (a_dir, b_dir))
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=ATOL, rtol=RTOL)


# --------------------------------------------------------------------------- pure pieces


@pytest.mark.parametrize("requested, gpus, fits, accum, expected", [
    ("auto", 0, True, 4, 1),    # the CPU: auto never starts several processes
    ("auto", 1, False, 4, 1),   # one GPU: the memory plan's choices (nf4, checkpointing) instead
    ("auto", 4, False, 1, 4),   # one card cannot hold it: every card
    ("auto", 4, True, 1, 1),    # it fits and a step is one micro-batch: nothing to share out
    ("auto", 4, True, 2, 2),    # two micro-batches a step: two cards
    ("auto", 2, True, 8, 2),
    ("3", 0, True, 1, 3),       # N gloo processes on the CPU
    (2, 4, True, 1, 2),
])
def test_choose_devices(requested, gpus, fits, accum, expected):
    assert distributed.choose_devices(requested, gpus, fits, accum) == expected


def test_more_devices_than_gpus_or_nonsense_is_refused():
    with pytest.raises(TrainError, match=r"devices = 3, but only 2 GPU\(s\) are visible"):
        distributed.choose_devices("3", 2, True, 1)
    with pytest.raises(ValueError):
        distributed.choose_devices("0", 2, True, 1)


def test_rounds_share_a_steps_micro_batches_and_pad_with_none():
    assert distributed.rounds(3, 0, 2) == [0, 2]
    assert distributed.rounds(3, 1, 2) == [1, None]
    assert distributed.rounds(1, 1, 2) == [None]
    assert sorted(i for r in range(4) for i in distributed.rounds(10, r, 4) if i is not None) == list(range(10))


def test_devices_config_key(tmp_path):
    assert config.load(env={}).train.devices == "auto"
    cfg = tmp_path / "c.toml"
    cfg.write_text("[train]\ndevices = 2\n")
    assert config.load(str(cfg), env={}).train.devices == "2"
    assert config.load(env={"LACD_TRAIN_DEVICES": "4"}).train.devices == "4"
    with pytest.raises(config.ConfigError, match=r"\[train\] devices: must be auto or a whole number >= 1"):
        config.load(env={"LACD_TRAIN_DEVICES": "all"})


def test_sharded_plan_gives_each_rank_its_share_of_the_base():
    from lacd.pipeline.memplan import GIB, PlanError, Shape, plan

    shape = Shape(hidden=8192, intermediate=22016, layers=48, heads=64, kv_heads=8, head_dim=128, vocab=32000)
    one = plan(shape, 78 * GIB, precision="bf16", tokens_per_batch=4096, longest=4096)  # CodeLlama-34B's shape
    two = distributed.sharded_memory_plan(shape, 78 * GIB, 2, 16, tokens_per_batch=4096, longest=4096)
    four = distributed.sharded_memory_plan(shape, 78 * GIB, 4, 16, tokens_per_batch=4096, longest=4096)
    assert two.available == 78 * GIB and two.precision == four.precision == "bf16"
    # half of ~63 GiB of weights off each card, then a quarter
    assert one.expected_peak - 33 * GIB < two.expected_peak < one.expected_peak - 28 * GIB
    assert two.expected_peak - 18 * GIB < four.expected_peak < two.expected_peak - 14 * GIB
    with pytest.raises(PlanError):  # two 24 GB cards hold half the weights but not the rest
        distributed.sharded_memory_plan(shape, 24 * GIB, 2, 16, tokens_per_batch=4096, longest=4096)


# --------------------------------------------------------------------------- two gloo processes


def test_two_gloo_processes_give_the_one_device_adapter_and_gguf(tiny_dir, dataset_dir, one_device, tmp_path):
    """Paused midway (both ranks checkpoint the step and exit), resumed, then compared."""
    spec = make_spec(tiny_dir, dataset_dir, tmp_path, devices=2, **SAME_BATCH)
    pause = threading.Event()

    def pause_at_step_3(progress):
        if progress["phase"] == "train" and progress["step"] >= 3:
            pause.set()

    with pytest.raises(TrainYielded, match="checkpointed its last step"):
        train_in_child(spec, on_progress=pause_at_step_3, pause=pause, poll_s=0.05, yield_s=60)
    result = train_in_child(spec, poll_s=0.05)
    assert 3 <= result.resumed_from_step < result.steps and result.devices == 2
    reference = TrainResult.from_json((one_device / "adapter" / "lacd_train.json").read_text())
    assert (result.steps, result.tokens, result.labelled_tokens) == (
        reference.steps, reference.tokens, reference.labelled_tokens)
    assert result.heldout_loss_after == pytest.approx(reference.heldout_loss_after, rel=RTOL)
    assert_same_adapter(one_device / "adapter", spec.out_dir)
    log = (spec.checkpoint_dir / "child.log").read_text()
    assert log.count('"train_setup"') == 2 and log.count('"train_resumed"') == 2, "two ranks resumed"
    progress = json.loads(spec.progress_path.read_text())
    assert progress["phase"] == "done" and progress["step"] == reference.steps
    a = export_gguf(tiny_dir, one_device / "adapter", tmp_path / "one.gguf", outtype="f32")
    b = export_gguf(tiny_dir, spec.out_dir, tmp_path / "two.gguf", outtype="f32")
    assert a.merged_tensors > 0 and a.path.read_bytes() == b.path.read_bytes()

    # its gathered checkpoints are the one-device layout: one process resumes one
    last_step, last = complete_checkpoints(spec.checkpoint_dir)[-1]
    shutil.rmtree(last)
    shutil.rmtree(spec.out_dir)
    resumed = run_training(make_spec(tiny_dir, dataset_dir, tmp_path, **SAME_BATCH))
    assert 0 < resumed.resumed_from_step < last_step
    assert_same_adapter(one_device / "adapter", spec.out_dir)


def _rank_process(launcher: psutil.Process, rank: str) -> psutil.Process | None:
    for child in launcher.children(recursive=True):
        try:
            if "lacd.pipeline.train" in child.cmdline() and child.environ().get("RANK") == rank:
                return child
        except psutil.NoSuchProcess:
            continue
    return None


def test_a_killed_rank_fails_the_attempt_and_the_run_resumes(
        tiny_dir, dataset_dir, one_device, tmp_path):
    spec = make_spec(tiny_dir, dataset_dir, tmp_path, devices=2, **SAME_BATCH)
    spec.checkpoint_dir.mkdir(parents=True)
    (spec.checkpoint_dir / "spec.json").write_text(spec.to_json())
    env = dict(os.environ, PYTHONPATH=str(Path(train_mod.__file__).resolve().parents[2]))
    launcher = subprocess.Popen(
        distributed.launch_command(sys.executable, 2, [str(spec.checkpoint_dir / "spec.json")]),
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    parent = psutil.Process(launcher.pid)
    deadline = time.monotonic() + 180
    while not complete_checkpoints(spec.checkpoint_dir) and time.monotonic() < deadline:
        time.sleep(0.005)
    victim, survivor = _rank_process(parent, "1"), _rank_process(parent, "0")
    assert victim is not None and survivor is not None
    victim.send_signal(signal.SIGKILL)
    _, stderr = launcher.communicate(timeout=120)
    assert launcher.returncode == -signal.SIGKILL
    assert f"rank 1 (pid {victim.pid}) was killed by SIGKILL; torchrun ended the other ranks" in stderr
    assert not survivor.is_running() or survivor.status() == psutil.STATUS_ZOMBIE
    assert not spec.out_dir.exists(), "the ranks finished before one was killed"

    resumed = train_in_child(spec, poll_s=0.05)  # two ranks again, each restoring its shards
    assert resumed.resumed_from_step is not None and 0 < resumed.resumed_from_step < resumed.steps
    assert_same_adapter(one_device / "adapter", spec.out_dir)
