"""From one log line to a lesson: parse, rebuild the conversation in order, decide if it is usable.

Three line shapes are read (see shared/fixtures/local-ai-coder/README.md):

* local-ai-coder v1: ``{"user_prompt", "ai_responses": [...], "tool_executions": [...]}``
* local-ai-coder v2: the same with ``user_message``; only the first ``<tool_code>`` of a reply runs
* OpenAI style: ``{"messages": [{"role": ..., "content": ..., "tool_calls": [...]}, ...]}``

The canonical form is a list of ``{"role", "content"}`` messages (plus ``tool_calls`` for OpenAI
lines); the agent's system prompt is not part of it (it is configuration, added when formatting).
"""

from __future__ import annotations

import hashlib
from typing import Any, NamedTuple

import orjson

from lacd.protocol import FABRICATED_MARKERS, FAILED_RESULT, PLAN, PLAN_OPEN, TOOL_CODE, TOOL_CODE_CLOSE, TOOL_CODE_OPEN

OUTPUT_MARK, ERROR_MARK = FABRICATED_MARKERS
ROLES = ("system", "user", "assistant", "tool")

# curation reasons, in the order they are checked; the first that applies is recorded
REASONS = ("empty_prompt", "no_reply", "fabricated_output", "all_tools_failed", "duplicate")


