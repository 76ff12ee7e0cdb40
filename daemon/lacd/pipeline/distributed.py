"""Training across the devices of one host: a torchrun launch of the train child, FSDP2 inside.

``[train] devices`` (TrainSpec.devices) says how many processes train one run:

- ``auto``: one, unless several GPUs are visible and one card cannot hold the run in bf16
  without gradient checkpointing (the memory plan, memplan.py) or a step has several
  micro-batches to share out (grad_accum >= 2): then every visible GPU (at most grad_accum of
  them when only speed is the reason);
- ``N``: N processes, one per GPU on CUDA (NCCL), or N CPU processes on the gloo backend
  (that is how CI proves the maths on a machine without GPUs).

With N > 1 the parent starts ``python -m lacd.pipeline.distributed --devices N SPEC ...``, a
launcher that runs N copies of the usual child (``python -m lacd.pipeline.train``) through
PyTorch's own elastic launcher (``torch.distributed.launcher.elastic_launch``, what ``torchrun
--standalone`` uses), and maps the ranks' fate to the one-device child's exit codes: the first
failing rank's code (out of memory, paused, bad input), or, for a rank killed by a signal, the
same signal on the launcher, after torchrun has ended the other ranks. A killed rank therefore
fails the attempt exactly as a killed one-device child does, and the run resumes from its last
checkpoint.

Inside each rank, ShardedRecipe is LoRARecipe with:

- FSDP2 (``fully_shard``) over each decoder layer and the decoder (embeddings, final norm):
  the frozen base and the LoRA adapters sharded together; the output projection stays whole on
  every rank (frozen, and outside the decoder: the loss calls it on the labelled positions);
- data parallel over the packed micro-batches: rank r of N computes micro-batches r, r + N,
  r + 2N, ... of every planned step (the one-device plan, unchanged), each divided by the
  labelled tokens of the whole step; gradients are summed across ranks (divide factor 1), so
  the step's gradient is the one-device step's, up to summation order. A rank with fewer
  micro-batches runs a zero-weighted pass so every rank takes part in the same collectives;
- checkpoints gathered: rank 0 writes the full LoRA weights and AdamW state in the one-device
  layout, so a run resumes on any number of devices, one included; progress and the adapter
  are written by rank 0 alone; held-out loss is computed by every rank (same passes);
- LoRA dropout draws from a generator seeded by (seed, step, rank): resumes are exact, but
  the masks differ from a one-device run's (same distribution); at dropout 0 the runs agree.

Not supported with N > 1: an NF4 base (TrainError), torch.compile under 'auto' (off unless
'on'). On CUDA the children keep NVLink multicast off (MULTICAST_OFF).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
import sys
import uuid
from pathlib import Path
from typing import Any, Mapping, Sequence

import structlog
import torch

from lacd.child import PARENT_PID_ENV, die_with_parent
from lacd.pipeline.loss import decoder_and_head, evaluate
from lacd.pipeline.packing import labelled_token_count, lesson_token_count
from lacd.pipeline.plan import PlannedStep, check_gpu, compute_context, gpu_memory_available
from lacd.pipeline.train import LoRARecipe
from lacd.pipeline.trainspec import ProgressCallback, TrainError, TrainResult, TrainSpec

log = structlog.get_logger(__name__)

# NVLink multicast can put a host's GPUs out of service: NCCL, PyTorch and NVSHMEM keep it off.
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


# --------------------------------------------------------------------------- how many devices


def parse_devices(value: str | int) -> str | int:
    """'auto' or a positive process count; ValueError otherwise (config check and TrainSpec)."""
    if value == "auto":
        return "auto"
    count = int(value)
    if count < 1:
        raise ValueError(f"devices must be auto or >= 1, got {value!r}")
    return count


def choose_devices(requested: str | int, gpus: int, fits_one_card: bool, grad_accum: int) -> int:
    """Processes to train with. 'auto': 1 without several GPUs; every GPU when one card cannot
    hold the run (fits_one_card False); else min(gpus, grad_accum) (a step's micro-batches are
    what is shared out). N: N, which on CUDA must not exceed the visible GPUs (gpus 0: the CPU)."""
    requested = parse_devices(requested)
    if requested != "auto":
        if gpus and requested > gpus:
            raise TrainError(f"[train] devices = {requested}, but only {gpus} GPU(s) are visible")
        return requested
    if gpus <= 1:
        return 1
    if not fits_one_card:
        return gpus
    return max(1, min(gpus, grad_accum))


def fits_one_card(spec: TrainSpec, available: int) -> bool:
    """Whether one card holds the run the fast way: bf16 base, no checkpointing, the configured
    micro-batch (memplan.plan with those choices fixed)."""
    from transformers import AutoConfig

    from lacd.pipeline.memplan import PlanError, Shape, plan

    config = AutoConfig.from_pretrained(spec.base_dir)
    try:
        plan(Shape.of(config), available, precision="bf16", checkpointing="off",
             tokens_per_batch=spec.tokens_per_batch, grad_accum=spec.grad_accum,
             longest=spec.tokens_per_batch, lora_r=spec.lora_r, lora_dropout=spec.lora_dropout)
    except PlanError:
        return False
    return True


def _card_memory(configured_gib: float) -> int | None:
    """Bytes the plan may use on one card: configured_gib, else GPU 0's free memory read through
    NVML (the daemon opens no CUDA context of its own); None when NVML cannot tell."""
    if configured_gib > 0:
        return int(configured_gib * 2**30)
    try:
        import pynvml

        pynvml.nvmlInit()
        return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).free)
    except Exception:  # noqa: BLE001 - pynvml's NVMLError_* (no driver, no library)
        return None


def resolve_devices(spec: TrainSpec) -> TrainSpec:
    """The spec with devices resolved to a count (parent side, before the child starts)."""
    requested = parse_devices(spec.devices)
    cpu = spec.device == "cpu" or not torch.cuda.is_available()
    gpus = 0 if cpu else torch.cuda.device_count()
    if requested == "auto" and gpus > 1:
        available = _card_memory(spec.gpu_memory_gib)
        fits = available is None or fits_one_card(spec, available)
        count = choose_devices("auto", gpus, fits, spec.grad_accum)
    else:
        count = choose_devices(requested, gpus, True, spec.grad_accum)
    if count > 1 and spec.base_precision == "nf4":
        raise TrainError("[train] base_precision = nf4 trains on one device; set devices = 1 or bf16")
    return dataclasses.replace(spec, devices=count)


# --------------------------------------------------------------------------- the launch


def launch_command(python: str, devices: int, child_args: Sequence[str]) -> list[str]:
    """The command that trains on `devices` processes (child_args: the one-device child's)."""
    return [python, "-m", "lacd.pipeline.distributed", "--devices", str(devices), *child_args]


def child_env(spec: TrainSpec) -> dict[str, str]:
    """Environment the launcher and its ranks need on top of the one-device child's."""
    return dict(MULTICAST_OFF) if spec.devices != 1 else {}


def _exit_code_of(failure: Any) -> int:
    """A rank's exit code; a rank ended by a signal is re-raised on this launcher (never returns)."""
    code = int(failure.exitcode)
    if code >= 0:
        return code
    name = signal.Signals(-code).name
    print(f"lacd train: rank {failure.local_rank} (pid {failure.pid}) was killed by {name}; "
          "torchrun ended the other ranks", file=sys.stderr, flush=True)
    with contextlib.suppress(OSError, ValueError):  # SIGKILL has no handler to reset
        signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
    signal.pause()
    raise AssertionError("unreachable")


def _cause(exc: Any) -> Any:
    """The failure that ended a launch: a rank killed by a signal other than torchrun's own
    SIGTERM (its peers then fail on a broken connection), else the first rank that failed."""
    killed = [f for f in exc.failures.values() if f.exitcode < 0 and f.exitcode != -signal.SIGTERM]
    return killed[0] if killed else exc.get_first_failure()[1]


def launch_config(devices: int) -> Any:
    """torchrun --standalone's settings for `devices` local ranks: a c10d rendezvous on a free
    local port, no restarts (a failed attempt is the daemon's to retry). Sets MULTICAST_OFF here,
    so every rank inherits it."""
    from torch.distributed.launcher.api import LaunchConfig

    os.environ.update(MULTICAST_OFF)
    return LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=devices, run_id=str(uuid.uuid4()),
                        rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1)


