"""A run's report: report.html (self-contained) and report.png in the run's folder.

The PNG, drawn with matplotlib's Agg backend (no display needed), has four panels: the training
loss per optimizer step with the held-out loss before and after training; the metric table of
the candidate against the model in use; lesson counts by curation reason and by what formatting
did with them; and the lengths of the formatted examples in tokens. The HTML holds the same
numbers as tables, the gate's decision with its reasons, which generator measured each model,
and the PNG inlined as a data: URI, so the file can be mailed or opened anywhere on its own.

``write_report`` takes plain dicts, the same ones the stages return; ``write_run_report`` reads
them for one run from the database (the run executor calls it when a run ends past training), and
``report_path`` is ``lacd report``: the existing page, or one written now for an ended run.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import structlog

from lacd.artifacts import write_bytes_atomic

log = structlog.get_logger(__name__)

HTML_FILE = "report.html"
PNG_FILE = "report.png"
PROGRESS_HISTORY_FILE = "progress.jsonl"
METRIC_ROWS = (
    ("exact_call_accuracy", "exact-call accuracy"),
    ("tool_name_accuracy", "tool-name accuracy"),
    ("tool_call_validity", "tool-call validity"),
    ("fabricated_output_rate", "fabricated-output rate"),
    ("clean_stop_rate", "clean-stop rate"),
    ("heldout_loss", "held-out loss"),
    ("perplexity", "perplexity"),
)
RATE_METRICS = ("exact_call_accuracy", "tool_name_accuracy", "tool_call_validity",
                "fabricated_output_rate", "clean_stop_rate")  # fmt: skip


class ReportError(Exception):
    """The report cannot be written (the run folder is missing or not writable)."""


def load_progress_history(run_dir: Path) -> list[dict]:
    """The training progress lines a run recorded in progress.jsonl (one JSON object per line)."""
    path = Path(run_dir) / PROGRESS_HISTORY_FILE
    if not path.is_file():
        return []
    history = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            history.append(json.loads(line))
        except ValueError:  # a line cut by a crash
            continue
    return history


def load_pauses(run_dir: Path) -> list[dict]:
    """The run's pauses for the agent (pauses.jsonl, written by lacd.worker) as spans:
    {"since", "until" (None while paused), "stage", "step", "reason"}."""
    path = Path(run_dir) / "pauses.jsonl"
    spans: list[dict] = []
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:  # a line cut by a crash
            continue
        if "since" in entry:
            spans.append({"until": None, **entry})
        elif "until" in entry and spans and spans[-1]["until"] is None:
            spans[-1]["until"] = entry["until"]
    return spans


def render_timeline_png(history: Sequence[Mapping[str, Any]], pauses: Sequence[Mapping[str, Any]],
                        start: float, end: float | None = None) -> bytes:
    """Training steps over wall-clock minutes since the run started, pauses for the agent shaded."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    figure = Figure(figsize=(13, 2.8), dpi=100, layout="constrained")
    ax = figure.subplots()
    points = [((h["updated_at"] - start) / 60, h["step"]) for h in history
              if h.get("phase") == "train" and h.get("updated_at") and h.get("step") is not None]
    if points:
        ax.plot([x for x, _ in points], [y for _, y in points], ".", markersize=3, color="#1f77b4", label="optimizer step")
    last = max([x for x, _ in points] + [((p.get("until") or end or p["since"]) - start) / 60 for p in pauses] + [0])
    for i, p in enumerate(pauses):
        until = p.get("until") or end or (start + last * 60)
        ax.axvspan((p["since"] - start) / 60, (until - start) / 60, color="#ff7f0e", alpha=0.3,
                   label="paused: agent active" if i == 0 else None)
    ax.set_xlabel("minutes since the run started")
    ax.set_ylabel("step")
    ax.set_title("Time line: training and pauses for the agent")
    ax.legend(loc="upper left", fontsize=8)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": "lacd"})
    return buffer.getvalue()


def example_lengths(dataset_dir: Path) -> dict[str, list[int]]:
    """Token counts of the formatted examples by split ({} when the dataset is gone)."""
    from datasets import load_from_disk

    try:
        splits = load_from_disk(str(dataset_dir))
    except (FileNotFoundError, ValueError, OSError):
        return {}
    return {name: [len(ids) for ids in splits[name]["input_ids"]] for name in splits}


