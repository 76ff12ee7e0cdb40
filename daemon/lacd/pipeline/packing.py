"""Padding-free packing: lessons concatenated into token-budget micro-batches.

A packed micro-batch is one row holding several lessons back to back, with
``position_ids`` restarting at 0 for each lesson. transformers reads those
restarts as sequence boundaries (masking_utils.find_packed_sequence_indices)
when no attention_mask and no cache are passed, and builds a block-diagonal
causal mask (sdpa, eager) or varlen boundaries (flash attention), so no lesson
attends to another. The first label of every lesson is set to -100 so the
last token of one lesson is never trained to predict the first token of the
next: with that, the shifted loss over a packed row is exactly the sum of the
per-lesson losses, and packing does not change the maths.

On CUDA the dense block-diagonal mask that sdpa gets is slow: it rules out
the flash kernel and costs a (L, L) mask per forward. ``VARLEN_ATTENTION``
is an attention implementation for transformers that runs PyTorch's own
variable-length flash attention (``torch.nn.attention.varlen``) on the
lesson boundaries that collate_packed returns (``cu_seq_lens``), so each
lesson attends only to itself and no masked block is ever computed.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from lacd.pipeline.cascade import cascade_attention

IGNORE_INDEX = -100
VARLEN_ATTENTION = "lacd_varlen"


def pack(lengths: Sequence[int], tokens_per_batch: int, order: Sequence[int] | None = None) -> list[list[int]]:
    """Group example indices into micro-batches of at most tokens_per_batch tokens.

    First fit: each example, taken in `order`, goes into the first
    micro-batch with room, or opens a new one. Without an order it is first-fit
    decreasing (longest first, ties by index): the fewest micro-batches, used
    for evaluation. Training passes a shuffled order, so each micro-batch
    mixes lessons of all lengths like a random batch does. An example longer
    than the budget gets a micro-batch of its own. The result is a
    deterministic function of the inputs; indices inside a micro-batch are
    ascending.
    """
    if tokens_per_batch < 1:
        raise ValueError(f"tokens_per_batch must be >= 1, not {tokens_per_batch}")
    if order is None:
        order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for index in order:
        length = lengths[index]
        slot = next((b for b, free in enumerate(room) if free >= length), None)
        if slot is None:
            bins.append([index])
            room.append(max(tokens_per_batch - length, 0))
        else:
            bins[slot].append(index)
            room[slot] -= length
    return [sorted(group) for group in bins]


def collate_packed(examples: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, torch.Tensor]:
    """One row: input_ids, labels and position_ids of the examples concatenated.

    Shapes are (1, total_tokens). position_ids restart at 0 for each example;
    each example's first label is -100 (see the module docstring). Also the
    lesson boundaries for varlen attention: cu_seq_lens (int32, the offsets
    0, len0, len0+len1, ...) and max_length (0-d, the longest lesson).
    """
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    boundaries = [0]
    for example in examples:
        ids = list(example["input_ids"])
        if not ids:
            continue
        input_ids.extend(ids)
        labels.append(IGNORE_INDEX)
        labels.extend(example["labels"][1 : len(ids)])
        position_ids.extend(range(len(ids)))
        boundaries.append(boundaries[-1] + len(ids))
    return {
        "input_ids": torch.tensor([input_ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([position_ids], dtype=torch.long),
        "cu_seq_lens": torch.tensor(boundaries, dtype=torch.int32),
        "max_length": torch.tensor(max(b - a for a, b in zip(boundaries, boundaries[1:])) if input_ids else 0),
    }


def collate_padded(
    examples: Sequence[Mapping[str, Sequence[int]]], pad_token_id: int = 0
) -> dict[str, torch.Tensor]:
    """The textbook batch: one row per example, right-padded to the longest.

    Returns input_ids, labels (-100 on padding) and attention_mask, each of
    shape (len(examples), longest). Used as the reference the packed path is
    tested against.
    """
    longest = max(len(example["input_ids"]) for example in examples)
    input_ids, labels, attention = [], [], []
    for example in examples:
        ids = list(example["input_ids"])
        pad = longest - len(ids)
        input_ids.append(ids + [pad_token_id] * pad)
        labels.append(list(example["labels"][: len(ids)]) + [IGNORE_INDEX] * pad)
        attention.append([1] * len(ids) + [0] * pad)
    return {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "attention_mask": torch.tensor(attention, dtype=torch.long),
    }


def labelled_token_count(batch: Mapping[str, torch.Tensor]) -> int:
    """How many tokens of a collated batch are predicted (labels after the shift)."""
    if "targets" in batch:
        return int(batch["targets"].numel())
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def lesson_token_count(batch: Mapping[str, torch.Tensor]) -> int:
    """Tokens of the batch's lessons as if each carried its own copy of a shared prefix."""
    if "lesson_tokens" in batch:
        return int(batch["lesson_tokens"])
    return int(batch["input_ids"].numel())