def launch(devices: int, child_args: Sequence[str], python: str = sys.executable) -> int:
    """Run `devices` train children through torch's elastic launcher (torchrun --standalone's
    settings: a local c10d rendezvous, no restarts). Returns the exit code to exit with."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    os.environ[PARENT_PID_ENV] = str(os.getpid())  # each rank dies with this launcher
    try:
        elastic_launch(launch_config(devices), entrypoint=python)("-m", "lacd.pipeline.train", *child_args)
    except ChildFailedError as exc:
        return _exit_code_of(_cause(exc))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """python -m lacd.pipeline.distributed --devices N SPEC.json [train child options]."""
    parser = argparse.ArgumentParser(prog="python -m lacd.pipeline.distributed")
    parser.add_argument("--devices", type=int, required=True)
    args, child_args = parser.parse_known_args(argv)
    die_with_parent()
    return launch(args.devices, child_args)


# --------------------------------------------------------------------------- inside a rank


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of ranks (0, 1 outside torchrun)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def rounds(micro_batches: int, rank: int, world: int) -> list[int | None]:
    """The micro-batch indices rank computes in each of the step's rounds (every rank runs the
    same number of rounds): r, r + N, ...; None where it has none left (a zero-weighted pass)."""
    count = -(-micro_batches // world)
    return [i if i < micro_batches else None for i in range(rank, count * world, world)]


def dropout_seed(seed: int, step: int, rank: int) -> int:
    """The RNG seed of one rank's step: the same after a resume, different on every rank."""
    return (seed * 1_000_003 + step) * 1024 + rank