def write_report(
    run_dir: Path,
    run: Mapping[str, Any],
    format_result: Mapping[str, Any],
    train_result: Mapping[str, Any],
    progress_history: Sequence[Mapping[str, Any]],
    evaluation: Mapping[str, Any],
    decision: Any,
    *,
    curation: Mapping[str, int] | None = None,
    lengths: Mapping[str, Sequence[int]] | None = None,
    pauses: Sequence[Mapping[str, Any]] = (),
) -> Path:
    """Write report.png and report.html into run_dir (each under a temporary name, then renamed).

    run: the run's row as a dict (id, status, lesson_count, created_at, finished_at, reason, tag...);
    format_result: format.json (counts, train_tokens, heldout_ids...); train_result: the train
    stage's result; progress_history: the trainer's progress dicts (step, loss, phase...), e.g.
    from load_progress_history; evaluation: evaluate_candidate's result; decision: a gate
    Decision or its to_dict(); curation: lessons excluded at ingestion by reason ({"duplicate": 3});
    lengths: example token counts by split (default: read from run_dir/dataset); pauses: the
    run's pauses for the agent (load_pauses), drawn on a time line when there are any.
    Returns the path of report.html.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"run folder {run_dir} does not exist")
    if lengths is None:
        lengths = example_lengths(run_dir / "dataset")
    decision_dict = decision.to_dict() if hasattr(decision, "to_dict") else dict(decision or {})
    png = render_png(format_result, train_result, progress_history, evaluation, curation or {}, lengths)
    _write_atomic(run_dir / PNG_FILE, png)
    page = render_html(run, format_result, train_result, evaluation, decision_dict, curation or {}, lengths, png)
    if pauses:
        start = run.get("started_at") or run.get("created_at") or min(p["since"] for p in pauses)
        page = page.replace("<h2>Training</h2>", _pauses_html(progress_history, pauses, start, run.get("finished_at"))
                            + "<h2>Training</h2>", 1)
    path = run_dir / HTML_FILE
    _write_atomic(path, page.encode("utf-8"))
    log.info("report.written", run=run.get("id"), path=str(path), bytes=len(page))
    return path


def write_run_report(run_dir: Path, store: Any, run_id: int) -> Path:
    """write_report for a run of the database: its row, its stages' results and its folder's files.

    store: a lacd.runs.RunStore (reading only). Works at any point after the train stage; what is
    missing (no evaluation yet, a pruned dataset) is shown as missing.
    """
    from lacd.listings import excluded_counts
    from lacd.pipeline.results import EvaluateStageResult, FormatStageResult, PromoteStageResult, TrainStageResult
    from lacd.versions import VersionStore

    run_dir = Path(run_dir)
    row = store.get(run_id)
    version = VersionStore(store.engine).of_run(run_id)
    run = {"id": row.id, "status": row.status, "reason": row.reason, "lesson_count": row.lesson_count,
           "created_at": row.created_at, "started_at": row.started_at, "finished_at": row.finished_at,
           "tag": version.tag if version is not None else None}  # fmt: skip
    format_path = run_dir / "dataset" / "format.json"
    kinds = (FormatStageResult, TrainStageResult, EvaluateStageResult, PromoteStageResult)
    results = {kind: store.result(run_id, kind) for kind in kinds}
    stored = {kind: r.to_dict() if r is not None else {} for kind, r in results.items()}
    format_result = (json.loads(format_path.read_text(encoding="utf-8")) if format_path.is_file()
                     else stored[FormatStageResult])  # fmt: skip
    promote = results[PromoteStageResult]
    with store.engine.connect() as conn:
        curation = excluded_counts(conn)
    return write_report(run_dir, run, format_result, stored[TrainStageResult], load_progress_history(run_dir),
                        stored[EvaluateStageResult], (promote.decision if promote else None) or {},
                        curation=curation, pauses=load_pauses(run_dir))  # fmt: skip


def report_path(settings: Any, run_id: int | None = None) -> Path:
    """The report.html of a run (default: the newest), written now if the run ended without one.

    Raises ReportError with what to do when there is no run, the run is still going, it ended
    before training, or its folder was pruned ([run] keep_runs).
    """
    from sqlalchemy.exc import NoResultFound

    from lacd import db
    from lacd.pipeline.results import TrainStageResult
    from lacd.runs import ACTIVE, RunStore

    engine = db.read_engine(settings.db_path)
    db.require_schema(engine, "runs", "run_stages", "model_versions")
    store = RunStore(engine)
    run_id = store.newest_id() if run_id is None else run_id
    if run_id is None:
        raise ReportError("no run yet: `lacd train` starts one")
    try:
        row = store.get(run_id)
    except NoResultFound:
        raise ReportError(f"there is no run #{run_id} (`lacd status` lists the recent runs)") from None
    path = settings.runs_dir / str(run_id) / HTML_FILE
    if path.is_file():
        return path
    if row.status in ACTIVE:
        raise ReportError(f"run #{run_id} is still {row.status} (at {row.stage}); its report is written when it ends")
    if store.result(run_id, TrainStageResult) is None:
        raise ReportError(f"run #{run_id} {row.status} before training: no report (`lacd status` shows why)")
    if not path.parent.is_dir():
        raise ReportError(f"run #{run_id}'s folder was removed ([run] keep_runs keeps the newest)")
    return write_run_report(path.parent, store, run_id)


# --------------------------------------------------------------------------- the figure


def render_png(
    format_result: Mapping[str, Any],
    train_result: Mapping[str, Any],
    progress_history: Sequence[Mapping[str, Any]],
    evaluation: Mapping[str, Any],
    curation: Mapping[str, int],
    lengths: Mapping[str, Sequence[int]],
) -> bytes:
    """The four-panel report figure as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    figure = Figure(figsize=(13, 9), dpi=100, layout="constrained")
    (loss_ax, metric_ax), (count_ax, length_ax) = figure.subplots(2, 2)
    _plot_losses(loss_ax, train_result, progress_history)
    _plot_metrics(metric_ax, evaluation)
    _plot_counts(count_ax, format_result, curation)
    _plot_lengths(length_ax, lengths)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": "lacd"})
    return buffer.getvalue()


