"""What the built-in exporter knows about model architectures.

Only the Llama family (LlamaForCausalLM, which covers Llama 2/3, CodeLlama and
SmolLM2, and MistralForCausalLM) is written natively; both map to GGUF
architecture ``llama``. The hyperparameter keys, tensor names, the Q/K row
permutation and the Llama 3 rope factors follow llama.cpp's
convert_hf_to_gguf.py so that the output is the same file it would write.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
GGUF_ARCH = gguf.MODEL_ARCH.LLAMA

# tensors llama.cpp never reads (the converter drops them too)
SKIPPED_SUFFIXES = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")


class UnsupportedArchitecture(Exception):
    """The model's architecture is not one the built-in GGUF writer handles."""

    def __init__(self, architecture: str):
        self.architecture = architecture
        super().__init__(
            f"lacd's built-in GGUF export does not support the architecture {architecture!r} "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)}). "
            'Set [export] converter = "llama.cpp" and [export] llama_cpp_convert = '
            '"/path/to/convert_hf_to_gguf.py" to merge into a temporary folder and convert it with llama.cpp.'
        )


@dataclass(frozen=True)
class ModelSpec:
    """The hyperparameters of a Llama-family model, as read from config.json."""

    architecture: str
    n_layers: int
    n_head: int
    n_head_kv: int
    hidden_size: int
    vocab_size: int
    hparams: dict[str, Any] = field(repr=False, hash=False, compare=False)

    @property
    def head_dim(self) -> int:
        """Per-head size: config's head_dim when given, else hidden_size / n_head."""
        return self.hparams.get("head_dim") or self.hidden_size // self.n_head


def read_spec(base_dir: Path) -> ModelSpec:
    """Read config.json and check the architecture; raises UnsupportedArchitecture."""
    config_path = Path(base_dir) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: {base_dir} is not a Hugging Face model folder")
    hparams = json.loads(config_path.read_text(encoding="utf-8"))
    architecture = (hparams.get("architectures") or [hparams.get("model_type", "unknown")])[0]
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitecture(architecture)
    n_head = hparams["num_attention_heads"]
    return ModelSpec(
        architecture=architecture,
        n_layers=hparams["num_hidden_layers"],
        n_head=n_head,
        n_head_kv=hparams.get("num_key_value_heads") or n_head,
        hidden_size=hparams["hidden_size"],
        vocab_size=hparams["vocab_size"],
        hparams=hparams,
    )


def rope_parameters(hparams: dict[str, Any]) -> dict[str, Any]:
    """Rope settings in one dict, from transformers 5 `rope_parameters` or 4.x `rope_theta` + `rope_scaling`."""
    params = dict(hparams.get("rope_parameters") or hparams.get("rope_scaling") or {})
    if "rope_theta" not in params and hparams.get("rope_theta") is not None:
        params["rope_theta"] = hparams["rope_theta"]
    if "rope_type" not in params and params.get("type") is not None:
        params["rope_type"] = params["type"]
    return params


def add_hparams(writer: gguf.GGUFWriter, spec: ModelSpec, file_type: gguf.LlamaFileType) -> None:
    """Write the llama.* keys llama.cpp reads, in the converter's order."""
    hp = spec.hparams
    writer.add_block_count(spec.n_layers)
    if hp.get("max_position_embeddings") is not None:
        writer.add_context_length(hp["max_position_embeddings"])
    writer.add_embedding_length(spec.hidden_size)
    writer.add_feed_forward_length(hp["intermediate_size"])
    writer.add_head_count(spec.n_head)
    writer.add_head_count_kv(spec.n_head_kv)
    _add_rope_scaling(writer, rope_parameters(hp))
    writer.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    if hp.get("head_dim") is not None:
        writer.add_key_length(hp["head_dim"])
        writer.add_value_length(hp["head_dim"])
    writer.add_file_type(file_type)
    writer.add_vocab_size(spec.vocab_size)
    writer.add_rope_dimension_count(spec.head_dim)


_YARN_EXTRAS = {
    "extrapolation_factor": "add_rope_scaling_yarn_ext_factor",
    "attention_factor": "add_rope_scaling_yarn_attn_factor",
    "beta_fast": "add_rope_scaling_yarn_beta_fast",
    "beta_slow": "add_rope_scaling_yarn_beta_slow",
}


def _add_rope_scaling(writer: gguf.GGUFWriter, rope: dict[str, Any]) -> None:
    """Rope scaling type/factor (linear, yarn) and theta; llama3 scaling becomes the rope_freqs tensor."""
    rope_type, factor = rope.get("rope_type"), rope.get("factor")
    if rope_type == "linear" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(factor)
    elif rope_type == "yarn" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(factor)
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        for key, add in _YARN_EXTRAS.items():
            if rope.get(key) is not None:
                getattr(writer, add)(rope[key])
    if rope.get("rope_theta") is not None:
        writer.add_rope_freq_base(rope["rope_theta"])


def llama3_rope_factors(spec: ModelSpec) -> np.ndarray | None:
    """The rope_freqs tensor llama.cpp needs for Llama 3.1+ `llama3` rope scaling, else None."""
    rope = rope_parameters(spec.hparams)
    if str(rope.get("rope_type", "")).lower() != "llama3":
        return None
    base, dim = rope.get("rope_theta", 10000.0), spec.head_dim
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


class TensorNames:
    """Maps Hugging Face tensor names to GGUF names for one model."""

    def __init__(self, spec: ModelSpec):
        self._map = gguf.get_tensor_name_map(GGUF_ARCH, spec.n_layers)

    def gguf_name(self, hf_name: str) -> str:
        """GGUF name of an HF tensor; ValueError for a tensor llama.cpp does not know."""
        name = self._map.get_name(key=hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"cannot map tensor {hf_name!r} to a GGUF name")
        return name


def qk_heads(hf_name: str, spec: ModelSpec) -> int | None:
    """Number of heads of a q_proj/k_proj tensor (whose rows llama.cpp wants reordered), None for others."""
    if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        return spec.n_head
    if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        return spec.n_head_kv
    return None


def qk_row_order(hf_name: str, n_rows: int, spec: ModelSpec) -> np.ndarray | None:
    """Source row for each output row of q_proj/k_proj (llama.cpp's rope layout), None for other tensors.

    HF stores each head's rotary halves as [x0..x(d/2-1), y0..]; GGUF wants them
    interleaved. This is convert_hf_to_gguf's `permute`, expressed as a row index
    so it can be applied to any slice of whole heads.
    """
    n_head = qk_heads(hf_name, spec)
    if n_head is None:
        return None
    rows = np.arange(n_rows).reshape(n_head, 2, n_rows // n_head // 2)
    return rows.swapaxes(1, 2).reshape(n_rows)
