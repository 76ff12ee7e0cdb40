"""An Ollama-style CodeLlama base (Q4_0 GGUF, SentencePiece vocabulary of 32016 tokens with the
infill tokens) converted tensor by tensor, formatted as Llama-2 chat and trained on a 4-bit base."""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from lacd.basemodel import resolve_base
from lacd.pipeline import nf4

pytestmark = pytest.mark.slow  # ~50 s on 2 cores: three parses of a 32016-token GGUF vocabulary

INFILL = {32007: "▁<PRE>", 32008: "▁<SUF>", 32009: "▁<MID>", 32010: "▁<EOT>"}  # CodeLlama's ids
VOCAB = 32016
WORDS = "def add return class self import print the a b if else for in with open file path hello done says"


def codellama_vocab() -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and llama.cpp token types shaped like CodeLlama's: <unk> <s> </s>, 256 byte
    tokens, SentencePiece pieces up to 32000, then 16 added ids holding the four infill tokens."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256  # UNKNOWN, CONTROL, BYTE
    pieces = ["▁", *string.ascii_letters, *string.digits, *string.punctuation]
    pieces += ["▁" + w for w in WORDS.split()] + ["INST", "SYS", "<<", ">>", "</"]
    for piece in dict.fromkeys(pieces):
        tokens.append(piece)
        types.append(1)  # NORMAL
    tokens += [f"▁w{i}" for i in range(32000 - len(tokens))]
    types += [1] * (32000 - len(types))
    for index in range(32000, VOCAB):
        tokens.append(INFILL.get(index, f"<unused{index - 32000}>"))
        types.append(4 if index in INFILL else 5)  # USER_DEFINED, UNUSED
    scores = [0.0] * 259 + [-float(i) for i in range(len(tokens) - 259)]
    return tokens, scores, types


def write_codellama_gguf(path: Path, hidden: int = 64, inter: int = 128, layers: int = 2, heads: int = 4,
                         kv_heads: int = 4) -> Path:
    """A tiny random llama GGUF as Ollama stores codellama: Q4_0 weights, Q8_0 output, f32 norms."""
    import gguf

    rng = np.random.default_rng(0)
    q4, q8 = gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q8_0
    tokens, scores, types = codellama_vocab()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(1024)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(inter)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(1_000_000.0)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)

    def tensor(name: str, shape: tuple[int, ...], kind: object | None) -> None:
        values = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        if kind is None:
            writer.add_tensor(name, values)
        else:
            writer.add_tensor(name, gguf.quants.quantize(values, kind), raw_dtype=kind)

    tensor("token_embd.weight", (VOCAB, hidden), q4)
    tensor("output_norm.weight", (hidden,), None)
    tensor("output.weight", (VOCAB, hidden), q8)
    head = hidden // heads
    for n in range(layers):
        tensor(f"blk.{n}.attn_norm.weight", (hidden,), None)
        tensor(f"blk.{n}.ffn_norm.weight", (hidden,), None)
        tensor(f"blk.{n}.attn_q.weight", (hidden, hidden), q4)
        tensor(f"blk.{n}.attn_k.weight", (kv_heads * head, hidden), q4)
        tensor(f"blk.{n}.attn_v.weight", (kv_heads * head, hidden), q4)
        tensor(f"blk.{n}.attn_output.weight", (hidden, hidden), q4)
        tensor(f"blk.{n}.ffn_gate.weight", (inter, hidden), q4)
        tensor(f"blk.{n}.ffn_up.weight", (inter, hidden), q4)
        tensor(f"blk.{n}.ffn_down.weight", (hidden, inter), q4)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


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
    assert len(tokenizer) == VOCAB and AutoConfig.from_pretrained(folder).vocab_size == VOCAB
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
    lessons = [LessonIn(i, f"{i:032x}", [
        {"role": "user", "content": f"What is in notes{i}.txt?"},
        {"role": "assistant", "content": f"<tool_code>\nread_file('notes{i}.txt')\n</tool_code>"},
        {"role": "tool", "content": f"<tool_output>hello {i}</tool_output>"},
        {"role": "assistant", "content": f"The file says hello {i}. done"},
    ]) for i in range(12)]
    spec = FormatSpec(base_dir=folder, out_dir=tmp_path / "dataset", system_prompt="You are a coding agent.",
                      max_seq_len=512, heldout_pct=25.0, chat_family="llama2")
    formatted = format_lessons(lessons, spec)
    assert formatted.family == "llama2"
    model = nf4.load_nf4_base(folder, torch.device("cpu"), torch.float32, "sdpa")
    assert sum(nf4.is_nf4(m) for m in model.modules()) == 2 * 7 and not nf4.is_nf4(model.lm_head)
    result = run_training(TrainSpec(
        base_dir=folder, dataset_dir=tmp_path / "dataset", out_dir=tmp_path / "adapter",
        checkpoint_dir=tmp_path / "checkpoints", progress_path=tmp_path / "progress.json", lora_r=4,
        lora_alpha=8, learning_rate=1e-2, epochs=2, tokens_per_batch=512, max_seq_len=512, device="cpu",
        num_threads=1, base_precision="nf4"))
    assert result.base_precision == "nf4" and result.steps > 0
    assert result.heldout_loss_after < result.heldout_loss_before
