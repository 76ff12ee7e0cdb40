"""Settings: one TOML file plus LACD_* environment overrides, validated once at the edge.

Where the file is found, first match wins: ``--config PATH``, ``$LACD_CONFIG``,
``~/.config/lacd/config.toml``, ``/etc/lacd/config.toml``; with none of them the embedded
defaults apply. Any key can be overridden by ``LACD_<SECTION>_<KEY>`` (``LACD_QUEUE_THRESHOLD=8``).

Every key is declared once, in the section dataclasses below, with its type, default, check and
help text; :func:`render_default_config` writes the commented file that ``lacd init`` creates from
the same declarations, so the reference cannot drift from the code.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from lacd.protocol import parse_tools


class ConfigError(Exception):
    """A configuration problem, with a message that names the key and where it came from."""


def _key(default: Any, help: str, check: Callable[[Any], str | None] | None = None) -> Any:
    return field(default=default, metadata={"help": help, "check": check})


def _at_least(low: float) -> Callable[[Any], str | None]:
    return lambda v: None if v >= low else f"must be >= {low}"


def _one_of(*choices: str) -> Callable[[Any], str | None]:
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)}"


def _between(low: float, high: float) -> Callable[[Any], str | None]:
    return lambda v: None if low <= v <= high else f"must be between {low} and {high}"


def _window_check(value: str) -> str | None:
    if value and parse_window(value) is None:
        return "must look like HH:MM-HH:MM"
    return None


def parse_window(value: str) -> tuple[int, int] | None:
    """'01:00-06:00' -> (60, 360) minutes after midnight; None when malformed."""
    try:
        start, end = (part.strip() for part in value.split("-"))
        minutes = [int(t.split(":")[0]) * 60 + int(t.split(":")[1]) for t in (start, end)]
    except (ValueError, IndexError):
        return None
    if not all(0 <= m < 24 * 60 for m in minutes) or minutes[0] == minutes[1]:
        return None
    return minutes[0], minutes[1]


def _devices_check(value: str) -> str | None:
    if value == "auto" or (value.isdigit() and int(value) >= 1):
        return None
    return "must be auto or a whole number >= 1"


def _model_name_check(value: str) -> str | None:
    if value and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._/-]*(:[A-Za-z0-9_][A-Za-z0-9._-]*)?", value):
        return "must be a model name like codellama or codellama:7b"
    return None


def _default_state_dir() -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "lacd")


@dataclass(frozen=True)
class Watch:
    log: Path = _key(Path("~/agent_interactions.jsonl"), "the agent's log: agent_interactions.jsonl")
    poll_interval: float = _key(1.0, "seconds between stat polls (the fallback when no file event arrives)", _between(0.05, 60))
    max_line_bytes: int = _key(16 * 1024 * 1024, "lines longer than this are rejected without being read into memory", _at_least(1024))
    rotate_wait: float = _key(5.0, "seconds a rotated-away file is still read for late appends", _at_least(0))
    batch_lines: int = _key(2000, "lines committed per SQLite transaction during a backfill", _at_least(1))


@dataclass(frozen=True)
class State:
    dir: Path = _key(Path(_default_state_dir()), "database, lock and run folders live here")


@dataclass(frozen=True)
class Queue:
    threshold: int = _key(50, "a training run starts once this many usable lessons are pending", _at_least(1))
    max_lessons: int = _key(5000, "a run trains on at most this many usable lessons, newest first", _at_least(1))
    heldout_pct: float = _key(10.0, "percent of lessons kept out of training for evaluation (chosen by lesson hash)", _between(0, 50))


@dataclass(frozen=True)
class Schedule:
    interval: float = _key(60.0, "seconds between checks whether a run should start", _at_least(1))
    window: str = _key("", "only start runs inside this daily window, e.g. 01:00-06:00 (empty: any time)", _window_check)
    cooldown: float = _key(0.0, "minutes to wait after a run ends before the next one starts", _at_least(0))
    idle_minutes: float = _key(10.0, "a run starts (or a paused one resumes) only after the agent's log has been quiet this long", _at_least(0))
    yield_s: float = _key(10.0, "seconds within which a run steps aside (checkpoint, child exits) once the agent is active", _between(1, 600))
    gpu_other_mb: float = _key(512.0, "GPU memory (MB, NVML) other processes may hold before the GPU counts as in use", _at_least(0))
    cpu_other_pct: float = _key(25.0, "without NVIDIA: percent of all cores other processes may use before the machine counts as in use (0: not watched)", _between(0, 100))
    on_ollama_error: str = _key("busy", "Ollama unreachable or /api/ps unreadable: treat the agent as busy or as idle", _one_of("busy", "idle"))
    on_gpu_error: str = _key("busy", "NVML failing on a machine that has it: treat the GPU as busy or as idle", _one_of("busy", "idle"))


@dataclass(frozen=True)
class Train:
    learning_rate: float = _key(2e-4, "AdamW learning rate", _between(1e-7, 1.0))
    epochs: int = _key(2, "passes over the training lessons", _at_least(1))
    tokens_per_batch: int = _key(4096, "token budget of one packed micro-batch", _at_least(64))
    grad_accum: int = _key(1, "micro-batches per optimizer step", _at_least(1))
    max_seq_len: int = _key(2048, "longest example in tokens", _at_least(64))
    too_long: str = _key("truncate", "what happens to a longer example: truncate or drop", _one_of("truncate", "drop"))
    lora_r: int = _key(16, "LoRA rank", _at_least(1))
    lora_alpha: int = _key(32, "LoRA alpha (scale = alpha / r)", _at_least(1))
    lora_dropout: float = _key(0.05, "LoRA dropout", _between(0, 0.9))
    checkpoint_every: int = _key(50, "optimizer steps between checkpoints (a killed run resumes from the last)", _at_least(1))
    seed: int = _key(0, "random seed (same lessons and seed: same model)")
    device: str = _key("auto", "auto (CUDA bf16 if present, else CPU fp32), cuda or cpu", _one_of("auto", "cuda", "cpu"))
    threads: int = _key(0, "CPU threads for training (0: half the cores, so the workstation stays usable)", _at_least(0))
    base_precision: str = _key("auto", "base weights while training: auto (on a GPU the memory plan: bf16 where it fits, else 4-bit nf4; on a CPU bf16 where it computes bf16 natively, AVX512-BF16 or AMX, else float32), bf16, nf4 (needs torchao: pip install 'lacd[gpu]'), or float32 (CPU only)", _one_of("auto", "bf16", "nf4", "float32"))
    gpu_memory_gb: float = _key(0.0, "GPU memory (GiB) the training plan may use (0: what is free when training starts)", _at_least(0))
    shared_prefix: str = _key("auto", "lessons sharing a prefix (the agent's system prompt): auto (the prefix held once per packed row and counted once in the token budget: ~3x fewer, larger steps at learning_rate x the steps saved; learned as much as today's packing on the pretrained SmolLM2), same-steps (today's optimizer steps, each row computing the prefix once) or off (every lesson carries the prefix)", _one_of("auto", "same-steps", "off"))
    devices: str = _key("auto", "processes that train a run: auto (1, or every visible GPU when one card cannot hold the run in bf16 or grad_accum >= 2 gives each one micro-batches: torchrun + FSDP2) or N (on the CPU: N gloo processes)", _devices_check)


@dataclass(frozen=True)
class Run:
    retries: int = _key(3, "attempts of a failing stage before the run fails", _at_least(1))
    backoff: float = _key(30.0, "seconds before the first retry; doubles each time (Ollama waits are capped at 10 minutes)", _at_least(0))
    keep_runs: int = _key(3, "run folders kept on disk (older ones are deleted)", _at_least(1))
    keep_gguf: bool = _key(False, "keep model.gguf in the run folder after Ollama has it")
    min_free_gb: float = _key(2.0, "free disk (GB) required beyond a run's expected artifacts", _at_least(0))


@dataclass(frozen=True)
class Curation:
    duplicate: bool = _key(True, "exclude an exact duplicate of an earlier lesson's conversation")
    no_reply: bool = _key(True, "exclude a lesson with no non-empty reply")
    empty_prompt: bool = _key(True, "exclude a lesson whose user prompt is empty")
    fabricated_output: bool = _key(True, "exclude a lesson where the model wrote its own <tool_output>")
    all_tools_failed: bool = _key(True, "exclude a lesson where every tool execution failed")


def _kinds_check(value: str) -> str | None:
    if not split_list(value):
        return None
    from lacd.ingest.secrets import KINDS  # only when kinds are named: the scanner is slow to import

    unknown = [k for k in split_list(value) if k not in KINDS and k != "all"]
    return f"unknown kind {unknown[0]!r}; kinds: all, {', '.join(KINDS)}" if unknown else None


def _paths_check(value: str) -> str | None:
    return None if split_list(value) else "must name at least one pattern (e.g. .env,*.pem)"


def split_list(value: str) -> list[str]:
    """A comma-separated setting as a list (blanks dropped)."""
    return [part.strip() for part in value.split(",") if part.strip()]


_SECRET_PATHS = ".env,*.env,.env.*,id_rsa,id_dsa,id_ecdsa,id_ed25519,*.pem,*.key,.netrc,.npmrc,.pypirc,.pgpass,.git-credentials,credentials"


@dataclass(frozen=True)
class Secrets:
    scan: bool = _key(True, "scan every lesson for secrets at ingestion and redact them before anything is stored")
    exclude: str = _key("", "comma-separated secret kinds whose lessons are excluded instead of redacted (all: every kind)", _kinds_check)
    paths: str = _key(_SECRET_PATHS, "comma-separated file patterns whose content is secret by nature: a tool output that read one is redacted whole", _paths_check)
    entropy_limit: float = _key(4.5, "bits per character above which a quoted base64-like string of 20+ characters is a secret", _between(0.5, 8))
    hex_limit: float = _key(0.0, "the same for quoted hex strings of 32+ characters (0: off; hex in code is mostly digests)", _between(0, 8))


@dataclass(frozen=True)
class Model:
    base: str = _key("smollm2-135m", "base model: a local HF folder, a .gguf file, an HF hub id in the local cache, ollama:<model>, or smollm2-135m")
    name: str = _key("lacd-coder", "Ollama model name; versions are registered as <name>:v<N>, the active one as <name>:latest")
    system_prompt: str = _key("", "file with the agent's system prompt (empty: local-ai-coder's own, shipped with lacd)")
    chat_family: str = _key("", "chat format: chatml or llama2 (empty: detected from the base model's chat template)", _one_of("", "chatml", "llama2"))
    allow_download: bool = _key(False, "let a hub id be downloaded at run time (off: the local cache only)")
    serve_as: str = _key("", "the model name the agent asks Ollama for (local-ai-coder: codellama): on each promotion or rollback it is pointed at the promoted version, the user's own model kept as <name>:original (empty: only <name>:latest)", _model_name_check)


@dataclass(frozen=True)
class Ollama:
    host: str = _key("http://127.0.0.1:11434", "the Ollama server lacd registers models with")
    quantize: str = _key("", "quantize when registering: q4_K_M, q4_K_S, q8_0, or f16 to keep the exported precision (empty: q4_K_M or q8_0 like a quantized base, as exported otherwise)", _one_of("", "f16", "q4_K_M", "q4_K_S", "q8_0"))
    num_ctx: int = _key(4096, "context window registered as PARAMETER num_ctx", _at_least(256))
    unload_before_training: bool = _key(True, "ask Ollama to unload its models (keep_alive 0) before training on a GPU")
    keep_versions: int = _key(5, "v<N> versions kept in Ollama; older ones are removed", _at_least(1))


@dataclass(frozen=True)
class Export:
    converter: str = _key("builtin", "builtin (one streaming pass) or llama.cpp (merge, then run llama_cpp_convert)", _one_of("builtin", "llama.cpp"))
    llama_cpp_convert: str = _key("", "path of llama.cpp's convert_hf_to_gguf.py, for converter = llama.cpp")
    outtype: str = _key("f16", "GGUF tensor type: f16, bf16, f32 or q8_0", _one_of("f16", "bf16", "f32", "q8_0"))


def _tools_check(value: str) -> str | None:
    if value in ("", "v1", "v2"):
        return None
    try:
        parse_tools(value)
    except ValueError as exc:
        return f"must be v1, v2 or a list like read_file(1), list_directory(1-2): {exc}"
    return None


@dataclass(frozen=True)
class Evaluate:
    max_cases: int = _key(50, "held-out prompts each model answers (the first N held-out lessons with a reply)", _at_least(1))
    max_new_tokens: int = _key(128, "token budget of one generated reply; a reply still going at the budget did not stop cleanly", _at_least(1))
    tools: str = _key("v1", "the agent's tools and argument counts: v1 (local-ai-coder's 8 tools), v2 (the later agent's 16), or a list like read_file(1), list_directory(1-2)", _tools_check)
    threads: int = _key(0, "CPU threads for evaluation (0: as [train] threads)", _at_least(0))
    timeout: float = _key(14400.0, "seconds one evaluation may take before the attempt fails and is retried (0: no limit; a 7B model on a CPU needs hours)", _at_least(0))


_GATE_METRICS = ("exact_call_accuracy", "tool_name_accuracy", "tool_call_validity", "clean_stop_rate",
                 "fabricated_output_rate", "heldout_loss", "perplexity")


@dataclass(frozen=True)
class Gate:
    primary: str = _key("exact_call_accuracy", "the metric a candidate must not lose on: " + ", ".join(_GATE_METRICS), _one_of(*_GATE_METRICS))
    tolerance: float = _key(0.02, "how much worse than the model in use the primary metric may be (absolute)", _between(0, 1))
    max_loss_increase: float = _key(0.05, "guard: held-out loss may be at most this fraction above the model in use's (0.05 = 5%)", _at_least(0))
    max_fabricated_increase: float = _key(0.02, "guard: fabricated-output rate may rise by at most this much (absolute)", _between(0, 1))
    max_clean_stop_drop: float = _key(0.05, "guard: clean-stop rate may fall by at most this much (absolute)", _between(0, 1))
    if_unmeasured: str = _key("reject", "no held-out prompt to measure on (too few lessons): reject the candidate, or promote it unmeasured", _one_of("reject", "promote"))


@dataclass(frozen=True)
class Forget:
    max_share: float = _key(0.2, "`lacd forget --pattern` refuses a pattern matching more than this share of all lessons and rejected lines unless given --all-matching", _between(0, 1))


@dataclass(frozen=True)
class Log:
    level: str = _key("info", "debug, info, warning or error", _one_of("debug", "info", "warning", "error"))
    format: str = _key("auto", "auto (console on a TTY, JSON otherwise), console or json", _one_of("auto", "console", "json"))


@dataclass(frozen=True)
class Settings:
    """All of lacd's configuration; built only by :func:`load`."""

    watch: Watch = field(default_factory=Watch)
    state: State = field(default_factory=State)
    queue: Queue = field(default_factory=Queue)
    schedule: Schedule = field(default_factory=Schedule)
    train: Train = field(default_factory=Train)
    run: Run = field(default_factory=Run)
    curation: Curation = field(default_factory=Curation)
    secrets: Secrets = field(default_factory=Secrets)
    model: Model = field(default_factory=Model)
    ollama: Ollama = field(default_factory=Ollama)
    export: Export = field(default_factory=Export)
    evaluate: Evaluate = field(default_factory=Evaluate)
    gate: Gate = field(default_factory=Gate)
    forget: Forget = field(default_factory=Forget)
    log: Log = field(default_factory=Log)
    source: str = "embedded defaults"

    @property
    def db_path(self) -> Path:
        return self.state.dir / "lacd.db"

    @property
    def lock_path(self) -> Path:
        return self.state.dir / "lacd.lock"

    @property
    def runs_dir(self) -> Path:
        return self.state.dir / "runs"


