"""Benchmark: host memory while an Ollama-style CodeLlama-7B Q4_0 GGUF becomes a base folder.

    PYTHONPATH=daemon python bench/gguf_load.py [--shape 7b|tiny] [--work DIR] [--keep]

Writes a GGUF of CodeLlama-7B's shape (32 layers, hidden 4096, 32016-token SentencePiece vocabulary,
Q4_0 weights with random blocks, Q8_0 output: tests/tiny_gguf.py), then converts it in a child
process exactly as ``[model] base = ollama:codellama`` does (lacd.basemodel.convert_gguf: tensor by
tensor into 1 GB bf16 safetensors shards) and prints the child's peak RSS (ru_maxrss), its time,
and the peak RSS of a child that only imports what the conversion imports (the floor). The train
stage then streams that folder into the GPU one tensor at a time (lacd.pipeline.nf4).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from tiny_gguf import CODELLAMA_7B, TINY, write_codellama_gguf  # noqa: E402

CONVERT = "from pathlib import Path; import sys; from lacd.basemodel import convert_gguf; " \
          "convert_gguf(Path(sys.argv[1]), Path(sys.argv[2]))"
IMPORTS = "import torch, transformers, gguf, safetensors, accelerate, lacd.basemodel"


def child_peak(code: str, *args: str) -> tuple[float, float]:
    """(peak RSS in GiB, seconds) of `python -c code args` (a fresh child, so its own peak)."""
    env_path = str(ROOT / "daemon")
    started = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    subprocess.run([sys.executable, "-c", code, *args], check=True,
                   env={**__import__("os").environ, "PYTHONPATH": env_path})
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the largest child so far (KiB)
    return round(max(peak, before) / 2**20, 2), round(time.perf_counter() - started, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=["7b", "tiny"], default="7b")
    parser.add_argument("--work", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep the GGUF and the converted folder")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="lacd-gguf-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        floor, _ = child_peak(IMPORTS)
        started = time.perf_counter()
        gguf_file = write_codellama_gguf(work / "codellama-7b-q4_0.gguf",
                                         CODELLAMA_7B if args.shape == "7b" else TINY, random_blocks=True)
        written = time.perf_counter() - started
        peak, seconds = child_peak(CONVERT, str(gguf_file), str(work / "base"))
        folder_bytes = sum(p.stat().st_size for p in (work / "base").iterdir())
        print(json.dumps(dict(shape=args.shape, gguf_gib=round(gguf_file.stat().st_size / 2**30, 2),
                              gguf_write_s=round(written, 1), convert_peak_rss_gib=peak, convert_s=seconds,
                              import_floor_rss_gib=floor, folder_gib=round(folder_bytes / 2**30, 2))))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
