"""The stages of a run, in order. Each reads what earlier stages left in the run folder, writes
its own output under a temporary name and renames it, and returns its typed result
(lacd.pipeline.results) that the executor stores as the stage's row. A stage whose output
already exists completes at once, so resuming after a crash redoes only the interrupted stage.

    format    lessons -> dataset/ (chat template, assistant-only labels, held-out split)
    train     dataset/ -> adapter/ (LoRA in a child process; checkpoints/ for resuming)
    export    base + adapter/ -> model.gguf (one streaming pass, or llama.cpp's converter)
    register  model.gguf -> Ollama <name>:v<N> (not yet <name>:latest)
    evaluate  candidate and model in use on the held-out lessons -> evaluation.json (child process)
    promote   the gate -> gate.json; <name>:latest moves to v<N> only if it passed; old versions pruned

A stage that cannot go on yet raises StageWaiting, one cut short raises StageInterrupted
(lacd.pipeline.errors). The torch-heavy modules (train, evaluate, export) are imported inside the
stages that run them, so importing this module stays cheap.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

import structlog

from lacd import basemodel, db, served
from lacd.artifacts import write_json_atomic, write_text_atomic
from lacd.config import Settings
from lacd.pipeline import gate, register, template
from lacd.pipeline.format import FormatSpec, LessonIn, default_system_prompt, format_lessons
from lacd.pipeline.results import (
    EvaluateStageResult, ExportStageResult, FormatStageResult, PromoteStageResult, RegisterStageResult, StageResult,
    TrainStageResult,
)
from lacd.pipeline.trainspec import TrainSpec
from lacd.protocol import TOOLS_V1, TOOLS_V2, parse_tools
from lacd.runs import RunStore
from lacd.versions import VersionStore

log = structlog.get_logger(__name__)
R = TypeVar("R", bound=StageResult)

STAGES = ("format", "train", "export", "register", "evaluate", "promote")
GATE_FILE = "gate.json"


class DiskFull(Exception):
    """Not enough free disk for the run's artifacts; the message says how much is needed."""


@dataclass
class RunContext:
    run_id: int
    run_dir: Path
    settings: Settings
    store: RunStore
    versions: VersionStore
    report: Callable[[dict], None]
    stop: threading.Event
    pause: threading.Event | None = None  # set when the agent becomes active: train and evaluate step aside

    def result(self, kind: type[R]) -> R:
        """The result of an earlier stage of this run (one that must be done: the stages run in order)."""
        found = self.store.result(self.run_id, kind)
        if found is None:
            raise RuntimeError(f"run #{self.run_id} has no {kind.STAGE} result; that stage must run first")
        return found

    def base_dir(self) -> Path:
        return Path(self.result(FormatStageResult).base_dir)


def system_prompt(settings: Settings) -> str:
    path = settings.model.system_prompt
    return Path(path).expanduser().read_text(encoding="utf-8") if path else default_system_prompt()


def resolve_base(settings: Settings) -> Path:
    client = None
    if settings.model.base.startswith("ollama:"):
        client = register.make_client(settings.ollama.host)
        engine = db.read_engine(settings.db_path) if settings.db_path.exists() else None
        original = served.base_source(settings, engine)  # never a model lacd itself put under the agent's name
        if original is not None:
            client = served.OriginalOf(client, settings.model.serve_as, original)
    return basemodel.resolve_base(settings.model.base, settings.state.dir, settings.model.allow_download, client)


def check_disk(base_dir: Path, run_dir: Path, min_free_gb: float) -> None:
    """Refuse a run that cannot fit: a GGUF about the size of the base weights, plus the margin."""
    weights = sum(p.stat().st_size for p in base_dir.glob("*.safetensors"))
    need = weights * 2 + min_free_gb * 2**30  # f32 weights shrink to f16; bf16 stay; adapters are small
    free = shutil.disk_usage(run_dir).free
    if free < need:
        raise DiskFull(f"only {free / 2**30:.1f} GB free under {run_dir}; this run needs about {need / 2**30:.1f} GB "
                       f"(free some space or lower [run] min_free_gb)")


def format_stage(ctx: RunContext) -> FormatStageResult:
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
    return FormatStageResult(base_dir=str(base), family=result["family"], counts=result["counts"],
                        train_tokens=result["train_tokens"], assistant_tokens=result["assistant_tokens"])


