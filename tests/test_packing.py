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
    collate_shared_prefix,
    common_prefix_length,
    labelled_token_count,
    pack,
    pack_shared_prefix,
    prefix_block_mask,
    segment_ids,
)
from lacd.pipeline.loss import chunked_loss_sum, loss_sum, use_shared_prefix_attention
from tiny import make_tiny_llama, random_lessons, tiny_lora_model


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


# --------------------------------------------------------------------------- shared-prefix packing


def prefixed_lessons(prefix_len: int = 24, seed: int = 5) -> list[dict]:
    """Lessons of different lengths that start with the same prefix_len tokens: single-turn ones,
    a multi-turn one (two labelled spans), one that shares more than the common prefix with
    another, one truncated inside its answer, one whose labels start inside the prefix, and one
    that is nothing but the prefix and one more token."""
    rng = random.Random(seed)
    prefix = [rng.randrange(3, 300) for _ in range(prefix_len)]
    lessons = [dict(e, input_ids=prefix + e["input_ids"], labels=[IGNORE_INDEX] * prefix_len + e["labels"])
               for e in random_lessons(4, seed=seed, low=5, high=40)]
    turns = [rng.randrange(3, 300) for _ in range(30)]
    lessons.append({"input_ids": prefix + turns,
                    "labels": [IGNORE_INDEX] * (prefix_len + 5) + turns[5:12] + [IGNORE_INDEX] * 8 + turns[20:]})
    twin = lessons[0]["input_ids"][: prefix_len + 3] + [rng.randrange(3, 300) for _ in range(9)]
    lessons.append({"input_ids": twin, "labels": [IGNORE_INDEX] * (prefix_len + 3) + twin[prefix_len + 3:]})
    multi = lessons[4]  # truncated in its first answer, as load_examples truncates at max_seq_len
    lessons.append({"input_ids": multi["input_ids"][: prefix_len + 9], "labels": multi["labels"][: prefix_len + 9]})
    lessons.append({"input_ids": list(prefix), "labels": [IGNORE_INDEX] * 3 + prefix[3:]})
    lessons.append({"input_ids": prefix + [7], "labels": [IGNORE_INDEX] * prefix_len + [7]})
    return lessons


def test_common_prefix_and_shared_prefix_packing_count_the_prefix_once():
    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 3], [1, 2, 9, 9]]) == 2
    assert common_prefix_length([[5, 1], [6, 1]]) == 0
    assert common_prefix_length([]) == 0
    lengths = [100 + (i * 7) % 30 for i in range(40)]
    groups = pack_shared_prefix(lengths, 90, 256)
    assert sorted(i for g in groups for i in g) == list(range(40))
    assert all(90 + sum(lengths[i] - 90 for i in g) <= 256 for g in groups)
    assert len(groups) < len(pack(lengths, 256)) / 3  # ~10 own tokens a lesson instead of ~115


def test_collate_shared_prefix_lays_out_the_row():
    prefix = [1, 2, 3]
    examples = [{"input_ids": prefix + [10, 11], "labels": [IGNORE_INDEX] * 3 + [10, 11]},
                {"input_ids": prefix + [20], "labels": [IGNORE_INDEX, 2, IGNORE_INDEX, 20]}]
    batch = collate_shared_prefix(examples, pad_to_multiple=4)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 10, 11, 20, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 0, 1]]
    # 10 is predicted from the prefix's last position (2), 11 from 10's; 2 from 1's, 20 from 2 again
    assert batch["predict_at"].tolist() == [2, 3, 0, 2]
    assert batch["targets"].tolist() == [10, 11, 2, 20]
    assert batch["cu_seq_lens"].tolist() == [0, 3, 5, 6, 8]
    assert int(batch["prefix_len"]) == 3 and int(batch["lesson_tokens"]) == 9
    assert labelled_token_count(batch) == 4
    assert segment_ids(batch["cu_seq_lens"], 8).tolist() == [0, 0, 0, 1, 1, 2, 3, 3]


def test_prefix_block_mask_lets_each_lesson_see_the_prefix_and_itself_only():
    """The FlexAttention mask of the GPU path, checked against the rule on the CPU."""
    cu = torch.tensor([0, 3, 5, 6, 8], dtype=torch.int32)
    block_mask = prefix_block_mask(cu, 3, 8, torch.device("cpu"))
    segments = segment_ids(cu, 8)
    q, kv = torch.arange(8)[:, None], torch.arange(8)[None, :]
    expected = (kv <= q) & ((segments[q] == segments[kv]) | (kv < 3))
    got = torch.stack([torch.stack([block_mask.mask_mod(0, 0, torch.tensor(i), torch.tensor(j)) for j in range(8)])
                       for i in range(8)])
    assert torch.equal(got, expected)


