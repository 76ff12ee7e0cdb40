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
  lacd       the train stage with its defaults (4096 tokens per optimizer step, dropout 0.05).

The loss comparison (issue 6: "the same loss curve within noise") needs the same optimizer
steps: the textbook recipe takes ceil(lessons / 4) steps of 4 lessons, lacd steps of a token
budget. Every variant has the same learning rate schedule (lacd's lr_factor gives the Trainer's
cosine-with-warmup value at every step) and the same lessons for one epoch; the LoRA dropout is
0.05 unless the variant says 0.
  lacd-same-*  the seed-0 textbook run's own batches, in its order, as lacd's steps (the textbook
               variant must run first in the same process), with the same LoRA init seed: the
               curves must match step for step;
  MATCH        the smallest tokens_per_batch whose plan has the textbook's number of steps (so the
               same mean tokens per step), with lacd's own shuffle;
  *-seedN      another data order and LoRA init (textbook-seedN: the Trainer's seed): the noise.
Held-out loss is measured at 0, 25, 50, 75 and 100% of the epoch's tokens for every variant (the
time spent on it is left out of tokens/s). A variant name may be repeated to measure it again.

For each: trained (non-pad) tokens/s in steady state (steps after the first warm ones) and over
the whole epoch (compile and warm-up included), MFU = 4 x non-embedding parameters (decoder
layers and final norm: embed_tokens and lm_head excluded) x tokens/s / 989e12 (H100 SXM dense
bf16), peak GPU memory (torch.cuda.max_memory_allocated, weights included), the mean training
loss over the last quarter of the epoch's tokens and the held-out loss after the epoch (both
models measured by lacd's evaluate on the same held-out lessons). A markdown table is printed
last, then the loss curves; --out writes every number, the per-step records and the textbook's
batches as JSON.

--tiny runs the same code on a 2-layer model on the CPU in seconds (a smoke test, not a measurement).

--devices 2,4 [--shapes 7B,34B] (issue 16, several GPUs through torchrun + FSDP2) runs instead
bench/train_devices.py: each shape on 1 GPU and on each count, same global batch; see its docstring.

--nf4 kernels,caps,card (issue 13, the 4-bit base) runs instead:
  kernels  forward + backward of one CodeLlama-7B MLP projection at 4096 tokens: bf16, torchao's
           linear_nf4, lacd's NF4Linear (torchao storage) and BnbNF4Linear (bitsandbytes kernels, what
           lacd uses on CUDA), bitsandbytes' own Linear4bit (the storage choice);
  caps     torch.cuda.set_per_process_memory_fraction caps of 6 (offloaded) and 8 GB (7B), 12 GB (13B),
           24 GB (34B, with and without offloading): a random base built straight into NF4 on the GPU, lessons up
           to 4096 tokens, NF4 + gradient checkpointing; peak, tokens/s, and the plan's expected peak;
  card     on one uncapped card, the 7B shape: bf16 LoRA and NF4 (seeds 0 and 1), NF4 + checkpointing,
           and the textbook QLoRA recipe (HF Trainer + bitsandbytes 4-bit + peft's
           prepare_model_for_kbit_training, gradient checkpointing, batch 4 padded); for NF4 seed 0 also
           the held-out loss of the adapter on the bf16 base (what the export merges into).
  PYTHONPATH=daemon python3 bench/train_gpu.py --nf4 kernels,caps,card --lessons 64 --textbook-lessons 32 \
      --cap-lessons 10 --out nf4.json
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
import unittest.mock
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "daemon"))

from lacd.pipeline.packing import IGNORE_INDEX  # noqa: E402
from lacd.pipeline.packing import pack  # noqa: E402
from lacd.pipeline.loss import evaluate  # noqa: E402
from lacd.pipeline.plan import PlannedStep, choose_device, plan_steps  # noqa: E402
from lacd.pipeline.train import LoRARecipe, TrainSpec  # noqa: E402

H100_BF16_PEAK = 989e12
CODELLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=32, vocab_size=32016, max_position_embeddings=16384,
                    rope_theta=1_000_000.0, rms_norm_eps=1e-5)
TINY = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=512, max_position_embeddings=1024)

