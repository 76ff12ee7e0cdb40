"""State is private: a state dir others can read is refused, files are created 0600."""

from __future__ import annotations

import os
import stat

from conftest import agent_line, lacd_env, run_cli
from lacd.service import warn_if_remote_ollama


def test_a_state_dir_others_can_read_is_refused_with_the_fix(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    os.chmod(state, 0o755)
    env = lacd_env(tmp_path, tmp_path / "agent_interactions.jsonl")
    result = run_cli("ingest", env=env)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"lacd: state dir {state} is open to other users (mode 0755) and lessons hold "
                                     f"your code: run `chmod 700 {state}`")


def test_everything_lacd_writes_is_private(tmp_path):
    log = tmp_path / "agent_interactions.jsonl"
    log.write_text(agent_line(1) + "\n")
    env = lacd_env(tmp_path, log)
    assert run_cli("ingest", env=env).returncode == 0
    state = tmp_path / "state"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    files = [p for p in state.rglob("*") if p.is_file()]
    assert files and all(stat.S_IMODE(p.stat().st_mode) & 0o077 == 0 for p in files), \
        {str(p): oct(p.stat().st_mode) for p in files}


def test_remote_ollama_is_warned_about():
    assert not warn_if_remote_ollama("http://127.0.0.1:11434")
    assert not warn_if_remote_ollama("http://localhost:11434")
    assert warn_if_remote_ollama("http://192.0.2.10:11434")  # TEST-NET-1: never contacted, only parsed
