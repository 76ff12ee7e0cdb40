"""Benchmark: lacd's train stage against the textbook Trainer + peft recipe, on a CodeLlama-7B shape.

    PYTHONPATH=daemon python bench/train_gpu.py [--variants textbook,lacd,...] [--lessons 160]
                                               [--out results.json] [--tiny]

One process builds a LlamaForCausalLM of CodeLlama-7B's shape (hidden 4096, 32 layers, 32 heads,
intermediate 11008, vocab 32016) with random bf16 weights on the GPU (no download), and lessons
whose token lengths follow agent logs (log-normal, median about 600, tail cut at max_seq_len 4096;
about a third of each lesson is the assistant's answer, the only labelled part). Every variant
trains the same lessons for one epoch with the same LoRA (r=16, alpha 32, all linear projections),
learning rate, cosine schedule and warmup, starting from the same base weights:

  textbook   HF Trainer + peft, batches of 4 padded to the longest, gradient checkpointing,
             lora_dropout 0.05, bf16 autocast, sdpa (what most people write);
  lacd-*     lacd.pipeline.train.LoRARecipe (the train stage itself, handed the built base model
             instead of a folder), with one speed lever changed at a time (VARIANTS below);
  lacd       the train stage with its defaults.

For each: trained (non-pad) tokens/s in steady state (steps after the first warm ones) and over
the whole epoch (compile and warm-up included), MFU = 4 x non-embedding parameters (decoder
layers and final norm: embed_tokens and lm_head excluded) x tokens/s / 989e12 (H100 SXM dense
bf16), peak GPU memory (torch.cuda.max_memory_allocated, weights included), the mean training
loss over the last quarter of the epoch's tokens and the held-out loss after the epoch (both
models measured by lacd's evaluate on the same held-out lessons). A markdown table is printed
last; --out writes every number and the per-step records as JSON.

--tiny runs the same code on a 2-layer model on the CPU in seconds (a smoke test, not a measurement).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import random
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "daemon"))

from lacd.pipeline.packing import IGNORE_INDEX  # noqa: E402
from lacd.pipeline.train import LoRARecipe, TrainSpec, choose_device, evaluate  # noqa: E402

H100_BF16_PEAK = 989e12
CODELLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=32, vocab_size=32016, max_position_embeddings=16384,
                    rope_theta=1_000_000.0, rms_norm_eps=1e-5)
TINY = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=512, max_position_embeddings=1024)

# Each lacd variant: (what it changes, TrainSpec overrides). "lacd-v0" is the train stage as it
# was before issue 6 (packed rows, but sdpa with a dense block mask, peft's fp32 adapter upcast,
# dropout 0.05); each later one changes one lever from the one before it.
BEFORE = dict(attention="sdpa", adapter_compute="float32", lora_dropout=0.05, gradient_checkpointing="off",
              compile="off", fused_kernels="off")
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "lacd-v0": ("packed rows, sdpa block mask, fp32 adapters, dropout 0.05", BEFORE),
    "lacd-varlen": ("+ varlen flash attention", BEFORE | dict(attention="auto")),
    "lacd-bf16": ("+ bf16 adapters (autocast)", BEFORE | dict(attention="auto", adapter_compute="auto")),
    "lacd-nodrop": ("+ lora_dropout 0", BEFORE | dict(attention="auto", adapter_compute="auto", lora_dropout=0.0)),
    "lacd-compile": ("+ torch.compile of the layers", BEFORE | dict(attention="auto", adapter_compute="auto",
                                                                    lora_dropout=0.0, compile="on")),
    "lacd-liger": ("lacd-nodrop + Liger RMSNorm/SwiGLU/RoPE", BEFORE | dict(
        attention="auto", adapter_compute="auto", lora_dropout=0.0, fused_kernels="liger")),
    "lacd": ("the train stage's defaults (compile from 1M tokens, Liger when installed)", {}),
    "lacd-gc": ("lacd-compile + gradient checkpointing", BEFORE | dict(
        attention="auto", adapter_compute="auto", lora_dropout=0.0, compile="on", gradient_checkpointing="on")),
}
EPOCHS, WARMUP, LORA_R, LORA_ALPHA = 1, 0.05, 16, 32
LR = 2e-4  # the daemon's default; --lr changes it


# --------------------------------------------------------------------------- lessons


def lesson_lengths(count: int, seed: int, median: int, max_len: int) -> list[int]:
    """Token lengths like the agent log's lessons: log-normal, median `median`, cut at max_len."""
    rng = random.Random(seed)
    return [max(32, min(max_len, int(rng.lognormvariate(math.log(median), 0.9)))) for _ in range(count)]


