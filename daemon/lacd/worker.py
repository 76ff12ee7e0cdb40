"""Executes runs, one at a time, in a thread of the daemon (or in the foreground for `lacd train`).

    RunExecutor.execute(run_id)  every stage not done yet, in order, with the retry policy
    RunWorker                    start(), loop (pick the runnable run, execute it), stop()

The retry policy lives here and only here: a stage that raises is retried after `backoff`
seconds (doubling) up to `retries` attempts, then the run fails with the stage's error and its
lessons stay pending. Ollama being unreachable is not a failure: the run waits (status
`waiting`, `waiting_for` says for what) and retries without limit, at most 10 minutes apart.
A stop request (SIGTERM) interrupts training or evaluation; the run resumes there at the next start.

Sharing the workstation (lacd.idle, given as `monitor`): train and evaluate start only while the
agent is idle, and while they run a watch thread samples the signals every second; when the agent
becomes active the stage steps aside (training checkpoints its last step, the child exits), the
run is `paused` (not an attempt, not a failure) and the worker resumes it once the agent has been
idle for `[schedule] idle_minutes` again. Each pause is a line of the run folder's pauses.jsonl
(the report draws them on its time axis).

A run ends `done` when the gate promoted its model, `rejected` when the gate kept the model in
use (both count its lessons as trained), or `failed`. Each end that got past training writes the
run's report.html and report.png into its folder (lacd.report).
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from typing import Any
from pathlib import Path

import structlog

from lacd.artifacts import sweep_leftovers
from lacd.config import Settings
from lacd.pipeline.errors import StageInterrupted, StageWaiting
from lacd.pipeline.stages import STAGE_FUNCTIONS, STAGES, RunContext
from lacd.pipeline.results import PromoteStageResult, TrainStageResult
from lacd.runs import RunOutcome, RunStore, StageStatus
from lacd.versions import VersionStore

log = structlog.get_logger(__name__)

WAIT_CAP = 600.0  # the longest wait between two tries of a waiting stage (Ollama down)
YIELDING_STAGES = ("train", "evaluate")  # the stages that hold a model (and the GPU) for minutes
PAUSES_FILE = "pauses.jsonl"


class RunExecutor:
    def __init__(self, settings: Settings, store: RunStore, stop: threading.Event, on_progress=None, monitor=None):
        self.settings = settings
        self.store = store
        self.versions = VersionStore(store.engine, store.clock)
        self.stop = stop
        self.on_progress = on_progress  # the foreground `lacd train` draws its progress bar with it
        self.monitor = monitor  # lacd.idle.IdleMonitor in the daemon; None: never step aside

    def run_dir(self, run_id: int) -> Path:
        path = self.settings.runs_dir / str(run_id)
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        return path

    def execute(self, run_id: int, until: str | None = None) -> RunOutcome:
        """Run the stages not done yet (up to and including `until`); returns the run's status.
        Before the first stage it starts (the run starts, resumes or retries), it removes what killed
        writers left under temporary names (artifacts.sweep_leftovers); a call that finds the run still
        paused (the worker's every poll) or is stopped starts nothing and sweeps nothing."""
        done = {name for name, row in self.store.stages(run_id).items() if row.status == StageStatus.DONE}
        swept = False
        for stage in STAGES:
            if stage not in done:
                if self.stop.is_set():
                    return RunOutcome.INTERRUPTED
                if not self._may_start(run_id, stage):
                    return RunOutcome.PAUSED
                if not swept:
                    sweep_leftovers(self.settings.state.dir)
                    swept = True
                outcome = self._attempt(run_id, stage)
                if outcome is not RunOutcome.DONE:
                    return outcome
            if stage == until:
                return RunOutcome.stopped_after(stage)
        promote = self.store.result(run_id, PromoteStageResult)
        status = RunOutcome.DONE if promote is None or promote.promoted else RunOutcome.REJECTED
        self.store.succeed(run_id, status)
        log.info("run_done", run=run_id, status=status)
        self.write_report(run_id)
        self.prune_run_dirs()
        return status

    def _attempt(self, run_id: int, stage: str) -> RunOutcome:
        attempt = self.store.begin_stage(run_id, stage)
        pause = threading.Event()
        report = self._reporter(run_id, stage)
        ctx = RunContext(run_id, self.run_dir(run_id), self.settings, self.store, self.versions, report, self.stop, pause)
        log.info("stage_started", run=run_id, stage=stage, attempt=attempt)
        started = time.monotonic()
        watch = self._watch(pause, stage)
        try:
            result = STAGE_FUNCTIONS[stage](ctx)
        except StageInterrupted as exc:
            if pause.is_set():
                report.flush()  # the child's last step, which the one-a-second limit may have held back
                self._pause(run_id, stage, watch.get("at", time.time()), watch.get("why", "agent active"), str(exc))
                return RunOutcome.PAUSED
            log.info("stage_interrupted", run=run_id, stage=stage)
            return RunOutcome.INTERRUPTED
        except StageWaiting as exc:
            delay = min(WAIT_CAP, self.settings.run.backoff * 2 ** (attempt - 1))
            waiting_for = exc.waiting_for(self.settings)
            self.store.wait(run_id, stage, str(exc), delay, waiting_for=waiting_for)
            log.warning("stage_waiting", run=run_id, stage=stage, waiting_for=waiting_for, retry_in=delay, error=str(exc))
            return RunOutcome.WAITING
        except Exception as exc:  # every stage failure is recorded; the policy below decides
            return self._failed(run_id, stage, attempt, f"{type(exc).__name__}: {exc}")
        finally:
            watch["done"].set()
        result = result.timed(round(time.monotonic() - started, 2))
        self.store.finish_stage(run_id, stage, result)
        log.info("stage_done", run=run_id, stage=stage, seconds=result.seconds)
        return RunOutcome.DONE

    # -- sharing the workstation -------------------------------------------------------------

    def _may_start(self, run_id: int, stage: str) -> bool:
        """Train and evaluate start (or resume) only while the agent is idle; else the run is paused."""
        if self.monitor is None or stage not in YIELDING_STAGES:
            return True
        verdict = self.monitor.verdict()
        progress = self.store.get(run_id).progress_dict()
        if not verdict.idle:
            self._pause(run_id, stage, time.time(), verdict.reason, None)
            return False
        if progress.pop("paused", None) is not None:  # resuming: the pause ends now
            self.store.set_progress(run_id, progress)
            self._pause_log(run_id, {"until": time.time(), "stage": stage})
            log.info("run_resumed", run=run_id, stage=stage)
        return True

    def _watch(self, pause: threading.Event, stage: str) -> dict:
        """A thread that sets `pause` when the agent becomes active during a yielding stage."""
        state = {"done": threading.Event()}
        if self.monitor is None or stage not in YIELDING_STAGES:
            return state
        every = min(1.0, self.settings.schedule.yield_s / 4)
        since = self.monitor.clock()

        def watch() -> None:
            while not state["done"].wait(every):
                try:
                    why = self.monitor.activity(since)
                except Exception as exc:  # noqa: BLE001 - a broken signal must not kill the watch
                    why = f"idle signals unreadable ({type(exc).__name__})"
                if why:
                    state.update(at=time.time(), why=why)
                    log.info("agent_active", stage=stage, reason=why)
                    pause.set()
                    return

        threading.Thread(target=watch, name="lacd-idle-watch", daemon=True).start()
        return state

    def _pause(self, run_id: int, stage: str, since: float, reason: str, how: str | None) -> None:
        if self.store.pause(run_id, stage, since, reason):
            step = self.store.get(run_id).progress_dict().get("step")
            self._pause_log(run_id, {"since": since, "stage": stage, "step": step, "reason": reason})
            log.info("run_paused", run=run_id, stage=stage, reason=reason, how=how)

    def _pause_log(self, run_id: int, entry: dict) -> None:
        with open(self.run_dir(run_id) / PAUSES_FILE, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")

    def _failed(self, run_id: int, stage: str, attempt: int, error: str) -> RunOutcome:
        if attempt >= self.settings.run.retries:
            self.store.fail(run_id, f"{stage} failed after {attempt} attempts: {error}")
            log.error("run_failed", run=run_id, stage=stage, attempts=attempt, error=error)
            if self.store.result(run_id, TrainStageResult) is not None:
                self.write_report(run_id)
            self.prune_run_dirs()
            return RunOutcome.FAILED
        delay = self.settings.run.backoff * 2 ** (attempt - 1)
        self.store.wait(run_id, stage, error, delay, waiting_for=None)
        log.warning("stage_failed", run=run_id, stage=stage, attempt=attempt, retry_in=delay, error=error)
        return RunOutcome.WAITING

    def _reporter(self, run_id: int, stage: str) -> _ThrottledProgress:
        return _ThrottledProgress(self.store, run_id, stage, self.on_progress)

    def write_report(self, run_id: int) -> None:
        """report.html + report.png in the run folder; a report that cannot be drawn never fails the run."""
        from lacd.report import write_run_report

        try:
            write_run_report(self.run_dir(run_id), self.store, run_id)
        except Exception as exc:  # noqa: BLE001 - the run's outcome is already recorded
            log.warning("report_failed", run=run_id, error=f"{type(exc).__name__}: {exc}")

    def prune_run_dirs(self) -> None:
        """Keep the newest `keep_runs` finished run folders; never touch an active run's."""
        active = self.store.active()
        dirs = sorted((p for p in self.settings.runs_dir.glob("*") if p.name.isdigit()), key=lambda p: int(p.name))
        finished = [p for p in dirs if active is None or int(p.name) != active.id]
        for old in finished[:-self.settings.run.keep_runs]:
            shutil.rmtree(old, ignore_errors=True)
            log.info("run_dir_removed", run=int(old.name))


class RunWorker:
    """The daemon's run thread: start(), a loop that executes whatever run is due, stop()."""

    def __init__(self, executor: RunExecutor, poll: float = 2.0):
        self.executor = executor
        self.poll = poll
        self.wake_event = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self.loop, name="lacd-runs", daemon=True)
        self.thread.start()

    def wake(self) -> None:
        self.wake_event.set()

    def loop(self) -> None:
        while not self.executor.stop.is_set():
            try:
                run_id = self.executor.store.runnable()
                if run_id is not None and self.executor.execute(run_id) is not RunOutcome.PAUSED:
                    continue
            except Exception as exc:  # the database went away for a moment: try again later
                log.error("run_worker_error", error=f"{type(exc).__name__}: {exc}")
            self.wake_event.wait(self.poll)
            self.wake_event.clear()

    def stop(self, timeout: float = 20.0) -> None:
        self.executor.stop.set()
        self.wake_event.set()
        if self.thread is not None:
            self.thread.join(timeout)


class _ThrottledProgress:
    """A stage's progress callback: every update goes to on_progress, at most one a second (and the
    last, phase 'done') to the run row; flush() stores the newest one that limit held back."""

    def __init__(self, store: RunStore, run_id: int, stage: str, on_progress: Any) -> None:
        self.store, self.run_id, self.stage, self.on_progress = store, run_id, stage, on_progress
        self.last_write = 0.0
        self.held_back: dict | None = None

    def __call__(self, progress: dict) -> None:
        if self.on_progress:
            self.on_progress(self.stage, progress)
        now = time.monotonic()
        if now - self.last_write >= 1.0 or progress.get("phase") == "done":  # at most one write a second
            self.last_write = now
            self.held_back = None
            self.store.set_progress(self.run_id, progress)
        else:
            self.held_back = progress

    def flush(self) -> None:
        if self.held_back is not None:
            self.store.set_progress(self.run_id, self.held_back)
            self.held_back = None