def _hf_reference(model, lessons):
    """Per-lesson summed loss from Hugging Face's own model(input_ids, labels=...) on each lesson alone,
    and the adapter gradients of the sum divided by all labelled tokens."""
    model.zero_grad(set_to_none=True)
    counts = [sum(1 for t in e["labels"][1:] if t != IGNORE_INDEX) for e in lessons]
    losses = []
    for lesson, count in zip(lessons, counts):
        out = model(input_ids=torch.tensor([lesson["input_ids"]]), labels=torch.tensor([lesson["labels"]]),
                    use_cache=False)
        summed = out.loss * count
        (summed / sum(counts)).backward()
        losses.append(float(summed.detach()))
    return losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _per_lesson_losses(model, batch, lessons):
    """The shared-prefix row's loss split back into its lessons (targets are in lesson order)."""
    from lacd.pipeline.loss import decoder_and_head, _shared_prefix_kwargs

    counts = [sum(1 for t in e["labels"][1:] if t != IGNORE_INDEX) for e in lessons]
    decoder, _ = decoder_and_head(model)
    with torch.no_grad():
        hidden = decoder(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                         **_shared_prefix_kwargs(batch, torch.device("cpu"))).last_hidden_state[0]
        losses, start = [], 0
        for count in counts:
            index = batch["predict_at"][start : start + count]
            losses.append(float(chunked_loss_sum(model, hidden[index], batch["targets"][start : start + count])))
            start += count
    return losses


