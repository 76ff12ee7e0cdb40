"""A peft LoRA adapter as per-tensor deltas, applied a slice of rows at a time.

For a base weight W (out x in) targeted by the adapter, the merged weight is
W + scale * B @ A, with scale = alpha / r (alpha / sqrt(r) with rsLoRA) and
rank/alpha overrides from rank_pattern/alpha_pattern. The sum is computed in
float32 and kept there: the writer rounds it once, to the output type. (peft's
merge_and_unload rounds it to W's dtype first: into a bf16 base, a trained delta
near bf16's step is mostly rounded away before the f16 write, which cost +0.17
held-out loss on SmolLM2 in bench/nf4_export_gap.py.) The exported tensors equal
those of peft's merge into the base loaded in float32, then converted.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

PEFT_PREFIX = "base_model.model."


class UnsupportedAdapter(Exception):
    """The adapter folder holds something lacd cannot merge (not LoRA, DoRA, bias training...)."""


@dataclass(frozen=True)
class LoraPair:
    """One targeted weight: delta = scale * B @ A (for embeddings: scale * (B @ A).T)."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float
    embedding: bool = False

    def delta_rows(self, rows: slice | torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The delta for the given output rows of the weight, in float32 (peft's (B @ A) * scale)."""
        if self.embedding:
            delta = (self.b @ self.a[:, rows]).T
            return (out.copy_(delta) if out is not None else delta).mul_(self.scale)
        return torch.mm(self.b[rows], self.a, out=out).mul_(self.scale)


@dataclass(frozen=True)
class LoraAdapter:
    """All deltas of one adapter, keyed by the base model's tensor name (e.g. model.layers.0.mlp.up_proj.weight)."""

    pairs: dict[str, LoraPair] = field(default_factory=dict)
    replacements: dict[str, torch.Tensor] = field(default_factory=dict)

    def targets(self) -> set[str]:
        """Every base tensor name this adapter changes."""
        return set(self.pairs) | set(self.replacements)


def merge_rows(
    weight_rows: torch.Tensor,
    pair: LoraPair,
    rows: slice | torch.Tensor,
    work: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """weight_rows + delta in float32, not rounded (the output type rounds it once). `work`: two
    float32 buffers shaped like weight_rows, to reuse."""
    delta_out, weight_out = work if work is not None else (None, None)
    delta = pair.delta_rows(rows, out=delta_out)
    weight = weight_out.copy_(weight_rows) if weight_out is not None else weight_rows.float()
    return delta.add_(weight).clone()  # a new tensor: the buffers get reused


def load_adapter(adapter_dir: Path) -> LoraAdapter:
    """Read adapter_config.json + adapter_model.safetensors; raises UnsupportedAdapter for non-LoRA adapters."""
    adapter_dir = Path(adapter_dir)
    config = _read_config(adapter_dir)
    weights_path = adapter_dir / "adapter_model.safetensors"
    if not weights_path.is_file():
        raise UnsupportedAdapter(f"{weights_path} not found (only safetensors adapters are supported)")
    tensors = load_file(str(weights_path))
    pairs, replacements = {}, {}
    for module, parts in _group_by_module(tensors).items():
        if {"lora_A", "lora_B"} <= parts.keys():
            pairs[f"{module}.weight"] = _pair(module, parts["lora_A"], parts["lora_B"], config, False)
        elif {"lora_embedding_A", "lora_embedding_B"} <= parts.keys():
            pairs[f"{module}.weight"] = _pair(module, parts["lora_embedding_A"], parts["lora_embedding_B"], config, True)
        elif set(parts) == {"full"}:
            replacements[module] = parts["full"]
        else:
            raise UnsupportedAdapter(f"adapter tensors for {module!r} are not a LoRA pair: {sorted(parts)}")
    return LoraAdapter(pairs=pairs, replacements=replacements)


def _read_config(adapter_dir: Path) -> dict:
    """adapter_config.json, checked for the features lacd can merge."""
    path = adapter_dir / "adapter_config.json"
    if not path.is_file():
        raise UnsupportedAdapter(f"{path} not found: {adapter_dir} is not a peft adapter folder")
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("peft_type", "LORA") != "LORA":
        raise UnsupportedAdapter(f"adapter type {config['peft_type']!r} is not LoRA")
    for flag in ("use_dora", "fan_in_fan_out"):
        if config.get(flag):
            raise UnsupportedAdapter(f"LoRA adapters with {flag}=true are not supported by the built-in merge")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise UnsupportedAdapter("LoRA adapters that train biases are not supported by the built-in merge")
    return config


def _group_by_module(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Adapter tensors grouped by base module name: {module: {"lora_A": .., "lora_B": ..}} or {"full": ..}."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        match = re.fullmatch(r"(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight|(.+)\.(lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?", name)
        if match:
            module, part = (match.group(1), match.group(2)) if match.group(1) else (match.group(3), match.group(4))
            grouped.setdefault(module, {})[part] = tensor
        elif "lora_" in name:
            raise UnsupportedAdapter(f"unknown LoRA tensor {key!r} in the adapter")
        else:  # modules_to_save: a full copy of the base tensor
            grouped.setdefault(name.replace(".modules_to_save", ""), {})["full"] = tensor
    return grouped


def _pair(module: str, a: torch.Tensor, b: torch.Tensor, config: dict, embedding: bool) -> LoraPair:
    """A LoraPair with peft's scaling for this module (rank from A's shape, alpha from alpha_pattern)."""
    r = a.shape[0]
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return LoraPair(a=a.float(), b=b.float(), scale=scale, embedding=embedding)


def _pattern_value(pattern: dict, module: str, default: float) -> float:
    """peft's rank_pattern/alpha_pattern lookup: first key matching the end of the module name."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default
