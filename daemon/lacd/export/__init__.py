"""GGUF export: merge a LoRA adapter into its base model and write a GGUF file in one streaming pass.

    export_gguf(base_dir, adapter_dir, out_path, outtype="f16", progress=None) -> ExportResult
    export_with_llama_cpp(base_dir, adapter_dir, out_path, outtype, convert_script) -> ExportResult

The built-in path covers LlamaForCausalLM (Llama 2/3, CodeLlama, SmolLM2) and
MistralForCausalLM with safetensors weights and writes the same file as
llama.cpp's convert_hf_to_gguf.py does for the merged model. Anything else
raises UnsupportedArchitecture; export_with_llama_cpp is the fallback for it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import gguf
import structlog

from lacd.export.arch import UnsupportedArchitecture, add_hparams, read_spec
from lacd.export.fallback import ConverterFailed, export_with_llama_cpp
from lacd.export.merge import UnsupportedAdapter, load_adapter
from lacd.export.plan import plan_tensors
from lacd.export.result import ExportResult
from lacd.export.vocab import add_vocab
from lacd.export.writer import OUTTYPES, declare_tensors, write_gguf

__all__ = [
    "ExportResult",
    "UnsupportedArchitecture",
    "UnsupportedAdapter",
    "ConverterFailed",
    "OUTTYPES",
    "export_gguf",
    "export_with_llama_cpp",
]

log = structlog.get_logger(__name__)


def export_gguf(
    base_dir: Path,
    adapter_dir: Path | None,
    out_path: Path,
    outtype: str = "f16",
    progress: Callable[[int, int], None] | None = None,
) -> ExportResult:
    """Write base_dir (+ the LoRA in adapter_dir, merged) as a GGUF file at out_path.

    outtype: f16, bf16, f32 or q8_0. progress(done, total) is called after each tensor.
    The file appears under out_path only when complete (temporary name, fsync, rename).
    Memory: a few slices of ~2M values per worker thread, whatever the model size. While it
    runs, torch uses one intra-op thread (the export's own workers give the parallelism).
    """
    started = time.perf_counter()
    base_dir, out_path = Path(base_dir), Path(out_path)
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype must be one of {', '.join(OUTTYPES)}, not {outtype!r}")
    file_type, qtype = OUTTYPES[outtype]
    spec = read_spec(base_dir)
    adapter = load_adapter(Path(adapter_dir)) if adapter_dir is not None else None
    jobs = plan_tensors(base_dir, spec, qtype, adapter)
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    declare_tensors(writer, jobs)
    _add_general(writer, base_dir)
    add_hparams(writer, spec, file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_vocab(writer, base_dir, spec)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    size = write_gguf(writer, jobs, out_path, progress)
    merged = sum(1 for job in jobs if job.lora is not None or job.replaced)
    result = ExportResult(out_path, len(jobs), size, time.perf_counter() - started, merged)
    log.info("export.done", path=str(out_path), tensors=result.n_tensors, bytes=size,
             seconds=round(result.seconds, 2), merged_tensors=merged, outtype=outtype)
    return result


def _add_general(writer: gguf.GGUFWriter, base_dir: Path) -> None:
    """general.* keys as the converter writes them (name, size label... from the model folder)."""
    total, shared, expert, expert_count = writer.get_total_parameter_count()
    metadata = gguf.Metadata.load(None, base_dir, None, total)
    if metadata.name is None:
        metadata.name = base_dir.name
    if metadata.size_label is None and total > 0:
        metadata.size_label = gguf.size_label(total, shared, expert, expert_count)
    writer.add_type(gguf.GGUFType.MODEL)
    metadata.set_gguf_meta_model(writer)
