"""The base model's frozen linear weights in 4-bit NF4 (QLoRA): bitsandbytes on CUDA, torchao elsewhere.

Both hold each weight as 4-bit NormalFloat codes in blocks of 64 with 8-bit
double-quantized block scales: about 4.13 bits a weight, the format of the QLoRA paper.
On CUDA, where bitsandbytes imports, a projection is a ``BnbNF4Linear``: bitsandbytes'
packed codes and ``QuantState``, its forward ``bnb.matmul_4bit`` (CUDA dequantize kernel,
then one bf16 matmul; backward dequantizes again and multiplies: nothing but the 4-bit
weight is kept). bench/train_gpu.py measured it 3x faster per projection than the torchao
path below (README, "4-bit base"). Without bitsandbytes on CUDA the torchao path is
used, with one log line (``backend``).

torchao's ``NF4Tensor`` (what torchtune's QLoRA recipes use) is the CPU path (pure
PyTorch: the real 4-bit path runs in CPU CI). ``NF4Linear`` is an ``nn.Linear`` (so peft
wraps it like any linear layer) whose weight is the NF4 tensor. Its forward dequantizes
the weight to the compute dtype for one matmul and frees it; backward dequantizes again,
with int32 codes instead of torchao's int64 ones (half the transient memory).

``load_nf4_base`` builds the model on the meta device and streams the safetensors
weights one tensor at a time: a linear weight goes to the device, is quantized, and
its bf16 copy is freed, so the whole model is never held in bf16 on the GPU, and the
host holds one tensor at a time.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import structlog
import torch
import torch.nn.functional as F

log = structlog.get_logger(__name__)

NF4_BLOCK = 64  # weights per scale (QLoRA's)
NF4_SCALER_BLOCK = 256  # scales per fp32 factor of the double quantization
# bytes a quantized weight takes: half a byte, an 8-bit scale per 64, an fp32 factor per 64 x 256
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / NF4_BLOCK + 4 / (NF4_BLOCK * NF4_SCALER_BLOCK)
QUANTIZE_CHUNK = 1 << 22  # weights quantized at a time (to_nf4)
DEQUANTIZE_CHUNK = 1 << 24  # weights dequantized at a time in a matmul (128 MiB of transient in bf16 + codes)
SKIP = ("lm_head",)  # kept in full precision (as QLoRA and torchtune do)
INSTALL_HINT = "pip install 'lacd[gpu]' (torchao)"
BITSANDBYTES, TORCHAO = "bitsandbytes", "torchao"  # the two storages (backend)


class NF4Unavailable(RuntimeError):
    """torchao is missing; the message names the fix."""


def nf4_tensor_class() -> type:
    """torchao's NF4Tensor, or NF4Unavailable naming the package to install."""
    try:
        from torchao.quantization import NF4Tensor
    except ImportError:
        try:
            from torchao.dtypes.nf4tensor import NF4Tensor  # torchao < 0.15
        except ImportError:
            raise NF4Unavailable(f"4-bit (nf4) training needs torchao: {INSTALL_HINT}") from None
    return NF4Tensor


