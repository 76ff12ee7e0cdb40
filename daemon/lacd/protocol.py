"""The local-ai-coder agent's tool protocol: its tools, the tags of its replies and results, its calls.

Read from the agent's cli.js (see shared/fixtures/local-ai-coder/README.md); two versions of the
agent write the log, so the tool set is chosen by configuration (``[evaluate] tools``):

* a reply calls a tool in a ``<tool_code>name('arg', ...)</tool_code>`` block (v1 runs every block
  of a reply, v2 only the first), or hands the agent a ``<plan>{"plan": [...]}</plan>`` JSON block
  whose steps the agent runs itself; after a failed plan step the later agent asks for a
  ``<recovery>{"strategy": ...}</recovery>`` block (an ordinary line of the log);
* the agent sends each result back as a ``tool`` message: ``<tool_output>RESULT</tool_output>``, or
  on failure ``<tool_output_error>`` (v1) / ``<tool_error>`` (v2) around the error;
* a call is written like JavaScript; ``parse_call`` reads it with JavaScript's string-literal rules
  without evaluating anything, ``check_call`` checks it against a tool set, ``format_call`` writes
  one in canonical form.

Everything that reads or writes the protocol (ingest, the secrets scan, evaluation, the sample
generator) takes it from here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# ---------------------------------------------------------------------------------------------
# The agent's tools
# ---------------------------------------------------------------------------------------------

TOOLS_V1: dict[str, tuple[int, int]] = {
    "read_file": (1, 1),
    "write_file": (2, 2),
    "list_directory": (1, 2),
    "run_shell_command": (1, 1),
    "search_file_content": (2, 2),
    "create_directory": (1, 1),
    "replace_in_file": (3, 3),
    "get_project_context": (0, 0),
}
"""The earlier agent's tools (the fixture's system prompt): name -> (min_args, max_args)."""

TOOLS_V2: dict[str, tuple[int, int]] = {
    **TOOLS_V1,
    "replace_in_file": (3, 4),
    "search_and_replace_in_file": (3, 3),
    "get_file_metadata": (1, 1),
    "git_diff": (0, 1),
    "git_blame": (1, 1),
    "get_available_tools": (0, 0),
    "get_context": (0, 0),
    "update_context": (2, 2),
    "summarize_file": (1, 1),
}
"""The later agent's larger tool set."""

TOOLS = TOOLS_V1
"""Default tool set: the one listed in the fixture README's system prompt."""

VERSIONS = ("v1", "v2")
"""The agent versions whose log format lacd reads."""

NO_CONTENT_TOOLS = frozenset({"list_directory", "create_directory", "get_file_metadata"})
"""Tools whose result shows no file's content (names only), whatever path they are given."""


def parse_tools(value: str) -> dict[str, tuple[int, int]]:
    """'read_file(1), list_directory(1-2)' -> {name: (min_args, max_args)}; ValueError when malformed."""
    tools = {}
    for part in split_tools(value):
        match = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)\(\s*(\d+)\s*(?:-\s*(\d+)\s*)?\)", part)
        if not match:
            raise ValueError(f"{part!r} is not name(N) or name(MIN-MAX)")
        low, high = int(match.group(2)), int(match.group(3) or match.group(2))
        if high < low:
            raise ValueError(f"{part!r}: MIN is above MAX")
        tools[match.group(1)] = (low, high)
    return tools


def split_tools(value: str) -> list[str]:
    """The entries of a tool list: commas between parentheses do not split."""
    return [part.strip() for part in re.findall(r"[^,(]+(?:\([^)]*\))?", value) if part.strip()]


# ---------------------------------------------------------------------------------------------
# Tags
# ---------------------------------------------------------------------------------------------

TOOL_CODE_OPEN, TOOL_CODE_CLOSE = "<tool_code>", "</tool_code>"
PLAN_OPEN = "<plan>"
OUTPUT_OPEN, OUTPUT_CLOSE = "<tool_output>", "</tool_output>"
ERROR_TAGS = {"v1": "tool_output_error", "v2": "tool_error"}
"""The tag around a failed tool's error, by agent version."""

FABRICATED_MARKERS = ("<tool_output", "<tool_error")
"""What a model must never write itself: the agent wraps real tool results in these tags (the first
also opens ``<tool_output_error>``)."""

