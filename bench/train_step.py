"""Benchmark: one or more real training steps of a run's dataset, timed in the train stage's recipe (issue 14).

    PYTHONPATH=daemon python bench/train_step.py --state STATE --run N [--steps 1,2] [--threads 2]
        [--shared-prefix auto] [--base-precision auto] [--checkpointing auto] [--profile]

Builds the train stage's LoRARecipe (lacd.pipeline.train) on STATE/runs/N/dataset with the base model
folder under STATE/models (what `lacd train` converted), at the defaults except the options, skips the
held-out evaluation, then times `_optimizer_step` of each planned step index in --steps (0-based).
Prints per step: wall and CPU seconds, lessons, tokens counted as today and real tokens (the shared
prefix once per row), the loss, the process's peak RSS; --profile prints torch.profiler's table of the
last step. The numbers of README's "Fixed the session after" CPU step table come from it.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "daemon")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state", required=True, help="a state folder whose run was formatted by lacd train")
    parser.add_argument("--run", type=int, default=1)
    parser.add_argument("--steps", default="1", help="planned step indexes (0-based), comma-separated")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shared-prefix", default="auto")
    parser.add_argument("--base-precision", default="auto")
    parser.add_argument("--checkpointing", default="auto", help="[train] gradient_checkpointing")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()

    import lacd.pipeline.train as train

    train.evaluate = lambda *a, **k: 0.0  # the held-out loss before training is not what is timed
    state = Path(args.state)
    base = next(p.parent for p in sorted((state / "models").glob("*/config.json")))
    work = Path(tempfile.mkdtemp(prefix="lacd-train-step-"))
    spec = train.TrainSpec(
        base_dir=base, dataset_dir=state / "runs" / str(args.run) / "dataset", out_dir=work / "adapter",
        checkpoint_dir=work / "checkpoints", progress_path=work / "progress.json", num_threads=args.threads,
        shared_prefix=args.shared_prefix, base_precision=args.base_precision, checkpoint_every=0,
        gradient_checkpointing=args.checkpointing,
    )
    recipe = train.LoRARecipe(spec)
    recipe.setup()
    print(f"{len(recipe.steps)} steps, prefix {recipe.prefix_len}, dtype {recipe.dtype}, checkpointed layers "
          f"{recipe.checkpointed_layers}, load {os.getloadavg()[0]:.2f}", flush=True)
    indexes = [int(s) for s in args.steps.split(",")]
    for index in indexes:
        planned = recipe.steps[index]
        lengths = [len(recipe.train_rows[i]["input_ids"]) for group in planned.micro_batches for i in group]
        real = recipe.prefix_len * len(planned.micro_batches) + sum(n - recipe.prefix_len for n in lengths)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu = usage.ru_utime + usage.ru_stime
        started = time.perf_counter()
        if args.profile and index == indexes[-1]:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                loss, _, _ = recipe._optimizer_step(planned)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        else:
            loss, _, _ = recipe._optimizer_step(planned)
        wall = time.perf_counter() - started
        usage = resource.getrusage(resource.RUSAGE_SELF)
        print(f"step {index}: {wall:.1f} s (cpu {usage.ru_utime + usage.ru_stime - cpu:.1f} s), {len(lengths)} "
              f"lessons, {sum(lengths)} tokens as today, {real} real, loss {loss:.4f}, peak RSS "
              f"{usage.ru_maxrss / 2**20:.2f} GiB, load {os.getloadavg()[0]:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