# Each lacd variant: (what it changes, TrainSpec overrides). "lacd-v0" is the train stage as it
# was before issue 6 (packed rows, but sdpa with a dense block mask, peft's fp32 adapter upcast,
# dropout 0.05); each later one of this first group changes one lever from the one before it.
# (Their dropout now runs fused into the adapters: lacd-peftdrop measures peft's own module.)
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
MATCH = "match"  # tokens_per_batch: the smallest budget that gives the textbook's number of optimizer steps
PEFT_DROPOUT = "_peft_dropout"  # bench-only override: keep peft's own dropout module (no fuse_lora_dropout)
SAME_BATCHES = "_same_batches"  # bench-only override: the textbook run's batches, in its order, as the steps
FAST = dict(attention="auto", adapter_compute="auto", gradient_checkpointing="off", tokens_per_batch=MATCH)
LIGER = FAST | dict(compile="off", fused_kernels="liger")
COMPILED = FAST | dict(compile="on", fused_kernels="off")
VARIANTS |= {
    "lacd-d05": ("textbook's step count, dropout 0.05, Liger", LIGER | dict(lora_dropout=0.05)),
    "lacd-d0": ("textbook's step count, dropout 0, Liger", LIGER | dict(lora_dropout=0.0)),
    "lacd-d05-seed1": ("lacd-d05, another data order and LoRA init", LIGER | dict(lora_dropout=0.05, seed=1)),
    "lacd-d0-seed1": ("lacd-d0, another data order and LoRA init", LIGER | dict(lora_dropout=0.0, seed=1)),
    "lacd-fast-d05": ("textbook's step count, dropout 0.05, torch.compile", COMPILED | dict(lora_dropout=0.05)),
    "lacd-fast-d0": ("textbook's step count, dropout 0, torch.compile", COMPILED | dict(lora_dropout=0.0)),
    "lacd-noliger": ("the defaults without the gpu extra (no Liger)", dict(fused_kernels="off")),
    "lacd-peftdrop": ("lacd-noliger with peft's own dropout module", dict(fused_kernels="off", **{PEFT_DROPOUT: True})),
    "lacd-d0-default": ("the defaults with dropout 0", dict(lora_dropout=0.0)),
    "lacd-noliger-d0": ("the defaults without Liger, dropout 0", dict(fused_kernels="off", lora_dropout=0.0)),
    "lacd-compiled": ("the defaults with torch.compile (what runs from 1M tokens)", dict(compile="on")),
    "lacd-compiled-d0": ("the defaults with torch.compile, dropout 0", dict(compile="on", lora_dropout=0.0)),
    "lacd-same-d05": ("the textbook's own batches as steps, dropout 0.05, Liger", LIGER | dict(
        lora_dropout=0.05, tokens_per_batch=4096, **{SAME_BATCHES: True})),
    "lacd-same-d0": ("the textbook's own batches as steps, dropout 0, Liger", LIGER | dict(
        lora_dropout=0.0, tokens_per_batch=4096, **{SAME_BATCHES: True})),
    "lacd-same-noliger": ("the textbook's own batches as steps, dropout 0.05, no Liger", FAST | dict(
        lora_dropout=0.05, tokens_per_batch=4096, compile="off", fused_kernels="off", **{SAME_BATCHES: True})),
    "lacd-same-fast-d05": ("the textbook's own batches as steps, dropout 0.05, torch.compile", COMPILED | dict(
        lora_dropout=0.05, tokens_per_batch=4096, **{SAME_BATCHES: True})),
}
# Issue 14: lessons that carry the agent's system prompt (--system-prompt), trained with today's
# packing (every lesson computes its own copy) and with shared-prefix packing (once per row).
VARIANTS |= {
    "lacd-noprefix": ("the defaults, today's packing (the prompt in every lesson)", dict(shared_prefix="off")),
    "lacd-prefix": ("the defaults, shared-prefix packing (the prompt once per row)", dict(shared_prefix="auto")),
    "lacd-prefix-same-steps": ("shared-prefix rows, today's steps lesson for lesson",
                               dict(shared_prefix="same-steps")),
}
AUTO_LR = "_auto_lr_exponent"  # bench-only override: plan.AUTO_LR_EXPONENT (auto's learning-rate rule)
# Smaller rows than auto's 4096 tokens: more, smaller steps, each learning rate given outright (today's
# 61 steps of the 240-lesson bench at 2e-4; 2048: 26 steps, 2560: 18).
for _budget, _lr in ((2048, 3.06e-4), (2048, 4.7e-4), (2560, 3.68e-4), (2560, 6.8e-4)):
    VARIANTS[f"lacd-prefix-b{_budget}-lr{_lr:g}"] = (f"shared prefix (auto), {_budget} tokens per step, lr {_lr:g}",
                                                   dict(shared_prefix="auto", tokens_per_batch=_budget,
                                                        learning_rate=_lr, **{AUTO_LR: 0.0}))
for _exponent, _tag in ((0.0, "lr0"), (0.5, "lr05"), (1.0, "lr1")):
    VARIANTS[f"lacd-prefix-{_tag}"] = (f"shared prefix (auto), learning rate x (today's steps / steps) ** {_exponent}",
                                       dict(shared_prefix="auto", **{AUTO_LR: _exponent}))
SYSTEM_PROMPT_TOKENS = 788  # the agent's system prompt as the format stage renders it (SmolLM2's tokenizer)
SYSTEM_PROMPT_OWN_MEDIAN = 90  # median own tokens of those lessons (240 generated: median 879 in all)
for _seed in (2, 3, 4):
    VARIANTS[f"lacd-d05-seed{_seed}"] = (f"lacd-d05, data order and LoRA init of seed {_seed}",
                                         LIGER | dict(lora_dropout=0.05, seed=_seed))
for _seed in (1, 2, 3):
    VARIANTS[f"lacd-seed{_seed}"] = (f"lacd (36 steps), data order and LoRA init of seed {_seed}", dict(seed=_seed))
NO_PLAN = dict(gpu_memory_gib=10_000.0)  # the shared base is already on the GPU: no plan, the variant decides
VARIANTS |= {
    "lacd-bf16": ("bf16 base, the defaults", NO_PLAN | dict(base_precision="bf16")),
    "lacd-bf16-seed1": ("bf16 base, seed 1", NO_PLAN | dict(base_precision="bf16", seed=1)),
    "lacd-bf16-seed2": ("bf16 base, seed 2", NO_PLAN | dict(base_precision="bf16", seed=2)),
    "lacd-nf4": ("NF4 base (bitsandbytes kernels on CUDA), the defaults", NO_PLAN | dict(base_precision="nf4")),
    "lacd-nf4-seed1": ("NF4 base, seed 1", NO_PLAN | dict(base_precision="nf4", seed=1)),
    "lacd-bf16-gc": ("bf16 base + gradient checkpointing", NO_PLAN | dict(base_precision="bf16",
                                                                        gradient_checkpointing="on")),
    "lacd-nf4-compiled": ("NF4 base, decoder layers compiled", NO_PLAN | dict(base_precision="nf4", compile="on")),
    "lacd-nf4-gc": ("NF4 base + gradient checkpointing (the small-card plan)", NO_PLAN | dict(
        base_precision="nf4", gradient_checkpointing="on")),
    "lacd-nf4-offload": ("NF4 base + checkpointing, kept layer inputs offloaded to host memory", NO_PLAN | dict(
        base_precision="nf4", gradient_checkpointing="offload")),
}
TEXTBOOK_SEEDS = {"textbook": 0, "textbook-seed1": 1, "textbook-seed2": 2, "textbook-seed3": 3}
EPOCHS, WARMUP, LORA_R, LORA_ALPHA = 1, 0.05, 16, 32
CURVE_POINTS = (0.25, 0.5, 0.75)  # fractions of the epoch's tokens where held-out loss is measured mid-run
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