def loss_curve(progress_history: Sequence[Mapping[str, Any]]) -> tuple[list[int], list[float]]:
    """(steps, losses) of the training steps in a progress history; the last value of a step wins."""
    by_step: dict[int, float] = {}
    for entry in progress_history:
        loss, step = entry.get("loss"), entry.get("step")
        if entry.get("phase", "train") == "train" and isinstance(loss, (int, float)) and isinstance(step, int):
            if math.isfinite(loss):
                by_step[step] = float(loss)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def _plot_losses(ax: Any, train_result: Mapping[str, Any], history: Sequence[Mapping[str, Any]]) -> None:
    steps, losses = loss_curve(history)
    last = int(train_result.get("steps") or (steps[-1] if steps else 1))
    if steps:
        ax.plot(steps, losses, color="#1f77b4", linewidth=1.2, label="training loss")
    before, after = train_result.get("heldout_loss_before"), train_result.get("heldout_loss_after")
    points = [(0, before), (last, after)]
    shown = [(x, y) for x, y in points if y is not None]
    if shown:
        ax.plot([x for x, _ in shown], [y for _, y in shown], "o--", color="#d62728", label="held-out loss")
        for x, y in shown:
            ax.annotate(f"{y:.3f}", (x, y), textcoords="offset points", xytext=(4, 6), fontsize=8)
    ax.set_title("Loss on assistant tokens")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    if steps or shown:
        ax.legend(loc="upper right", fontsize=8)
    else:
        _empty(ax, "no training progress recorded")


def _plot_metrics(ax: Any, evaluation: Mapping[str, Any]) -> None:
    cand, inc = evaluation.get("candidate") or {}, evaluation.get("incumbent") or {}
    names = [label for key, label in METRIC_ROWS if key in RATE_METRICS]
    keys = [key for key, _ in METRIC_ROWS if key in RATE_METRICS]
    if not cand and not inc:
        _empty(ax, "no evaluation")
        return
    positions = range(len(keys))
    width = 0.38
    for offset, metrics, color, name in ((-width / 2, inc, "#7f7f7f", inc.get("label") or "in use"),
                                         (width / 2, cand, "#2ca02c", "candidate")):  # fmt: skip
        values = [metrics.get(k) for k in keys]
        bars = ax.barh([p + offset for p in positions], [v or 0 for v in values], height=width, color=color,
                       label=name)  # fmt: skip
        for bar, value in zip(bars, values):
            text = "n/a" if value is None else f"{value:.2f}"
            ax.text(bar.get_width() + 0.01, bar.get_y() + bar.get_height() / 2, text, va="center", fontsize=8)
    ax.set_yticks(list(positions), names)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.15)
    losses = [f"{m.get('label') or who}: loss {_num(m.get('heldout_loss'), 3)}"
              for who, m in (("in use", inc), ("candidate", cand))]  # fmt: skip
    ax.set_title(f"Held-out metrics, {evaluation.get('n_cases', 0)} prompts ({evaluation.get('generator', '?')})\n"
                 + "; ".join(losses), fontsize=10)  # fmt: skip
    ax.legend(loc="lower right", fontsize=8)


