"""Tests of lacd.samples: the generated local-ai-coder lines follow the protocol and curation."""

from __future__ import annotations

import collections
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lacd import samples
from lacd.protocol import TOOLS_V1, TOOLS_V2, ToolCall, check_call, parse_call, parse_tool_calls, tool_code_blocks
from lacd.samples import CURATION_REASON, NOISE_KINDS, SamplesError, generate_lessons, generate_lines, parse_size, write_log

DAEMON = Path(__file__).resolve().parents[1] / "daemon"
ERROR_TAG = {"v1": "tool_output_error", "v2": "tool_error"}
PROMPT_KEY = {"v1": "user_prompt", "v2": "user_message"}
TOOLSETS = {"v1": TOOLS_V1, "v2": TOOLS_V2}


def _calls(text_calls: list[ToolCall]) -> list[tuple]:
    return [(c.name, c.args) for c in text_calls]


def _is_wrapped(output: str, version: str) -> bool:
    ok = output.startswith("<tool_output>") and output.endswith("</tool_output>")
    tag = ERROR_TAG[version]
    return ok or (output.startswith(f"<{tag}>") and output.endswith(f"</{tag}>"))


# --- the generator ------------------------------------------------------------------------------


def test_same_seed_gives_the_same_lines_and_other_seeds_differ():
    first = list(generate_lines(300, seed=4, noise=0.3))
    assert first == list(generate_lines(300, seed=4, noise=0.3))
    assert first != list(generate_lines(300, seed=5, noise=0.3))
    assert list(generate_lines(50, seed=4, noise=0.3)) == first[:50]


