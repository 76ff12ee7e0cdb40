"""Fallback export through llama.cpp's own converter, for architectures the built-in writer does not cover.

Config: [export] converter = "llama.cpp" and llama_cpp_convert = "/path/to/convert_hf_to_gguf.py".
The adapter is merged with peft (merge_and_unload) into a temporary Hugging Face
folder next to the output, the script converts that folder, and the result is
renamed into place. This is the slow two-step path (the whole merged model is
held in memory and written twice) but it handles whatever llama.cpp handles.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import gguf
import structlog

from lacd.artifacts import fsync_dir, fsync_path, temporary_folder
from lacd.export.result import ExportResult

log = structlog.get_logger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")


class ConverterFailed(Exception):
    """llama.cpp's convert script exited with an error."""


def export_with_llama_cpp(
    base_dir: Path, adapter_dir: Path | None, out_path: Path, outtype: str, convert_script: Path
) -> ExportResult:
    """Merge adapter_dir into base_dir in a temporary folder and convert it with convert_script."""
    started = time.perf_counter()
    base_dir, out_path, convert_script = Path(base_dir), Path(out_path), Path(convert_script)
    if not convert_script.is_file():
        raise FileNotFoundError(f"[export] llama_cpp_convert: {convert_script} does not exist")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with temporary_folder(out_path) as scratch:
        model_dir = base_dir
        merged = 0
        if adapter_dir is not None:
            model_dir = Path(scratch) / base_dir.name  # same folder name: the converter names the model after it
            merged = merge_to_folder(base_dir, Path(adapter_dir), model_dir)
        tmp_out = Path(scratch) / out_path.name
        run_converter(convert_script, model_dir, tmp_out, outtype)
        fsync_path(tmp_out)
        os.replace(tmp_out, out_path)
        fsync_dir(out_path.parent)
    n_tensors = len(gguf.GGUFReader(out_path).tensors)
    result = ExportResult(out_path, n_tensors, out_path.stat().st_size, time.perf_counter() - started, merged)
    log.info("export.done", path=str(out_path), converter="llama.cpp", tensors=n_tensors,
             seconds=round(result.seconds, 2), merged_tensors=merged)
    return result


def merge_to_folder(base_dir: Path, adapter_dir: Path, out_dir: Path) -> int:
    """peft merge_and_unload of the adapter into the base model, saved with the base's tokenizer files.

    Returns the number of LoRA layers merged.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype="auto", low_cpu_mem_usage=True)
    peft_model = PeftModel.from_pretrained(model, adapter_dir)
    n_layers = sum(1 for name, _ in peft_model.named_modules() if name.endswith(".lora_A"))
    with torch.no_grad():
        merged = peft_model.merge_and_unload()
    merged.save_pretrained(out_dir, safe_serialization=True)
    for path in base_dir.iterdir():
        if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES) and not (out_dir / path.name).exists():
            shutil.copy2(path, out_dir / path.name)
    return n_layers


def run_converter(convert_script: Path, model_dir: Path, out_file: Path, outtype: str) -> None:
    """Run convert_hf_to_gguf.py with this interpreter; ConverterFailed with its last output on error."""
    command = [sys.executable, str(convert_script), str(model_dir), "--outfile", str(out_file), "--outtype", outtype]
    log.info("export.converter_start", script=str(convert_script), outtype=outtype)
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        raise ConverterFailed(f"{convert_script.name} exited with status {done.returncode}:\n{tail}")