def with_system_prompt(lessons: list[dict], prompt_tokens: int, vocab: int, seed: int) -> list[dict]:
    """The lessons with one fixed prompt of prompt_tokens tokens in front (unlabelled), as every
    lesson of a run carries the agent's system prompt; the speed depends on its length, not its text."""
    rng = random.Random(seed + 2)
    prompt = [3 + rng.randrange(min(vocab - 3, 2000)) for _ in range(prompt_tokens)]
    return [{"input_ids": prompt + r["input_ids"], "labels": [IGNORE_INDEX] * prompt_tokens + r["labels"]}
            for r in lessons]


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


def _llama_globals() -> dict[str, Any]:
    """The modeling_llama functions and classes that Liger's patch replaces (module-wide)."""
    from transformers.models.llama import modeling_llama

    return {name: getattr(modeling_llama, name) for name in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP")}


LLAMA_GLOBALS = _llama_globals()  # before any variant applies Liger


def reset_base(base: torch.nn.Module) -> None:
    """Undo what a variant did to the shared base model: Liger's patches, checkpointing, compile, input grads."""
    from transformers.models.llama import modeling_llama

    for name, value in LLAMA_GLOBALS.items():
        setattr(modeling_llama, name, value)
    for module in base.modules():  # Liger binds forward (and names) on each patched instance
        for attribute in ("forward", "_get_name", "extra_repr"):
            module.__dict__.pop(attribute, None)
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


def matching_budget(lengths: list[int], steps: int, epochs: int, seed: int, max_len: int) -> int:
    """The smallest tokens_per_batch whose plan (plan_steps) has `steps` optimizer steps.

    Falls back to the budget whose step count is closest. The textbook recipe's steps hold
    4 lessons each; this gives lacd the same number of steps, so the same mean tokens per step.
    """
    best, best_gap = max_len, None
    for budget in range(256, 2 * max_len + 1, 4):
        gap = abs(len(plan_steps(lengths, budget, 1, epochs, seed)) - steps)
        if best_gap is None or gap < best_gap:
            best, best_gap = budget, gap
        if gap == 0:
            break
    return best


@dataclasses.dataclass
class Curve:
    """Held-out loss at fractions of the epoch's tokens, and the seconds spent measuring it."""

    total_tokens: int
    points: dict[float, float | None] = dataclasses.field(default_factory=dict)
    paused: float = 0.0

    def maybe_measure(self, tokens: int, measure: Any) -> None:
        """Measure held-out loss once per CURVE_POINTS fraction that `tokens` has just passed."""
        for fraction in CURVE_POINTS:
            if fraction not in self.points and tokens >= fraction * self.total_tokens:
                started = time.perf_counter()
                self.points[fraction] = round(float(measure()), 4)
                self.paused += time.perf_counter() - started


# --------------------------------------------------------------------------- measurement


@dataclasses.dataclass
class Record:
    """One optimizer step: when it ended, cumulative trained tokens, its loss and labelled tokens."""

    t: float
    tokens: int
    loss: float | None
    labelled: int


def summarize(name: str, what: str, records: list[Record], started: float, peak_gib: float,
              heldout: tuple[float | None, float | None], n_params: int, extra: dict,
              curve: Curve | None = None) -> dict:
    """tokens/s (steady and whole epoch), MFU, peak memory and losses of one variant."""
    warm = max(3, len(records) // 10)
    first, last = records[min(warm, len(records) - 2)], records[-1]
    steady = (last.tokens - first.tokens) / max(last.t - first.t, 1e-9)
    whole = last.tokens / max(last.t - started, 1e-9)
    quarter = [r for r in records if r.tokens > 0.75 * last.tokens and r.loss is not None]
    weight = sum(r.labelled for r in quarter)
    late_loss = sum(r.loss * r.labelled for r in quarter) / weight if weight else None
    quarters = []
    for q in (0.25, 0.5, 0.75, 1.0):
        window = [r for r in records if (q - 0.25) * last.tokens < r.tokens <= q * last.tokens and r.loss is not None]
        w = sum(r.labelled for r in window)
        quarters.append(round(sum(r.loss * r.labelled for r in window) / w, 4) if w else None)
    heldout_curve = [heldout[0]] + [curve.points.get(q) if curve else None for q in CURVE_POINTS] + [heldout[1]]
    heldout_curve = [None if v is None else round(v, 4) for v in heldout_curve]
    return dict(variant=name, what=what, tokens=last.tokens, steps=len(records), tokens_per_s=round(steady, 1),
                tokens_per_s_whole=round(whole, 1), mfu=round(4 * n_params * steady / H100_BF16_PEAK, 4),
                peak_gib=round(peak_gib, 2), train_loss_last_quarter=None if late_loss is None else round(late_loss, 4),
                loss_curve_by_quarter=quarters, heldout_curve=heldout_curve,
                heldout_before=heldout[0], heldout_after=heldout[1],
                records=[dataclasses.asdict(r) for r in records], **extra)


TEXTBOOK_BATCHES: list[list[int]] = []  # lesson indices of each textbook step (seed 0), in order


def textbook_steps(lengths: list[int], tokens_per_batch: int) -> list[PlannedStep]:
    """The seed-0 textbook run's batches as lacd's planned steps: the same 4 lessons per step in the
    same order, packed into micro-batches of tokens_per_batch (several when 4 lessons exceed it)."""
    steps = []
    for batch in TEXTBOOK_BATCHES:
        groups = pack([lengths[i] for i in batch], tokens_per_batch, range(len(batch)))
        steps.append(PlannedStep(epoch=0, micro_batches=tuple(tuple(sorted(batch[j] for j in g)) for g in groups)))
    return steps


def run_lacd(name: str, base: torch.nn.Module, work: Path, dataset: Path, overrides: dict,
             n_params: int, device_name: str, max_len: int, lengths: list[int], heldout: list[dict]) -> dict:
    """Train with lacd's LoRARecipe (the train stage's code path) on the shared base model."""
    import lacd.pipeline.train as train_module

    folder = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=work))  # a name may repeat: never resume another run
    overrides = dict(overrides)
    peft_dropout = overrides.pop(PEFT_DROPOUT, False)
    same_batches = overrides.pop(SAME_BATCHES, False)
    auto_lr = overrides.pop(AUTO_LR, None)
    if same_batches and not TEXTBOOK_BATCHES:
        raise RuntimeError("the same-batches variants need the textbook variant to run first")
    spec = TrainSpec(
        base_dir=work / "base-not-read", dataset_dir=dataset, out_dir=folder / "adapter",
        checkpoint_dir=folder / "checkpoints", progress_path=folder / "progress.json",
        lora_r=LORA_R, lora_alpha=LORA_ALPHA, learning_rate=LR, epochs=EPOCHS, warmup_ratio=WARMUP,
        tokens_per_batch=max_len, max_seq_len=max_len, device=device_name,
    )
    if overrides.get("tokens_per_batch") == MATCH:
        seed = overrides.get("seed", spec.seed)
        overrides["tokens_per_batch"] = matching_budget(lengths, math.ceil(len(lengths) / 4) * EPOCHS, EPOCHS,
                                                        seed, max_len)
    spec = dataclasses.replace(spec, **overrides)
    records: list[Record] = []
    curve = Curve(total_tokens=sum(lengths) * EPOCHS)
    recipe: LoRARecipe | None = None

    def measure() -> float | None:
        return evaluate(recipe.model, heldout, max_len, recipe.device, recipe.compute_dtype)

    def on_progress(progress: dict) -> None:
        if progress["phase"] == "train":
            records.append(Record(time.perf_counter() - curve.paused, progress["tokens"], progress["loss"], 0))
            curve.maybe_measure(progress["tokens"], measure)

    recipe = LoRARecipe(spec, on_progress, base_model=base)
    patches = contextlib.ExitStack()
    if peft_dropout:
        patches.enter_context(unittest.mock.patch.object(train_module, "fuse_lora_dropout", lambda model: 0))
    if auto_lr is not None:
        from lacd.pipeline import plan

        patches.enter_context(unittest.mock.patch.object(plan, "AUTO_LR_EXPONENT", auto_lr))
    if same_batches:
        steps = textbook_steps(lengths, spec.tokens_per_batch)
        patches.enter_context(unittest.mock.patch.object(train_module, "plan_steps", lambda *args: steps))
    try:
        with patches:
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
                 adapter_dir=str(spec.out_dir), base_precision=result.base_precision,
                 gradient_checkpointing=result.gradient_checkpointing, compiled=result.compiled,
                 fused_kernels=result.fused_kernels, lora_dropout=spec.lora_dropout,
                 dropout_module="peft" if peft_dropout or spec.lora_dropout == 0 else "fused",
                 tokens_per_batch=spec.tokens_per_batch, seed=spec.seed, same_batches_as_textbook=same_batches,
                 mean_tokens_per_step=round(result.tokens / max(result.steps, 1), 1))
    return summarize(name, VARIANTS[name][0], records, started, result.peak_gpu_memory_gib or 0.0,
                     (result.heldout_loss_before, result.heldout_loss_after), n_params, extra, curve)


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


