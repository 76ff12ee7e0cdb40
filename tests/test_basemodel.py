"""Resolving [model] base: folders, GGUF files, Ollama's blobs, the hub cache, the embedded SmolLM2."""

from __future__ import annotations

import time
from pathlib import Path

import ollama
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lacd.basemodel import (
    SMOLLM2,
    BaseModelError,
    parse_modelfile_from,
    resolve_base,
    smollm2_gguf,
)
from lacd.export import export_gguf
from ollama_standin import StandIn
from tiny import make_tiny_llama

CHAT = [{"role": "user", "content": "def add(a, b): return 42"}]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny BPE Llama folder and its q8_0 GGUF."""
    work = tmp_path_factory.mktemp("gguf")
    folder = make_tiny_llama(work / "model", tokenizer="bpe")
    gguf_file = work / "tiny-q8.gguf"
    export_gguf(folder, None, gguf_file, outtype="q8_0")
    return folder, gguf_file


def same_as_gguf(converted: Path, gguf_file: Path) -> None:
    """The converted folder holds exactly what transformers dequantizes from the GGUF."""
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    source = dict(pretrained_model_name_or_path=gguf_file.parent, gguf_file=gguf_file.name)
    direct = AutoModelForCausalLM.from_pretrained(**source, dtype=torch.float32)
    plain = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
    assert not hasattr(plain.config, "quantization_config")
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, direct(ids).logits, atol=2e-2, rtol=2e-2)
    tok = AutoTokenizer.from_pretrained(converted)
    original = AutoTokenizer.from_pretrained(**source)
    assert tok.apply_chat_template(CHAT, tokenize=False) == original.apply_chat_template(CHAT, tokenize=False)
    text = "def add(a, b):\n    return a + b<|im_end|>"
    assert tok(text)["input_ids"] == original(text)["input_ids"]


def test_local_folder_is_used_as_is(tiny_gguf, tmp_path):
    folder, _ = tiny_gguf
    assert resolve_base(str(folder), tmp_path) == folder.resolve()
    (tmp_path / "empty").mkdir()
    with pytest.raises(BaseModelError, match="no config.json"):
        resolve_base(str(tmp_path / "empty"), tmp_path)


def test_gguf_file_is_converted_once(tiny_gguf, tmp_path):
    _, gguf_file = tiny_gguf
    state = tmp_path / "state"
    converted = resolve_base(str(gguf_file), state)
    assert converted.parent == state / "models" and converted.name.startswith("gguf-tiny-q8-")
    assert (converted / "model.safetensors").is_file() and (converted / "lacd_source.json").is_file()
    assert not [p for p in converted.parent.iterdir() if p.name.endswith(".tmp")]
    same_as_gguf(converted, gguf_file)
    stamp = (converted / "model.safetensors").stat().st_mtime_ns
    assert resolve_base(str(gguf_file), state) == converted
    assert (converted / "model.safetensors").stat().st_mtime_ns == stamp  # not converted again


def test_a_conversion_parses_the_gguf_once_and_restores_gguf_py(tiny_gguf, tmp_path, monkeypatch):
    """transformers' config, tokenizer and weight-name loaders and lacd's tensor stream share one
    parse of the file during a conversion (each would parse all its metadata again); gguf-py's
    names are what they were afterwards, also when the conversion fails."""
    import gguf

    import lacd.basemodel

    _, gguf_file = tiny_gguf
    opened: list[str] = []

    class CountingReader(gguf.GGUFReader):
        def __init__(self, path, mode="r"):
            opened.append(str(path))
            super().__init__(path, mode)

    monkeypatch.setattr(gguf, "GGUFReader", CountingReader)
    converted = resolve_base(str(gguf_file), tmp_path / "state")
    assert opened == [str(gguf_file.resolve())]
    assert gguf.GGUFReader is CountingReader
    same_as_gguf(converted, gguf_file)

    def fail(*args):
        assert gguf.GGUFReader is not CountingReader  # inside the conversion
        raise OSError("disk full")

    monkeypatch.setattr(lacd.basemodel, "_stream_tensors", fail)
    with pytest.raises(OSError, match="disk full"):
        resolve_base(str(gguf_file), tmp_path / "other")
    assert gguf.GGUFReader is CountingReader


def test_broken_gguf_and_unknown_specs_say_what_is_wrong(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF but not really")
    with pytest.raises(BaseModelError, match="cannot convert GGUF"):
        resolve_base(str(bad), tmp_path / "state")
    assert not list((tmp_path / "state" / "models").iterdir())  # no half-converted folder left
    with pytest.raises(BaseModelError, match="does not exist"):
        resolve_base(str(tmp_path / "missing.gguf"), tmp_path)
    with pytest.raises(BaseModelError, match="neither"):
        resolve_base("not a model at all", tmp_path)


def test_hub_id_is_resolved_from_the_local_cache_only(tiny_gguf, tmp_path, monkeypatch):
    folder, _ = tiny_gguf
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    with pytest.raises(BaseModelError, match="nor in the local Hugging Face cache"):
        resolve_base("someone/tiny-llama", tmp_path)
    # lay the model out as the hub cache does: refs/main -> snapshots/<commit>/
    repo = cache / "models--someone--tiny-llama"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for item in folder.iterdir():
        (snapshot / item.name).write_bytes(item.read_bytes())
    resolved = resolve_base("someone/tiny-llama", tmp_path)
    assert resolved == snapshot
    assert AutoModelForCausalLM.from_pretrained(resolved).config.hidden_size == 64


def test_ollama_model_resolves_through_show_to_its_blob(tiny_gguf, tmp_path):
    _, gguf_file = tiny_gguf
    with StandIn(tmp_path / "ollama") as server:
        client = ollama.Client(host=server.host)
        digest = client.create_blob(gguf_file)
        client.create(model="tinycoder", files={"model.gguf": digest}, stream=False)
        converted = resolve_base("ollama:tinycoder", tmp_path / "state", ollama=client)
        assert converted.name == f"ollama-tinycoder-{digest.split(':')[1][:12]}"
        same_as_gguf(converted, gguf_file)
        with pytest.raises(BaseModelError, match="could not show model 'nothere'"):
            resolve_base("ollama:nothere", tmp_path / "state", ollama=client)
    with pytest.raises(BaseModelError, match="needs an Ollama client"):
        resolve_base("ollama:tinycoder", tmp_path / "state")
    with pytest.raises(BaseModelError, match="Ollama could not show"):  # server gone
        resolve_base("ollama:tinycoder", tmp_path / "other", ollama=ollama.Client(host=server.host))


def test_parse_modelfile_from_takes_the_first_real_from_line():
    modelfile = "# FROM codellama:latest\n\nFROM /var/lib/ollama/blobs/sha256-abc\nADAPTER /x\nFROM /other\n"
    assert parse_modelfile_from(modelfile) == Path("/var/lib/ollama/blobs/sha256-abc")
    assert parse_modelfile_from("FROM codellama:7b\n") is None


def test_smollm2_gguf_is_found_without_importing_its_package():
    path = smollm2_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000


@pytest.mark.slow
def test_smollm2_is_converted_into_the_state_dir(tmp_path):
    state = tmp_path / "state"
    started = time.monotonic()
    converted = resolve_base(SMOLLM2, state)
    seconds = time.monotonic() - started
    assert converted == state / "models" / SMOLLM2
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    tok = AutoTokenizer.from_pretrained(converted)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True,
        return_tensors="pt", return_dict=True,
    )
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
    assert resolve_base(SMOLLM2, state) == converted
    print(f"\nSmolLM2 GGUF -> HF conversion: {seconds:.1f} s, "
          f"{sum(f.stat().st_size for f in converted.iterdir()) / 1e6:.0f} MB")