# --------------------------------------------------------------------------- varlen attention


def varlen_available(device: torch.device) -> bool:
    """True when PyTorch's variable-length flash attention can run on device (CUDA, sm80 or newer)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        from torch.nn.attention import varlen  # noqa: F401  (torch >= 2.10)
    except ImportError:
        return False
    return torch.cuda.get_device_capability(device)[0] >= 8


_VARLEN: dict[str, Any] = {}  # varlen_attn and its keyword names, filled by register_varlen_attention


def _load_varlen() -> None:
    """Import varlen_attn once, outside any compiled region (its signature changed after 2.10)."""
    if _VARLEN:
        return
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return
    _VARLEN["fn"] = varlen_attn
    _VARLEN["names"] = frozenset(inspect.signature(varlen_attn).parameters)


def _boundaries_from_positions(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """cu_seq_lens and the longest sequence, from position ids that restart at 0 (a host sync)."""
    flat = position_ids.reshape(-1)
    starts = (flat == 0).nonzero().reshape(-1)
    if starts.numel() == 0 or int(starts[0]) != 0:
        starts = torch.cat([starts.new_zeros(1), starts])
    cu = torch.cat([starts, starts.new_tensor([flat.numel()])]).to(torch.int32)
    return cu, int(cu.diff().max())


def _causal_segments(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu: torch.Tensor,
                     scale: float | None) -> torch.Tensor:
    """Reference path (CPU, old torch): causal sdpa on each lesson separately. (T, H, D) in and out."""
    if key.shape[1] != query.shape[1]:
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    out = torch.empty_like(query)
    bounds = cu.tolist()
    for start, end in zip(bounds, bounds[1:]):  # 4-D: sdpa's 3-D inputs take a path ~5x slower on the CPU
        q, k, v = (t[start:end].transpose(0, 1).unsqueeze(0) for t in (query, key, value))
        out[start:end] = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)[0].transpose(0, 1)
    return out


def _flash_varlen(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu: torch.Tensor,
                  max_length: int, scale: float | None) -> torch.Tensor:
    """Causal varlen flash attention over (T, H, D) tensors, whichever torch signature is installed."""
    if not _VARLEN:
        raise RuntimeError(f"{VARLEN_ATTENTION} needs torch.nn.attention.varlen (torch >= 2.10)")
    varlen_attn, names = _VARLEN["fn"], _VARLEN["names"]
    options: dict[str, Any] = {}
    if "window_size" in names:
        options["window_size"] = (-1, 0)
    else:
        options["is_causal"] = True
    if scale is not None and "scale" in names:
        options["scale"] = scale
    if key.shape[1] != query.shape[1]:
        if "enable_gqa" in names:
            options["enable_gqa"] = True
        else:
            groups = query.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    return varlen_attn(query, key, value, cu, cu, max_length, max_length, **options)


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: causal attention inside each packed lesson.

    query/key/value are (batch, heads, tokens, head_dim); the rows are read as
    one flat stream of lessons, bounded by the cu_seq_lens_q/max_length_q
    kwargs (collate_packed's boundaries) or else by position_ids restarting
    at 0. A shared-prefix row (a shared_prefix_len kwarg, see collate_shared_prefix) goes to
    shared_prefix_attention. A padded batch (an attention mask) goes to sdpa unchanged.
    Returns (batch, tokens, heads, head_dim), as transformers expects.
    """
    if attention_mask is not None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      scaling=scaling, dropout=dropout, **kwargs)
    if kwargs.get("shared_prefix_len") is not None or kwargs.get("prefix_block_mask") is not None:
        return shared_prefix_attention(query, key, value, scaling, kwargs), None
    batch, heads, tokens, dim = query.shape
    cu, max_length = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu is None or max_length is None:
        if kwargs.get("position_ids") is None:
            raise ValueError(f"{VARLEN_ATTENTION} needs cu_seq_lens_q/max_length_q or position_ids")
        cu, max_length = _boundaries_from_positions(kwargs["position_ids"])
    flat = [t.transpose(1, 2).reshape(batch * tokens, t.shape[1], dim) for t in (query, key, value)]
    if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16):
        out = _flash_varlen(*flat, cu.to(query.device, torch.int32), int(max_length), scaling)
    else:
        out = _causal_segments(*flat, cu, scaling)
    return out.reshape(batch, tokens, heads, dim), None


