"""The run's plan: each 'auto' setting of a TrainSpec resolved against the machine and the data.

Device and dtype, attention implementation, the LoRA matrices' compute dtype, gradient
checkpointing, torch.compile, the GPU memory plan (memplan.py: micro-batch, accumulation,
base precision); and the step plan: which lessons form each optimizer step (plan_steps)
and the learning rate at each step (warmup_steps, lr_factor).
"""

from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from lacd.pipeline.packing import (
    VARLEN_ATTENTION,
    pack,
    pack_shared_prefix,
    register_varlen_attention,
    varlen_available,
)
from lacd.pipeline.trainspec import TrainError, TrainSpec


OFFLOAD = "offload"  # gradient checkpointing with the kept layer inputs in host memory


def choose_device(requested: str, base_precision: str = "auto") -> tuple[torch.device, torch.dtype]:
    """'auto' gives CUDA with bf16 when available, else the CPU with cpu_dtype(base_precision);
    'cpu'/'cuda[:n]' force it."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"device {requested!r} requested but CUDA is not available")
    if device.type not in ("cuda", "cpu"):
        raise TrainError(f"unsupported training device {requested!r} (use auto, cpu or cuda)")
    dtype = torch.bfloat16 if device.type == "cuda" else cpu_dtype(base_precision)
    return device, dtype


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX). Where it does, bf16
    matmuls run at ~2.2x fp32's (372 against 173 GFLOPS on this machine's 2 EPYC cores); where it
    does not, bf16 is emulated and slower than fp32."""
    return any(getattr(torch.cpu, name, lambda: False)()
               for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def cpu_dtype(base_precision: str) -> torch.dtype:
    """The CPU's training dtype: bf16 for 'bf16', and for 'auto' on a CPU with native bf16 (the
    GPU's dtype: base weights and activations in bf16, the LoRA weights and optimizer in fp32);
    fp32 for 'float32', for 'nf4' (the weights it does not quantize) and for 'auto' elsewhere."""
    if base_precision == "bf16" or (base_precision == "auto" and cpu_has_native_bf16()):
        return torch.bfloat16
    return torch.float32


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


def activation_bytes_per_token(config: Any, lora_dropout: float, adapter_upcast: bool, *,
                               fused_norms: bool = False) -> int:
    """Rough bytes of activations kept for backward per token, without gradient checkpointing.

    Per decoder layer in bf16: two fp32 RMSNorm inputs (8 h; the bf16 inputs, 4 h, with the CPU's
    norm function, lora_kernels.fuse_rms_norms: fused_norms), the normed inputs of the
    adapters (4 h), q, k, v and the attention output (8 h), the MLP's gate, up, SiLU and
    product (8 i); LoRA dropout (fuse_lora_dropout) a 1-byte mask of each of the 7 adapter
    inputs (6 h + i), peft's fp32 upcast a fp32 copy (24 h + 4 i). Calibrated against the
    measured peak of bench/train_gpu.py (CodeLlama-7B shape).
    """
    h = int(getattr(config, "hidden_size", 4096))
    i = int(getattr(config, "intermediate_size", 4 * h))
    layers = int(getattr(config, "num_hidden_layers", 32))
    per_layer = (16 if fused_norms else 20) * h + 8 * i
    if lora_dropout > 0:
        per_layer += 6 * h + i
    if adapter_upcast:
        per_layer += 24 * h + 4 * i
    return layers * per_layer


def needs_checkpointing(
    requested: bool | str, device: torch.device, tokens: int, bytes_per_token: int, vocab: int, *, cpu_budget: int
) -> bool:
    """Whether to turn gradient checkpointing on: as requested, or for 'auto' on CUDA when the
    largest micro-batch's activations and logits would not fit in free GPU memory, on the CPU
    when its activations would pass cpu_budget (cpu_needs_checkpointing)."""
    if isinstance(requested, bool):
        return requested
    if requested in ("on", "off", OFFLOAD):
        return requested != "off"
    if requested != "auto":
        raise TrainError(f"unknown gradient_checkpointing {requested!r} (auto, on, off or offload)")
    if device.type != "cuda":
        return cpu_needs_checkpointing(tokens, bytes_per_token, cpu_budget)
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
    index = device.index if device.index is not None else torch.cuda.current_device()  # it wants an index
    fraction = torch.cuda.get_per_process_memory_fraction(index) if hasattr(
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

    if spec.base_precision not in ("auto", "bf16", "nf4", "float32"):
        raise TrainError(f"unknown base_precision {spec.base_precision!r} (auto, bf16, nf4 or float32)")
    if device.type != "cuda":
        return None
    if spec.base_precision == "float32":
        raise TrainError("[train] base_precision = float32 trains on the CPU only; on a GPU use auto, bf16 or nf4")
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
        require_nf4()
    return chosen


def require_nf4() -> None:
    """TrainError naming the fix when torchao (the NF4 storage) is not installed."""
    from lacd.pipeline.nf4 import NF4Unavailable, nf4_tensor_class

    try:
        nf4_tensor_class()
    except NF4Unavailable as exc:
        raise TrainError(str(exc)) from None


# Host memory the activations of one CPU micro-batch may take before decoder layers are checkpointed:
# an eighth of the memory available when the run starts, between 1 and 4 GiB. SmolLM2-135M keeps
# ~0.9 MB a token in bf16, 3.5 GB at the default 4096 tokens: on a 24 GB machine (~21 GB available,
# a 2.7 GiB budget) 5-7 of its 30 layers are checkpointed. A real 4,079-token bf16 step
# (bench/train_step.py): 21 layers checkpointed (the fixed 1 GiB budget before) 22.3-24.0 s and
# 3.9 GiB peak RSS, 12 layers 19.8-21.7 s and 5.2 GiB, none 19.1 s and 6.5 GiB. glibc's heap keeps
# more than that resident over a run (child.HeapWatch).
CPU_ACTIVATION_SHARE = 8
CPU_ACTIVATION_MIN = 1 << 30
CPU_ACTIVATION_MAX = 4 << 30


def cpu_activation_budget(available: int | None = None) -> int:
    """The activation budget of a CPU run (bytes): CPU_ACTIVATION_SHARE of `available` (default:
    the memory available now, psutil), within CPU_ACTIVATION_MIN and CPU_ACTIVATION_MAX."""
    if available is None:
        import psutil

        available = psutil.virtual_memory().available
    return min(CPU_ACTIVATION_MAX, max(CPU_ACTIVATION_MIN, available // CPU_ACTIVATION_SHARE))


def cpu_needs_checkpointing(tokens: int, bytes_per_token: int, budget: int) -> bool:
    """Whether a CPU micro-batch of `tokens` tokens needs gradient checkpointing to keep its
    activations (bytes_per_token, all layers, in the training dtype: activation_bytes_per_token
    scaled by scaled_activation_bytes) within `budget` (cpu_activation_budget)."""
    return tokens * bytes_per_token > budget


def checkpointed_layer_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    """What a checkpointed decoder layer still keeps per token on the CPU: its input, and the
    attention outputs (the own-token and shared-prefix parts) and their fp32 log-sum-exps that
    lora_kernels.checkpoint_kwargs saves so that the recompute skips attention."""
    h = int(getattr(config, "hidden_size", 4096))
    heads = int(getattr(config, "num_attention_heads", 32))
    return 3 * h * dtype.itemsize + 2 * 4 * heads


def scaled_activation_bytes(bytes_per_token: int, dtype: torch.dtype) -> int:
    """activation_bytes_per_token (a bf16 estimate) for a model computing in dtype (fp32: twice)."""
    return bytes_per_token * max(1, dtype.itemsize // 2)


def cpu_layers_to_checkpoint(tokens: int, bytes_per_token: int, layers: int, budget: int,
                             checkpointed_bytes_per_token: int = 0) -> int:
    """How many of `layers` decoder layers a CPU micro-batch of `tokens` tokens must checkpoint so
    that the activations the other layers keep (bytes_per_token as in cpu_needs_checkpointing), and
    what each checkpointed layer keeps (checkpointed_layer_bytes_per_token), fit in `budget`: the
    layers that fit keep theirs and skip the forward's recompute in backward (0 when all fit)."""
    per_layer = tokens * bytes_per_token / max(layers, 1)
    if per_layer * layers <= budget:
        return 0
    per_checkpointed = tokens * checkpointed_bytes_per_token
    if per_layer <= per_checkpointed:
        return layers
    kept = int((budget - layers * per_checkpointed) // (per_layer - per_checkpointed))
    return layers - max(0, min(layers, kept))


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


# shared_prefix 'auto' counts the prefix once in the token budget, so a step holds several times
# the lessons of today's packing and an epoch takes that many times fewer steps; the learning
# rate is multiplied by (today's steps / auto's steps) ** AUTO_LR_EXPONENT (auto_lr_scale). Linear:
# on the pretrained SmolLM2 (bench/prefix_learning.py, 240 lessons, 2 epochs, H100) auto at 38 steps
# ended at held-out 0.492 with it, today's packing at 0.498 / 0.513 (two seeds), the square root at 0.719.
AUTO_LR_EXPONENT = 1.0


def auto_lr_scale(lengths: Sequence[int], spec: TrainSpec, prefix_len: int, steps: int) -> float:
    """The learning-rate multiplier of a shared_prefix 'auto' run of `steps` optimizer steps:
    (steps today's packing would take / steps) ** AUTO_LR_EXPONENT; 1.0 for any other run."""
    if spec.shared_prefix != "auto" or not prefix_len or steps < 1:
        return 1.0
    today = len(plan_steps(lengths, spec.tokens_per_batch, spec.grad_accum, spec.epochs, spec.seed))
    return (today / steps) ** AUTO_LR_EXPONENT
