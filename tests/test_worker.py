"""RunExecutor's endings with stand-in stage functions (no model): rejected by the gate, failed
after training, interrupted during evaluation. The stages themselves run for real in
tests/test_gate_cycle.py and tests/integration/test_cycle.py."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import insert, select

from lacd import config, db
from lacd.models import Lesson, Source
from lacd.pipeline import stages
from lacd.pipeline.evaluate import EvaluateInterrupted
from lacd.pipeline.results import RESULTS
from lacd.runs import RunStore
from lacd.worker import RunExecutor

TRAIN = {"steps": 2, "heldout_loss_before": 2.0, "heldout_loss_after": 1.5}
EVALUATION = {"generator": "transformers", "n_cases": 1,
              "candidate": {"label": "lacd-coder:v1", "exact_call_accuracy": 0.0},
              "incumbent": {"label": "base model", "exact_call_accuracy": 1.0}}
DECISION = {"promote": False, "reasons": ["exact-call accuracy 0.00 < 1.00 - 0.02"],
            "summary": "rejected by gate: exact-call accuracy 0.00 < 1.00 - 0.02"}


@pytest.fixture
def executor(tmp_path):
    return make_executor(tmp_path)


def make_executor(tmp_path, **env: str) -> RunExecutor:
    """A RunExecutor on a fresh state dir holding three pending lessons; env: more LACD_* settings."""
    s = config.load(env={"LACD_STATE_DIR": str(tmp_path / "state"), "LACD_RUN_RETRIES": "1", **env})
    engine = db.write_engine(s.db_path)
    db.migrate(engine)
    with engine.begin() as conn:
        source = conn.execute(insert(Source).values(path="log", dev=1, inode=1, state="active", created_at=1.0,
                                                    updated_at=1.0)).inserted_primary_key[0]
        conn.execute(insert(Lesson), [dict(source_id=source, offset=i, length=1, ingested_at=1.0, format="v1",
                                           conversation='{"messages": []}', raw="", conv_hash=str(i),
                                           status="pending") for i in range(3)])
    return RunExecutor(s, RunStore(engine), threading.Event())


def fake_stages(monkeypatch, **behaviour):
    """Every stage returns a small result; `behaviour` replaces some of them."""
    results = {"format": {"counts": {"train": 2, "heldout": 1}, "family": "chatml"}, "train": TRAIN,
               "export": {}, "register": {"tag": "lacd-coder:v1"}, "evaluate": EVALUATION,
               "promote": {"promoted": False, "tag": "lacd-coder:v1", "decision": DECISION}}
    for name in stages.STAGES:
        action = behaviour.get(name, lambda ctx, name=name: RESULTS[name].from_dict(results[name]))
        monkeypatch.setitem(stages.STAGE_FUNCTIONS, name, action)


def lesson_statuses(store: RunStore) -> set[str]:
    with store.engine.connect() as conn:
        return set(conn.execute(select(Lesson.status)).scalars())


def test_a_rejected_run_ends_rejected_counts_its_lessons_and_writes_its_report(executor, monkeypatch):
    fake_stages(monkeypatch)
    run_id = executor.store.create("threshold", 10)
    assert executor.execute(run_id) == "rejected"
    run = executor.store.get(run_id)
    assert (run.status, run.error) == ("rejected", None) and run.finished_at is not None
    assert lesson_statuses(executor.store) == {"trained"}  # the same lessons would only be rejected again
    page = (executor.settings.runs_dir / str(run_id) / "report.html").read_text()
    assert "rejected by gate" in page and "exact-call accuracy 0.00 &lt; 1.00 - 0.02" in page


def test_a_run_failing_after_training_writes_its_report_and_keeps_lessons_pending(executor, monkeypatch):
    def broken(ctx):
        raise RuntimeError("GGUF writer exploded")

    fake_stages(monkeypatch, export=broken)
    run_id = executor.store.create("threshold", 10)
    assert executor.execute(run_id) == "failed"
    assert executor.store.get(run_id).error == "export failed after 1 attempts: RuntimeError: GGUF writer exploded"
    assert lesson_statuses(executor.store) == {"pending"}
    assert (executor.settings.runs_dir / str(run_id) / "report.html").is_file()


def test_a_run_failing_before_training_writes_no_report(executor, monkeypatch):
    def broken(ctx):
        raise RuntimeError("no tokenizer")

    fake_stages(monkeypatch, format=broken)
    run_id = executor.store.create("threshold", 10)
    assert executor.execute(run_id) == "failed"
    assert not (executor.settings.runs_dir / str(run_id) / "report.html").exists()


def test_a_stop_during_evaluation_interrupts_and_the_next_start_redoes_only_it(executor, monkeypatch):
    def stopped(ctx):
        raise EvaluateInterrupted("evaluation stopped on request")

    fake_stages(monkeypatch, evaluate=stopped)
    run_id = executor.store.create("threshold", 10)
    assert executor.execute(run_id) == "interrupted"
    assert executor.store.get(run_id).status == "running"  # resumed at the next start
    fake_stages(monkeypatch)
    assert executor.execute(run_id) == "rejected"
    assert {name: row.attempts for name, row in executor.store.stages(run_id).items()} == {
        "format": 1, "train": 1, "export": 1, "register": 1, "evaluate": 2, "promote": 1}
