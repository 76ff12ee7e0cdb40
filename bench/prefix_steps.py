"""Benchmark: where a shared-prefix step's time goes, step by step (issue 14).

    PYTHONPATH=daemon python3 bench/prefix_steps.py [--modes off,same-steps,auto] [--steps 10] [--tiny]

bench/train_gpu.py's model (CodeLlama-7B shape, random bf16 weights on the GPU) and lessons (a
788-token system prompt + own tokens of median 90, 240 of them), trained by the train stage's
LoRARecipe with each [train] shared_prefix mode for its first --steps optimizer steps. Prints each
step's wall time (synchronized), lessons and real row tokens, and a torch.profiler table (CUDA
kernel time, or CPU time on the CPU) of the second-to-last step: a step whose kernel time is far
below its wall time is bound by the host's launches. Run with TORCH_LOGS=recompiles to see
FlexAttention's compiles. --tiny runs a 2-layer model on the CPU (a smoke test).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path[:0] = [str(ROOT.parent / "daemon"), str(ROOT)]

import train_gpu  # noqa: E402  (the model and lesson builders)

from lacd.pipeline.plan import choose_device  # noqa: E402
from lacd.pipeline.train import LoRARecipe, TrainSpec  # noqa: E402

PROMPT = train_gpu.SYSTEM_PROMPT_TOKENS


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def profiled_step(recipe: LoRARecipe, planned, device: torch.device) -> None:
    """One optimizer step under torch.profiler; prints the ops by self time on the device."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        recipe._optimizer_step(planned)
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=20), flush=True)


def run_mode(mode: str, base: torch.nn.Module, dataset: Path, work: Path, max_len: int, steps: int,
             device: torch.device) -> None:
    folder = work / mode
    spec = TrainSpec(base_dir=work / "base-not-read", dataset_dir=dataset, out_dir=folder / "adapter",
                     checkpoint_dir=folder / "checkpoints", progress_path=folder / "progress.json",
                     lora_r=train_gpu.LORA_R, lora_alpha=train_gpu.LORA_ALPHA, learning_rate=train_gpu.LR,
                     epochs=1, warmup_ratio=train_gpu.WARMUP, tokens_per_batch=max_len, max_seq_len=max_len,
                     device=device.type, shared_prefix=mode, checkpoint_every=0)
    recipe = LoRARecipe(spec, base_model=base)
    recipe.setup()
    records = []
    count = min(steps, len(recipe.steps))
    for index in range(count):
        planned = recipe.steps[index]
        sync(device)
        started = time.perf_counter()
        if index == count - 2:
            profiled_step(recipe, planned, device)
        else:
            recipe._optimizer_step(planned)
        sync(device)
        rows = [recipe._collate([recipe.train_rows[i] for i in group]) for group in planned.micro_batches]
        records.append(dict(step=index, s=round(time.perf_counter() - started, 3),
                            lessons=sum(len(group) for group in planned.micro_batches),
                            row_tokens=sum(int(row["input_ids"].numel()) for row in rows),
                            profiled=index == count - 2))
    print(json.dumps(dict(mode=mode, steps_in_epoch=len(recipe.steps), records=records)), flush=True)
    recipe.model.unload()
    recipe.cleanup()
    train_gpu.reset_base(base)
    train_gpu.free_memory()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modes", default="off,same-steps,auto")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lessons", type=int, default=240)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    device, dtype = choose_device("cpu" if args.tiny else "auto")
    shape, max_len = (train_gpu.TINY, 256) if args.tiny else (train_gpu.CODELLAMA_7B, 4096)
    if args.tiny:
        torch.set_num_threads(2)
    prompt = min(PROMPT, max_len // 2)
    lessons = train_gpu.make_lessons(args.lessons + 16, 0, shape["vocab_size"], train_gpu.SYSTEM_PROMPT_OWN_MEDIAN,
                                     max_len - prompt)
    lessons = train_gpu.with_system_prompt(lessons, prompt, shape["vocab_size"], 0)
    base = train_gpu.build_base(shape, device, dtype)
    with tempfile.TemporaryDirectory(prefix="lacd-prefix-steps-") as work:
        dataset = train_gpu.write_dataset(Path(work) / "dataset", lessons[: args.lessons], lessons[args.lessons:])
        for mode in args.modes.split(","):
            run_mode(mode, base, dataset, Path(work), max_len, args.steps, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
