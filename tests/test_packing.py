"""Packing into token-budget micro-batches, and the attention isolation it relies on."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from lacd.pipeline.packing import (
    IGNORE_INDEX,
    collate_packed,
    collate_padded,
    labelled_token_count,
    pack,
)
from tiny import make_tiny_llama, random_lessons


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


def test_pack_covers_every_index_once_within_budget():
    lengths = [random.Random(i).randint(1, 100) for i in range(200)]
    groups = pack(lengths, 256)
    flat = sorted(i for group in groups for i in group)
    assert flat == list(range(200))
    assert all(sum(lengths[i] for i in group) <= 256 for group in groups)
    # first-fit decreasing wastes little: within one micro-batch of the ideal
    assert len(groups) <= -(-sum(lengths) // 256) + 1


def test_pack_is_deterministic_and_puts_oversized_examples_alone():
    lengths = [5, 300, 7, 5, 120, 300, 1]
    assert pack(lengths, 128) == pack(list(lengths), 128)
    groups = pack(lengths, 128)
    assert [1] in groups and [5] in groups
    assert all(group == sorted(group) for group in groups)
    with pytest.raises(ValueError):
        pack(lengths, 0)


def test_collate_packed_restarts_positions_and_masks_first_label():
    examples = [
        {"input_ids": [10, 11, 12], "labels": [10, 11, 12]},
        {"input_ids": [20, 21], "labels": [IGNORE_INDEX, 21]},
    ]
    batch = collate_packed(examples)
    assert batch["input_ids"].tolist() == [[10, 11, 12, 20, 21]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    # the first label of each lesson is dropped: 12 must never learn to predict 20
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 11, 12, IGNORE_INDEX, 21]]
    assert labelled_token_count(batch) == 3


def test_collate_padded_pads_right_with_ignored_labels():
    examples = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [4], "labels": [4]}]
    batch = collate_padded(examples, pad_token_id=9)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 9, 9]]
    assert batch["labels"].tolist() == [[1, 2, 3], [4, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_no_lesson_attends_to_another_in_a_packed_row(tiny_dir, attention):
    """Logits of each lesson are the same alone and packed with others (use_cache=False)."""
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32, attn_implementation=attention)
    model.eval()
    examples = random_lessons(4, seed=3)
    packed = collate_packed(examples)
    with torch.no_grad():
        together = model(
            input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False
        ).logits[0]
        start = 0
        for example in examples:
            ids = torch.tensor([example["input_ids"]])
            alone = model(input_ids=ids, use_cache=False).logits[0]
            torch.testing.assert_close(together[start : start + len(example["input_ids"])], alone,
                                       atol=1e-5, rtol=1e-4)
            start += len(example["input_ids"])
