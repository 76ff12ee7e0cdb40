"""What one training run is asked (TrainSpec), what it reports (TrainResult), and how it fails.

Plain values, JSON round-trippable: the parent writes the spec for the training child
(``python -m lacd.pipeline.train SPEC.json``) and reads its result back.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lacd.pipeline.errors import StageInterrupted


ProgressCallback = Callable[[dict], None]


class TrainError(Exception):
    """Training cannot run or did not finish; the message says why."""


class TrainPaused(StageInterrupted):
    """Child side: a pause was requested; the checkpoint of the last finished step is written."""


class TrainInterrupted(TrainError, StageInterrupted):
    """Training was stopped on request before it finished; it resumes from its last checkpoint."""


class TrainYielded(TrainInterrupted):
    """Parent side: training stepped aside because the agent became active; it resumes later."""


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
    shared_prefix: 'auto' (the default: lessons that share a prefix of at least MIN_SHARED_PREFIX
    tokens are packed with that prefix once per row, see packing.collate_shared_prefix, and the
    token budget counts it once: each step holds several times more lessons, so a run takes fewer,
    larger steps, at a learning rate scaled by plan.auto_lr_scale), 'same-steps' (the optimizer steps of today's packing, lesson for lesson, each
    micro-batch computed as one shared-prefix row: the same trajectory, less speed-up) or 'off'.
    lora_dropout defaults to 0.05 (the daemon's [train] default and the issue's LoRA config):
    fuse_lora_dropout keeps a 1-byte mask per adapter input instead of a dropped copy, so it costs
    about 4 GiB at 4096 tokens on CodeLlama-7B eager (nothing measurable when compiled) instead of 8.
    base_precision: 'auto' (on CUDA the memory plan's choice, memplan.py; on the CPU bf16 where it
    computes bf16 natively, else fp32: plan.cpu_dtype), 'bf16' (the GPU's dtype), 'nf4' (frozen
    linear weights in 4-bit NF4, nf4.py) or 'float32' (the CPU only);
    gpu_memory_gib: GPU memory the plan may use (0: what is free when training starts).
    devices: 'auto' or N processes (N > 1: torchrun + FSDP2, lacd.pipeline.distributed).
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
    shared_prefix: str = "auto"
    devices: int | str = 1  # processes training the run: 'auto' or N (distributed.py); the child gets a count

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
    devices: int = 1  # processes that trained it (lacd.pipeline.distributed)

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