def to_nf4(weight: torch.Tensor, chunk: int = QUANTIZE_CHUNK) -> torch.Tensor:
    """weight (2-D, whole 64-element blocks) as torchao's NF4Tensor on its device.

    The same values as torchao's NF4Tensor.from_tensor, but the codes are found `chunk`
    weights at a time: torchao compares every weight with all 16 levels at once (32 bytes a
    weight in bf16, 5.8 GB for one 34B MLP matrix), which a small card cannot hold.
    """
    cls = nf4_tensor_class()
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import SubclassTensorArgs

    weight = weight.contiguous()
    scaler_block = NF4_SCALER_BLOCK
    blocks = weight.numel() // NF4_BLOCK
    while blocks % scaler_block:  # torchao needs the block count divisible by the scaler block
        scaler_block //= 2
    if weight.numel() <= chunk:
        return cls.from_tensor(weight, NF4_BLOCK, scaler_block)
    flat = weight.view(-1)
    scalers, factor, mean = cls.double_quantize_scalers(flat, NF4_BLOCK, scaler_block)
    levels = cls.from_tensor(flat[: NF4_BLOCK * scaler_block].view(1, -1), NF4_BLOCK, scaler_block).nf4
    step = chunk - chunk % NF4_BLOCK
    codes = torch.cat([cls.convert_to_norm_float_weight(part, part.numel() // NF4_BLOCK, NF4_BLOCK, levels)
                       for part in flat.split(step)])
    meta = SubclassTensorArgs(weight.size(), weight.stride(), weight.storage_offset(), weight.dtype,
                              weight.device, False)
    return cls(meta, NF4_BLOCK, blocks, scaler_block, scalers, factor, mean, codes, nf4=levels)


def quantizable(weight: torch.Tensor) -> bool:
    """Whether a weight can be held in NF4 (whole 64-element blocks)."""
    return weight.dim() == 2 and weight.numel() % NF4_BLOCK == 0


def _scales(weight: Any, dtype: torch.dtype) -> torch.Tensor:
    """The per-block scales of an NF4Tensor (double quantization undone), in dtype."""
    return weight.dequantize_scalers(weight.quantized_scalers, weight.quantization_factor,
                                     weight.scaler_block_size).to(dtype)


def dequantize(weight: Any, dtype: torch.dtype, rows: tuple[int, int] | None = None,
               scales: torch.Tensor | None = None) -> torch.Tensor:
    """The NF4Tensor's values in dtype, all rows or rows[0]:rows[1] (int32 codes: half the
    transient of torchao's int64 ones)."""
    scales = _scales(weight, dtype) if scales is None else scales
    first, last = rows if rows is not None else (0, weight.shape[0])
    columns = weight.numel() // weight.shape[0]
    block = weight.block_size
    start, end = first * columns // block, last * columns // block
    data = weight.quantized_data[start * block // 2 : end * block // 2]
    codes = torch.stack(((data >> 4).to(torch.int32), (data & 15).to(torch.int32)), dim=-1)
    values = weight.nf4.to(dtype)[codes.view(-1, block)]
    return (values * scales[start:end].view(-1, 1)).view(last - first, *weight.shape[1:])


def _row_chunks(weight: Any) -> list[tuple[int, int]]:
    """Row ranges of at most DEQUANTIZE_CHUNK weights each, on whole 64-weight blocks."""
    rows, columns = weight.shape[0], weight.numel() // weight.shape[0]
    if weight.numel() <= DEQUANTIZE_CHUNK or columns % weight.block_size:
        return [(0, rows)]
    step = max(1, DEQUANTIZE_CHUNK // columns)
    return [(first, min(first + step, rows)) for first in range(0, rows, step)]


class _NF4Matmul(torch.autograd.Function):
    """x @ dequantize(W).T keeping only the 4-bit W for backward (W is frozen). A large W is
    dequantized DEQUANTIZE_CHUNK weights at a time (forward: output columns; backward: summed
    row blocks), so the transient is bounded whatever the layer's size."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: Any) -> torch.Tensor:
        ctx.weight, ctx.x_dtype = weight, x.dtype
        dtype = weight.dtype
        chunks = _row_chunks(weight)
        if len(chunks) == 1:
            return F.linear(x.to(dtype), dequantize(weight, dtype))
        scales, inputs = _scales(weight, dtype), x.to(dtype)
        return torch.cat([F.linear(inputs, dequantize(weight, dtype, rows, scales)) for rows in chunks], dim=-1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        weight = ctx.weight
        dtype = weight.dtype
        grad = grad.to(dtype)
        chunks = _row_chunks(weight)
        if len(chunks) == 1:
            return (grad @ dequantize(weight, dtype)).to(ctx.x_dtype), None
        scales = _scales(weight, dtype)
        result = None
        for first, last in chunks:
            part = grad[..., first:last] @ dequantize(weight, dtype, (first, last), scales)
            result = part if result is None else result.add_(part)
        return result.to(ctx.x_dtype), None


class NF4Linear(torch.nn.Linear):
    """A frozen linear layer whose weight is an NF4Tensor (peft wraps it as an nn.Linear)."""

    def __init__(self, weight: Any, bias: torch.Tensor | None) -> None:
        torch.nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The linear map with the weight dequantized for this call only."""
        out = _NF4Matmul.apply(x, self.weight)
        return out if self.bias is None else out + self.bias.to(out.dtype)


def _import_bitsandbytes() -> Any:
    """The bitsandbytes module, or None where it is not installed or cannot load."""
    try:
        import bitsandbytes
    except Exception:  # noqa: BLE001 - a broken install (no CUDA library) is as good as none
        return None
    return bitsandbytes


@functools.cache
def _cuda_backend() -> str:
    """bitsandbytes where it imports, else torchao with one log line naming the fix."""
    if _import_bitsandbytes() is not None:
        return BITSANDBYTES
    log.warning("nf4_backend_fallback", backend=TORCHAO,
                reason="bitsandbytes is not installed: 4-bit layers use torchao's slower dequantize "
                       "(bench/train_gpu.py: ~3x per projection); pip install 'lacd[gpu]'")
    return TORCHAO


def backend(device: torch.device) -> str:
    """The NF4 storage for weights on device: bitsandbytes' CUDA kernels on CUDA when installed,
    else torchao (the CPU, and CUDA without bitsandbytes)."""
    return _cuda_backend() if torch.device(device).type == "cuda" else TORCHAO


class BnbNF4Linear(torch.nn.Linear):
    """A frozen linear layer in bitsandbytes' NF4 (packed codes + QuantState; double-quantized scales,
    blocks of 64, as NF4Linear). peft wraps it as an nn.Linear."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        torch.nn.Module.__init__(self)
        bnb = _import_bitsandbytes()
        self.out_features, self.in_features = weight.shape
        packed, self.quant_state = bnb.functional.quantize_4bit(
            weight.contiguous(), blocksize=NF4_BLOCK, compress_statistics=True, quant_type="nf4")
        self.weight = torch.nn.Parameter(packed, requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        self._matmul = bnb.matmul_4bit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """bitsandbytes' 4-bit matmul in the weight's dtype (its backward: dequantize, then matmul)."""
        out = self._matmul(x.to(self.quant_state.dtype), self.weight, self.quant_state)
        return out if self.bias is None else out + self.bias.to(out.dtype)


def quantized_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.nn.Linear:
    """A frozen 4-bit layer of a full-precision weight, in the storage of its device (backend)."""
    if backend(weight.device) == BITSANDBYTES:
        return BnbNF4Linear(weight, bias)
    return NF4Linear(to_nf4(weight), bias)


def is_nf4(module: torch.nn.Module) -> bool:
    """True for a layer held in 4 bits."""
    return isinstance(module, (NF4Linear, BnbNF4Linear))


def quantize_linears(model: torch.nn.Module, skip: tuple[str, ...] = SKIP) -> int:
    """Replace every nn.Linear (not named in skip) by a 4-bit layer (quantized_linear), in place.
    Returns how many."""
    count = 0
    for name, module in list(model.named_modules()):
        if type(module) is not torch.nn.Linear or name.split(".")[-1] in skip or not quantizable(module.weight):
            continue
        parent, _, child = name.rpartition(".")
        replacement = quantized_linear(module.weight.detach(), module.bias)
        setattr(model.get_submodule(parent) if parent else model, child, replacement)
        count += 1
    return count


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder, in index order when sharded."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = dict.fromkeys(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        return [folder / name for name in names]
    return sorted(folder.glob("*.safetensors"))


def load_nf4_base(folder: Path, device: torch.device, dtype: torch.dtype, attention: str,
                  skip: tuple[str, ...] = SKIP) -> torch.nn.Module:
    """A causal LM from an HF folder with its linear weights in NF4 on device, streamed tensor by
    tensor (see the module docstring). Other weights (embeddings, norms, lm_head) are in dtype."""
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    if backend(device) == TORCHAO:
        nf4_tensor_class()
    files = _weight_files(Path(folder))
    if not files:
        raise FileNotFoundError(f"{folder} holds no *.safetensors weights (4-bit loading reads safetensors)")
    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention)
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for key in handle.keys():
                _place(model, key, handle.get_tensor(key), device, dtype, skip)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise ValueError(f"{folder} has no weights for {', '.join(missing[:3])}")
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = buffer.to(device)
    return model.eval()


def _place(model: torch.nn.Module, key: str, tensor: torch.Tensor, device: torch.device,
           dtype: torch.dtype, skip: tuple[str, ...]) -> None:
    """Put one checkpoint tensor into the meta model: quantized if it is a linear layer's weight."""
    owner, _, attribute = key.rpartition(".")
    try:
        module = model.get_submodule(owner)
    except AttributeError:
        return  # a tensor the model does not have (rotary caches of old checkpoints, say)
    if attribute not in module._parameters:
        return
    value = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
    if (type(module) is torch.nn.Linear and attribute == "weight" and owner.split(".")[-1] not in skip
            and quantizable(value)):
        parent, _, child = owner.rpartition(".")
        bias = module.bias if module.bias is not None and module.bias.device.type != "meta" else None
        replacement = quantized_linear(value, bias)
        if module.bias is not None and bias is None:
            replacement.bias = module.bias  # still on meta: filled when its tensor comes
        setattr(model.get_submodule(parent) if parent else model, child, replacement)
        return
    module._parameters[attribute] = torch.nn.Parameter(value, requires_grad=False)