@pytest.mark.parametrize("shared", [True, False])
def test_shared_prefix_row_equals_each_lesson_trained_alone(tiny_dir, shared):
    """Issue 14's proof on the tiny model in fp32: a packed row (shared prefix, or none) gives each
    lesson the loss Hugging Face gives it alone (1e-6) and the adapters the gradient of separate
    training (1e-5 max abs); lessons of different lengths, multi-turn, truncated, prefix-only."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    lessons = prefixed_lessons() if shared else random_lessons(6, seed=11)
    model = tiny_lora_model(tiny_dir)
    reference_losses, reference_grads = _hf_reference(model, lessons)
    use_shared_prefix_attention(model)
    batch = collate_shared_prefix(lessons)
    assert (int(batch["prefix_len"]) == 24) if shared else (int(batch["prefix_len"]) == 0)
    model.zero_grad(set_to_none=True)
    summed = loss_sum(model, batch)
    (summed / labelled_token_count(batch)).backward()
    for got, expected in zip(_per_lesson_losses(model, batch, lessons), reference_losses):
        assert abs(got - expected) <= 1e-6 * max(1.0, abs(expected)), (got, expected)
    assert float(summed) == pytest.approx(sum(reference_losses), rel=1e-6)
    for name, expected in reference_grads.items():
        got = dict(model.named_parameters())[name].grad
        assert expected.abs().max() > 0, name
        assert float((got - expected).abs().max()) <= 1e-5, name


def test_chunked_loss_equals_one_cross_entropy_and_its_gradient(tiny_dir, monkeypatch):
    """The loss computed in chunks (recomputed in backward) is the whole-tensor loss."""
    from lacd.pipeline import loss as loss_mod

    model = tiny_lora_model(tiny_dir)
    hidden = torch.randn(37, model.config.hidden_size, requires_grad=True)
    targets = torch.randint(0, model.config.vocab_size, (37,))
    whole = torch.nn.functional.cross_entropy(model.get_output_embeddings()(hidden), targets, reduction="sum")
    (expected,) = torch.autograd.grad(whole, hidden)
    monkeypatch.setattr(loss_mod, "LOSS_CHUNK_ELEMENTS", 5 * model.config.vocab_size)  # 8 chunks
    chunked = chunked_loss_sum(model, hidden, targets)
    (got,) = torch.autograd.grad(chunked, hidden)
    assert float(chunked) == pytest.approx(float(whole), rel=1e-6)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_flex_attention_path_computes_what_the_cpu_path_does(tiny_dir):
    """The GPU path (FlexAttention with the row's block mask; eager and forward-only on the CPU,
    where FlexAttention has no backward) gives the hidden states of the CPU path (cascade attention)."""
    from lacd.pipeline.loss import decoder_and_head

    torch.set_num_threads(1)
    model = tiny_lora_model(tiny_dir)
    use_shared_prefix_attention(model)
    batch = collate_shared_prefix(prefixed_lessons(), pad_to_multiple=128)
    decoder, _ = decoder_and_head(model)
    common = dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    block_mask = prefix_block_mask(batch["cu_seq_lens"], int(batch["prefix_len"]), batch["input_ids"].shape[1],
                                   torch.device("cpu"))
    with torch.no_grad():
        flex = decoder(**common, prefix_block_mask=block_mask).last_hidden_state
        cascade = decoder(**common, shared_prefix_len=int(batch["prefix_len"]),
                          shared_prefix_cu=batch["cu_seq_lens"]).last_hidden_state
    torch.testing.assert_close(flex, cascade, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("prefix, own", [(24, [7, 1, 19, 3]), (0, [5, 1, 12]), (24, []), (9, [30])])
def test_cascade_attention_equals_attention_of_each_lesson(prefix, own):
    """The CPU's cascade attention (three flash calls merged by log-sum-exp) gives the outputs and the
    query/key/value gradients of the per-lesson path (each lesson against [prefix | itself]), with
    grouped-query heads, one-token lessons, a prefix-only row and a row without a prefix."""
    from lacd.pipeline.cascade import cascade_attention
    from lacd.pipeline.packing import _prefix_segments

    torch.manual_seed(0)
    torch.set_num_threads(1)
    bounds = [0] + ([prefix] if prefix else [])
    for n in own:
        bounds.append(bounds[-1] + n)
    total = bounds[-1]
    query, key, value = (torch.randn(1, heads, total, 8, dtype=torch.float64, requires_grad=True)
                         for heads in (4, 2, 2))
    weight = torch.randn(1, 4, total, 8, dtype=torch.float64)
    results = []
    for attend in ("per lesson", "cascade"):
        if attend == "cascade":
            out = cascade_attention(query, key, value, bounds, prefix, 0.3)
        else:
            flat = [t[0].transpose(0, 1) for t in (query, key, value)]
            out = _prefix_segments(*flat, torch.tensor(bounds), prefix, 0.3).transpose(0, 1).unsqueeze(0)
        results.append([out.detach(), *torch.autograd.grad((out * weight).sum(), (query, key, value))])
    for expected, got in zip(*results):
        torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)


def test_cascade_attention_in_bf16_keeps_the_dtype_and_fp32_results_to_bf16_rounding():
    """The CPU trains in bf16 where the CPU has it: the output and the gradients stay bf16 (the
    log-sum-exp merge computes in fp32) and match the fp32 path to bf16's rounding."""
    from lacd.pipeline.cascade import cascade_attention

    torch.manual_seed(0)
    torch.set_num_threads(1)
    bounds = [0, 24, 31, 32, 51]
    inputs = [torch.randn(1, heads, 51, 8) for heads in (4, 2, 2)]
    weight = torch.randn(1, 4, 51, 8)
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        query, key, value = (t.to(dtype).requires_grad_() for t in inputs)
        out = cascade_attention(query, key, value, bounds, 24, 0.3)
        grads = torch.autograd.grad((out * weight.to(dtype)).sum(), (query, key, value))
        assert {t.dtype for t in (out, *grads)} == {dtype}
        results.append([t.float() for t in (out, *grads)])
    for expected, got in zip(*results):
        torch.testing.assert_close(got, expected, atol=0.05, rtol=0.02)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_rms_norm_and_checkpoints_that_keep_attention_change_no_gradient(tiny_dir, dtype):
    """The CPU's RMSNorm function (lora_kernels.fuse_rms_norms) and checkpointing that keeps the
    flash-attention outputs (lora_kernels.checkpoint_kwargs) give, on a shared-prefix row with LoRA
    dropout, the loss and adapter gradients of transformers' RMSNorm without checkpointing (fp32:
    1e-6; bf16: to bf16 rounding), and backward's recompute of the checkpointed layers runs no
    attention: plain checkpointing runs every flash call twice."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from lacd.pipeline.lora_kernels import checkpoint_kwargs, fuse_lora_dropout, fuse_rms_norms

    class CountFlash(TorchDispatchMode):  # entered first, so it sees only the calls that really run
        calls = norms = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default:
                self.calls += 1
            if func is torch.ops.aten.linalg_vector_norm.default:  # _RMSNorm's, not transformers'
                self.norms += 1
            return func(*args, **(kwargs or {}))

    torch.set_num_threads(1)
    batch = collate_shared_prefix(prefixed_lessons())
    runs = {}
    for mode in ("plain", "checkpointed", "ours"):
        model = tiny_lora_model(tiny_dir, dtype=dtype, lora_dropout=0.1)
        fuse_lora_dropout(model)
        use_shared_prefix_attention(model)
        if mode == "ours":
            assert fuse_rms_norms(model) == 2 * model.config.num_hidden_layers + 1
        if mode != "plain":
            kwargs = checkpoint_kwargs(torch.device("cpu")) if mode == "ours" else {"use_reentrant": False}
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.train()  # the kernels package transformers runs here once restored every norm's forward
        model.eval()
        model.train()
        torch.manual_seed(0)
        with CountFlash() as counter:
            summed = loss_sum(model, batch)
            summed.backward()
        grads = {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}
        runs[mode] = float(summed.detach()), grads, counter.calls, counter.norms
    loss, grads, flash, _ = runs["plain"]
    assert runs["checkpointed"][2] == 2 * flash > 0 and runs["ours"][2] == flash
    assert runs["plain"][3] == 0 and runs["ours"][3] >= 2 * model.config.num_hidden_layers + 1
    tolerance = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for mode in ("checkpointed", "ours"):
        assert runs[mode][0] == pytest.approx(loss, rel=1e-6 if dtype == torch.float32 else 1e-2)
        for name, grad in grads.items():
            assert grad.abs().max() > 0, name
            torch.testing.assert_close(runs[mode][1][name], grad, **tolerance, msg=f"{mode} {name}")
