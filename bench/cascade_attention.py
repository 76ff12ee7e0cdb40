"""One decoder layer's shared-prefix attention, forward + backward, on the CPU: cascade attention
(pipeline/cascade.py, what training uses) against the per-lesson path it replaced
(packing._prefix_segments), on rows packed as the train stage packs them (lessons until the token
budget), and cascade again on the same tokens split into lessons of equal length (what unequal
lessons cost; until this bench found it, cascade ran every lesson in one batch padded to the
row's longest lesson, ~2x slower than the per-lesson path on real rows).

    PYTHONPATH=daemon python bench/cascade_attention.py --dataset STATE/runs/N/dataset --rows 3
    PYTHONPATH=daemon python bench/cascade_attention.py --own 90 --rows 3   # lessons of 90 own tokens

SmolLM2-135M's attention shape by default (9 query heads, 3 key/value heads, 64 dims), random
tensors in --dtype (bfloat16: what the train stage uses on a CPU with native bf16; float32
elsewhere): the kernels' time depends on the shapes and the dtype only. Prints one line a row.
"""

from __future__ import annotations

import argparse
import os
import random
import time

import torch

from lacd.pipeline.cascade import cascade_attention
from lacd.pipeline.packing import _prefix_segments


def own_lengths(args: argparse.Namespace) -> list[int]:
    """Each training lesson's own tokens (its length less the shared prefix)."""
    if not args.dataset:
        return [args.own] * 200
    from datasets import load_from_disk

    from lacd.pipeline.packing import common_prefix_length

    ids = load_from_disk(args.dataset)["train"]["input_ids"]
    prefix = common_prefix_length(ids)
    if prefix != args.prefix:
        print(f"the dataset's lessons share {prefix} tokens; using that as the prefix")
        args.prefix = prefix
    return [len(x) - prefix for x in ids if len(x) > prefix]


def pack_row(owns: list[int], prefix: int, budget: int) -> list[int]:
    row: list[int] = []
    for own in owns:
        if row and prefix + sum(row) + own > budget:
            break
        row.append(own)
    return row


def timed(path: str, owns: list[int], args: argparse.Namespace) -> float:
    bounds = [0, args.prefix]
    for own in owns:
        bounds.append(bounds[-1] + own)
    total = bounds[-1]
    dtype = getattr(torch, args.dtype)
    q = torch.randn(1, args.heads, total, args.dim, dtype=dtype, requires_grad=True)
    k = torch.randn(1, args.kv_heads, total, args.dim, dtype=dtype, requires_grad=True)
    v = torch.randn(1, args.kv_heads, total, args.dim, dtype=dtype, requires_grad=True)
    start = time.perf_counter()
    if path == "cascade":
        out = cascade_attention(q, k, v, bounds, args.prefix, None)
    else:
        flat = [t[0].transpose(0, 1) for t in (q, k, v)]
        out = _prefix_segments(*flat, torch.tensor(bounds), args.prefix, None)
    out.sum().backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", help="a run's dataset folder (lacd's format stage output)")
    parser.add_argument("--own", type=int, default=90, help="without --dataset: own tokens of every lesson")
    parser.add_argument("--prefix", type=int, default=788, help="without --dataset: the shared prefix's tokens")
    parser.add_argument("--budget", type=int, default=4096, help="tokens of a row ([train] tokens_per_batch)")
    parser.add_argument("--rows", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    owns = own_lengths(args)
    rng = random.Random(args.seed)
    timed("cascade", owns[:2], args)  # warm-up
    for _ in range(args.rows):
        row = pack_row(rng.sample(owns, min(len(owns), 64)), args.prefix, args.budget)
        equal = [sum(row) // len(row)] * len(row)
        cascade, per_lesson, even = (timed(p, r, args) for p, r in
                                     (("cascade", row), ("per-lesson", row), ("cascade", equal)))
        print(f"{len(row)} lessons, own tokens max {max(row)} mean {sum(row) // len(row)}, row {args.prefix + sum(row)}: "
              f"cascade {cascade:.2f} s, per-lesson {per_lesson:.2f} s, cascade on equal lengths {even:.2f} s "
              f"(load {os.getloadavg()[0]:.1f})", flush=True)


if __name__ == "__main__":
    main()
