"""Speed kernels of the train recipe: LoRA dropout fused into the A matrix (a custom autograd
function that keeps a 1-byte mask), peft's fp32 upcast turned off, Liger's fused kernels on the
base model (CUDA) or an RMSNorm autograd function of fewer passes (CPU), torch.compile of the
decoder layers, and gradient checkpointing of only some layers, keeping attention's outputs on the CPU."""

from __future__ import annotations

import functools
from typing import Any

import structlog
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from lacd.pipeline.trainspec import TrainError

log = structlog.get_logger(__name__)


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


def decoder_layers(model: torch.nn.Module) -> Any:
    """The decoder layers of a causal LM, peft-wrapped or not (None when not found)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else getattr(base, "model", None)
    return getattr(decoder, "layers", None)


def checkpoint_first_layers(model: torch.nn.Module, count: int) -> int:
    """Keep gradient checkpointing (already enabled) on the first `count` decoder layers only: the
    others keep their activations and are not recomputed in backward (plan.cpu_layers_to_checkpoint
    says how many must be checkpointed). Returns how many layers are checkpointed."""
    layers = decoder_layers(model) or []
    for index, layer in enumerate(layers):
        if hasattr(layer, "gradient_checkpointing"):
            layer.gradient_checkpointing = index < count
    return sum(1 for layer in layers if getattr(layer, "gradient_checkpointing", False))


_SAVED_IN_CHECKPOINTS = (torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,)


def _keep_attention(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
    """The selective checkpoint policy, called for every op of a checkpointed layer's forward."""
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_IN_CHECKPOINTS else CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_kwargs(device: torch.device) -> dict[str, Any]:
    """gradient_checkpointing_kwargs of the recipe: non-reentrant; on the CPU a checkpointed layer
    keeps the outputs and log-sum-exps of its flash-attention calls (PyTorch's selective
    checkpointing), so backward's recompute of the layer skips attention (~40% of a CPU step's
    time): one real 4,079-token step (bench/train_step.py, SmolLM2 bf16, 21 layers checkpointed)
    24.5 -> 23.5 s, for ~3.5 KB a token a layer (plan.checkpointed_layer_bytes_per_token counts it)."""
    kwargs: dict[str, Any] = {"use_reentrant": False}
    if device.type == "cpu":
        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _keep_attention)
    return kwargs


def compile_layers(model: torch.nn.Module, fall_back: bool) -> bool:
    """torch.compile each decoder layer in place. Returns whether it did.

    All layers share one compiled graph; the first two steps pay the compile (static shapes,
    then dynamic ones once a second length is seen; dynamic=True from the start compiled for
    ~90 s instead of ~34 s). fall_back: run eager if compiling fails (no working compiler, say).
    Evaluation runs eager (see evaluate).
    """
    layers = decoder_layers(model)
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