def test_same_seed_gives_the_same_file_in_processes_with_different_hash_seeds(tmp_path):
    outs = []
    for hash_seed in ("1", "2"):
        out = tmp_path / f"log{hash_seed}.jsonl"
        env = {**os.environ, "PYTHONPATH": str(DAEMON), "PYTHONHASHSEED": hash_seed}
        done = subprocess.run([sys.executable, "-m", "lacd.samples", str(out), "--lines", "400", "--seed", "9",
                               "--noise", "0.2"], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "wrote 400 lines" in done.stdout
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    assert outs[0].count(b"\n") == 400


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_clean_lines_follow_the_agent_protocol(version):
    tools = TOOLSETS[version]
    lessons = list(generate_lessons(1500, seed=1, noise=0.0, version=version))
    assert {s.kind for s in lessons} == {"clean"}
    used = collections.Counter()
    for s in lessons:
        obj = json.loads(s.line)
        assert list(obj) == [PROMPT_KEY[version], "ai_responses", "tool_executions"]
        assert obj[PROMPT_KEY[version]] == s.prompt and s.prompt.strip()
        replies, executions = obj["ai_responses"], obj["tool_executions"]
        assert all(r.strip() for r in replies)
        assert not any("<tool_output" in r or "<tool_error" in r for r in replies)  # never fabricated
        if version == "v1":
            reply_calls = [c for r in replies for c in parse_tool_calls(r)]
            assert not tool_code_blocks(replies[-1]), "the last reply must end the loop"
        else:
            assert len(replies) == 1 and len(tool_code_blocks(replies[0])) == 1
            reply_calls = parse_tool_calls(replies[0])
        logged = [parse_call(e["tool_call"]) for e in executions]
        assert _calls(reply_calls) == _calls(logged) == _calls(list(s.calls))
        assert [c.raw for c in logged] == [e["tool_call"] for e in executions]
        for call in reply_calls:
            assert check_call(call, tools) is None, (call, s.line[:300])
            used[call.name] += 1
        assert all(_is_wrapped(e["tool_output"], version) for e in executions)
        assert any(e["tool_output"].startswith("<tool_output>") for e in executions), "not every call may fail"
    assert set(used) == set(tools), f"tools never used: {set(tools) - set(used)}"


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_the_request_alone_determines_the_first_call(version):
    first_call: dict[str, set] = collections.defaultdict(set)
    for s in generate_lessons(4000, seed=2, noise=0.0, version=version):
        first_call[s.prompt].add((s.calls[0].name, s.calls[0].args))
    ambiguous = {p: c for p, c in first_call.items() if len(c) > 1}
    assert not ambiguous
    assert len(first_call) > 2500, "requests should rarely repeat"


def test_lessons_are_varied_multi_step_and_do_not_repeat():
    lessons = list(generate_lessons(3000, seed=3, noise=0.0))
    lines = [s.line for s in lessons]
    assert len(set(lines)) == len(lines), "clean lines are never accidental duplicates"
    steps = collections.Counter(len(s.calls) for s in lessons)
    assert steps[1] > 0.6 * len(lessons) and steps[2] > 0.08 * len(lessons)
    paths = {s.calls[0].args[0] for s in lessons if s.calls[0].name == "read_file"}
    assert len(paths) > 200
    commands = {s.calls[0].args[0] for s in lessons if s.calls[0].name == "run_shell_command"}
    assert {"npm test", "pytest -q", "git status", "pwd"} <= commands and len(commands) > 100
    assert any("\n" in a for s in lessons for c in s.calls for a in c.args), "multi-line write_file content"


def test_line_lengths_resemble_agent_logs():
    sizes = sorted(len(line.encode()) for line in generate_lines(4000, seed=6, noise=0.1))
    in_band = sum(500 <= n <= 3000 for n in sizes) / len(sizes)
    print(f"\nline bytes: median {statistics.median(sizes):.0f}, p90 {sizes[int(0.9 * len(sizes))]}, "
          f"p99 {sizes[int(0.99 * len(sizes))]}, max {sizes[-1]}; {in_band:.0%} within 0.5-3 KB")
    assert in_band > 0.5
    assert sizes[int(0.99 * len(sizes))] > 4000
    assert sizes[-1] < 40_000


def test_noise_kinds_come_in_the_expected_proportions():
    n, noise = 4200, 0.5
    counts = collections.Counter(s.kind for s in generate_lessons(n, seed=8, noise=noise))
    assert "garbage" not in counts
    assert abs(counts["clean"] / n - (1 - noise)) < 0.04
    share = noise / len(NOISE_KINDS)
    for kind in NOISE_KINDS:
        assert abs(counts[kind] / n - share) < 0.35 * share, (kind, counts[kind])
    with_garbage = collections.Counter(s.kind for s in generate_lessons(n, seed=8, noise=noise, garbage=True))
    assert 0 < with_garbage["garbage"] < with_garbage["no_reply"]
    assert {s.kind for s in generate_lessons(500, seed=8, noise=0.0)} == {"clean"}


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_each_noise_kind_carries_its_defect(version):
    earlier: set[str] = set()
    seen = collections.Counter()
    for s in generate_lessons(2500, seed=12, noise=0.6, version=version, garbage=True):
        seen[s.kind] += 1
        if s.kind == "garbage":
            with pytest.raises(json.JSONDecodeError):
                json.loads(s.line)
            continue
        obj = json.loads(s.line)
        prompt, replies, execs = obj[PROMPT_KEY[version]], obj["ai_responses"], obj["tool_executions"]
        outputs = [e["tool_output"] for e in execs]
        failed = [o.startswith(f"<{ERROR_TAG[version]}>") for o in outputs]
        if s.kind == "duplicate":
            assert s.line in earlier
        elif s.kind == "empty_prompt":
            assert prompt == "" and execs and not all(failed)
        elif s.kind == "confirmation":
            assert prompt in ("y", "yes", "Y", "ok") and execs
        elif s.kind == "no_reply":
            assert prompt and not any(r.strip() for r in replies) and not execs
        elif s.kind == "fabricated_output":
            assert "<tool_output>" in replies[0] and execs and not all(failed)
        elif s.kind == "unknown_tool":
            assert len(execs) == 1 and failed == [True] and "Unknown tool" in outputs[0]
            assert parse_call(execs[0]["tool_call"]).name not in TOOLSETS[version]
        elif s.kind == "all_tools_failed":
            assert prompt and execs and all(failed)
        else:
            assert s.kind == "clean"
        earlier.add(s.line)
    assert set(seen) == {"clean", "garbage", *NOISE_KINDS}


def test_curation_decides_each_kind_as_documented():
    lessons_mod = pytest.importorskip("lacd.ingest.lessons")
    checked = collections.Counter()
    for version in ("v1", "v2"):
        for s in generate_lessons(1500, seed=13, noise=0.7, version=version, garbage=True):
            expected = CURATION_REASON[s.kind]
            if s.kind == "garbage":
                with pytest.raises(lessons_mod.LineRejected):
                    lessons_mod.parse_line(s.line)
            elif s.kind != "duplicate":  # duplicates need the database
                assert lessons_mod.parse_line(s.line).flaw({}) == expected, (s.kind, s.line[:300])
            checked[s.kind] += 1
    assert set(checked) == set(CURATION_REASON)


def test_chat_lessons_answer_without_a_tool_call():
    lessons = list(generate_lessons(600, seed=3, chat=0.2))
    chats = [s for s in lessons if not s.calls]
    assert 0.1 < len(chats) / len(lessons) < 0.3
    for s in chats:
        obj = json.loads(s.line)
        assert obj["tool_executions"] == [] and not tool_code_blocks(obj["ai_responses"][0])


def test_bad_arguments_raise_a_clear_error(tmp_path):
    with pytest.raises(SamplesError, match="version"):
        generate_lines(1, version="v3")
    with pytest.raises(SamplesError, match="noise"):
        generate_lessons(1, noise=1.5)
    with pytest.raises(SamplesError, match="lines or a size"):
        write_log(tmp_path / "x.jsonl")
    with pytest.raises(SamplesError, match="chat"):
        write_log(tmp_path / "y.jsonl", n=3, chat=-1)
    assert not (tmp_path / "y.jsonl").exists()


# --- writing logs --------------------------------------------------------------------------------


def test_write_log_by_lines_matches_generate_lines(tmp_path):
    out = tmp_path / "agent_interactions.jsonl"
    assert write_log(out, n=700, seed=3, noise=0.2) == 700
    data = out.read_text(encoding="utf-8")
    assert data.endswith("\n")
    assert data.split("\n")[:-1] == list(generate_lines(700, seed=3, noise=0.2))


def test_write_log_by_size_stops_once_the_size_is_reached(tmp_path):
    out = tmp_path / "big.jsonl"
    lines = write_log(out, size_bytes=300_000, seed=1, version="v2")
    size = out.stat().st_size
    last = out.read_bytes().rstrip(b"\n").rsplit(b"\n", 1)[-1]
    assert size >= 300_000 and size - len(last) - 1 < 300_000
    assert lines == out.read_bytes().count(b"\n")


def test_generation_speed(tmp_path):
    out = tmp_path / "speed.jsonl"
    started = time.perf_counter()
    lines = write_log(out, size_bytes=8_000_000, seed=0, noise=0.1)
    seconds = time.perf_counter() - started
    size = out.stat().st_size
    print(f"\nwrote {lines} lines, {size / 1e6:.1f} MB in {seconds:.2f}s: {size / 1e6 / seconds:.1f} MB/s")
    assert size >= 8_000_000


def test_cli_reports_a_bad_size_without_a_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(DAEMON)}
    done = subprocess.run([sys.executable, "-m", "lacd.samples", str(tmp_path / "x.jsonl"), "--size", "lots"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.startswith("error: cannot read the size 'lots'") and "Traceback" not in done.stderr


def test_cli_writes_by_size(tmp_path):
    out = tmp_path / "x.jsonl"
    assert samples.main([str(out), "--size", "64KiB", "--seed", "2", "--noise", "0.3", "--version", "v2"]) == 0
    assert out.stat().st_size >= 65536
    assert all(json.loads(line).get("user_message") is not None for line in out.read_text().splitlines())


@pytest.mark.parametrize("text,expected", [
    ("1GB", 10**9), ("500MB", 500 * 10**6), ("64KiB", 65536), ("2000", 2000), ("1.5 mb", 1_500_000), ("1GiB", 2**30),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected
