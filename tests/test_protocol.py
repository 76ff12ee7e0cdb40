"""Tests of lacd.protocol: the agent's tool-call parser against the real log, JavaScript's rules, tags."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from lacd import protocol
from lacd.protocol import TOOLS_V1, TOOLS_V2, ToolCall, check_call, format_call, parse_call, parse_tool_calls

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "local-ai-coder" / "agent_interactions.jsonl"


def _calls(text_calls: list[ToolCall]) -> list[tuple]:
    return [(c.name, c.args) for c in text_calls]


@pytest.mark.skipif(not FIXTURE.exists(), reason="shared fixtures are absent")
def test_parser_agrees_with_the_agent_on_the_real_lines():
    lines = [json.loads(x) for x in FIXTURE.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 33
    for obj in lines:
        if any("<plan>" in r and "<tool_code>" not in r for r in obj["ai_responses"]):
            continue  # plan steps are logged as tool(args) by the agent, not written by the model
        from_replies = [c for r in obj["ai_responses"] for c in parse_tool_calls(r)]
        from_log = [parse_call(e["tool_call"]) for e in obj["tool_executions"]]
        assert [(c.name, c.args, c.ok) for c in from_replies] == [(c.name, c.args, c.ok) for c in from_log]
    reply_calls = lambda i: _calls([c for r in lines[i]["ai_responses"] for c in parse_tool_calls(r)])  # noqa: E731
    assert reply_calls(0) == [("list_directory", (".",))]  # a // comment line above the call
    assert reply_calls(3) == [("write_file", ("test.txt", "hello")), ("search_file_content", ("test.txt", "hello"))]
    assert reply_calls(20)[1] == ("search_file_content", ("./package.json", '"dependencies": {'))
    assert not parse_tool_calls(lines[22]["ai_responses"][0])[0].ok  # const content = read_file(...)
    assert not parse_tool_calls(lines[18]["ai_responses"][0])[0].ok  # JavaScript code, not a call
    assert not parse_call(lines[10]["tool_executions"][0]["tool_call"]).ok  # list_directory(.) is not JS


@pytest.mark.parametrize("code,name,args", [
    ("read_file('src/app.py')", "read_file", ("src/app.py",)),
    ('read_file("src/app.py");', "read_file", ("src/app.py",)),
    ("read_file(`src/app.py`)", "read_file", ("src/app.py",)),
    ("get_project_context()", "get_project_context", ()),
    ("  list_directory( './lib' ,  '\\\\.js$' , )  ", "list_directory", ("./lib", "\\.js$")),
    ("write_file('a.txt', 'it\\'s \"quoted\"')", "write_file", ("a.txt", "it's \"quoted\"")),
    ("write_file('a.txt', \"it's\")", "write_file", ("a.txt", "it's")),
    ("write_file('a.txt', 'x, y) z(')", "write_file", ("a.txt", "x, y) z(")),
    ("write_file('a', 'l1\\nl2\\ttab\\\\back')", "write_file", ("a", "l1\nl2\ttab\\back")),
    ("write_file('a', '\\u0041\\x42\\u{1F600}\\ud83d\\ude00')", "write_file", ("a", "AB\U0001F600\U0001F600")),
    ("write_file('a', '\\0\\101\\8\\q')", "write_file", ("a", "\0A8q")),
    ("write_file('a', 'one \\\ntwo')", "write_file", ("a", "one two")),
    ("write_file(\n  'a.js', // the file\n  `// add\nconst x = 1;\nconsole.log(\\`$\\${x}\\`);\n`\n)", "write_file",
     ("a.js", "// add\nconst x = 1;\nconsole.log(`$${x}`);\n")),
    ("/* block */ read_file('a') /* after */ ;", "read_file", ("a",)),
    ("write_file('a', `line1\r\nline2`)", "write_file", ("a", "line1\nline2")),
    ("replace_in_file('a', 'b', 'c', true)", "replace_in_file", ("a", "b", "c", "true")),
    ("read_file(-1.5e3)", "read_file", ("-1.5e3",)),
    ("// read it\nread_file('a')\n// done", "read_file", ("a",)),
    ("run_shell_command('grep -rn \"TODO\" src // not a comment')", "run_shell_command", ('grep -rn "TODO" src // not a comment',)),
    ("read_file('héllo wörld.txt')", "read_file", ("héllo wörld.txt",)),
])
def test_parse_call_follows_javascript_string_rules(code, name, args):
    call = parse_call(code)
    assert call.ok, call.error
    assert (call.name, call.args) == (name, args)


@pytest.mark.parametrize("code,message", [
    ("", "empty"),
    ("// only a comment", "empty"),
    ("const content = read_file('a');", "not a single call"),
    ("read_file('a') read_file('b')", "unexpected text"),
    ("read_file('a'); list_directory('.')", "unexpected text"),
    ("read_file(.)", "not a string literal"),
    ("read_file(src/app.py)", "not a string literal"),
    ("read_file(path.join('a', 'b'))", "not a string literal"),
    ("read_file('a'", "missing ')'"),
    ("read_file('a' 'b')", "expected ','"),
    ("read_file('unterminated)", "unterminated"),
    ("write_file('a', 'raw\nnewline')", "unterminated"),
    ("write_file('a', `hi ${name}`)", "interpolation"),
    ("read_file('\\x4')", "invalid"),
    ("read_file('\\u{110000}')", "invalid"),
    ("read_file", "expected '('"),
    ("'a'", "expected a tool name"),
])
def test_parse_call_reports_failures(code, message):
    call = parse_call(code)
    assert not call.ok and call.name is None and call.args == ()
    assert message in call.error


def test_format_call_round_trips_awkward_strings():
    rng = random.Random(0)
    alphabet = ["a", "Z", " ", "'", '"', "`", "\\", "\n", "\t", "$", "{", "}", "${", ",", "(", ")", "é", "😀", "//", "\r"]
    for _ in range(500):
        args = tuple("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12))) for _ in range(rng.randint(0, 3)))
        text = format_call("write_file", *args)
        call = parse_call(text)
        assert call.ok and call.args == args, (text, call.error)
        wrapped = f"Sure.\n<tool_code>\n{text}\n</tool_code>\nDone."
        assert parse_tool_calls(wrapped)[0].args == args


def test_parse_tool_calls_reads_every_block_in_order_and_ignores_the_rest():
    reply = ("I'll do both.\n<tool_code>\ncreate_directory('build')\n</tool_code>\ntext read_file('no')\n"
             "<tool_code>\n// then\nwrite_file('build/a.txt', 'x')\n</tool_code>\n<tool_code>\nunclosed('x')")
    calls = parse_tool_calls(reply)
    assert _calls(calls) == [("create_directory", ("build",)), ("write_file", ("build/a.txt", "x"))]
    assert calls[1].raw == "write_file('build/a.txt', 'x')"
    assert parse_tool_calls("no calls here <tool_output>x</tool_output>") == []


def test_check_call_validates_names_and_arities():
    assert check_call(parse_call("read_file('a')")) is None
    assert "unknown tool" in check_call(parse_call("sort('a')"))
    assert "takes 1 arguments, got 2" in check_call(parse_call("read_file('a', 'b')"))
    assert "takes 1 to 2 arguments, got 0" in check_call(parse_call("list_directory()"))
    assert "unparsable" in check_call(parse_call("read_file(a)"))
    four = parse_call("replace_in_file('a', 'b', 'c', true)")
    assert check_call(four, TOOLS_V1) is not None and check_call(four, TOOLS_V2) is None
    assert check_call(parse_call("git_diff()"), TOOLS_V2) is None
    assert check_call(parse_call("git_diff()"), TOOLS_V1) is not None


@pytest.mark.parametrize("version,tag", [("v1", "tool_output_error"), ("v2", "tool_error")])
def test_written_results_are_read_back_as_the_agent_writes_them(version, tag):
    ok, failed = protocol.output("a\nb"), protocol.error("Error reading file: x not found.", version)
    assert ok == "<tool_output>a\nb</tool_output>" and failed == f"<{tag}>Error reading file: x not found.</{tag}>"
    assert protocol.RESULT.match(ok).group(1) == "tool_output" and not protocol.FAILED_RESULT.match(ok)
    assert protocol.RESULT.match(failed).group(1) == tag and protocol.FAILED_RESULT.match(failed)
    assert all(any(marker in text for marker in protocol.FABRICATED_MARKERS) for text in (ok, failed))
    block = protocol.code_block(format_call("read_file", "a.txt"))
    assert _calls(parse_tool_calls("Sure.\n" + block)) == [("read_file", ("a.txt",))]


@pytest.mark.skipif(not FIXTURE.exists(), reason="shared fixtures are absent")
def test_tags_match_the_real_results():
    outputs = [e["tool_output"] for x in FIXTURE.read_text(encoding="utf-8").splitlines()
               for e in json.loads(x)["tool_executions"]]
    assert outputs and all(protocol.RESULT.match(o) for o in outputs)
    failed = [o for o in outputs if protocol.FAILED_RESULT.match(o)]
    assert failed and all(o.startswith("<tool_output_error>") for o in failed)  # the earlier agent's tag
