"""Streaming GGUF writer: the header, keys and tensor table first, then each tensor's data as it is made.

gguf.GGUFWriter normally keeps every tensor in memory until the end. Here all
tensor shapes and types are known up front (from the safetensors headers), so
the table is declared with add_tensor_info and the data written afterwards,
a slice of rows at a time: read from the base file, add the LoRA delta,
reorder Q/K rows, cast, write, forget. Memory stays at a few slices of rows
(Q/K projections are handled whole: their rows are reordered across the tensor).

The file is written as a hidden temporary next to the final path, fsynced and
renamed over it, so a crash never leaves a partial file under the final name.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import gguf
import numpy as np
import torch

from lacd.artifacts import fsync_dir, sweep_leftovers, temporary_sibling
from lacd.export.merge import LoraPair, merge_rows

QT = gguf.GGMLQuantizationType
OUTTYPES = {
    "f32": (gguf.LlamaFileType.ALL_F32, QT.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, QT.F16),
    "bf16": (gguf.LlamaFileType.MOSTLY_BF16, QT.BF16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, QT.Q8_0),
}
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
CHUNK_ELEMENTS = 1 << 21  # rows per slice are chosen so a slice holds about 2M values
WORKERS = max(1, min(4, os.cpu_count() or 1))


@dataclass(frozen=True)
class Source:
    """Where a tensor's bytes live in a safetensors file."""

    path: Path
    offset: int
    nbytes: int
    dtype: torch.dtype


@dataclass(frozen=True)
class TensorJob:
    """One output tensor: where its data comes from and how it is transformed."""

    gguf_name: str
    shape: tuple[int, ...]
    qtype: QT
    source: Source | None = None
    values: torch.Tensor | None = None  # generated or replaced tensors, held in memory
    row_order: np.ndarray | None = None  # Q/K: source row of each output row, within groups of row_group
    row_group: int = 1
    lora: LoraPair | None = None
    replaced: bool = False  # values come from the adapter (modules_to_save), not the base file

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in the GGUF file."""
        return output_nbytes(self.shape, self.qtype)


def output_nbytes(shape: tuple[int, ...], qtype: QT) -> int:
    """Bytes of a tensor of this shape and GGML type."""
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape[:-1], dtype=np.int64)) * shape[-1] // block * type_size


def declare_tensors(writer: gguf.GGUFWriter, jobs: list[TensorJob]) -> None:
    """Add every tensor's name, shape and type to the writer's table (no data)."""
    for job in jobs:
        writer.add_tensor_info(job.gguf_name, job.shape, np.dtype(np.float32), job.nbytes, raw_dtype=job.qtype)


def write_gguf(
    writer: gguf.GGUFWriter,
    jobs: list[TensorJob],
    out_path: Path,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Write header, keys, tensor table and all tensor data to out_path atomically; returns the file size.

    The jobs must already be declared (declare_tensors) and all keys added.
    """
    out_path = Path(out_path)
    sweep_leftovers(out_path.parent, name=out_path.name)  # a killed export's, also outside a run (lacd export)
    tmp_path = temporary_sibling(out_path)
    try:
        _write_to(writer, jobs, tmp_path, progress)
        os.replace(tmp_path, out_path)
    except BaseException:
        writer.close()
        tmp_path.unlink(missing_ok=True)
        raise
    fsync_dir(out_path.parent)
    return out_path.stat().st_size


def _write_to(
    writer: gguf.GGUFWriter, jobs: list[TensorJob], path: Path, progress: Callable[[int, int], None] | None
) -> None:
    """Everything into path, then flush and fsync.

    Slices are computed by a few worker threads (torch and file reads release the GIL)
    while this thread writes finished slices in order; at most 2 x WORKERS slices are in flight.
    """
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    fout = writer.fout[0]
    writer.write_padding(fout, fout.tell())
    done = {"tensors": 0, "bytes": 0}

    def finish(piece: Piece, chunk: np.ndarray) -> None:
        done["bytes"] += fout.write(memoryview(chunk))
        if piece.last:
            if done["bytes"] != piece.job.nbytes:
                raise RuntimeError(f"{piece.job.gguf_name}: wrote {done['bytes']} bytes, expected {piece.job.nbytes}")
            writer.write_padding(fout, done["bytes"])
            done["tensors"], done["bytes"] = done["tensors"] + 1, 0
            if progress is not None:
                progress(done["tensors"], len(jobs))

    with _Files() as files, _single_threaded_torch(), ThreadPoolExecutor(WORKERS) as pool:
        inflight: deque[tuple[Piece, Future]] = deque()
        try:
            for job in jobs:
                for piece in tensor_pieces(job):
                    inflight.append((piece, pool.submit(compute, piece, files)))
                    if len(inflight) > 2 * WORKERS:
                        finish(*_result(inflight.popleft()))
            while inflight:
                finish(*_result(inflight.popleft()))
        finally:
            for _, future in inflight:
                future.cancel()
    fout.flush()
    os.fsync(fout.fileno())
    writer.close()