def make_lessons(count: int, seed: int, vocab: int, median: int, max_len: int) -> list[dict]:
    """Lessons of random but learnable tokens (Zipf unigrams, a bigram rule in the answers).

    The first two thirds or so are the prompt (system, user, tool outputs: labels -100), the
    rest the assistant's answer (labelled).
    """
    rng = random.Random(seed + 1)
    alphabet = min(vocab - 3, 2000)
    weights = [1.0 / (rank + 1) for rank in range(alphabet)]
    rows = []
    for length in lesson_lengths(count, seed, median, max_len):
        answer = max(8, int(length * rng.uniform(0.2, 0.45)))
        prompt = length - answer
        ids = [3 + t for t in rng.choices(range(alphabet), weights, k=prompt)]
        token = ids[-1]
        for _ in range(answer):
            token = 3 + (token * 7 + 13) % alphabet if rng.random() < 0.5 else 3 + rng.choices(
                range(alphabet), weights)[0]
            ids.append(token)
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return rows


def write_dataset(folder: Path, train: list[dict], heldout: list[dict]) -> Path:
    """The formatted dataset as the format stage writes it (datasets, train and heldout splits)."""
    from datasets import Dataset, DatasetDict

    DatasetDict(train=Dataset.from_list(train), heldout=Dataset.from_list(heldout)).save_to_disk(str(folder))
    return folder


# --------------------------------------------------------------------------- model


