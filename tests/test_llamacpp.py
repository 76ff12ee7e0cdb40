"""llama.cpp itself loads the GGUF that lacd exported and registered, and answers as transformers does.

A tiny Llama with a LoRA adapter is exported by lacd's writer (f16, the merged weights) and
registered with the stand-in Ollama by lacd's register code; the blob Ollama stored is loaded by
llama.cpp (node-llama-cpp's prebuilt CPU binary, `tests/llamacpp/`), which completes a prompt
rendered as Ollama renders the registered TEMPLATE, greedily. Its prompt tokens and reply must be
transformers' on the same base with the adapter merged by peft: an independent tokenizer, merge
and forward pass. The adapter's seed is one whose greedy path has no near-tie (checked below), so
f16 rounding cannot flip a token and a mismatch means a wrong file.

Needs node and `npm ci` in tests/llamacpp (.ci/run does both); outside CI it skips without them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import skip_outside_ci
from lacd.export import export_gguf
from lacd.pipeline import register
from lacd.pipeline import template as tpl
from ollama_standin import StandIn
from tiny import make_random_lora, make_tiny_llama

LLAMACPP = Path(__file__).parent / "llamacpp"
SYSTEM = "You are a coding agent."
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def node() -> str:
    node = shutil.which("node")
    if node is None:
        skip_outside_ci("node is not installed: cannot run llama.cpp through node-llama-cpp")
    if not (LLAMACPP / "node_modules" / "node-llama-cpp").is_dir():
        skip_outside_ci(f"node-llama-cpp is not installed: run `npm ci --omit=optional --ignore-scripts` in {LLAMACPP}")
    return node


def llamacpp_complete(node: str, gguf: Path, prompt: str, tmp_path: Path) -> dict:
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(prompt, encoding="utf-8")
    done = subprocess.run([node, str(LLAMACPP / "complete.mjs"), str(gguf), str(prompt_file), str(MAX_TOKENS)],
                          capture_output=True, text=True, timeout=300, cwd=LLAMACPP)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def transformers_complete(base: Path, adapter: Path, prompt: str) -> dict:
    """Greedy tokens of base + adapter merged by peft, stopping at EOS or <|im_end|>; and the smallest
    top-1/top-2 logit gap on the way (how far the path is from a tie)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().eval()
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    stops = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=stops,
                             pad_token_id=stops[0])
        new = out[0, len(ids):].tolist()
        logits = model(out).logits[0, len(ids) - 1 : len(ids) - 1 + len(new)]
    top = logits.topk(2, dim=-1).values
    while new and new[-1] in stops:
        new.pop()
    return {"prompt_tokens": ids, "tokens": new, "text": tokenizer.decode(new),
            "min_gap": float((top[:, 0] - top[:, 1]).min())}


def test_llamacpp_answers_a_registered_gguf_as_transformers_answers_the_merged_model(tmp_path, node):
    from safetensors.torch import load_file, save_file

    base = make_tiny_llama(tmp_path / "base", tokenizer="bpe")
    weights = load_file(base / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] * 10  # confident logits: no near-ties
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    adapter = make_random_lora(base, tmp_path / "adapter", seed=6)
    exported = export_gguf(base, adapter, tmp_path / "model.gguf", "f16")
    assert exported.merged_tensors > 0
    with StandIn(tmp_path / "ollama") as server:
        client = register.make_client(server.host)
        register.create_version(client, "lacd-coder", 1, tmp_path / "model.gguf", tpl.ollama_template("chatml"),
                                SYSTEM, {"stop": tpl.stop_tokens("chatml")})
        store = server.server.store
        registered = store.blob_path(store.get("lacd-coder:v1")["model"])  # the file Ollama hands llama.cpp
    assert registered.is_file() and registered.read_bytes() == (tmp_path / "model.gguf").read_bytes()
    prompt = tpl.render_prompt("chatml", [{"role": "user", "content": "read main.py and fix the failing test"}], SYSTEM)

    llama = llamacpp_complete(node, registered, prompt, tmp_path)
    hf = transformers_complete(base, adapter, prompt)
    assert hf["min_gap"] > 0.005, "the greedy path has a near-tie: choose another adapter seed"
    assert llama["prompt_tokens"] == hf["prompt_tokens"]  # special tokens parsed, BOS as transformers adds it
    assert len(hf["tokens"]) >= 16 and len(set(hf["tokens"])) > 4  # a real reply, not one repeated token
    assert llama["tokens"] == hf["tokens"]
    assert llama["text"] == hf["text"]
