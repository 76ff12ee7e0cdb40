"""The run and version stores read what they return as typed, frozen values: stage results stored
before the typed results existed read back with the same keys, the worker meets every stage's
waiting and interruption through the two shared errors, a run's outcome and a stage's status are
Enums whose values are the stored statuses, and only VersionStore.activate moves the active version."""

from __future__ import annotations

import dataclasses
import json

import pytest
from sqlalchemy import insert, select

from lacd.models import ModelVersion, Run, RunStage
from lacd.pipeline.evaluate import EvaluateInterrupted
from lacd.pipeline.register import OllamaUnavailable
from lacd.pipeline.results import RESULTS, ExportStageResult, FormatStageResult, PromoteStageResult, TrainStageResult
from lacd.pipeline.trainspec import TrainInterrupted, TrainYielded
from lacd.runs import RunOutcome, RunRow, StageRow, StageStatus
from lacd.versions import VersionRow, VersionStore
from test_worker import fake_stages, make_executor

# Results as the stages of lacd before typed results wrote them (dicts, a flattened trainspec.TrainResult).
OLD_ROWS = {
    "format": {"base_dir": "/state/base/abc", "family": "chatml", "counts": {"train": 7, "heldout": 1, "too_long": 0},
               "train_tokens": 5120, "assistant_tokens": 1800, "seconds": 1.5},
    "train": {"adapter_dir": "/state/runs/1/adapter", "heldout_loss_before": 2.25, "heldout_loss_after": 1.5,
              "steps": 12, "tokens": 9000, "labelled_tokens": 3000, "seconds": 80.12, "tokens_per_s": 112.5,
              "device": "cpu", "dtype": "float32", "attention": "sdpa", "tokens_per_batch": 2048, "grad_accum": 1,
              "resumed_from_step": None, "truncated_examples": 0, "gradient_checkpointing": False,
              "adapter_compute": "float32", "compiled": False, "fused_kernels": "off", "peak_gpu_memory_gib": None,
              "base_precision": "bf16", "plan": None, "shared_prefix": 0},
    "export": {"path": "/state/runs/1/model.gguf", "bytes": 123456, "skipped": "already exported", "seconds": 0.01},
    "register": {"tag": "lacd-coder:v1", "digest": None, "quantize": None, "quantize_reason": "f16 base", "seconds": 2.0},
    "evaluate": {"generator": "transformers", "generators": {"candidate": "transformers", "incumbent": "transformers"},
                 "n_cases": 2, "candidate": {"label": "lacd-coder:v1", "exact_call_accuracy": 0.5},
                 "incumbent": {"label": "base model", "exact_call_accuracy": 0.0}, "seconds": 9.5,
                 "known_losses": {"candidate": 1.5}},
    "promote": {"promoted": True, "tag": "lacd-coder:v1", "latest": "lacd-coder:v1", "pruned": [],
                "decision": {"promote": True, "reasons": ["exact-call accuracy 0.50 >= 0.00 - 0.02"],
                             "summary": "promoted"}, "seconds": 0.3},
}


@pytest.fixture
def executor(tmp_path):
    return make_executor(tmp_path)


def test_stage_results_stored_before_the_typed_results_read_with_the_same_keys(executor):
    store = executor.store
    run_id = store.create("threshold", 10)
    with store.engine.begin() as conn:
        conn.execute(insert(RunStage), [{"run_id": run_id, "stage": stage, "status": "done", "attempts": 1,
                                         "result": json.dumps(result)} for stage, result in OLD_ROWS.items()])
    for stage, old in OLD_ROWS.items():
        typed = store.result(run_id, RESULTS[stage])
        assert typed.to_dict() == old, stage
    assert store.result(run_id, FormatStageResult).family == "chatml"
    train = store.result(run_id, TrainStageResult)
    assert (train.heldout_loss_before, train.heldout_loss_after, train.extra["device"]) == (2.25, 1.5, "cpu")
    assert store.result(run_id, ExportStageResult).tensors is None
    assert store.result(run_id, PromoteStageResult).decision["summary"] == "promoted"
    with pytest.raises(dataclasses.FrozenInstanceError):
        train.steps = 1


def test_a_finished_stage_stores_its_result_as_json_without_unset_optional_keys(executor):
    store = executor.store
    run_id = store.create("threshold", 10)
    store.begin_stage(run_id, "export")
    exported = ExportStageResult(path="/m.gguf", bytes=3, skipped="already exported").timed(0.5)
    store.finish_stage(run_id, "export", exported)
    with store.engine.connect() as conn:
        text = conn.execute(select(RunStage.result).where(RunStage.run_id == run_id)).scalar_one()
    assert json.loads(text) == {"path": "/m.gguf", "bytes": 3, "skipped": "already exported", "seconds": 0.5}
    assert store.result(run_id, TrainStageResult) is None  # not done: no result, not an empty one


