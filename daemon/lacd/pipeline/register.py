"""Register a run's GGUF with Ollama through the official ``ollama`` client.

Plain functions over an ``ollama.Client``: push the GGUF blob (skipped when Ollama already holds
that digest), create ``<name>:v<N>`` with TEMPLATE, SYSTEM, PARAMETERs and an optional quantize,
promote it by copying to ``<name>:latest``, unload running models, prune old versions.

Two failures are told apart, because the run treats them differently:
- ``OllamaUnavailable``: Ollama could not be reached (connection refused, timeout, dropped
  connection, 502/503/504 from a proxy). Nothing was wrong with the request; the run waits in
  the register stage and retries with backoff.
- ``RegisterError``: Ollama answered and refused (bad template, missing blob, unknown model, a file
  that cannot be quantized...). The message carries Ollama's own words.

Written against ollama-python 0.6.x: its ``create()`` takes files/template/system/parameters/
quantize/stream; its ``create_blob()`` always re-reads and uploads the whole file and there is no
call for HEAD /api/blobs, so the two blob requests go through the client's ``_request_raw``,
which gives them the same error handling as every other call.
"""

from __future__ import annotations

import hashlib
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import ollama
import structlog

from lacd.pipeline.errors import StageWaiting

log = structlog.get_logger(__name__)

GGUF_FILENAME = "model.gguf"  # the name Ollama sees for the uploaded file; it must end in .gguf
_UNAVAILABLE_STATUS = (502, 503, 504)
_CHUNK = 1 << 20


class OllamaError(Exception):
    """Base of the errors this module raises."""


class OllamaUnavailable(OllamaError, StageWaiting):
    """Ollama could not be reached; retrying later may succeed."""

    def waiting_for(self, settings) -> str:
        return f"Ollama at {settings.ollama.host}"


class RegisterError(OllamaError):
    """Ollama answered and refused the request."""

    def __init__(self, message: str, status_code: int | None = None):
        """status_code: Ollama's HTTP status, None for an error reported inside a streamed answer."""
        super().__init__(message)
        self.status_code = status_code


def make_client(host: str, timeout_s: float = 600.0, connect_timeout_s: float = 5.0) -> ollama.Client:
    """An ``ollama.Client`` for host with timeouts, so a hung Ollama cannot hang the daemon.

    timeout_s bounds each read and write (not a whole upload or a whole create), so long
    quantizations that keep streaming status lines are fine.
    """
    timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s)
    return ollama.Client(host=host, timeout=timeout)


def version_tag(name: str, version: int) -> str:
    """``name:v<version>``."""
    if version < 1:
        raise ValueError(f"version must be >= 1, not {version}")
    return f"{name}:v{version}"


def latest_tag(name: str) -> str:
    """``name:latest``."""
    return f"{name}:latest"


def parse_version(tag: str, name: str) -> int | None:
    """N for ``name:vN`` (also ``name:vN`` listed with a registry prefix); None for other tags."""
    match = re.fullmatch(rf"(?:.*/)?{re.escape(name)}:v([0-9]+)", tag)
    return int(match.group(1)) if match else None


def file_digest(path: Path) -> str:
    """``sha256:<hex>`` of a file, read in 1 MiB chunks."""
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            sha.update(chunk)
    return f"sha256:{sha.hexdigest()}"


@contextmanager
def ollama_calls(client: ollama.Client, action: str) -> Iterator[None]:
    """Translate the client's exceptions raised inside the block into OllamaUnavailable/RegisterError."""
    try:
        yield
    except ollama.ResponseError as exc:
        if exc.status_code in _UNAVAILABLE_STATUS:
            raise OllamaUnavailable(
                f"Ollama at {_host(client)} is unavailable ({exc.status_code}) while trying to {action}"
            ) from exc
        status = exc.status_code if exc.status_code > 0 else None  # -1: an error line inside a stream
        code = f" (HTTP {status})" if status else ""
        raise RegisterError(f"Ollama refused to {action}: {exc.error}{code}", status) from exc
    except (ConnectionError, httpx.TransportError) as exc:
        raise OllamaUnavailable(
            f"Ollama is not reachable at {_host(client)} while trying to {action}: {exc or type(exc).__name__}"
        ) from exc