TOOL_CODE = re.compile(r"<tool_code>(.*?)</tool_code>", re.S)
PLAN = re.compile(r"<plan>(.*?)</plan>", re.S)
RESULT = re.compile(r"^\s*<(tool_output|tool_output_error|tool_error)>")
"""A tool message's opening tag (group 1: the tag's name)."""
FAILED_RESULT = re.compile(r"^\s*<(tool_output_error|tool_error)>")


def code_block(call: str) -> str:
    """A reply's block around one call, as the agent's system prompt shows it."""
    return f"{TOOL_CODE_OPEN}\n{call}\n{TOOL_CODE_CLOSE}"


def output(text: str) -> str:
    """The agent's message content for a tool's result."""
    return OUTPUT_OPEN + text + OUTPUT_CLOSE


def error(text: str, version: str) -> str:
    """The agent's message content for a failed tool (its tag depends on the agent's version)."""
    tag = ERROR_TAGS[version]
    return f"<{tag}>{text}</{tag}>"


# ---------------------------------------------------------------------------------------------
# Calls
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One parsed ``<tool_code>`` call; ``name`` is None and ``error`` says why when it does not parse."""

    name: str | None
    args: tuple[str, ...] = ()
    error: str | None = None
    raw: str = ""

    @property
    def ok(self) -> bool:
        """True when the text parsed as a single call."""
        return self.name is not None


IDENT = re.compile(r"[A-Za-z_$][\w$]*")
"""A tool's name (a JavaScript identifier)."""
_WS_RE = re.compile(r"(?:\s+|//[^\n]*|/\*[\s\S]*?\*/)*")  # JavaScript whitespace and comments
_SQ_RE = re.compile(r"'((?:[^'\\\n\r\u2028\u2029]|\\[\s\S])*)'")
_DQ_RE = re.compile(r'"((?:[^"\\\n\r\u2028\u2029]|\\[\s\S])*)"')
_BT_RE = re.compile(r"`((?:[^`\\]|\\[\s\S])*)`")
_BARE_RE = re.compile(r"(?:-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?|true|false|null|undefined)(?![\w$])")
_INTERP_RE = re.compile(r"(?:^|[^\\])(?:\\\\)*\$\{")
_ESCAPE_RE = re.compile(
    r"\\(?:u\{([0-9a-fA-F]+)\}|u([0-9a-fA-F]{4})|x([0-9a-fA-F]{2})|([0-3][0-7]{0,2}|[4-7][0-7]?)|(\r\n|[\s\S]))"
)
_SIMPLE_ESCAPES = {
    "n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f", "v": "\v",
    "\n": "", "\r\n": "", "\r": "", "\u2028": "", "\u2029": "",
}


class _CallSyntaxError(Exception):
    pass


def tool_code_blocks(reply: str) -> list[str]:
    """The raw contents of every ``<tool_code>...</tool_code>`` block in a reply, in order."""
    return TOOL_CODE.findall(reply)


def parse_tool_calls(reply: str) -> list[ToolCall]:
    """Parse every ``<tool_code>`` block of a reply into a ToolCall (failed ones carry an error)."""
    return [parse_call(block) for block in tool_code_blocks(reply)]


def parse_call(text: str) -> ToolCall:
    """Parse ``name(arg, ...)`` (an optional ``;`` after it) with JavaScript string-literal rules.

    ``//`` and ``/* */`` comments may stand wherever JavaScript allows whitespace. Arguments are
    single-, double- or backtick-quoted strings (escapes decoded, template interpolation refused) or
    bare literals (numbers, true, false, null, undefined: kept as written). Anything else (an
    assignment, a second statement, an unquoted path) is a parse failure. ``raw`` is the call's own
    source text (comments around it left out), or the trimmed input when it does not parse.
    """
    try:
        name, args, start, end = _scan_call(text)
    except _CallSyntaxError as exc:
        return ToolCall(None, (), str(exc), text.strip())
    return ToolCall(name, args, None, text[start:end])


