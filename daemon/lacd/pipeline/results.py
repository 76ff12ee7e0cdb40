"""What each stage of a run returns: one frozen dataclass per stage, stored as the stage row's JSON.

    FormatStageResult    base_dir, family, counts, tokens          (read by train, export, register, evaluate)
    TrainStageResult     held-out loss before/after, steps, ...    (read by evaluate and the report)
    ExportStageResult    the GGUF's path and size
    RegisterStageResult  tag, digest, quantization                 (read by evaluate)
    EvaluateStageResult  the candidate's and the model in use's metrics   (read by promote and the report)
    PromoteStageResult   the gate's decision, latest, pruned tags  (read by the executor, `lacd status`)

Named *StageResult so they never read as the objects the stages' workers return under the same
noun (trainspec.TrainResult, format.FormatResult, export.ExportResult), from which they are built.

``to_dict`` gives the JSON object stored in run_stages.result and ``from_dict`` reads one back:
the stored keys are those of the dicts the stages returned before these types existed, so rows
written by any earlier lacd still read. Keys a type does not name (the trainer's and the
evaluator's detailed numbers) travel unchanged in ``extra``. This module imports nothing heavy:
`lacd status` and `lacd report` read results without loading torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Mapping, TypeVar

R = TypeVar("R", bound="StageResult")
OMIT_NONE = {"omit_none": True}  # a field stored only when set


@dataclass(frozen=True, kw_only=True)
class StageResult:
    STAGE: ClassVar[str]
    seconds: float | None = field(default=None, metadata=OMIT_NONE)  # the stage's wall time (the executor sets it)
    skipped: str | None = field(default=None, metadata=OMIT_NONE)  # why its output was already there (a resume)
    extra: Mapping[str, Any] = field(default_factory=dict)  # stored keys this type does not name

    @classmethod
    def from_dict(cls: type[R], data: Mapping[str, Any]) -> R:
        names = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in data.items() if k in names},
                   extra={k: v for k, v in data.items() if k not in names})

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.extra)
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "extra" and not (value is None and f.metadata.get("omit_none")):
                out[f.name] = value
        return out

    def timed(self: R, seconds: float) -> R:
        return dataclasses.replace(self, seconds=seconds)


@dataclass(frozen=True, kw_only=True)
class FormatStageResult(StageResult):
    STAGE: ClassVar[str] = "format"
    base_dir: str | None = None
    family: str | None = None
    counts: Mapping[str, int] = field(default_factory=dict)
    train_tokens: int | None = None
    assistant_tokens: int | None = None


@dataclass(frozen=True, kw_only=True)
class TrainStageResult(StageResult):
    """The trainer's result (lacd.pipeline.trainspec.TrainResult) as stored; its other numbers are in extra."""

    STAGE: ClassVar[str] = "train"
    heldout_loss_before: float | None = None
    heldout_loss_after: float | None = None
    steps: int | None = None


@dataclass(frozen=True, kw_only=True)
class ExportStageResult(StageResult):
    STAGE: ClassVar[str] = "export"
    path: str | None = None
    bytes: int | None = None
    tensors: int | None = field(default=None, metadata=OMIT_NONE)
    merged_tensors: int | None = field(default=None, metadata=OMIT_NONE)


@dataclass(frozen=True, kw_only=True)
class RegisterStageResult(StageResult):
    STAGE: ClassVar[str] = "register"
    tag: str | None = None
    digest: str | None = None
    quantize: str | None = None
    quantize_reason: str | None = None


@dataclass(frozen=True, kw_only=True)
class EvaluateStageResult(StageResult):
    """lacd.pipeline.evaluate's result without its cases; its other numbers are in extra."""

    STAGE: ClassVar[str] = "evaluate"
    candidate: Mapping[str, Any] | None = None
    incumbent: Mapping[str, Any] | None = None
    generator: str | None = None
    generators: Mapping[str, str] | None = None
    n_cases: int = 0

    def gate_metrics(self) -> dict[str, Any]:
        """What model_versions.metrics keeps of the evaluation (`lacd models` shows it)."""
        return {"candidate": self.candidate, "incumbent": self.incumbent, "generator": self.generator,
                "generators": self.generators, "n_cases": self.n_cases}


@dataclass(frozen=True, kw_only=True)
class PromoteStageResult(StageResult):
    STAGE: ClassVar[str] = "promote"
    promoted: bool = True
    tag: str | None = None
    latest: str | None = None
    decision: Mapping[str, Any] | None = None
    pruned: list[str] = field(default_factory=list)


STAGE_RESULTS = (FormatStageResult, TrainStageResult, ExportStageResult, RegisterStageResult, EvaluateStageResult,
                 PromoteStageResult)
RESULTS: dict[str, type[StageResult]] = {r.STAGE: r for r in STAGE_RESULTS}
