"""The stages of a run, in order. Each reads what earlier stages left in the run folder, writes
its own output under a temporary name and renames it, and returns a small JSON-able result that
the executor stores as the stage's row. A stage whose output already exists completes at once,
so resuming after a crash redoes only the interrupted stage.

    format    lessons -> dataset/ (chat template, assistant-only labels, held-out split)
    train     dataset/ -> adapter/ (LoRA in a child process; checkpoints/ for resuming)
    export    base + adapter/ -> model.gguf (one streaming pass, or llama.cpp's converter)
    register  model.gguf -> Ollama <name>:v<N>, then <name>:latest
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import structlog

from lacd.config import Settings
from lacd.runs import RunStore

log = structlog.get_logger(__name__)

STAGES = ("format", "train", "export", "register")


class DiskFull(Exception):
    """Not enough free disk for the run's artifacts; the message says how much is needed."""


@dataclass
class RunContext:
    run_id: int
    run_dir: Path
    settings: Settings
    store: RunStore
    report: Callable[[dict], None]
    stop: threading.Event

    def base_dir(self) -> Path:
        return Path(self.store.stage_result(self.run_id, "format")["base_dir"])


def system_prompt(settings: Settings) -> str:
    from lacd.pipeline.format import default_system_prompt

    path = settings.model.system_prompt
    return Path(path).expanduser().read_text(encoding="utf-8") if path else default_system_prompt()


def resolve_base(settings: Settings) -> Path:
    from lacd.basemodel import resolve_base as resolve

    client = None
    if settings.model.base.startswith("ollama:"):
        from lacd.pipeline.register import make_client

        client = make_client(settings.ollama.host)
    return resolve(settings.model.base, settings.state.dir, settings.model.allow_download, client)


def check_disk(base_dir: Path, run_dir: Path, min_free_gb: float) -> None:
    """Refuse a run that cannot fit: a GGUF about the size of the base weights, plus the margin."""
    weights = sum(p.stat().st_size for p in base_dir.glob("*.safetensors"))
    need = weights * 2 + min_free_gb * 2**30  # f32 weights shrink to f16; bf16 stay; adapters are small
    free = shutil.disk_usage(run_dir).free
    if free < need:
        raise DiskFull(f"only {free / 2**30:.1f} GB free under {run_dir}; this run needs about {need / 2**30:.1f} GB "
                       f"(free some space or lower [run] min_free_gb)")


def format_stage(ctx: RunContext) -> dict:
    from lacd.pipeline.format import FormatSpec, LessonIn, format_lessons

    s = ctx.settings
    base = resolve_base(s)
    check_disk(base, ctx.run_dir, s.run.min_free_gb)
    lessons = [LessonIn(l.id, l.conv_hash, l.messages) for l in ctx.store.lessons(ctx.run_id)]
    spec = FormatSpec(base_dir=base, out_dir=ctx.run_dir / "dataset", system_prompt=system_prompt(s),
                      max_seq_len=s.train.max_seq_len, too_long=s.train.too_long, heldout_pct=s.queue.heldout_pct,
                      max_lessons=s.queue.max_lessons, chat_family=s.model.chat_family or None)
    done = ctx.run_dir / "dataset" / "format.json"
    if done.exists():  # formatted before a crash: the folder only appears complete
        result = json.loads(done.read_text())
    else:
        result = format_lessons(lessons, spec).to_dict()
    counts = result["counts"]
    return {"base_dir": str(base), "family": result["family"], "counts": counts,
            "train_tokens": result["train_tokens"], "assistant_tokens": result["assistant_tokens"]}


