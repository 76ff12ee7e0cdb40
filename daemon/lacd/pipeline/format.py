"""The format stage: lessons become a tokenized `datasets` folder the trainer reads.

Each lesson is rendered with the base model's chat family and the agent's system prompt exactly
as Ollama will prompt the model (lacd.pipeline.template), tokenized piece by piece, and labelled
-100 everywhere except the assistant's replies and their end-of-turn markers.

The output folder holds a DatasetDict (splits ``train`` and ``heldout``; columns ``input_ids``,
``labels``, ``lesson_id``: token ids only, no lesson text) and ``format.json`` (the FormatResult).
It is written under a temporary name and renamed (artifacts.atomic_folder), so it is either complete or absent.

Held-out split: a lesson is held out when ``int(conv_hash[:8], 16) % 10000 < heldout_pct * 100``,
so its split depends on nothing but its own conversation and never changes as lessons arrive.
When that leaves no training example, the held-out example nearest the threshold trains instead.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import structlog

from lacd.artifacts import atomic_folder
from lacd.pipeline import template as tpl

log = structlog.get_logger(__name__)

TOO_LONG = ("truncate", "drop")
DROP_REASONS = ("dropped_too_long", "dropped_no_assistant_tokens", "dropped_unrenderable")
COUNTS = ("train", "heldout", "truncated", *DROP_REASONS, "capped")
RESULT_FILE = "format.json"


class FormatError(Exception):
    """The lessons cannot become a training set (shown as the run's error)."""


@dataclass(frozen=True)
class LessonIn:
    """One lesson as the run executor hands it over (newest first)."""

    id: int
    conv_hash: str
    messages: list[dict]


@dataclass(frozen=True)
class FormatSpec:
    """Where the tokenizer is, where the dataset goes, and how lessons are formatted."""

    base_dir: Path
    out_dir: Path
    system_prompt: str
    max_seq_len: int = 2048
    too_long: str = "truncate"
    heldout_pct: float = 10.0
    max_lessons: int = 5000
    chat_family: str | None = None
    min_train: int = 1


@dataclass(frozen=True)
class FormatResult:
    """What the format stage produced; written as format.json next to the dataset."""

    family: str
    counts: dict[str, int]
    train_tokens: int
    assistant_tokens: int
    heldout_ids: list[int]
    dropped_ids: dict[str, list[int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict of the result."""
        return asdict(self)


@dataclass(frozen=True)
class _Example:
    lesson_id: int
    input_ids: list[int]
    labels: list[int]
    rank: int  # int(conv_hash[:8], 16) % 10000: held out when below the threshold


def default_system_prompt() -> str:
    """The local-ai-coder agent's own system prompt, shipped as lacd's default."""
    return resources.files("lacd").joinpath("data/system_prompt.txt").read_text(encoding="utf-8")


def heldout_rank(conv_hash: str) -> int:
    """A lesson's position in [0, 10000) for the held-out split, from its conversation hash."""
    try:
        return int(conv_hash[:8], 16) % 10000
    except ValueError:
        raise FormatError(f"conversation hash {conv_hash!r} is not a hex digest") from None


def format_lessons(lessons: Iterable[LessonIn], spec: FormatSpec) -> FormatResult:
    """Render, tokenize, label and split the lessons; write the dataset folder atomically."""
    _check_spec(spec)
    tokenizer = _load_tokenizer(spec.base_dir)
    try:
        family = tpl.detect_family(getattr(tokenizer, "chat_template", None), spec.chat_family)
    except tpl.TemplateError as exc:
        raise FormatError(str(exc)) from exc
    lessons = list(lessons)
    if not lessons:
        raise FormatError("no lessons to format")
    kept = lessons[: spec.max_lessons]
    counts: Counter[str] = Counter(capped=len(lessons) - len(kept))
    dropped: dict[str, list[int]] = {}
    examples = []
    for lesson in kept:
        example, reason = _example(lesson, family, tokenizer, spec)
        if reason == "truncated":
            counts["truncated"] += 1
        elif reason:
            counts[reason] += 1
            dropped.setdefault(reason, []).append(lesson.id)
            log.debug("format.dropped", lesson_id=lesson.id, reason=reason)
        if example is not None:
            examples.append(example)
    train, heldout = _split(examples, spec.heldout_pct)
    counts.update(train=len(train), heldout=len(heldout))
    if len(train) < spec.min_train:
        raise FormatError(_nothing_trainable(len(lessons), len(train), counts, spec.min_train))
    result = FormatResult(
        family=family,
        counts={name: counts[name] for name in COUNTS},
        train_tokens=sum(len(e.input_ids) for e in train),
        assistant_tokens=sum(sum(1 for x in e.labels if x != tpl.IGNORE_INDEX) for e in train),
        heldout_ids=[e.lesson_id for e in heldout],
        dropped_ids=dropped,
    )
    _write(train, heldout, result, Path(spec.out_dir))
    log.info("format.done", family=family, out_dir=str(spec.out_dir), train_tokens=result.train_tokens,
             assistant_tokens=result.assistant_tokens, **result.counts)
    return result


def _check_spec(spec: FormatSpec) -> None:
    """Refuse settings the stage cannot honour, with the setting's name in the message."""
    if spec.too_long not in TOO_LONG:
        raise FormatError(f"too_long is {spec.too_long!r}; expected one of {', '.join(TOO_LONG)}")
    if spec.max_seq_len < 1:
        raise FormatError(f"max_seq_len must be >= 1, not {spec.max_seq_len}")
    if not 0 <= spec.heldout_pct <= 100:
        raise FormatError(f"heldout_pct must be between 0 and 100, not {spec.heldout_pct}")
    if spec.max_lessons < 1:
        raise FormatError(f"max_lessons must be >= 1, not {spec.max_lessons}")


def _load_tokenizer(base_dir: Path) -> Any:
    """The base model's fast tokenizer, or FormatError naming the folder."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    except (OSError, ValueError) as exc:
        raise FormatError(f"cannot load the tokenizer of the base model in {base_dir}: {exc}") from exc
    if not getattr(tokenizer, "is_fast", False):
        raise FormatError(f"the tokenizer in {base_dir} has no fast (tokenizer.json) version")
    return tokenizer


def _example(
    lesson: LessonIn, family: str, tokenizer: Any, spec: FormatSpec
) -> tuple[_Example | None, str | None]:
    """The lesson's example, or None, and why it was truncated or dropped (None when neither).

    Native tool calls (OpenAI-style ``tool_calls``) are not rendered by the template, so a
    lesson that has them would teach an empty or partial reply: it is dropped as unrenderable.
    """
    if any(message.get("tool_calls") for message in lesson.messages):
        return None, "dropped_unrenderable"
    try:
        rendered = tpl.render(family, lesson.messages, spec.system_prompt)
    except tpl.TemplateError:
        return None, "dropped_unrenderable"
    reason = None
    try:
        ids, labels = tpl.assistant_token_labels(tokenizer, rendered, spec.max_seq_len, truncate=False)
    except tpl.ExampleTooLong:
        if spec.too_long == "drop":
            return None, "dropped_too_long"
        ids, labels = tpl.assistant_token_labels(tokenizer, rendered, spec.max_seq_len, truncate=True)
        reason = "truncated"
    if all(label == tpl.IGNORE_INDEX for label in labels):
        return None, "dropped_no_assistant_tokens"
    return _Example(lesson.id, ids, labels, heldout_rank(lesson.conv_hash)), reason


def _split(examples: list[_Example], heldout_pct: float) -> tuple[list[_Example], list[_Example]]:
    """Train and held-out examples, input order kept; never an empty train split if any example exists."""
    train: list[_Example] = []
    heldout: list[_Example] = []
    for example in examples:
        (heldout if example.rank < heldout_pct * 100 else train).append(example)
    if not train and heldout:
        nearest = max(heldout, key=lambda e: (e.rank, e.lesson_id))
        train, heldout = [nearest], [e for e in heldout if e is not nearest]
    return train, heldout


def _nothing_trainable(n_lessons: int, n_train: int, counts: Counter, min_train: int) -> str:
    """The error shown when too few examples remain for training."""
    reasons = ", ".join(f"{name.removeprefix('dropped_').replace('_', ' ')} {counts[name]}"
                        for name in DROP_REASONS if counts[name])
    return (f"nothing to train on: {n_train} training example(s) from {n_lessons} lesson(s), "
            f"at least {min_train} needed" + (f" (dropped: {reasons})" if reasons else ""))


def _write(train: list[_Example], heldout: list[_Example], result: FormatResult, out_dir: Path) -> None:
    """Save both splits and format.json in a temporary folder, then rename it to out_dir (replacing a
    previous attempt's complete output)."""
    from datasets import DatasetDict

    with atomic_folder(out_dir) as tmp:
        splits = DatasetDict({"train": _dataset(train), "heldout": _dataset(heldout)})
        splits.save_to_disk(str(tmp), num_shards={"train": 1, "heldout": 1})  # an empty split needs its shard
        (tmp / RESULT_FILE).write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")


def _dataset(examples: list[_Example]) -> Any:
    """One split as a Dataset with fixed column types (an empty split included)."""
    from datasets import Dataset, Features, List, Value

    features = Features({"input_ids": List(Value("int32")), "labels": List(Value("int32")),
                         "lesson_id": Value("int64")})
    columns = {"input_ids": [e.input_ids for e in examples], "labels": [e.labels for e in examples],
               "lesson_id": [e.lesson_id for e in examples]}
    return Dataset.from_dict(columns, features=features)