def varlen_attention_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """The mask function paired with VARLEN_ATTENTION: none for packed rows, sdpa's for a padded batch."""
    if kwargs.get("attention_mask") is None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


def register_varlen_attention() -> str:
    """Make VARLEN_ATTENTION known to transformers (idempotent); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    _load_varlen()
    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN_ATTENTION, varlen_attention_mask)
    return VARLEN_ATTENTION


# --------------------------------------------------------------------------- shared-prefix packing
#
# Every lesson carries local-ai-coder's system prompt (~790 tokens, 90% of the trained tokens).
# A shared-prefix row holds the longest common prefix of its lessons once, then each lesson's
# own tokens: [prefix | own_0 | own_1 | ...]. Position ids continue from the prefix's length in
# every lesson, and each lesson's tokens attend to the prefix and to themselves only (causally),
# so every token sees exactly what it sees when its lesson is computed alone. The prefix is
# computed once; its gradient is the sum over the row's lessons (autograd adds them). The loss
# is gathered, per lesson, at the positions that predict its labelled tokens: a lesson's first
# own token is predicted from the prefix's last position, which several lessons share, so those
# positions repeat in predict_at. The summed loss equals the sum of the lessons' own losses.


def common_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix that all rows share (0 for no rows)."""
    if not rows:
        return 0
    first = rows[0]
    length = min(len(row) for row in rows)
    for row in rows[1:]:
        length = next((i for i in range(length) if row[i] != first[i]), length)
        if length == 0:
            break
    return length


def pack_shared_prefix(
    lengths: Sequence[int], prefix_len: int, tokens_per_batch: int, order: Sequence[int] | None = None
) -> list[list[int]]:
    """pack() for lessons that all start with the same prefix_len tokens: a row holds the
    prefix once, so each lesson costs only its own tokens and the row's budget is
    tokens_per_batch minus the prefix (at least 1)."""
    own = [max(length - prefix_len, 0) for length in lengths]
    return pack(own, max(tokens_per_batch - prefix_len, 1), order)


def collate_shared_prefix(examples: Sequence[Mapping[str, Sequence[int]]], pad_to_multiple: int = 1) -> dict[str, torch.Tensor]:
    """One shared-prefix row of the examples (see the section comment above).

    Returns input_ids and position_ids (1, row_tokens); predict_at (the row position whose
    logits predict each labelled token, repeats allowed) and targets (that token), the same
    length; cu_seq_lens (int32: 0, prefix_len, then the end of each lesson's own tokens;
    lessons with no own token add no segment); prefix_len and max_length (0-d); lesson_tokens
    (0-d: the examples' own lengths summed, as if each carried the prefix). pad_to_multiple
    pads the row at its end with a segment of its own (token 0, never a target), for kernels
    that want fixed block sizes.
    """
    rows = [list(e["input_ids"]) for e in examples if len(e["input_ids"])]
    labelled = [list(e["labels"]) for e in examples if len(e["input_ids"])]
    prefix = common_prefix_length(rows) if rows else 0
    input_ids = rows[0][:prefix] if rows else []
    position_ids = list(range(prefix))
    boundaries = [0, prefix] if prefix else [0]
    predict_at: list[int] = []
    targets: list[int] = []
    for ids, labels in zip(rows, labelled):
        offset = len(input_ids) - prefix  # row position of this lesson's token `prefix`
        for t in range(1, len(ids)):
            if labels[t] != IGNORE_INDEX:
                source = t - 1
                predict_at.append(source if source < prefix else offset + source)
                targets.append(labels[t])
        if len(ids) > prefix:
            input_ids.extend(ids[prefix:])
            position_ids.extend(range(prefix, len(ids)))
            boundaries.append(len(input_ids))
    padding = -len(input_ids) % max(pad_to_multiple, 1)
    if padding:
        input_ids.extend([0] * padding)
        position_ids.extend(range(padding))
        boundaries.append(len(input_ids))
    spans = [b - a for a, b in zip(boundaries, boundaries[1:])]
    return {
        "input_ids": torch.tensor([input_ids], dtype=torch.long),
        "position_ids": torch.tensor([position_ids], dtype=torch.long),
        "predict_at": torch.tensor(predict_at, dtype=torch.long),
        "targets": torch.tensor(targets, dtype=torch.long),
        "cu_seq_lens": torch.tensor(boundaries, dtype=torch.int32),
        "prefix_len": torch.tensor(prefix),
        "max_length": torch.tensor(max(spans) if spans else 0),
        "lesson_tokens": torch.tensor(sum(len(ids) for ids in rows)),
    }


def segment_ids(cu_seq_lens: torch.Tensor, total: int) -> torch.Tensor:
    """The segment index of every row position (0 for the prefix), from the row's boundaries."""
    lengths = cu_seq_lens.diff().to(torch.long)
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)[:total]