def _scan_call(code: str) -> tuple[str, tuple[str, ...], int, int]:
    start = _skip_ws(code, 0)
    if start >= len(code):
        raise _CallSyntaxError("empty tool call")
    m = IDENT.match(code, start)
    if not m:
        raise _CallSyntaxError(f"expected a tool name at {code[start:start + 20]!r}")
    name, pos = m.group(), _skip_ws(code, m.end())
    if pos >= len(code):
        raise _CallSyntaxError(f"expected '(' after {name!r}")
    if code[pos] != "(":
        raise _CallSyntaxError(f"not a single call like name('arg'): {code[start:start + 40]!r}")
    args: list[str] = []
    pos = _skip_ws(code, pos + 1)
    while True:
        if pos >= len(code):
            raise _CallSyntaxError("missing ')'")
        if code[pos] == ")":
            break
        value, pos = _scan_arg(code, pos)
        args.append(value)
        pos = _skip_ws(code, pos)
        if pos >= len(code):
            raise _CallSyntaxError("missing ')'")
        if code[pos] == ",":
            pos = _skip_ws(code, pos + 1)
        elif code[pos] != ")":
            raise _CallSyntaxError(f"expected ',' or ')' after argument {len(args)}")
    end = pos + 1
    rest = _skip_ws(code, end)
    if rest < len(code) and code[rest] == ";":
        rest = _skip_ws(code, rest + 1)
    if rest < len(code):
        raise _CallSyntaxError(f"unexpected text after the call: {code[rest:rest + 20]!r}")
    return name, tuple(args), start, end


def _skip_ws(code: str, pos: int) -> int:
    return _WS_RE.match(code, pos).end()


def _scan_arg(code: str, pos: int) -> tuple[str, int]:
    quote = code[pos]
    if quote in "'\"`":
        m = {"'": _SQ_RE, '"': _DQ_RE, "`": _BT_RE}[quote].match(code, pos)
        if not m:
            raise _CallSyntaxError(f"unterminated string literal at offset {pos}")
        body = m.group(1)
        if quote == "`":
            if _INTERP_RE.search(body):
                raise _CallSyntaxError("template literal interpolation ${...} is not supported")
            body = body.replace("\r\n", "\n").replace("\r", "\n")  # as JavaScript reads template literals
        return _unescape(body), m.end()
    m = _BARE_RE.match(code, pos)
    if not m:
        raise _CallSyntaxError(f"argument {code[pos:pos + 20]!r} is not a string literal")
    return m.group(), m.end()


def _unescape(body: str) -> str:
    if "\\" not in body:
        return body
    out = _ESCAPE_RE.sub(_escape_value, body)
    if any("\ud800" <= c <= "\udfff" for c in out):
        out = out.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return out


def _escape_value(m: re.Match) -> str:
    brace, u4, x2, octal, other = m.groups()
    if brace is not None:
        code = int(brace, 16)
        if code > 0x10FFFF:
            raise _CallSyntaxError(f"invalid escape \\u{{{brace}}}")
        return chr(code)
    if u4 is not None or x2 is not None:
        return chr(int(u4 or x2, 16))
    if octal is not None:
        return chr(int(octal, 8))
    if other in ("u", "x"):
        raise _CallSyntaxError(f"invalid \\{other} escape")
    return _SIMPLE_ESCAPES.get(other, other)


def check_call(call: ToolCall, tools: dict[str, tuple[int, int]] = TOOLS) -> str | None:
    """Why a parsed call is not a valid call of ``tools`` (unknown tool, wrong arity), or None."""
    if not call.ok:
        return f"unparsable call: {call.error}"
    if call.name not in tools:
        return f"unknown tool {call.name!r}"
    low, high = tools[call.name]
    if not low <= len(call.args) <= high:
        want = str(low) if low == high else f"{low} to {high}"
        return f"{call.name} takes {want} arguments, got {len(call.args)}"
    return None


def quote_js(value: str) -> str:
    """A JavaScript literal for ``value``: single quotes, or backticks when it spans lines."""
    if "\n" in value:
        return "`" + value.replace("\\", "\\\\").replace("`", "\\`").replace("${", "\\${").replace("\r", "\\r") + "`"
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'").replace("\r", "\\r") + "'"


def format_call(name: str, *args: str) -> str:
    """The canonical text of a call, e.g. ``read_file('src/app.py')``."""
    return name + "(" + ", ".join(quote_js(a) for a in args) + ")"
