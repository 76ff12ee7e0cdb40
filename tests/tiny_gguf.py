"""A CodeLlama-shaped llama GGUF as Ollama stores codellama (Q4_0 weights, Q8_0 output, f32 norms,
a SentencePiece vocabulary of 32016 tokens holding the infill tokens), written tensor by tensor.

Used by tests/test_codellama_gguf.py (tiny shape, real Q4_0 quantization of random weights) and
bench/gguf_load.py (CodeLlama-7B shape, random Q4_0 blocks: no quantization to wait for).
"""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np

INFILL = {32007: "▁<PRE>", 32008: "▁<SUF>", 32009: "▁<MID>", 32010: "▁<EOT>"}  # CodeLlama's ids
VOCAB = 32016
WORDS = "def add return class self import print the a b if else for in with open file path hello done says"
TINY = dict(hidden=64, inter=128, layers=2, heads=4, kv_heads=4)
CODELLAMA_7B = dict(hidden=4096, inter=11008, layers=32, heads=32, kv_heads=32)


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


def _tensors(hidden: int, inter: int, layers: int, heads: int, kv_heads: int) -> list[tuple[str, tuple, str]]:
    """(GGUF name, shape (rows, columns), kind) of every tensor, in file order."""
    kv = kv_heads * (hidden // heads)
    specs = [("token_embd.weight", (VOCAB, hidden), "Q4_0"), ("output_norm.weight", (hidden,), "F32"),
             ("output.weight", (VOCAB, hidden), "Q8_0")]
    for n in range(layers):
        specs += [(f"blk.{n}.attn_norm.weight", (hidden,), "F32"), (f"blk.{n}.ffn_norm.weight", (hidden,), "F32"),
                  (f"blk.{n}.attn_q.weight", (hidden, hidden), "Q4_0"), (f"blk.{n}.attn_k.weight", (kv, hidden), "Q4_0"),
                  (f"blk.{n}.attn_v.weight", (kv, hidden), "Q4_0"),
                  (f"blk.{n}.attn_output.weight", (hidden, hidden), "Q4_0"),
                  (f"blk.{n}.ffn_gate.weight", (inter, hidden), "Q4_0"),
                  (f"blk.{n}.ffn_up.weight", (inter, hidden), "Q4_0"),
                  (f"blk.{n}.ffn_down.weight", (hidden, inter), "Q4_0")]
    return specs


def _data(shape: tuple, kind: str, rng: np.random.Generator, random_blocks: bool) -> np.ndarray:
    """A tensor's bytes: f32 ones-ish norms, quantized random weights, or random blocks (scale 0.01)."""
    import gguf

    if kind == "F32":
        return (1.0 + 0.05 * rng.standard_normal(shape)).astype(np.float32)
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    if not random_blocks:
        return gguf.quants.quantize((rng.standard_normal(shape) * 0.05).astype(np.float32), qtype)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, size=(shape[0], shape[1] // block, size), dtype=np.uint8)
    data[:, :, :2] = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)  # every block's f16 scale
    return data.reshape(shape[0], -1)


def write_codellama_gguf(path: Path, shape: dict = TINY, random_blocks: bool = False, seed: int = 0) -> Path:
    """Write the GGUF one tensor at a time (the writer never holds the model)."""
    import gguf

    rng = np.random.default_rng(seed)
    tokens, scores, types = codellama_vocab()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(16384)
    writer.add_embedding_length(shape["hidden"])
    writer.add_block_count(shape["layers"])
    writer.add_feed_forward_length(shape["inter"])
    writer.add_head_count(shape["heads"])
    writer.add_head_count_kv(shape["kv_heads"])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(1_000_000.0)
    writer.add_rope_dimension_count(shape["hidden"] // shape["heads"])
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    specs = _tensors(**shape)
    for name, dims, kind in specs:
        if kind == "F32":
            writer.add_tensor_info(name, dims, np.dtype(np.float32), int(np.prod(dims)) * 4)
        else:
            qtype = getattr(gguf.GGMLQuantizationType, kind)
            byte_shape = gguf.quants.quant_shape_to_byte_shape(dims, qtype)
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, dims, kind in specs:
        writer.write_tensor_data(_data(dims, kind, rng, random_blocks))
    writer.close()
    return path
