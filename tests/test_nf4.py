"""4-bit (NF4) base training on the CPU, and the GPU memory planner against given memory figures."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from lacd.pipeline import nf4
from lacd.pipeline.loss import evaluate
from lacd.pipeline.memplan import GIB, PlanError, Shape, expected_peak, margin, plan
from lacd.pipeline.train import TrainError, load_examples, run_training
from test_train import dataset_dir, lesson_rows, make_spec, tiny_dir  # noqa: F401  (fixtures)
from tiny import LINEAR_MODULES, make_tiny_llama

pytest.importorskip("torchao")

CODELLAMA_7B = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                           num_attention_heads=32, vocab_size=32016)
CODELLAMA_34B = LlamaConfig(hidden_size=8192, intermediate_size=22016, num_hidden_layers=48,
                            num_attention_heads=64, num_key_value_heads=8, vocab_size=32000)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


# --------------------------------------------------------------------------- storage


def test_dequantize_matches_torchao_and_stays_near_the_weights():
    torch.manual_seed(0)
    weight = torch.randn(96, 256)
    quantized = nf4.to_nf4(weight)
    ours = nf4.dequantize(quantized, torch.float32)
    assert torch.equal(ours, quantized.get_original_weight())
    relative = (ours - weight).abs().mean() / weight.abs().mean()
    assert 0.02 < relative < 0.15  # 4 bits: an error, and a small one
    assert quantized.quantized_data.numel() == weight.numel() // 2  # two codes a byte


def test_chunked_quantization_gives_torchaos_values():
    torch.manual_seed(1)
    weight = torch.randn(128, 512)
    whole = nf4.to_nf4(weight)
    chunked = nf4.to_nf4(weight, chunk=64 * 100)  # not a whole number of scaler blocks
    for name in ("quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean"):
        assert torch.equal(getattr(chunked, name), getattr(whole, name)), name
    assert torch.equal(nf4.dequantize(chunked, torch.float32), whole.get_original_weight())


def test_chunked_matmul_gives_the_same_outputs_and_gradients(monkeypatch):
    torch.manual_seed(0)
    quantized = nf4.to_nf4(torch.randn(96, 128))
    layer = nf4.NF4Linear(quantized, None)
    x = torch.randn(2, 5, 128, requires_grad=True)
    whole_out = layer(x)
    whole_out.square().sum().backward()
    whole_grad, x.grad = x.grad, None
    monkeypatch.setattr(nf4, "DEQUANTIZE_CHUNK", 128 * 40)  # 40 rows a chunk: 3 chunks, the last short
    assert len(nf4._row_chunks(quantized)) == 3
    chunked_out = layer(x)
    chunked_out.square().sum().backward()
    assert torch.allclose(chunked_out, whole_out, atol=1e-5) and torch.allclose(x.grad, whole_grad, atol=1e-4)


def test_nf4_linear_gradients_match_the_dequantized_linear():
    torch.manual_seed(0)
    quantized = nf4.to_nf4(torch.randn(64, 128))
    layer = nf4.NF4Linear(quantized, None)
    x = torch.randn(5, 128, requires_grad=True)
    layer(x).square().sum().backward()
    reference = x.detach().clone().requires_grad_()
    torch.nn.functional.linear(reference, nf4.dequantize(quantized, torch.float32)).square().sum().backward()
    assert torch.allclose(x.grad, reference.grad, atol=1e-5)
    assert not layer.weight.requires_grad


# --------------------------------------------------------------------------- which storage (no CUDA needed)


@pytest.fixture
def bitsandbytes_importable(monkeypatch):
    """Set whether bitsandbytes imports; the cached CUDA choice is cleared before and after."""
    def make(importable: bool) -> None:
        monkeypatch.setattr(nf4, "_import_bitsandbytes", lambda: object() if importable else None)
        nf4._cuda_backend.cache_clear()
    yield make
    nf4._cuda_backend.cache_clear()


def test_cuda_uses_bitsandbytes_kernels_and_the_cpu_torchao(bitsandbytes_importable):
    bitsandbytes_importable(True)
    assert nf4.backend(torch.device("cuda")) == nf4.BITSANDBYTES
    assert nf4.backend(torch.device("cuda:1")) == nf4.BITSANDBYTES
    assert nf4.backend(torch.device("cpu")) == nf4.TORCHAO  # the CPU keeps the pure-PyTorch path
    layer = nf4.quantized_linear(torch.randn(64, 128), None)  # a CPU weight
    assert type(layer) is nf4.NF4Linear and nf4.is_nf4(layer)


def test_cuda_without_bitsandbytes_falls_back_to_torchao_with_one_log_line(bitsandbytes_importable):
    from structlog.testing import capture_logs

    bitsandbytes_importable(False)
    with capture_logs() as logs:
        choices = {nf4.backend(torch.device("cuda")) for _ in range(3)}
    assert choices == {nf4.TORCHAO}
    lines = [entry for entry in logs if entry["event"] == "nf4_backend_fallback"]
    assert len(lines) == 1 and "pip install 'lacd[gpu]'" in lines[0]["reason"]


def test_a_broken_bitsandbytes_counts_as_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import raises ImportError
    assert nf4._import_bitsandbytes() is None


def test_bitsandbytes_layer_gradients_match_its_dequantized_linear():
    bnb = pytest.importorskip("bitsandbytes")  # the gpu extra; CPU CI runs the torchao path
    torch.manual_seed(0)
    weight = torch.randn(96, 128, dtype=torch.bfloat16)
    layer = nf4.BnbNF4Linear(weight, None)
    assert (layer.in_features, layer.out_features, layer.weight.numel()) == (128, 96, 96 * 128 // 2)
    dense = bnb.functional.dequantize_4bit(layer.weight, layer.quant_state)
    assert 0.02 < ((dense.float() - weight.float()).abs().mean() / weight.float().abs().mean()) < 0.15
    x = torch.randn(5, 128, dtype=torch.bfloat16, requires_grad=True)
    layer(x).float().square().sum().backward()
    reference = x.detach().clone().requires_grad_()
    torch.nn.functional.linear(reference, dense).float().square().sum().backward()
    assert torch.allclose(x.grad.float(), reference.grad.float(), rtol=2e-2, atol=1e-2)
    assert not layer.weight.requires_grad


@pytest.mark.parametrize("tied", [False, True])
def test_streamed_4bit_base_quantizes_every_projection_and_keeps_lm_head(tmp_path, tied):
    folder = make_tiny_llama(tmp_path / "model", tie_embeddings=tied)
    full = AutoModelForCausalLM.from_pretrained(folder).eval()
    model = nf4.load_nf4_base(folder, torch.device("cpu"), torch.float32, "sdpa")
    names = [name for name, module in model.named_modules() if nf4.is_nf4(module)]
    assert len(names) == full.config.num_hidden_layers * len(LINEAR_MODULES)
    assert not nf4.is_nf4(model.lm_head)
    assert torch.equal(model.model.embed_tokens.weight, full.model.embed_tokens.weight)
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        expected, got = full(ids).logits, model(ids).logits
    assert (got - expected).abs().mean() < 0.2 * expected.abs().mean()
    assert not torch.equal(got, expected)


def test_streamed_loading_rejects_a_folder_without_safetensors(tmp_path):
    folder = make_tiny_llama(tmp_path / "model")
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        nf4.load_nf4_base(folder, torch.device("cpu"), torch.float32, "sdpa")


# --------------------------------------------------------------------------- the train stage in 4 bits


def test_4bit_training_on_the_cpu_lowers_heldout_loss_and_merges_into_the_full_base(tiny_dir, dataset_dir, tmp_path):
    from peft import PeftModel

    spec = make_spec(tiny_dir, dataset_dir, tmp_path, base_precision="nf4", epochs=3)
    result = run_training(spec)
    assert result.base_precision == "nf4" and result.plan is None  # no GPU: no memory plan
    assert result.heldout_loss_after < result.heldout_loss_before - 0.5
    # export merges the adapter into the full-precision base: its loss stays near the trained model's
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), spec.out_dir).merge_and_unload()
    heldout, _ = load_examples(dataset_dir, "heldout", spec.max_seq_len)
    merged_loss = evaluate(merged, heldout, spec.tokens_per_batch, torch.device("cpu"))
    assert abs(merged_loss - result.heldout_loss_after) < 0.25 * result.heldout_loss_after
    assert merged_loss < result.heldout_loss_before - 0.5


def test_a_checkpoint_of_the_full_precision_base_is_not_resumed_on_the_4bit_one(tiny_dir, dataset_dir, tmp_path):
    from lacd.pipeline.checkpoint import data_fingerprint

    rows, _ = load_examples(dataset_dir, "train", 2048)
    full = make_spec(tiny_dir, dataset_dir, tmp_path)
    assert data_fingerprint(full, rows) != data_fingerprint(make_spec(tiny_dir, dataset_dir, tmp_path,
                                                                      base_precision="nf4"), rows)
    assert data_fingerprint(full, rows) == data_fingerprint(make_spec(tiny_dir, dataset_dir, tmp_path,
                                                                      base_precision="bf16"), rows)


def test_missing_torchao_fails_before_training_with_the_fix(tiny_dir, dataset_dir, tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "torchao" or m.startswith("torchao.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    monkeypatch.setitem(sys.modules, "torchao.dtypes", None)
    monkeypatch.setitem(sys.modules, "torchao.dtypes.nf4tensor", None)
    spec = make_spec(tiny_dir, dataset_dir, tmp_path, base_precision="nf4")
    with pytest.raises(TrainError, match=r"needs torchao: pip install 'lacd\[gpu\]'"):
        run_training(spec)
    assert not (tmp_path / "progress.jsonl").exists()  # not one step trained


def test_unknown_precision_is_refused(tiny_dir, dataset_dir, tmp_path):
    with pytest.raises(TrainError, match="base_precision 'int3'"):
        run_training(make_spec(tiny_dir, dataset_dir, tmp_path, base_precision="int3", device="cpu"))


# --------------------------------------------------------------------------- the planner


def test_nf4_weights_are_about_a_quarter_of_bf16():
    shape = Shape.of(CODELLAMA_7B)
    assert shape.linear_params() == 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    from lacd.pipeline.memplan import weight_bytes

    assert 3.4 * GIB < weight_bytes(shape, "nf4") < 3.8 * GIB
    assert 12.3 * GIB < weight_bytes(shape, "bf16") < 12.8 * GIB


@pytest.mark.parametrize("gib, precision, checkpointing", [
    (80, "bf16", False),   # an H100: the fastest plan
    (24, "bf16", True),    # bf16 fits only with checkpointing
    (12, "nf4", True),     # bf16 does not fit even with checkpointing: 4 bits
    (10, "nf4", True),     # a 10 GB card
])
def test_planner_picks_the_fastest_plan_that_fits(gib, precision, checkpointing):
    chosen = plan(Shape.of(CODELLAMA_7B), gib * GIB, tokens_per_batch=4096, longest=4096, logit_fraction=0.5)
    assert (chosen.precision, chosen.gradient_checkpointing) == (precision, checkpointing)
    assert chosen.tokens_per_batch == 4096 and chosen.grad_accum == 1
    assert chosen.expected_peak <= gib * GIB - max(GIB, 0.08 * gib * GIB)
    assert f"of {gib}.0 GiB" in chosen.describe()


def test_planner_halves_the_micro_batch_before_giving_up_precision():
    shape = Shape.of(CODELLAMA_7B)
    full = expected_peak(shape, "bf16", False, 8192, 16, 0.05)
    half = expected_peak(shape, "bf16", False, 4096, 16, 0.05)
    available = int((full + half) / 2 / 0.92)  # the half fits with the margin, the full one does not
    chosen = plan(shape, available, precision="bf16", checkpointing="off", tokens_per_batch=8192, longest=3000)
    assert (chosen.tokens_per_batch, chosen.grad_accum) == (4096, 2)
    with pytest.raises(PlanError):  # never below the longest lesson
        plan(shape, available, precision="bf16", checkpointing="off", tokens_per_batch=8192, longest=5000)


def test_4bit_without_checkpointing_when_it_fits_and_bf16_does_not():
    shape = Shape.of(CODELLAMA_7B)
    bf16_gc = expected_peak(shape, "bf16", True, 1024, 16, 0.05)
    nf4_plain = expected_peak(shape, "nf4", False, 1024, 16, 0.05)
    assert nf4_plain < bf16_gc  # at 1024 tokens the activations are smaller than the bf16 weights
    chosen = plan(shape, int(nf4_plain / 0.9), tokens_per_batch=1024, longest=1024)
    assert (chosen.precision, chosen.gradient_checkpointing) == ("nf4", False)


def test_4bit_without_checkpointing_comes_before_bf16_with_it():
    shape = Shape.of(CODELLAMA_7B)
    bf16_gc = expected_peak(shape, "bf16", True, 1024, 16, 0.05)
    bf16_plain = expected_peak(shape, "bf16", False, 1024, 16, 0.05)
    available = int(bf16_gc / 0.9)  # bf16 with checkpointing and nf4 without both fit, bf16 without does not
    assert bf16_plain > available - margin(available)
    chosen = plan(shape, available, tokens_per_batch=1024, longest=1024)
    assert (chosen.precision, chosen.gradient_checkpointing) == ("nf4", False)  # the bench: 10,534 vs 7,322 tok/s


def test_offloading_the_kept_layer_inputs_is_the_last_resort():
    shape = Shape.of(CODELLAMA_34B)
    kept = expected_peak(shape, "nf4", True, 4096, 16, 0.05, 0.5)
    offloaded = expected_peak(shape, "nf4", True, 4096, 16, 0.05, 0.5, offload=True)
    assert kept - offloaded == 4096 * 48 * 2 * 8192  # the 48 layer inputs of 4096 tokens
    chosen = plan(shape, int((kept + offloaded) / 2 / 0.92), tokens_per_batch=4096, longest=4096, logit_fraction=0.5)
    assert (chosen.precision, chosen.gradient_checkpointing, chosen.offload) == ("nf4", True, True)
    assert "checkpointing (offloaded)" in chosen.describe()


# Peaks measured by bench/train_gpu.py --nf4 caps (H100, bitsandbytes kernels, torch's allocator: the
# CUDA context is not in them), lessons of which 31% of the positions are labelled, 4 steps (AdamW's
# moments exist); the planner adds CONTEXT_BYTES on top. README, "4-bit base".
CODELLAMA_13B = LlamaConfig(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                            num_attention_heads=40, vocab_size=32016)
MEASURED_CAPS = [  # (shape, offloaded, measured peak GiB)
    (CODELLAMA_7B, True, 5.15),
    (CODELLAMA_7B, False, 5.94),
    (CODELLAMA_13B, False, 10.07),
    (CODELLAMA_34B, True, 20.48),
]


@pytest.mark.parametrize("config, offload, measured", MEASURED_CAPS)
def test_expected_peak_is_within_0_3_gib_of_the_measured_one(config, offload, measured):
    from lacd.pipeline.memplan import CONTEXT_BYTES

    expected = expected_peak(Shape.of(config), "nf4", True, 4096, 16, 0.05, 1.5 * 0.309, offload)
    assert abs((expected - CONTEXT_BYTES) / GIB - measured) < 0.3


def test_checkpointed_logits_stay_one_loss_chunk_and_never_add_to_the_recomputed_layer():
    from lacd.pipeline.memplan import LOSS_CHUNK_ELEMENTS, logit_bytes

    shape = Shape.of(CODELLAMA_7B)
    assert logit_bytes(shape, 4096, 1.0) == logit_bytes(shape, 8192, 0.5) == \
        (LOSS_CHUNK_ELEMENTS // shape.vocab) * shape.vocab * 12
    assert logit_bytes(shape, 100, 1.0) == 100 * shape.vocab * 12
    # with checkpointing the larger of (recomputed layer, loss chunk) counts: labelling more positions
    # of a 4096-token batch changes nothing once the layer is the larger
    assert expected_peak(shape, "nf4", True, 4096, 16, 0.05, 0.2) == expected_peak(shape, "nf4", True, 4096, 16, 0.05, 1.0)
    assert expected_peak(shape, "nf4", False, 4096, 16, 0.05, 0.2) < expected_peak(shape, "nf4", False, 4096, 16, 0.05, 1.0)


def test_a_7b_on_an_8gb_card_keeps_its_layer_inputs_on_the_gpu():
    chosen = plan(Shape.of(CODELLAMA_7B), 8 * GIB, tokens_per_batch=4096, longest=4096, logit_fraction=0.5)
    assert (chosen.precision, chosen.gradient_checkpointing, chosen.offload) == ("nf4", True, False)
    assert (chosen.tokens_per_batch, chosen.grad_accum) == (4096, 1)
    assert 6 * GIB < chosen.expected_peak < 7 * GIB


def test_requested_precision_is_kept():
    chosen = plan(Shape.of(CODELLAMA_7B), 80 * GIB, precision="nf4", tokens_per_batch=4096, longest=4096)
    assert (chosen.precision, chosen.gradient_checkpointing) == ("nf4", False)


def test_a_base_too_big_even_in_4_bits_names_the_need_and_the_fix():
    with pytest.raises(PlanError) as caught:
        plan(Shape.of(CODELLAMA_34B), 12 * GIB, tokens_per_batch=4096, longest=4096)
    message = str(caught.value)
    assert "even in 4-bit with gradient checkpointing and offloading" in message and "12.0 GiB" in message
    assert "smaller base model" in message and "device = cpu" in message
    needed = float(message.split("~")[1].split(" GiB")[0])
    assert needed > 12


# --------------------------------------------------------------------------- configuration and status


def test_base_precision_is_a_validated_train_setting():
    from lacd import config

    assert config.load(env={}).train.base_precision == "auto"
    assert config.load(env={"LACD_TRAIN_BASE_PRECISION": "nf4"}).train.base_precision == "nf4"
    with pytest.raises(config.ConfigError, match="base_precision"):
        config.load(env={"LACD_TRAIN_BASE_PRECISION": "int3"})


def test_status_shows_the_memory_plan_of_a_training_run():
    import time

    from lacd.status import _run_line

    chosen = plan(Shape.of(CODELLAMA_7B), 10 * GIB, tokens_per_batch=4096, longest=4096, logit_fraction=0.5)
    line = _run_line(dict(id=3, status="running", lessons=40, stage="train", created_at=time.time(),
                          progress=dict(step=2, total_steps=9, loss=1.5, plan=chosen.describe())))
    assert "plan: nf4, checkpointing, 4096 tok x1, ~" in line and "of 10.0 GiB" in line
