"""The list of output tensors: names, shapes, GGML types and where each one's data comes from.

Built from the safetensors headers alone (no tensor data is read), in the order
llama.cpp's converter writes them: generated tensors (rope_freqs) first, then
each weight file in sorted order, tensors sorted by name.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch

from lacd.export.arch import (
    SKIPPED_SUFFIXES,
    ModelSpec,
    TensorNames,
    llama3_rope_factors,
    qk_heads,
    qk_row_order,
)
from lacd.export.merge import LoraAdapter, UnsupportedAdapter
from lacd.export.writer import QT, SAFETENSORS_DTYPES, Source, TensorJob

Q8_BLOCK = gguf.GGML_QUANT_SIZES[QT.Q8_0][0]


def weight_files(base_dir: Path) -> list[Path]:
    """The model's safetensors files: those named by the index, else model*.safetensors, sorted."""
    index = base_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    else:
        names = sorted(p.name for p in base_dir.glob("model*.safetensors"))
    if not names:
        raise FileNotFoundError(
            f"no safetensors weights in {base_dir} (pytorch_model.bin folders need the llama.cpp converter)"
        )
    return [base_dir / name for name in names]


def plan_tensors(base_dir: Path, spec: ModelSpec, outtype: QT, adapter: LoraAdapter | None) -> list[TensorJob]:
    """One TensorJob per output tensor; checks that every adapter target exists in the base model."""
    names = TensorNames(spec)
    jobs = []
    if (factors := llama3_rope_factors(spec)) is not None:
        jobs.append(TensorJob("rope_freqs.weight", factors.shape, QT.F32, values=torch.from_numpy(factors)))
    adapter = adapter or LoraAdapter()
    seen = set()
    for path in weight_files(Path(base_dir)):
        with gguf.utility.SafetensorsLocal(path) as tensors:
            for hf_name, local in tensors.items():
                if hf_name.endswith(SKIPPED_SUFFIXES):
                    continue
                seen.add(hf_name)
                jobs.append(_job(hf_name, local, spec, names, outtype, adapter))
    missing = adapter.targets() - seen
    if missing:
        raise UnsupportedAdapter(f"the adapter changes tensors the base model does not have: {sorted(missing)}")
    return jobs


def _job(hf_name: str, local, spec: ModelSpec, names: TensorNames, outtype: QT, adapter: LoraAdapter) -> TensorJob:
    """The job for one base tensor."""
    if local.dtype not in SAFETENSORS_DTYPES:
        raise ValueError(f"tensor {hf_name!r} has dtype {local.dtype}; only F32, F16 and BF16 are supported")
    gguf_name = names.gguf_name(hf_name)
    shape = tuple(local.shape)
    source = Source(local.data_range.filename, local.data_range.offset, local.data_range.size,
                    SAFETENSORS_DTYPES[local.dtype])
    values = adapter.replacements.get(hf_name)
    return TensorJob(
        gguf_name=gguf_name,
        shape=shape,
        qtype=tensor_type(gguf_name, shape, outtype),
        source=None if values is not None else source,
        values=values.to(source.dtype) if values is not None else None,
        row_order=qk_row_order(hf_name, shape[0], spec),
        row_group=shape[0] // (qk_heads(hf_name, spec) or shape[0]),
        lora=adapter.pairs.get(hf_name),
        replaced=values is not None,
    )


def tensor_type(gguf_name: str, shape: tuple[int, ...], outtype: QT) -> QT:
    """The converter's rule: 1-D tensors, norms and biases stay F32; Q8_0 needs rows divisible by 32."""
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight"):
        return QT.F32
    if outtype == QT.Q8_0 and shape[-1] % Q8_BLOCK:
        return QT.F16
    return outtype


def parameter_count(jobs: list[TensorJob]) -> int:
    """Total number of values in all tensors."""
    return int(sum(np.prod(job.shape, dtype=np.int64) for job in jobs))