def _plot_counts(ax: Any, format_result: Mapping[str, Any], curation: Mapping[str, int]) -> None:
    counts = dict(format_result.get("counts") or {})
    rows = [(f"excluded: {k.replace('_', ' ')}", v) for k, v in sorted(curation.items())]
    rows += [(k.replace("_", " "), v) for k, v in counts.items() if v or k in ("train", "heldout")]
    if not rows:
        _empty(ax, "no lesson counts")
        return
    labels, values = zip(*rows)
    colors = ["#ff7f0e" if label.startswith("excluded") else "#9467bd" for label in labels]
    bars = ax.barh(range(len(rows)), values, color=colors)
    for bar, value in zip(bars, values):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {value}", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), labels)
    ax.invert_yaxis()
    ax.set_title("Lessons by curation reason and formatting outcome")
    ax.set_xlabel("lessons")


def _plot_lengths(ax: Any, lengths: Mapping[str, Sequence[int]]) -> None:
    series = {name: list(values) for name, values in lengths.items() if values}
    if not series:
        _empty(ax, "no formatted examples")
        return
    top = max(max(v) for v in series.values())
    edges = [8]
    while edges[-1] <= top:
        edges.append(edges[-1] * 2)
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c"][: len(series)]
    ax.hist(list(series.values()), bins=edges, label=list(series), color=colors)
    ax.set_xscale("log", base=2)
    ax.set_title("Example length (tokens, after truncation)")
    ax.set_xlabel("tokens")
    ax.set_ylabel("examples")
    ax.legend(fontsize=8)


def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#7f7f7f")
    ax.set_xticks([])
    ax.set_yticks([])


# --------------------------------------------------------------------------- the page


