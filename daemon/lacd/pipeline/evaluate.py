"""The evaluate stage: measure the candidate and the model in use on the run's held-out lessons.

Two kinds of numbers, for both models:

- held-out loss and perplexity on the assistant's tokens of the held-out split of ``dataset/``
  (``lacd.pipeline.loss.evaluate``, the same function the trainer reports before and after);
- agent-protocol metrics (``protocol_metrics``) from greedy generations on held-out prompts: for
  each held-out lesson, the conversation up to its first assistant reply is the prompt and that
  reply is the reference.

Which model is "in use" (``incumbent_ref``): the base model without adapter before the first
promotion; afterwards the promoted run's ``adapter/`` folder on the same base when it still exists
(loss and protocol metrics), else only its Ollama tag (protocol metrics through Ollama, no loss).

Which generator (``choose_generators``): through Ollama's /api/chat when it is reachable and
both models have a tag there (the quantized model, with the registered TEMPLATE, as the agent
sees it); otherwise transformers for both, the candidate from its GGUF (dequantized) and the model
in use from its base + adapter folder, decoding greedily and stopping at the family's stop tokens.
When one model can only be reached one way (the model in use has only its Ollama tag left), each
model uses what it has and the result says "mixed". The result names the generator of each model.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import structlog

from lacd.artifacts import write_text_atomic
from lacd.child import EXIT_ERROR, child_env, die_with_parent, error_from_log, read_tail, stop_child, wait_any
from lacd.pipeline import template as tpl
from lacd.pipeline.errors import StageInterrupted
from lacd.protocol import FABRICATED_MARKERS, TOOLS, ToolCall, check_call, format_call, parse_tool_calls

log = structlog.get_logger(__name__)

METRICS = (
    "tool_call_validity", "tool_name_accuracy", "exact_call_accuracy",
    "fabricated_output_rate", "clean_stop_rate",
)  # fmt: skip
RESULT_FILE = "evaluation.json"
Generation = tuple[str, bool]  # (reply text, stopped cleanly within the token budget)


class EvaluateError(Exception):
    """The evaluation cannot run (missing dataset, model, or adapter); the message says what."""


class EvaluateInterrupted(EvaluateError, StageInterrupted):
    """A stop was requested while the evaluation ran; the stage is redone at the next start."""


# --------------------------------------------------------------------------- protocol metrics


@dataclass(frozen=True)
class CaseScore:
    """How one generation compares with its reference reply."""

    expected: str | None  # the reference's first call as text (None: the reference calls nothing)
    got: str | None  # the generation's first call as text, or its parse error
    blocks: int  # <tool_code> blocks written
    valid_blocks: int  # of which parse as a known tool with an allowed number of arguments
    name_ok: bool
    exact_ok: bool
    fabricated: bool
    stopped: bool


def first_call(reply: str) -> ToolCall | None:
    """The first ``<tool_code>`` call of a reply (possibly unparsable), or None when there is none."""
    calls = parse_tool_calls(reply)
    return calls[0] if calls else None


def score_case(generation: str, reference: str, tools: Mapping[str, tuple[int, int]], stopped: bool) -> CaseScore:
    """Compare one generation with its reference reply (see protocol_metrics for the rules)."""
    calls = parse_tool_calls(generation)
    valid = sum(1 for call in calls if check_call(call, dict(tools)) is None)
    want, got = first_call(reference), (calls[0] if calls else None)
    if want is None or not want.ok:  # the reference makes no (usable) call: the right answer is none
        name_ok = exact_ok = got is None
    else:
        name_ok = got is not None and got.ok and got.name == want.name
        exact_ok = name_ok and got.args == want.args
    return CaseScore(
        expected=_call_text(want) if want is not None and want.ok else None,
        got=None if got is None else (_call_text(got) if got.ok else f"unparsable: {got.error}"),
        blocks=len(calls), valid_blocks=valid, name_ok=name_ok, exact_ok=exact_ok,
        fabricated=any(marker in generation for marker in FABRICATED_MARKERS), stopped=bool(stopped),
    )  # fmt: skip


def protocol_metrics(
    generations: Sequence[str],
    references: Sequence[str],
    tools: Mapping[str, tuple[int, int]] = TOOLS,
    stopped: Sequence[bool] | None = None,
) -> dict[str, Any]:
    """Agent-protocol metrics of generations against reference replies (all rates in [0, 1]).

    - tool_call_validity: of the ``<tool_code>`` blocks the model wrote, the fraction that parse as
      one call of a tool in ``tools`` with an allowed number of arguments (None if it wrote none);
    - tool_name_accuracy / exact_call_accuracy: the fraction of cases whose first call has the
      reference's first call's name / name and arguments (arguments compared after parsing, so
      quoting style does not matter); when the reference makes no call, a reply without a call
      is right;
    - fabricated_output_rate: the fraction of replies that contain ``<tool_output`` or
      ``<tool_error`` (the model inventing a tool's result);
    - clean_stop_rate: the fraction that ended with the end-of-turn token within the budget.
    No case at all gives None for every rate.
    """
    if len(generations) != len(references):
        raise ValueError(f"{len(generations)} generations for {len(references)} references")
    stops = list(stopped) if stopped is not None else [True] * len(generations)
    if len(stops) != len(generations):
        raise ValueError(f"{len(stops)} stop flags for {len(generations)} generations")
    scores = [score_case(g, r, tools, s) for g, r, s in zip(generations, references, stops)]
    return summarize(scores)


def summarize(scores: Sequence[CaseScore]) -> dict[str, Any]:
    """The rates of protocol_metrics from per-case scores."""
    n = len(scores)
    blocks = sum(s.blocks for s in scores)

    def rate(count: int, total: int) -> float | None:
        return round(count / total, 4) if total else None

    return {
        "n_cases": n,
        "n_expected_calls": sum(1 for s in scores if s.expected is not None),
        "blocks_written": blocks,
        "tool_call_validity": rate(sum(s.valid_blocks for s in scores), blocks),
        "tool_name_accuracy": rate(sum(s.name_ok for s in scores), n),
        "exact_call_accuracy": rate(sum(s.exact_ok for s in scores), n),
        "fabricated_output_rate": rate(sum(s.fabricated for s in scores), n),
        "clean_stop_rate": rate(sum(s.stopped for s in scores), n),
    }


def _call_text(call: ToolCall) -> str:
    """A parsed call in canonical form: name('arg', ...)."""
    return format_call(call.name or "?", *call.args)


# --------------------------------------------------------------------------- held-out prompts


@dataclass(frozen=True)
class Case:
    """One held-out prompt: the rendered text, the /api/chat messages, and the reference reply."""

    lesson_id: int
    prompt: str
    messages: list[dict]
    reference: str


def heldout_prompts(
    lessons: Iterable[Any], heldout_ids: Sequence[int], family: str, system: str | None, max_cases: int | None = None
) -> list[Case]:
    """A Case for each held-out lesson (in heldout_ids order) that has a first assistant reply.

    lessons: objects or dicts with ``id`` and ``messages`` (LessonIn, SnapshotLesson...). The prompt
    is the conversation before the first assistant reply, rendered by ``template.render_prompt``
    with the system prompt exactly as training and Ollama render it; ``messages`` is the same
    conversation as /api/chat takes it (system first). Lessons with native tool calls or that
    cannot be rendered are left out, as the format stage leaves them out. max_cases keeps the first N.
    """
    by_id = {_field(lesson, "id"): _field(lesson, "messages") for lesson in lessons}
    cases: list[Case] = []
    for lesson_id in heldout_ids:
        messages = by_id.get(lesson_id)
        if not messages or any(m.get("tool_calls") for m in messages):
            continue
        first = next((i for i, m in enumerate(messages) if m.get("role") == "assistant"), None)
        if not first:  # no reply, or a reply before any user turn
            continue
        history = [{"role": m["role"], "content": m["content"]} for m in messages[:first]]
        try:
            prompt = tpl.render_prompt(family, history, system)
        except tpl.TemplateError:
            continue
        cases.append(Case(lesson_id, prompt, tpl.chat_messages(history, system), messages[first]["content"]))
        if max_cases is not None and len(cases) >= max_cases:
            break
    return cases


def _field(item: Any, name: str) -> Any:
    return item[name] if isinstance(item, Mapping) else getattr(item, name)


# --------------------------------------------------------------------------- generators


def generate_ollama(client: Any, model_tag: str, cases: Sequence[Case], max_tokens: int) -> list[Generation]:
    """Greedy replies from a model served by Ollama (/api/chat applies its registered TEMPLATE).

    stopped is True when Ollama ended the reply itself (done_reason "stop": the end-of-turn token
    or a stop parameter) rather than at num_predict. Raises lacd.pipeline.register.OllamaError.
    """
    from lacd.pipeline.register import ollama_calls

    options = {"temperature": 0, "top_k": 1, "seed": 0, "num_predict": int(max_tokens)}
    out: list[Generation] = []
    for case in cases:
        with ollama_calls(client, f"generate with {model_tag}"):
            response = client.chat(model=model_tag, messages=case.messages, options=options, stream=False)
        out.append((response.message.content or "", response.done_reason == "stop"))
    return out


def generate_transformers(
    model: str | Path | Any,
    cases: Sequence[Case],
    max_tokens: int,
    family: str,
    *,
    tokenizer: Any = None,
    batch_size: int = 0,
    threads: int = 0,
) -> list[Generation]:
    """Greedy replies from transformers, stopping at the family's stop tokens or EOS.

    model: a ``.gguf`` file (dequantized by transformers), an HF model folder, or an already
    loaded model (then pass its tokenizer). Prompts are tokenized as llama.cpp tokenizes them
    (the tokenizer's BOS added), batched shortest first, batch_size prompts a batch (0:
    _rows_per_batch). The prefix all prompts share (the agent's system prompt) is computed once and
    its key/value cache reused by every batch (_prefix_cache); lacd.pipeline.greedy decodes each
    batch, a row leaving the batch at its stop token or stop string.
    """
    import torch

    from lacd.pipeline.greedy import greedy

    if threads > 0:
        torch.set_num_threads(threads)
    if isinstance(model, (str, Path)):
        model, tokenizer = load_for_generation(Path(model))
    elif tokenizer is None:
        raise EvaluateError("generate_transformers needs the tokenizer of an already loaded model")
    stops = tpl.stop_tokens(family)
    stop_ids = _stop_token_ids(tokenizer, stops)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    device = next(model.parameters()).device
    order = sorted(range(len(cases)), key=lambda i: len(cases[i].prompt))
    results: dict[int, Generation] = {}
    was_training = model.training
    model.eval()
    tokens = [list(tokenizer(case.prompt, add_special_tokens=True)["input_ids"]) for case in cases]
    prefix, cache = _prefix_cache(model, tokens, device)
    done = _stop_string_seen(tokenizer, stops)
    rows = batch_size or _rows_per_batch(model, max(map(len, tokens), default=0) + int(max_tokens))
    for start in range(0, len(order), max(1, rows)):
        group = order[start : start + max(1, rows)]
        replies = greedy(model, [tokens[i] for i in group], int(max_tokens), stop_ids, prefix=prefix, shared=cache,
                         pad=pad, done=done)  # fmt: skip
        for index, reply in zip(group, replies):
            results[index] = _finish(tokenizer, reply, stop_ids, stops, int(max_tokens))
    model.train(was_training)
    return [results[i] for i in range(len(cases))]


BATCH_ROWS = 8  # prompts decoded together on a GPU, and at least on the CPU
CPU_CACHE_BYTES = 1 << 30  # the key/value cache one batch may fill on the CPU


def _rows_per_batch(model: Any, tokens_per_row: int) -> int:
    """Prompts decoded together: on a GPU BATCH_ROWS; on the CPU as many as fill CPU_CACHE_BYTES of
    key/value cache, at least BATCH_ROWS (a step reads every weight once whatever the rows, so fewer,
    larger batches take fewer steps: SmolLM2-135M, ~950 tokens a row, 24 rows)."""
    from lacd.pipeline.greedy import cache_bytes_per_token

    if next(model.parameters()).device.type != "cpu":
        return BATCH_ROWS
    return max(BATCH_ROWS, CPU_CACHE_BYTES // max(1, cache_bytes_per_token(model) * tokens_per_row))


def _prefix_cache(model: Any, prompts: Sequence[Sequence[int]], device: Any) -> tuple[int, Any]:
    """(length, key/value cache) of the token prefix every prompt shares (the system prompt), computed
    once for all prompts; (0, None) when they share fewer than the train stage's MIN_SHARED_PREFIX
    tokens. Each prompt keeps at least one token of its own for decoding to start from."""
    from lacd.pipeline.greedy import prefix_cache
    from lacd.pipeline.loss import MIN_SHARED_PREFIX
    from lacd.pipeline.packing import common_prefix_length

    if len(prompts) < 2:
        return 0, None
    length = min(common_prefix_length(prompts), min(len(p) for p in prompts) - 1)
    if length < MIN_SHARED_PREFIX:
        return 0, None
    return length, prefix_cache(model, prompts[0][:length], device)


def _stop_string_seen(tokenizer: Any, stops: Sequence[str]) -> Any:
    """done(new tokens) for greedy: True once the reply holds a stop string that no longer stop string
    could still precede, so _finish cuts it where it would cut the reply run to the token budget."""
    longest = max((len(s) for s in stops), default=0)

    def done(tokens: list[int]) -> bool:
        text = tokenizer.decode(tokens, skip_special_tokens=False)
        hits = [text.index(s) for s in stops if s in text]
        return bool(hits) and min(hits) + longest <= len(text)

    return done if longest else None


def load_for_generation(
    path: Path, adapter_dir: Path | None = None, device: str = "cpu", tokenizer_dir: Path | None = None
) -> tuple[Any, Any]:
    """(model, tokenizer) from a GGUF file or an HF folder (+ an optional LoRA adapter folder).

    tokenizer_dir: load the tokenizer from this HF folder instead (for a GGUF exported from it:
    the same vocabulary, and transformers rebuilds a GGUF's tokenizer slowly, about a minute
    for SmolLM2's 49k merges on a laptop CPU).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        if path.suffix == ".gguf":
            if not path.is_file():
                raise EvaluateError(f"GGUF file {path} does not exist")
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        if tokenizer_dir is not None:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        elif path.suffix == ".gguf":
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        else:
            tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise EvaluateError(f"cannot load the model at {path}: {exc}") from exc
    if adapter_dir is not None:
        model = _with_adapter(model, adapter_dir)
    return model.to(device).eval(), tokenizer


def _with_adapter(model: Any, adapter_dir: Path) -> Any:
    """The model with a peft LoRA adapter folder applied (not merged)."""
    from peft import PeftModel

    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise EvaluateError(f"no LoRA adapter in {adapter_dir} (adapter_config.json missing)")
    try:
        return PeftModel.from_pretrained(model, str(adapter_dir))
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise EvaluateError(f"cannot apply the adapter in {adapter_dir} to the base model: {exc}") from exc


def _stop_token_ids(tokenizer: Any, stops: Sequence[str]) -> list[int]:
    """EOS and every stop string that is a single token of this vocabulary."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    for text in stops:
        encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(encoded) == 1 and encoded[0] not in ids:
            ids.append(int(encoded[0]))
    if not ids:
        raise EvaluateError("the tokenizer has neither an EOS token nor a single-token stop string")
    return ids


def _finish(tokenizer: Any, tokens: list[int], stop_ids: Sequence[int], stops: Sequence[str], limit: int) -> Generation:
    """Decode new tokens up to the first stop token or stop string; stopped says if one came."""
    cut = next((i for i, t in enumerate(tokens) if t in stop_ids), None)
    text = tokenizer.decode(tokens[:cut] if cut is not None else tokens, skip_special_tokens=False)
    hits = [text.index(s) for s in stops if s in text]
    if hits:
        return text[: min(hits)], True
    return text, cut is not None or len(tokens) < limit


# --------------------------------------------------------------------------- the models compared


@dataclass(frozen=True)
class ModelRef:
    """A model to measure: the base model plus, optionally, a LoRA adapter, its GGUF, its Ollama tag.

    A model with neither adapter_dir nor gguf nor ollama_tag is the base model itself.
    """

    label: str
    adapter_dir: Path | None = None
    gguf: Path | None = None
    ollama_tag: str | None = None

    @property
    def is_base(self) -> bool:
        return self.adapter_dir is None and self.gguf is None and self.ollama_tag is None

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


def incumbent_ref(active_tag: str | None, active_run_dir: Path | None) -> ModelRef:
    """The model in use: the base model before the first promotion, else the promoted version.

    The promoted version is measured through its run's ``adapter/`` folder when that folder still
    exists (run folders are pruned to the last K), and through its Ollama tag when it is served.
    """
    if not active_tag:
        return ModelRef("base model")
    adapter = Path(active_run_dir) / "adapter" if active_run_dir is not None else None
    has_adapter = adapter is not None and (adapter / "adapter_config.json").is_file()
    return ModelRef(active_tag, adapter_dir=adapter if has_adapter else None, ollama_tag=active_tag)


def choose_generators(candidate: ModelRef, incumbent: ModelRef, ollama_reachable: bool) -> dict[str, str]:
    """Which generator measures each model: {"candidate": ..., "incumbent": ...}.

    Ollama for both when it is reachable and both have a tag; else transformers for both when both
    can be loaded locally (the candidate from its GGUF or adapter, the model in use from its
    adapter, or the base); else each model what it has. A model reachable no way gets "none".
    """
    def local(ref: ModelRef) -> bool:
        return ref.is_base or ref.adapter_dir is not None or ref.gguf is not None

    def served(ref: ModelRef) -> bool:
        return ollama_reachable and ref.ollama_tag is not None

    if served(candidate) and served(incumbent):
        return {"candidate": "ollama", "incumbent": "ollama"}
    if local(candidate) and local(incumbent):
        return {"candidate": "transformers", "incumbent": "transformers"}
    return {name: ("transformers" if local(ref) else "ollama" if served(ref) else "none")
            for name, ref in (("candidate", candidate), ("incumbent", incumbent))}  # fmt: skip


def overall_generator(generators: Mapping[str, str]) -> str:
    """"ollama" or "transformers" when both models used it, else "mixed"."""
    kinds = set(generators.values())
    return kinds.pop() if len(kinds) == 1 else "mixed"


# --------------------------------------------------------------------------- the stage's work


@dataclass(frozen=True)
class EvalSpec:
    """Settings of one evaluation (plain values; the stage fills them from config)."""

    base_dir: Path
    dataset_dir: Path
    family: str
    tools: Mapping[str, tuple[int, int]] = field(default_factory=lambda: dict(TOOLS))
    max_tokens: int = 128
    max_seq_len: int = 2048
    tokens_per_batch: int = 4096
    batch_size: int = 0  # prompts decoded together (0: _rows_per_batch)
    device: str = "auto"
    threads: int = 0


def evaluate_candidate(
    spec: EvalSpec,
    cases: Sequence[Case],
    candidate: ModelRef,
    incumbent: ModelRef,
    *,
    client: Any = None,
    known_losses: Mapping[str, float | None] | None = None,
    out_path: Path | None = None,
) -> dict[str, Any]:
    """Measure candidate and model in use on the held-out lessons; return a JSON-able summary.

    Returns {"candidate": {...metrics}, "incumbent": {...metrics}, "generator": "ollama" |
    "transformers" | "mixed", "generators": {...}, "n_cases": N, "seconds": s}. Each model's dict
    holds heldout_loss, perplexity, the protocol_metrics rates, its generator and its label.
    known_losses: {"candidate": x, "incumbent": y} already measured on this dataset's held-out
    split (the train stage's heldout_loss_after / _before), to spare loading a model again.
    out_path: where to write the full result with per-case scores (temporary name, then rename).
    """
    import torch

    from lacd.pipeline.register import OllamaError, is_reachable

    started = time.monotonic()
    if spec.threads > 0:
        torch.set_num_threads(spec.threads)
    reachable = False
    if client is not None:
        try:
            reachable = is_reachable(client)
        except OllamaError:
            reachable = False
    generators = choose_generators(candidate, incumbent, reachable)
    known = dict(known_losses or {})
    result: dict[str, Any] = {"generators": generators, "generator": overall_generator(generators),
                              "n_cases": len(cases)}  # fmt: skip
    cases_out: dict[str, list[dict]] = {}
    for role, ref in (("candidate", candidate), ("incumbent", incumbent)):
        metrics, scores = _measure(spec, cases, ref, generators[role], client, known.get(role, _UNKNOWN))
        result[role] = metrics
        cases_out[role] = [dict(asdict(s), lesson_id=c.lesson_id) for s, c in zip(scores, cases)]
    result["seconds"] = round(time.monotonic() - started, 2)
    log.info("evaluate.done", generator=result["generator"], n_cases=len(cases), seconds=result["seconds"],
             candidate_exact=result["candidate"].get("exact_call_accuracy"),
             incumbent_exact=result["incumbent"].get("exact_call_accuracy"))  # fmt: skip
    if out_path is not None:
        _write_json(Path(out_path), {**result, "cases": cases_out})
    return result


_UNKNOWN = object()


def _measure(
    spec: EvalSpec, cases: Sequence[Case], ref: ModelRef, generator: str, client: Any, known_loss: Any
) -> tuple[dict[str, Any], list[CaseScore]]:
    """Loss and protocol metrics of one model; the per-case scores."""
    from lacd.pipeline.plan import choose_device

    device, _ = choose_device(spec.device)
    needs_local_model = known_loss is _UNKNOWN and (ref.is_base or ref.adapter_dir is not None)
    loaded = None
    loss = None if known_loss is _UNKNOWN else known_loss
    loss_source = "train" if known_loss is not _UNKNOWN else None
    if needs_local_model or (generator == "transformers" and ref.gguf is None):
        loaded = load_for_generation(spec.base_dir, ref.adapter_dir, str(device))
    if needs_local_model and loaded is not None:
        loss, loss_source = heldout_loss(loaded[0], spec), "measured"
    generations: list[Generation] = []
    if cases and generator == "ollama":
        generations = generate_ollama(client, ref.ollama_tag, cases, spec.max_tokens)
    elif cases and generator == "transformers":
        if ref.gguf is not None:
            loaded = None
            _free_memory()
            loaded = load_for_generation(ref.gguf, None, str(device), tokenizer_dir=spec.base_dir)
        generations = generate_transformers(_merged(loaded[0]), cases, spec.max_tokens, spec.family,
                                            tokenizer=loaded[1], batch_size=spec.batch_size)  # fmt: skip
    loaded = None
    _free_memory()
    scores = [score_case(text, case.reference, spec.tools, stopped)
              for (text, stopped), case in zip(generations, cases)]  # fmt: skip
    metrics = summarize(scores)  # "none": no generation, every rate None
    metrics.update(
        label=ref.label, generator=generator, heldout_loss=_round(loss), loss_source=loss_source,
        perplexity=_round(math.exp(loss)) if loss is not None and loss < 50 else None,
    )
    return metrics, scores


def _merged(model: Any) -> Any:
    """A peft model with its LoRA adapter merged into the base weights (in place: the caller lets the
    adapter model go), so each decoding step runs the plain layers, not the adapter's two extra
    products per layer; any other model as it is. The candidate's GGUF is merged the same way."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def heldout_loss(model: Any, spec: EvalSpec) -> float | None:
    """Mean loss per assistant token of the held-out split (None when it has no labelled token).

    The model is switched to the train stage's varlen attention, so held-out lessons that share
    the system prompt are evaluated in shared-prefix rows: the prompt's keys and values computed
    once per row (train.evaluate), the loss computed in chunks on the assistant's tokens only.
    """
    from lacd.pipeline.loss import evaluate, use_shared_prefix_attention
    from lacd.pipeline.train import TrainError, load_examples

    try:
        rows, _ = load_examples(spec.dataset_dir, "heldout", spec.max_seq_len)
    except TrainError as exc:
        raise EvaluateError(str(exc)) from exc
    device = next(model.parameters()).device
    previous = use_shared_prefix_attention(model)
    try:
        return evaluate(model, rows, spec.tokens_per_batch, device)
    finally:  # generation follows on the same model: it needs the attention it was loaded with
        (model.get_base_model() if hasattr(model, "get_base_model") else model).set_attn_implementation(previous)


def _free_memory() -> None:
    """Collect a model the caller has just let go of (memory is tight when two models are compared)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)


# --------------------------------------------------------------------------- child process


def evaluate_in_child(
    spec: EvalSpec,
    cases: Sequence[Case],
    candidate: ModelRef,
    incumbent: ModelRef,
    out_path: Path,
    *,
    ollama_host: str | None = None,
    known_losses: Mapping[str, float | None] | None = None,
    python: str = sys.executable,
    timeout_s: float | None = None,
    stop: threading.Event | None = None,
    poll_s: float = 0.5,
    pause: threading.Event | None = None,
) -> dict[str, Any]:
    """evaluate_candidate in a child process, so loading two models cannot take the daemon down
    (or keep its memory); same result. The request is written next to out_path, the child's
    output to out_path's folder as evaluate.log. Setting `stop` ends the child and raises
    EvaluateInterrupted; so does `pause` (the agent became active: the stage is redone when it is idle
    again). The child dies with its parent (Linux), so no orphan keeps generating."""
    out_path = Path(out_path)
    request = out_path.with_name(out_path.stem + ".request.json")
    payload = {
        "spec": {**asdict(spec), "base_dir": str(spec.base_dir), "dataset_dir": str(spec.dataset_dir),
                 "tools": {k: list(v) for k, v in spec.tools.items()}},
        "cases": [asdict(c) for c in cases], "candidate": candidate.to_dict(), "incumbent": incumbent.to_dict(),
        "ollama_host": ollama_host, "known_losses": dict(known_losses or {}), "out_path": str(out_path),
    }  # fmt: skip
    _write_json(request, payload)
    log_path = out_path.with_name("evaluate.log")
    try:
        with open(log_path, "w", encoding="utf-8") as log_file:
            child = subprocess.Popen([python, "-m", "lacd.pipeline.evaluate", str(request)], stdout=log_file,
                                     stderr=subprocess.STDOUT, env=child_env())  # fmt: skip
            code = _wait_child(child, timeout_s, stop, poll_s, log_path, pause)
    finally:
        request.unlink(missing_ok=True)  # it holds the held-out prompts in clear text
    if code != 0 or not out_path.is_file():
        tail = read_tail(log_path)
        reason = error_from_log(tail, _ERROR_PREFIX) or f"evaluation process exited with code {code}\n{tail}"
        raise EvaluateError(reason)
    result = json.loads(out_path.read_text(encoding="utf-8"))
    result.pop("cases", None)
    return result


def _wait_child(child: subprocess.Popen, timeout_s: float | None, stop: threading.Event | None, poll_s: float,
                log_path: Path, pause: threading.Event | None = None) -> int:
    """The child's exit code; ends it (TERM, then KILL) on a stop or pause request or past the timeout."""
    deadline = None if not timeout_s else time.monotonic() + timeout_s
    asked = [e for e in (stop, pause) if e is not None]
    while child.poll() is None:
        if wait_any(asked, poll_s):
            stop_child(child)
            raise EvaluateInterrupted("evaluation stopped on request; it is redone at the next start")
        if deadline is not None and time.monotonic() > deadline:
            stop_child(child)
            raise EvaluateError(f"evaluation did not finish within {timeout_s:.0f} s; see {log_path}")
    return child.returncode


def unmeasured_result(
    candidate: ModelRef, incumbent: ModelRef, known_losses: Mapping[str, float | None] | None = None
) -> dict[str, Any]:
    """The result of an evaluation with no held-out prompt: every rate None, the losses already known.

    Same shape as evaluate_candidate's, with generator "none", so the gate and the report read it
    the same way (the gate then follows its if_unmeasured setting).
    """
    known = dict(known_losses or {})
    result: dict[str, Any] = {"generators": {"candidate": "none", "incumbent": "none"}, "generator": "none",
                              "n_cases": 0, "seconds": 0.0}  # fmt: skip
    for role, ref in (("candidate", candidate), ("incumbent", incumbent)):
        loss = known.get(role)
        metrics = summarize([])
        metrics.update(label=ref.label, generator="none", heldout_loss=_round(loss),
                       loss_source="train" if loss is not None else None,
                       perplexity=_round(math.exp(loss)) if loss is not None and loss < 50 else None)  # fmt: skip
        result[role] = metrics
    return result


_ERROR_PREFIX = "lacd evaluate: error: "


def main(argv: Sequence[str] | None = None) -> int:
    """Child entry point: python -m lacd.pipeline.evaluate REQUEST.json (see evaluate_in_child)."""
    parser = argparse.ArgumentParser(prog="python -m lacd.pipeline.evaluate")
    parser.add_argument("request", type=Path)
    args = parser.parse_args(argv)
    from lacd import logs

    logs.setup(level="info", fmt="json", stream=sys.stderr)
    request = json.loads(args.request.read_text(encoding="utf-8"))
    die_with_parent()
    raw = request["spec"]
    spec = EvalSpec(**{**raw, "base_dir": Path(raw["base_dir"]), "dataset_dir": Path(raw["dataset_dir"]),
                       "tools": {k: tuple(v) for k, v in raw["tools"].items()}})  # fmt: skip
    refs = [ModelRef(**{k: (Path(v) if k in ("adapter_dir", "gguf") and v else v) for k, v in request[who].items()})
            for who in ("candidate", "incumbent")]  # fmt: skip
    client = None
    if request.get("ollama_host"):
        from lacd.pipeline.register import make_client

        client = make_client(request["ollama_host"])
    try:
        evaluate_candidate(spec, [Case(**c) for c in request["cases"]], refs[0], refs[1], client=client,
                           known_losses=request.get("known_losses"), out_path=Path(request["out_path"]))  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - reported to the parent as one line
        print(f"{_ERROR_PREFIX}{type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return 0


def _write_json(path: Path, payload: Mapping[str, Any]) -> None:
    """Write JSON (indented, keys sorted) atomically and durably."""
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    sys.exit(main())
