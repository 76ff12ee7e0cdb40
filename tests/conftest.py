"""Shared fixtures: every test gets its own state dir, log and environment (no user config leaks in)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "local-ai-coder"


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """No LACD_* variable, user config or XDG path from the machine reaches a test."""
    for name in list(os.environ):
        if name.startswith("LACD_") or name == "NOTIFY_SOCKET":
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "home" / ".local" / "state"))
    (tmp_path / "home").mkdir()


def skip_outside_ci(reason: str) -> None:
    """Skip for a missing tool (go, node) on a developer's machine; under CI=true (`.ci/run`), fail:
    a proof that needs the tool must not pass by skipping."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: .ci/run installs it, so its absence is a failure)", pytrace=False)
    pytest.skip(reason)


def agent_line(i: int, prompt: str | None = None) -> str:
    """A usable local-ai-coder v1 line, unique for each i."""
    return json.dumps({
        "user_prompt": prompt if prompt is not None else f"read the file notes{i}.txt",
        "ai_responses": [f"<tool_code>\nread_file('notes{i}.txt')\n</tool_code>", f"The file notes{i}.txt says hello {i}."],
        "tool_executions": [{"tool_call": f"read_file('notes{i}.txt')", "tool_output": f"<tool_output>hello {i}</tool_output>"}],
    })


def lacd_env(tmp_path: Path, log: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LACD_")}
    env.update(LACD_STATE_DIR=str(tmp_path / "state"), LACD_WATCH_LOG=str(log), LACD_LOG_FORMAT="json")
    # runs start as soon as lessons are due: this shared test machine is never idle by [schedule]'s defaults
    # (tests/integration/test_idle_cycle.py tests those); Ollama, where a test has none, does not hold runs back
    env.update(LACD_SCHEDULE_IDLE_MINUTES="0", LACD_SCHEDULE_CPU_OTHER_PCT="0", LACD_SCHEDULE_ON_OLLAMA_ERROR="idle")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_cli(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lacd", *args], env=env, capture_output=True, text=True, timeout=timeout)


def wait_until(predicate, timeout: float = 20.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


sys.path.insert(0, str(Path(__file__).parent))  # tests/ helpers (tiny, ollama_standin) for tests in subfolders


@pytest.fixture
def server(tmp_path):
    """A stand-in Ollama (tests/ollama_standin.py) on a free loopback port, its store in tmp_path."""
    from ollama_standin import StandIn

    with StandIn(tmp_path / "ollama") as standin:
        yield standin
