"""The promotion gate: promote a candidate only when the measurements say it is not worse.

``decide(candidate, incumbent)`` takes the two metric dicts that ``evaluate_candidate`` returns
and checks, with the numbers in every message:

- the primary metric (default exact-call accuracy, higher is better) may be worse than the model
  in use's by at most ``tolerance`` (absolute);
- each guard may regress by at most its limit: held-out loss and perplexity relatively (0.05 =
  5 % higher), rates absolutely (fabricated-output rate up by at most 0.02, clean-stop rate down
  by at most 0.05).

A metric the model in use has no value for (for instance no held-out loss when only its Ollama
tag is left) is skipped, and a reason says so. A candidate without a value for the primary metric
(no held-out case at all) is judged by ``if_unmeasured``: "reject" (default) or "promote".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

HIGHER_IS_BETTER = {
    "exact_call_accuracy": True,
    "tool_name_accuracy": True,
    "tool_call_validity": True,
    "clean_stop_rate": True,
    "fabricated_output_rate": False,
    "heldout_loss": False,
    "perplexity": False,
}
RELATIVE = frozenset({"heldout_loss", "perplexity"})
"""Guards whose limit is a fraction of the model in use's value; the others are absolute."""

DEFAULT_PRIMARY = "exact_call_accuracy"
DEFAULT_TOLERANCE = 0.02
DEFAULT_GUARDS: Mapping[str, float] = {"heldout_loss": 0.05, "fabricated_output_rate": 0.02, "clean_stop_rate": 0.05}
LABELS = {
    "exact_call_accuracy": "exact-call accuracy",
    "tool_name_accuracy": "tool-name accuracy",
    "tool_call_validity": "tool-call validity",
    "clean_stop_rate": "clean-stop rate",
    "fabricated_output_rate": "fabricated-output rate",
    "heldout_loss": "held-out loss",
    "perplexity": "perplexity",
}


class GateError(ValueError):
    """The gate was configured with a metric it does not know."""


@dataclass(frozen=True)
class Decision:
    """The gate's verdict and every check behind it, failed ones first."""

    promote: bool
    reasons: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for `lacd status`: the first failed check, or that every check passed."""
        if not self.reasons:
            return "promoted" if self.promote else "rejected by gate"
        head = "promoted: " if self.promote else "rejected by gate: "
        return head + self.reasons[0]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict."""
        return {"promote": self.promote, "reasons": list(self.reasons), "summary": self.summary()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Decision":
        return cls(bool(data["promote"]), list(data.get("reasons", [])))


def label(metric: str) -> str:
    """The words for a metric in messages."""
    return LABELS.get(metric, metric.replace("_", " "))


def decide(
    candidate: Mapping[str, Any],
    incumbent: Mapping[str, Any],
    primary: str = DEFAULT_PRIMARY,
    tolerance: float = DEFAULT_TOLERANCE,
    guards: Mapping[str, float] | None = None,
    if_unmeasured: str = "reject",
) -> Decision:
    """Promote or not, with one reason per check (failed checks first, then passed and skipped)."""
    guards = dict(DEFAULT_GUARDS if guards is None else guards)
    for metric in (primary, *guards):
        if metric not in HIGHER_IS_BETTER:
            raise GateError(f"unknown gate metric {metric!r}; known: {', '.join(HIGHER_IS_BETTER)}")
    if if_unmeasured not in ("reject", "promote"):
        raise GateError(f"if_unmeasured must be 'reject' or 'promote', not {if_unmeasured!r}")
    if tolerance < 0 or any(limit < 0 for limit in guards.values()):
        raise GateError("the tolerance and guard limits must not be negative")
    failed: list[str] = []
    passed: list[str] = []
    cand, inc = candidate.get(primary), incumbent.get(primary)
    if cand is None:
        message = f"{label(primary)} could not be measured for the candidate (no held-out case)"
        (passed if if_unmeasured == "promote" else failed).append(message)
    else:
        ok, message = _check(primary, float(cand), inc, tolerance, relative=False)
        (passed if ok else failed).append(message)
    for metric, limit in guards.items():
        value = candidate.get(metric)
        if value is None:
            passed.append(f"{label(metric)} not measured for the candidate; guard skipped")
            continue
        ok, message = _check(metric, float(value), incumbent.get(metric), limit, relative=metric in RELATIVE)
        (passed if ok else failed).append(message)
    return Decision(promote=not failed, reasons=failed + passed)


def _check(metric: str, value: float, reference: Any, limit: float, relative: bool) -> tuple[bool, str]:
    """(passed, message) for one metric against the model in use's value."""
    name, digits = label(metric), 3 if metric in RELATIVE else 2
    if reference is None:
        return True, f"{name} {_fmt(value, digits)}; the model in use has none, so it is not compared"
    reference = float(reference)
    slack = f"{limit * 100:g}%" if relative else _fmt(limit, digits)
    if HIGHER_IS_BETTER[metric]:
        bound = reference * (1 - limit) if relative else reference - limit
        ok = value >= bound - 1e-9
        sign = ">=" if ok else "<"
        return ok, f"{name} {_fmt(value, digits)} {sign} {_fmt(reference, digits)} - {slack}"
    bound = reference * (1 + limit) if relative else reference + limit
    ok = value <= bound + 1e-9
    sign = "<=" if ok else ">"
    return ok, f"{name} {_fmt(value, digits)} {sign} {_fmt(reference, digits)} + {slack}"


def _fmt(value: float, digits: int) -> str:
    """A number with `digits` decimals, or three significant ones when it is tiny but not zero."""
    if value != 0 and abs(value) < 10 ** -digits:
        return f"{value:.3g}"
    return f"{value:.{digits}f}"
