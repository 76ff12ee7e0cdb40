"""The training loss: summed next-token cross-entropy over labelled tokens of a collated batch.

Packed rows pass lesson boundaries to varlen attention (no lesson attends to another);
shared-prefix rows pass the prefix they hold once; the logits are computed in chunks on
the labelled positions only. Also the held-out loss (evaluate) the recipe reports before
and after training and the evaluate stage reuses.
"""

from __future__ import annotations

import contextlib
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from lacd.pipeline.memplan import LOSS_CHUNK_ELEMENTS
from lacd.pipeline.packing import (
    IGNORE_INDEX,
    VARLEN_ATTENTION,
    collate_packed,
    collate_shared_prefix,
    common_prefix_length,
    labelled_token_count,
    pack,
    pack_shared_prefix,
    prefix_block_mask,
    register_varlen_attention,
)
from lacd.pipeline.plan import compute_context
from lacd.pipeline.trainspec import TrainError


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
# that is ~680 labelled positions per chunk. LOSS_CHUNK_ELEMENTS is declared in memplan, whose
# memory model counts it.
# Lessons share a prefix worth holding once per row from this many tokens on (TrainSpec.shared_prefix).
MIN_SHARED_PREFIX = 16


def decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
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

    _, head = decoder_and_head(model)
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
    decoder, _ = decoder_and_head(model)
    hidden = decoder(
        input_ids=batch["input_ids"].to(device, non_blocking=True),
        position_ids=batch["position_ids"].to(device, non_blocking=True),
        use_cache=False,
        **attention,
    ).last_hidden_state[0]
    return chunked_loss_sum(model, hidden.index_select(0, keep.to(device, non_blocking=True)),
                            targets.to(device, non_blocking=True))


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


def _eager() -> contextlib.AbstractContextManager:
    """Run compiled modules eagerly (a few evaluation passes are not worth a second compile)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


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
