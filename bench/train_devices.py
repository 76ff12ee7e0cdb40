"""Benchmark (issue 16): the train stage on N GPUs of one host (torchrun + FSDP2) against one GPU.

    PYTHONPATH=daemon python3 bench/train_gpu.py --devices 2,4 [--shapes 7B,34B] [--lessons 64] \\
        [--grad-accum 8] [--out devices.json]
    PYTHONPATH=daemon python3 bench/train_gpu.py --devices 2 --tiny    # CPU, gloo, 2-layer: a smoke test

For each shape (CodeLlama-7B's, CodeLlama-34B's: random bf16 weights, seed 0, no download) the
same lessons (agent-log lengths: median ~600 tokens, cut at 4096) and the same spec (tokens_per_batch
4096, grad_accum --grad-accum, lora_dropout 0.05, one epoch, compile off on every count: the
sharded recipe does not compile under 'auto') train once on 1 GPU and once on each N, each in its
own elastic launch (torchrun --standalone's settings, fresh processes). Every rank builds the base
(on the GPU for one rank, on the host for several: fully_shard moves each rank's shard to its GPU)
and runs lacd.pipeline.distributed.ShardedRecipe (LoRARecipe for one rank): the daemon's own code.
A step's grad_accum micro-batches are shared out N ways, so every count trains the same global batch.

Per run: steady tokens/s (after the first two steps: the first pays allocator warm-up), the ratio
to the 1-GPU run of the same shape, the peak memory of every GPU (max_memory_allocated of each
rank), the plan (memplan, per rank), held-out loss after the epoch, wall time. A run that fails
(out of memory, no plan) is reported with its error, the others go on: on one H100 the 34B shape
needs gradient checkpointing and ~71 of 78 GiB by the plan, where two cards need ~41 GiB each.
NVLink multicast stays off (lacd.pipeline.distributed.MULTICAST_OFF, set before each launch).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from lacd.pipeline import distributed
from lacd.pipeline.train import LoRARecipe, TrainSpec

GIB = 1 << 30


def rank_run(shape: dict, spec_json: str) -> dict | None:
    """One rank of one launch: build the base, train the spec, report rank 0's numbers."""
    import torch.distributed as dist

    from train_gpu import build_base  # noqa: PLC0415 - bench/ is on the spawned rank's sys.path

    rank, world = distributed.rank_and_world()
    spec = TrainSpec.from_json(spec_json)
    cuda = spec.device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    built = time.perf_counter()
    base = build_base(shape, torch.device("cuda" if cuda and world == 1 else "cpu"),
                      torch.bfloat16 if cuda else torch.float32)
    built = time.perf_counter() - built
    records: list[tuple[float, int]] = []

    def on_progress(progress: dict) -> None:
        if progress["phase"] == "train":
            records.append((time.perf_counter(), progress["tokens"]))

    recipe = (distributed.ShardedRecipe if world > 1 else LoRARecipe)(spec, on_progress, base_model=base)
    try:
        recipe.setup()
        recipe.train()
        result = recipe.save()  # None on ranks other than 0
        peak = round(torch.cuda.max_memory_allocated() / GIB, 2) if cuda else None
        peaks = [peak] * world
        if world > 1:
            dist.all_gather_object(peaks, peak)
        plan = recipe.plan.describe() if recipe.plan is not None else None
    finally:
        recipe.cleanup()
    if rank != 0:
        return None
    (t0, k0), (t1, k1) = records[min(2, len(records) - 2)], records[-1]
    return dict(devices=world, steps=result.steps, tokens=result.tokens, steady_tokens_per_s=round((k1 - k0) / (t1 - t0), 1),
                tokens_per_s=result.tokens_per_s, peak_gib_per_gpu=peaks, plan=plan,
                gradient_checkpointing=result.gradient_checkpointing, heldout_loss_after=result.heldout_loss_after,
                base_build_s=round(built, 1), device=torch.cuda.get_device_name(0) if cuda else "cpu")


