"""The train stage: LoRA fine-tuning of the base model on the formatted lessons.

The recipe reads top to bottom, like torchtune's single-device LoRA recipe:
setup (device, data, model, optimizer, resume), train (packed micro-batches,
optimizer steps, progress, checkpoints), save (adapter), cleanup.

What it supports:
- transformers + peft LoRA (r, alpha, dropout, target modules; "all-linear" by default);
- device chosen automatically: CUDA with bf16 weights when present, else CPU fp32;
  the attention implementation likewise: on CUDA PyTorch's varlen flash attention
  over the packed lessons (packing.VARLEN_ATTENTION), else flash_attention_2 when
  flash_attn is installed, else sdpa (CPU: sdpa); the choice is logged;
- padding-free packing (packing.py): lessons concatenated into token-budget
  micro-batches with position_ids restarting per lesson, so no lesson attends
  to another, and no padding token is ever computed;
- on CUDA, bf16 everywhere: the LoRA matrices run in bf16 under autocast (the
  optimizer keeps fp32 master weights) instead of peft's fp32 upcast of every
  adapter input; LoRA dropout inside the A matrix (fuse_lora_dropout), which
  keeps a 1-byte mask for backward instead of a dropped copy of every adapter
  input; gradient checkpointing only when the largest micro-batch would
  not fit in free GPU memory ("auto"); optional torch.compile of the decoder
  layers and Liger's fused kernels (see TrainSpec);
- loss only on labelled tokens, averaged over all labelled tokens of the whole
  optimizer step (gradient accumulation included), so packing, padding and
  accumulation do not change the maths;
- AdamW (fused on CUDA), warmup from 0 then cosine or linear decay (the
  learning rate of transformers' Trainer at every step), gradient clipping;
- held-out loss before and after training;
- a progress JSON rewritten atomically after every step (for ``lacd status``);
- checkpoints (adapter, optimizer, scheduler, RNG, step) every N steps and at
  the end, committed by rename, resumed from the newest complete one: a run
  killed and resumed ends with the same adapter as an uninterrupted run;
- a child-process entry point (``python -m lacd.pipeline.train SPEC.json``) and
  ``train_in_child``, which retries a CUDA out-of-memory with half the
  micro-batch and twice the accumulation.

Transformers detects packed rows only when the forward pass gets no
attention_mask and no cache: every forward here passes ``use_cache=False``
(the config default would create a DynamicCache, which silently disables the
packed-sequence mask and lets lessons attend to each other).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import structlog
import torch
import torch.nn.functional as F

from lacd.artifacts import commit_folder, write_json_atomic
from lacd.pipeline.packing import (
    IGNORE_INDEX,
    VARLEN_ATTENTION,
    collate_packed,
    collate_shared_prefix,
    common_prefix_length,
    labelled_token_count,
    lesson_token_count,
    pack,
    pack_shared_prefix,
    prefix_block_mask,
    register_varlen_attention,
    varlen_available,
)

log = structlog.get_logger(__name__)

OFFLOAD = "offload"  # gradient checkpointing with the kept layer inputs in host memory
EXIT_ERROR = 2  # a TrainError: bad input or configuration; message on stderr
EXIT_OOM = 75  # CUDA out of memory: retry with a smaller micro-batch
EXIT_PAUSED = 76  # asked to step aside: a checkpoint of the last finished step is written, then exit
CHECKPOINT_MAX_S = 300.0  # also checkpoint at the first step boundary this long after the last one: a
# paused child whose step outlasts yield_s is ended, and loses at most this much (slow CPU steps)
PAUSE_REQUEST = threading.Event()  # set in the child by the parent's "pause" line on stdin (watch_pause_requests)
_ERROR_PREFIX = "lacd train: error: "
CHECKPOINT_PREFIX = "checkpoint-"
COMPLETE_MARKER = "COMPLETE"
ProgressCallback = Callable[[dict], None]


class TrainError(Exception):
    """Training cannot run or did not finish; the message says why."""


class TrainPaused(Exception):
    """Child side: a pause was requested; the checkpoint of the last finished step is written."""


class TrainInterrupted(TrainError):
    """Training was stopped on request before it finished; it resumes from its last checkpoint."""


# --------------------------------------------------------------------------- spec and result


@dataclass(frozen=True)
class TrainSpec:
    """Everything one training run needs; plain values, JSON round-trippable.

    The speed settings (bench/train_gpu.py measured each on an H100):
    attention: 'auto' (varlen flash on CUDA, sdpa on CPU), or a transformers name;
    gradient_checkpointing: 'auto' (only when the largest micro-batch would not fit), 'on', 'off',
    'offload' (on, and the layer inputs it keeps go to pinned host memory: memplan's last resort);
    adapter_compute: 'auto' (LoRA in bf16 under autocast on CUDA) or 'float32' (peft's upcast);
    compile: 'auto' (torch.compile of the layers on CUDA from COMPILE_MIN_TOKENS tokens), 'on', 'off';
    fused_kernels: 'auto' (Liger's kernels on CUDA when installed and not compiling), 'liger', 'off';
    shared_prefix: 'same-steps' (the default), 'auto' (lessons that share a prefix of at least MIN_SHARED_PREFIX tokens are
    packed with that prefix once per row, see packing.collate_shared_prefix, and the token budget
    counts it once: each step holds several times more lessons, so a run takes fewer, larger
    steps), 'same-steps' (the optimizer steps of today's packing, lesson for lesson, each
    micro-batch computed as one shared-prefix row: the same trajectory, less speed-up) or 'off'.
    lora_dropout defaults to 0.05 (the daemon's [train] default and the issue's LoRA config):
    fuse_lora_dropout keeps a 1-byte mask per adapter input instead of a dropped copy, so it costs
    about 4 GiB at 4096 tokens on CodeLlama-7B eager (nothing measurable when compiled) instead of 8.
    base_precision: 'auto' (on CUDA the memory plan's choice, memplan.py; on the CPU full precision),
    'bf16' (the GPU's dtype) or 'nf4' (frozen linear weights in 4-bit NF4, nf4.py);
    gpu_memory_gib: GPU memory the plan may use (0: what is free when training starts).
    """

    base_dir: Path
    dataset_dir: Path
    out_dir: Path
    checkpoint_dir: Path
    progress_path: Path
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: str | tuple[str, ...] = "all-linear"
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    epochs: int = 2
    tokens_per_batch: int = 4096
    grad_accum: int = 1
    max_seq_len: int = 2048
    seed: int = 0
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    device: str = "auto"
    attention: str = "auto"
    gradient_checkpointing: bool | str = "auto"
    adapter_compute: str = "auto"
    compile: str = "auto"
    fused_kernels: str = "auto"
    num_threads: int = 0
    base_precision: str = "auto"
    gpu_memory_gib: float = 0.0
    shared_prefix: str = "same-steps"

    def to_json(self) -> str:
        """The spec as a JSON object (paths as strings)."""
        values = dataclasses.asdict(self)
        for key, value in values.items():
            if isinstance(value, Path):
                values[key] = str(value)
            elif isinstance(value, tuple):
                values[key] = list(value)
        return json.dumps(values, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TrainSpec":
        """Parse a spec written by to_json; unknown keys are an error."""
        values = json.loads(text)
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise TrainError(f"unknown training spec keys: {', '.join(unknown)}")
        for key in ("base_dir", "dataset_dir", "out_dir", "checkpoint_dir", "progress_path"):
            if key in values:
                values[key] = Path(values[key])
        if isinstance(values.get("target_modules"), list):
            values["target_modules"] = tuple(values["target_modules"])
        return cls(**values)


@dataclass(frozen=True)
class TrainResult:
    """What a finished run reports. tokens counts every trained (non-pad) token."""

    adapter_dir: Path
    heldout_loss_before: float | None
    heldout_loss_after: float | None
    steps: int
    tokens: int
    labelled_tokens: int
    seconds: float
    tokens_per_s: float
    device: str
    dtype: str
    attention: str
    tokens_per_batch: int
    grad_accum: int
    resumed_from_step: int | None = None
    truncated_examples: int = 0
    gradient_checkpointing: bool = False
    adapter_compute: str = "float32"
    compiled: bool = False
    fused_kernels: str = "off"
    peak_gpu_memory_gib: float | None = None
    base_precision: str = "bf16"
    plan: dict | None = None
    shared_prefix: int = 0  # tokens held once per row (0: today's packing)

    def to_json(self) -> str:
        """The result as a JSON object."""
        values = dataclasses.asdict(self)
        values["adapter_dir"] = str(self.adapter_dir)
        return json.dumps(values, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TrainResult":
        """Parse a result written by to_json."""
        values = json.loads(text)
        values["adapter_dir"] = Path(values["adapter_dir"])
        return cls(**values)


# --------------------------------------------------------------------------- small pure pieces


def choose_device(requested: str) -> tuple[torch.device, torch.dtype]:
    """'auto' gives CUDA with bf16 when available, else CPU with fp32; 'cpu'/'cuda[:n]' force it."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"device {requested!r} requested but CUDA is not available")
    if device.type not in ("cuda", "cpu"):
        raise TrainError(f"unsupported training device {requested!r} (use auto, cpu or cuda)")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, dtype


def choose_attention(requested: str, device: torch.device) -> str:
    """The attention implementation: 'auto' gives, on CUDA, PyTorch's varlen flash attention
    over the packed lessons (torch >= 2.10, sm80+), else flash_attention_2 when flash_attn is
    installed, else sdpa; on CPU sdpa. Any other value is used as given (VARLEN_ATTENTION is
    registered with transformers when chosen)."""
    if requested == "auto":
        import importlib.util

        if varlen_available(device):
            requested = VARLEN_ATTENTION
        elif device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
            requested = "flash_attention_2"
        else:
            requested = "sdpa"
    if requested == VARLEN_ATTENTION:
        register_varlen_attention()
    return requested


def choose_adapter_compute(requested: str, dtype: torch.dtype) -> torch.dtype | None:
    """The dtype the LoRA matrices compute in under autocast, or None for peft's own fp32 upcast.

    'auto' gives the model's dtype when it is bf16/fp16 (no fp32 copy of every adapter input),
    None for fp32 models; 'float32' forces peft's upcast.
    """
    if requested not in ("auto", "float32"):
        raise TrainError(f"unknown adapter_compute {requested!r} (auto or float32)")
    if requested == "auto" and dtype in (torch.bfloat16, torch.float16):
        return dtype
    return None


def compute_context(device: torch.device, compute_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """autocast to compute_dtype on device for forward passes; a no-op when compute_dtype is None."""
    if compute_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=compute_dtype)


def activation_bytes_per_token(config: Any, lora_dropout: float, adapter_upcast: bool) -> int:
    """Rough bytes of activations kept for backward per token, without gradient checkpointing.

    Per decoder layer in bf16: two fp32 RMSNorm inputs (8 h), the normed inputs of the
    adapters (4 h), q, k, v and the attention output (8 h), the MLP's gate, up, SiLU and
    product (8 i); LoRA dropout (fuse_lora_dropout) a 1-byte mask of each of the 7 adapter
    inputs (6 h + i), peft's fp32 upcast a fp32 copy (24 h + 4 i). Calibrated against the
    measured peak of bench/train_gpu.py (CodeLlama-7B shape).
    """
    h = int(getattr(config, "hidden_size", 4096))
    i = int(getattr(config, "intermediate_size", 4 * h))
    layers = int(getattr(config, "num_hidden_layers", 32))
    per_layer = 20 * h + 8 * i
    if lora_dropout > 0:
        per_layer += 6 * h + i
    if adapter_upcast:
        per_layer += 24 * h + 4 * i
    return layers * per_layer


def needs_checkpointing(
    requested: bool | str, device: torch.device, tokens: int, bytes_per_token: int, vocab: int
) -> bool:
    """Whether to turn gradient checkpointing on: as requested, or for 'auto' on CUDA when the
    largest micro-batch's activations and logits would not fit in free GPU memory, on the CPU
    when its fp32 activations would pass CPU_ACTIVATION_BUDGET (cpu_needs_checkpointing)."""
    if isinstance(requested, bool):
        return requested
    if requested in ("on", "off", OFFLOAD):
        return requested != "off"
    if requested != "auto":
        raise TrainError(f"unknown gradient_checkpointing {requested!r} (auto, on, off or offload)")
    if device.type != "cuda":
        return cpu_needs_checkpointing(tokens, bytes_per_token)
    free, _ = torch.cuda.mem_get_info(device)
    logits = tokens * vocab * 4 * 3  # bf16 logits, their fp32 copy and its gradient
    margin = 2 << 30
    return tokens * bytes_per_token + logits + margin > free


def gpu_memory_available(device: torch.device, configured_gib: float) -> int:
    """Bytes the memory plan may use: configured_gib when set, else what is free now (capped by
    torch.cuda.set_per_process_memory_fraction when a fraction was set), plus what torch holds."""
    if configured_gib > 0:
        return int(configured_gib * 2**30)
    free, total = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device)
    fraction = torch.cuda.get_per_process_memory_fraction(device) if hasattr(
        torch.cuda, "get_per_process_memory_fraction") else 1.0
    return int(min(free, fraction * total))


def check_gpu(device: torch.device) -> None:
    """TrainError naming the fix when the GPU cannot train in bf16 (compute capability < 8.0)."""
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 0):
        raise TrainError(
            f"GPU {torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) is too old for "
            "bf16 training (needs 8.0, Ampere or newer): train on the CPU ([train] device = cpu)"
        )


def choose_plan(spec: TrainSpec, device: torch.device, config: Any, longest: int,
                logit_fraction: float = 1.0) -> "Plan | None":
    """The GPU memory plan (memplan.plan) for this run, or None on the CPU.

    logit_fraction: the share of positions whose logits the loss computes (labelled ones).

    Raises TrainError before training when no plan fits, or nf4 is asked for without torchao.
    """
    from lacd.pipeline.memplan import PlanError, Shape, plan

    if spec.base_precision not in ("auto", "bf16", "nf4"):
        raise TrainError(f"unknown base_precision {spec.base_precision!r} (auto, bf16 or nf4)")
    if device.type != "cuda":
        return None
    check_gpu(device)
    requested = spec.gradient_checkpointing
    checkpointing = requested if isinstance(requested, str) else ("on" if requested else "off")
    try:
        chosen = plan(
            Shape.of(config), gpu_memory_available(device, spec.gpu_memory_gib), precision=spec.base_precision,
            checkpointing=checkpointing, tokens_per_batch=spec.tokens_per_batch, grad_accum=spec.grad_accum,
            longest=longest, lora_r=spec.lora_r, lora_dropout=spec.lora_dropout,
            logit_fraction=logit_fraction,
        )
    except PlanError as exc:
        raise TrainError(str(exc)) from None
    if chosen.precision == "nf4":
        _require_nf4()
    return chosen


def _require_nf4() -> None:
    """TrainError naming the fix when torchao (the NF4 storage) is not installed."""
    from lacd.pipeline.nf4 import NF4Unavailable, nf4_tensor_class

    try:
        nf4_tensor_class()
    except NF4Unavailable as exc:
        raise TrainError(str(exc)) from None

# Host memory the activations of one CPU micro-batch may take before gradient checkpointing
# turns on: SmolLM2-135M keeps ~1.7 MB a token in fp32, 7 GB at the default 4096 tokens (most
# of the 12.1 GB the train child peaked at); checkpointed it keeps one layer's worth plus each
# layer's input and stays under 2 GB (bench/train_prefix.py measures the peak RSS).
CPU_ACTIVATION_BUDGET = 1 << 30


def cpu_needs_checkpointing(tokens: int, bytes_per_token: int) -> bool:
    """Whether a CPU micro-batch of `tokens` tokens needs gradient checkpointing to keep its
    activations within CPU_ACTIVATION_BUDGET (bytes_per_token is the bf16 estimate; the CPU
    trains in fp32, twice that)."""
    return tokens * bytes_per_token * 2 > CPU_ACTIVATION_BUDGET


def apply_fused_kernels(model: torch.nn.Module, requested: str, device: torch.device, compiling: bool) -> str:
    """Liger's fused RMSNorm, SwiGLU and RoPE kernels on the base model (before LoRA wraps it).

    'off' does nothing; 'liger' requires liger_kernel; 'auto' uses it on CUDA when installed
    and the layers are not compiled (torch.compile fuses the same operations; the two together
    were not measured). Returns what was applied ('liger' or 'off'). Liger's fused
    cross-entropy is not used: the loss here only computes the labelled positions' logits.
    """
    if requested not in ("auto", "liger", "off"):
        raise TrainError(f"unknown fused_kernels {requested!r} (auto, liger or off)")
    if requested == "off" or (requested == "auto" and (device.type != "cuda" or compiling)):
        return "off"
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        if requested == "liger":
            raise TrainError("fused_kernels = liger needs the liger-kernel package") from None
        return "off"
    _apply_liger_kernel_to_instance(
        model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
        fused_linear_cross_entropy=False,
    )
    return "liger"


# A cold compile cost ~34 s on an H100 (CodeLlama-7B shape) and saved ~30 us a token (10.7k ->
# 15.7k tokens/s): it pays for itself from about 1.1M trained tokens (bench/train_gpu.py).
COMPILE_MIN_TOKENS = 1_000_000


def should_compile(requested: str, device: torch.device, planned_tokens: int) -> bool:
    """'on'/'off' as said; 'auto' on CUDA when the run trains at least COMPILE_MIN_TOKENS tokens."""
    if requested not in ("auto", "on", "off"):
        raise TrainError(f"unknown compile {requested!r} (auto, on or off)")
    if requested == "auto":
        return device.type == "cuda" and planned_tokens >= COMPILE_MIN_TOKENS
    return requested == "on"


def compile_layers(model: torch.nn.Module, fall_back: bool) -> bool:
    """torch.compile each decoder layer in place. Returns whether it did.

    All layers share one compiled graph; the first two steps pay the compile (static shapes,
    then dynamic ones once a second length is seen; dynamic=True from the start compiled for
    ~90 s instead of ~34 s). fall_back: run eager if compiling fails (no working compiler, say).
    Evaluation runs eager (see evaluate).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else getattr(base, "model", None)
    layers = getattr(decoder, "layers", None)
    if not layers:
        log.warning("compile_skipped", reason="no decoder layers found")
        return False
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))
    if fall_back:
        torch._dynamo.config.suppress_errors = True
    for layer in layers:
        layer.compile()
    return True


def _disable_adapter_upcast(model: torch.nn.Module) -> None:
    """Stop peft from copying every adapter input to fp32; autocast runs the adapters instead."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False


class _InputDropoutLinear(torch.autograd.Function):
    """linear(dropout(x), weight) that keeps only dropout's 1-byte mask for backward.

    peft computes lora_A(dropout(x)): autograd then keeps, for every adapter, the
    dropped copy of x (lora_A's weight gradient needs it) and dropout's mask: 3 bytes
    per input element in bf16, 8 GiB at 4096 tokens on CodeLlama-7B. Here backward
    rebuilds the dropped copy from x (kept anyway: the adapters without dropout keep
    it too, and q, k and v share it) and the mask. Same values, same gradients.
    Under autocast the matmuls run in the autocast dtype, as peft's would.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, p: float) -> torch.Tensor:
        dropped, mask = torch.native_dropout(x, p, True)
        ctx.save_for_backward(x, weight, mask)
        ctx.scale = 1.0 / (1.0 - p)
        return F.linear(dropped, weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, weight, mask = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.native_dropout_backward(grad @ weight.to(grad.dtype), mask, ctx.scale)
            grad_x = grad_x.to(x.dtype)
        if ctx.needs_input_grad[1]:
            dropped = torch.ops.aten.native_dropout_backward(x, mask, ctx.scale).to(grad.dtype)
            grad_w = grad.reshape(-1, grad.shape[-1]).t() @ dropped.reshape(-1, dropped.shape[-1])
            grad_w = grad_w.to(weight.dtype)
        return grad_x, grad_w, None


class InputDropoutLinear(torch.nn.Linear):
    """A LoRA A matrix that applies the adapter's dropout to its own input (see fuse_lora_dropout)."""

    input_dropout: float = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Dropout then the bias-free linear while training; the plain linear otherwise."""
        if self.training and self.input_dropout > 0 and self.bias is None:
            return _InputDropoutLinear.apply(x, self.weight, self.input_dropout)
        return F.linear(x, self.weight, self.bias)


def fuse_lora_dropout(model: torch.nn.Module) -> int:
    """Move each LoRA adapter's dropout into its A matrix, so backward keeps a 1-byte mask per
    input element instead of a dropped copy and a mask (the same dropout, the same maths).

    The A matrix becomes an InputDropoutLinear (same parameters and state-dict names) and
    peft's dropout module an Identity. Returns how many adapters were changed.
    """
    from peft.tuners.lora.layer import Linear as LoraLinear

    changed = 0
    for module in model.modules():
        if not isinstance(module, LoraLinear):
            continue
        for name, dropout in list(module.lora_dropout.items()):
            linear = module.lora_A[name] if name in module.lora_A else None
            if (not isinstance(dropout, torch.nn.Dropout) or dropout.p <= 0 or type(linear) is not torch.nn.Linear
                    or linear.bias is not None or name in getattr(module, "lora_variant", {})):
                continue
            linear.__class__ = InputDropoutLinear
            linear.input_dropout = float(dropout.p)
            module.lora_dropout[name] = torch.nn.Identity()
            changed += 1
    return changed


def warmup_steps(warmup_ratio: float, total_steps: int) -> int:
    """Warmup steps of a run: warmup_ratio x total_steps rounded to the nearest step.

    transformers rounds up; here a run too short for one whole warmup step (under 10 steps at
    the default 0.05, like the quick start's) gets none, instead of spending its first step at
    lr 0 (lr_factor). From 10 steps on the two agree wherever the product is at least half a
    step above a whole number (40 steps: 2 either way).
    """
    return math.floor(warmup_ratio * total_steps + 0.5)


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based).

    Linear warmup from 0 at step 0 to 1.0 at step warmup_steps, then cosine or
    linear decay towards 0 at total_steps; 'constant' stays at 1. This is the
    schedule of transformers' get_cosine_schedule_with_warmup (and torchtune's):
    the same learning rate at every step as the Trainer recipe lacd is compared
    with. A warmup that started above 0 ((step + 1) / (warmup + 1)) was measured
    on the bench: with the textbook's own batches and LoRA init it overshot at
    step 7 (loss up 0.23 where the Trainer's went down 0.9) and stayed ~0.2 behind.
    """
    if step < warmup_steps:
        return step / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    raise TrainError(f"unknown learning-rate schedule {schedule!r} (cosine, linear or constant)")


@dataclass(frozen=True)
class PlannedStep:
    """One optimizer step: its epoch and its micro-batches (lists of example indices)."""

    epoch: int
    micro_batches: tuple[tuple[int, ...], ...]


def plan_steps(
    lengths: Sequence[int], tokens_per_batch: int, grad_accum: int, epochs: int, seed: int, prefix_len: int = 0
) -> list[PlannedStep]:
    """All optimizer steps of a run, a pure function of the data and the spec.

    Each epoch shuffles the examples by (seed, epoch) and packs them first-fit
    in that order, so a micro-batch holds lessons of mixed lengths, as a random
    batch would (first-fit decreasing would put the long lessons together and
    the ~1000-token ones together: noisier steps, a different loss curve than
    random batches). Consecutive groups of grad_accum micro-batches form a
    step, and no step spans two epochs. Being pure, the global step number
    alone is the data position of a checkpoint. prefix_len > 0: the lessons share that
    many leading tokens, held once per row, so the budget counts them once per row.
    """
    steps: list[PlannedStep] = []
    for epoch in range(epochs):
        order = list(range(len(lengths)))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        if prefix_len:
            groups = pack_shared_prefix(lengths, prefix_len, tokens_per_batch, order)
        else:
            groups = pack(lengths, tokens_per_batch, order)
        batches = [tuple(group) for group in groups]
        for start in range(0, len(batches), grad_accum):
            group = batches[start : start + grad_accum]
            steps.append(PlannedStep(epoch=epoch, micro_batches=group))
    return steps


def token_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of cross-entropy over targets that are not -100 (logits upcast to fp32)."""
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


VARLEN_KWARG_IMPLEMENTATIONS = (VARLEN_ATTENTION, "flash_attention_2", "flash_attention_3")


def _varlen_kwargs(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], device: torch.device) -> dict:
    """Lesson boundaries for attention implementations that read them (no host sync per layer)."""
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if implementation not in VARLEN_KWARG_IMPLEMENTATIONS or "cu_seq_lens" not in batch:
        return {}
    cu = batch["cu_seq_lens"].to(device, non_blocking=True)
    longest = int(batch["max_length"])
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


# Logits are computed LOSS_CHUNK_ELEMENTS at a time (fp32: 128 MiB) and recomputed in backward,
# so no [tokens x vocab] tensor of a whole micro-batch ever exists: on SmolLM2 (49k vocabulary)
# that is ~680 labelled positions per chunk.
LOSS_CHUNK_ELEMENTS = 1 << 25

# Lessons share a prefix worth holding once per row from this many tokens on (TrainSpec.shared_prefix).
MIN_SHARED_PREFIX = 16


def _decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The decoder (last hidden states) and the output projection of a causal LM, peft-wrapped or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


def _head_loss(head: torch.nn.Module, softcap: float | None, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of one chunk: the output projection, the model's softcap if any, fp32 loss."""
    logits = head(hidden)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return token_loss_sum(logits, targets)


def chunked_loss_sum(model: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed next-token loss of hidden states (N, H) against targets (N,), the logits computed
    in chunks of LOSS_CHUNK_ELEMENTS; with autograd on each chunk is recomputed in backward
    (activation checkpointing) instead of its logits being kept."""
    from torch.utils.checkpoint import checkpoint

    _, head = _decoder_and_head(model)
    softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    chunk = max(1, LOSS_CHUNK_ELEMENTS // int(head.weight.shape[0]))
    total = None
    for start in range(0, hidden.shape[0], chunk):
        part_hidden, part_targets = hidden[start : start + chunk], targets[start : start + chunk]
        if torch.is_grad_enabled() and part_hidden.requires_grad:
            part = checkpoint(_head_loss, head, softcap, part_hidden, part_targets, use_reentrant=False)
        else:
            part = _head_loss(head, softcap, part_hidden, part_targets)
        total = part if total is None else total + part
    return total if total is not None else hidden.new_zeros((), dtype=torch.float32)


def uses_shared_prefix(model: torch.nn.Module) -> bool:
    """Whether the model's attention implementation computes shared-prefix rows (VARLEN_ATTENTION)."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None) == VARLEN_ATTENTION


def _shared_prefix_kwargs(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict:
    """Attention kwargs of a shared-prefix row: a FlexAttention block mask when training on CUDA,
    else the prefix length and boundaries for the per-lesson sdpa path."""
    prefix = int(batch["prefix_len"])
    if device.type == "cuda" and torch.is_grad_enabled():
        total = int(batch["input_ids"].shape[1])
        return {"prefix_block_mask": prefix_block_mask(batch["cu_seq_lens"], prefix, total, device)}
    return {"shared_prefix_len": prefix, "shared_prefix_cu": batch["cu_seq_lens"]}


def loss_sum(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """Summed next-token loss of a collated batch, or None if nothing in it is labelled.

    The batch may be on the CPU: it is moved to the model's device here, after
    the labelled positions are found (so no host sync on the GPU). Packed rows
    (position_ids, no attention_mask, batch of one) run the decoder, then gather the
    hidden states of positions whose next token is labelled and compute the loss
    from them in chunks (chunked_loss_sum): no logits for prompts and tool outputs,
    never logits of the whole row at once. collate_packed rows pass the lesson
    boundaries to varlen attention; collate_shared_prefix rows (predict_at, targets)
    pass the prefix to shared_prefix_attention and need VARLEN_ATTENTION. Padded
    batches (attention_mask) compute all logits: that is the reference path.
    """
    device = next(model.parameters()).device
    if "attention_mask" in batch:
        targets = batch["labels"][:, 1:]
        logits = model(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            use_cache=False,
        ).logits
        return token_loss_sum(logits[:, :-1], targets.to(device))
    if batch["input_ids"].shape[0] != 1:
        raise ValueError("packed batches hold exactly one row")
    if "predict_at" in batch:
        if not uses_shared_prefix(model):
            raise ValueError(f"shared-prefix rows need the {VARLEN_ATTENTION} attention implementation")
        keep, targets = batch["predict_at"], batch["targets"]
        attention = _shared_prefix_kwargs(batch, device)
    else:
        shifted = batch["labels"][0, 1:]
        keep = (shifted != IGNORE_INDEX).nonzero().squeeze(1)
        targets = shifted[keep]
        attention = _varlen_kwargs(model, batch, device)
    if keep.numel() == 0:
        return None
    decoder, _ = _decoder_and_head(model)
    hidden = decoder(
        input_ids=batch["input_ids"].to(device, non_blocking=True),
        position_ids=batch["position_ids"].to(device, non_blocking=True),
        use_cache=False,
        **attention,
    ).last_hidden_state[0]
    return chunked_loss_sum(model, hidden.index_select(0, keep.to(device, non_blocking=True)),
                            targets.to(device, non_blocking=True))


def data_fingerprint(spec: TrainSpec, examples: Sequence[Mapping[str, Sequence[int]]], prefix_len: int = 0) -> str:
    """Hash of what decides the training trajectory: data, model, LoRA and optimizer settings.

    A checkpoint is resumed only when its fingerprint matches, so a retry with a
    different micro-batch (out-of-memory) or new data starts over cleanly.
    """
    digest = hashlib.sha256()
    trajectory = {
        name: getattr(spec, name)
        for name in (
            "lora_r", "lora_alpha", "lora_dropout", "learning_rate", "weight_decay", "schedule",
            "warmup_ratio", "max_grad_norm", "epochs", "tokens_per_batch", "grad_accum",
            "max_seq_len", "seed",
        )
    }
    trajectory["base_dir"] = str(Path(spec.base_dir).resolve())
    trajectory["plan"] = "shuffled-first-fit"  # plan_steps' packing: older checkpoints followed another order
    trajectory["warmup"] = "from-zero-rounded"  # lr_factor, warmup_steps: older checkpoints had another schedule
    if spec.base_precision == "nf4":  # another base: a bf16 checkpoint is not resumed on it (nor the reverse)
        trajectory["base_precision"] = "nf4"
    if prefix_len and spec.shared_prefix == "auto":  # the prefix counted once: another packing plan
        trajectory["shared_prefix"] = prefix_len
    modules = spec.target_modules
    trajectory["target_modules"] = modules if isinstance(modules, str) else list(modules)
    digest.update(json.dumps(trajectory, sort_keys=True).encode())
    for example in examples:
        digest.update(json.dumps([example["input_ids"], example["labels"]]).encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------- files


def complete_checkpoints(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first."""
    found = []
    if not checkpoint_dir.is_dir():
        return found
    for folder in checkpoint_dir.iterdir():
        suffix = folder.name[len(CHECKPOINT_PREFIX):]
        if folder.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit():
            if (folder / COMPLETE_MARKER).is_file():
                found.append((int(suffix), folder))
    return sorted(found)


@contextlib.contextmanager
def checkpoint_lock(checkpoint_dir: Path, timeout_s: float = 60.0) -> Iterator[None]:
    """Hold an exclusive lock on the checkpoint folder, so two trainers never share it."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    with open(checkpoint_dir / ".lock", "w") as handle:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TrainError(
                        f"another training process holds {checkpoint_dir}; not starting a second one"
                    ) from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _rng_state() -> dict:
    """The RNG states dropout draws from (CPU and every CUDA device)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what _rng_state saved."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- data


def load_examples(dataset_dir: Path, split: str, max_seq_len: int) -> tuple[list[dict], int]:
    """Rows (input_ids, labels) of one split, truncated to max_seq_len; and how many were truncated.

    A missing heldout split gives no rows; a missing train split is an error.
    """
    from datasets import load_from_disk

    if not Path(dataset_dir).is_dir():
        raise TrainError(f"formatted dataset not found at {dataset_dir}")
    try:
        splits = load_from_disk(str(dataset_dir))
    except (FileNotFoundError, ValueError) as exc:
        raise TrainError(f"cannot read the formatted dataset at {dataset_dir}: {exc}") from exc
    if split not in splits:
        if split == "train":
            raise TrainError(f"dataset at {dataset_dir} has no 'train' split")
        return [], 0
    rows = splits[split].select_columns(["input_ids", "labels"]).to_list()
    truncated = 0
    for row in rows:
        if len(row["input_ids"]) != len(row["labels"]):
            raise TrainError(f"dataset at {dataset_dir}: input_ids and labels differ in length")
        if len(row["input_ids"]) > max_seq_len:
            row["input_ids"] = row["input_ids"][:max_seq_len]
            row["labels"] = row["labels"][:max_seq_len]
            truncated += 1
    return rows, truncated


def _eager() -> contextlib.AbstractContextManager:
    """Run compiled modules eagerly (a few evaluation passes are not worth a second compile)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


SHARED_PREFIX_MODES = ("auto", "same-steps", "off")


def shared_prefix_length(requested: str, examples: Sequence[Mapping[str, Sequence[int]]]) -> int:
    """The prefix all examples share, when TrainSpec.shared_prefix (SHARED_PREFIX_MODES) lets it be
    held once per row: at least MIN_SHARED_PREFIX tokens, else 0 (today's packing)."""
    if requested not in SHARED_PREFIX_MODES:
        raise TrainError(f"unknown shared_prefix {requested!r} ({', '.join(SHARED_PREFIX_MODES)})")
    if requested == "off":
        return 0
    length = common_prefix_length([e["input_ids"] for e in examples])
    return length if length >= MIN_SHARED_PREFIX else 0


def use_shared_prefix_attention(model: torch.nn.Module) -> str:
    """Switch a loaded model to VARLEN_ATTENTION, which also computes shared-prefix rows (packed
    rows only: generation needs the attention it had). Returns the implementation it had."""
    register_varlen_attention()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    previous = base.config._attn_implementation
    base.set_attn_implementation(VARLEN_ATTENTION)
    return previous


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    examples: Sequence[Mapping],
    tokens_per_batch: int,
    device: torch.device,
    compute_dtype: torch.dtype | None = None,
) -> float | None:
    """Mean loss per labelled token over examples (None when nothing is labelled).

    compute_dtype: autocast dtype of the forward passes (the recipe's adapter compute).
    Examples that share a prefix are evaluated in shared-prefix rows when the model's
    attention computes them (uses_shared_prefix): the prefix's keys and values are
    computed once per row and every held-out lesson's tokens attend to them.
    """
    if not examples:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    lengths = [len(e["input_ids"]) for e in examples]
    prefix = shared_prefix_length("auto", examples) if uses_shared_prefix(model) else 0
    groups = pack_shared_prefix(lengths, prefix, tokens_per_batch) if prefix else pack(lengths, tokens_per_batch)
    for group in groups:
        rows = [examples[i] for i in group]
        batch = collate_shared_prefix(rows) if prefix else collate_packed(rows)
        with compute_context(device, compute_dtype), _eager():
            summed = loss_sum(model, batch)
        if summed is not None:
            total += float(summed)
            count += labelled_token_count(batch)
    model.train(was_training)
    return total / count if count else None


# --------------------------------------------------------------------------- the recipe


@dataclass
class _Counters:
    """Cumulative numbers carried across resumes in the checkpoint state."""

    step: int = 0
    tokens: int = 0
    labelled_tokens: int = 0
    seconds: float = 0.0
    heldout_loss_before: float | None = None


@dataclass
class LoRARecipe:
    """One run of the train stage: setup, train, save, cleanup.

    base_model: an already loaded base model on the chosen device and dtype, used
    instead of loading spec.base_dir (bench/train_gpu.py builds a random 7B one);
    the recipe wraps it with LoRA in place, so unload the adapters afterwards.
    """

    spec: TrainSpec
    on_progress: ProgressCallback | None = None
    counters: _Counters = field(default_factory=_Counters)
    resumed_from_step: int | None = None
    base_model: torch.nn.Module | None = None

    # ---- setup

    def setup(self) -> None:
        """Choose the device, load data and model, wrap it with LoRA, build the optimizer, resume."""
        spec = self.spec
        if spec.num_threads > 0:
            torch.set_num_threads(spec.num_threads)
        self.device, self.dtype = choose_device(spec.device)
        self.attention = choose_attention(spec.attention, self.device)
        self.compute_dtype = choose_adapter_compute(spec.adapter_compute, self.dtype)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._report("setup")
        self.train_rows, truncated = load_examples(spec.dataset_dir, "train", spec.max_seq_len)
        self.heldout_rows, truncated_heldout = load_examples(spec.dataset_dir, "heldout", spec.max_seq_len)
        self.truncated = truncated + truncated_heldout
        if not self.train_rows:
            raise TrainError(f"dataset at {spec.dataset_dir} has no training examples")
        spec = self._apply_memory_plan()
        self.prefix_len = shared_prefix_length(spec.shared_prefix, self.train_rows)
        if self.prefix_len and self.attention != VARLEN_ATTENTION:
            if spec.attention == "auto":  # the CPU's sdpa: VARLEN_ATTENTION computes shared-prefix rows
                self.attention = choose_attention(VARLEN_ATTENTION, self.device)
            else:
                self.prefix_len = 0
        self.steps = plan_steps(
            [len(row["input_ids"]) for row in self.train_rows],
            spec.tokens_per_batch, spec.grad_accum, spec.epochs, spec.seed,
            self.prefix_len if spec.shared_prefix == "auto" else 0,
        )
        self.fingerprint = data_fingerprint(spec, self.train_rows, self.prefix_len)
        self.model = self._load_model()
        self.optimizer = self._build_optimizer()
        warmup = warmup_steps(spec.warmup_ratio, len(self.steps))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, warmup, len(self.steps), spec.schedule)
        )
        log.info(
            "train_setup", device=str(self.device), dtype=str(self.dtype).removeprefix("torch."),
            attention=self.attention, adapter_compute=self._adapter_compute_name(),
            gradient_checkpointing=self.checkpointing, compiled=self.compiled,
            fused_kernels=self.fused_kernels, shared_prefix=self.prefix_len, torch=torch.__version__,
            gpu=torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None,
            train_examples=len(self.train_rows),
            heldout_examples=len(self.heldout_rows), truncated=self.truncated,
            total_steps=len(self.steps), tokens_per_batch=spec.tokens_per_batch,
            grad_accum=spec.grad_accum, trainable_params=self._trainable_count(),
            base_precision=self.precision, plan=self.plan.describe() if self.plan else None,
        )
        if not self._resume():
            self._report("eval_before")
            self.counters.heldout_loss_before = evaluate(
                self.model, self.heldout_rows, spec.tokens_per_batch, self.device, self.compute_dtype
            )

    def _apply_memory_plan(self) -> TrainSpec:
        """Choose the memory plan (CUDA) and the base precision; the plan's micro-batch and
        accumulation replace the spec's. Returns the spec to train with."""
        spec = self.spec
        config = self.base_model.config if self.base_model is not None else self._base_config()
        longest = max(len(row["input_ids"]) for row in self.train_rows)
        self.plan = choose_plan(spec, self.device, config, longest, self._logit_fraction())
        if self.plan is not None:
            self.precision = self.plan.precision
            self.spec = dataclasses.replace(spec, tokens_per_batch=self.plan.tokens_per_batch,
                                            grad_accum=self.plan.grad_accum, base_precision=self.precision)
            log.info("train_plan", plan=self.plan.describe(), **self.plan.to_dict())
        elif spec.base_precision == "nf4":
            _require_nf4()
            self.precision = "nf4"
        else:
            self.precision = str(self.dtype).removeprefix("torch.")
        return self.spec

    def _logit_fraction(self) -> float:
        """The labelled share of the training tokens, with head-room for a micro-batch of
        answer-heavy lessons (x1.5, at most 1): the loss computes logits only there."""
        labelled = sum(sum(1 for x in row["labels"] if x != IGNORE_INDEX) for row in self.train_rows)
        total = sum(len(row["labels"]) for row in self.train_rows)
        return min(1.0, 1.5 * labelled / max(total, 1))

    def _base_config(self) -> Any:
        """The base model's transformers config (TrainError when the folder has none)."""
        from transformers import AutoConfig

        if not (Path(self.spec.base_dir) / "config.json").is_file():
            raise TrainError(f"base model folder {self.spec.base_dir} has no config.json")
        return AutoConfig.from_pretrained(self.spec.base_dir)

    def _adapter_compute_name(self) -> str:
        """The dtype the LoRA matrices compute in, as a word for logs and results."""
        return "float32" if self.compute_dtype is None else str(self.compute_dtype).removeprefix("torch.")

    def _largest_micro_batch(self) -> int:
        """Tokens of the largest packed micro-batch of the run."""
        shared = self.prefix_len if self.spec.shared_prefix == "auto" else 0
        lengths = [len(row["input_ids"]) - shared for row in self.train_rows]
        return max(shared + sum(lengths[i] for i in group)
                   for step in self.steps for group in step.micro_batches)

    def _load_base(self) -> torch.nn.Module:
        """The base model from spec.base_dir on the chosen device, dtype and attention."""
        from transformers import AutoModelForCausalLM

        spec = self.spec
        if not (Path(spec.base_dir) / "config.json").is_file():
            raise TrainError(f"base model folder {spec.base_dir} has no config.json")
        if self.precision == "nf4":
            from lacd.pipeline.nf4 import load_nf4_base

            try:
                return load_nf4_base(Path(spec.base_dir), self.device, self.dtype, self.attention)
            except (OSError, ValueError) as exc:
                raise TrainError(f"cannot load the base model in 4 bits: {exc}") from exc
        kwargs = {"device_map": str(self.device)} if self.device.type == "cuda" else {}
        return AutoModelForCausalLM.from_pretrained(
            spec.base_dir, dtype=self.dtype, attn_implementation=self.attention, **kwargs
        )

    def _load_model(self) -> torch.nn.Module:
        """The base model on the chosen device, wrapped with fresh LoRA adapters (seeded),
        with the speed settings applied: fused kernels, checkpointing, adapter dtype, compile."""
        from peft import LoraConfig, get_peft_model

        spec = self.spec
        model = self._load_base() if self.base_model is None else self.base_model
        if self.precision == "nf4" and self.base_model is not None:
            from lacd.pipeline.nf4 import quantize_linears

            quantize_linears(model)  # a no-op on a base already quantized (bench/train_gpu.py)
        if model.config._attn_implementation != self.attention:
            model.set_attn_implementation(self.attention)
        model.config.use_cache = False
        planned = sum(len(self.train_rows[i]["input_ids"])
                      for step in self.steps for group in step.micro_batches for i in group)
        # compiling the layers around NF4's autograd function was not measured: 'auto' stays eager there
        compiling = should_compile(spec.compile, self.device, planned) and not (
            spec.compile == "auto" and self.precision == "nf4")
        self.fused_kernels = apply_fused_kernels(model, spec.fused_kernels, self.device, compiling)
        per_token = activation_bytes_per_token(model.config, spec.lora_dropout, self.compute_dtype is None)
        self.offload = spec.gradient_checkpointing == OFFLOAD and self.device.type == "cuda"
        if self.plan is not None and spec.gradient_checkpointing == "auto":
            self.checkpointing = self.plan.gradient_checkpointing
            self.offload = self.plan.offload
        else:
            self.checkpointing = needs_checkpointing(
                spec.gradient_checkpointing, self.device, self._largest_micro_batch(), per_token,
                int(getattr(model.config, "vocab_size", 32000)),
            )
        if self.checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        targets = spec.target_modules if isinstance(spec.target_modules, str) else list(spec.target_modules)
        lora = LoraConfig(
            r=spec.lora_r, lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout,
            target_modules=targets, task_type="CAUSAL_LM",
        )
        torch.manual_seed(spec.seed)
        model = get_peft_model(model, lora)
        if self.compute_dtype is not None:
            _disable_adapter_upcast(model)
        fuse_lora_dropout(model)
        self.compiled = compiling and compile_layers(model, fall_back=spec.compile == "auto")
        model.train()
        return model

    def _trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The LoRA parameters, in a fixed order."""
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def _trainable_count(self) -> int:
        """Number of trainable (LoRA) parameters."""
        return sum(p.numel() for _, p in self._trainable())

    def _build_optimizer(self) -> torch.optim.Optimizer:
        """AdamW over the LoRA parameters; the fused kernel on CUDA."""
        params = [p for _, p in self._trainable()]
        return torch.optim.AdamW(
            params, lr=self.spec.learning_rate, weight_decay=self.spec.weight_decay,
            fused=self.device.type == "cuda",
        )

    def _resume(self) -> bool:
        """Load the newest complete checkpoint of this trajectory, if any. True if resumed.

        Half-written checkpoints (temporary folders of a killed run) are removed first.
        """
        for stale in Path(self.spec.checkpoint_dir).glob(f".tmp-{CHECKPOINT_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
        for step, folder in reversed(complete_checkpoints(self.spec.checkpoint_dir)):
            state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
            if state.get("fingerprint") != self.fingerprint:
                log.warning("checkpoint_ignored", checkpoint=folder.name, reason="different data or settings")
                continue
            self._load_checkpoint(folder, state)
            self.resumed_from_step = step
            log.info("train_resumed", step=step, total_steps=len(self.steps))
            return True
        return False

    def _load_checkpoint(self, folder: Path, state: Mapping[str, Any]) -> None:
        """Restore adapter weights, optimizer, scheduler, RNG and counters from folder."""
        from safetensors.torch import load_file

        weights = load_file(folder / "adapter.safetensors")
        params = dict(self._trainable())
        if set(weights) != set(params):
            raise TrainError(f"checkpoint {folder} does not match the model's LoRA parameters")
        with torch.no_grad():
            for name, tensor in weights.items():
                params[name].copy_(tensor)
        self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
        self.scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
        _set_rng_state(torch.load(folder / "rng.pt", weights_only=True))
        self.counters = _Counters(**state["counters"])

    # ---- train

    def train(self) -> None:
        """Run the planned optimizer steps from the current one to the end."""
        spec = self.spec
        started = time.monotonic()
        tokens_here = 0
        total = len(self.steps)
        first = self.counters.step
        last_checkpoint = time.monotonic()
        for index in range(first, total):
            self._step_aside_if_asked(index > first)
            step_started = time.monotonic()
            loss, tokens, labelled = self._optimizer_step(self.steps[index])
            self.counters.step = index + 1
            self.counters.tokens += tokens
            self.counters.labelled_tokens += labelled
            self.counters.seconds += time.monotonic() - step_started
            tokens_here += tokens
            elapsed = max(time.monotonic() - started, 1e-9)
            done_here = index + 1 - (self.resumed_from_step or 0)
            self._report(
                "train", loss=loss, epoch=self.steps[index].epoch, tokens=self.counters.tokens,
                tokens_per_s=tokens_here / elapsed,
                eta_s=(total - index - 1) * elapsed / max(done_here, 1),
            )
            log.debug("train_step", step=index + 1, total_steps=total, loss=loss)
            if self.plan is not None and not getattr(self, "_calibrated", False):
                self._calibrated = True
                self._log_calibration()
            every = spec.checkpoint_every
            overdue = time.monotonic() - last_checkpoint > CHECKPOINT_MAX_S
            if (every > 0 and self.counters.step % every == 0) or self.counters.step == total or overdue:
                self._save_checkpoint()
                last_checkpoint = time.monotonic()

    def _step_aside_if_asked(self, progressed: bool) -> None:
        """At a step boundary: when the parent asked to pause, checkpoint this step (if any was done
        here) and leave; resuming from it is bit-exact like resuming from any checkpoint."""
        if not PAUSE_REQUEST.is_set():
            return
        if progressed and not (Path(self.spec.checkpoint_dir) / f"{CHECKPOINT_PREFIX}{self.counters.step}").is_dir():
            self._save_checkpoint()
        log.info("train_paused", step=self.counters.step)
        raise TrainPaused(f"paused at step {self.counters.step}")

    def _offloading(self) -> contextlib.AbstractContextManager:
        """Tensors saved for backward during the forward go to pinned host memory (plan 'offload'):
        with checkpointing these are the layer inputs; recomputed activations stay on the GPU."""
        if not getattr(self, "offload", False):
            return contextlib.nullcontext()
        return torch.autograd.graph.save_on_cpu(pin_memory=True)

    def _log_calibration(self) -> None:
        """After the first step: the plan's expected peak against the measured one."""
        measured = torch.cuda.max_memory_allocated(self.device)
        log.info("train_plan_calibration", expected_gib=round(self.plan.expected_peak / 2**30, 2),
                 measured_gib=round(measured / 2**30, 2), ratio=round(measured / max(self.plan.expected_peak, 1), 3))

    def _collate(self, rows: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, torch.Tensor]:
        """One micro-batch row: shared-prefix when the run shares one (padded to FlexAttention's
        128-token blocks on CUDA, so few distinct shapes are compiled), else today's packing."""
        if not self.prefix_len:
            return collate_packed(rows)
        return collate_shared_prefix(rows, pad_to_multiple=128 if self.device.type == "cuda" else 1)

    def _optimizer_step(self, planned: PlannedStep) -> tuple[float | None, int, int]:
        """Forward/backward every micro-batch of one step, then clip and step.

        Each micro-batch's summed loss is divided by the labelled tokens of the
        whole step, so the gradient is that of the mean over the step's tokens.
        Returns (mean loss or None, trained tokens, labelled tokens).
        """
        batches = [self._collate([self.train_rows[i] for i in group]) for group in planned.micro_batches]
        labelled = sum(labelled_token_count(b) for b in batches)
        tokens = sum(lesson_token_count(b) for b in batches)
        self.optimizer.zero_grad(set_to_none=True)
        summed = torch.zeros((), device=self.device)
        for batch in batches:
            with compute_context(self.device, self.compute_dtype), self._offloading():
                batch_loss = loss_sum(self.model, batch)
            if batch_loss is None:
                continue
            (batch_loss / max(labelled, 1)).backward()
            summed += batch_loss.detach()
        if self.spec.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([p for _, p in self._trainable()], self.spec.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        return (float(summed) / labelled if labelled else None), tokens, labelled

    # ---- save

    def _save_checkpoint(self) -> None:
        """Write adapter, optimizer, scheduler, RNG and counters; commit by rename; prune old ones."""
        from safetensors.torch import save_file

        root = Path(self.spec.checkpoint_dir)
        step = self.counters.step
        tmp = root / f".tmp-{CHECKPOINT_PREFIX}{step}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        weights = {name: p.detach().to("cpu").contiguous() for name, p in self._trainable()}
        save_file(weights, tmp / "adapter.safetensors")
        torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(_rng_state(), tmp / "rng.pt")
        state = {"fingerprint": self.fingerprint, "counters": dataclasses.asdict(self.counters)}
        (tmp / "state.json").write_text(json.dumps(state, indent=2), encoding="utf-8")
        (tmp / COMPLETE_MARKER).write_text(f"{step}\n", encoding="utf-8")
        commit_folder(tmp, root / f"{CHECKPOINT_PREFIX}{step}")
        for _, old in complete_checkpoints(root)[: -max(self.spec.keep_checkpoints, 1)]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint_saved", step=step)

    def save(self) -> TrainResult:
        """Evaluate held-out loss after training and write the adapter to out_dir (temp + rename)."""
        spec = self.spec
        self._report("eval_after")
        after = evaluate(self.model, self.heldout_rows, spec.tokens_per_batch, self.device, self.compute_dtype)
        seconds = self.counters.seconds
        peak = None
        if self.device.type == "cuda":
            peak = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)
        result = TrainResult(
            adapter_dir=Path(spec.out_dir),
            heldout_loss_before=self.counters.heldout_loss_before,
            heldout_loss_after=after,
            steps=self.counters.step,
            tokens=self.counters.tokens,
            labelled_tokens=self.counters.labelled_tokens,
            seconds=round(seconds, 3),
            tokens_per_s=round(self.counters.tokens / seconds, 1) if seconds > 0 else 0.0,
            device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."),
            attention=self.attention,
            tokens_per_batch=spec.tokens_per_batch,
            grad_accum=spec.grad_accum,
            resumed_from_step=self.resumed_from_step,
            truncated_examples=self.truncated,
            gradient_checkpointing=self.checkpointing,
            adapter_compute=self._adapter_compute_name(),
            compiled=self.compiled,
            fused_kernels=self.fused_kernels,
            peak_gpu_memory_gib=peak,
            base_precision=self.precision,
            plan=self.plan.to_dict() if self.plan else None,
            shared_prefix=self.prefix_len,
        )
        out = Path(spec.out_dir)
        tmp = out.with_name(f".tmp-{out.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(tmp)
        (tmp / "lacd_train.json").write_text(result.to_json(), encoding="utf-8")
        commit_folder(tmp, out)
        self._report("done", loss=None)
        log.info(
            "train_done", steps=result.steps, tokens=result.tokens, seconds=result.seconds,
            tokens_per_s=result.tokens_per_s, heldout_loss_before=result.heldout_loss_before,
            heldout_loss_after=result.heldout_loss_after, peak_gpu_memory_gib=peak,
        )
        return result

    # ---- cleanup and progress

    def cleanup(self) -> None:
        """Release the model and, on CUDA, its cached memory."""
        for name in ("model", "optimizer", "scheduler"):
            if hasattr(self, name):
                delattr(self, name)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _report(self, phase: str, **fields: Any) -> None:
        """Rewrite the progress file and call on_progress."""
        progress = {
            "phase": phase,
            "step": self.counters.step,
            "total_steps": len(getattr(self, "steps", [])),
            "epoch": None, "loss": None, "tokens_per_s": None, "eta_s": None,
            "heldout_loss_before": self.counters.heldout_loss_before,
            "updated_at": time.time(),
        }
        if getattr(self, "plan", None) is not None:
            progress["plan"] = self.plan.describe()
        progress.update(fields)
        write_json_atomic(Path(self.spec.progress_path), progress, durable=False)
        if phase == "train":  # one line per step: the loss curve of the run report (lacd.report)
            with open(Path(self.spec.progress_path).with_suffix(".jsonl"), "a", encoding="utf-8") as history:
                history.write(json.dumps(progress) + "\n")
        if self.on_progress is not None:
            self.on_progress(progress)


def run_training(spec: TrainSpec, on_progress: ProgressCallback | None = None) -> TrainResult:
    """Train a LoRA adapter as spec says, resuming from its newest complete checkpoint."""
    recipe = LoRARecipe(spec, on_progress)
    with checkpoint_lock(Path(spec.checkpoint_dir)):
        try:
            recipe.setup()
            recipe.train()
            if PAUSE_REQUEST.is_set():  # the last checkpoint holds every step; resuming only saves
                raise TrainPaused("paused after the last step")
            return recipe.save()
        finally:
            recipe.cleanup()


# --------------------------------------------------------------------------- child process


def is_out_of_memory(exc: BaseException) -> bool:
    """True for a CUDA out-of-memory error, whatever torch version raised it."""
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "CUDA out of memory" in str(exc)


def halve_micro_batch(spec: TrainSpec) -> TrainSpec | None:
    """The spec to retry after an out-of-memory: half the tokens per micro-batch, twice the
    accumulation (same tokens per optimizer step); None when it cannot shrink further."""
    if spec.tokens_per_batch < 2:
        return None
    return dataclasses.replace(
        spec, tokens_per_batch=spec.tokens_per_batch // 2, grad_accum=spec.grad_accum * 2
    )


def _die_with_parent(parent_pid: int | None) -> None:
    """Ask Linux to SIGKILL this process when its parent dies, so no orphan keeps training."""
    if parent_pid is None or not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(EXIT_ERROR)


TEST_OOM_ENV = "LACD_TEST_OOM_ABOVE_TOKENS"
"""Test-only fault injection, read by the training child alone: with it set to N, every micro-batch
of more than N tokens raises torch.cuda.OutOfMemoryError inside the real training step, so the
out-of-memory retry is tested on a CPU. Never set it outside tests."""


def _inject_oom_for_tests(limit: str | None) -> None:
    """Wrap loss_sum so a micro-batch over `limit` tokens raises CUDA's out-of-memory (see TEST_OOM_ENV)."""
    if not limit:
        return
    real = globals()["loss_sum"]

    def loss_sum_with_a_memory_cap(model, batch, *args, **kwargs):
        tokens = int(batch["input_ids"].numel())
        if tokens > int(limit):
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried a micro-batch of {tokens} tokens "
                                              f"({TEST_OOM_ENV}={limit})")
        return real(model, batch, *args, **kwargs)

    globals()["loss_sum"] = loss_sum_with_a_memory_cap


def main(argv: Sequence[str] | None = None) -> int:
    """Child entry point: python -m lacd.pipeline.train SPEC.json [--result RESULT.json]."""
    parser = argparse.ArgumentParser(prog="python -m lacd.pipeline.train")
    parser.add_argument("spec", type=Path, help="TrainSpec as JSON")
    parser.add_argument("--result", type=Path, help="where to write the TrainResult JSON")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    from lacd import logs

    logs.setup(level=args.log_level, fmt="json", stream=sys.stderr)
    _inject_oom_for_tests(os.environ.get(TEST_OOM_ENV))
    parent = os.environ.get("LACD_TRAIN_PARENT_PID")
    _die_with_parent(int(parent) if parent else None)
    if os.environ.get("LACD_TRAIN_PAUSE_PIPE"):
        watch_pause_requests(sys.stdin.fileno())
    try:
        spec = TrainSpec.from_json(args.spec.read_text(encoding="utf-8"))
        result = run_training(spec)
    except TrainPaused:
        return EXIT_PAUSED
    except TrainError as exc:
        print(f"{_ERROR_PREFIX}{exc}", file=sys.stderr)
        return EXIT_ERROR
    except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc):
            raise
        print(f"lacd train: CUDA out of memory: {exc}", file=sys.stderr)
        return EXIT_OOM
    if args.result is not None:
        write_json_atomic(args.result, json.loads(result.to_json()))
    print(result.to_json())
    return 0


def watch_pause_requests(fd: int) -> threading.Thread:
    """Child side: a thread that sets PAUSE_REQUEST when the parent writes to fd (or closes it).

    A pipe rather than a signal: a Python signal handler runs only between bytecodes, so it would
    wait for a long forward pass anyway, and a stray SIGUSR1 to an OpenMP thread kills the process.
    os.read, not sys.stdin: a daemon thread blocked in a buffered reader aborts interpreter exit."""

    def wait() -> None:
        with contextlib.suppress(OSError):
            os.read(fd, 64)
        PAUSE_REQUEST.set()

    thread = threading.Thread(target=wait, name="lacd-pause", daemon=True)
    thread.start()
    return thread


def _source_root() -> Path:
    """The folder that holds the lacd package (daemon/ in a checkout)."""
    return Path(__file__).resolve().parents[2]


def _read_tail(path: Path, limit: int = 4000) -> str:
    """The last `limit` characters of a text file ('' if missing)."""
    if not path.exists():
        return ""
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        handle.seek(max(0, handle.tell() - limit))
        return handle.read().decode("utf-8", errors="replace")


def child_malloc_env() -> dict[str, str]:
    """Environment for a training or evaluation child: glibc serves allocations of 64 KiB and more
    with mmap, so the activation buffers freed after each layer go back to the system instead of
    piling up in the heap. Measured on SmolLM2-135M (a 1,665-token checkpointed forward): peak RSS
    1.23 GB instead of 2.39. A value already in the environment is kept."""
    return {} if "MALLOC_MMAP_THRESHOLD_" in os.environ else {"MALLOC_MMAP_THRESHOLD_": "65536"}


def _run_child(
    spec: TrainSpec,
    python: str,
    on_progress: ProgressCallback | None,
    poll_s: float,
    stop: threading.Event | None,
    pause: threading.Event | None = None,
    yield_s: float = 10.0,
) -> tuple[int, Path, Path]:
    """Start one training child, relay its progress, wait for it. Returns (exit code, result, log)."""
    workdir = Path(spec.checkpoint_dir)
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path, result_path, log_path = workdir / "spec.json", workdir / "result.json", workdir / "child.log"
    spec_path.write_text(spec.to_json(), encoding="utf-8")
    result_path.unlink(missing_ok=True)
    env = dict(os.environ) | child_malloc_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_source_root()), env.get("PYTHONPATH")]))
    env["LACD_TRAIN_PARENT_PID"] = str(os.getpid())
    env["LACD_TRAIN_PAUSE_PIPE"] = "1"
    command = [python, "-m", "lacd.pipeline.train", str(spec_path), "--result", str(result_path)]
    with open(log_path, "w", encoding="utf-8") as log_file:
        child = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env, stdin=subprocess.PIPE)
        log.info("train_child_started", pid=child.pid, tokens_per_batch=spec.tokens_per_batch,
                 grad_accum=spec.grad_accum)
        last_seen = None
        asked = [e for e in (stop, pause) if e is not None]
        while child.poll() is None:
            if _wait_any(asked, poll_s):
                if stop is not None and stop.is_set():  # the daemon stops: no time to wait for a step
                    stop_child(child)
                    raise TrainInterrupted("training stopped on request; it resumes from its last checkpoint")
                code = yield_child(child, yield_s)
                _relay_progress(Path(spec.progress_path), last_seen, on_progress)
                raise _yielded(code, yield_s)
            last_seen = _relay_progress(Path(spec.progress_path), last_seen, on_progress)
        _relay_progress(Path(spec.progress_path), last_seen, on_progress)
    return child.returncode, result_path, log_path


