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
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

IGNORE_INDEX = -100


def pack(lengths: Sequence[int], tokens_per_batch: int) -> list[list[int]]:
    """Group example indices into micro-batches of at most tokens_per_batch tokens.

    First-fit decreasing: longest examples first, each into the first
    micro-batch with room. An example longer than the budget gets a
    micro-batch of its own. Ties are broken by index, so the result is a
    deterministic function of the inputs; indices inside a micro-batch are
    ascending.
    """
    if tokens_per_batch < 1:
        raise ValueError(f"tokens_per_batch must be >= 1, not {tokens_per_batch}")
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
    each example's first label is -100 (see the module docstring).
    """
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    for example in examples:
        ids = list(example["input_ids"])
        if not ids:
            continue
        input_ids.extend(ids)
        labels.append(IGNORE_INDEX)
        labels.extend(example["labels"][1 : len(ids)])
        position_ids.extend(range(len(ids)))
    return {
        "input_ids": torch.tensor([input_ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([position_ids], dtype=torch.long),
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
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