def test_rows_come_back_as_frozen_dataclasses(executor):
    store = executor.store
    run_id = store.create("threshold", 10)
    store.begin_stage(run_id, "format")
    store.set_progress(run_id, {"step": 3})
    run = store.get(run_id)
    assert isinstance(run, RunRow) and run == store.active()
    assert (run.status, run.stage, run.lesson_count, run.progress_dict()) == ("running", "format", 3, {"step": 3})
    assert isinstance(store.stages(run_id)["format"], StageRow)
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.status = "done"


@pytest.mark.parametrize("error", [TrainYielded("stepped aside"), TrainInterrupted("stop requested"),
                                   EvaluateInterrupted("stop requested")])
def test_every_stages_interruption_is_one_shared_type_the_worker_catches(executor, monkeypatch, error):
    def interrupted(ctx):
        raise error

    fake_stages(monkeypatch, train=interrupted)
    run_id = executor.store.create("threshold", 10)
    assert executor.execute(run_id) is RunOutcome.INTERRUPTED
    stage = executor.store.stages(run_id)["train"]
    assert (stage.status, stage.attempts, executor.store.get(run_id).error) == ("running", 1, None)


def test_ollama_unavailable_is_a_stage_waiting_the_run_waits_for_without_failing(executor, monkeypatch):
    def unreachable(ctx):
        raise OllamaUnavailable("Ollama is not reachable at http://127.0.0.1:9")

    fake_stages(monkeypatch, register=unreachable)
    run_id = executor.store.create("threshold", 10)
    assert executor.execute(run_id) is RunOutcome.WAITING  # LACD_RUN_RETRIES=1: a failure would end the run
    run = executor.store.get(run_id)
    assert (run.status, run.waiting_for) == ("waiting", f"Ollama at {executor.settings.ollama.host}")


def test_run_outcomes_are_the_stored_statuses(executor, monkeypatch):
    fake_stages(monkeypatch)
    run_id = executor.store.create("threshold", 10)
    outcome = executor.execute(run_id, until="export")
    assert outcome is RunOutcome.STOPPED_AFTER_EXPORT and f"{outcome}" == "stopped after export"
    outcome = executor.execute(run_id)
    assert outcome is RunOutcome.REJECTED and RunOutcome(executor.store.get(run_id).status) is outcome


def test_stage_statuses_are_the_stored_strings(executor):
    """A stage through every status: the stored text is what lacd wrote before StageStatus existed."""
    store = executor.store
    run_id = store.create("threshold", 10)

    def stored() -> str:
        with store.engine.connect() as conn:
            return conn.execute(select(RunStage.status).where(RunStage.run_id == run_id)).scalar_one()

    seen = []
    for move in (lambda: store.begin_stage(run_id, "train"), lambda: store.pause(run_id, "train", 1.0, "agent active"),
                 lambda: store.begin_stage(run_id, "train"), lambda: store.wait(run_id, "train", "boom", 5.0, None),
                 lambda: store.begin_stage(run_id, "train"),
                 lambda: store.finish_stage(run_id, "train", TrainStageResult(steps=1))):
        move()
        seen.append(stored())
        assert StageStatus(seen[-1]) == store.stages(run_id)["train"].status
    assert seen == ["running", "paused", "running", "failed", "running", "done"]
    assert store.stages(run_id)["train"].attempts == 2  # three begun, the paused one does not count
    assert {str(s) for s in StageStatus} == {"running", "paused", "failed", "done"}


def test_activate_is_the_one_way_to_move_the_active_version(executor):
    versions = VersionStore(executor.store.engine)
    first = executor.store.create("manual", 10)
    with executor.store.engine.begin() as conn:  # create() refuses a second run while one is active
        second = conn.execute(insert(Run).values(status="done", created_at=1.0, lesson_count=3, reason="manual")
                              ).inserted_primary_key[0]
    assert (versions.allocate(first, "m", 3), versions.allocate(second, "m", 3), versions.allocate(first, "m", 3)) \
        == (1, 2, 1)
    versions.activate("m", 1, note="promoted")
    versions.activate("m", 2, replaced_note="rolled forward", metrics={"n_cases": 1})
    rows = {v.version: v for v in versions.all("m")}
    assert isinstance(rows[1], VersionRow) and versions.active("m") == rows[2]
    assert (rows[1].active, rows[1].note, rows[2].status, json.loads(rows[2].metrics)) == \
        (0, "promoted; rolled forward", "promoted", {"n_cases": 1})
    with executor.store.engine.connect() as conn:
        assert conn.execute(select(ModelVersion.version).where(ModelVersion.active == 1)).scalars().all() == [2]
