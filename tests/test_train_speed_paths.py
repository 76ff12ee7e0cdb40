"""The GPU speed paths of the train stage, checked on the CPU: varlen attention over packed lessons,
bf16 adapters under autocast, LoRA dropout that keeps a mask instead of a copy, shuffled packing,
the automatic choices and their log."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import structlog
import torch
from datasets import Dataset, DatasetDict
from transformers import AutoModelForCausalLM

from lacd.pipeline import packing
from lacd.pipeline.packing import VARLEN_ATTENTION, collate_packed, collate_padded, pack
from lacd.pipeline.lora_kernels import (
    _InputDropoutLinear,
    cpu_keep_mask,
    apply_fused_kernels,
    checkpoint_first_layers,
    fuse_lora_dropout,
    fuse_lora_sum,
)
from lacd.pipeline.loss import loss_sum
from lacd.pipeline.plan import (
    COMPILE_MIN_TOKENS,
    CPU_ACTIVATION_MAX,
    CPU_ACTIVATION_MIN,
    activation_bytes_per_token,
    choose_adapter_compute,
    choose_attention,
    choose_device,
    choose_plan,
    compute_context,
    cpu_dtype,
    cpu_has_native_bf16,
    checkpointed_layer_bytes_per_token,
    cpu_activation_budget,
    cpu_layers_to_checkpoint,
    needs_checkpointing,
    plan_steps,
    scaled_activation_bytes,
    should_compile,
)
from lacd.pipeline.train import TrainError, TrainSpec, run_training
from tiny import make_tiny_llama, random_lessons, tiny_lora_model


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


def test_collate_packed_gives_lesson_boundaries():
    batch = collate_packed([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]},
                            {"input_ids": [], "labels": []},
                            {"input_ids": [4, 5], "labels": [4, 5]}])
    assert batch["cu_seq_lens"].tolist() == [0, 3, 5]
    assert batch["cu_seq_lens"].dtype == torch.int32
    assert int(batch["max_length"]) == 3


def test_varlen_attention_keeps_lessons_apart_and_matches_sdpa(tiny_dir):
    """The registered varlen implementation (its CPU reference path) gives sdpa's block-mask logits,
    with the boundaries passed as kwargs or found from position_ids; a padded batch still works."""
    choose_attention(VARLEN_ATTENTION, torch.device("cpu"))
    varlen = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation=VARLEN_ATTENTION).eval()
    sdpa = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="sdpa").eval()
    rows = random_lessons(5, seed=1)
    batch = collate_packed(rows)
    with torch.no_grad():
        assert float(loss_sum(varlen, batch)) == pytest.approx(float(loss_sum(sdpa, batch)), rel=1e-5)
        found = varlen(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        start = 0
        for row in rows:  # each lesson alone gives the same logits as inside the packed row
            alone = sdpa(input_ids=torch.tensor([row["input_ids"]]), use_cache=False).logits[0]
            torch.testing.assert_close(found[start : start + len(alone)], alone, atol=1e-5, rtol=1e-4)
            start += len(alone)
        padded = collate_padded(rows[:3])
        assert float(loss_sum(varlen, padded)) == pytest.approx(float(loss_sum(sdpa, padded)), rel=1e-5)


def test_varlen_attention_receives_the_collated_boundaries(tiny_dir, monkeypatch):
    choose_attention(VARLEN_ATTENTION, torch.device("cpu"))
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation=VARLEN_ATTENTION).eval()
    seen = []
    original = packing._causal_segments
    monkeypatch.setattr(packing, "_causal_segments", lambda q, k, v, cu, s: seen.append(cu.tolist())
                        or original(q, k, v, cu, s))
    batch = collate_packed(random_lessons(3, seed=2))
    with torch.no_grad():
        loss_sum(model, batch)
    assert seen and all(cu == batch["cu_seq_lens"].tolist() for cu in seen)


def test_bf16_adapters_under_autocast_match_the_fp32_upcast(tiny_dir):
    """lacd's bf16 adapters (peft's upcast off, autocast on) compute the loss and LoRA gradients that
    peft's fp32 upcast computes, within bf16 rounding."""
    from lacd.pipeline.lora_kernels import disable_adapter_upcast

    model = tiny_lora_model(tiny_dir, dtype=torch.bfloat16)
    assert all(p.dtype == torch.float32 for _, p in model.named_parameters() if p.requires_grad)
    batch = collate_packed(random_lessons(4, seed=3))

    def loss_and_grads(dtype):
        model.zero_grad(set_to_none=True)
        with compute_context(torch.device("cpu"), dtype):
            loss = loss_sum(model, batch)
        loss.backward()
        return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    reference, reference_grads = loss_and_grads(None)
    disable_adapter_upcast(model)
    fast, fast_grads = loss_and_grads(torch.bfloat16)
    assert fast == pytest.approx(reference, rel=2e-2)
    for name, grad in reference_grads.items():
        assert fast_grads[name].dtype == torch.float32  # fp32 master weights keep fp32 gradients
        relative = (fast_grads[name] - grad).norm() / grad.norm()
        assert relative < 0.1, (name, float(relative))