def train_stage(ctx: RunContext) -> TrainStageResult:
    from lacd.pipeline.train import train_in_child

    s, t = ctx.settings, ctx.settings.train
    if s.ollama.unload_before_training and _trains_on_gpu(t.device):
        _unload_ollama(s.ollama.host)
    spec = TrainSpec(base_dir=ctx.base_dir(), dataset_dir=ctx.run_dir / "dataset", out_dir=ctx.run_dir / "adapter",
                     checkpoint_dir=ctx.run_dir / "checkpoints", progress_path=ctx.run_dir / "progress.json",
                     lora_r=t.lora_r, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout,
                     learning_rate=t.learning_rate, epochs=t.epochs, tokens_per_batch=t.tokens_per_batch,
                     grad_accum=t.grad_accum, max_seq_len=t.max_seq_len, seed=t.seed,
                     checkpoint_every=t.checkpoint_every, device=t.device, shared_prefix=t.shared_prefix,
                     base_precision=t.base_precision, gpu_memory_gib=t.gpu_memory_gb, devices=t.devices,
                     num_threads=t.threads or max(1, (os.cpu_count() or 2) // 2))
    result = train_in_child(spec, on_progress=ctx.report, stop=ctx.stop, pause=ctx.pause, yield_s=s.schedule.yield_s)
    return TrainStageResult.from_dict(_plain(result))


def modelfile(family: str, system: str, num_ctx: int) -> str:
    """The Modelfile equivalent of what the register stage sends (for `ollama create -f`)."""
    stops = "".join(f'PARAMETER stop "{s}"\n' for s in template.stop_tokens(family))
    return (f'FROM ./model.gguf\nTEMPLATE """{template.ollama_template(family)}"""\nSYSTEM """{system}"""\n'
            f"{stops}PARAMETER num_ctx {num_ctx}\n")


def export_stage(ctx: RunContext) -> ExportStageResult:
    from lacd.export import export_gguf, export_with_llama_cpp

    e = ctx.settings.export
    out = ctx.run_dir / "model.gguf"
    family = ctx.result(FormatStageResult).family
    write_text_atomic(ctx.run_dir / "Modelfile", modelfile(family, system_prompt(ctx.settings), ctx.settings.ollama.num_ctx))
    if out.exists():
        return ExportStageResult(path=str(out), bytes=out.stat().st_size, skipped="already exported")
    progress = lambda done, total: ctx.report({"tensor": done, "tensors": total})  # noqa: E731
    if e.converter == "llama.cpp":
        result = export_with_llama_cpp(ctx.base_dir(), ctx.run_dir / "adapter", out, e.outtype, Path(e.llama_cpp_convert))
    else:
        result = export_gguf(ctx.base_dir(), ctx.run_dir / "adapter", out, e.outtype, progress)
    return ExportStageResult(path=str(out), bytes=result.bytes_written, seconds=round(result.seconds, 2),
                        tensors=result.n_tensors, merged_tensors=result.merged_tensors)


def register_stage(ctx: RunContext) -> RegisterStageResult:
    """Create <name>:v<N> from model.gguf; <name>:latest moves only in the promote stage."""
    s = ctx.settings
    family = ctx.result(FormatStageResult).family
    run = ctx.store.get(ctx.run_id)
    version = ctx.versions.allocate(ctx.run_id, s.model.name, run.lesson_count)
    client = register.make_client(s.ollama.host)
    gguf = ctx.run_dir / "model.gguf"
    params = {"stop": template.stop_tokens(family), "num_ctx": s.ollama.num_ctx}
    tag = register.version_tag(s.model.name, version)
    quantize, why = register.choose_quantize(s.ollama.quantize, ctx.base_dir(), s.export.outtype)
    if not gguf.exists() and version in register.list_versions(client, s.model.name):
        log.info("register_resumed", run=ctx.run_id, tag=tag)  # registered before a crash; the GGUF is gone
    else:
        ctx.report({"waiting_for": f"Ollama at {s.ollama.host}"})
        log.info("register_quantize", run=ctx.run_id, quantize=quantize, reason=why)
        register.create_version(client, s.model.name, version, gguf, template.ollama_template(family),
                                system_prompt(s), params, quantize,
                                on_status=lambda status: ctx.report({"ollama": status}))
    digest = register.file_digest(gguf) if gguf.exists() else None
    ctx.versions.mark(ctx.run_id, "registered", digest=digest)
    return RegisterStageResult(tag=tag, digest=digest, quantize=quantize, quantize_reason=why)


def eval_tools(value: str) -> dict[str, tuple[int, int]]:
    """[evaluate] tools as {name: (min_args, max_args)}: v1, v2 or an explicit list."""
    return dict({"": TOOLS_V1, "v1": TOOLS_V1, "v2": TOOLS_V2}.get(value) or parse_tools(value))


def evaluate_stage(ctx: RunContext) -> EvaluateStageResult:
    """Measure the candidate and the model in use on the held-out lessons (in a child process)."""
    from lacd.pipeline import evaluate as ev

    s = ctx.settings
    out = ctx.run_dir / ev.RESULT_FILE
    if out.exists():  # evaluated before a crash
        result = json.loads(out.read_text(encoding="utf-8"))
        result.pop("cases", None)
        return EvaluateStageResult.from_dict({**result, "skipped": "already evaluated"})
    fmt = json.loads((ctx.run_dir / "dataset" / "format.json").read_text(encoding="utf-8"))
    cases = ev.heldout_prompts(ctx.store.lessons(ctx.run_id), fmt["heldout_ids"], fmt["family"], system_prompt(s),
                               s.evaluate.max_cases)
    candidate, incumbent = _compared_models(ctx)
    train = ctx.result(TrainStageResult)
    known = {"candidate": train.heldout_loss_after}
    if incumbent.is_base:  # the trainer measured the base model on this very split before training
        known["incumbent"] = train.heldout_loss_before
    known = {role: loss for role, loss in known.items() if loss is not None}  # the child measures the rest
    client = register.make_client(s.ollama.host)
    if not incumbent.is_base and incumbent.adapter_dir is None and not register.is_reachable(client):
        raise register.OllamaUnavailable(f"Ollama is not reachable at {s.ollama.host}, and the model in use "
                                         f"({incumbent.label}) can only be measured there: its run folder is gone")
    if candidate.adapter_dir is None and not register.is_reachable(client):
        raise register.OllamaUnavailable(f"Ollama is not reachable at {s.ollama.host}, and the candidate was "
                                         f"registered quantized: it is measured as Ollama serves it")
    log.info("evaluate_started", run=ctx.run_id, cases=len(cases), candidate=candidate.label, incumbent=incumbent.label)
    if not cases:
        result = ev.unmeasured_result(candidate, incumbent, known)
        write_json_atomic(out, result)
        return EvaluateStageResult.from_dict(result)
    spec = ev.EvalSpec(base_dir=ctx.base_dir(), dataset_dir=ctx.run_dir / "dataset", family=fmt["family"],
                       tools=eval_tools(s.evaluate.tools), max_tokens=s.evaluate.max_new_tokens,
                       max_seq_len=s.train.max_seq_len, tokens_per_batch=s.train.tokens_per_batch,
                       device=s.train.device, threads=_eval_threads(s))
    ctx.report({"phase": "evaluate", "cases": len(cases)})
    return EvaluateStageResult.from_dict(ev.evaluate_in_child(
        spec, cases, candidate, incumbent, out, ollama_host=s.ollama.host, known_losses=known,
        timeout_s=s.evaluate.timeout or None, stop=ctx.stop, pause=ctx.pause))


def _compared_models(ctx: RunContext):
    """(candidate, model in use) as ModelRefs: the run's own version, and the active one (or the base)."""
    from lacd.pipeline.evaluate import ModelRef, incumbent_ref

    tag = ctx.versions.of_run(ctx.run_id).tag
    gguf = ctx.run_dir / "model.gguf"
    candidate = ModelRef(tag, adapter_dir=ctx.run_dir / "adapter", gguf=gguf if gguf.exists() else None, ollama_tag=tag)
    if ctx.result(RegisterStageResult).quantize:
        candidate = ModelRef(tag, ollama_tag=tag)  # what the agent gets: Ollama's quantized file, not the f16 export
    active = ctx.versions.active(ctx.settings.model.name)
    if active is None:
        return candidate, incumbent_ref(None, None)
    run_dir = ctx.settings.runs_dir / str(active.run_id) if active.run_id is not None else None
    return candidate, incumbent_ref(active.tag, run_dir)


def _eval_threads(s: Settings) -> int:
    return s.evaluate.threads or s.train.threads or max(1, (os.cpu_count() or 2) // 2)


def gate_decision(ctx: RunContext, evaluation: EvaluateStageResult) -> gate.Decision:
    """The gate's Decision for this run: gate.json if it was decided before a crash, else decided now."""
    path = ctx.run_dir / GATE_FILE
    if path.exists():
        return gate.Decision.from_dict(json.loads(path.read_text(encoding="utf-8")))
    g = ctx.settings.gate
    guards = {"heldout_loss": g.max_loss_increase, "fabricated_output_rate": g.max_fabricated_increase,
              "clean_stop_rate": g.max_clean_stop_drop}
    guards.pop(g.primary, None)
    decision = gate.decide(evaluation.candidate or {}, evaluation.incumbent or {}, g.primary,
                           g.tolerance, guards, g.if_unmeasured)
    if not decision.promote and ctx.store.get(ctx.run_id).reason == "forget":
        decision = gate.Decision(True, ["a forget run replaces the model in use whatever the gate says", *decision.reasons])
    write_json_atomic(path, decision.to_dict())
    return decision


def promote_stage(ctx: RunContext) -> PromoteStageResult:
    """Move <name>:latest to this run's version if the gate passes; prune old versions either way."""
    s = ctx.settings
    evaluation = ctx.result(EvaluateStageResult)
    decision = gate_decision(ctx, evaluation)
    version = ctx.versions.of_run(ctx.run_id)
    client = register.make_client(s.ollama.host)
    metrics = {**evaluation.gate_metrics(), "gate": decision.to_dict()}
    if decision.promote:
        register.promote(client, s.model.name, version.tag)
        serve_promoted(ctx, client, version.tag)
        ctx.versions.activate(s.model.name, version.version, metrics=metrics, note=decision.summary())
    else:
        ctx.versions.mark(ctx.run_id, "rejected", metrics=metrics, note=decision.summary())
    log.info("gate_decided", run=ctx.run_id, tag=version.tag, promoted=decision.promote, reason=decision.summary())
    pruned = prune_versions(ctx.versions, client, s.model.name, s.ollama.keep_versions)
    gguf = ctx.run_dir / "model.gguf"
    if gguf.exists() and not s.run.keep_gguf:
        gguf.unlink()
    active = ctx.versions.active(s.model.name)
    return PromoteStageResult(promoted=decision.promote, tag=version.tag, latest=active.tag if active else None,
                         decision=decision.to_dict(), pruned=pruned)


def serve_promoted(ctx: RunContext, client, tag: str) -> None:
    """Point [model] serve_as (the agent's own name) at the promoted version too (lacd.served)."""
    done = served.follow(ctx.settings, ctx.store.engine, client, tag)
    if done is not None:
        log.info("served_name", name=done.name, serving=done.serving, state=done.state, note=done.note)


def prune_versions(versions: VersionStore, client, name: str, keep: int) -> list[str]:
    """Delete versions beyond the newest `keep` from Ollama (never the active one) and mark them removed.

    Ollama being down only postpones this to the next run."""
    active = versions.active(name)
    try:
        pruned = register.prune_versions(client, name, keep, protect={active.tag} if active else set())
    except register.OllamaUnavailable as exc:
        log.warning("prune_postponed", error=str(exc))
        return []
    versions.mark_removed(name, [n for n in (register.parse_version(tag, name) for tag in pruned) if n is not None])
    return pruned


STAGE_FUNCTIONS: dict[str, Callable[[RunContext], StageResult]] = {
    "format": format_stage, "train": train_stage, "export": export_stage, "register": register_stage,
    "evaluate": evaluate_stage, "promote": promote_stage,
}


def _trains_on_gpu(device: str) -> bool:
    """Whether the train stage will hold a GPU (Ollama's models are unloaded only then)."""
    from lacd.pipeline.plan import choose_device

    return choose_device(device)[0].type == "cuda"


def _unload_ollama(host: str) -> None:
    try:
        unloaded = register.unload_all(register.make_client(host))
        log.info("ollama_unloaded", models=unloaded)
    except register.OllamaError as exc:  # training goes on; the GPU may simply be shared
        log.warning("ollama_unload_failed", error=str(exc))


def _plain(result) -> dict:
    out = dataclasses.asdict(result)
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in out.items()}