SECTIONS: dict[str, type] = {
    f.name: f.default_factory  # type: ignore[misc]
    for f in dataclasses.fields(Settings)
    if f.default_factory is not dataclasses.MISSING
}


def find_config(explicit: str | None, env: Mapping[str, str]) -> Path | None:
    """The config file to read, or None for the embedded defaults."""
    if explicit:
        return _must_exist(Path(explicit).expanduser(), "--config")
    if env.get("LACD_CONFIG"):
        return _must_exist(Path(env["LACD_CONFIG"]).expanduser(), "LACD_CONFIG")
    for candidate in (Path("~/.config/lacd/config.toml").expanduser(), Path("/etc/lacd/config.toml")):
        if candidate.is_file():
            return candidate
    return None


def _must_exist(path: Path, origin: str) -> Path:
    if not path.is_file():
        raise ConfigError(f"config file {path} (from {origin}) does not exist; `lacd init` writes one")
    return path


def load(explicit: str | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Read, merge and validate the configuration; raise ConfigError naming the bad key."""
    env = os.environ if env is None else env
    path = find_config(explicit, env)
    raw = _read_toml(path) if path else {}
    base_dir = path.parent if path else Path.cwd()
    sections = {}
    for name, cls in SECTIONS.items():
        given = raw.pop(name, {})
        if not isinstance(given, dict):
            raise ConfigError(f"[{name}] must be a table in {path}")
        sections[name] = _build_section(name, cls, given, env, base_dir, path)
    if raw:
        raise ConfigError(f"unknown section [{sorted(raw)[0]}] in {path}; known: {', '.join(SECTIONS)}")
    _reject_unknown_env(env)
    return Settings(**sections, source=str(path) if path else "embedded defaults")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None


def _build_section(name, cls, given, env, base_dir, path):
    values = {}
    for f in dataclasses.fields(cls):
        env_name = f"LACD_{name}_{f.name}".upper()
        in_file = given.pop(f.name, None)
        if env_name in env:
            value, origin, rel = env[env_name], env_name, Path.cwd()
        elif in_file is not None:
            value, origin, rel = in_file, str(path), base_dir
        else:
            continue
        values[f.name] = _coerce(f, value, f"[{name}] {f.name}", origin, rel)
    if given:
        known = ", ".join(f.name for f in dataclasses.fields(cls))
        raise ConfigError(f"unknown key [{name}] {sorted(given)[0]} in {path}; known keys: {known}")
    for f in dataclasses.fields(cls):
        value = values.get(f.name, f.default)
        if isinstance(value, Path):
            values[f.name] = value.expanduser()
    return cls(**values)


def _coerce(f: dataclasses.Field, value: Any, key: str, origin: str, rel: Path) -> Any:
    kind = type(f.default)
    try:
        out = _convert(kind, value, rel)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected {_type_name(kind)}, got {value!r} (from {origin})") from None
    problem = f.metadata["check"](out) if f.metadata.get("check") else None
    if problem:
        raise ConfigError(f"{key}: {problem} (got {value!r}, from {origin})")
    return out


def _convert(kind: type, value: Any, rel: Path) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ValueError(value)
    if kind is int:
        if isinstance(value, bool) or isinstance(value, float):
            raise TypeError(value)
        return int(value)
    if kind is float:
        if isinstance(value, bool):
            raise TypeError(value)
        return float(value)
    if issubclass(kind, Path):
        if not isinstance(value, str) or not value:
            raise TypeError(value)
        p = Path(value).expanduser()
        return p if p.is_absolute() else (rel / p)
    if isinstance(value, int) and not isinstance(value, bool):  # devices = 2 as well as "2"
        return str(value)
    if not isinstance(value, str):
        raise TypeError(value)
    return value


def _type_name(kind: type) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(kind, "a path")


def _reject_unknown_env(env: Mapping[str, str]) -> None:
    known = {f"LACD_{s}_{f.name}".upper() for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    known |= {"LACD_CONFIG"}
    for name in env:
        if name.startswith("LACD_") and name not in known:
            raise ConfigError(f"unknown environment variable {name}; known: LACD_CONFIG, LACD_<SECTION>_<KEY> for the keys `lacd init` writes")


def render_default_config() -> str:
    """The commented TOML that `lacd init` writes: every key, its default and what it does."""
    lines = ["# lacd configuration. Every key is shown with its default; any key can be", "# overridden by LACD_<SECTION>_<KEY> in the environment.", ""]
    for name, cls in SECTIONS.items():
        lines.append(f"[{name}]")
        for f in dataclasses.fields(cls):
            lines.append(f"# {f.metadata['help']}")
            lines.append(f"{f.name} = {_toml_value(f.default)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'
