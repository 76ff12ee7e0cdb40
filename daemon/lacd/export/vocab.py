"""The tokenizer part of a GGUF file (tokenizer.ggml.* keys and the chat template).

Three sources, tried in the order llama.cpp's converter tries them for Llama:
  1. tokenizer.model (SentencePiece, CodeLlama/Llama 2): GGUF tokenizer model ``llama``;
  2. tokenizer.json holding a SentencePiece-style BPE (byte fallback): ``llama`` via gguf.LlamaHfVocab;
  3. tokenizer.json holding a byte-level BPE (Llama 3, SmolLM2): GGUF tokenizer model ``gpt2``.
Special token ids, add_bos/add_eos, merges and the chat template come from
gguf.SpecialVocab, exactly as the converter does.

The pre-tokenizer name (``tokenizer.ggml.pre``): when the base was converted from a GGUF
(``lacd_source.json`` names it and its size still matches), that file's own value is kept.
Otherwise a byte-level BPE is identified as llama.cpp's converter identifies it: the hash of the
token ids its tokenizer gives for a fixed check text, looked up in the converter's table
(lacd.export.pretokenizer). Where the converter would refuse an unknown hash, lacd reads the
pre-tokenizer definition in tokenizer.json and recognises the regex sets llama.cpp implements
(GPT-2, SmolLM/StarCoder digits split, Llama 3); an unrecognised one is written as ``default``
with a warning.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import structlog

from lacd.export import pretokenizer
from lacd.export.arch import ModelSpec

log = structlog.get_logger(__name__)

LLAMA3_SPLIT_REGEX = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
CODELLAMA_VOCAB_SIZE = 32016
GRANITE_SMALL_VOCAB_SIZE = 49152  # the converter turns add_bos off for this size (SmolLM2 has it too)


def add_vocab(writer: gguf.GGUFWriter, base_dir: Path, spec: ModelSpec) -> str:
    """Write the tokenizer keys for the model in base_dir; returns the GGUF tokenizer model name."""
    base_dir = Path(base_dir)
    config = _read_json(base_dir / "tokenizer_config.json")
    if config.get("add_prefix_space") is not None:
        writer.add_add_space_prefix(config["add_prefix_space"])
    if (base_dir / "tokenizer.model").is_file():
        kind = _add_sentencepiece(writer, base_dir, spec, config)
    else:
        kind = _add_llama_hf(writer, base_dir) or _add_bpe(writer, base_dir, spec, config)
    _add_family_quirks(writer, base_dir, spec)
    return kind


def _add_sentencepiece(writer: gguf.GGUFWriter, base_dir: Path, spec: ModelSpec, config: dict) -> str:
    """tokenizer.model pieces, padded to the config's vocab size, with added tokens laid over them."""
    pieces = list(gguf.SentencePieceVocab(base_dir).sentencepiece_tokens())
    n_vocab = spec.vocab_size
    if len(pieces) > n_vocab:
        log.warning("export.vocab_truncated", pieces=len(pieces), vocab_size=n_vocab)
    tokens = [f"[PAD{i}]".encode() for i in range(n_vocab)]
    scores = [-10000.0] * n_vocab
    types = [gguf.TokenType.UNUSED] * n_vocab
    for i, (text, score, toktype) in enumerate(pieces[:n_vocab]):
        tokens[i], scores[i], types[i] = text, score, toktype
    for text, token_id in _read_json(base_dir / "added_tokens.json").items():
        if token_id < n_vocab:
            tokens[token_id], scores[token_id], types[token_id] = text.encode(), -1000.0, gguf.TokenType.USER_DEFINED
    for key, entry in config.get("added_tokens_decoder", {}).items():
        token_id, text = int(key), entry["content"]
        if token_id >= n_vocab:
            continue
        if entry.get("special") or looks_special(text):
            types[token_id] = gguf.TokenType.CONTROL
        else:
            text, types[token_id] = text.replace("\u2581", " "), gguf.TokenType.USER_DEFINED
        tokens[token_id], scores[token_id] = text.encode(), -1000.0
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre(source_gguf_pre(base_dir) or "default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf.SpecialVocab(base_dir, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
    return "llama"


def _add_llama_hf(writer: gguf.GGUFWriter, base_dir: Path) -> str | None:
    """A SentencePiece-style BPE kept only as tokenizer.json; None when tokenizer.json is something else."""
    try:
        vocab = gguf.LlamaHfVocab(base_dir)
    except (FileNotFoundError, TypeError):
        return None
    tokens, scores, types = zip(*vocab.all_tokens())
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre(source_gguf_pre(base_dir) or "default")
    writer.add_token_list(list(tokens))
    writer.add_token_scores(list(scores))
    writer.add_token_types(list(types))
    gguf.SpecialVocab(base_dir, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
    return "llama"


def _add_bpe(writer: gguf.GGUFWriter, base_dir: Path, spec: ModelSpec, config: dict) -> str:
    """A byte-level (GPT-2 style) BPE from tokenizer.json, padded to the config's vocab size."""
    tokenizer_json = base_dir / "tokenizer.json"
    if not tokenizer_json.is_file():
        raise FileNotFoundError(f"{base_dir} has neither tokenizer.model nor tokenizer.json")
    tokenizer = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    _check_byte_level_bpe(tokenizer, tokenizer_json)
    tokens, types = bpe_tokens(tokenizer, config, spec.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(base_dir, tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(base_dir, load_merges=True).add_to_gguf(writer, quiet=True)
    return "gpt2"


def _check_byte_level_bpe(tokenizer: dict, path: Path) -> None:
    """The tokenizer.json must hold a GPT-2 style BPE (what GGUF tokenizer model gpt2 means)."""
    model, decoder = tokenizer.get("model", {}), tokenizer.get("decoder") or {}
    kinds = [step.get("type") for step in decoder.get("decoders", [decoder])]
    if model.get("type") != "BPE" or model.get("byte_fallback") or "ByteLevel" not in kinds:
        raise ValueError(f"{path}: tokenizer type {model.get('type')!r} is neither SentencePiece nor byte-level "
                         'BPE; use [export] converter = "llama.cpp"')


def bpe_tokens(tokenizer: dict, config: dict, n_vocab: int) -> tuple[list[str], list[int]]:
    """Token texts and types by id: added tokens are CONTROL when special (or <|...|>), else USER_DEFINED."""
    by_id = {token_id: text for text, token_id in tokenizer["model"]["vocab"].items()}
    added = {entry["id"]: entry for entry in tokenizer.get("added_tokens", [])}
    for key, entry in config.get("added_tokens_decoder", {}).items():
        added[int(key)] = {**added.get(int(key), {}), **entry}
    by_id.update({token_id: entry["content"] for token_id, entry in added.items()})
    tokens, types = [], []
    for token_id in range(n_vocab):
        text = by_id.get(token_id)
        if text is None:
            tokens.append(f"[PAD{token_id}]")
            types.append(gguf.TokenType.UNUSED)
        elif token_id in added:
            special = added[token_id].get("special") or looks_special(text)
            tokens.append(text if special else text.replace("\u2581", " "))
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(text)
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def pre_tokenizer_name(base_dir: Path, tokenizer: dict) -> str:
    """The source GGUF's own name, else the converter's hash identification, else tokenizer.json's
    structure (see the module's docstring)."""
    own = source_gguf_pre(base_dir)
    if own:
        return own
    try:
        name, digest = pretokenizer.identify(base_dir)
    except (OSError, ValueError, TypeError, KeyError) as exc:  # transformers cannot load this tokenizer
        log.warning("export.pre_tokenizer_hash_failed", error=str(exc))
        name, digest = None, None
    return name or bpe_pre_tokenizer_name(tokenizer, digest)


def source_gguf_pre(base_dir: Path) -> str | None:
    """``tokenizer.ggml.pre`` of the GGUF the base folder was converted from (lacd.basemodel writes
    ``lacd_source.json``), when that file is still there with the same size; else None."""
    source = _read_json(Path(base_dir) / "lacd_source.json")
    path = Path(source["source_gguf"]) if source.get("source_gguf") else None
    try:
        if path is None or path.stat().st_size != source.get("size"):
            return None
        field = gguf.GGUFReader(path).fields.get("tokenizer.ggml.pre")
    except (OSError, ValueError) as exc:
        log.warning("export.source_gguf_unreadable", path=str(path), error=str(exc))
        return None
    return str(field.contents()) if field is not None else None


def bpe_pre_tokenizer_name(tokenizer: dict, chkhsh: str | None = None) -> str:
    """llama.cpp's name for the pre-tokenizer in tokenizer.json, or "default" (with a warning that
    gives the converter's hash ``chkhsh`` when known)."""
    steps = _pre_tokenizer_steps(tokenizer.get("pre_tokenizer"))
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        if steps[0].get("pattern", {}).get("Regex") == LLAMA3_SPLIT_REGEX:
            return "llama-bpe"
    log.warning("export.pre_tokenizer_unknown", steps=kinds, chkhsh=chkhsh, written="default")
    return "default"


def looks_special(text: str) -> bool:
    """The converter's test for added tokens that should be CONTROL even when not flagged special."""
    return (
        text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (text.startswith("<|") and text.endswith("|>"))
        or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))
        or (text.startswith("<unused") and text.endswith(">"))
    )


def _add_family_quirks(writer: gguf.GGUFWriter, base_dir: Path, spec: ModelSpec) -> None:
    """What the converter adds for CodeLlama's infill vocab and for 49152-token vocabs."""
    if spec.vocab_size == CODELLAMA_VOCAB_SIZE:
        fim = gguf.SpecialVocab(
            base_dir, load_merges=False, special_token_types=["prefix", "suffix", "middle", "eot"]
        )
        for kind, token_id in (("prefix", 32007), ("suffix", 32008), ("middle", 32009), ("eot", 32010)):
            fim._set_special_token(kind, token_id)
        fim.add_to_gguf(writer, quiet=True)
    if spec.vocab_size == GRANITE_SMALL_VOCAB_SIZE:
        writer.add_add_bos_token(False)


def _pre_tokenizer_steps(pre: dict[str, Any] | None) -> list[dict[str, Any]]:
    """A pre_tokenizer definition as a flat list of steps."""
    if not pre:
        return []
    if pre.get("type") == "Sequence":
        return [step for inner in pre.get("pretokenizers", []) for step in _pre_tokenizer_steps(inner)]
    return [pre]


def _read_json(path: Path) -> dict:
    """A JSON file as a dict, {} when the file is absent."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
