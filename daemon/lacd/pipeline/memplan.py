"""The GPU memory plan of a training run: base precision, gradient checkpointing, micro-batch.

A pure function of the model's shape and the memory it may use (``plan``): it tries the
plans fastest first and takes the first whose expected peak fits with a margin:

  bf16, no checkpointing  >  nf4, no checkpointing  >  bf16, checkpointing  >  nf4,
  checkpointing  >  bf16, then nf4, checkpointing with the kept layer inputs offloaded to
  pinned host memory;
  each at the configured token budget, then at half of it (twice the
  accumulation, the same tokens per optimizer step) down to the longest lesson, before
  the next one.

(bench/train_gpu.py on an H100, CodeLlama-7B shape, trained tokens/s: bf16 12,830, nf4 with
bitsandbytes' kernels 10,534, bf16 + checkpointing 7,322, nf4 + checkpointing 6,378; offloading
cost the 34B shape 43% more.) A requested precision or checkpointing setting narrows the choice. When nothing fits, ``plan`` raises PlanError
naming how much is needed.

The expected peak is weights + LoRA state (fp32 weights, gradients, AdamW moments) +
activations kept for backward (``activation_bytes_per_token``) + logits of one loss chunk
(the train stage computes them LOSS_CHUNK_ELEMENTS at a time) + the transient dequantized
weight (NF4) + the CUDA context the allocator does not see; the margin covers fragmentation.
With checkpointing the recomputed layer and the loss chunk are never alive together (the
loss's backward is done before the last layer is recomputed), so the peak holds the larger
of the two, not their sum. Calibrated on bench/train_gpu.py's capped runs (README, "4-bit
base": measured and expected peak side by side).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterator

from lacd.pipeline.nf4 import DEQUANTIZE_CHUNK, NF4_BYTES_PER_WEIGHT

GIB = 1 << 30
LORA_STATE_BYTES = 16  # per LoRA parameter: fp32 weight, gradient, AdamW's two moments
TORCHAO_DEQUANT_BYTES = 8  # per weight of a torchao dequantize chunk (int32 codes + bf16 values + result)
BNB_DEQUANT_BYTES = 2  # per weight of the largest projection: bitsandbytes dequantizes it whole, to bf16
LOGIT_BYTES = 12  # per logit of the loss chunk: bf16 logits, their fp32 copy and its gradient
LOSS_CHUNK_ELEMENTS = 1 << 25  # logits computed at a time by the train stage's loss (chunked_loss_sum)
CONTEXT_BYTES = GIB // 2  # CUDA context and cuBLAS workspaces (not in torch's own count)


class PlanError(Exception):
    """No plan fits the memory; the message says how much the smallest plan needs and the fix."""


@dataclass(frozen=True)
class Shape:
    """The figures of a decoder-only model the memory model needs."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool = False

    @classmethod
    def of(cls, config: Any) -> "Shape":
        """The figures of a transformers config (Llama-like names)."""
        hidden = int(config.hidden_size)
        heads = int(config.num_attention_heads)
        return cls(
            hidden=hidden, intermediate=int(config.intermediate_size), layers=int(config.num_hidden_layers),
            heads=heads, kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            head_dim=int(getattr(config, "head_dim", None) or hidden // heads), vocab=int(config.vocab_size),
            tied=bool(getattr(config, "tie_word_embeddings", False)),
        )

    def kv_cache_bytes_per_token(self, element_size: int) -> int:
        """Bytes of key/value cache one token takes (every layer's keys and values)."""
        return self.layers * 2 * self.kv_heads * self.head_dim * element_size

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of one layer's seven linear projections."""
        h, i, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]

    def linear_params(self) -> int:
        """Weights of every decoder layer's linear projections."""
        return self.layers * sum(a * b for a, b in self.linear_shapes())

    def other_params(self) -> int:
        """Embeddings, lm_head and norms (kept in bf16 by the NF4 plan)."""
        embed = self.vocab * self.hidden
        return embed * (1 if self.tied else 2) + self.layers * 2 * self.hidden + self.hidden

    def lora_params(self, r: int) -> int:
        """LoRA parameters of rank r on every linear projection."""
        return self.layers * sum(r * (a + b) for a, b in self.linear_shapes())


@dataclass(frozen=True)
class Plan:
    """What a run will do and the peak it expects (bytes)."""

    precision: str
    gradient_checkpointing: bool
    offload: bool
    tokens_per_batch: int
    grad_accum: int
    expected_peak: int
    available: int

    def describe(self) -> str:
        """One line for the log and `lacd status`: 'nf4, checkpointing, 4096 tok x1, ~5.8 of 8.0 GiB'."""
        kept = ", checkpointing" + (" (offloaded)" if self.offload else "") if self.gradient_checkpointing else ""
        return (f"{self.precision}{kept}, "
                f"{self.tokens_per_batch} tok x{self.grad_accum}, "
                f"~{self.expected_peak / GIB:.1f} of {self.available / GIB:.1f} GiB")

    def to_dict(self) -> dict:
        """The plan as plain values, with the GiB figures rounded for reading."""
        values = asdict(self)
        values["expected_peak_gib"] = round(self.expected_peak / GIB, 2)
        values["available_gib"] = round(self.available / GIB, 2)
        values["text"] = self.describe()
        return values


def weight_bytes(shape: Shape, precision: str) -> int:
    """Bytes of the frozen base on the GPU: bf16 everywhere, or NF4 linear projections."""
    if precision == "nf4":
        return int(shape.linear_params() * NF4_BYTES_PER_WEIGHT) + 2 * shape.other_params()
    return 2 * (shape.linear_params() + shape.other_params())


