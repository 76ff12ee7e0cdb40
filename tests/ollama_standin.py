"""A stand-in for the Ollama server, for tests: the REST endpoints lacd uses, as Ollama's docs/api.md
documents them, over a stdlib ThreadingHTTPServer bound to 127.0.0.1.

In-process (pytest)::

    with StandIn(tmp_path / "ollama") as server:
        client = ollama.Client(host=server.host)
        ...
        server.requests        # every request: method, path, JSON body (blob bytes left out)

As its own process, so a test can kill it to simulate "Ollama down" and start it again on the same
port and store::

    python tests/ollama_standin.py --port 18000 --store /tmp/store [--engine llamacpp] [--threads N]
    proc = start_process(store, port)       # waits until the port answers

Two engines generate (``--engine``, ``StandIn(engine=...)``, else ``$STANDIN_ENGINE``, else transformers):
- ``transformers`` (the default; CI's): the GGUF dequantized to fp32 and run by transformers (slow to
  load: ~19 s for a 135M model), ``--threads`` torch threads (default 1);
- ``llamacpp``: llama.cpp, the engine inside Ollama, through node-llama-cpp (tests/llamacpp/serve.mjs,
  a child process; needs node and ``npm ci`` in tests/llamacpp): the registered file as it is, one
  model and one context kept loaded, the prompt prefix shared with the request before not evaluated
  again (whole batches of it: see serve.mjs), ``--threads`` llama.cpp threads (default 2).

State lives under the store folder: ``blobs/sha256-<hex>`` (like Ollama's own blob store),
``manifests/<name>.json`` (one per model tag) and ``requests.jsonl`` (the request log, in both modes).

What is real and what is not:
- blobs are verified against their digest; create checks that every file's blob exists, reads the
  GGUF metadata and tensor table with the ``gguf`` package and checks that every tensor's data lies
  inside the file (llama.cpp's own check when it loads a model);
- ``quantize`` accepts what Ollama's ``ParseFileType`` accepts (F32, F16, BF16, Q8_0, Q4_K_S, Q4_K_M,
  and Q4_K for Q4_K_M), only from F32/F16/BF16 files, with Ollama's messages, and is APPLIED: the
  quantized file becomes a new blob and the model. With node-llama-cpp installed in
  tests/llamacpp (as CI does) it is llama.cpp's own ``llama_model_quantize``, called through
  ctypes: the bytes Ollama's quantizer writes, per-tensor types and fallbacks included. Without
  it, gguf-py: Q8_0 blocks exactly as llama.cpp writes them, and for Q4_K_M/Q4_K_S Q4_0 blocks
  (gguf-py has no Q4_K quantizer: the same 4.5 bits per weight, not llama.cpp's bytes) under the
  file type Ollama would report; 1-D tensors (norms) and rows that are not a whole number of
  32-value blocks stay as they are;
- ``parameters`` are stored as sent (Ollama's /api/create does not check them) and checked where
  Ollama checks them, when a model is loaded for /api/generate or /api/chat (``Options.FromMap``:
  "option "num_ctx" must be of type integer", 500); unknown options are ignored, as Ollama does;
- ``adapters`` (a LoRA GGUF Ollama would apply at load) are refused: the stand-in cannot apply them;
- /api/copy, /api/delete, /api/show, /api/tags answer and refuse as Ollama's handlers do (a copy
  shares the source's manifest and digest; a delete keeps blobs another model still uses);
- TEMPLATEs that use .Messages (every template Ollama ships, and lacd's) are rendered by
  tests/gotemplate, Go's own text/template filled as Ollama fills it, built once with the local
  ``go``; a TEMPLATE Go cannot parse is refused at create with 400, as Ollama does. Older
  templates are filled here only when made of {{ .System }}, {{ .Prompt }} and {{ .Response }};
- /api/generate and /api/chat load the registered GGUF in the engine and decode greedily;
  ``num_predict`` (default 32 here, unlimited in Ollama) and ``stop`` are honoured. transformers
  ignores temperature, top_k, seed, repeat_penalty, num_ctx and similar options; llama.cpp honours
  num_ctx and num_batch, samples when temperature is above 0 and applies a repeat penalty only when
  one is set (llamacpp_options). Both report prompt_eval_count as Ollama does: the whole prompt's tokens.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterable, Iterator
from urllib.parse import quote, unquote, urlsplit

import numpy as np

DEFAULT_NUM_PREDICT = 32
DEFAULT_NUM_CTX = 4096  # Ollama's context size when num_ctx is not set
DEFAULT_NUM_BATCH = 512  # Ollama's prompt batch size when num_batch is not set
DEFAULT_KEEP_ALIVE_S = 300.0
QUANTIZABLE = ("F32", "F16", "BF16")
QUANTIZE_TYPES = {"F32": "F32", "F16": "F16", "Q8_0": "Q8_0", "Q4_K_S": "Q4_K_S", "Q4_K_M": "Q4_K_M",
                  "Q4_K": "Q4_K_M", "BF16": "BF16"}  # Ollama's ggml.ParseFileType  # fmt: skip
SUPPORTED_QUANTIZE = "F32, F16, Q4_K_S, Q4_K_M, Q8_0"  # as Ollama's message lists them
BLOCKS = {"F32": "F32", "F16": "F16", "BF16": "BF16", "Q8_0": "Q8_0", "Q4_K_S": "Q4_0", "Q4_K_M": "Q4_0"}
"""The ggml tensor type the stand-in writes for each file type (gguf-py cannot write Q4_K)."""
FILE_TYPES = {"F32": 0, "F16": 1, "Q8_0": 7, "Q4_K_S": 14, "Q4_K_M": 15, "BF16": 32}  # llama_ftype
OPTION_TYPES = {
    **dict.fromkeys(("num_keep", "seed", "num_predict", "top_k", "repeat_last_n", "num_ctx", "num_batch",
                     "num_gpu", "main_gpu", "num_thread", "draft_num_predict"), "integer"),
    **dict.fromkeys(("top_p", "min_p", "typical_p", "temperature", "repeat_penalty", "presence_penalty",
                     "frequency_penalty"), "float32"),
    "use_mmap": "boolean", "stop": "array",
}  # api.Options and api.Runner fields by JSON name, as FromMap sees them  # fmt: skip
_DIGEST = re.compile(r"^sha256:([0-9a-f]{64})$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*:[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")


class ApiError(Exception):
    """An error answered as ``{"error": message}`` with an HTTP status, as Ollama does."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def now_iso() -> str:
    """The current time as RFC 3339, the way Ollama writes timestamps."""
    return datetime.now(timezone.utc).isoformat()


