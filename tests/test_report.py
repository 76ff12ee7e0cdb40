"""The run report: report.html (self-contained) and report.png, from the stages' own results."""

from __future__ import annotations

import base64
import json
import re
import struct

import pytest

from lacd.pipeline.format import FormatSpec, format_lessons
from lacd.pipeline.gate import decide
from lacd.report import ReportError, load_progress_history, loss_curve, write_report

RUN = {"id": 7, "status": "rejected", "reason": "threshold", "lesson_count": 40, "tag": "lacd-coder:v3",
       "created_at": 1_790_000_000.0, "finished_at": 1_790_000_600.0}
FORMAT = {"family": "chatml", "train_tokens": 5120, "assistant_tokens": 900, "heldout_ids": [3, 9],
          "counts": {"train": 36, "heldout": 4, "truncated": 2, "dropped_too_long": 0,
                     "dropped_no_assistant_tokens": 1, "dropped_unrenderable": 0, "capped": 0}}
TRAIN = {"steps": 12, "tokens": 10240, "labelled_tokens": 1800, "seconds": 60.5, "tokens_per_s": 169.3,
         "device": "cpu", "dtype": "float32", "heldout_loss_before": 2.41, "heldout_loss_after": 0.87}
HISTORY = ([{"phase": "setup", "step": 0, "loss": None}]
           + [{"phase": "train", "step": i, "loss": 2.5 / i} for i in range(1, 13)]
           + [{"phase": "done", "step": 12, "loss": None}])
EVALUATION = {
    "generator": "transformers", "generators": {"candidate": "transformers", "incumbent": "transformers"},
    "n_cases": 4, "seconds": 12.5,
    "candidate": {"label": "candidate", "exact_call_accuracy": 0.75, "tool_name_accuracy": 1.0,
                  "tool_call_validity": 1.0, "fabricated_output_rate": 0.0, "clean_stop_rate": 1.0,
                  "heldout_loss": 0.87, "perplexity": 2.387},
    "incumbent": {"label": "base <model>", "exact_call_accuracy": 0.0, "tool_name_accuracy": 0.0,
                  "tool_call_validity": None, "fabricated_output_rate": 0.25, "clean_stop_rate": 0.5,
                  "heldout_loss": 2.41, "perplexity": 11.13},
}


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_report_writes_a_self_contained_page_and_a_png(tmp_path):
    decision = decide(EVALUATION["candidate"], {**EVALUATION["incumbent"], "exact_call_accuracy": 0.9})
    path = write_report(tmp_path, RUN, FORMAT, TRAIN, HISTORY, EVALUATION, decision,
                        curation={"duplicate": 5, "fabricated_output": 2},
                        lengths={"train": [80, 120, 300], "heldout": [90]})
    assert path == tmp_path / "report.html"
    width, height = png_size((tmp_path / "report.png").read_bytes())
    assert (width, height) == (1300, 900)
    page = path.read_text()
    assert "rejected by gate" in page
    assert "exact-call accuracy 0.75 &lt; 0.90 - 0.02" in page  # the gate's reason, escaped
    assert "base &lt;model&gt;" in page and "<model>" not in page
    assert re.search(r"<td>exact-call accuracy</td><td class='num'>0.00</td><td class='num'>0.75</td>", page)
    assert "+0.750" in page and "Generations from transformers" in page
    assert "<tr><th>excluded at ingestion: duplicate</th><td>5</td></tr>" in page  # the count in its row
    assert "<tr><th>excluded at ingestion: fabricated output</th><td>2</td></tr>" in page
    assert "train example tokens (min / median / max)</th><td>80 / 120 / 300" in page
    # self-contained: no link, script or image from anywhere else; the figure is inlined
    assert not re.search(r"(src|href)\s*=\s*['\"](?!data:)", page)
    inlined = re.search(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page).group(1)
    assert base64.b64decode(inlined) == (tmp_path / "report.png").read_bytes()
    assert not list(tmp_path.glob(".*tmp"))  # temporary files renamed away


