"""Cascade attention of a shared-prefix row on the CPU: the prefix's keys and values read in place, never copied per lesson.

A row is [prefix | lesson 1's own tokens | lesson 2's | ...] (packing.collate_shared_prefix). Every own
token attends to the prefix and, causally, to its own lesson. The output is computed in three
parts by PyTorch's CPU flash-attention kernel, each call returning its log-sum-exp:

  1. the prefix, causal over itself;
  2. all lessons' own queries against the prefix keys, in one call (no mask: every own token sees
     the whole prefix; grouped-query heads are folded into the query rows, so the prefix keys are
     never repeated or copied per lesson);
  3. each lesson's own tokens, causal over themselves, one call per lesson (a batch right-padded to
     the longest lesson cost ~2x the per-lesson path on real rows, whose lessons differ in length:
     bench/cascade_attention.py).

Parts 2 and 3 of an own token are merged by their log-sum-exps (softmax over the union of the two
key sets). Backward calls the kernel's backward for each part with the merged output and
log-sum-exp (the gradient of a softmax over the union, restricted to that part's keys; as ring
and cascade attention do), and adds the prefix keys' gradients of parts 1 and 2.

The per-lesson path it replaces (packing._prefix_segments) copied the prefix's keys and values
and built a mask once per lesson per layer and ran the kernel's slower masked path.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _lesson_spans(bounds: Sequence[int], prefix_len: int) -> list[tuple[int, int]]:
    """(start, end) of each lesson's own tokens in the row, from the row's segment offsets."""
    first = 1 if prefix_len else 0
    return list(zip(bounds[first:-1], bounds[first + 1:]))


def _repeat_heads(t: torch.Tensor, groups: int) -> torch.Tensor:
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


def _sum_heads(t: torch.Tensor, groups: int) -> torch.Tensor:
    return t if groups == 1 else t.unflatten(1, (-1, groups)).sum(2)


def _fold(t: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(1, heads, n, ...) -> (1, kv_heads, groups * n, ...): each key head's query heads as rows."""
    return t.reshape(1, kv_heads, -1, *t.shape[3:])


class _CascadeAttention(torch.autograd.Function):
    """(1, H, T, D) query, (1, KV, T, D) key and value, contiguous -> (1, H, T, D)."""

    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bounds: list[int],
                prefix_len: int, scale: float | None) -> torch.Tensor:
        kv_heads = key.shape[1]
        groups = query.shape[1] // kv_heads
        p = prefix_len
        spans = _lesson_spans(bounds, p)
        outs, lses = [], []
        if p:
            out, lse = _FLASH(query[:, :, :p], _repeat_heads(key[:, :, :p], groups),
                              _repeat_heads(value[:, :, :p], groups), 0.0, True, scale=scale)
            outs.append(out)
            lses.append(lse)
        if spans:
            own = [_FLASH(query[:, :, s:e], _repeat_heads(key[:, :, s:e], groups),
                          _repeat_heads(value[:, :, s:e], groups), 0.0, True, scale=scale) for s, e in spans]
            out, lse = torch.cat([o for o, _ in own], dim=2), torch.cat([x for _, x in own], dim=2)
            if p:
                shared, shared_lse = _FLASH(_fold(query[:, :, p:], kv_heads), key[:, :, :p], value[:, :, :p],
                                            0.0, False, scale=scale)
                shared, shared_lse = shared.reshape(out.shape), shared_lse.reshape(lse.shape)
                merged = torch.logaddexp(shared_lse, lse)
                out = (shared * (shared_lse - merged).exp_().unsqueeze(-1)
                       + out * (lse - merged).exp_().unsqueeze(-1)).to(query.dtype)
                lse = merged
            outs.append(out)
            lses.append(lse)
        out, lse = torch.cat(outs, dim=2), torch.cat(lses, dim=2)
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.spans, ctx.prefix_len, ctx.scale = spans, p, scale
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None, None, None]:
        query, key, value, out, lse = ctx.saved_tensors
        spans, p, scale = ctx.spans, ctx.prefix_len, ctx.scale
        kv_heads = key.shape[1]
        groups = query.shape[1] // kv_heads
        grad = grad.contiguous()
        dq, dk, dv = torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)
        if p:
            gq, gk, gv = _FLASH_BACKWARD(grad[:, :, :p], query[:, :, :p], _repeat_heads(key[:, :, :p], groups),
                                         _repeat_heads(value[:, :, :p], groups), out[:, :, :p], lse[:, :, :p],
                                         0.0, True, scale=scale)
            dq[:, :, :p], dk[:, :, :p], dv[:, :, :p] = gq, _sum_heads(gk, groups), _sum_heads(gv, groups)
        if not spans:
            return dq, dk, dv, None, None, None
        for s, e in spans:
            gq, gk, gv = _FLASH_BACKWARD(grad[:, :, s:e], query[:, :, s:e], _repeat_heads(key[:, :, s:e], groups),
                                         _repeat_heads(value[:, :, s:e], groups), out[:, :, s:e], lse[:, :, s:e],
                                         0.0, True, scale=scale)
            dq[:, :, s:e], dk[:, :, s:e], dv[:, :, s:e] = gq, _sum_heads(gk, groups), _sum_heads(gv, groups)
        if p:
            gq, gk, gv = _FLASH_BACKWARD(_fold(grad[:, :, p:], kv_heads), _fold(query[:, :, p:], kv_heads),
                                         key[:, :, :p], value[:, :, :p], _fold(out[:, :, p:], kv_heads),
                                         _fold(lse[:, :, p:], kv_heads), 0.0, False, scale=scale)
            dq[:, :, p:] += gq.reshape(dq[:, :, p:].shape)
            dk[:, :, :p] += gk
            dv[:, :, :p] += gv
        return dq, dk, dv, None, None, None


def cascade_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bounds: Sequence[int],
                      prefix_len: int, scale: float | None) -> torch.Tensor:
    """Attention of a shared-prefix row on the CPU (see the module docstring).

    query (1, H, T, D), key and value (1, KV, T, D) with H a multiple of KV (grouped-query heads
    h*groups .. h*groups+groups-1 read key head h, as transformers' repeat_kv); bounds the row's
    segment offsets (0, prefix_len, then each lesson's end: collate_shared_prefix's cu_seq_lens;
    prefix_len 0: lessons only, no prefix). Returns (1, H, T, D).
    """
    q, k, v = (t.contiguous() for t in (query, key, value))
    return _CascadeAttention.apply(q, k, v, list(bounds), int(prefix_len), scale)
