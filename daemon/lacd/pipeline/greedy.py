"""Greedy decoding of many prompts over one shared prefix's key/value cache (the evaluate stage's generator).

What ``model.generate`` does for greedy search, without its per-step machinery, for prompts that
share a long prefix (the agent's system prompt, ~790 of ~800 tokens on real held-out prompts):

- the prefix is computed once (``prefix_cache``) and every batch starts from it: rows are laid
  out as ``[prefix | left padding | own tokens]``, the padding hidden by the attention mask and
  the position ids continuing from the prefix, as if each prompt were computed alone;
- only the last position's logits are computed (``logits_to_keep=1``), the next token is their
  argmax (what greedy search takes: no logits processor changes the argmax of plain greedy
  decoding without repetition penalties);
- a row ends at its stop token, at a stop string (``done(tokens)`` says so), or at the token
  budget, and is dropped from the batch and its cache at once, so the rest decode with fewer rows.

The tokens are those of greedy decoding each prompt alone, up to floating-point rounding of the
batched matrix products (tests/test_evaluate.py compares them with ``model.generate``).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from lacd.pipeline.memplan import Shape


def cache_bytes_per_token(model: Any) -> int:
    """Bytes of key/value cache one token takes in `model` (every layer's keys and values)."""
    shape = Shape.of(model.config.get_text_config(decoder=True))
    return shape.kv_cache_bytes_per_token(next(model.parameters()).element_size())


def prefix_cache(model: Any, prefix: Sequence[int], device: Any) -> DynamicCache:
    """The key/value cache of one token sequence (batch of 1)."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([list(prefix)], device=device), use_cache=True, logits_to_keep=1)
    return out.cache


class _GrowingLayer(DynamicLayer):
    """A DynamicLayer whose keys and values live in buffers with room for `room` more tokens: a decoding
    step writes its token in place, where DynamicLayer copies the whole cache (torch.cat) every step."""

    def __init__(self, room: int) -> None:
        super().__init__()
        self.room = room

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self.device, self.length, self.is_initialized = key_states.device, 0, True
            self.key_buffer = self.value_buffer = None
        end = self.length + key_states.shape[-2]
        if self.key_buffer is None or end > self.key_buffer.shape[-2]:
            self.key_buffer = self._grown(self.key_buffer, key_states, end + self.room)
            self.value_buffer = self._grown(self.value_buffer, value_states, end + self.room)
        self.key_buffer[:, :, self.length : end] = key_states
        self.value_buffer[:, :, self.length : end] = value_states
        self.length = end
        self._views()
        return self.keys, self.values

    def _grown(self, buffer: torch.Tensor | None, like: torch.Tensor, size: int) -> torch.Tensor:
        shape = (like.shape[0], like.shape[1], size, like.shape[3])
        grown = like.new_empty(shape)
        if buffer is not None:
            grown[:, :, : self.length] = buffer[:, :, : self.length]
        return grown

    def _views(self) -> None:
        self.keys = self.key_buffer[:, :, : self.length]
        self.values = self.value_buffer[:, :, : self.length]

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
            self._views()


def _batch_cache(shared: DynamicCache | None, rows: int, layers: int, room: int) -> Cache:
    """A fresh cache holding the shared prefix once per row, with room for `room` more tokens a row
    (the shared cache is left as it is)."""
    cache = Cache(layers=[_GrowingLayer(room) for _ in range(layers)])
    if shared is not None:
        for index, prefix in enumerate(shared.layers):
            cache.update(prefix.keys.expand(rows, -1, -1, -1), prefix.values.expand(rows, -1, -1, -1), index)
    return cache


def greedy(
    model: Any,
    prompts: Sequence[Sequence[int]],
    max_new: int,
    stop_ids: Sequence[int],
    *,
    prefix: int = 0,
    shared: DynamicCache | None = None,
    pad: int = 0,
    done: Callable[[list[int]], bool] | None = None,
) -> list[list[int]]:
    """The greedy continuation of each prompt (one batch), each ending with its stop token if one came.

    prefix/shared: every prompt starts with the same `prefix` tokens whose cache is `shared`
    (prefix_cache); each prompt must keep at least one token of its own. done(tokens): True when a
    row's new tokens already hold a stop string (the row is then finished like at a stop token).
    """
    device = next(model.parameters()).device
    own = [list(p[prefix:]) for p in prompts]
    if any(not ids for ids in own):
        raise ValueError("every prompt needs at least one token after the shared prefix")
    if bool(prefix) != (shared is not None):
        raise ValueError("a shared prefix needs both its length and its cache")
    width = max(len(ids) for ids in own)
    pads = [width - len(ids) for ids in own]
    input_ids = torch.tensor([[pad] * n + ids for n, ids in zip(pads, own)], device=device)
    mask = torch.tensor([[1] * prefix + [0] * n + [1] * len(ids) for n, ids in zip(pads, own)], device=device)
    shift = torch.tensor(pads, device=device)[:, None]
    positions = (prefix + torch.arange(width, device=device)[None, :] - shift).clamp(min=prefix)
    layers = model.config.get_text_config(decoder=True).num_hidden_layers
    cache = _batch_cache(shared, len(own), layers, width + max_new)
    stops = torch.tensor(list(stop_ids), device=device)
    rows = list(range(len(own)))  # prompt index of each live row
    out: list[list[int]] = [[] for _ in own]
    step = 0
    with torch.no_grad():
        while rows and step < max_new:
            length = mask.shape[1]
            logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=cache,
                           cache_position=torch.arange(length - input_ids.shape[1], length, device=device),
                           use_cache=True, logits_to_keep=1).logits
            tokens = logits[:, -1, :].argmax(dim=-1)
            step += 1
            stopped = torch.isin(tokens, stops).tolist()
            keep = []
            for row, (index, token) in enumerate(zip(rows, tokens.tolist())):
                out[index].append(token)
                if not (stopped[row] or step >= max_new or (done is not None and done(out[index]))):
                    keep.append(row)
            if len(keep) < len(rows):
                if not keep:
                    break
                chosen = torch.tensor(keep, device=device)
                cache.batch_select_indices(chosen)
                tokens, mask, positions = tokens[chosen], mask[chosen], positions[chosen]
                rows = [rows[row] for row in keep]
            input_ids = tokens[:, None]
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
            positions = positions[:, -1:] + 1
    return out