def normalize_name(name: Any) -> str:
    """``name`` -> ``name:latest``; 400 for names Ollama would refuse."""
    if not isinstance(name, str) or not name.strip():
        raise ApiError(400, "model is required")
    name = name.strip()
    if ":" not in name.rsplit("/", 1)[-1]:
        name += ":latest"
    if not _NAME.match(name):
        raise ApiError(400, f'name "{name}" is invalid')
    return name


def blob_hex(digest: str) -> str:
    """The hex part of ``sha256:<hex>``; 400 for any other form."""
    match = _DIGEST.match(digest or "")
    if not match:
        raise ApiError(400, f'invalid digest format "{digest}"')
    return match.group(1)


# --------------------------------------------------------------------------- store on disk


class Store:
    """Blobs by digest and one JSON manifest per model tag, under one folder that survives restarts."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.manifests = self.root / "manifests"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.manifests.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()

    def blob_path(self, digest: str) -> Path:
        """Where the blob with this digest lives (whether or not it exists)."""
        return self.blobs / f"sha256-{blob_hex(digest)}"

    def write_blob(self, digest: str, chunks: Iterable[bytes]) -> int:
        """Stream chunks into the store, hashing as they come; 400 when the digest does not match."""
        target = self.blob_path(digest)
        sha = hashlib.sha256()
        size = 0
        fd, tmp = tempfile.mkstemp(dir=self.blobs, prefix=".upload-")
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                sha.update(chunk)
                out.write(chunk)
                size += len(chunk)
        actual = f"sha256:{sha.hexdigest()}"
        if actual != digest:
            os.unlink(tmp)
            raise ApiError(400, f'digest mismatch, expected "{digest}", got "{actual}"')
        os.replace(tmp, target)
        return size

    def _manifest_path(self, name: str) -> Path:
        return self.manifests / (quote(name, safe="") + ".json")

    def get(self, name: str) -> dict:
        """The manifest of a model tag; 404 when there is none."""
        path = self._manifest_path(name)
        if not path.exists():
            raise ApiError(404, f"model '{name}' not found")
        return json.loads(path.read_text(encoding="utf-8"))

    def put(self, name: str, manifest: dict) -> None:
        """Write a manifest atomically."""
        path = self._manifest_path(name)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        os.replace(tmp, path)

    def delete(self, name: str) -> None:
        """Remove a tag, and its GGUF blob when no other tag uses it (Ollama prunes unused layers)."""
        manifest = self.get(name)
        self._manifest_path(name).unlink()
        if not any(m["model"] == manifest["model"] for m in self.all()):
            self.blob_path(manifest["model"]).unlink(missing_ok=True)

    def all(self) -> list[dict]:
        """Every manifest, sorted by name."""
        paths = sorted(self.manifests.glob("*.json"))
        return [json.loads(p.read_text(encoding="utf-8")) for p in paths]

    def log_request(self, entry: dict) -> None:
        """Append one request to requests.jsonl."""
        with self.lock, open(self.root / "requests.jsonl", "a", encoding="utf-8") as log:
            log.write(json.dumps(entry) + "\n")


def read_request_log(store: Path) -> list[dict]:
    """The requests a stand-in (in-process or standalone) has recorded in this store."""
    path = Path(store) / "requests.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


# --------------------------------------------------------------------------- GGUF metadata


_INCOMPLETE = ("failed to validate GGUF with llama-quantize without compatibility patches: "
               "model is corrupted or incomplete")  # Ollama's wrapper around llama.cpp's loader error


def gguf_metadata(path: Path) -> dict:
    """Architecture, file type, parameter count and scalar key/values of a GGUF file."""
    import gguf

    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise ApiError(400, "supplied file was not in GGUF format")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # noqa: BLE001 - gguf-py maps every tensor: a short file fails here
        raise ApiError(500, f"{_INCOMPLETE}: {exc}") from None
    size = Path(path).stat().st_size
    for tensor in reader.tensors:
        if tensor.data_offset + int(tensor.n_bytes) > size:
            raise ApiError(500, f"{_INCOMPLETE}: tensor '{tensor.name}' data is not within the file bounds")
    info: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        is_array = field.types and field.types[0] == gguf.GGUFValueType.ARRAY
        info[key] = [] if is_array else field.contents()
    info["general.parameter_count"] = sum(int(t.n_elements) for t in reader.tensors)
    return info


def file_type_name(info: dict) -> str:
    """``F16``, ``Q4_K_M``... from general.file_type, as Ollama reports quantization levels."""
    import gguf

    try:
        name = gguf.LlamaFileType(int(info.get("general.file_type", -1))).name
    except ValueError:
        return "unknown"
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def stub_gguf(path: Path, file_type: int = 1, name: str = "stub") -> Path:
    """A tiny valid GGUF (llama metadata, one tensor) for tests that register but never generate.

    file_type: gguf.LlamaFileType value (1 = F16, 7 = Q8_0); name changes the file, hence its digest.
    """
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_context_length(512)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


LLAMACPP = Path(__file__).resolve().with_name("llamacpp")  # node-llama-cpp: `npm ci` there
LLAMACPP_MODULES = LLAMACPP / "node_modules" / "@node-llama-cpp"


class _QuantizeParams(ctypes.Structure):
    """llama.h's llama_model_quantize_params: its first two fields (stable across llama.cpp releases),
    then room for the rest, which llama_model_quantize_default_params() fills."""

    _fields_ = [("nthread", ctypes.c_int32), ("ftype", ctypes.c_int32), ("rest", ctypes.c_uint8 * 504)]


@lru_cache(maxsize=1)
def llama_quantizer() -> Any:
    """llama.cpp's own ``llama_model_quantize`` (what Ollama runs to quantize), from node-llama-cpp's
    prebuilt CPU library: ``$STANDIN_LIBLLAMA``, else tests/llamacpp/node_modules; None when absent."""
    found = sorted(p for p in LLAMACPP_MODULES.glob("*/bins/*/libllama*.so") if "common" not in p.name)
    for path in [os.environ.get("STANDIN_LIBLLAMA"), *map(str, found)]:
        if not path or not Path(path).is_file():
            continue
        try:
            lib = ctypes.CDLL(path)  # its RUNPATH ($ORIGIN) finds the ggml libraries beside it
            lib.llama_model_quantize_default_params.restype = _QuantizeParams
            lib.llama_model_quantize.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(_QuantizeParams)]
            lib.llama_model_quantize.restype = ctypes.c_uint32
        except (OSError, AttributeError):
            continue
        return lib
    return None


def quantize_with_llama_cpp(source: Path, target: Path, file_type: str) -> None:
    """Quantize as Ollama does: llama.cpp's quantizer, its own per-tensor types and fallbacks."""
    lib = llama_quantizer()
    params = lib.llama_model_quantize_default_params()
    params.nthread, params.ftype = 1, FILE_TYPES[file_type]
    if lib.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)) != 0:
        raise ApiError(500, f"llama.cpp could not quantize the model to {file_type}")