def sharded_memory_plan(shape: Any, available: int, devices: int, lora_r: int, **kwargs: Any) -> Any:
    """memplan.plan for one of `devices` ranks: the base and LoRA state are sharded, so each
    rank holds 1/devices of them plus two unsharded layers (the one computing, the one being
    gathered); the rest of the peak (activations, logits) is a one-device micro-batch's."""
    from lacd.pipeline.memplan import GIB, LORA_STATE_BYTES, margin, plan, weight_bytes

    whole = weight_bytes(shape, "bf16") + LORA_STATE_BYTES * shape.lora_params(lora_r)
    layer = 2 * sum(a * b for a, b in shape.linear_shapes())
    saved = max(whole - whole // devices - 2 * layer, 0)
    usable = available - margin(available) + saved  # what plan may count: a whole base, less what is sharded away
    inflated = max(int(usable / 0.92), usable + GIB)  # plan keeps margin(x) = max(1 GiB, 8% x) of x unplanned
    chosen = plan(shape, inflated, precision="bf16", lora_r=lora_r, **kwargs)
    return dataclasses.replace(chosen, expected_peak=chosen.expected_peak - saved, available=available)


@dataclasses.dataclass
class ShardedRecipe(LoRARecipe):
    """LoRARecipe on one rank of a torchrun launch, the model under FSDP2 (module docstring)."""

    def setup(self) -> None:
        """Join the process group, pick this rank's device, then the one-device setup."""
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        self.rank, self.world = rank_and_world()
        cuda = self.spec.device != "cpu" and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        elif self.spec.num_threads > 0:  # the CPU's threads are shared by the ranks
            self.spec = dataclasses.replace(self.spec, num_threads=max(1, self.spec.num_threads // self.world))
        if self.spec.base_precision == "nf4":
            raise TrainError("an NF4 base trains on one device; set [train] devices = 1")
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")
        self.mesh = init_device_mesh("cuda" if cuda else "cpu", (self.world,))
        super().setup()

    def _apply_memory_plan(self) -> TrainSpec:
        """On CUDA the plan of one rank (sharded_memory_plan), always bf16; on the CPU none."""
        from lacd.pipeline.memplan import PlanError, Shape

        spec = self.spec
        self.precision = str(self.dtype).removeprefix("torch.")
        self.plan = None
        if self.device.type != "cuda":
            return spec
        check_gpu(self.device)
        config = self.base_model.config if self.base_model is not None else self._base_config()
        requested = spec.gradient_checkpointing
        checkpointing = requested if isinstance(requested, str) else ("on" if requested else "off")
        available = gpu_memory_available(self.device, spec.gpu_memory_gib)
        longest = max(len(r["input_ids"]) for r in self.train_rows)
        try:
            self.plan = sharded_memory_plan(
                Shape.of(config), available, self.world,
                spec.lora_r, checkpointing=checkpointing, tokens_per_batch=spec.tokens_per_batch,
                grad_accum=spec.grad_accum, longest=longest,
                lora_dropout=spec.lora_dropout, logit_fraction=self._logit_fraction())
        except PlanError:
            raise TrainError(
                f"the base model does not fit {self.world} GPUs of {available / 2**30:.1f} GiB each in bf16, even with "
                f"gradient checkpointing and offloading at {longest} tokens: use more GPUs, a shorter "
                "[train] max_seq_len or a smaller base model") from None
        self.spec = dataclasses.replace(spec, tokens_per_batch=self.plan.tokens_per_batch,
                                        grad_accum=self.plan.grad_accum, base_precision="bf16")
        return self.spec

    def _load_base(self) -> torch.nn.Module:
        """The base on the host: fully_shard moves each rank's shard to its GPU."""
        from transformers import AutoModelForCausalLM

        if not (Path(self.spec.base_dir) / "config.json").is_file():
            raise TrainError(f"base model folder {self.spec.base_dir} has no config.json")
        return AutoModelForCausalLM.from_pretrained(self.spec.base_dir, dtype=self.dtype,
                                                    attn_implementation=self.attention)

    def _load_model(self) -> torch.nn.Module:
        """The one-device model (LoRA, speed settings; compile only when 'on'), then FSDP2."""
        from torch.distributed.fsdp import fully_shard

        if self.spec.compile == "auto":
            self.spec = dataclasses.replace(self.spec, compile="off")
        model = super()._load_model()
        decoder, head = decoder_and_head(model)
        for layer in decoder.layers:
            fully_shard(layer, mesh=self.mesh)
        fully_shard(decoder, mesh=self.mesh)
        for module in [*decoder.layers, decoder]:
            module.set_gradient_divide_factor(1.0)  # the sum over ranks: each rank's loss is already /labelled
            module.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)
        head.to(self.device)
        return model

    def _build_optimizer(self) -> torch.optim.Optimizer:
        """AdamW over this rank's shards of the LoRA parameters (foreach: DTensors)."""
        params = [p for _, p in self._trainable()]
        return torch.optim.AdamW(params, lr=self.spec.learning_rate, weight_decay=self.spec.weight_decay)

    def _agreed(self, flag: bool) -> bool:
        """True on every rank when it is true on any (pause requests, overdue checkpoints)."""
        import torch.distributed as dist

        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def _optimizer_step(self, planned: PlannedStep) -> tuple[float | None, int, int]:
        """This rank's share of one step's micro-batches (rounds), summed gradients, clip, step."""
        import torch.distributed as dist

        batches = [self._collate([self.train_rows[i] for i in group]) for group in planned.micro_batches]
        labelled = sum(labelled_token_count(b) for b in batches)
        tokens = sum(lesson_token_count(b) for b in batches)
        self.optimizer.zero_grad(set_to_none=True)
        summed = torch.zeros((), device=self.device)
        if labelled:
            torch.manual_seed(dropout_seed(self.spec.seed, self.counters.step, self.rank))
            spare = max(range(len(batches)), key=lambda i: labelled_token_count(batches[i]))
            for index in rounds(len(batches), self.rank, self.world):
                real = index is not None and labelled_token_count(batches[index]) > 0
                with compute_context(self.device, self.compute_dtype), self._offloading():
                    batch_loss = self._loss_sum(batches[index if real else spare])
                ((batch_loss if real else batch_loss * 0.0) / labelled).backward()
                if real:
                    summed += batch_loss.detach()
        if self.spec.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([p for _, p in self._trainable()], self.spec.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        dist.all_reduce(summed)
        return (float(summed) / labelled if labelled else None), tokens, labelled

    def _checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """The full LoRA weights and AdamW state, gathered from every rank (one-device layout)."""
        weights = {name: _full(p) for name, p in self._trainable()}
        state = self.optimizer.state_dict()
        state["state"] = {index: {k: _full(v) for k, v in sorted(values.items())}
                          for index, values in sorted(state["state"].items())}
        return weights, state

    def _placed(self, tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A one-device checkpoint's tensor as this rank's shard of `like` (no communication)."""
        return _shard_like(tensor, like)

    @property
    def is_writer(self) -> bool:
        """Rank 0 writes progress, checkpoints and the adapter."""
        return self.rank == 0

    def _save_adapter(self, folder: Path) -> None:
        """Gather the LoRA weights (every rank), rank 0 writes them as a peft adapter."""
        weights = {name: _full(p) for name, p in self._trainable()}
        if self.is_writer:
            self.model.save_pretrained(folder, state_dict=weights)

    def save(self) -> TrainResult | None:
        """Rank 0 saves as on one device; the other ranks take part in its collectives. All ranks
        then meet at a barrier: a rank that left the process group while rank 0's last gather
        was still in flight died in gloo's teardown ("terminate called without an active
        exception", SIGABRT; about one run in ten of test_distributed's two-rank test)."""
        import torch.distributed as dist

        if self.is_writer:
            result = super().save()
        else:
            evaluate(self.model, self.heldout_rows, self.spec.tokens_per_batch, self.device, self.compute_dtype)
            self._save_adapter(Path(self.spec.out_dir))
            result = None
        dist.barrier()
        return result

    def _report(self, phase: str, **fields: Any) -> None:
        """Progress from rank 0 only."""
        if getattr(self, "rank", 0) == 0:
            super()._report(phase, **fields)

    def cleanup(self) -> None:
        """Release the model, then leave the process group."""
        import torch.distributed as dist

        super().cleanup()
        self.__dict__.pop("mesh", None)  # the mesh holds the process group: drop it first
        if dist.is_initialized():
            dist.destroy_process_group()


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered whole onto the host (collective); a plain tensor copied to the host."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    return tensor.detach().to("cpu").contiguous()


def _shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` laid out as `like` (this rank's shard of a DTensor, no communication), on its device."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor):
        return full.to(like.device)
    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def recipe_for(spec: TrainSpec, on_progress: ProgressCallback | None) -> LoRARecipe:
    """ShardedRecipe inside a torchrun launch of several ranks, else LoRARecipe."""
    _, world = rank_and_world()
    return ShardedRecipe(spec, on_progress) if world > 1 else LoRARecipe(spec, on_progress)


if __name__ == "__main__":
    sys.exit(main())
