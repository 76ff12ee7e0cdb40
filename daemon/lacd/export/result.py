"""What an export returns."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ExportResult:
    """A finished GGUF export: the file, its size, how long it took and how many tensors the adapter changed."""

    path: Path
    n_tensors: int
    bytes_written: int
    seconds: float
    merged_tensors: int