def quantize_gguf(source: Path, target: Path, file_type: str) -> None:
    """Rewrite a F32/F16/BF16 GGUF with its tensors of 2+ dimensions in BLOCKS[file_type] (gguf-py).

    Metadata is copied as it is except ``general.file_type``; a tensor whose rows are not a whole
    number of blocks keeps its type, as llama.cpp's quantizer falls back for such tensors.
    """
    import gguf
    from gguf.quants import dequantize, quantize

    reader = gguf.GGUFReader(source)
    arch = str(reader.fields["general.architecture"].contents())
    writer = gguf.GGUFWriter(target, arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), kind, sub)
    writer.add_file_type(FILE_TYPES[file_type])
    block = gguf.GGMLQuantizationType[BLOCKS[file_type]]
    size = gguf.GGML_QUANT_SIZES[block][0]
    for tensor in reader.tensors:
        values = dequantize(tensor.data, tensor.tensor_type)
        if len(tensor.shape) < 2 or values.shape[-1] % size:
            writer.add_tensor(tensor.name, np.asarray(tensor.data), raw_shape=list(reversed(tensor.shape.tolist())),
                              raw_dtype=tensor.tensor_type)  # fmt: skip
            continue
        writer.add_tensor(tensor.name, quantize(values.astype(np.float32), block), raw_dtype=block)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def parameter_size(count: int) -> str:
    """A human parameter count: 8.0B, 134.52M, 101.50K."""
    for scale, suffix, digits in ((1e9, "B", 1), (1e6, "M", 2), (1e3, "K", 2)):
        if count >= scale:
            return f"{count / scale:.{digits}f}{suffix}"
    return str(count)


# --------------------------------------------------------------------------- templates

GO_TEMPLATE_SOURCE = Path(__file__).resolve().with_name("gotemplate")
_ACTION = re.compile(r"{{-?\s*(.*?)\s*-?}}", re.S)


class TemplateUnavailable(RuntimeError):
    """A .Messages TEMPLATE needs Go's text/template and no ``go`` toolchain is on PATH."""


@lru_cache(maxsize=1)
def go_renderer() -> Path | None:
    """tests/gotemplate built once per source version (cached in the temp folder); None without go."""
    go = shutil.which("go")
    if go is None or not GO_TEMPLATE_SOURCE.is_dir():
        return None
    sha = hashlib.sha256()
    for path in sorted(GO_TEMPLATE_SOURCE.iterdir()):
        sha.update(path.name.encode() + path.read_bytes())
    cache = Path(tempfile.gettempdir()) / f"lacd-gotemplate-{sha.hexdigest()[:16]}"
    binary = cache / "gotemplate"
    if binary.exists():
        return binary
    cache.mkdir(parents=True, exist_ok=True)
    partial = cache / f".gotemplate.{os.getpid()}.{threading.get_ident()}"
    env = {**os.environ, "GOTOOLCHAIN": "local", "GOPROXY": "off", "GOFLAGS": "", "GOCACHE": str(cache / "go-build")}
    subprocess.run([go, "build", "-o", str(partial), "."], cwd=GO_TEMPLATE_SOURCE, env=env,
                   check=True, capture_output=True, timeout=300)  # fmt: skip
    os.replace(partial, binary)
    return binary


def uses_messages(template: str) -> bool:
    """Whether a TEMPLATE renders the whole conversation (.Messages) rather than one exchange."""
    return any(re.search(r"\.Messages\b", action) for action in _ACTION.findall(template))


def _run_go(template: str, messages: list[dict]) -> subprocess.CompletedProcess:
    binary = go_renderer()
    if binary is None:
        raise TemplateUnavailable("rendering a .Messages TEMPLATE needs Go's text/template: install go")
    with tempfile.NamedTemporaryFile("w", suffix=".tmpl", delete=False, encoding="utf-8", newline="") as handle:
        handle.write(template)
    try:
        return subprocess.run([str(binary), handle.name], input=json.dumps({"messages": messages}).encode(),
                              capture_output=True, timeout=60)  # fmt: skip
    finally:
        os.unlink(handle.name)


def check_template(template: str) -> None:
    """ApiError(400) for a .Messages TEMPLATE that Go's text/template cannot parse (as Ollama refuses it)."""
    if not uses_messages(template) or go_renderer() is None:
        return
    done = _run_go(template, [])
    error = done.stderr.decode(errors="replace").strip().removeprefix("gotemplate: ")
    if done.returncode != 0 and error.startswith("parse template"):
        raise ApiError(400, f"template error: {error}")


def render_prompt(template: str, messages: list[dict]) -> str:
    """The prompt Ollama builds from a TEMPLATE and a conversation.

    messages: [{"role", "content", optional "tool_calls", "tool_name"}], as /api/chat receives them.
    .Messages templates go through tests/gotemplate (Go's own text/template); older templates
    made only of {{ .System }}, {{ .Prompt }} and {{ .Response }} are filled here.
    """
    if not uses_messages(template):
        return _render_simple(template, messages)
    done = _run_go(template, messages)
    if done.returncode != 0:
        raise ApiError(500, f"template: {done.stderr.decode(errors='replace').strip()}")
    return done.stdout.decode("utf-8")


def _render_simple(template: str, messages: list[dict]) -> str:
    """One exchange of a .System/.Prompt/.Response template, cut where the response begins."""
    if not set(_ACTION.findall(template)) <= {".System", ".Prompt", ".Response"}:
        raise ApiError(500, "the stand-in renders only .Messages templates and plain .System/.Prompt/.Response ones")
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    prompt = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    head = re.split(r"{{-?\s*\.Response\s*-?}}", template)[0]
    values = {".System": system, ".Prompt": prompt}
    return _ACTION.sub(lambda m: values[m.group(1)], head)


def chat_prompt(manifest: dict, messages: list[dict]) -> str:
    """The prompt /api/chat completes: the model's SYSTEM first when the messages carry none, in its TEMPLATE."""
    if manifest["system"] and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": manifest["system"]}, *messages]
    return render_prompt(manifest["template"], messages)


# --------------------------------------------------------------------------- models in memory


def keep_alive_seconds(value: Any) -> float:
    """Ollama's keep_alive: seconds as a number, or a Go duration such as "5m"; negative = forever."""
    if value is None:
        return DEFAULT_KEEP_ALIVE_S
    if isinstance(value, (int, float)):
        return float(value)
    match = re.fullmatch(r"(-?[0-9.]+)(ms|s|m|h)?", str(value).strip())
    if not match:
        raise ApiError(400, f"time: invalid duration \"{value}\"")
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[match.group(2)]
    return float(match.group(1)) * scale