def is_reachable(client: ollama.Client) -> bool:
    """True when Ollama answers at all (even with an error)."""
    try:
        with ollama_calls(client, "list models"):
            client.list()
    except OllamaUnavailable:
        return False
    except RegisterError:
        return True
    return True


def has_blob(client: ollama.Client, digest: str) -> bool:
    """Whether Ollama already holds the blob with this digest (HEAD /api/blobs/<digest>)."""
    try:
        with ollama_calls(client, f"check blob {digest}"):
            client._request_raw("HEAD", f"/api/blobs/{digest}")
    except RegisterError as exc:
        if exc.status_code == 404:
            return False
        raise
    return True


def push_blob(client: ollama.Client, path: Path) -> str:
    """Upload a file as a blob unless Ollama has it already; return its ``sha256:<hex>`` digest."""
    path = Path(path)
    digest = file_digest(path)
    if has_blob(client, digest):
        log.info("ollama.blob.present", digest=digest, path=str(path))
        return digest
    started = time.monotonic()
    size = path.stat().st_size
    with ollama_calls(client, f"upload {path.name} as blob {digest}"), open(path, "rb") as handle:
        client._request_raw("POST", f"/api/blobs/{digest}", content=handle)
    log.info("ollama.blob.uploaded", digest=digest, bytes=size, seconds=round(time.monotonic() - started, 2))
    return digest


def create_version(
    client: ollama.Client,
    name: str,
    version: int,
    gguf_path: Path,
    template: str,
    system: str,
    parameters: dict[str, Any],
    quantize: str | None = None,
    on_status: Callable[[str], None] | None = None,
) -> str:
    """Push the GGUF and create ``name:v<version>`` from it; return the tag.

    parameters: Modelfile PARAMETERs, e.g. {"stop": ["<|im_end|>"], "num_ctx": 4096}.
    quantize: None to keep the file's precision, or an Ollama quantization such as "q4_K_M", "q8_0".
    on_status: called with each status line Ollama streams ("parsing GGUF", "quantizing ...").
    """
    tag = version_tag(name, version)
    digest = push_blob(client, gguf_path)
    log.info("ollama.create.start", tag=tag, digest=digest, quantize=quantize)
    last = ""
    with ollama_calls(client, f"create {tag}"):
        progress = client.create(
            model=tag,
            files={GGUF_FILENAME: digest},
            template=template or None,
            system=system or None,
            parameters=parameters or None,
            quantize=quantize or None,
            stream=True,
        )
        for update in progress:
            if update.status and update.status != last:
                last = update.status
                if on_status is not None:
                    on_status(last)
    if last != "success":
        raise RegisterError(f"Ollama stopped creating {tag} without success (last status: {last!r})")
    log.info("ollama.create.done", tag=tag)
    return tag


def promote(client: ollama.Client, name: str, tag: str) -> str:
    """Point ``name:latest`` at tag (an Ollama copy); return ``name:latest``."""
    latest = latest_tag(name)
    with ollama_calls(client, f"copy {tag} to {latest}"):
        client.copy(tag, latest)
    log.info("ollama.promoted", tag=tag, latest=latest)
    return latest


def unload_all(client: ollama.Client) -> list[str]:
    """Ask Ollama to unload every running model (generate with keep_alive 0); return their names."""
    with ollama_calls(client, "list running models"):
        running = [m.model or m.name for m in client.ps().models]
    for model in running:
        with ollama_calls(client, f"unload {model}"):
            client.generate(model=model, keep_alive=0)
    if running:
        log.info("ollama.unloaded", models=running)
    return running


def list_versions(client: ollama.Client, name: str) -> dict[int, str]:
    """{N: digest} of every ``name:v<N>`` Ollama holds."""
    with ollama_calls(client, "list models"):
        models = client.list().models
    versions = {}
    for model in models:
        number = parse_version(model.model or "", name)
        if number is not None:
            versions[number] = model.digest or ""
    return versions


def latest_digest(client: ollama.Client, name: str) -> str | None:
    """The digest of ``name:latest``, or None when there is none."""
    return tag_digest(client, latest_tag(name))