class LineRejected(Exception):
    """The line cannot become a lesson; ``reason`` says why (stored in the rejects table)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Parsed(NamedTuple):
    """A parsed line (a named tuple: built once per line of a backfill, so built cheaply)."""

    format: str
    messages: list[dict[str, Any]]
    conversation: str  # canonical JSON of the messages
    conv_hash: str
    unmatched_tools: int = 0  # tool executions that no reply's call accounts for

    def flaw(self, rules: dict[str, bool]) -> str | None:
        """The first curation reason (other than duplicate) that excludes this lesson, if any."""
        return flaw(self.messages, rules)


def flaw(messages: list[dict[str, Any]], rules: dict[str, bool]) -> str | None:
    """The first curation reason (other than duplicate) that excludes a conversation, if any
    (one pass over the messages: this runs for every line of a backfill)."""
    prompt, replied, fabricated, tools, failed = None, False, False, 0, 0
    for m in messages:
        role, content = m["role"], m["content"]
        if role == "assistant":
            replied = replied or bool(content.strip() or m.get("tool_calls"))
            fabricated = fabricated or OUTPUT_MARK in content or ERROR_MARK in content  # it wrote its own
        elif role == "tool":
            tools += 1
            failed += FAILED_RESULT.match(content) is not None
        elif role == "user" and prompt is None:
            prompt = content
    on = rules.get
    if on("empty_prompt", True) and not (prompt or "").strip():
        return "empty_prompt"
    if on("no_reply", True) and not replied:
        return "no_reply"
    if on("fabricated_output", True) and fabricated:
        return "fabricated_output"
    if on("all_tools_failed", True) and tools and failed == tools:
        return "all_tools_failed"
    return None


def parse_line(text: str | bytes) -> Parsed:
    """Parse one log line (decoded, or its UTF-8 bytes); raise LineRejected with a clear reason."""
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise LineRejected(f"invalid JSON: {exc.msg} at column {exc.colno}") from None
    if not isinstance(obj, dict):
        raise LineRejected(f"unknown shape: a JSON {type(obj).__name__}, expected an object")
    if "messages" in obj:
        fmt, messages, unmatched = "openai", _openai_messages(obj["messages"]), 0
    elif "ai_responses" in obj and ("user_prompt" in obj or "user_message" in obj):
        fmt = "local-ai-coder/v1" if "user_prompt" in obj else "local-ai-coder/v2"
        messages, unmatched = _agent_messages(obj, first_call_only=fmt.endswith("v2"))
    else:
        keys = ", ".join(sorted(obj)[:6]) or "none"
        raise LineRejected(f"unknown shape: keys {keys}; expected user_prompt/user_message + ai_responses, or messages")
    return Parsed(fmt, messages, *canonical(messages), unmatched)


def canonical(messages: list[dict[str, Any]]) -> tuple[str, str]:
    """The stored form of a conversation and its hash (what duplicates are found by)."""
    encoded = orjson.dumps({"messages": messages})
    return encoded.decode(), hashlib.blake2b(encoded, digest_size=16).hexdigest()


def _agent_messages(obj: dict, first_call_only: bool) -> tuple[list[dict], int]:
    prompt = obj.get("user_prompt", obj.get("user_message"))
    replies = obj["ai_responses"]
    executions = obj.get("tool_executions") or []
    if not isinstance(prompt, str):
        raise LineRejected("unknown shape: the user prompt is not a string")
    if not isinstance(replies, list):
        raise LineRejected("unknown shape: ai_responses is not a list of strings")
    calls = []
    for reply in replies:
        if not isinstance(reply, str):
            raise LineRejected("unknown shape: ai_responses is not a list of strings")
        calls.append(_calls_in(reply, first_call_only))
    if not isinstance(executions, list) or not all(_is_execution(e) for e in executions):
        raise LineRejected("unknown shape: tool_executions is not a list of {tool_call, tool_output}")
    owed_after = _suffix_sums([max(c, 0) for c in calls]) if -1 in calls else None  # only a plan needs them
    messages = [{"role": "user", "content": prompt}]
    pos = 0
    for i, reply in enumerate(replies):
        if reply.strip():
            messages.append({"role": "assistant", "content": reply})
        if calls[i] == 0 or pos == len(executions):
            continue
        take = _executions_for(calls[i], owed_after[i + 1] if owed_after else 0, len(executions) - pos)
        for execution in executions[pos:pos + take]:
            messages.append({"role": "tool", "content": execution["tool_output"]})
        pos += take
    return messages, len(executions) - pos


def _calls_in(reply: str, first_call_only: bool) -> int:
    """How many tool executions a reply causes; -1 for a plan (the agent runs its steps itself)."""
    opens = reply.count(TOOL_CODE_OPEN)
    if opens == 1:  # the usual reply: one block, closed or not
        n = 1 if reply.find(TOOL_CODE_CLOSE, reply.find(TOOL_CODE_OPEN)) >= 0 else 0
    else:
        n = len(TOOL_CODE.findall(reply)) if opens else 0
    if first_call_only:
        n = min(n, 1)
    if n == 0 and PLAN_OPEN in reply and PLAN.search(reply):
        return -1
    return n


def _suffix_sums(values: list[int]) -> list[int]:
    """out[i] = sum(values[i:]); out has one more entry (0) than values."""
    out = [0] * (len(values) + 1)
    for i in range(len(values) - 1, -1, -1):
        out[i] = out[i + 1] + values[i]
    return out


def _executions_for(calls: int, needed_later: int, remaining: int) -> int:
    if calls >= 0:
        return min(calls, remaining)
    return max(0, remaining - needed_later)  # a plan takes every step not owed to a later reply


def _is_execution(e: Any) -> bool:
    return isinstance(e, dict) and isinstance(e.get("tool_call"), str) and isinstance(e.get("tool_output"), str)


def _openai_messages(raw: Any) -> list[dict]:
    if not isinstance(raw, list) or not raw:
        raise LineRejected("unknown shape: messages is not a non-empty list")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise LineRejected(f"unknown shape: message {i} has no role among {', '.join(ROLES)}")
        content = m.get("content") or ""
        if not isinstance(content, str):
            raise LineRejected(f"unknown shape: message {i} content is not a string")
        msg: dict[str, Any] = {"role": m["role"], "content": content}
        if m.get("tool_calls"):
            msg["tool_calls"] = _tool_calls(m["tool_calls"], i)
        out.append(msg)
    if not any(m["role"] == "user" for m in out):
        raise LineRejected("unknown shape: messages has no user message")
    return out


def _tool_calls(calls: Any, i: int) -> list[dict]:
    if not isinstance(calls, list):
        raise LineRejected(f"unknown shape: message {i} tool_calls is not a list")
    out = []
    for call in calls:
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise LineRejected(f"unknown shape: message {i} has a tool call without a name")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = orjson.loads(args) if args.strip() else {}
            except orjson.JSONDecodeError:
                raise LineRejected(f"unknown shape: message {i} tool call arguments are not JSON") from None
        out.append({"name": fn["name"], "arguments": args})
    return out