class Engine:
    """Loads registered GGUF files with transformers and decodes greedily, one request at a time."""

    def __init__(self, store: Store, threads: int = 1):
        self.store = store
        self.threads = threads
        self.lock = threading.Lock()
        self.weights: dict[str, tuple[Any, Any]] = {}  # blob digest -> (model, tokenizer)
        self.loaded: dict[str, dict] = {}  # model name -> {"manifest", "expires_at"}

    def load(self, name: str, manifest: dict, keep_alive: Any) -> None:
        """Load a model's weights (cached by blob) and mark it running until keep_alive runs out."""
        seconds = keep_alive_seconds(keep_alive)
        with self.lock:
            self._weights(manifest)
            expires = datetime.max.replace(tzinfo=timezone.utc) if seconds < 0 else (
                datetime.now(timezone.utc) + timedelta(seconds=seconds))  # fmt: skip
            self.loaded[name] = {"manifest": manifest, "expires_at": expires}

    def unload(self, name: str) -> None:
        """Forget a running model; drop its weights when no running model still uses them."""
        with self.lock:
            entry = self.loaded.pop(name, None)
            if entry is None:
                return
            digest = entry["manifest"]["model"]
            if not any(e["manifest"]["model"] == digest for e in self.loaded.values()):
                self._release(digest)

    def _release(self, digest: str) -> None:
        """Drop the weights of a blob no running model uses any more."""
        self.weights.pop(digest, None)

    def close(self) -> None:
        """Drop every loaded model now, in the calling thread.

        Left to the garbage collector, the weights may be freed by a daemon handler thread while the
        interpreter exits, and torch freeing a tensor then aborts the process (std::terminate).
        """
        with self.lock:
            self.loaded.clear()
            self.weights.clear()

    def running(self) -> list[tuple[str, dict]]:
        """(name, entry) of every model still within its keep_alive."""
        now = datetime.now(timezone.utc)
        for name, entry in list(self.loaded.items()):
            if entry["expires_at"] <= now:
                self.unload(name)
        return sorted(self.loaded.items())

    def generate(self, manifest: dict, prompt: str, options: dict) -> dict:
        """Greedy completion of a rendered prompt; honours num_predict and stop."""
        import torch

        with self.lock:
            model, tokenizer = self._weights(manifest)
            encoded = tokenizer(prompt, return_tensors="pt")
            limit = int(options.get("num_predict") or DEFAULT_NUM_PREDICT)
            with torch.no_grad():
                output = model.generate(**encoded, max_new_tokens=limit, do_sample=False,
                                        pad_token_id=tokenizer.eos_token_id)  # fmt: skip
        new_tokens = output[0][encoded["input_ids"].shape[1]:].tolist()
        text, reason = _finish(tokenizer, new_tokens, limit, _stops(options.get("stop")))
        return {"response": text, "done_reason": reason,
                "prompt_eval_count": int(encoded["input_ids"].shape[1]), "eval_count": len(new_tokens)}  # fmt: skip

    def _weights(self, manifest: dict) -> tuple[Any, Any]:
        digest = manifest["model"]
        if digest not in self.weights:
            self.weights[digest] = self._load_weights(digest)
        return self.weights[digest]

    def _load_weights(self, digest: str) -> tuple[Any, Any]:
        """transformers only reads GGUF from a file named *.gguf: link the blob under such a name."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(self.threads)
        folder = self.store.root / "runtime" / blob_hex(digest)
        folder.mkdir(parents=True, exist_ok=True)
        link = folder / "model.gguf"
        if not link.exists():
            link.symlink_to(self.store.blob_path(digest).resolve())
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file="model.gguf", dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file="model.gguf")
        return model.eval(), tokenizer


def _stops(stop: Any) -> list[str]:
    if not stop:
        return []
    return [stop] if isinstance(stop, str) else [s for s in stop if s]


def _finish(tokenizer: Any, tokens: list[int], limit: int, stops: list[str]) -> tuple[str, str]:
    """Decode generated tokens and cut at the end-of-sequence token or the first stop string."""
    ended = bool(tokens) and tokens[-1] == tokenizer.eos_token_id
    text = tokenizer.decode(tokens[:-1] if ended else tokens, skip_special_tokens=False)
    cuts = [text.index(s) for s in stops if s in text]
    if cuts:
        return text[: min(cuts)], "stop"
    return text, "stop" if ended or len(tokens) < limit else "length"


def context_size(options: dict | None) -> int:
    """num_ctx, or Ollama's default."""
    return int((options or {}).get("num_ctx") or DEFAULT_NUM_CTX)


def llamacpp_missing() -> str | None:
    """Why the llama.cpp engine cannot run here (no node, no node-llama-cpp), or None."""
    if shutil.which("node") is None:
        return "the llama.cpp engine needs node on PATH"
    if not (LLAMACPP / "node_modules" / "node-llama-cpp").is_dir():
        return f"the llama.cpp engine needs node-llama-cpp: run `npm ci --omit=optional --ignore-scripts` in {LLAMACPP}"
    return None


def llamacpp_options(options: dict) -> dict:
    """Ollama's options as node-llama-cpp's generateCompletion takes them (the one place they are mapped).

    As the transformers engine: greedy unless temperature is set above 0, num_predict 32 when unset,
    no repeat penalty unless one is set. A temperature above 0 samples with top_k, top_p, min_p and
    seed, Ollama's defaults (40, 0.9, 0.0, random) where unset. A negative num_predict generates until
    the context is full.
    """
    def get(key: str, default: Any) -> Any:
        return default if options.get(key) is None else options[key]

    limit = int(options.get("num_predict") or DEFAULT_NUM_PREDICT)
    mapped = {"maxTokens": max(limit, 0), "disableContextShift": limit < 0, "temperature": float(get("temperature", 0)),
              "customStopTriggers": _stops(options.get("stop")), "repeatPenalty": False}  # fmt: skip
    if mapped["temperature"] > 0:
        mapped.update(topK=int(get("top_k", 40)), topP=float(get("top_p", 0.9)), minP=float(get("min_p", 0.0)))
        if int(get("seed", -1)) >= 0:
            mapped["seed"] = int(options["seed"])
    penalties = ("repeat_penalty", "frequency_penalty", "presence_penalty")
    last = int(get("repeat_last_n", 64))
    if any(options.get(key) is not None for key in penalties) and last != 0:
        mapped["repeatPenalty"] = {"penalty": float(get("repeat_penalty", 1.0)),
                                   "lastTokens": context_size(options) if last < 0 else last,
                                   "frequencyPenalty": float(get("frequency_penalty", 0.0)),
                                   "presencePenalty": float(get("presence_penalty", 0.0))}  # fmt: skip
    return mapped