def build_base(shape: dict, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A random LlamaForCausalLM of the given shape, built directly on device in dtype."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(**shape, attn_implementation="sdpa", use_cache=False)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.train()


def non_embedding_params(model: torch.nn.Module) -> int:
    """Parameters of the decoder layers and final norm (embed_tokens and lm_head excluded)."""
    return sum(p.numel() for name, p in model.named_parameters()
               if "embed_tokens" not in name and "lm_head" not in name)


def reset_base(base: torch.nn.Module) -> None:
    """Undo what a variant did to the shared base model: checkpointing, compile, input grads."""
    base.gradient_checkpointing_disable()
    with contextlib.suppress(Exception):
        base.disable_input_require_grads()
    for module in base.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None
    base.config.use_cache = False
    base.train()


def free_memory() -> None:
    """Collect garbage and return cached GPU memory."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- measurement


@dataclasses.dataclass
class Record:
    """One optimizer step: when it ended, cumulative trained tokens, its loss and labelled tokens."""

    t: float
    tokens: int
    loss: float | None
    labelled: int


def summarize(name: str, what: str, records: list[Record], started: float, peak_gib: float,
              heldout: tuple[float | None, float | None], n_params: int, extra: dict) -> dict:
    """tokens/s (steady and whole epoch), MFU, peak memory and losses of one variant."""
    warm = max(3, len(records) // 10)
    first, last = records[min(warm, len(records) - 2)], records[-1]
    steady = (last.tokens - first.tokens) / max(last.t - first.t, 1e-9)
    whole = last.tokens / max(last.t - started, 1e-9)
    quarter = [r for r in records if r.tokens > 0.75 * last.tokens and r.loss is not None]
    weight = sum(r.labelled for r in quarter)
    late_loss = sum(r.loss * r.labelled for r in quarter) / weight if weight else None
    curve = []
    for q in (0.25, 0.5, 0.75, 1.0):
        window = [r for r in records if (q - 0.25) * last.tokens < r.tokens <= q * last.tokens and r.loss is not None]
        w = sum(r.labelled for r in window)
        curve.append(round(sum(r.loss * r.labelled for r in window) / w, 4) if w else None)
    return dict(variant=name, what=what, tokens=last.tokens, steps=len(records), tokens_per_s=round(steady, 1),
                tokens_per_s_whole=round(whole, 1), mfu=round(4 * n_params * steady / H100_BF16_PEAK, 4),
                peak_gib=round(peak_gib, 2), train_loss_last_quarter=None if late_loss is None else round(late_loss, 4),
                loss_curve_by_quarter=curve, heldout_before=heldout[0], heldout_after=heldout[1],
                records=[dataclasses.asdict(r) for r in records], **extra)


def run_lacd(name: str, base: torch.nn.Module, work: Path, dataset: Path, overrides: dict,
             n_params: int, device_name: str, max_len: int) -> dict:
    """Train with lacd's LoRARecipe (the train stage's code path) on the shared base model."""
    folder = work / name
    spec = TrainSpec(
        base_dir=work / "base-not-read", dataset_dir=dataset, out_dir=folder / "adapter",
        checkpoint_dir=folder / "checkpoints", progress_path=folder / "progress.json",
        lora_r=LORA_R, lora_alpha=LORA_ALPHA, learning_rate=LR, epochs=EPOCHS, warmup_ratio=WARMUP,
        tokens_per_batch=max_len, max_seq_len=max_len, device=device_name,
    )
    spec = dataclasses.replace(spec, **overrides)
    records: list[Record] = []
    marks: dict[str, float] = {}

    def on_progress(progress: dict) -> None:
        if progress["phase"] == "train":
            records.append(Record(time.perf_counter(), progress["tokens"], progress["loss"], 0))
        elif progress["phase"] not in marks:
            marks[progress["phase"]] = time.perf_counter()

    recipe = LoRARecipe(spec, on_progress, base_model=base)
    try:
        recipe.setup()
        started = time.perf_counter()
        recipe.train()
        result = recipe.save()
        labelled = [sum(int((torch.tensor(recipe.train_rows[i]["labels"][1:]) != IGNORE_INDEX).sum())
                        for mb in step.micro_batches for i in mb) for step in recipe.steps]
        for record, count in zip(records, labelled):
            record.labelled = count
        recipe.model.unload()
    finally:
        recipe.cleanup()
        reset_base(base)
        free_memory()
    extra = dict(attention=result.attention, adapter_compute=result.adapter_compute,
                 gradient_checkpointing=result.gradient_checkpointing, compiled=result.compiled,
                 fused_kernels=result.fused_kernels, lora_dropout=spec.lora_dropout)
    return summarize(name, VARIANTS[name][0], records, started, result.peak_gpu_memory_gib or 0.0,
                     (result.heldout_loss_before, result.heldout_loss_after), n_params, extra)


def pad_to_longest(features: list[dict]) -> dict[str, torch.Tensor]:
    """The textbook collator: right-pad to the longest row, labels -100 on padding."""
    longest = max(len(f["input_ids"]) for f in features)
    ids, labels, mask = [], [], []
    for f in features:
        pad = longest - len(f["input_ids"])
        ids.append(f["input_ids"] + [0] * pad)
        labels.append(f["labels"] + [IGNORE_INDEX] * pad)
        mask.append([1] * len(f["input_ids"]) + [0] * pad)
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "attention_mask": torch.tensor(mask)}


def run_textbook(base: torch.nn.Module, work: Path, train: list[dict], heldout: list[dict],
                 n_params: int, device: torch.device, dtype: torch.dtype) -> dict:
    """HF Trainer + peft: batch 4 padded to the longest, gradient checkpointing, dropout 0.05."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    batches: list[tuple[int, int, int]] = []  # (trained tokens, labelled tokens, padded tokens)

    def collate(features: list[dict]) -> dict[str, torch.Tensor]:
        batch = pad_to_longest(features)
        batches.append((sum(len(f["input_ids"]) for f in features),
                        sum(sum(1 for x in f["labels"][1:] if x != IGNORE_INDEX) for f in features),
                        batch["input_ids"].numel()))
        return batch

    records: list[Record] = []
    losses: dict[int, float] = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if device.type == "cuda":
                torch.cuda.synchronize()
            done = batches[: state.global_step]
            records.append(Record(time.perf_counter(), sum(b[0] for b in done), None, done[-1][1]))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses[state.global_step] = float(logs["loss"])

    base.set_attn_implementation("sdpa")
    base.gradient_checkpointing_enable()
    base.enable_input_require_grads()
    model = get_peft_model(base, LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.05,
                                            target_modules="all-linear", task_type="CAUSAL_LM"))
    steps = math.ceil(len(train) / 4) * EPOCHS
    args = TrainingArguments(
        output_dir=str(work / "textbook"), per_device_train_batch_size=4, num_train_epochs=EPOCHS,
        learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=math.ceil(WARMUP * steps),
        max_grad_norm=1.0, bf16=dtype == torch.bfloat16, gradient_checkpointing=True, logging_steps=1,
        save_strategy="no", report_to=[], remove_unused_columns=False, seed=0, optim="adamw_torch",
        use_cpu=device.type != "cuda", disable_tqdm=True,
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collate,
                      callbacks=[Clock()])
    try:
        before = evaluate(model, heldout, 4096, device, dtype if device.type == "cuda" else None)
        started = time.perf_counter()
        trainer.train()
        for index, record in enumerate(records):
            record.loss = losses.get(index + 1)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
        after = evaluate(model, heldout, 4096, device, dtype if device.type == "cuda" else None)
        model.unload()
    finally:
        del trainer, model
        reset_base(base)
        free_memory()
    extra = dict(attention="sdpa", adapter_compute="float32 (peft upcast)", gradient_checkpointing=True,
                 compiled=False, fused_kernels="off", lora_dropout=0.05,
                 pad_fraction=round(1 - sum(b[0] for b in batches) / max(1, sum(b[2] for b in batches)), 3))
    return summarize("textbook", "HF Trainer + peft, batch 4 padded, grad. checkpointing, dropout 0.05",
                     records, started, peak, (before, after), n_params, extra)