def full_tag(name: str) -> str:
    """A model name as Ollama stores it: ``codellama`` -> ``codellama:latest``."""
    name = name.strip()
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def tag_digest(client: ollama.Client, tag: str) -> str | None:
    """The digest /api/tags lists for a model tag (a copy has its source's digest), or None when absent."""
    wanted = full_tag(tag)
    with ollama_calls(client, "list models"):
        models = client.list().models
    return next((m.digest for m in models if m.model == wanted or (m.model or "").endswith("/" + wanted)), None)


def copy(client: ollama.Client, source: str, destination: str) -> None:
    """Ollama's copy: destination becomes another name for source's manifest (same blobs, no weight copy)."""
    with ollama_calls(client, f"copy {source} to {destination}"):
        client.copy(source, destination)
    log.info("ollama.copied", source=source, destination=destination)


def delete(client: ollama.Client, tag: str) -> None:
    """Remove a model tag (Ollama keeps blobs another tag still uses)."""
    with ollama_calls(client, f"delete {tag}"):
        client.delete(tag)
    log.info("ollama.deleted", tag=tag)


def prune_versions(client: ollama.Client, name: str, keep: int, protect: set[str]) -> list[str]:
    """Delete the oldest ``name:v<N>`` beyond the newest ``keep``; return the tags deleted.

    Never deletes a tag in protect, nor the version ``name:latest`` currently points to.
    """
    if keep < 0:
        raise ValueError(f"keep must be >= 0, not {keep}")
    versions = list_versions(client, name)
    current = latest_digest(client, name)
    deleted = []
    for number in sorted(versions, reverse=True)[keep:]:
        tag = version_tag(name, number)
        if tag in protect or (current is not None and versions[number] == current):
            continue
        with ollama_calls(client, f"delete {tag}"):
            client.delete(tag)
        deleted.append(tag)
    if deleted:
        log.info("ollama.pruned", deleted=deleted, kept=keep)
    return deleted


def _host(client: ollama.Client) -> str:
    """The base URL the client talks to, for error messages."""
    return str(getattr(getattr(client, "_client", None), "base_url", "?")).rstrip("/")


# --------------------------------------------------------------------------- quantize at registration

_EIGHT_BIT = ("Q8_0", "Q6_K", "Q8_1", "Q8_K")  # 6+ bits: q8_0 keeps them at least as precise


def base_quantization(base_dir: Path) -> str | None:
    """The quantization of the GGUF a base was converted from (``Q4_0``...), None for an unquantized one.

    lacd.basemodel writes ``lacd_source.json`` beside a base converted from a GGUF (``ollama:*``,
    a ``.gguf`` path, the embedded SmolLM2); a plain HF folder has none.
    """
    import json

    import gguf

    source = Path(base_dir) / "lacd_source.json"
    if not source.is_file():
        return None
    path = Path(json.loads(source.read_text(encoding="utf-8")).get("source_gguf", ""))
    if not path.is_file():
        return None
    reader = gguf.GGUFReader(path)
    field = reader.fields.get("general.file_type")
    if field is not None:
        name = gguf.LlamaFileType(int(field.contents())).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        return None if name in ("F32", "F16", "BF16") else name
    kinds = [t.tensor_type.name for t in reader.tensors if len(t.shape) > 1]
    quantized = [k for k in kinds if k not in ("F32", "F16", "BF16")]
    return max(set(quantized), key=quantized.count) if quantized else None


def choose_quantize(setting: str, base_dir: Path, outtype: str) -> tuple[str | None, str]:
    """(Ollama quantize type or None, why) for ``[ollama] quantize``.

    "" (the default): a base that came quantized is registered quantized, so the agent's model stays
    as small as the one it replaces: q8_0 for a 6-8 bit base, q4_K_M below; a full-precision base
    (or an export that is already q8_0, which Ollama cannot quantize further) is registered as exported.
    "f16": always as exported. Anything else: that type.
    """
    if setting == "f16":
        return None, "[ollama] quantize = f16: registered as exported"
    if setting:
        return setting, f"[ollama] quantize = {setting}"
    base = base_quantization(base_dir)
    if base is None:
        return None, "the base has full precision: registered as exported"
    if outtype not in ("f16", "bf16", "f32"):
        return None, f"the base was {base} but the export is {outtype}, which Ollama cannot quantize further"
    chosen = "q8_0" if base.upper() in _EIGHT_BIT else "q4_K_M"
    return chosen, f"the base came quantized ({base}): registered as {chosen} ([ollama] quantize = f16 keeps full precision)"