class LlamaCppEngine(Engine):
    """Generates with llama.cpp, the engine inside Ollama: tests/llamacpp/serve.mjs (node-llama-cpp's
    prebuilt CPU binary) as a long-lived child process that keeps one model and one context loaded and
    does not evaluate again the prompt prefix it shares with the tokens already in the context, as
    Ollama's runner reuses its cache slot, in whole batches of num_batch tokens (512), so that a reply
    is the one the prompt gets on a new context. The same interface and answers as Engine."""

    def __init__(self, store: Store, threads: int = 2):
        super().__init__(store, threads)
        self.proc: subprocess.Popen | None = None
        self.log = store.root / "runtime" / "llamacpp.log"  # the child's stderr
        self.cached: list[int] = []  # per completion, the prompt tokens not evaluated again

    def generate(self, manifest: dict, prompt: str, options: dict) -> dict:
        """A completion of a rendered prompt: Engine.generate's answer, the options as llamacpp_options maps them."""
        with self.lock:
            spec = self._weights(manifest, options)
            answer = self._ask({"op": "generate", **spec, "prompt": prompt, "options": llamacpp_options(options)})
            self.cached.append(answer["cached"])
        return {"response": answer["text"], "done_reason": answer["done_reason"],
                "prompt_eval_count": answer["prompt_tokens"], "eval_count": answer["reply_tokens"]}  # fmt: skip

    def close(self) -> None:
        """Drop every model and stop the child."""
        super().close()
        with self.lock:
            self._stop()

    def _weights(self, manifest: dict, options: dict | None = None) -> dict:
        """Have the child load the blob with the context and batch sizes asked for (one model at a time)."""
        digest = manifest["model"]
        options = options or manifest["parameters"]
        size = context_size(options)
        spec = {"model": str(self.store.blob_path(digest)), "context_size": size,
                "batch_size": min(int(options.get("num_batch") or DEFAULT_NUM_BATCH), size)}  # fmt: skip
        if self.weights.get(digest) != spec:
            self._ask({"op": "load", **spec})
            self.weights = {digest: spec}
        return spec

    def _release(self, digest: str) -> None:
        if self.weights.pop(digest, None) is not None and self.proc is not None and self.proc.poll() is None:
            self._ask({"op": "unload"})

    def _ask(self, request: dict) -> dict:
        """Send one request to the child (started if needed), return its answer; ApiError(500) on failure."""
        proc = self._child()
        try:
            proc.stdin.write(json.dumps(request) + "\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
        except OSError:
            line = ""
        if not line:
            self._stop()
            tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise ApiError(500, f"the llama.cpp engine (node {LLAMACPP / 'serve.mjs'}) exited:\n{tail}")
        answer = json.loads(line)
        if "error" in answer:
            raise ApiError(500, f"llama.cpp: {answer['error']}")
        return answer

    def _child(self) -> subprocess.Popen:
        if self.proc is not None and self.proc.poll() is None:
            return self.proc
        missing = llamacpp_missing()
        if missing:
            raise ApiError(500, missing)
        self.weights.clear()  # a new child has nothing loaded
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([shutil.which("node") or "node", "serve.mjs", str(self.threads)], cwd=LLAMACPP,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                                         encoding="utf-8")  # fmt: skip
        return self.proc

    def _stop(self) -> None:
        """End the child: the end of its input makes it dispose the model and exit."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()


ENGINES = {"transformers": Engine, "llamacpp": LlamaCppEngine}


def make_engine(store: Store, kind: str | None = None, threads: int | None = None) -> Engine:
    """The engine named (else $STANDIN_ENGINE, else transformers), on its default threads unless given."""
    kind = kind or os.environ.get("STANDIN_ENGINE") or "transformers"
    if kind not in ENGINES:
        raise ValueError(f"unknown stand-in engine {kind!r}: choose one of {', '.join(ENGINES)}")
    return ENGINES[kind](store, threads) if threads else ENGINES[kind](store)


# --------------------------------------------------------------------------- HTTP


class OllamaHandler(BaseHTTPRequestHandler):
    """One method per endpoint; ``api_*`` methods get the parsed JSON body and answer or raise ApiError."""

    protocol_version = "HTTP/1.1"
    server: "StandInServer"
    routes = {
        ("GET", "/"): "api_root",
        ("GET", "/api/version"): "api_version",
        ("GET", "/api/tags"): "api_tags",
        ("GET", "/api/ps"): "api_ps",
        ("POST", "/api/create"): "api_create",
        ("POST", "/api/show"): "api_show",
        ("POST", "/api/copy"): "api_copy",
        ("DELETE", "/api/delete"): "api_delete",
        ("POST", "/api/generate"): "api_generate",
        ("POST", "/api/chat"): "api_chat",
    }

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch("HEAD")

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch("DELETE")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet in tests
        if self.server.verbose:
            super().log_message(format, *args)

    def _dispatch(self, method: str) -> None:
        path = urlsplit(self.path).path
        try:
            if path.startswith("/api/blobs/"):
                self._blob(method, unquote(path.removeprefix("/api/blobs/")))
                return
            body = self._read_json()
            self.server.record(method, path, body)
            handler = self.routes.get((method, path))
            if handler is None:
                raise ApiError(404, "404 page not found")
            getattr(self, handler)(body)
        except ApiError as err:
            if method == "HEAD":  # a HEAD answer has no body
                self._send_empty(err.status)
            else:
                self._send_json(err.status, {"error": err.message})
        except Exception as err:  # noqa: BLE001 - Ollama answers 500, it does not drop the connection
            traceback.print_exc()
            self._send_json(500, {"error": f"{type(err).__name__}: {err}"})

    # ---- endpoints

    def api_root(self, body: dict) -> None:
        self._send_text(200, "Ollama is running")

    def api_version(self, body: dict) -> None:
        self._send_json(200, {"version": "0.0.0-standin"})

    def _blob(self, method: str, digest: str) -> None:
        """HEAD: 200 if the blob exists, else 404. POST: store the body, 201 (400 on digest mismatch)."""
        self.server.record(method, f"/api/blobs/{digest}", {"bytes": self._content_length()})
        if method == "HEAD":
            exists = self.server.store.blob_path(digest).exists()
            self._send_empty(200 if exists else 404)
            return
        if method != "POST":
            raise ApiError(405, "method not allowed")
        try:
            path = self.server.store.blob_path(digest)
        except ApiError:
            for _ in self._body_chunks():
                pass
            raise
        if path.exists():
            for _ in self._body_chunks():
                pass
            self._send_empty(200)
            return
        self.server.store.write_blob(digest, self._body_chunks())
        self._send_empty(201)

    def api_create(self, body: dict) -> None:
        """Create a model tag from pushed GGUF blobs (files) or from another model (from)."""
        name = normalize_name(body.get("model") or body.get("name"))
        if body.get("adapters"):
            if any(not digest for digest in body["adapters"].values()):
                raise ApiError(400, "invalid digest format")
            raise ApiError(400, "the stand-in cannot apply adapters (Ollama would load this LoRA GGUF over the "
                                "base): merge the adapter into the model instead")  # fmt: skip
        manifest, statuses = self._new_manifest(body)
        if body.get("template"):
            check_template(body["template"])
            manifest["template"] = body["template"]
        if body.get("system") is not None:
            manifest["system"] = body["system"]
        if body.get("parameters"):
            manifest["parameters"] = {**manifest.get("parameters", {}), **body["parameters"]}
        stream = body.get("stream", True)
        if stream:
            self._start_stream()
            for status in statuses:
                self._stream_line({"status": status})
        try:
            steps = self._quantize(manifest, body.get("quantize") or body.get("quantization"))
        except ApiError as err:
            if not stream:
                raise
            self._stream_line({"error": err.message})
            self._end_stream()
            return
        manifest.update(name=name, modified_at=now_iso())
        manifest["digest"] = _manifest_digest(manifest)
        self.server.store.put(name, manifest)
        if stream:
            for status in steps + ["writing manifest", "success"]:
                self._stream_line({"status": status})
            self._end_stream()
        else:
            self._send_json(200, {"status": "success"})

    def _new_manifest(self, body: dict) -> tuple[dict, list[str]]:
        """The base manifest (from files or from another model) and the status lines so far."""
        if body.get("from"):
            base = self.server.store.get(normalize_name(body["from"]))
            return {k: v for k, v in base.items() if k not in ("name", "digest")}, ["reading model metadata"]
        files = body.get("files")
        if not files:
            raise ApiError(400, "neither 'from' or 'files' was specified")
        if len(files) != 1:
            raise ApiError(400, "the stand-in takes exactly one GGUF file")
        (filename, digest), = files.items()
        blob = self.server.store.blob_path(digest)
        if not blob.exists():
            raise ApiError(400, f"blob {digest} not found: push it to /api/blobs/{digest} first")
        info = gguf_metadata(blob)
        level = file_type_name(info)
        manifest = {
            "model": digest,
            "files": {filename: digest},
            "size": blob.stat().st_size,
            "file_type": level,
            "quantize": None,
            "template": "{{ .Prompt }}",
            "system": "",
            "parameters": {},
            "model_info": info,
            "details": _details(info, level),
        }
        return manifest, ["parsing GGUF", f"using existing layer {digest}"]

    def _quantize(self, manifest: dict, quantize: str | None) -> list[str]:
        """Check a quantize request as Ollama's createModel does, then write the quantized blob."""
        if not quantize:
            return []
        wanted = QUANTIZE_TYPES.get(quantize.upper())
        if wanted is None:
            raise ApiError(500, f"unsupported quantization type {quantize.upper()} - supported types are "
                                f"{SUPPORTED_QUANTIZE}")  # fmt: skip
        current = manifest["file_type"]
        if current not in QUANTIZABLE:
            raise ApiError(500, "quantization is only supported for F16, BF16 and F32 models")
        if current == wanted:
            return []
        store = self.server.store
        fd, tmp = tempfile.mkstemp(dir=store.blobs, prefix=".quantize-", suffix=".gguf")
        os.close(fd)
        try:
            quantizer = quantize_with_llama_cpp if llama_quantizer() is not None else quantize_gguf
            quantizer(store.blob_path(manifest["model"]), Path(tmp), wanted)
            with open(tmp, "rb") as handle:
                digest = "sha256:" + hashlib.file_digest(handle, "sha256").hexdigest()
            os.replace(tmp, store.blob_path(digest))
        finally:
            Path(tmp).unlink(missing_ok=True)
        info = gguf_metadata(store.blob_path(digest))
        manifest.update(model=digest, size=store.blob_path(digest).stat().st_size, file_type=wanted, quantize=wanted,
                        model_info=info, details=_details(info, wanted),
                        quantizer="llama.cpp" if quantizer is quantize_with_llama_cpp else "gguf-py")  # fmt: skip
        return [f"quantizing {current} model to {wanted}", f"using existing layer {digest}"]

    def api_tags(self, body: dict) -> None:
        """Every model, newest first (Ollama lists by modification time)."""
        models = [_model_entry(m) for m in sorted(self.server.store.all(), key=lambda m: m["modified_at"], reverse=True)]
        self._send_json(200, {"models": models})

    def api_show(self, body: dict) -> None:
        """Ollama's ShowHandler: 400 without a model, 404 names it as Ollama displays it (tag included)."""
        _require_body(body)
        if not (body.get("model") or body.get("name")):
            raise ApiError(400, "model is required")
        manifest = self.server.store.get(normalize_name(body.get("model") or body.get("name")))
        self._send_json(200, {
            "modelfile": _modelfile(manifest, self.server.store),
            "parameters": _parameters_text(manifest["parameters"]),
            "template": manifest["template"],
            "system": manifest["system"],
            "details": manifest["details"],
            "model_info": manifest["model_info"],
            "capabilities": ["completion"],
            "modified_at": manifest["modified_at"],
        })  # fmt: skip

    def api_copy(self, body: dict) -> None:
        """Ollama's CopyHandler: the destination becomes another name for the source's manifest."""
        _require_body(body)
        source = _valid_name(body.get("source"), "source")
        destination = _valid_name(body.get("destination"), "destination")
        try:
            manifest = self.server.store.get(source)
        except ApiError:
            raise ApiError(404, f"model {json.dumps(body.get('source'))} not found") from None
        held = self.server.hold_copies.get(destination)
        if held is not None:  # a test kills the client now: this copy never reaches the store
            held["arrived"].set()
            held["release"].wait(60)
            raise ApiError(500, f"the stand-in dropped this copy to {destination} (held by the test)")
        self.server.store.put(destination, dict(manifest, name=destination, modified_at=now_iso()))
        self._send_empty(200)

    def api_delete(self, body: dict) -> None:
        """Ollama's DeleteHandler: 404 names the model as it was asked for."""
        _require_body(body)
        asked = body.get("model") or body.get("name") or ""
        name = _valid_name(asked, "name")
        try:
            self.server.store.get(name)
        except ApiError:
            raise ApiError(404, f"model '{asked}' not found") from None
        self.server.engine.unload(name)
        self.server.store.delete(name)
        self._send_empty(200)

    def api_ps(self, body: dict) -> None:
        models = []
        for name, entry in self.server.engine.running():
            item = _model_entry(entry["manifest"], name)
            item.update(expires_at=entry["expires_at"].isoformat(), size_vram=0,
                        context_length=context_size(entry["manifest"]["parameters"]))  # fmt: skip
            models.append(item)
        self._send_json(200, {"models": models})

    def api_generate(self, body: dict) -> None:
        """Unload (empty prompt, keep_alive 0), load (empty prompt) or complete a prompt."""
        name = normalize_name(body.get("model"))
        manifest = self.server.store.get(name)
        prompt = body.get("prompt") or ""
        if not prompt and keep_alive_seconds(body.get("keep_alive")) == 0:
            self.server.engine.unload(name)
            self._answer(body, {"model": name, "response": "", "done": True, "done_reason": "unload"})
            return
        if body.get("raw") and (body.get("template") or body.get("system") or body.get("context")):
            raise ApiError(400, "raw mode does not support template, system, or context")
        check_options(manifest["parameters"], body.get("options"))
        self.server.engine.load(name, manifest, body.get("keep_alive"))
        if not prompt:
            self._answer(body, {"model": name, "response": "", "done": True, "done_reason": "load"})
            return
        if not body.get("raw"):
            system = body.get("system") or manifest["system"]
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}]  # fmt: skip
            prompt = render_prompt(body.get("template") or manifest["template"], messages)
        result = self._complete(name, manifest, prompt, body)
        self._answer(body, {"model": name, **result})

    def api_chat(self, body: dict) -> None:
        """Chat: the conversation rendered with the model's TEMPLATE, then completed."""
        name = normalize_name(body.get("model"))
        manifest = self.server.store.get(name)
        messages = [_wire_message(m) for m in body.get("messages") or []]
        if not messages and keep_alive_seconds(body.get("keep_alive")) == 0:
            self.server.engine.unload(name)
            self._answer(body, {"model": name, "message": {"role": "assistant", "content": ""},
                                "done": True, "done_reason": "unload"})  # fmt: skip
            return
        check_options(manifest["parameters"], body.get("options"))
        self.server.engine.load(name, manifest, body.get("keep_alive"))
        if not messages:
            self._answer(body, {"model": name, "message": {"role": "assistant", "content": ""},
                                "done": True, "done_reason": "load"})  # fmt: skip
            return
        prompt = chat_prompt(manifest, messages)
        result = self._complete(name, manifest, prompt, body)
        content = result.pop("response")
        self._answer(body, {"model": name, "message": {"role": "assistant", "content": content}, **result})

    def _complete(self, name: str, manifest: dict, prompt: str, body: dict) -> dict:
        """Run the engine with the model's PARAMETERs overridden by the request's options."""
        started = time.monotonic_ns()
        options = {**manifest["parameters"], **(body.get("options") or {})}
        result = self.server.engine.generate(manifest, prompt, options)
        if keep_alive_seconds(body.get("keep_alive")) == 0:
            self.server.engine.unload(name)
        elapsed = time.monotonic_ns() - started
        self.server.prompts.append(prompt)
        self.server.completions.append({"model": name, "digest": manifest["digest"], "blob": manifest["model"]})
        return {**result, "done": True, "total_duration": elapsed, "eval_duration": elapsed}

    # ---- wire helpers

    def _answer(self, body: dict, payload: dict) -> None:
        """One JSON object, or the same as a one-line NDJSON stream when the request streams."""
        payload = {"created_at": now_iso(), **payload}
        if body.get("stream", True):
            self._start_stream()
            self._stream_line(payload)
            self._end_stream()
        else:
            self._send_json(200, payload)

    def _content_length(self) -> int | None:
        value = self.headers.get("Content-Length")
        return int(value) if value is not None else None

    def _body_chunks(self, size: int = 1 << 20) -> Iterator[bytes]:
        """The request body in chunks, whether sent with Content-Length or chunked encoding."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                length = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if length == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return
                yield self.rfile.read(length)
                self.rfile.readline()
        remaining = self._content_length() or 0
        while remaining > 0:
            chunk = self.rfile.read(min(size, remaining))
            if not chunk:
                return
            remaining -= len(chunk)
            yield chunk

    def _read_json(self) -> dict:
        raw = b"".join(self._body_chunks())
        if not raw:
            return {}
        try:
            body = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ApiError(400, f"invalid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        return body

    def _send_json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_text(self, status: int, text: str) -> None:
        data = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_empty(self, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _stream_line(self, payload: dict) -> None:
        data = json.dumps(payload).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _end_stream(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


def _details(info: dict, level: str) -> dict:
    family = str(info.get("general.architecture", "unknown"))
    return {
        "parent_model": "",
        "format": "gguf",
        "family": family,
        "families": [family],
        "parameter_size": parameter_size(int(info.get("general.parameter_count", 0))),
        "quantization_level": level,
    }


def _manifest_digest(manifest: dict) -> str:
    """A stable digest of what makes the model (weights, template, system, parameters, quantize)."""
    keys = ("model", "template", "system", "parameters", "quantize")
    canonical = json.dumps({k: manifest.get(k) for k in keys}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _model_entry(manifest: dict, name: str | None = None) -> dict:
    """A model as /api/tags and /api/ps list it."""
    name = name or manifest["name"]
    return {"name": name, "model": name, "modified_at": manifest["modified_at"], "size": manifest["size"],
            "digest": manifest["digest"], "details": manifest["details"]}  # fmt: skip


def _parameters_text(parameters: dict) -> str:
    """Parameters the way /api/show prints them: one ``name value`` line per value, strings quoted."""
    lines = []
    for key in sorted(parameters):
        values = parameters[key] if isinstance(parameters[key], list) else [parameters[key]]
        lines += [f"{key:<30} {_go_value(v)}" for v in values]
    return "\n".join(lines)


def _go_value(value: Any) -> str:
    """A parameter value as Go prints it: strings quoted, booleans lower-case."""
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _modelfile(manifest: dict, store: Store) -> str:
    """A Modelfile like ``ollama show --modelfile`` writes, FROM pointing at the blob on disk."""
    lines = [
        '# Modelfile generated by "ollama show"',
        "# To build a new Modelfile based on this one, replace the FROM line with:",
        f"# FROM {manifest['name']}",
        "",
        f"FROM {store.blob_path(manifest['model'])}",
        f'TEMPLATE """{manifest["template"]}"""',
    ]
    if manifest["system"]:
        lines.append(f'SYSTEM """{manifest["system"]}"""')
    for line in _parameters_text(manifest["parameters"]).splitlines():
        key, value = line.split(None, 1)
        lines.append(f"PARAMETER {key} {value}")
    return "\n".join(lines) + "\n"


def _require_body(body: dict) -> None:
    if not body:
        raise ApiError(400, "missing request body")


def _valid_name(name: Any, what: str) -> str:
    """A model name as Ollama's copy and delete parse it: ``<what> "x" is invalid`` when they cannot."""
    try:
        return normalize_name(name)
    except ApiError:
        raise ApiError(400, f"{what} {json.dumps(name if isinstance(name, str) else '')} is invalid") from None