def run_textbook(name: str, base: torch.nn.Module, work: Path, train: list[dict], heldout: list[dict],
                 n_params: int, device: torch.device, dtype: torch.dtype, max_len: int) -> dict:
    """HF Trainer + peft: batch 4 padded to the longest, gradient checkpointing, dropout 0.05.

    Its seed (TEXTBOOK_SEEDS) sets the Trainer's data order and the LoRA init; the seed-0 run
    records its batches in TEXTBOOK_BATCHES for the same-batches variants.
    """
    seed = TEXTBOOK_SEEDS[name]
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    batches: list[tuple[int, int, int]] = []  # (trained tokens, labelled tokens, padded tokens)
    order: list[list[int]] = []

    def collate(features: list[dict]) -> dict[str, torch.Tensor]:
        order.append([f["index"] for f in features])
        batch = pad_to_longest(features)
        batches.append((sum(len(f["input_ids"]) for f in features),
                        sum(sum(1 for x in f["labels"][1:] if x != IGNORE_INDEX) for f in features),
                        batch["input_ids"].numel()))
        return batch

    records: list[Record] = []
    losses: dict[int, float] = {}
    curve = Curve(total_tokens=sum(len(r["input_ids"]) for r in train) * EPOCHS)
    compute_dtype = dtype if device.type == "cuda" else None

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if device.type == "cuda":
                torch.cuda.synchronize()
            done = batches[: state.global_step]
            tokens = sum(b[0] for b in done)
            records.append(Record(time.perf_counter() - curve.paused, tokens, None, done[-1][1]))
            model = kwargs["model"]  # the peft model the Trainer trains
            curve.maybe_measure(tokens, lambda: evaluate(model, heldout, max_len, device, compute_dtype))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses[state.global_step] = float(logs["loss"])

    base.set_attn_implementation("sdpa")
    base.gradient_checkpointing_enable()
    base.enable_input_require_grads()
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.05,
                                            target_modules="all-linear", task_type="CAUSAL_LM"))
    steps = math.ceil(len(train) / 4) * EPOCHS
    args = TrainingArguments(
        output_dir=str(work / "textbook"), per_device_train_batch_size=4, num_train_epochs=EPOCHS,
        learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=math.ceil(WARMUP * steps),
        max_grad_norm=1.0, bf16=dtype == torch.bfloat16, gradient_checkpointing=True, logging_steps=1,
        save_strategy="no", report_to=[], remove_unused_columns=False, seed=seed, optim="adamw_torch",
        use_cpu=device.type != "cuda", disable_tqdm=True,
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    indexed = [dict(row, index=i) for i, row in enumerate(train)]
    trainer = Trainer(model=model, args=args, train_dataset=indexed, data_collator=collate,
                      callbacks=[Clock()])
    try:
        before = evaluate(model, heldout, max_len, device, compute_dtype)
        started = time.perf_counter()
        trainer.train()
        for index, record in enumerate(records):
            record.loss = losses.get(index + 1)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
        after = evaluate(model, heldout, max_len, device, compute_dtype)
        model.unload()
        if seed == 0:
            TEXTBOOK_BATCHES[:] = order
    finally:
        del trainer, model
        reset_base(base)
        free_memory()
    extra = dict(attention="sdpa", adapter_compute="float32 (peft upcast)", gradient_checkpointing=True,
                 compiled=False, fused_kernels="off", lora_dropout=0.05, dropout_module="peft", seed=seed,
                 mean_tokens_per_step=round(sum(b[0] for b in batches) / max(len(batches), 1), 1), batches=order,
                 pad_fraction=round(1 - sum(b[0] for b in batches) / max(1, sum(b[2] for b in batches)), 3))
    return summarize(name, "HF Trainer + peft, batch 4 padded, grad. checkpointing, dropout 0.05",
                     records, started, peak, (before, after), n_params, extra, curve)


def check_attention(base: torch.nn.Module, lessons: list[dict], device: torch.device, dtype: torch.dtype) -> dict:
    """Loss of one packed row under sdpa's block mask and under the train stage's automatic choice."""
    from lacd.pipeline.packing import collate_packed
    from lacd.pipeline.loss import loss_sum
    from lacd.pipeline.plan import choose_attention, compute_context

    batch = collate_packed(lessons[:4])
    losses = {}
    for name in ("sdpa", choose_attention("auto", device)):
        base.set_attn_implementation(name)
        with torch.no_grad(), compute_context(device, dtype if device.type == "cuda" else None):
            losses[name] = float(loss_sum(base, batch))
    base.set_attn_implementation("sdpa")
    values = list(losses.values())
    return dict(losses=losses, relative_difference=abs(values[-1] - values[0]) / abs(values[0]))


def check_shared_prefix(base: torch.nn.Module, lessons: list[dict], device: torch.device, dtype: torch.dtype) -> dict:
    """Loss of 8 lessons as one row of today's packing and as one shared-prefix row (FlexAttention on
    CUDA: autograd on, as in training), under the train stage's varlen attention."""
    from lacd.pipeline.packing import collate_packed, collate_shared_prefix
    from lacd.pipeline.loss import loss_sum
    from lacd.pipeline.plan import choose_attention, compute_context

    from lacd.pipeline.packing import VARLEN_ATTENTION

    base.set_attn_implementation(choose_attention(VARLEN_ATTENTION, device))
    losses = {}
    for name, batch in (("packed", collate_packed(lessons[:8])),
                        ("shared_prefix", collate_shared_prefix(lessons[:8], pad_to_multiple=128))):
        with compute_context(device, dtype if device.type == "cuda" else None):
            losses[name] = float(loss_sum(base, batch).detach())
    base.set_attn_implementation("sdpa")
    base.zero_grad(set_to_none=True)
    free_memory()  # the graph's blocks stay reserved otherwise, and the first variant would see less free memory
    return dict(losses=losses, relative_difference=abs(losses["packed"] - losses["shared_prefix"]) / losses["packed"])


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


def curve_table(results: list[dict]) -> str:
    """Loss after the same numbers of tokens: held-out at 0-100% of the epoch, train loss by quarter."""
    reference = next((r for r in results if r["variant"] == "textbook" and "error" not in r), None)
    lines = ["| variant | steps | tokens/step | dropout | seed | held-out loss at 0 / 25 / 50 / 75 / 100% of tokens | "
             "vs textbook at 100% | train loss by quarter |", "|---|---:|---:|---:|---:|---|---:|---|"]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for r in results:
        if "error" in r:
            continue
        gap = "-"
        if reference and r["heldout_after"] is not None and reference["heldout_after"] is not None:
            gap = f"{r['heldout_after'] - reference['heldout_after']:+.3f}"
        lines.append(
            f"| {r['variant']} | {r['steps']} | {r.get('mean_tokens_per_step', 0):,.0f} | {r['lora_dropout']} | "
            f"{r.get('seed', '-')} | {' / '.join(fmt(v) for v in r['heldout_curve'])} | {gap} | "
            f"{' / '.join(fmt(v) for v in r['loss_curve_by_quarter'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Build the model and lessons once, run every requested variant, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default="textbook,lacd-same-d05,lacd-same-d0,lacd-same-noliger,"
                                              "lacd-same-fast-d05,lacd-d05,lacd-d05-seed1,lacd-d05-seed2,"
                                              "lacd-d05-seed3,lacd,lacd-noliger,lacd-fast-d0,textbook-seed3",
                        help="comma-separated; a name may repeat (measured again)")
    parser.add_argument("--lessons", type=int, default=160)
    parser.add_argument("--heldout", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=LR, help="learning rate of every variant")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--tiny", action="store_true", help="2-layer model on the CPU: a smoke test")
    parser.add_argument("--nf4", default="", help="issue 13: comma-separated parts of kernels,card,caps")
    parser.add_argument("--card-variants", default="lacd-bf16,lacd-nf4,lacd-nf4-gc,textbook-qlora,lacd-bf16-seed1,"
                                                    "lacd-nf4-seed1")
    parser.add_argument("--textbook-lessons", type=int, default=48)
    parser.add_argument("--caps", default="7B@6,7B@8,13B@12,34B@24")
    parser.add_argument("--cap-lessons", type=int, default=14)

    parser.add_argument("--system-prompt", type=int, nargs="?", const=SYSTEM_PROMPT_TOKENS, default=0,
                        metavar="TOKENS", help="put a system prompt of TOKENS tokens (default "
                        f"{SYSTEM_PROMPT_TOKENS}) in front of every lesson, whose own tokens then have median "
                        f"{SYSTEM_PROMPT_OWN_MEDIAN} (issue 14: compare lacd-noprefix with lacd-prefix)")
    parser.add_argument("--own-median", type=int, default=SYSTEM_PROMPT_OWN_MEDIAN,
                        help="with --system-prompt: the lessons' median own tokens (a 240-lesson run's real "
                        "dataset of this generator: ~200)")
    parser.add_argument("--devices", default="", help="issue 16: comma-separated GPU counts to compare with 1 "
                        "(torchrun + FSDP2; bench/train_devices.py); with --tiny, gloo processes on the CPU")
    parser.add_argument("--shapes", default="7B,34B", help="with --devices: 7B, 34B")
    parser.add_argument("--grad-accum", type=int, default=8, help="with --devices: micro-batches per step")
    args = parser.parse_args(argv)
    if args.devices:
        import train_devices

        return train_devices.main(args)
    if args.nf4:
        return nf4_main(args)
    globals()["LR"] = args.lr
    from lacd import logs

    logs.setup(level="info", fmt="console", stream=sys.stdout)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in TEXTBOOK_SEEDS and n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join([*TEXTBOOK_SEEDS, *VARIANTS])}")
    device, dtype = choose_device("cpu" if args.tiny else "auto")
    shape, median, max_len = (TINY, 60, 256) if args.tiny else (CODELLAMA_7B, 600, 4096)
    if args.tiny:
        torch.set_num_threads(2)
    if args.system_prompt:
        median = min(median, args.own_median)
        max_len -= args.system_prompt
    lessons = make_lessons(args.lessons + args.heldout, args.seed, shape["vocab_size"], median, max_len)
    if args.system_prompt:
        lessons = with_system_prompt(lessons, args.system_prompt, shape["vocab_size"], args.seed)
        max_len += args.system_prompt
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
    if args.system_prompt:
        print(f"shared-prefix check: {check_shared_prefix(base, train, device, dtype)}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="lacd-train-bench-"))
    results: list[dict] = []
    quantized = None
    try:
        dataset = write_dataset(work / "dataset", train, heldout)
        for name in names:
            print(f"\n=== {name}", flush=True)
            t0 = time.perf_counter()
            try:
                if name in TEXTBOOK_SEEDS:
                    result = run_textbook(name, base, work, train, heldout, n_params, device, dtype, max_len)
                else:
                    overrides = VARIANTS[name][1]
                    if args.tiny:  # Liger's kernels and the compiled layers are GPU levers
                        overrides = overrides | {k: "off" for k in ("compile", "fused_kernels") if k in overrides}
                    if "nf4" in name and quantized is None:  # never quantize the shared base in place
                        quantized = nf4_copy(base)
                    result = run_lacd(name, quantized if "nf4" in name else base, work, dataset, overrides,
                                      n_params, "cpu" if args.tiny else "auto", max_len, lengths, heldout)
            except Exception as exc:  # one broken variant must not hide the others' numbers
                traceback.print_exc()
                result = dict(variant=name, what=VARIANTS.get(name, ("textbook",))[0], error=repr(exc))
                reset_base(base)
                free_memory()
            result["wall_s"] = round(time.perf_counter() - t0, 1)
            if "tokens_per_s" in result:  # the same lessons in every variant: lessons/s in proportion
                result["lessons_per_s"] = round(result["tokens_per_s"] * len(train) / sum(lengths), 2)
            results.append(result)
            brief = {k: v for k, v in result.items() if k not in ("records", "batches")}
            print(json.dumps(brief), flush=True)
            if args.out:
                args.out.write_text(json.dumps(dict(device=torch.cuda.get_device_name(0) if device.type == "cuda"
                                                    else "cpu", torch=torch.__version__, results=results),
                                               indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n" + table(results), flush=True)
    print("\n" + curve_table(results), flush=True)
    return 0


# --------------------------------------------------------------------------- 4-bit (issue 13)

CODELLAMA_13B = CODELLAMA_7B | dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                    num_attention_heads=40, num_key_value_heads=40)
CODELLAMA_34B = CODELLAMA_7B | dict(hidden_size=8192, intermediate_size=22016, num_hidden_layers=48,
                                    num_attention_heads=64, num_key_value_heads=8, vocab_size=32000)
CAPS = (("7B", CODELLAMA_7B, 6, "lacd-nf4-offload"), ("7B", CODELLAMA_7B, 8, "lacd-nf4-gc"),
        ("13B", CODELLAMA_13B, 12, "lacd-nf4-gc"), ("34B", CODELLAMA_34B, 24, "lacd-nf4-gc"),
        ("34B", CODELLAMA_34B, 24, "lacd-nf4-offload"))


def timed(step: Any, iters: int = 10) -> float:
    """Milliseconds per call of step() on the GPU (after 3 warm calls)."""
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    torch.cuda.synchronize()
    return round(1000 * (time.perf_counter() - start) / iters, 3)


def kernel_bench(tokens: int = 4096, shape: tuple[int, int] = (11008, 4096)) -> dict:
    """Forward + backward (input gradient) of one CodeLlama-7B MLP projection at `tokens` tokens:
    bf16, torchao's linear_nf4, lacd's NF4Linear, bitsandbytes' Linear4bit (NF4, bf16 compute)."""
    from lacd.pipeline import nf4

    torch.manual_seed(0)
    weight = torch.randn(*shape, device="cuda", dtype=torch.bfloat16) * 0.02
    x = torch.randn(tokens, shape[1], device="cuda", dtype=torch.bfloat16, requires_grad=True)
    quantized = nf4.to_nf4(weight)
    layers: dict[str, Any] = {"bf16": lambda v: torch.nn.functional.linear(v, weight)}
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4

    layers["torchao linear_nf4"] = lambda v: linear_nf4(v, quantized)
    layers["lacd NF4Linear (torchao storage)"] = nf4.NF4Linear(quantized, None)
    if nf4.backend(weight.device) == nf4.BITSANDBYTES:
        layers["lacd BnbNF4Linear (bitsandbytes kernels)"] = nf4.BnbNF4Linear(weight, None)
    try:
        import bitsandbytes as bnb

        linear = bnb.nn.Linear4bit(shape[1], shape[0], bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
        linear.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4")
        layers["bitsandbytes Linear4bit"] = linear.cuda()
    except Exception as exc:  # noqa: BLE001 - report, do not stop the bench
        print(f"bitsandbytes unavailable: {exc!r}", flush=True)
    out = {}
    for name, layer in layers.items():
        def step() -> None:
            layer(x).sum().backward()
            x.grad = None
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out[name] = dict(ms=timed(step), transient_mib=round((torch.cuda.max_memory_allocated() - base) / 2**20))
    return out


def nf4_copy(base: torch.nn.Module) -> torch.nn.Module:
    """A second model over the same non-linear weights whose linear projections are NF4 copies."""
    import copy

    from lacd.pipeline import nf4

    clone = copy.copy(base)
    clone._modules = dict(base._modules)
    model_copy = copy.copy(base.model)
    model_copy._modules = dict(base.model._modules)
    model_copy.layers = torch.nn.ModuleList()
    for layer in base.model.layers:
        new_layer = copy.copy(layer)
        new_layer._modules = dict(layer._modules)
        for part in ("self_attn", "mlp"):
            block = copy.copy(getattr(layer, part))
            block._modules = {name: nf4.quantized_linear(m.weight.detach(), None)
                              if type(m) is torch.nn.Linear else m for name, m in block._modules.items()}
            new_layer._modules[part] = block
        model_copy.layers.append(new_layer)
    clone._modules["model"] = model_copy
    return clone


def bnb_copy(base: torch.nn.Module) -> torch.nn.Module:
    """The textbook QLoRA base: bitsandbytes Linear4bit (NF4, double quant, bf16 compute) for every
    projection, the other weights cloned, prepared with peft's prepare_model_for_kbit_training."""
    import bitsandbytes as bnb
    import copy

    from peft import prepare_model_for_kbit_training

    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(base.config, dtype=torch.bfloat16)
    for name, module in list(model.named_modules()):
        if type(module) is torch.nn.Linear and not name.endswith("lm_head"):
            source = base.get_submodule(name).weight.detach()
            linear = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=False, device="meta",
                                       compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True)
            linear.weight = bnb.nn.Params4bit(source.clone(), requires_grad=False, quant_type="nf4",
                                              compress_statistics=True).cuda()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, linear)
    for name, param in list(model.named_parameters()):
        if param.device.type == "meta":
            owner, _, attribute = name.rpartition(".")
            model.get_submodule(owner)._parameters[attribute] = torch.nn.Parameter(
                base.get_parameter(name).detach().clone(), requires_grad=False)
    for name, buffer in list(model.named_buffers()):
        owner, _, attribute = name.rpartition(".")
        model.get_submodule(owner)._buffers[attribute] = base.get_buffer(name).clone()
    model.is_loaded_in_4bit = True
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    return model.train()


def build_nf4_base(shape: dict, device: str = "cuda") -> torch.nn.Module:
    """A random model of `shape` built straight into NF4 on the GPU, one projection at a time."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lacd.pipeline import nf4

    torch.manual_seed(0)
    config = LlamaConfig(**shape, attn_implementation="sdpa", use_cache=False)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    for name, module in list(model.named_modules()):
        for attribute, param in list(module._parameters.items()):
            if param is None:
                continue
            value = torch.empty(param.shape, device=device, dtype=torch.bfloat16)
            if param.dim() == 1:
                value.fill_(1.0)
            else:
                value.normal_(0.0, 0.02)
            if type(module) is torch.nn.Linear and not name.endswith("lm_head"):
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, nf4.quantized_linear(value, None))
                del value
            else:
                module._parameters[attribute] = torch.nn.Parameter(value, requires_grad=False)
    for module in model.modules():
        for key, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[key] = buffer.to(device)
    return model.train()


def heldout_with_base(base: torch.nn.Module, adapter_dir: str, heldout: list[dict], max_len: int) -> float | None:
    """Held-out loss of the bf16 base + an adapter trained on the NF4 base (what export serves)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base, adapter_dir)
    try:
        return evaluate(model, heldout, max_len, torch.device("cuda"), torch.bfloat16)
    finally:
        model.unload()
        reset_base(base)