def check_attention(base: torch.nn.Module, lessons: list[dict], device: torch.device, dtype: torch.dtype) -> dict:
    """Loss of one packed row under sdpa's block mask and under the train stage's automatic choice."""
    from lacd.pipeline.packing import collate_packed
    from lacd.pipeline.train import choose_attention, compute_context, loss_sum

    batch = collate_packed(lessons[:4])
    losses = {}
    for name in ("sdpa", choose_attention("auto", device)):
        base.set_attn_implementation(name)
        with torch.no_grad(), compute_context(device, dtype if device.type == "cuda" else None):
            losses[name] = float(loss_sum(base, batch))
    base.set_attn_implementation("sdpa")
    values = list(losses.values())
    return dict(losses=losses, relative_difference=abs(values[-1] - values[0]) / abs(values[0]))


# --------------------------------------------------------------------------- report


def table(results: list[dict]) -> str:
    """The results as a markdown table (speed-up against the textbook row when there is one)."""
    reference = next((r for r in results if r["variant"] == "textbook" and "error" not in r), None)
    lines = ["| variant | what changed | trained tok/s | tok/s whole epoch | MFU | peak GiB | speed-up | "
             "train loss, last quarter | held-out loss before -> after |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['what']} | failed: {r['error'][:80]} | | | | | | |")
            continue
        speedup = f"{r['tokens_per_s'] / reference['tokens_per_s']:.2f}x" if reference else "-"
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(
            f"| {r['variant']} | {r['what']} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s_whole']:,.0f} | "
            f"{100 * r['mfu']:.1f}% | {r['peak_gib']:.1f} | {speedup} | {fmt(r['train_loss_last_quarter'])} | "
            f"{fmt(r['heldout_before'])} -> {fmt(r['heldout_after'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Build the model and lessons once, run every requested variant, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default="textbook,lacd-v0,lacd-varlen,lacd-bf16,lacd-nodrop,lacd-compile,lacd,"
                                              "lacd-gc,lacd-liger")
    parser.add_argument("--lessons", type=int, default=160)
    parser.add_argument("--heldout", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=LR, help="learning rate of every variant")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--tiny", action="store_true", help="2-layer model on the CPU: a smoke test")
    args = parser.parse_args(argv)
    globals()["LR"] = args.lr
    from lacd import logs

    logs.setup(level="info", fmt="console", stream=sys.stdout)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n != "textbook" and n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: textbook, {', '.join(VARIANTS)}")
    device, dtype = choose_device("cpu" if args.tiny else "auto")
    shape, median, max_len = (TINY, 60, 256) if args.tiny else (CODELLAMA_7B, 600, 4096)
    if args.tiny:
        torch.set_num_threads(2)
    lessons = make_lessons(args.lessons + args.heldout, args.seed, shape["vocab_size"], median, max_len)
    train, heldout = lessons[: args.lessons], lessons[args.lessons:]
    lengths = [len(r["input_ids"]) for r in train]
    print(f"lessons: {len(train)} train ({sum(lengths)} tokens, median {sorted(lengths)[len(lengths) // 2]}, "
          f"max {max(lengths)}), {len(heldout)} held out; device {device}, {dtype}", flush=True)
    started = time.perf_counter()
    base = build_base(shape, device, dtype)
    n_params = non_embedding_params(base)
    print(f"base model built in {time.perf_counter() - started:.1f} s: {n_params / 1e9:.3f} B non-embedding "
          f"parameters, {sum(p.numel() for p in base.parameters()) / 1e9:.3f} B in all", flush=True)
    print(f"attention check (packed row of 4 lessons): {check_attention(base, train, device, dtype)}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="lacd-train-bench-"))
    results: list[dict] = []
    try:
        dataset = write_dataset(work / "dataset", train, heldout)
        for name in names:
            print(f"\n=== {name}", flush=True)
            t0 = time.perf_counter()
            try:
                if name == "textbook":
                    result = run_textbook(base, work, train, heldout, n_params, device, dtype)
                else:
                    result = run_lacd(name, base, work, dataset, VARIANTS[name][1], n_params,
                                      "cpu" if args.tiny else "auto", max_len)
            except Exception as exc:  # one broken variant must not hide the others' numbers
                traceback.print_exc()
                result = dict(variant=name, what=VARIANTS.get(name, ("textbook",))[0], error=repr(exc))
                reset_base(base)
                free_memory()
            result["wall_s"] = round(time.perf_counter() - t0, 1)
            results.append(result)
            brief = {k: v for k, v in result.items() if k not in ("records",)}
            print(json.dumps(brief), flush=True)
            if args.out:
                args.out.write_text(json.dumps(dict(device=torch.cuda.get_device_name(0) if device.type == "cuda"
                                                    else "cpu", torch=torch.__version__, results=results),
                                               indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n" + table(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
