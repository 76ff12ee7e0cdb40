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

Where the pieces live: trainspec.py (TrainSpec, TrainResult, the errors), plan.py (device,
attention, checkpointing, compile and memory choices; the step plan and learning rate),
loss.py (the loss and the held-out loss), lora_kernels.py (fused LoRA dropout, Liger, compile),
checkpoint.py (checkpoint folders, lock, RNG state, fingerprint), packing.py (micro-batches),
lacd/child.py (the child process: die with the parent, pause, stop, log tail).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import structlog
import torch

from lacd.artifacts import atomic_folder, write_json_atomic, write_text_atomic
from lacd.child import (
    EXIT_ERROR,
    PAUSE_REQUEST,
    YIELD_BUDGET_ENV,
    YIELD_SHARE,
    HeapWatch,
    child_env,
    die_with_parent,
    error_from_log,
    read_tail,
    relay_progress,
    stop_child,
    wait_any,
    watch_pause_requests,
    yield_budget_s,
    yield_child,
)
from lacd.pipeline import nf4, plan
from lacd.pipeline.checkpoint import (
    CHECKPOINT_PREFIX,
    COMPLETE_MARKER,
    checkpoint_lock,
    complete_checkpoints,
    data_fingerprint,
    rng_state,
    set_rng_state,
)
from lacd.pipeline.lora_kernels import (
    apply_fused_kernels,
    checkpoint_first_layers,
    checkpoint_kwargs,
    compile_layers,
    disable_adapter_upcast,
    fuse_lora_dropout,
    fuse_lora_sum,
    fuse_rms_norms,
)
from lacd.pipeline.loss import evaluate, loss_sum, shared_prefix_length
from lacd.pipeline.packing import (
    IGNORE_INDEX,
    VARLEN_ATTENTION,
    collate_packed,
    collate_shared_prefix,
    labelled_token_count,
    lesson_token_count,
)
from lacd.pipeline.plan import (
    OFFLOAD,
    PlannedStep,
    activation_bytes_per_token,
    auto_lr_scale,
    checkpointed_layer_bytes_per_token,
    choose_adapter_compute,
    choose_attention,
    choose_device,
    choose_plan,
    compute_context,
    cpu_layers_to_checkpoint,
    lr_factor,
    needs_checkpointing,
    plan_steps,
    require_nf4,
    scaled_activation_bytes,
    should_compile,
    warmup_steps,
)
from lacd.pipeline.trainspec import (
    ProgressCallback,
    TrainError,
    TrainInterrupted,
    TrainPaused,
    TrainResult,
    TrainSpec,
    TrainYielded,
)

log = structlog.get_logger(__name__)