def capped(label: str, shape: dict, cap_gib: float, work: Path, max_len: int, n_lessons: int,
           name: str = "lacd-nf4-gc") -> dict:
    """Train variant `name` (NF4 + checkpointing) on a random `shape` under a per-process cap of cap_gib."""
    from lacd.pipeline.memplan import Shape, expected_peak

    total = torch.cuda.get_device_properties(0).total_memory
    free_memory()
    torch.cuda.set_per_process_memory_fraction(cap_gib * 2**30 / total)
    torch.cuda.reset_peak_memory_stats()
    base = None
    out: dict[str, Any] = dict(model=label, cap_gib=cap_gib, variant=name)
    try:
        t0 = time.perf_counter()
        base = build_nf4_base(shape)
        out["build_s"] = round(time.perf_counter() - t0, 1)
        out["weights_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
        lessons = make_lessons(n_lessons, 7, shape["vocab_size"], 1500, max_len)
        lessons[0] = make_lessons(1, 8, shape["vocab_size"], 10 * max_len, max_len)[0]  # one of max_len tokens
        train, heldout = lessons[:-2], lessons[-2:]
        dataset = write_dataset(Path(tempfile.mkdtemp(dir=work)) / "dataset", train, heldout)
        lengths = [len(r["input_ids"]) for r in train]
        result = run_lacd(name, base, work, dataset, VARIANTS[name][1], non_embedding_params(base), "cuda",
                          max_len, lengths, heldout)
        labelled = sum(sum(1 for x in r["labels"] if x != IGNORE_INDEX) for r in train) / sum(lengths)
        out.update({k: result[k] for k in ("tokens_per_s", "tokens_per_s_whole", "peak_gib", "steps", "tokens",
                                           "heldout_before", "heldout_after")})
        out["expected_peak_gib"] = round(expected_peak(Shape.of(base.config), "nf4", True, max_len, LORA_R, 0.05,
                                                       min(1.0, 1.5 * labelled), "offload" in name) / 2**30, 2)
    except Exception as exc:  # noqa: BLE001 - an OOM is a result here
        traceback.print_exc()
        out["error"] = repr(exc)[:300]
        out["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    finally:
        del base
        free_memory()
        torch.cuda.set_per_process_memory_fraction(1.0)
    print(json.dumps(out), flush=True)
    return out


def nf4_main(args: argparse.Namespace) -> int:
    """The issue-13 numbers: kernels, bf16 vs NF4 vs textbook QLoRA on one card, export gap, capped cards."""
    from lacd import logs

    logs.setup(level="warning", fmt="console", stream=sys.stdout)
    max_len = 4096
    report: dict[str, Any] = dict(device=torch.cuda.get_device_name(0), torch=torch.__version__)

    def save() -> None:
        if args.out:
            args.out.write_text(json.dumps(report, indent=1))

    if "kernels" in args.nf4:
        report["kernels"] = kernel_bench()
        print(json.dumps(report["kernels"]), flush=True)
        save()
    work = Path(tempfile.mkdtemp(prefix="lacd-nf4-bench-"))
    try:
        if "caps" in args.nf4:
            report["caps"] = [capped(label, shape, cap, work, max_len, args.cap_lessons, name)
                              for label, shape, cap, name in CAPS if f"{label}@{cap}" in args.caps]
            save()
        if "card" in args.nf4:
            lessons = make_lessons(args.lessons + args.heldout, args.seed, CODELLAMA_7B["vocab_size"], 600, max_len)
            train, heldout = lessons[: args.lessons], lessons[args.lessons:]
            lengths = [len(r["input_ids"]) for r in train]
            dataset = write_dataset(work / "dataset", train, heldout)
            base = build_base(CODELLAMA_7B, torch.device("cuda"), torch.bfloat16)
            n_params = non_embedding_params(base)
            quantized = nf4_copy(base)
            results = report.setdefault("card", [])
            for name in args.card_variants.split(","):
                t0 = time.perf_counter()
                model = quantized if "nf4" in name else base
                try:
                    if name == "textbook-qlora":
                        qlora = bnb_copy(base)
                        TEXTBOOK_SEEDS[name] = 0
                        result = run_textbook(name, qlora, work, train[: args.textbook_lessons], heldout, n_params,
                                              torch.device("cuda"), torch.bfloat16, max_len)
                        result["what"] = "HF Trainer + bitsandbytes 4-bit + peft, batch 4 padded, grad. ckpt"
                        del qlora
                    else:
                        result = run_lacd(name, model, work, dataset, VARIANTS[name][1], n_params, "cuda", max_len,
                                          lengths, heldout)
                        if name == "lacd-nf4":
                            result["heldout_exported"] = heldout_with_base(base, result["adapter_dir"], heldout,
                                                                           max_len)
                except Exception as exc:  # noqa: BLE001
                    traceback.print_exc()
                    result = dict(variant=name, what=VARIANTS.get(name, ("textbook",))[0], error=repr(exc)[:300])
                    reset_base(model)
                free_memory()
                result["wall_s"] = round(time.perf_counter() - t0, 1)
                results.append(result)
                print(json.dumps({k: v for k, v in result.items() if k not in ("records", "batches")}), flush=True)
                save()
            print("\n" + table(results), flush=True)
            print("\n" + curve_table(results), flush=True)
            model = None
            del base, quantized
            free_memory()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