def train_stage(ctx: RunContext) -> dict:
    from lacd.pipeline.train import TrainSpec, train_in_child

    s, t = ctx.settings, ctx.settings.train
    if s.ollama.unload_before_training:
        _unload_ollama(s.ollama.host)
    spec = TrainSpec(base_dir=ctx.base_dir(), dataset_dir=ctx.run_dir / "dataset", out_dir=ctx.run_dir / "adapter",
                     checkpoint_dir=ctx.run_dir / "checkpoints", progress_path=ctx.run_dir / "progress.json",
                     lora_r=t.lora_r, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout,
                     learning_rate=t.learning_rate, epochs=t.epochs, tokens_per_batch=t.tokens_per_batch,
                     grad_accum=t.grad_accum, max_seq_len=t.max_seq_len, seed=t.seed,
                     checkpoint_every=t.checkpoint_every, device=t.device,
                     num_threads=t.threads or max(1, (os.cpu_count() or 2) // 2))
    result = train_in_child(spec, on_progress=ctx.report, stop=ctx.stop)
    return _plain(result)


def modelfile(family: str, system: str, num_ctx: int) -> str:
    """The Modelfile equivalent of what the register stage sends (for `ollama create -f`)."""
    from lacd.pipeline import template

    stops = "".join(f'PARAMETER stop "{s}"\n' for s in template.stop_tokens(family))
    return (f'FROM ./model.gguf\nTEMPLATE """{template.ollama_template(family)}"""\nSYSTEM """{system}"""\n'
            f"{stops}PARAMETER num_ctx {num_ctx}\n")


def export_stage(ctx: RunContext) -> dict:
    from lacd.export import export_gguf, export_with_llama_cpp

    e = ctx.settings.export
    out = ctx.run_dir / "model.gguf"
    family = ctx.store.stage_result(ctx.run_id, "format")["family"]
    (ctx.run_dir / "Modelfile").write_text(modelfile(family, system_prompt(ctx.settings), ctx.settings.ollama.num_ctx))
    if out.exists():
        return {"path": str(out), "bytes": out.stat().st_size, "skipped": "already exported"}
    progress = lambda done, total: ctx.report({"tensor": done, "tensors": total})  # noqa: E731
    if e.converter == "llama.cpp":
        result = export_with_llama_cpp(ctx.base_dir(), ctx.run_dir / "adapter", out, e.outtype, Path(e.llama_cpp_convert))
    else:
        result = export_gguf(ctx.base_dir(), ctx.run_dir / "adapter", out, e.outtype, progress)
    return {"path": str(out), "bytes": result.bytes_written, "seconds": round(result.seconds, 2),
            "tensors": result.n_tensors, "merged_tensors": result.merged_tensors}


def register_stage(ctx: RunContext) -> dict:
    from lacd.pipeline import register, template

    s = ctx.settings
    family = ctx.store.stage_result(ctx.run_id, "format")["family"]
    run = ctx.store.get(ctx.run_id)
    version = ctx.store.version_for(ctx.run_id, s.model.name, run.lesson_count)
    client = register.make_client(s.ollama.host)
    gguf = ctx.run_dir / "model.gguf"
    params = {"stop": template.stop_tokens(family), "num_ctx": s.ollama.num_ctx}
    tag = register.version_tag(s.model.name, version)
    if not gguf.exists() and version in register.list_versions(client, s.model.name):
        log.info("register_resumed", run=ctx.run_id, tag=tag)  # registered before a crash; the GGUF is gone
    else:
        ctx.report({"waiting_for": f"Ollama at {s.ollama.host}"})
        register.create_version(client, s.model.name, version, gguf, template.ollama_template(family),
                                system_prompt(s), params, s.ollama.quantize or None,
                                on_status=lambda status: ctx.report({"ollama": status}))
    digest = register.file_digest(gguf) if gguf.exists() else None
    register.promote(client, s.model.name, tag)
    ctx.store.mark_version(ctx.run_id, "promoted", digest=digest, active=True)
    pruned = register.prune_versions(client, s.model.name, s.ollama.keep_versions, protect={tag})
    if gguf.exists() and not s.run.keep_gguf:
        gguf.unlink()
    return {"tag": tag, "latest": register.latest_tag(s.model.name), "digest": digest, "pruned": pruned}


STAGE_FUNCTIONS: dict[str, Callable[[RunContext], dict]] = {
    "format": format_stage, "train": train_stage, "export": export_stage, "register": register_stage,
}


def _unload_ollama(host: str) -> None:
    from lacd.pipeline import register

    try:
        unloaded = register.unload_all(register.make_client(host))
        log.info("ollama_unloaded", models=unloaded)
    except register.OllamaError as exc:  # training goes on; the GPU may simply be shared
        log.warning("ollama_unload_failed", error=str(exc))


def _plain(result) -> dict:
    import dataclasses

    out = dataclasses.asdict(result)
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in out.items()}
