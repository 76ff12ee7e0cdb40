"""lacd's losses pinned to Hugging Face's ``model(input_ids, labels=...).loss``.

The trainer's step loss (``loss_sum`` on padded and, separately, on packed batches), its gradient,
and the held-out loss that the train stage reports and the gate compares (``train.evaluate``),
each against transformers' own loss on the same lessons one at a time (tests/hf_reference.py).
Packed and padded are each compared with the reference, not with each other.
"""

from __future__ import annotations

import pytest
import torch

from hf_reference import hf_loss, hf_mean_loss
from lacd.pipeline.packing import collate_packed, collate_padded, labelled_token_count
from lacd.pipeline.loss import evaluate, loss_sum
from test_train import lesson_rows
from tiny import make_tiny_llama, tiny_lora_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    torch.set_num_threads(1)
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def rows(tiny_dir):
    """Lessons of different lengths (so padding really happens), the first tokens unlabelled."""
    rows = lesson_rows(tiny_dir, 5) + lesson_rows(tiny_dir, 3, offset=50)
    return [dict(r, input_ids=r["input_ids"][: len(r["input_ids"]) - 2 * i],
                 labels=r["labels"][: len(r["input_ids"]) - 2 * i]) for i, r in enumerate(rows)]


def grads_of(model, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("collate, groups", [(collate_padded, [(0, 4), (4, 8)]), (collate_packed, [(0, 3), (3, 8)])],
                         ids=["padded", "packed"])
def test_step_loss_and_gradient_are_hugging_faces(tiny_dir, rows, collate, groups):
    model = tiny_lora_model(tiny_dir)  # B non-zero: every LoRA matrix gets a gradient
    reference, count = hf_loss(model, rows)
    expected_grads = grads_of(model, reference / count)
    batches = [collate(rows[a:b]) for a, b in groups]
    assert sum(labelled_token_count(b) for b in batches) == count
    ours = sum(loss_sum(model, b) for b in batches)
    assert float(ours) == pytest.approx(float(reference), rel=1e-5)
    got_grads = grads_of(model, ours / count)
    assert got_grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(got_grads[name], grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("tokens_per_batch", [4096, 64])  # everything in one packed row / one lesson a row
def test_heldout_loss_is_hugging_faces_mean_loss(tiny_dir, rows, tokens_per_batch):
    model = tiny_lora_model(tiny_dir)
    expected = hf_mean_loss(model, rows)
    assert evaluate(model, rows, tokens_per_batch, torch.device("cpu")) == pytest.approx(expected, rel=1e-5)
    assert model.training  # evaluate puts the model back as it found it