def disable_adapter_upcast(model: torch.nn.Module) -> None:
    """Stop peft from copying every adapter input to fp32; autocast runs the adapters instead."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False


class _RMSNorm(torch.autograd.Function):
    """weight * (x * rsqrt(mean(x^2) + eps)) as transformers' LlamaRMSNorm computes it (the
    normalisation in fp32, rounded to x's dtype, then the weight), keeping only x and the fp32
    reciprocal root of each row for backward; autograd of the module keeps an fp32 copy of x and
    its normalised copy, and spends ~8 elementwise passes where this spends ~4."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        mean_square = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32).square_()
        rstd = mean_square.div_(x.shape[-1]).add_(eps).rsqrt_()
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, weight, rstd = ctx.saved_tensors
        grad_x = grad_w = None
        normed = x * rstd  # fp32
        if ctx.needs_input_grad[1]:
            grad_w = (grad * normed.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            scaled = (grad * weight).float()  # the gradient of the rounded normalised x
            dot = (scaled * normed).mean(-1, keepdim=True)
            grad_x = scaled.sub_(normed.mul_(dot)).mul_(rstd).to(x.dtype)
        return grad_x, grad_w, None


_LLAMA_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")


def _rms_norm_forward(self: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    return _RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)


@functools.cache
def _fused_norm_class(norm_class: type) -> type:
    """A subclass of a Llama-formula RMSNorm class whose forward is the _RMSNorm function."""
    return type(f"Fused{norm_class.__name__}", (norm_class,), {"forward": _rms_norm_forward, "__module__": __name__})


def fuse_rms_norms(model: torch.nn.Module) -> int:
    """Give every RMSNorm of Llama's formula (_LLAMA_NORMS) the _RMSNorm function; the CPU's
    counterpart of Liger's fused RMSNorm on CUDA. Returns how many modules were changed.

    The module's class becomes a subclass with that forward (same parameters and names): a
    forward set on the instance is dropped by the ``kernels`` package that transformers runs at
    the first ``model.train()`` (it restores each kernel-capable layer's class forward), which
    silently undid an instance-level fusion in every real run."""
    changed = 0
    for module in model.modules():
        if type(module).__name__ in _LLAMA_NORMS and hasattr(module, "variance_epsilon"):
            module.__class__ = _fused_norm_class(type(module))
            changed += 1
    return changed


def cpu_keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout's keep-mask for a CPU tensor x (bool, x's shape), from 16-bit random integers, four
    cut from each 64-bit draw of the CPU generator: native_dropout draws a bernoulli per element,
    ~2.5x slower, and was 17% of a CPU training step (SmolLM2, bf16). p is rounded to 1/65536."""
    n = x.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), 2**63 - 1).view(torch.int16)[:n]
    return (bits >= round(p * 65536) - 32768).view(x.shape)


class _InputDropoutLinear(torch.autograd.Function):
    """linear(dropout(x), weight) that keeps only dropout's 1-byte mask for backward.

    peft computes lora_A(dropout(x)): autograd then keeps, for every adapter, the
    dropped copy of x (lora_A's weight gradient needs it) and dropout's mask: 3 bytes
    per input element in bf16, 8 GiB at 4096 tokens on CodeLlama-7B. Here backward
    rebuilds the dropped copy from x (kept anyway: the adapters without dropout keep
    it too, and q, k and v share it) and the mask. Same values, same gradients.
    On the CPU dropout's 1 / (1 - p) is applied to the rank-r output and gradient, not
    to the input: one pass over each adapter input in forward and two in backward
    instead of two and four (elementwise passes were ~15% of a CPU step).
    Under autocast the matmuls run in the autocast dtype, as peft's would.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, p: float) -> torch.Tensor:
        ctx.scale = 1.0 / (1.0 - p)
        if x.device.type == "cpu":
            mask = cpu_keep_mask(x, p)
            out = F.linear(x * mask, weight).mul_(ctx.scale)
        else:
            dropped, mask = torch.native_dropout(x, p, True)
            out = F.linear(dropped, weight)
        ctx.save_for_backward(x, weight, mask)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, weight, mask = ctx.saved_tensors
        grad = grad * ctx.scale  # rank r wide
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ weight.to(grad.dtype)).mul_(mask).to(x.dtype)
        if ctx.needs_input_grad[1]:
            kept = (x * mask).to(grad.dtype)
            grad_w = grad.reshape(-1, grad.shape[-1]).t() @ kept.reshape(-1, kept.shape[-1])
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


def _lora_sum_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """peft's LoRA Linear forward with the adapter's product added by one addmm (see fuse_lora_sum);
    peft's own forward whenever anything but one plain unmerged adapter is active."""
    names = self.active_adapters
    if (args or kwargs or self.disable_adapters or self.merged or len(names) != 1
            or names[0] not in self.lora_A or names[0] in self.lora_variant or self.lora_B[names[0]].bias is not None):
        return type(self).forward(self, x, *args, **kwargs)
    name = names[0]
    result = self.base_layer(x)
    h = self.lora_A[name](self.lora_dropout[name](self._cast_input_dtype(x, self.lora_A[name].weight.dtype)))
    if h.dtype != result.dtype and not torch.is_autocast_enabled(result.device.type):
        return result + (self.lora_B[name](h) * self.scaling[name]).to(result.dtype)  # peft's fp32 upcast
    flat = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), self.lora_B[name].weight.t(),
                       alpha=self.scaling[name])
    return flat.view(result.shape).to(result.dtype)


def fuse_lora_sum(model: torch.nn.Module) -> int:
    """Add each LoRA adapter's output to the base layer's with one addmm (the scaling as its
    alpha) instead of peft's lora_B(h) * scaling, then result + that: two elementwise passes
    over every adapter's output in forward and one in backward fewer, the sum accumulated in the
    matmul. Returns how many LoRA layers were changed (their parameters and names are untouched)."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    changed = 0
    for module in model.modules():
        if type(module) is LoraLinear and getattr(module.forward, "__func__", None) is not _lora_sum_forward:
            module.forward = _lora_sum_forward.__get__(module)
            changed += 1
    return changed