_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.5em;margin-bottom:.2em} h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0} td,th{border:1px solid #ddd;padding:.3em .7em;text-align:left}
th{background:#f5f5f5} td.num{text-align:right;font-variant-numeric:tabular-nums}
.promoted{color:#1a7f37;font-weight:600} .rejected{color:#b42318;font-weight:600}
.better{color:#1a7f37} .worse{color:#b42318} code{font-size:.9em} img{max-width:100%;border:1px solid #eee}
.muted{color:#777}
"""


def render_html(
    run: Mapping[str, Any],
    format_result: Mapping[str, Any],
    train_result: Mapping[str, Any],
    evaluation: Mapping[str, Any],
    decision: Mapping[str, Any],
    curation: Mapping[str, int],
    lengths: Mapping[str, Sequence[int]],
    png: bytes,
) -> str:
    """The report page; the figure is inlined, nothing is loaded from elsewhere."""
    e = html.escape
    promote = decision.get("promote")
    verdict = ("<span class='promoted'>promoted</span>" if promote
               else "<span class='rejected'>rejected by gate</span>" if promote is False
               else "<span class='muted'>no decision</span>")  # fmt: skip
    title = f"lacd run {run.get('id', '?')}"
    parts = [
        "<!DOCTYPE html>",
        "<html lang='en'><head><meta charset='utf-8'>",
        f"<title>{e(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{e(title)}: {verdict}</h1>",
        f"<p class='muted'>{e(_run_line(run))}</p>",
        "<h2>Gate</h2>",
        _list(decision.get("reasons") or []),
        "<h2>Candidate against the model in use</h2>",
        _metric_table(evaluation),
        f"<p class='muted'>{e(_generator_line(evaluation))}</p>",
        "<h2>Figures</h2>",
        f"<img alt='loss curves, metrics, lesson counts and lengths' "
        f"src='data:image/png;base64,{base64.b64encode(png).decode('ascii')}'>",
        "<h2>Training</h2>",
        _kv_table(_train_rows(train_result)),
        "<h2>Lessons</h2>",
        _kv_table(_lesson_rows(format_result, curation, lengths)),
        "<p class='muted'>Written by lacd at " + e(time.strftime("%Y-%m-%d %H:%M:%S")) + ".</p>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _pauses_html(history: Sequence[Mapping[str, Any]], pauses: Sequence[Mapping[str, Any]], start: float,
                 end: float | None) -> str:
    """The time line figure and one line per pause: when, how long, at which stage and step, why."""
    png = render_timeline_png(history, pauses, start, end)
    items = []
    for p in pauses:
        when = time.strftime("%H:%M:%S", time.localtime(p["since"]))
        took = f"{(p['until'] - p['since']) / 60:.1f} min" if p.get("until") else "until the end"
        step = f" step {p['step']}" if p.get("step") is not None else ""
        items.append(f"{when} for {took}, at {p.get('stage', '?')}{step}: {p.get('reason', '')}")
    return ("<h2>Pauses for the agent</h2>"
            f"<img alt='time line with pauses' src='data:image/png;base64,{base64.b64encode(png).decode('ascii')}'>"
            + _list(items))


def _run_line(run: Mapping[str, Any]) -> str:
    fields = []
    for key in ("status", "reason", "lesson_count", "tag"):
        if run.get(key) is not None:
            fields.append(f"{key.replace('_', ' ')}: {run[key]}")
    for key in ("created_at", "started_at", "finished_at"):
        if isinstance(run.get(key), (int, float)):
            fields.append(f"{key.replace('_at', '')}: {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(run[key]))}")
    return " · ".join(fields)


def _generator_line(evaluation: Mapping[str, Any]) -> str:
    generators = evaluation.get("generators") or {}
    text = f"Generations from {evaluation.get('generator', 'unknown')}"
    if generators:
        text += " (" + ", ".join(f"{who}: {how}" for who, how in generators.items()) + ")"
    text += f", greedy, on {evaluation.get('n_cases', 0)} held-out prompts"
    if evaluation.get("seconds") is not None:
        text += f", in {evaluation['seconds']} s"
    return text + "."


def _metric_table(evaluation: Mapping[str, Any]) -> str:
    e = html.escape
    cand, inc = evaluation.get("candidate") or {}, evaluation.get("incumbent") or {}
    if not cand and not inc:
        return "<p class='muted'>No evaluation was recorded for this run.</p>"
    from lacd.pipeline.gate import HIGHER_IS_BETTER

    rows = [f"<tr><th>metric</th><th>{e(str(inc.get('label') or 'model in use'))}</th>"
            f"<th>candidate</th><th>change</th></tr>"]  # fmt: skip
    for key, name in METRIC_ROWS:
        a, b = inc.get(key), cand.get(key)
        change, css = "", ""
        if a is not None and b is not None:
            delta = b - a
            change = f"{delta:+.3f}"
            if abs(delta) > 1e-12:
                css = "better" if (delta > 0) == HIGHER_IS_BETTER.get(key, True) else "worse"
        digits = 3 if key in ("heldout_loss", "perplexity") else 2
        rows.append(f"<tr><td>{e(name)}</td><td class='num'>{_num(a, digits)}</td>"
                    f"<td class='num'>{_num(b, digits)}</td><td class='num {css}'>{change}</td></tr>")  # fmt: skip
    return "<table>" + "".join(rows) + "</table>"


def _train_rows(train: Mapping[str, Any]) -> list[tuple[str, Any]]:
    keys = ("steps", "tokens", "labelled_tokens", "seconds", "tokens_per_s", "device", "dtype", "tokens_per_batch",
            "grad_accum", "heldout_loss_before", "heldout_loss_after", "resumed_from_step")  # fmt: skip
    return [(k.replace("_", " "), train.get(k)) for k in keys if k in train]


def _lesson_rows(fmt: Mapping[str, Any], curation: Mapping[str, int], lengths: Mapping[str, Sequence[int]]) -> list:
    rows: list[tuple[str, Any]] = [(f"excluded at ingestion: {k.replace('_', ' ')}", v)
                                   for k, v in sorted(curation.items())]
    rows += [(k.replace("_", " "), v) for k, v in (fmt.get("counts") or {}).items()]
    for key in ("train_tokens", "assistant_tokens", "family"):
        if key in fmt:
            rows.append((key.replace("_", " "), fmt[key]))
    for split, values in lengths.items():
        if values:
            ordered = sorted(values)
            rows.append((f"{split} example tokens (min / median / max)",
                         f"{ordered[0]} / {ordered[len(ordered) // 2]} / {ordered[-1]}"))  # fmt: skip
    return rows


def _kv_table(rows: Sequence[tuple[str, Any]]) -> str:
    if not rows:
        return "<p class='muted'>Nothing recorded.</p>"
    e = html.escape
    body = "".join(f"<tr><th>{e(str(k))}</th><td>{e(_plain(v))}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _list(items: Sequence[str]) -> str:
    if not items:
        return "<p class='muted'>No gate decision recorded.</p>"
    return "<ul>" + "".join(f"<li>{html.escape(str(item))}</li>" for item in items) + "</ul>"


def _num(value: Any, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    return f"{float(value):.{digits}f}"


def _plain(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _write_atomic(path: Path, data: bytes) -> None:
    """Write bytes under a temporary name in the same folder, then rename over path (a report is
    redrawn from the database when lost: no fsync)."""
    try:
        write_bytes_atomic(path, data, durable=False)
    except OSError as exc:
        raise ReportError(f"cannot write {path}: {exc.strerror or exc}") from exc
