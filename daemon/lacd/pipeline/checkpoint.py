"""Checkpoint files of a training run: the folders (CHECKPOINT_PREFIX + step, complete when they
hold COMPLETE_MARKER), the lock that keeps two trainers off one folder, the RNG state dropout
draws from, and the fingerprint of the trajectory a checkpoint belongs to."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

from lacd.lock import flock_within
from lacd.pipeline import plan
from lacd.pipeline.trainspec import TrainError, TrainSpec


CHECKPOINT_PREFIX = "checkpoint-"
COMPLETE_MARKER = "COMPLETE"


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
        trajectory["auto_lr_exponent"] = plan.AUTO_LR_EXPONENT  # and another learning rate (plan.auto_lr_scale)
    modules = spec.target_modules
    trajectory["target_modules"] = modules if isinstance(modules, str) else list(modules)
    digest.update(json.dumps(trajectory, sort_keys=True).encode())
    for example in examples:
        digest.update(json.dumps([example["input_ids"], example["labels"]]).encode())
    return digest.hexdigest()


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
        if not flock_within(handle, timeout_s, poll=0.2):
            raise TrainError(f"another training process holds {checkpoint_dir}; not starting a second one")
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def rng_state() -> dict:
    """The RNG states dropout draws from (CPU and every CUDA device)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what rng_state saved."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