def _result(item: tuple[Piece, Future]) -> tuple[Piece, np.ndarray]:
    """Wait for a slice's bytes."""
    piece, future = item
    return piece, future.result()


@dataclass(frozen=True)
class Piece:
    """Rows start:stop of one output tensor; `last` marks the tensor's final slice."""

    job: TensorJob
    start: int
    stop: int
    last: bool


def tensor_pieces(job: TensorJob) -> list[Piece]:
    """The slices a tensor is made in: about CHUNK_ELEMENTS values each, whole heads for Q/K."""
    n_rows, group = job.shape[0], job.row_group
    step = max(group, CHUNK_ELEMENTS // _row_len(job.shape) // group * group)
    starts = range(0, n_rows, step)
    return [Piece(job, start, min(n_rows, start + step), start + step >= n_rows) for start in starts]


def compute(piece: Piece, files: "_Files") -> np.ndarray:
    """The output bytes of one slice: rows read, LoRA-merged, Q/K-reordered, cast or quantized."""
    job, start, stop = piece.job, piece.start, piece.stop
    rows = _read_rows(job, files, start, stop)
    index: slice | torch.Tensor = slice(start, stop)
    if job.row_order is not None:  # the slice holds whole heads, so its source rows are inside it
        index = torch.from_numpy(job.row_order[start:stop])
        rows = rows[index - start]
    if job.lora is not None:
        rows = merge_rows(rows, job.lora, index, _scratch(rows.shape))
    return _convert(rows, job.qtype)


_SCRATCH = threading.local()


def _scratch(shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """Two float32 work buffers of this shape, kept per worker thread (no page faults for each slice)."""
    size = int(np.prod(shape))
    buffers = getattr(_SCRATCH, "buffers", None)
    if buffers is None or buffers[0].numel() < size:
        buffers = _SCRATCH.buffers = (torch.empty(size), torch.empty(size))
    return buffers[0][:size].view(shape), buffers[1][:size].view(shape)


def _row_len(shape: tuple[int, ...]) -> int:
    """Values per row (dimension 0 indexes rows; a 1-D tensor has rows of one value)."""
    return int(np.prod(shape[1:], dtype=np.int64))


def _read_rows(job: TensorJob, files: "_Files", start: int, stop: int) -> torch.Tensor:
    """Rows start:stop of the job's input, from memory (generated/replaced tensors) or its file."""
    if job.values is not None:
        return job.values[start:stop].clone()
    source = job.source
    row_bytes = _row_len(job.shape) * torch.empty((), dtype=source.dtype).element_size()
    buffer = _read_at(files.fd(source.path), source.offset + start * row_bytes, (stop - start) * row_bytes)
    return torch.frombuffer(buffer, dtype=source.dtype).reshape((stop - start, *job.shape[1:]))


def _convert(rows: torch.Tensor, qtype: QT) -> np.ndarray:
    """Rows cast (or quantized) to the GGML type, as a contiguous numpy array of the file bytes."""
    if qtype == QT.F32:
        return rows.float().contiguous().numpy()
    if qtype == QT.F16:
        return rows.to(torch.float16).contiguous().numpy()
    if qtype == QT.BF16:
        return rows.to(torch.bfloat16).contiguous().view(torch.int16).numpy()
    return gguf.quants.quantize(rows.float().numpy(), qtype)


class _Files:
    """Read-only descriptors of the source files, shared by the worker threads (reads use pread)."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> "_Files":
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def fd(self, path: Path) -> int:
        """The descriptor for path, opened on first use."""
        with self._lock:
            if path not in self._fds:
                self._fds[path] = os.open(path, os.O_RDONLY)
            return self._fds[path]


def _read_at(fd: int, offset: int, size: int) -> bytearray:
    """Exactly size bytes from offset (no mmap: mapped pages would count in RSS until unmapped)."""
    buffer = bytearray(size)
    view, done = memoryview(buffer), 0
    while done < size:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise OSError(f"unexpected end of file at byte {offset + done}")
        done += got
    return buffer


@contextmanager
def _single_threaded_torch() -> Iterator[None]:
    """One intra-op thread per torch call while the export runs (the workers give the parallelism)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