def launch_run(devices: int, shape: dict, spec: TrainSpec) -> dict:
    """One elastic launch of `devices` ranks running rank_run; rank 0's numbers or the error."""
    from torch.distributed.launcher.api import elastic_launch

    started = time.perf_counter()
    try:
        returned = elastic_launch(distributed.launch_config(devices), rank_run)(shape, spec.to_json())
        row = returned[0]
    except Exception as exc:  # noqa: BLE001 - out of memory, no plan: reported, the next run goes on
        traceback.print_exc()
        row = dict(devices=devices, error=repr(exc)[:2000])
    row["wall_s"] = round(time.perf_counter() - started, 1)
    return row


def main(args: Any) -> int:
    """Run 1 GPU and each --devices count for each shape; print one JSON line per run and a table."""
    from train_gpu import CODELLAMA_7B, CODELLAMA_34B, TINY, make_lessons, write_dataset

    shapes = {"7B": CODELLAMA_7B, "34B": CODELLAMA_34B, "tiny": TINY}
    names = ["tiny"] if args.tiny else [s.strip() for s in args.shapes.split(",") if s.strip()]
    counts = [1, *[int(n) for n in str(args.devices).split(",")]]
    median, max_len = (60, 256) if args.tiny else (600, 4096)
    if not args.tiny:
        sharded_plans()
    work = Path(tempfile.mkdtemp(prefix="lacd-devices-bench-"))
    rows = []
    try:
        for name in names:
            shape = shapes[name]
            lessons = make_lessons(args.lessons + 4, args.seed, shape["vocab_size"], median, max_len)
            dataset = write_dataset(work / f"dataset-{name}", lessons[: args.lessons], lessons[args.lessons:])
            for count in counts:
                folder = work / f"{name}-{count}"
                spec = TrainSpec(
                    base_dir=work / "base-not-read", dataset_dir=dataset, out_dir=folder / "adapter",
                    checkpoint_dir=folder / "checkpoints", progress_path=folder / "progress.json",
                    epochs=1, tokens_per_batch=max_len, max_seq_len=max_len, grad_accum=args.grad_accum,
                    checkpoint_every=10_000, compile="off", devices=count, device="cpu" if args.tiny else "auto",
                    num_threads=2 if args.tiny else 0)
                print(f"\n=== {name} on {count} {'process(es)' if args.tiny else 'GPU(s)'}", flush=True)
                row = dict(shape=name, **launch_run(count, shape, spec))
                baseline = next((r for r in rows if r["shape"] == name and r["devices"] == 1 and "error" not in r), None)
                if baseline and "error" not in row:
                    row["speedup_vs_1"] = round(row["steady_tokens_per_s"] / baseline["steady_tokens_per_s"], 2)
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.out:
                    args.out.write_text(json.dumps(dict(torch=torch.__version__, rows=rows), indent=1))
                shutil.rmtree(folder, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n| shape | devices | steady tokens/s | vs 1 | peak GiB per GPU | plan | held-out after |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['devices']} | {r.get('steady_tokens_per_s', r.get('error', ''))} | "
              f"{r.get('speedup_vs_1', '')} | {r.get('peak_gib_per_gpu', '')} | {r.get('plan', '')} | "
              f"{r.get('heldout_loss_after', '')} |")
    return 0


def sharded_plans() -> None:
    """The memory plan per card of the 34B shape at 4096 tokens on 1, 2 and 4 H100s (no GPU needed)."""
    from train_gpu import CODELLAMA_34B
    from transformers import LlamaConfig

    from lacd.pipeline.memplan import PlanError, Shape, plan

    shape = Shape.of(LlamaConfig(**CODELLAMA_34B))
    for count in (1, 2, 4):
        try:
            chosen = (plan(shape, 78 * GIB, precision="bf16", tokens_per_batch=4096, longest=4096) if count == 1 else
                      distributed.sharded_memory_plan(shape, 78 * GIB, count, 16, tokens_per_batch=4096, longest=4096))
            print(f"34B on {count} x 78 GiB: {chosen.describe()}")
        except PlanError as exc:
            print(f"34B on {count} x 78 GiB: {exc}")