def test_report_without_evaluation_or_history_still_renders(tmp_path):
    path = write_report(tmp_path, {"id": 1}, {}, {}, [], {}, None, lengths={})
    page = path.read_text()
    assert "No evaluation was recorded" in page and "No gate decision recorded" in page
    png_size((tmp_path / "report.png").read_bytes())


def test_report_reads_lengths_from_the_run_dataset_and_history_from_progress_jsonl(tmp_path):
    from lacd.ingest.lessons import parse_line
    from lacd.pipeline.format import LessonIn
    from lacd.samples import generate_lessons
    from tiny import make_tiny_llama

    base = make_tiny_llama(tmp_path / "base")
    lessons = [LessonIn(i, p.conv_hash, p.messages)
               for i, p in enumerate((parse_line(s.line) for s in generate_lessons(12, seed=2)), start=1)]
    run_dir = tmp_path / "run"
    result = format_lessons(lessons, FormatSpec(base, run_dir / "dataset", "S", max_seq_len=128, heldout_pct=20))
    with open(run_dir / "progress.jsonl", "w") as fh:
        for entry in HISTORY:
            fh.write(json.dumps(entry) + "\n")
        fh.write('{"phase": "train", "step": 13, "lo')  # a line cut by a crash is skipped
    history = load_progress_history(run_dir)
    assert loss_curve(history) == (list(range(1, 13)), [2.5 / i for i in range(1, 13)])
    page = write_report(run_dir, RUN, result.to_dict(), TRAIN, history, EVALUATION, decide(
        EVALUATION["candidate"], EVALUATION["incumbent"])).read_text()
    assert "<span class='promoted'>promoted</span>" in page
    assert "train example tokens (min / median / max)</th><td>" in page
    assert "heldout example tokens" in page or result.counts["heldout"] == 0


def test_report_into_a_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ReportError, match="does not exist"):
        write_report(tmp_path / "nope", RUN, FORMAT, TRAIN, HISTORY, EVALUATION, None)


def test_lacd_report_finds_or_writes_a_runs_report_and_says_why_when_it_cannot(tmp_path):
    from lacd import config, db
    from lacd.report import report_path
    from lacd.pipeline.results import RESULTS
    from lacd.runs import RunStore
    from sqlalchemy import insert

    from lacd.models import Run

    s = config.load(env={"LACD_STATE_DIR": str(tmp_path / "state")})
    engine = db.write_engine(s.db_path)
    db.migrate(engine)
    store = RunStore(engine)
    with pytest.raises(ReportError, match="no run yet"):
        report_path(s)

    def run(status: str) -> int:
        with engine.begin() as conn:
            return conn.execute(insert(Run).values(status=status, created_at=1.0e9, lesson_count=40,
                                                   reason="threshold")).inserted_primary_key[0]

    failed_early, running, rejected = run("failed"), run("running"), run("rejected")
    for stage, result in (("format", FORMAT), ("train", TRAIN), ("evaluate", EVALUATION),
                          ("promote", {"promoted": False, "decision": decide(EVALUATION["candidate"],
                                                                              {"exact_call_accuracy": 0.9}).to_dict()})):
        store.begin_stage(rejected, stage)
        store.finish_stage(rejected, stage, RESULTS[stage].from_dict(result))
    with engine.begin() as conn:  # begin_stage marked it running
        conn.execute(Run.__table__.update().where(Run.id == rejected).values(status="rejected"))
    with pytest.raises(ReportError, match=f"run #{running} is still running"):
        report_path(s, running)
    with pytest.raises(ReportError, match=f"run #{failed_early} failed before training"):
        report_path(s, failed_early)
    with pytest.raises(ReportError, match="there is no run #99"):
        report_path(s, 99)
    with pytest.raises(ReportError, match="folder was removed"):
        report_path(s)  # the newest run: its folder is gone
    (s.runs_dir / str(rejected)).mkdir(parents=True)
    path = report_path(s)
    assert path == s.runs_dir / str(rejected) / "report.html"
    assert "rejected by gate" in path.read_text() and "exact-call accuracy 0.75 &lt; 0.90 - 0.02" in path.read_text()
    assert report_path(s, rejected) == path  # found, not rewritten
