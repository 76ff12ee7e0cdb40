"""An Ollama-style CodeLlama base (Q4_0 GGUF, SentencePiece vocabulary of 32016 tokens with the
infill tokens) converted tensor by tensor, formatted as Llama-2 chat and trained on a 4-bit base."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from lacd.basemodel import resolve_base
from lacd.pipeline import nf4
from tiny_gguf import INFILL, VOCAB, write_codellama_gguf

pytestmark = pytest.mark.slow  # ~50 s on 2 cores: three parses of a 32016-token GGUF vocabulary


@pytest.fixture(scope="module")
def codellama(tmp_path_factory) -> tuple[Path, Path]:
    """(the GGUF, the folder resolve_base converted it into), built once for the module."""
    torch.set_num_threads(1)
    work = tmp_path_factory.mktemp("codellama")
    gguf_file = write_codellama_gguf(work / "codellama-q4_0.gguf")
    return gguf_file, resolve_base(str(gguf_file), work / "state")


def test_codellama_tokenizer_survives_the_conversion(codellama):
    _, folder = codellama
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = AutoConfig.from_pretrained(folder)
    assert len(tokenizer) == VOCAB and config.vocab_size == VOCAB
    assert config.architectures == ["LlamaForCausalLM"]  # what the export stage reads
    assert (folder / "generation_config.json").is_file()
    assert tokenizer.convert_ids_to_tokens(list(INFILL)) == list(INFILL.values())
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (1, 2, 0)
    text = "[INST] def add(a, b): return a + b [/INST] é"  # é: no piece, byte fallback
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == 1 and tokenizer.decode(ids, skip_special_tokens=True) == text


def test_streamed_conversion_equals_transformers_gguf_loading(codellama):
    gguf_file, folder = codellama
    reference = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name,
                                                     dtype=torch.bfloat16).state_dict()
    converted = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).state_dict()
    assert converted.keys() == reference.keys()
    for name, value in reference.items():
        assert torch.equal(converted[name], value), name  # q/k un-permuted like transformers does


def test_llama2_lessons_train_on_the_4bit_codellama_base(codellama, tmp_path):
    from lacd.pipeline.format import FormatSpec, LessonIn, format_lessons
    from lacd.pipeline.train import TrainSpec, run_training

    _, folder = codellama
    lessons = [LessonIn(i, hashlib.blake2b(f"lesson {i}".encode(), digest_size=16).hexdigest(), [
        {"role": "user", "content": f"What is in notes{i}.txt?"},
        {"role": "assistant", "content": f"<tool_code>\nread_file('notes{i}.txt')\n</tool_code>"},
        {"role": "tool", "content": f"<tool_output>hello {i}</tool_output>"},
        {"role": "assistant", "content": f"The file says hello {i}. done"},
    ]) for i in range(12)]
    spec = FormatSpec(base_dir=folder, out_dir=tmp_path / "dataset", system_prompt="You are a coding agent.",
                      max_seq_len=512, heldout_pct=25.0, chat_family="llama2")
    formatted = format_lessons(lessons, spec)
    assert formatted.family == "llama2" and formatted.counts["train"] >= 6 and formatted.counts["heldout"] >= 1
    model = nf4.load_nf4_base(folder, torch.device("cpu"), torch.float32, "sdpa")
    assert sum(nf4.is_nf4(m) for m in model.modules()) == 2 * 7 and not nf4.is_nf4(model.lm_head)
    result = run_training(TrainSpec(
        base_dir=folder, dataset_dir=tmp_path / "dataset", out_dir=tmp_path / "adapter",
        checkpoint_dir=tmp_path / "checkpoints", progress_path=tmp_path / "progress.json", lora_r=4,
        lora_alpha=8, learning_rate=1e-2, epochs=2, tokens_per_batch=512, max_seq_len=512, device="cpu",
        num_threads=1, base_precision="nf4"))
    assert result.base_precision == "nf4" and result.steps > 0
    assert result.heldout_loss_after < result.heldout_loss_before
