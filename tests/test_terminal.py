"""`lacd lessons` prints prompts, and prompts are whatever reached the agent: no escape sequence
or bidi control in one reaches the terminal."""

from __future__ import annotations

import json

from conftest import lacd_env, run_cli
from lacd.terminal import printable


def test_lessons_writes_escape_sequences_as_text(tmp_path):
    log = tmp_path / "agent_interactions.jsonl"
    prompts = ["clear \x1b[2J\x1b[H screen", "title \x1b]0;pwned\x07 set", "order \u202eevil\u202c here", "c1 \x9b31m red"]
    log.write_text("".join(json.dumps({"user_prompt": p, "ai_responses": [f"ok {i}"]}) + "\n"
                           for i, p in enumerate(prompts)))
    env = lacd_env(tmp_path, log)
    assert run_cli("ingest", env=env).returncode == 0
    out = run_cli("lessons", env=env)
    assert out.returncode == 0, out.stderr
    assert not any(ch in out.stdout for ch in "\x1b\x07\x9b\u202e\u202c")
    shown = [line.split("turns  ", 1)[1] for line in out.stdout.splitlines()]
    assert shown == [r"c1 \x9b31m red", r"order \u202eevil\u202c here", r"title \x1b]0;pwned\x07 set",
                     r"clear \x1b[2J\x1b[H screen"]
    stored = json.loads(run_cli("lessons", "--json", env=env).stdout)
    assert [r["prompt"] for r in reversed(stored)] == prompts  # stored as written; only the display escapes


def test_printable_keeps_ordinary_text():
    assert printable("héllo wörld — 日本語 ✓ tab\there") == "héllo wörld — 日本語 ✓ tab\\there"