def test_automatic_choices_on_cpu():
    cpu = torch.device("cpu")
    assert choose_attention("auto", cpu) == "sdpa"
    assert choose_adapter_compute("auto", torch.float32) is None
    assert choose_adapter_compute("auto", torch.bfloat16) == torch.bfloat16
    assert choose_adapter_compute("float32", torch.bfloat16) is None
    with pytest.raises(TrainError):
        choose_adapter_compute("fp8", torch.bfloat16)
    # on the CPU only when the micro-batch's activations pass the run's budget: SmolLM2-135M at 4096
    # tokens (~0.86 MB a token in bf16, 3.5 GB) does at the smallest (1 GiB), not at the largest
    # (4 GiB); the tiny test models never do
    assert needs_checkpointing("auto", cpu, 4096, 864_000, 49152, cpu_budget=CPU_ACTIVATION_MIN) is True
    assert needs_checkpointing("auto", cpu, 4096, 864_000, 49152, cpu_budget=CPU_ACTIVATION_MAX) is False
    assert needs_checkpointing("auto", cpu, 4096, 10_000, 32000, cpu_budget=CPU_ACTIVATION_MIN) is False
    assert needs_checkpointing(True, cpu, 1, 1, 1, cpu_budget=0) is True
    assert needs_checkpointing("off", cpu, 1, 1, 1, cpu_budget=0) is False
    with pytest.raises(TrainError):
        needs_checkpointing("sometimes", cpu, 1, 1, 1, cpu_budget=0)
    cuda = torch.device("cuda")  # only compared, never used
    assert should_compile("auto", cpu, 10 * COMPILE_MIN_TOKENS) is False
    assert should_compile("auto", cuda, COMPILE_MIN_TOKENS) is True
    assert should_compile("auto", cuda, COMPILE_MIN_TOKENS - 1) is False
    assert should_compile("on", cpu, 1) is True and should_compile("off", cuda, 10**9) is False
    with pytest.raises(TrainError):
        should_compile("max", cpu, 1)
    model = torch.nn.Linear(2, 2)
    assert apply_fused_kernels(model, "auto", cpu, compiling=False) == "off"
    assert apply_fused_kernels(model, "auto", cuda, compiling=True) == "off"
    with pytest.raises(TrainError):
        apply_fused_kernels(model, "triton", cpu, compiling=False)