def layer_bytes_per_token(shape: Shape, lora_dropout: float) -> int:
    """Bytes one decoder layer keeps for backward per token (bf16 compute, LoRA in bf16 under
    autocast): two fp32 RMSNorm inputs (8 h), the normed adapter inputs (4 h), q, k, v and the
    attention output (8 h), the MLP's gate, up, SiLU and product (8 i), LoRA dropout's 1-byte
    masks (6 h + i)."""
    h, i = shape.hidden, shape.intermediate
    return 20 * h + 8 * i + ((6 * h + i) if lora_dropout > 0 else 0)


def activation_bytes_per_token(shape: Shape, lora_dropout: float, checkpointing: bool,
                               offload: bool = False) -> int:
    """Bytes kept for backward per token: every layer's activations, or with checkpointing each
    layer's input (2 h; in host memory when offloaded) plus one layer's while it is recomputed."""
    per_layer = layer_bytes_per_token(shape, lora_dropout)
    if checkpointing:
        return (0 if offload else shape.layers * 2 * shape.hidden) + per_layer
    return shape.layers * per_layer


def logit_bytes(shape: Shape, tokens: int, logit_fraction: float) -> int:
    """Bytes of the logits alive at once: the labelled positions, at most one loss chunk of rows."""
    rows = min(int(tokens * logit_fraction), max(1, LOSS_CHUNK_ELEMENTS // shape.vocab))
    return rows * shape.vocab * LOGIT_BYTES


def dequant_bytes(shape: Shape) -> int:
    """The transient of an NF4 matmul: the largest projection dequantized whole to bf16 by
    bitsandbytes (CUDA), or a DEQUANTIZE_CHUNK of it by the torchao path, whichever is more."""
    largest = max(a * b for a, b in shape.linear_shapes())
    return max(BNB_DEQUANT_BYTES * largest, TORCHAO_DEQUANT_BYTES * min(largest, DEQUANTIZE_CHUNK))


def expected_peak(shape: Shape, precision: str, checkpointing: bool, tokens: int, lora_r: int,
                  lora_dropout: float, logit_fraction: float = 1.0, offload: bool = False) -> int:
    """The peak GPU memory (bytes) of a training step of `tokens` tokens under this plan.

    logit_fraction: the share of a micro-batch's positions whose logits are computed (the
    train stage computes them only where the next token is labelled).
    """
    logits = logit_bytes(shape, tokens, logit_fraction)
    if checkpointing:  # the recomputed layer and the loss chunk are not alive together
        kept = 0 if offload else shape.layers * 2 * shape.hidden * tokens
        activations = kept + max(tokens * layer_bytes_per_token(shape, lora_dropout), logits)
    else:
        activations = tokens * activation_bytes_per_token(shape, lora_dropout, False) + logits
    dequant = dequant_bytes(shape) if precision == "nf4" else 0
    return (weight_bytes(shape, precision) + LORA_STATE_BYTES * shape.lora_params(lora_r)
            + activations + dequant + CONTEXT_BYTES)


def _candidates(precision: str, checkpointing: str, tokens_per_batch: int, grad_accum: int,
                longest: int) -> Iterator[tuple[str, tuple[bool, bool], int, int]]:
    """(precision, (checkpointing, offload), tokens, accumulation), fastest first (module docstring)."""
    precisions = ["bf16", "nf4"] if precision == "auto" else [precision]
    choices = {"auto": [(False, False), (True, False), (True, True)], "on": [(True, False)], "off": [(False, False)],
               "offload": [(True, True)]}
    if checkpointing not in choices:
        raise PlanError(f"unknown gradient_checkpointing {checkpointing!r} (auto, on, off or offload)")
    checkpoints = choices[checkpointing]
    budgets = []
    tokens, accum = tokens_per_batch, grad_accum
    while True:
        budgets.append((tokens, accum))
        if tokens // 2 < max(longest, 1):
            break
        tokens, accum = tokens // 2, accum * 2
    for c in checkpoints:
        for p in precisions:
            for tokens, accum in budgets:
                yield p, c, tokens, accum


def margin(available: int) -> int:
    """Memory left unplanned: 1 GiB or 8% of what is available, whichever is more."""
    return max(GIB, int(0.08 * available))


def plan(shape: Shape, available: int, *, precision: str = "auto", checkpointing: str = "auto",
         tokens_per_batch: int, grad_accum: int = 1, longest: int, lora_r: int = 16,
         lora_dropout: float = 0.05, logit_fraction: float = 1.0) -> Plan:
    """The fastest plan whose expected peak fits in `available` bytes with a margin."""
    if precision not in ("auto", "bf16", "nf4"):
        raise PlanError(f"unknown base_precision {precision!r} (auto, bf16 or nf4)")
    usable = available - margin(available)
    smallest = None
    for p, (c, off), tokens, accum in _candidates(precision, checkpointing, tokens_per_batch, grad_accum, longest):
        peak = expected_peak(shape, p, c, tokens, lora_r, lora_dropout, logit_fraction, off)
        if peak <= usable:
            return Plan(p, c, off, tokens, accum, peak, available)
        smallest = peak if smallest is None else min(smallest, peak)
    raise PlanError(
        f"the base model needs ~{smallest / GIB:.1f} GiB of GPU memory even "
        f"{'in 4-bit' if precision != 'bf16' else 'in bf16'} with gradient checkpointing and offloading "
        f"at {max(longest, 1)} tokens, and {available / GIB:.1f} GiB are usable: use a smaller base model, "
        f"a shorter [train] max_seq_len, or train on the CPU ([train] device = cpu)"
    )