CHECKPOINT_MAX_S = 300.0  # also checkpoint at the first step boundary this long after the last one
EXIT_OOM = 75  # CUDA out of memory: retry with a smaller micro-batch
EXIT_PAUSED = 76  # asked to step aside: a checkpoint of the last finished step is written, then exit
_ERROR_PREFIX = "lacd train: error: "


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
    oom_above_tokens: int | None = field(default_factory=lambda: _test_oom_limit())  # tests only: TEST_OOM_ENV
    checkpointed_layers: int | None = None  # of the largest row, when each row checkpoints only what it must
    _activation_bytes: int = 0  # per token (plan.activation_bytes_per_token), for the per-row choice
    _checkpointed_bytes: int = 0  # per token of a checkpointed layer (plan.checkpointed_layer_bytes_per_token)
    activation_budget: int | None = None  # CPU: plan.cpu_activation_budget when the model was loaded
    heap: HeapWatch = field(default_factory=HeapWatch)  # CPU: trims the heap once it has grown (child.HeapWatch)

    # ---- setup

    def setup(self) -> None:
        """Choose the device, load data and model, wrap it with LoRA, build the optimizer, resume."""
        spec = self.spec
        if spec.num_threads > 0:
            torch.set_num_threads(spec.num_threads)
        self.device, self.dtype = choose_device(spec.device, spec.base_precision)
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
        lengths = [len(row["input_ids"]) for row in self.train_rows]
        self.steps = plan_steps(lengths, spec.tokens_per_batch, spec.grad_accum, spec.epochs, spec.seed,
                                self.prefix_len if spec.shared_prefix == "auto" else 0)
        self.learning_rate = spec.learning_rate * auto_lr_scale(lengths, spec, self.prefix_len, len(self.steps))
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
            gradient_checkpointing=self.checkpointing, checkpointed_layers=self.checkpointed_layers,
            activation_budget_gib=round(self.activation_budget / 2**30, 2) if self.activation_budget else None,
            compiled=self.compiled,
            fused_kernels=self.fused_kernels, shared_prefix=self.prefix_len, learning_rate=self.learning_rate,
            torch=torch.__version__, gpu=torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None,
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
            require_nf4()
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
        """Tokens of the largest packed micro-batch of the run (a shared prefix counted once per row)."""
        shared = self.prefix_len
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
        # an NF4 base compiles under 'auto' on bitsandbytes' kernels (bench/train_gpu.py, 7B, H100: 13,693
        # trained tok/s against 10,534 eager); the torchao fallback was not measured compiled: eager there
        compiling = should_compile(spec.compile, self.device, planned) and not (
            spec.compile == "auto" and self.precision == "nf4" and nf4.backend(self.device) != nf4.BITSANDBYTES)
        self.fused_kernels = apply_fused_kernels(model, spec.fused_kernels, self.device, compiling)
        fused_norms = False
        if self.device.type == "cpu":
            fused_norms = fuse_rms_norms(model) > 0
            self.activation_budget = plan.cpu_activation_budget()  # with the base weights loaded
        per_token = scaled_activation_bytes(activation_bytes_per_token(
            model.config, spec.lora_dropout, self.compute_dtype is None, fused_norms=fused_norms), self.dtype)
        self.offload = spec.gradient_checkpointing == OFFLOAD and self.device.type == "cuda"
        if self.plan is not None and spec.gradient_checkpointing == "auto":
            self.checkpointing = self.plan.gradient_checkpointing
            self.offload = self.plan.offload
        else:
            self.checkpointing = needs_checkpointing(
                spec.gradient_checkpointing, self.device, self._largest_micro_batch(), per_token,
                int(getattr(model.config, "vocab_size", 32000)), cpu_budget=self.activation_budget or 0,
            )
        if self.checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs(self.device))
            if self.device.type == "cpu" and spec.gradient_checkpointing == "auto":  # only the layers over budget
                self._activation_bytes = per_token
                self._checkpointed_bytes = checkpointed_layer_bytes_per_token(model.config, self.dtype)
                self.checkpointed_layers = self._checkpoint_for(model, self._largest_micro_batch())
        targets = spec.target_modules if isinstance(spec.target_modules, str) else list(spec.target_modules)
        lora = LoraConfig(
            r=spec.lora_r, lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout,
            target_modules=targets, task_type="CAUSAL_LM",
        )
        torch.manual_seed(spec.seed)
        model = get_peft_model(model, lora)
        if self.compute_dtype is not None:
            disable_adapter_upcast(model)
        fuse_lora_dropout(model)
        fuse_lora_sum(model)
        self.compiled = compiling and compile_layers(model, fall_back=spec.compile == "auto")
        model.train()
        return model

    def _checkpoint_for(self, model: torch.nn.Module, tokens: int) -> int:
        """Checkpoint only the layers a CPU row of `tokens` tokens must (plan.cpu_layers_to_checkpoint)."""
        count = cpu_layers_to_checkpoint(tokens, self._activation_bytes, model.config.num_hidden_layers,
                                         self.activation_budget or 0, self._checkpointed_bytes)
        return checkpoint_first_layers(model, count)

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
            params, lr=self.learning_rate, weight_decay=self.spec.weight_decay,
            fused=self.device.type == "cuda",
        )

    def _resume(self) -> bool:
        """Load the newest complete checkpoint of this trajectory, if any. True if resumed.

        Half-written checkpoints (temporary folders of a killed run) are never read; the run's start
        removes them (artifacts.sweep_leftovers).
        """
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

        try:
            self._restore_state(load_file(folder / "adapter.safetensors"),
                                torch.load(folder / "optimizer.pt", weights_only=True))
        except TrainError as exc:
            raise TrainError(f"checkpoint {folder}: {exc}") from None
        self.scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
        set_rng_state(torch.load(folder / "rng.pt", weights_only=True))
        self.counters = _Counters(**state["counters"])

    def _restore_state(self, weights: Mapping[str, torch.Tensor], optimizer_state: dict) -> None:
        """Copy a checkpoint's LoRA weights and optimizer state into the model and optimizer."""
        params = dict(self._trainable())
        if set(weights) != set(params):
            raise TrainError("the checkpoint does not match the model's LoRA parameters")
        with torch.no_grad():
            for name, tensor in weights.items():
                params[name].copy_(self._placed(tensor, params[name]))
        ordered = [p for _, p in self._trainable()]
        optimizer_state["state"] = {
            index: {key: value if key == "step" else self._placed(value, ordered[int(index)])
                    for key, value in values.items()}
            for index, values in optimizer_state["state"].items()}
        self.optimizer.load_state_dict(optimizer_state)

    # ---- hooks a recipe over several processes (distributed.ShardedRecipe) replaces

    is_writer = True  # this process writes progress, checkpoints and the adapter

    def _agreed(self, flag: bool) -> bool:
        """flag, as every process of the run agrees on it (one process: as it is)."""
        return flag

    def _placed(self, tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A checkpoint's tensor for parameter `like` (load_state_dict moves it to the device)."""
        return tensor

    def _checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """The LoRA weights (on the host) and the optimizer state a checkpoint holds."""
        weights = {name: p.detach().to("cpu").contiguous() for name, p in self._trainable()}
        return weights, self.optimizer.state_dict()

    def _save_adapter(self, folder: Path) -> None:
        """Write the trained adapter (peft's layout) to folder."""
        self.model.save_pretrained(folder)

    # ---- train

    def train(self) -> None:
        """Run the planned optimizer steps from the current one to the end."""
        spec = self.spec
        started = time.monotonic()
        tokens_here = 0
        total = len(self.steps)
        first = self.counters.step
        last_checkpoint = time.monotonic()
        budget = yield_budget_s()
        saving_s = 0.0  # how long the last checkpoint took to write
        for index in range(first, total):
            self._step_aside_if_asked(index > first)
            step_started = time.monotonic()
            loss, tokens, labelled = self._optimizer_step(self.steps[index])
            if self.device.type == "cpu":
                self.heap.check()
            step_s = time.monotonic() - step_started
            self.counters.step = index + 1
            self.counters.tokens += tokens
            self.counters.labelled_tokens += labelled
            self.counters.seconds += step_s
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
            overdue = self._agreed(time.monotonic() - last_checkpoint > CHECKPOINT_MAX_S)
            long_step = self._agreed(budget is not None and step_s + saving_s > budget / 2)  # see YIELD_BUDGET_ENV
            if (every > 0 and self.counters.step % every == 0) or self.counters.step == total or overdue or long_step:
                saving_started = time.monotonic()
                self._save_checkpoint()
                last_checkpoint = time.monotonic()
                saving_s = last_checkpoint - saving_started

    def _step_aside_if_asked(self, progressed: bool) -> None:
        """At a step boundary: when the parent asked to pause, checkpoint this step (if any was done
        here) and leave; resuming from it is bit-exact like resuming from any checkpoint."""
        if not self._agreed(PAUSE_REQUEST.is_set()):
            return
        if progressed and getattr(self, "_checkpointed_step", None) != self.counters.step:
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
            if self._activation_bytes:
                self._checkpoint_for(self.model, int(batch["input_ids"].numel()))
            with compute_context(self.device, self.compute_dtype), self._offloading():
                batch_loss = self._loss_sum(batch)
            if batch_loss is None:
                continue
            (batch_loss / max(labelled, 1)).backward()
            summed += batch_loss.detach()
        if self.spec.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([p for _, p in self._trainable()], self.spec.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        return (float(summed) / labelled if labelled else None), tokens, labelled

    def _loss_sum(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """loss_sum of one training micro-batch: the train loop's one call of the loss (this
        recipe's and distributed's), so the one place the test-only TEST_OOM_ENV cap applies."""
        tokens = int(batch["input_ids"].numel())
        if self.oom_above_tokens is not None and tokens > self.oom_above_tokens:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried a micro-batch of {tokens} tokens "
                                              f"({TEST_OOM_ENV}={self.oom_above_tokens})")
        return loss_sum(self.model, batch)

    # ---- save

    def _save_checkpoint(self) -> None:
        """Write adapter, optimizer, scheduler, RNG and counters; commit by rename; prune old ones."""
        from safetensors.torch import save_file

        weights, optimizer_state = self._checkpoint_state()
        self._checkpointed_step = self.counters.step  # every process knows it, whether or not it writes
        if not self.is_writer:
            return
        root = Path(self.spec.checkpoint_dir)
        step = self.counters.step
        with atomic_folder(root / f"{CHECKPOINT_PREFIX}{step}") as tmp:
            save_file(weights, tmp / "adapter.safetensors")
            torch.save(optimizer_state, tmp / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(rng_state(), tmp / "rng.pt")
            state = {"fingerprint": self.fingerprint, "counters": dataclasses.asdict(self.counters)}
            (tmp / "state.json").write_text(json.dumps(state, indent=2), encoding="utf-8")
            (tmp / COMPLETE_MARKER).write_text(f"{step}\n", encoding="utf-8")
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
            devices=getattr(self, "world", 1),
        )
        with atomic_folder(Path(spec.out_dir)) as tmp:
            self._save_adapter(tmp)
            (tmp / "lacd_train.json").write_text(result.to_json(), encoding="utf-8")
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


def run_training(spec: TrainSpec, on_progress: ProgressCallback | None = None) -> TrainResult | None:
    """Train a LoRA adapter as spec says, resuming from its newest complete checkpoint.

    Inside a torchrun launch of several ranks (spec.devices > 1) the recipe is distributed's
    ShardedRecipe; rank 0 holds the checkpoint lock and returns the result, the others None."""
    from lacd.pipeline import distributed

    recipe = distributed.recipe_for(spec, on_progress)
    lock = checkpoint_lock(Path(spec.checkpoint_dir)) if distributed.rank_and_world()[0] == 0 else contextlib.nullcontext()
    with lock:
        try:
            recipe.setup()
            recipe.train()
            if recipe._agreed(PAUSE_REQUEST.is_set()):  # the last checkpoint holds every step; resuming only saves
                raise TrainPaused("paused after the last step")
            return recipe.save()
        finally:
            recipe.cleanup()


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


TEST_OOM_ENV = "LACD_TEST_OOM_ABOVE_TOKENS"
"""Test-only fault injection: with it set to N, every training micro-batch of more than N tokens
raises torch.cuda.OutOfMemoryError in the real training step (LoRARecipe._loss_sum), so the
out-of-memory retry is tested on a CPU. Never set it outside tests."""


def _test_oom_limit() -> int | None:
    """TEST_OOM_ENV's N, read when a recipe is made (in the child: the parent's environment)."""
    value = os.environ.get(TEST_OOM_ENV)
    return int(value) if value else None


TEST_SLOW_STEP_ENV = "TEST_LACD_STEP_SLEEP_S"  # tests, bench: every step takes this much longer (not LACD_: the daemon rejects those)


def _inject_slow_steps_for_tests(seconds: str | None) -> None:
    """Make every optimizer step sleep `seconds` first (see TEST_SLOW_STEP_ENV); the maths is unchanged."""
    if not seconds:
        return
    real = LoRARecipe._optimizer_step

    def slow_optimizer_step(self, planned):
        time.sleep(float(seconds))
        return real(self, planned)

    LoRARecipe._optimizer_step = slow_optimizer_step


def main(argv: Sequence[str] | None = None) -> int:
    """Child entry point: python -m lacd.pipeline.train SPEC.json [--result RESULT.json]."""
    parser = argparse.ArgumentParser(prog="python -m lacd.pipeline.train")
    parser.add_argument("spec", type=Path, help="TrainSpec as JSON")
    parser.add_argument("--result", type=Path, help="where to write the TrainResult JSON")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    from lacd import logs

    logs.setup(level=args.log_level, fmt="json", stream=sys.stderr)
    _inject_slow_steps_for_tests(os.environ.get(TEST_SLOW_STEP_ENV))
    die_with_parent()
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
    if result is None:  # a rank other than 0 of a distributed run
        return 0
    if args.result is not None:
        write_json_atomic(args.result, json.loads(result.to_json()))
    print(result.to_json())
    return 0


def child_command(python: str, spec_path: Path, result_path: Path) -> list[str]:
    """The command line of one training child (the entry point main)."""
    return [python, "-m", "lacd.pipeline.train", str(spec_path), "--result", str(result_path)]


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
    write_text_atomic(spec_path, spec.to_json())
    result_path.unlink(missing_ok=True)
    env = child_env(lean_heap=False)  # the CPU step is ~1.7x faster on glibc's own heap
    env["LACD_TRAIN_PAUSE_PIPE"] = "1"
    env[YIELD_BUDGET_ENV] = str(yield_s * YIELD_SHARE)
    command = child_command(python, spec_path, result_path)
    if spec.devices != 1:
        from lacd.pipeline import distributed

        env |= distributed.child_env(spec)
        command = distributed.launch_command(python, int(spec.devices), command[3:])
    with open(log_path, "w", encoding="utf-8") as log_file:
        child = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env, stdin=subprocess.PIPE)
        log.info("train_child_started", pid=child.pid, tokens_per_batch=spec.tokens_per_batch,
                 grad_accum=spec.grad_accum)
        last_seen = None
        asked = [e for e in (stop, pause) if e is not None]
        while child.poll() is None:
            if wait_any(asked, poll_s):
                if stop is not None and stop.is_set():  # the daemon stops: no time to wait for a step
                    stop_child(child)
                    raise TrainInterrupted("training stopped on request; it resumes from its last checkpoint")
                code = yield_child(child, yield_s)
                relay_progress(Path(spec.progress_path), last_seen, on_progress)
                raise _yielded(code, yield_s)
            last_seen = relay_progress(Path(spec.progress_path), last_seen, on_progress)
        relay_progress(Path(spec.progress_path), last_seen, on_progress)
    return child.returncode, result_path, log_path


def _yielded(code: int | None, yield_s: float) -> TrainYielded:
    if code == EXIT_PAUSED:
        return TrainYielded("training stepped aside for the agent: it checkpointed its last step and exited")
    return TrainYielded(f"training stepped aside for the agent: no step boundary within {yield_s * YIELD_SHARE:.1f} s, so it "
                        f"was stopped; it resumes from its last checkpoint")


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
    from lacd.pipeline.distributed import resolve_devices

    attempt = resolve_devices(spec)
    for retry in range(max_oom_retries + 1):
        code, result_path, log_path = _run_child(attempt, python, on_progress, poll_s, stop, pause, yield_s)
        if code == 0 and result_path.is_file():
            return TrainResult.from_json(result_path.read_text(encoding="utf-8"))
        tail = read_tail(log_path)
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
            raise TrainError(error_from_log(tail, _ERROR_PREFIX) or f"training failed\n{tail}")
        if code < 0:
            name = signal.Signals(-code).name
            raise TrainError(f"training process killed by {name} (out of host memory?)\n{tail}")
        raise TrainError(f"training process exited with code {code}\n{tail}")
    raise AssertionError("unreachable")


if __name__ == "__main__":  # run as lacd.pipeline.train, not __main__: the recipe class that tests slow down
    from lacd.pipeline import train as _module  # (TEST_SLOW_STEP_ENV) is the one lacd.pipeline.distributed hands back

    _code = _module.main()
    if _code == EXIT_PAUSED:  # stepping aside: the checkpoint is committed and the GPU is wanted now; the
        sys.stdout.flush()  # interpreter's teardown took 2.2 s of the 2.9 s from a log line to a 7B run's
        sys.stderr.flush()  # memory free on an H100 (bench/agent_share.py), 1.5 s on the CPU; os._exit skips it
        os._exit(_code)
    sys.exit(_code)