def test_cpu_checkpoints_only_the_layers_over_the_activation_budget(tiny_dir, monkeypatch):
    """On the CPU only as many layers are checkpointed as the 1 GiB budget needs (SmolLM2-135M's 30
    layers at ~0.86 MB a token in bf16); the others are not recomputed in backward, and the
    gradients are those of checkpointing every layer or none."""
    fp32 = scaled_activation_bytes(864_000, torch.float32)  # SmolLM2's bf16 estimate, computed in fp32
    assert fp32 == 2 * scaled_activation_bytes(864_000, torch.bfloat16) == 1_728_000
    gib = CPU_ACTIVATION_MIN
    assert cpu_layers_to_checkpoint(600, fp32, 30, gib) == 0  # ~1.0 GB in fp32: all layers fit
    assert cpu_layers_to_checkpoint(1150, fp32, 30, gib) == 14  # a same-steps row: 16 layers keep theirs
    assert cpu_layers_to_checkpoint(4096, fp32, 30, gib) == 26
    assert cpu_layers_to_checkpoint(4096, fp32, 30, 4 * gib) == 12  # a larger budget keeps more layers
    assert cpu_layers_to_checkpoint(10**7, fp32, 30, gib) == 30
    # what a checkpointed layer still keeps (its input, the saved attention outputs) comes out of the budget
    kept = checkpointed_layer_bytes_per_token(SimpleNamespace(hidden_size=576, num_attention_heads=9), torch.float32)
    assert kept == 3 * 576 * 4 + 8 * 9
    assert cpu_layers_to_checkpoint(4096, fp32, 30, 4 * gib, kept) == 14
    assert cpu_layers_to_checkpoint(4096, fp32, 30, gib, fp32) == 30  # nothing to gain: all checkpointed
    # the budget: an eighth of the memory available, between 1 and 4 GiB
    assert [cpu_activation_budget(n * gib) for n in (2, 10, 21, 64)] == [gib, gib * 5 // 4, gib * 21 // 8, 4 * gib]
    assert CPU_ACTIVATION_MIN <= cpu_activation_budget() <= CPU_ACTIVATION_MAX
    batch = collate_packed(random_lessons(3, seed=5))
    grads, recomputed = [], []
    for count in (None, 1, 2):  # no checkpointing, the first layer only, both layers
        model = tiny_lora_model(tiny_dir)
        layers = model.get_base_model().model.layers
        calls = [0] * len(layers)
        for index, layer in enumerate(layers):
            layer.self_attn.register_forward_hook(lambda *a, i=index: calls.__setitem__(i, calls[i] + 1))
        if count is not None:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            assert checkpoint_first_layers(model, count) == count
        model.train()
        torch.manual_seed(0)
        loss_sum(model, batch).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        recomputed.append(calls)
    assert recomputed == [[1, 1], [2, 1], [2, 2]]
    for other in grads[1:]:
        for name, grad in grads[0].items():
            torch.testing.assert_close(other[name], grad, atol=0, rtol=0)


def test_cpu_trains_in_bf16_only_where_asked_or_native_and_float32_only_on_the_cpu(tiny_dir):
    assert (cpu_dtype("bf16"), cpu_dtype("float32"), cpu_dtype("nf4")) == (
        torch.bfloat16, torch.float32, torch.float32)
    assert cpu_dtype("auto") == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
    assert choose_device("cpu", "float32") == (torch.device("cpu"), torch.float32)
    spec = TrainSpec(base_dir=tiny_dir, dataset_dir=tiny_dir, out_dir=tiny_dir, checkpoint_dir=tiny_dir,
                     progress_path=tiny_dir / "p.json", base_precision="float32")
    config = AutoModelForCausalLM.from_pretrained(tiny_dir).config
    assert choose_plan(spec, torch.device("cpu"), config, 100) is None
    with pytest.raises(TrainError, match="float32 trains on the CPU only"):
        choose_plan(spec, torch.device("cuda"), config, 100)


def test_activation_estimate_grows_with_dropout_and_upcast():
    class Config:
        hidden_size, intermediate_size, num_hidden_layers = 4096, 11008, 32

    plain = activation_bytes_per_token(Config, 0.0, False)
    assert 4e6 < plain < 7e6  # measured about 5.6 MB per token for CodeLlama-7B (bench/train_gpu.py)
    assert plain < activation_bytes_per_token(Config, 0.05, False) < activation_bytes_per_token(Config, 0.05, True)
    # the CPU's RMSNorm function keeps each norm's bf16 input, not two fp32 copies: 4 h fewer bytes a layer
    fused = activation_bytes_per_token(Config, 0.05, False, fused_norms=True)
    assert activation_bytes_per_token(Config, 0.05, False) - fused == 32 * 4 * 4096


def test_shuffled_packing_mixes_lengths_and_stays_within_budget():
    lengths = [random.Random(i).choice([30, 60, 120, 250]) for i in range(300)]
    order = list(range(300))
    random.Random(5).shuffle(order)
    groups = pack(lengths, 512, order)
    assert sorted(i for g in groups for i in g) == list(range(300))
    assert all(sum(lengths[i] for i in g) <= 512 for g in groups)
    assert len(groups) <= -(-sum(lengths) // 512) + 3  # first fit in any order still packs tightly
    def mixing(grouping):  # micro-batches holding three or more different lengths
        return sum(1 for g in grouping if len({lengths[i] for i in g}) > 2)

    assert mixing(groups) > len(groups) / 2 > 10 * mixing(pack(lengths, 512))  # FFD sorts by length
    steps = plan_steps(lengths, 512, 1, 2, seed=0)
    assert steps[0].micro_batches != steps[len(steps) // 2].micro_batches  # each epoch packs anew


@pytest.mark.parametrize("attention", ["auto", VARLEN_ATTENTION])
def test_run_log_says_which_device_dtype_and_attention(tiny_dir, tmp_path, attention):
    """Everything left to 'auto' on a machine without CUDA: CPU, fp32, sdpa, all logged in
    train_setup and kept in the result; a named attention implementation is used as given."""
    if torch.cuda.is_available():
        pytest.skip("checks the automatic choice on a machine without CUDA")
    rows = random_lessons(12, seed=4)
    DatasetDict(train=Dataset.from_list(rows[:10]), heldout=Dataset.from_list(rows[10:])).save_to_disk(
        str(tmp_path / "dataset"))
    spec = TrainSpec(base_dir=tiny_dir, dataset_dir=tmp_path / "dataset", out_dir=tmp_path / "adapter",
                     checkpoint_dir=tmp_path / "ckpt", progress_path=tmp_path / "progress.json",
                     lora_r=4, lora_alpha=8, epochs=1, tokens_per_batch=128, checkpoint_every=100,
                     num_threads=1, learning_rate=1e-2)
    assert (spec.device, spec.attention, spec.adapter_compute, spec.compile) == ("auto",) * 4
    spec = dataclasses.replace(spec, attention=attention)
    with structlog.testing.capture_logs() as events:
        result = run_training(spec)
    chosen = "sdpa" if attention == "auto" else attention
    setup = next(e for e in events if e["event"] == "train_setup")
    dtype = "bfloat16" if cpu_has_native_bf16() else "float32"  # plan.cpu_dtype's 'auto'
    assert (setup["device"], setup["dtype"], setup["attention"]) == ("cpu", dtype, chosen)
    assert (setup["adapter_compute"], setup["gradient_checkpointing"], setup["compiled"], setup["fused_kernels"]) == (
        dtype, False, False, "off")
    assert (result.device, result.dtype, result.attention) == ("cpu", dtype, chosen) and result.steps > 0
    assert result.heldout_loss_after != result.heldout_loss_before  # the adapters were trained


def test_rows_checkpoint_only_their_layers_over_budget_and_train_the_same_adapter(tiny_dir, tmp_path, monkeypatch):
    """With a budget that the tiny model's rows pass, each row checkpoints only the layers it must
    (the largest row's count logged): the adapter is the one trained without checkpointing. The CPU
    path's budget, so on the CPU also where CUDA is present."""
    from safetensors.torch import load_file

    from lacd.pipeline import plan

    rows = random_lessons(12, seed=4)
    DatasetDict(train=Dataset.from_list(rows[:10]), heldout=Dataset.from_list(rows[10:])).save_to_disk(
        str(tmp_path / "dataset"))
    adapters, logged = [], []
    for mode in ("off", "auto"):
        spec = TrainSpec(base_dir=tiny_dir, dataset_dir=tmp_path / "dataset", out_dir=tmp_path / mode / "adapter",
                         checkpoint_dir=tmp_path / mode / "ckpt", progress_path=tmp_path / mode / "progress.json",
                         lora_r=4, lora_alpha=8, epochs=1, tokens_per_batch=128, checkpoint_every=100,
                         num_threads=1, learning_rate=1e-2, gradient_checkpointing=mode, device="cpu")
        dtype = cpu_dtype("auto")  # bf16 on a CPU with native bf16: adapters computed under autocast, no upcast
        config = AutoModelForCausalLM.from_pretrained(tiny_dir).config
        per_row = scaled_activation_bytes(  # the CPU recipe's estimate: its RMSNorm function keeps bf16 inputs
            activation_bytes_per_token(config, 0.05, dtype == torch.float32, fused_norms=True), dtype)
        checkpointed = checkpointed_layer_bytes_per_token(config, dtype)
        # one of the 2 layers of a 128-token row keeps its activations, the other what a checkpointed layer keeps
        monkeypatch.setattr(plan, "cpu_activation_budget", lambda: 65 * per_row + 128 * checkpointed)
        with structlog.testing.capture_logs() as events:
            run_training(spec)
        setup = next(e for e in events if e["event"] == "train_setup")
        logged.append((setup["gradient_checkpointing"], setup["checkpointed_layers"]))
        adapters.append(load_file(str(spec.out_dir / "adapter_model.safetensors")))
    assert logged == [(False, None), (True, 1)]
    for name, weight in adapters[0].items():
        assert torch.equal(adapters[1][name], weight), name


# --------------------------------------------------------------------------- LoRA dropout


def test_input_dropout_linear_computes_what_an_explicit_mask_does():
    """Same output and gradients as linear(x * mask / (1 - p)) with the mask dropout drew."""
    x = torch.randn(1, 9, 16, requires_grad=True)
    weight = torch.randn(4, 16, requires_grad=True)
    torch.manual_seed(3)
    out = _InputDropoutLinear.apply(x, weight, 0.3)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    grads = x.grad.clone(), weight.grad.clone()
    x.grad = weight.grad = None
    torch.manual_seed(3)
    mask = cpu_keep_mask(x, 0.3)  # the same draw
    assert 0 < int(mask.sum()) < mask.numel()
    reference = torch.nn.functional.linear(x * mask / 0.7, weight)
    reference.backward(upstream)
    torch.testing.assert_close(out, reference)
    torch.testing.assert_close(grads[0], x.grad)
    torch.testing.assert_close(grads[1], weight.grad)


def _loss_and_grads(model: torch.nn.Module, batch: dict, seed: int) -> tuple[float, dict[str, torch.Tensor]]:
    """One forward and backward from a fixed RNG state (the same dropout masks): loss, LoRA grads."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = loss_sum(model, batch)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_lora_sum_by_addmm_changes_no_loss_or_gradient(tiny_dir):
    """fuse_lora_sum (the adapter's product added by one addmm) on top of the fused dropout: the
    same loss and LoRA gradients as peft's forward, fp32 with dropout (the same masks drawn), and
    in bf16 under autocast within bf16 rounding; peft's own forward with the adapter disabled."""
    batch = collate_packed(random_lessons(5, seed=7))
    reference = tiny_lora_model(tiny_dir, lora_dropout=0.1).train()
    fuse_lora_dropout(reference)
    model = tiny_lora_model(tiny_dir, lora_dropout=0.1).train()
    fuse_lora_dropout(model)
    assert fuse_lora_sum(model) == 7 * model.config.num_hidden_layers
    assert fuse_lora_sum(model) == 0  # already fused
    assert list(model.state_dict()) == list(reference.state_dict())
    want_loss, want = _loss_and_grads(reference, batch, seed=11)
    got_loss, got = _loss_and_grads(model, batch, seed=11)
    assert got_loss == pytest.approx(want_loss, rel=1e-6)
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want_loss, want = _loss_and_grads(reference, batch, seed=11)
        got_loss, got = _loss_and_grads(model, batch, seed=11)
    assert got_loss == pytest.approx(want_loss, rel=2e-2)
    for name, grad in want.items():
        scale = float(grad.abs().max())
        assert float((got[name] - grad).abs().max()) <= 0.05 * scale, name
    with torch.no_grad(), model.disable_adapter(), reference.disable_adapter():
        model.eval()
        reference.eval()
        assert float(loss_sum(model, batch)) == float(loss_sum(reference, batch))


def test_cpu_keep_mask_drops_each_element_with_probability_p():
    """Each of the four 16-bit lanes cut from a 64-bit draw drops at rate p (binomial bounds, 6
    sigma), the mask has x's shape, and the same generator state draws the same mask."""
    x = torch.empty(200_003)
    torch.manual_seed(0)
    mask = cpu_keep_mask(x, 0.05)
    assert mask.shape == x.shape and mask.dtype == torch.bool
    for lane in range(4):
        dropped = (~mask[lane::4]).double().mean().item()
        n = mask[lane::4].numel()
        assert abs(dropped - 0.05) < 6 * (0.05 * 0.95 / n) ** 0.5, (lane, dropped)
    torch.manual_seed(0)
    assert torch.equal(cpu_keep_mask(x, 0.05), mask)
    assert not cpu_keep_mask(x, 0.0).logical_not().any()


def saved_bytes(model: torch.nn.Module, batch: dict) -> int:
    """Bytes of the distinct storages autograd keeps for backward of one forward pass (the
    model's parameters, which exist anyway, not counted)."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        loss_sum(model, batch)
    return sum(storages.values())


def test_fused_lora_dropout_keeps_a_one_byte_mask_instead_of_a_copy(tiny_dir):
    """peft's dropout keeps a dropped copy of every adapter input (and, on the CPU, a float
    mask); fuse_lora_dropout keeps exactly one byte per adapter input element and nothing else."""
    batch = collate_packed(random_lessons(6, seed=5))
    tokens = batch["input_ids"].numel()
    plain = saved_bytes(tiny_lora_model(tiny_dir, lora_dropout=0.0).train(), batch)
    peft_dropout = saved_bytes(tiny_lora_model(tiny_dir, lora_dropout=0.1).train(), batch)
    model = tiny_lora_model(tiny_dir, lora_dropout=0.1).train()
    assert fuse_lora_dropout(model) == 7 * model.config.num_hidden_layers
    fused = saved_bytes(model, batch)
    h, i = model.config.hidden_size, model.config.intermediate_size
    masks = tokens * model.config.num_hidden_layers * (6 * h + i)  # q, k, v, o, gate, up: h wide; down: i
    assert fused - plain == masks
    assert peft_dropout - plain >= 3 * masks


def test_fused_lora_dropout_changes_no_names_and_only_training(tiny_dir):
    """Same state-dict names (the adapter saves as before); eval is the plain adapter, training
    drops inputs, and a resumed RNG draws the same masks."""
    reference = tiny_lora_model(tiny_dir, lora_dropout=0.1)
    model = tiny_lora_model(tiny_dir, lora_dropout=0.1)
    fuse_lora_dropout(model)
    assert list(model.state_dict()) == list(reference.state_dict())
    assert fuse_lora_dropout(model) == 0  # already fused
    batch = collate_packed(random_lessons(4, seed=6))
    with torch.no_grad():
        model.eval()
        reference.eval()
        assert float(loss_sum(model, batch)) == pytest.approx(float(loss_sum(reference, batch)), rel=1e-6)
        model.train()
        state = torch.get_rng_state()
        dropped = float(loss_sum(model, batch))
        torch.set_rng_state(state)
        assert float(loss_sum(model, batch)) == dropped
        assert dropped != pytest.approx(float(loss_sum(reference, batch)), rel=1e-6)