def check_options(parameters: dict, options: dict | None) -> None:
    """Ollama's Options.FromMap over the model's PARAMETERs, then the request's options: a value of the
    wrong JSON type fails the load (500), an unknown option is ignored."""
    for source in (parameters or {}, options or {}):
        for key, value in source.items():
            kind = OPTION_TYPES.get(key)
            if kind is None or value is None:
                continue
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if kind == "integer" and not number:
                raise ApiError(500, f'option "{key}" must be of type integer')
            if kind == "float32" and not number:
                raise ApiError(500, f'option "{key}" must be of type float32')
            if kind == "boolean" and not isinstance(value, bool):
                raise ApiError(500, f'option "{key}" must be of type boolean')
            if kind == "array" and not isinstance(value, list):
                raise ApiError(500, f'option "{key}" must be of type array')
            if kind == "array" and not all(isinstance(item, str) for item in value):
                raise ApiError(500, f'option "{key}" must be of an array of strings')


def _wire_message(message: Any) -> dict:
    if not isinstance(message, dict) or "role" not in message:
        raise ApiError(400, "each message needs a role")
    return {k: message[k] for k in ("role", "content", "tool_calls", "tool_name") if message.get(k) is not None}


class StandInServer(ThreadingHTTPServer):
    """The HTTP server with the store, the engine and the in-memory request log."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int, store: Path, threads: int | None = None, verbose: bool = False,
                 engine: str | None = None):
        super().__init__(("127.0.0.1", port), OllamaHandler)
        self.store = Store(store)
        self.engine = make_engine(self.store, engine, threads)
        self.verbose = verbose
        self.requests: list[dict] = []
        self.prompts: list[str] = []  # every rendered prompt sent to the model, in order
        self.completions: list[dict] = []  # per completion: the name asked for, its manifest digest and its blob
        self.hold_copies: dict[str, dict] = {}  # destination -> {"arrived", "release"} Events: see api_copy

    def record(self, method: str, path: str, body: dict) -> None:
        """Log a request (method, path, JSON body without images) in memory and in the store."""
        entry = {"method": method, "path": path, "body": {k: v for k, v in body.items() if k != "images"}}
        self.requests.append(entry)
        self.store.log_request(entry)


class StandIn:
    """An in-process stand-in on a free port (or a given one); a context manager for tests."""

    def __init__(self, store: Path, port: int = 0, threads: int | None = None, engine: str | None = None):
        self.server = StandInServer(port, Path(store), threads, engine=engine)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    @property
    def host(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def requests(self) -> list[dict]:
        return self.server.requests

    @property
    def prompts(self) -> list[str]:
        return self.server.prompts

    @property
    def completions(self) -> list[dict]:
        return self.server.completions

    def start(self) -> "StandIn":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
        self.server.engine.close()

    def __enter__(self) -> "StandIn":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# --------------------------------------------------------------------------- as a process


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_process(store: Path, port: int, timeout: float = 30.0) -> subprocess.Popen:
    """Run the stand-in as its own process (kill it to make "Ollama" go down) and wait until it listens.

    Its output goes to ``<store>/standin.log``; it is ready once it has written its own listening line.
    """
    store = Path(store)
    store.mkdir(parents=True, exist_ok=True)
    log_path = store / "standin.log"
    command = [sys.executable, str(Path(__file__).resolve()), "--port", str(port), "--store", str(store)]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    ready = f"(pid {proc.pid}) listening on http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if ready in log_path.read_text(errors="replace"):
            return proc
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    tail = log_path.read_text(errors="replace")[-2000:]
    raise RuntimeError(f"the stand-in did not start on port {port}:\n{tail}")


def main(argv: list[str] | None = None) -> None:
    """``python tests/ollama_standin.py --port N --store DIR [--engine llamacpp]``: serve until killed."""
    parser = argparse.ArgumentParser(description="Ollama stand-in for lacd's tests")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--engine", choices=ENGINES, default=os.environ.get("STANDIN_ENGINE") or "transformers",
                        help="what generates: transformers (the default) or llamacpp (Ollama's engine, through "
                             "node-llama-cpp); default $STANDIN_ENGINE")  # fmt: skip
    parser.add_argument("--threads", type=int, help="generation threads (transformers: torch's, default 1; "
                                                    "llamacpp: llama.cpp's, default 2)")  # fmt: skip
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = parser.parse_args(argv)
    if args.engine not in ENGINES:  # from $STANDIN_ENGINE, which choices does not check
        parser.error(f"unknown engine {args.engine!r}: choose one of {', '.join(ENGINES)}")
    if args.engine == "llamacpp" and llamacpp_missing():
        parser.error(llamacpp_missing())
    server = StandInServer(args.port, args.store, args.threads, args.verbose, args.engine)
    print(f"ollama stand-in (pid {os.getpid()}) listening on http://127.0.0.1:{server.server_address[1]} "
          f"({args.engine} engine)", flush=True)  # fmt: skip
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        server.engine.close()


if __name__ == "__main__":
    main()


def hold_loaded(standin: StandIn, name: str, seconds: float) -> None:
    """Make /api/ps list `name` as loaded for `seconds` more (negative: kept loaded for good), the way
    the agent's model looks while it is in use, without loading weights (its manifest need not exist)."""
    expires = (datetime.max.replace(tzinfo=timezone.utc) if seconds < 0
               else datetime.now(timezone.utc) + timedelta(seconds=seconds))  # fmt: skip
    manifest = {"name": name, "model": f"sha256:{hashlib.sha256(name.encode()).hexdigest()}", "size": 3825819519,
                "modified_at": now_iso(), "parameters": {"num_ctx": 4096},
                "details": {"format": "gguf", "family": "llama", "parameter_size": "7B", "quantization_level": "Q4_0"}}
    manifest["digest"] = manifest["model"].removeprefix("sha256:")
    with standin.server.engine.lock:
        standin.server.engine.loaded[normalize_name(name)] = {"manifest": manifest, "expires_at": expires}