class TrainYielded(TrainInterrupted):
    """Parent side: training stepped aside because the agent became active; it resumes later."""


def _wait_any(events: list[threading.Event], timeout: float) -> bool:
    """True as soon as one of events is set (checked every 50 ms), False after timeout."""
    deadline = time.monotonic() + timeout
    while not any(e.is_set() for e in events):
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(0.05, left))
    return True


def _yielded(code: int | None, yield_s: float) -> TrainYielded:
    if code == EXIT_PAUSED:
        return TrainYielded("training stepped aside for the agent: it checkpointed its last step and exited")
    return TrainYielded(f"training stepped aside for the agent: no step boundary within {yield_s:.0f} s, so it "
                        f"was stopped; it resumes from its last checkpoint")


def yield_child(child: subprocess.Popen, yield_s: float) -> int | None:
    """Ask the training child to checkpoint at its next step boundary and exit; past yield_s, end it.
    Returns its exit code."""
    with contextlib.suppress(OSError, ValueError):
        child.stdin.write(b"pause\n")
        child.stdin.flush()
    try:
        return child.wait(timeout=yield_s)
    except subprocess.TimeoutExpired:
        stop_child(child)
        return child.returncode


def stop_child(child: subprocess.Popen) -> None:
    """SIGTERM the child, then SIGKILL it if it has not exited within 10 s."""
    child.terminate()
    try:
        child.wait(timeout=10)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def _relay_progress(path: Path, last_seen: str | None, on_progress: ProgressCallback | None) -> str | None:
    """Call on_progress with the progress file's content if it changed; returns what was seen."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return last_seen
    if text != last_seen and on_progress is not None:
        with contextlib.suppress(ValueError):
            on_progress(json.loads(text))
    return text


def train_in_child(
    spec: TrainSpec,
    on_progress: ProgressCallback | None = None,
    *,
    python: str = sys.executable,
    max_oom_retries: int = 3,
    poll_s: float = 0.5,
    stop: threading.Event | None = None,
    pause: threading.Event | None = None,
    yield_s: float = 10.0,
) -> TrainResult:
    """Run training in a child process so a crash or CUDA OOM cannot take the caller down.

    On out-of-memory, retry with half the micro-batch and twice the accumulation
    (at most max_oom_retries times). Any other failure raises TrainError with
    the tail of the child's output. Setting `stop` terminates the child and
    raises TrainInterrupted. Setting `pause` asks the child to checkpoint at its next step boundary
    and exit, ends it after `yield_s` seconds if it has not, and raises TrainYielded. The child's
    output is kept in checkpoint_dir/child.log.
    """
    attempt = spec
    for retry in range(max_oom_retries + 1):
        code, result_path, log_path = _run_child(attempt, python, on_progress, poll_s, stop, pause, yield_s)
        if code == 0 and result_path.is_file():
            return TrainResult.from_json(result_path.read_text(encoding="utf-8"))
        tail = _read_tail(log_path)
        if code == EXIT_OOM:
            smaller = halve_micro_batch(attempt)
            if smaller is None or retry == max_oom_retries:
                raise TrainError(
                    f"training ran out of GPU memory even at {attempt.tokens_per_batch} tokens per "
                    f"micro-batch; lower max_seq_len or use a smaller base model\n{tail}"
                )
            log.warning("train_out_of_memory", tokens_per_batch=attempt.tokens_per_batch,
                        retry_tokens_per_batch=smaller.tokens_per_batch, retry_grad_accum=smaller.grad_accum)
            attempt = smaller
            continue
        if code == EXIT_ERROR:
            messages = [line for line in tail.splitlines() if line.startswith(_ERROR_PREFIX)]
            reason = messages[-1].removeprefix(_ERROR_PREFIX) if messages else f"training failed\n{tail}"
            raise TrainError(reason)
        if code < 0:
            name = signal.Signals(-code).name
            raise TrainError(f"training process killed by {name} (out of host memory?)\n{tail}")
        raise TrainError(f"training process exited with code {code}\n{tail}")
    raise AssertionError("unreachable")


if __name__ == "__main__":
    sys.exit(main())