def prefix_block_mask(cu_seq_lens: torch.Tensor, prefix_len: int, total: int, device: torch.device) -> Any:
    """FlexAttention block mask of a shared-prefix row: causal, and a token attends to its own
    segment and to the prefix's tokens only (prefix_len 0: plain document masking)."""
    from torch.nn.attention.flex_attention import create_block_mask

    segments = segment_ids(cu_seq_lens.to(device), total)
    shared = segments if prefix_len == 0 else segments.clone()
    if prefix_len:
        shared[:prefix_len] = -1  # the prefix is in every lesson's segment

    def mask_mod(b: Any, h: Any, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return (kv <= q) & ((segments[q] == segments[kv]) | (shared[kv] == -1))

    return create_block_mask(mask_mod, None, None, total, total, device=str(device))


_FLEX: dict[str, Any] = {}


def _flex_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask: Any,
                    scale: float | None) -> torch.Tensor:
    """FlexAttention over (B, H, T, D) tensors, compiled on CUDA (eager elsewhere: a reference)."""
    from torch.nn.attention.flex_attention import flex_attention

    if query.is_cuda and "compiled" not in _FLEX:
        _FLEX["compiled"] = torch.compile(flex_attention)
    function = _FLEX["compiled"] if query.is_cuda else flex_attention
    return function(query, key, value, block_mask=block_mask, scale=scale,
                    enable_gqa=key.shape[1] != query.shape[1])


def _prefix_segments(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu: torch.Tensor,
                     prefix_len: int, scale: float | None) -> torch.Tensor:
    """Per-lesson path of a shared-prefix row over (T, H, D) tensors (evaluation on CUDA; the CPU
    runs cascade_attention): causal sdpa on the prefix, then
    each lesson's queries against [prefix keys | its own keys] with a mask that is all-true on
    the prefix and causal on its own part (PyTorch's CPU flash kernel takes the mask and keeps
    no attention matrix for backward). Work per lesson: own x (prefix + own), never row x row."""
    gqa = key.shape[1] != query.shape[1]
    bounds = cu.tolist()
    # (1, H, T, D), contiguous: sdpa's fast 4-D path (3-D or strided inputs are several times slower on the CPU)
    q, k, v = (t.transpose(0, 1).unsqueeze(0).contiguous() for t in (query, key, value))
    parts = []
    if prefix_len:
        parts.append(F.scaled_dot_product_attention(
            q[:, :, :prefix_len], k[:, :, :prefix_len], v[:, :, :prefix_len], is_causal=True, scale=scale,
            enable_gqa=gqa,
        ))
    first = 1 if prefix_len else 0
    for start, end in zip(bounds[first:], bounds[first + 1:]):
        n = end - start
        keys = torch.cat([k[:, :, :prefix_len], k[:, :, start:end]], dim=2)
        values = torch.cat([v[:, :, :prefix_len], v[:, :, start:end]], dim=2)
        mask = torch.ones(n, prefix_len + n, dtype=torch.bool, device=query.device)
        mask[:, prefix_len:] = torch.ones(n, n, dtype=torch.bool, device=query.device).tril()
        parts.append(F.scaled_dot_product_attention(
            q[:, :, start:end], keys, values, attn_mask=mask, scale=scale, enable_gqa=gqa
        ))
    return torch.cat(parts, dim=2)[0].transpose(0, 1)


def shared_prefix_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None,
                            kwargs: Mapping[str, Any]) -> torch.Tensor:
    """Attention of a shared-prefix row, (1, H, T, D) in, (1, T, H, D) out: FlexAttention with the
    row's block mask when one was built (the prefix_block_mask kwarg: training on CUDA), else
    (shared_prefix_len and shared_prefix_cu kwargs) cascade attention on the CPU (cascade.py) or
    the per-lesson sdpa path (evaluation on CUDA)."""
    if query.shape[0] != 1:
        raise ValueError("shared-prefix rows are batches of one row")
    block_mask = kwargs.get("prefix_block_mask")
    if block_mask is not None:
        return _flex_attention(query, key, value, block_mask, scaling).transpose(1, 2)
    if query.device.type == "cpu":
        bounds = kwargs["shared_prefix_cu"].tolist()
        return cascade_attention(query, key, value, bounds, int(kwargs["shared_prefix_len"]), scaling).transpose(1, 2)
    flat = [t[0].transpose(0, 1) for t in (query, key, value)]
    out = _prefix_segments(*flat, kwargs["shared_prefix_cu"].cpu(), int(kwargs["shared_prefix_len"]), scaling)
    return out.unsqueeze(0)
