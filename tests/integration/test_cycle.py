"""The learning cycle end to end: a real daemon process, a tiny real model, the stand-in Ollama.

Lessons are appended to a watched log; the daemon starts a run by itself, trains, exports GGUF,
registers it as v1, measures it against the base model on the held-out lessons (a tiny budget:
2 prompts, 3 new tokens) and, the gate passing, points latest at it; the stand-in (driven through
the real `ollama` client) answers with the new model. Then the same cycle is SIGKILLed inside each
stage and must finish with the same result. The gate's own decisions are tested in
tests/test_gate_cycle.py.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import ollama
import pytest

from conftest import lacd_env, run_cli, wait_until
from lacd.pipeline import template
from lacd.pipeline.stages import STAGES
from lacd.samples import generate_lines
from ollama_standin import StandIn, start_process
from tiny import make_tiny_llama

HERE = Path(__file__).parent
N_LESSONS = 10


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "base", tokenizer="bpe")


@pytest.fixture
def standin(tmp_path):
    with StandIn(tmp_path / "ollama") as s:
        yield s


def cycle_env(tmp_path: Path, base: Path, host: str) -> dict[str, str]:
    system = tmp_path / "system.txt"
    system.write_text("You are a coding agent. Call tools in <tool_code> blocks.")
    return lacd_env(
        tmp_path, tmp_path / "agent_interactions.jsonl",
        LACD_MODEL_BASE=base, LACD_MODEL_SYSTEM_PROMPT=system, LACD_OLLAMA_HOST=host,
        LACD_QUEUE_THRESHOLD=8, LACD_SCHEDULE_INTERVAL=1, LACD_WATCH_POLL_INTERVAL=0.2,
        LACD_TRAIN_MAX_SEQ_LEN=384, LACD_TRAIN_EPOCHS=1, LACD_TRAIN_TOKENS_PER_BATCH=768,
        LACD_TRAIN_CHECKPOINT_EVERY=1, LACD_RUN_BACKOFF=0.5, LACD_RUN_MIN_FREE_GB=0, LACD_LOG_LEVEL="info",
        LACD_QUEUE_HELDOUT_PCT=30, LACD_EVALUATE_MAX_CASES=2, LACD_EVALUATE_MAX_NEW_TOKENS=3,
        LACD_EVALUATE_THREADS=1,
    )


def append_lessons(env: dict[str, str], n: int = N_LESSONS) -> None:
    with open(env["LACD_WATCH_LOG"], "a") as fh:
        for line in generate_lines(n, seed=5):
            fh.write(line + "\n")


def start(env, *argv) -> subprocess.Popen:
    cmd = [sys.executable, *argv] if argv else [sys.executable, "-m", "lacd", "run"]
    log = open(Path(env["LACD_STATE_DIR"]).parent / "daemon.log", "a")
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=log)


def status(env) -> dict:
    result = run_cli("status", "--json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def stage_attempts(env) -> dict[str, int]:
    con = sqlite3.connect(Path(env["LACD_STATE_DIR"]) / "lacd.db")
    return dict(con.execute("SELECT stage, attempts FROM run_stages WHERE run_id = 1"))


def wait_for_model(env, timeout=240) -> dict:
    def registered():
        s = status(env)
        return s if s["active_model"] and s["runs"] and s["runs"][0]["status"] == "done" else None

    s = wait_until(registered, timeout, interval=0.5)
    assert s, f"no model registered; status: {status(env)}\n{(Path(env['LACD_STATE_DIR']).parent / 'daemon.log').read_text()[-3000:]}"
    return s


def stop(daemon: subprocess.Popen) -> None:
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=30) == 0


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_base):
    """One uninterrupted cycle: what every interrupted one must reproduce."""
    tmp_path = tmp_path_factory.mktemp("reference")
    with StandIn(tmp_path / "ollama") as s:
        env = cycle_env(tmp_path, tiny_base, s.host)
        daemon = start(env)
        try:
            append_lessons(env)
            st = wait_for_model(env)
        finally:
            stop(daemon)
        client = ollama.Client(host=s.host)
        show = client.show("lacd-coder:latest")
        answer = client.generate(model="lacd-coder:latest", prompt="list the files in ./src", options={"num_predict": 8})
        return {"status": st, "show": show, "answer": answer, "requests": list(s.requests),
                "state_dir": env["LACD_STATE_DIR"]}


def test_a_run_starts_by_itself_and_registers_the_model(reference):
    st = reference["status"]
    assert st["active_model"]["tag"] == "lacd-coder:v1"
    run = st["runs"][0]
    assert (run["status"], run["reason"], run["lessons"]) == ("done", "threshold", N_LESSONS)
    assert st["pending"] == 0 and st["trained"] == N_LESSONS
    assert reference["show"].template == template.ollama_template("chatml")
    assert 'SYSTEM """You are a coding agent. Call tools in <tool_code> blocks."""' in reference["show"].modelfile
    assert [l.split(None, 1) for l in reference["show"].parameters.splitlines() if l.startswith("stop")] == [
        ["stop", json.dumps(t)] for t in template.stop_tokens("chatml")]
    assert isinstance(reference["answer"].response, str) and reference["answer"].done
    paths = [r["path"] for r in reference["requests"]]
    assert "/api/create" in paths and "/api/copy" in paths
    assert paths.index("/api/create") < paths.index("/api/copy")  # latest moves only after the gate
    assert run["tag"] == "lacd-coder:v1" and run["gate"]["promote"] is True
    assert [s for s in st["runs"][0]["gate"]["reasons"] if s.startswith("exact-call accuracy")]
    report = Path(reference["state_dir"]) / "runs" / "1" / "report.html"
    assert report.is_file() and "promoted" in report.read_text()


@pytest.mark.parametrize("stage", ["format", "export", "register", "evaluate", "promote"])
def test_sigkill_inside_a_stage_redoes_only_that_stage(tmp_path, tiny_base, standin, reference, stage):
    env = cycle_env(tmp_path, tiny_base, standin.host)
    marker = tmp_path / "paused"
    daemon = start(env, str(HERE / "paused_daemon.py"), stage, str(marker))
    append_lessons(env)
    assert wait_until(marker.exists, 240), (tmp_path / "daemon.log").read_text()[-3000:]
    daemon.send_signal(signal.SIGKILL)
    daemon.wait()
    daemon = start(env)
    try:
        st = wait_for_model(env)
    finally:
        stop(daemon)
    attempts = stage_attempts(env)
    assert attempts == {s: (2 if s == stage else 1) for s in STAGES}
    assert st["active_model"]["tag"] == "lacd-coder:v1"
    assert st["active_model"]["digest"] == reference["status"]["active_model"]["digest"]


def test_sigkill_mid_training_resumes_from_the_last_checkpoint(tmp_path, tiny_base, standin):
    env = cycle_env(tmp_path, tiny_base, standin.host)
    env["LACD_TRAIN_EPOCHS"] = "3"
    daemon = start(env)
    append_lessons(env)
    checkpoints = Path(env["LACD_STATE_DIR"]) / "runs" / "1" / "checkpoints"
    assert wait_until(lambda: list(checkpoints.glob("checkpoint-*/COMPLETE")), 240)
    daemon.send_signal(signal.SIGKILL)
    daemon.wait()
    daemon = start(env)
    try:
        st = wait_for_model(env)
    finally:
        stop(daemon)
    con = sqlite3.connect(Path(env["LACD_STATE_DIR"]) / "lacd.db")
    train = json.loads(con.execute("SELECT result FROM run_stages WHERE stage = 'train'").fetchone()[0])
    assert train["resumed_from_step"] is not None and train["resumed_from_step"] >= 1
    assert stage_attempts(env)["train"] == 2 and stage_attempts(env)["format"] == 1
    assert st["active_model"]["tag"] == "lacd-coder:v1"


def test_ollama_down_during_register_waits_and_completes(tmp_path, tiny_base):
    port = _free_port()
    env = cycle_env(tmp_path, tiny_base, f"http://127.0.0.1:{port}")
    daemon = start(env)
    try:
        append_lessons(env)

        def waiting():
            run = status(env)["current_run"]
            return run if run and run["status"] == "waiting" and run["stage"] == "register" else None

        run = wait_until(waiting, 240)
        assert run and run["waiting_for"] == f"Ollama at http://127.0.0.1:{port}"
        assert status(env)["pending"] == N_LESSONS  # nothing is lost while it waits
        ollama_proc = start_process(tmp_path / "ollama", port)
        try:
            st = wait_for_model(env)
        finally:
            ollama_proc.kill()
            ollama_proc.wait()
    finally:
        stop(daemon)
    assert st["active_model"]["tag"] == "lacd-coder:v1" and st["pending"] == 0


def test_lacd_train_without_a_daemon_runs_in_the_foreground(tmp_path, tiny_base, standin):
    env = cycle_env(tmp_path, tiny_base, standin.host)
    env["LACD_QUEUE_THRESHOLD"] = "1000"  # far away: `lacd train` ignores it
    append_lessons(env, 4)
    assert run_cli("ingest", env=env).returncode == 0
    result = run_cli("train", env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "registered with Ollama" in result.stdout and "lacd-coder:v1" in result.stdout
    assert status(env)["runs"][0]["reason"] == "manual"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_failing_stage_is_retried_then_the_run_fails_visibly_and_lessons_stay_pending(tmp_path, standin):
    env = cycle_env(tmp_path, tmp_path / "no-such-model", standin.host)
    env.update(LACD_RUN_RETRIES="2", LACD_RUN_BACKOFF="0.2")
    append_lessons(env, 4)
    assert run_cli("ingest", env=env).returncode == 0
    result = run_cli("train", env=env, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    st = status(env)
    run = st["runs"][0]
    assert run["status"] == "failed" and run["error"].startswith("format failed after 2 attempts: BaseModelError")
    assert st["pending"] == 4 and st["current_run"] is None
    assert "format failed after 2 attempts" in run_cli("status", env=env).stdout
