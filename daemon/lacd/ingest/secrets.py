"""Secrets in lessons: find them and redact them before anything is stored or trained on.

A :class:`Scrubber` scans text and replaces each secret by ``<redacted:KIND>``; it records the kind
and where it was (:class:`Finding`: kind, field, turn), never the secret. Kinds (``KINDS``), each
configurable to ``redact`` (the default: the lesson is kept, redacted) or ``exclude``:

* from detect-secrets' plugins: ``aws-access-key``, ``github-token``, ``gitlab-token``,
  ``slack-token``, ``jwt``, ``private-key``, ``stripe-key``, ``openai-key``, ``npm-token``,
  ``pypi-token``, ``sendgrid-key``, ``square-token``, ``azure-storage-key``, ``password-in-url``;
  its keyword plugin gives ``password`` / ``secret-assignment`` (``password = "..."``,
  ``api_key: "..."``) and its Base64/Hex entropy plugins give ``high-entropy`` (quoted strings only);
* lacd's own checks, only where detect-secrets has nothing: GitHub fine-grained tokens
  (``github_pat_``), the whole PEM/PuTTY key block (detect-secrets matches only its BEGIN line),
  the JWT signature (its pattern stops after the payload), passwords on command lines
  (``mysql -pX``, ``--password=X``, ``sshpass -p X``, ``redis-cli -a X``, ``curl -u user:X``),
  shell/.env assignments to secret-named variables (``DB_PASSWORD=X``, ``export GH_TOKEN=X``),
  JSON fields with secret names (tool call arguments), and ``secret-file``: the output of a tool
  call that read a secret-by-nature path (``read_file('.env')``, ``cat ~/.ssh/id_rsa``, ``printenv``)
  is replaced whole (wrapper tags kept), as are ``path:line`` results of a grep inside such files.

A value found once (8 characters or more) is redacted everywhere else in the same lesson too, so
a reply that repeats a password read from ``.env`` does not leak it.

Speed: every detector has a gate, literal substrings without which its pattern cannot match, so a
message that opens no gate costs a few substring searches; ``Scrubber.may_hold_secret`` on the raw
JSON line is a sound pre-check for the whole lesson (the gates' literals survive JSON escaping).
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import orjson
from detect_secrets.filters import heuristic
from detect_secrets.plugins.aws import AWSKeyDetector
from detect_secrets.plugins.azure_storage_key import AzureStorageKeyDetector
from detect_secrets.plugins.basic_auth import BasicAuthDetector
from detect_secrets.plugins.github_token import GitHubTokenDetector
from detect_secrets.plugins.gitlab_token import GitLabTokenDetector
from detect_secrets.plugins.high_entropy_strings import Base64HighEntropyString, HexHighEntropyString
from detect_secrets.plugins.jwt import JwtTokenDetector
from detect_secrets.plugins.keyword import QUOTES_REQUIRED_DENYLIST_REGEX_TO_GROUP, REGEX_BY_FILETYPE
from detect_secrets.plugins.npm import NpmDetector
from detect_secrets.plugins.openai import OpenAIDetector
from detect_secrets.plugins.private_key import PrivateKeyDetector
from detect_secrets.plugins.pypi_token import PypiTokenDetector
from detect_secrets.plugins.sendgrid import SendGridDetector
from detect_secrets.plugins.slack import SlackDetector
from detect_secrets.plugins.square_oauth import SquareOAuthDetector
from detect_secrets.plugins.stripe import StripeDetector
from detect_secrets.util.filetype import FileType, determine_file_type

from lacd.samples import parse_call

KINDS = (
    "aws-access-key", "github-token", "gitlab-token", "slack-token", "jwt", "private-key", "stripe-key",
    "openai-key", "npm-token", "pypi-token", "sendgrid-key", "square-token", "azure-storage-key",
    "password-in-url", "password", "secret-assignment", "high-entropy", "secret-file",
)
ACTIONS = ("redact", "exclude")
DEFAULT_SECRET_PATHS = (
    ".env", "*.env", ".env.*", "id_rsa", "id_dsa", "id_ecdsa", "id_ed25519", "*.pem", "*.key", "*.p12",
    "*.pfx", ".netrc", ".npmrc", ".pypirc", ".pgpass", ".git-credentials", "credentials",
)
"""Files whose content is secret by nature (fnmatch patterns on the file name, or on the path when
the pattern holds a ``/``); a tool output that shows one is replaced whole."""

MIN_PROPAGATED = 8  # a value this long found once is redacted wherever else it appears in the lesson
MIN_VALUE = 4  # keyword/password values shorter than this are not taken for secrets

# what a tool call that shows no file content is called; its output is never a secret file
NO_CONTENT_TOOLS = frozenset({"list_directory", "create_directory", "get_file_metadata"})
ENV_WORD = re.compile(r"(?<![\w.$/-])env(?![\w.=/-])")
ENV_DUMP = re.compile(r"(?:^|[;&|]\s*)(?:printenv|env)\s*(?:$|[;&|])")
WRAPPER = re.compile(r"^\s*<(tool_output|tool_output_error|tool_error)>")
TOOL_CODE = re.compile(r"<tool_code>(.*?)</tool_code>", re.S)
PLAN = re.compile(r"<plan>(.*?)</plan>", re.S)
CALL_NAME = re.compile(r"\s*([A-Za-z_$][\w$]*)")
PATH_SPLIT = re.compile(r"[\s'\"`=<>|;&(),\[\]{}]+")

# lacd's own patterns: only what detect-secrets has no plugin for
GITHUB_PAT = re.compile(r"github_pat_[A-Za-z0-9_]{22,}")
JWT_SIGNATURE = re.compile(r"[A-Za-z0-9_\-]*")
KEY_BLOCK_END = re.compile(r"-{4,5} ?END [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)? ?-{4,5}")
PUTTY_END = re.compile(r"Private-MAC: *[0-9a-fA-F]+")
VALUE = r"('[^'\n]*'|\"[^\"\n]*\"|[^\s'\"]+)"
ENV_ASSIGN = re.compile(r"(?:^|(?<=[\s;&|(:,]))(?:export\s+)?([A-Z][A-Z0-9_]*)=" + VALUE, re.M)
CLI_FLAG = re.compile(
    r"(?<![\w-])(--?[\w-]*(?:password|passwd|passphrase|token|secret|api-?key|api_key)[\w-]*)(?:=|\s+)" + VALUE, re.I)
CLI_TOOLS = (
    re.compile(r"\b(?:mysql|mysqldump|mysqladmin|mysqlimport|mysqlcheck|mysqlshow|mariadb)\b[^\n|;&]*?\s-p"
               r"('[^'\n]*'|\"[^\"\n]*\"|[^\s'\"-][^\s'\"]*)"),
    re.compile(r"\bsshpass\b[^\n|;&]*?\s-p\s*" + VALUE),
    re.compile(r"\bredis-cli\b[^\n|;&]*?\s-a\s+" + VALUE),
    re.compile(r"\bcurl\b[^\n|;&]*?\s(?:-u|--user)\s*['\"]?[^\s:'\"]+:([^\s'\"@]+)"),
)
FLAG_NOT_VALUE = ("-stdin", "-file", "-env", "-prompt", "-cmd", "-command", "-length", "-len", "-limit")
SRI_HASH = re.compile(r"sha(?:1|256|384|512)-")
CAMEL = re.compile(r"([a-z0-9])([A-Z])")
PLACEHOLDERS = frozenset({
    "true", "false", "yes", "no", "null", "none", "nil", "undefined", "password", "passwd", "pass",
    "token", "secret", "apikey", "api_key", "key", "changeme", "xxxx", "xxxxxx", "your_password",
    "your_token", "your_api_key", "redacted", "required", "optional", "string", "str",
})

PRIORITY = {"private-key": 0, "secret-file": 0, "password-in-url": 2, "password": 3, "secret-assignment": 3,
            "high-entropy": 4}  # lower wins when hits overlap; the token kinds are 1


class SecretsConfigError(ValueError):
    """A bad ``[secrets]`` setting, with a message that names it."""


@dataclass(frozen=True)
class Finding:
    """One secret found: its kind and where (``field``: the message role, ``tool_calls`` or ``raw``;
    ``turn``: the message index, -1 for the raw line). Never the secret itself."""

    kind: str
    field: str
    turn: int


@dataclass(frozen=True)
class Scrubbed:
    """The messages with secrets redacted, what was found, and whether the lesson must be excluded."""

    messages: list[dict[str, Any]]
    findings: list[Finding]
    exclude: bool

    def counts(self) -> dict[str, int]:
        """Findings by kind."""
        return dict(Counter(f.kind for f in self.findings))


@dataclass(frozen=True)
class ScrubbedLesson:
    """:meth:`Scrubber.scrub_lesson`'s answer: ``raw`` is the original line when nothing was found,
    else the re-encoded redacted JSON object; ``findings`` covers messages and raw-only secrets."""

    raw: str
    messages: list[dict[str, Any]]
    findings: list[Finding]
    exclude: bool

    def counts(self) -> dict[str, int]:
        """Findings by kind."""
        return dict(Counter(f.kind for f in self.findings))


@dataclass
class _Hit:
    start: int
    end: int
    kind: str


@dataclass
class _Unit:
    """One string to scan, what is known about it, and where it lives (a path into its container)."""

    text: str
    path: tuple
    field: str
    turn: int
    filetype: FileType = FileType.OTHER
    secret_file: bool = False
    tool_output: bool = False
    skip_entropy: bool = False
    key: str | None = None
    hits: list[_Hit] = field(default_factory=list)


@dataclass(frozen=True)
class _Context:
    """What the call that produced a tool output tells about it."""

    secret_file: bool = False
    filetype: FileType = FileType.OTHER
    lock_file: bool = False


@dataclass(frozen=True)
class _RegexPlugin:
    """A detect-secrets regex plugin, the lacd kind it gives, the literals it needs, and which group
    of each of its patterns is the secret (0: the whole match)."""

    plugin: Any
    kind: str
    needles: tuple[str, ...] = ()
    lower_needles: tuple[str, ...] = ()
    groups: tuple[int, ...] = ()

    def gate(self, text: str, lower: str) -> bool:
        return any(n in text for n in self.needles) or any(n in lower for n in self.lower_needles)

    def spans(self, text: str) -> Iterator[tuple[int, int]]:
        for i, regex in enumerate(self.plugin.denylist):
            group = self.groups[i] if i < len(self.groups) else 0
            for m in regex.finditer(text):
                if m.group(group):
                    yield m.span(group)


REGEX_PLUGINS = (
    _RegexPlugin(AWSKeyDetector(), "aws-access-key", ("A3T", "ABIA", "ACCA", "AKIA", "ASIA"), ("aws",), (0, 1)),
    _RegexPlugin(GitHubTokenDetector(), "github-token", ("ghp_", "gho_", "ghu_", "ghs_", "ghr_")),
    _RegexPlugin(GitLabTokenDetector(), "gitlab-token", ("glpat-", "gldt-", "glft-", "glsoat-", "glrt-", "GR1348941",
                                                         "glcbt-", "glimt-", "glptt-", "glagent-", "gloas-")),
    _RegexPlugin(SlackDetector(), "slack-token", (), ("xox", "hooks.slack.com")),
    _RegexPlugin(StripeDetector(), "stripe-key", ("k_live_",)),
    _RegexPlugin(OpenAIDetector(), "openai-key", ("T3BlbkFJ",)),
    _RegexPlugin(NpmDetector(), "npm-token", (":_authToken=",), (), (1,)),
    _RegexPlugin(PypiTokenDetector(), "pypi-token", ("pypi-AgE",)),
    _RegexPlugin(SendGridDetector(), "sendgrid-key", ("SG.",)),
    _RegexPlugin(SquareOAuthDetector(), "square-token", ("sq0csp-",)),
    _RegexPlugin(AzureStorageKeyDetector(), "azure-storage-key", ("AccountKey=",)),
    _RegexPlugin(BasicAuthDetector(), "password-in-url", ("://",), (), (1,)),
)
"""detect-secrets plugins used as they are. Left out: IBM, SoftLayer, Cloudant, Artifactory, Twilio,
Discord, Telegram, Mailchimp (no literal to gate them: each would cost a full regex pass over every
message, 10 to 60 us a line) and public IP addresses (not secrets)."""

JWT = JwtTokenDetector()
PRIVATE_KEY = PrivateKeyDetector()
KEYWORD_NEEDLES = ("key", "pass", "pwd", "secret", "contras")  # every keyword of the plugin's DENYLIST holds one
ENV_NEEDLES = ("PASS", "PWD", "SECRET", "TOKEN", "KEY", "CREDENTIAL")
FLAG_NEEDLES = ("password", "passwd", "passphrase", "token", "secret", "apikey", "api-key", "api_key")
TOOL_NEEDLES = ("mysql", "mariadb", "sshpass", "redis-cli", "curl")
PASSWORDISH = re.compile(r"pass|pwd|contras", re.I)


class Scrubber:
    """Finds and redacts secrets in lessons; built once from the ``[secrets]`` settings.

    ``actions``: kind -> "redact" | "exclude" (kinds not named are redacted); ``secret_paths``:
    fnmatch patterns of secret-by-nature files; ``entropy_limit`` / ``hex_limit``: Shannon entropy
    (bits per character) above which a quoted base64 / hex string of at least ``min_entropy_len`` /
    ``hex_min_len`` characters is a secret (``hex_limit=0`` turns the hex check off).
    """

    def __init__(self, actions: dict[str, str] | None = None, secret_paths: Iterable[str] = DEFAULT_SECRET_PATHS,
                 entropy_limit: float = 4.5, hex_limit: float = 3.0, min_entropy_len: int = 20,
                 hex_min_len: int = 32):
        self.actions = check_actions(actions or {})
        self.secret_paths = tuple(secret_paths)
        self._path_needles = tuple(sorted({_literal(p) for p in self.secret_paths} - {""}))
        if not 0 < entropy_limit <= 8 or not 0 <= hex_limit <= 8:
            raise SecretsConfigError("[secrets] entropy limits must be between 0 and 8 bits per character")
        self._base64 = Base64HighEntropyString(entropy_limit)
        self._hex = HexHighEntropyString(hex_limit) if hex_limit else None
        self._min_len = min_entropy_len
        self._hex_min_len = hex_min_len
        self._quoted_run = re.compile(r"[\"'][A-Za-z0-9+/=_\-]{%d,}\\*[\"']" % min(min_entropy_len, hex_min_len))

    # -- public API ---------------------------------------------------------------------------------

    def scrub_messages(self, messages: list[dict[str, Any]]) -> Scrubbed:
        """Redact every message's content and tool call arguments; the input is not modified."""
        units = self._message_units(messages)
        self._scan(units)
        out, found = self._apply_messages(messages, units)
        findings = [f for f, _ in found]
        return Scrubbed(out, findings, self._excluded(findings))

    def scrub_text(self, text: str) -> tuple[str, list[str]]:
        """Redact one text (a raw JSON line, or any text); the kinds found, one per distinct secret.

        A JSON object or array is decoded, its strings are redacted (with the secret-file rule for
        ``tool_call``/``tool_output`` pairs and role messages) and it is re-encoded; the original
        text is returned unchanged when nothing was found. Other text is scanned as it is.
        """
        if not self.may_hold_secret(text):
            return text, []
        obj = _json_container(text)
        if obj is None:
            cell = [text]
            unit = _Unit(text, (0,), "raw", -1)
            self._scan([unit])
            found = self._apply_raw(cell, [unit])
            return cell[0], [f.kind for f, _ in found]
        units = self._raw_units(obj)
        self._scan(units)
        found = self._apply_raw(obj, units)
        if not found:
            return text, []
        return orjson.dumps(obj).decode(), [f.kind for f, _ in found]

    def scrub_prefix(self, text: str, limit: int) -> tuple[str, list[str]]:
        """Redact ``text`` whole, then cut it to ``limit`` characters (for the rejects' prefix): a
        secret that the cut would have broken is redacted first, so no part of it survives."""
        scrubbed, kinds = self.scrub_text(text)
        return scrubbed[:limit], kinds

    def scrub_lesson(self, raw: str, messages: list[dict[str, Any]]) -> ScrubbedLesson:
        """Redact a parsed line's raw text and canonical messages together (one pre-check on ``raw``;
        a value found in either is redacted in both)."""
        if not self.may_hold_secret(raw):
            return ScrubbedLesson(raw, messages, [], False)
        obj = _json_container(raw)
        m_units = self._message_units(messages)
        cell = [raw]
        r_units = self._raw_units(obj) if obj is not None else [_Unit(raw, (0,), "raw", -1)]
        secret_texts = {u.text for u in r_units + m_units if u.secret_file}
        for u in m_units + r_units:
            u.secret_file = u.secret_file or (u.tool_output and u.text in secret_texts)
        self._scan(m_units + r_units)
        out, m_found = self._apply_messages(messages, m_units)
        if obj is None:
            r_found = self._apply_raw(cell, r_units)
            new_raw = cell[0]
        else:
            r_found = self._apply_raw(obj, r_units)
            new_raw = orjson.dumps(obj).decode() if r_found else raw
        seen = {value for _, value in m_found}
        findings = [f for f, _ in m_found]
        findings += [Finding(f.kind, "raw", -1) for f, value in r_found if value not in seen]
        return ScrubbedLesson(new_raw, out, findings, self._excluded(findings))

    def may_hold_secret(self, text: str) -> bool:
        """False only when no detector could match anywhere in ``text`` (sound on raw JSON lines)."""
        lower = text.lower()
        return (any(p.gate(text, lower) for p in REGEX_PLUGINS) or "github_pat_" in text or "eyJ" in text
                or "PRIVATE KEY" in text or "PuTTY-User-Key-File" in text
                or any(n in lower for n in KEYWORD_NEEDLES) or any(n in lower for n in FLAG_NEEDLES)
                or any(n in lower for n in TOOL_NEEDLES)
                or ("=" in text and any(n in text for n in ENV_NEEDLES))
                or any(n in text for n in self._path_needles) or _env_dump_word(text, lower)
                or self._quoted_run.search(text) is not None)

    # -- units: what to scan, with its context --------------------------------------------------------

    def _message_units(self, messages: list[dict[str, Any]]) -> list[_Unit]:
        units = []
        contexts = self._tool_contexts(messages)
        for i, m in enumerate(messages):
            role = m.get("role", "")
            ctx = contexts.get(i, _Context())
            if isinstance(m.get("content"), str):
                units.append(_Unit(m["content"], (i, "content"), role, i, ctx.filetype, ctx.secret_file,
                                   role == "tool", ctx.lock_file))
            for j, call in enumerate(m.get("tool_calls") or ()):
                if isinstance(call, dict):
                    units += _leaf_units(call.get("arguments"), (i, "tool_calls", j, "arguments"), "tool_calls", i)
        return units

    def _raw_units(self, obj: Any) -> list[_Unit]:
        units: list[_Unit] = []
        self._visit(obj, (), None, _Context(), units)
        return units

    def _visit(self, node: Any, path: tuple, key: str | None, ctx: _Context, units: list[_Unit]) -> None:
        if isinstance(node, str):
            units.append(_Unit(node, path, "raw", -1, ctx.filetype, ctx.secret_file, ctx is not NO_CONTEXT,
                               ctx.lock_file, key))
        elif isinstance(node, dict):
            output_ctx = self._execution_context(node)
            for k, v in node.items():
                sub = output_ctx if (k == "tool_output" and output_ctx) else NO_CONTEXT
                if k == "content" and ctx is not NO_CONTEXT:
                    sub = ctx
                self._visit(v, path + (k,), k if isinstance(k, str) else None, sub, units)
        elif isinstance(node, list):
            contexts = self._tool_contexts(node) if _is_message_list(node) else {}
            for i, v in enumerate(node):
                self._visit(v, path + (i,), key, contexts.get(i, NO_CONTEXT), units)

    def _execution_context(self, node: dict) -> _Context | None:
        """A local-ai-coder ``{"tool_call", "tool_output"}`` pair: the call tells about the output."""
        if isinstance(node.get("tool_call"), str) and isinstance(node.get("tool_output"), str):
            return self._call_context(*_parse_call(node["tool_call"]))
        return None

    def _tool_contexts(self, messages: list) -> dict[int, _Context]:
        """Pair each tool message with the call that produced it (the preceding assistant message's
        calls, in order; outputs beyond them belong to its plan, judged by the plan's text)."""
        out: dict[int, _Context] = {}
        pending: list[tuple[str | None, list[str]]] = []
        plan: tuple[str | None, list[str]] | None = None
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                continue
            if m.get("role") == "assistant":
                pending, plan = _calls_of(m), _plan_of(m)
            elif m.get("role") == "tool":
                call = pending.pop(0) if pending else plan
                out[i] = self._call_context(*call) if call else _Context()
        return out

    def _call_context(self, name: str | None, args: list[str]) -> _Context:
        paths = [t for a in args for t in PATH_SPLIT.split(a) if t]
        typed = next((t for t in paths if determine_file_type(t) is not FileType.OTHER), "")
        lock = any(heuristic.is_lock_file(t) for t in paths)
        if name in NO_CONTENT_TOOLS:
            return _Context(False, determine_file_type(typed) if typed else FileType.OTHER, lock)
        secret = any(ENV_DUMP.search(a.strip()) for a in args) or any(self.is_secret_path(t) for t in paths)
        return _Context(secret, determine_file_type(typed) if typed else FileType.OTHER, lock)

    def is_secret_path(self, path: str) -> bool:
        """True when ``path`` names a secret-by-nature file (``secret_paths``)."""
        path = path.strip().rstrip("/")
        if not path:
            return False
        name = path.rsplit("/", 1)[-1]
        for pattern in self.secret_paths:
            if "/" in pattern:
                if fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(path, "*/" + pattern):
                    return True
            elif fnmatch.fnmatchcase(name, pattern):
                return True
        return False

    # -- scanning ---------------------------------------------------------------------------------------

    def _scan(self, units: list[_Unit]) -> None:
        """Find hits in every unit, then redact values found once wherever else they appear."""
        strong: dict[str, str] = {}
        for u in units:
            if u.secret_file:
                inner = _Unit(u.text, (), u.field, u.turn, u.filetype if u.filetype is not FileType.OTHER
                              else FileType.CONFIG, tool_output=True)
                hits = self._find(inner)
            else:
                u.hits = hits = self._find(u)
            for h in hits:
                value = u.text[h.start:h.end]
                if len(value) >= MIN_PROPAGATED and not value.startswith("<redacted:"):
                    strong.setdefault(value, h.kind)
        if strong:
            regex = re.compile("|".join(re.escape(v) for v in sorted(strong, key=len, reverse=True)))
            for u in units:
                if not u.secret_file:
                    u.hits += [_Hit(m.start(), m.end(), strong[m.group()]) for m in regex.finditer(u.text)]

    def _find(self, u: _Unit) -> list[_Hit]:
        text = u.text
        lower = text.lower()
        hits: list[_Hit] = []
        for p in REGEX_PLUGINS:
            if p.gate(text, lower):
                hits += [_Hit(s, e, p.kind) for s, e in p.spans(text)]
        if "github_pat_" in text:
            hits += [_Hit(m.start(), m.end(), "github-token") for m in GITHUB_PAT.finditer(text)]
        if "eyJ" in text:
            hits += _jwt_hits(text)
        if "PRIVATE KEY" in text or "PuTTY-User-Key-File" in text:
            hits += _private_key_hits(text)
        if any(n in lower for n in KEYWORD_NEEDLES):
            hits += _keyword_hits(text, lower, u.filetype)
        if "=" in text and any(n in text for n in ENV_NEEDLES):
            hits += _env_hits(text)
        if any(n in lower for n in FLAG_NEEDLES) or any(n in lower for n in TOOL_NEEDLES):
            hits += _cli_hits(text, lower)
        if u.key is not None:
            hits += _field_hits(u.key, text)
        if u.tool_output and any(n in text for n in self._path_needles):
            hits += self._grep_hits(text)
        if not u.skip_entropy and self._quoted_run.search(text):
            hits += self._entropy_hits(text)
        return hits

    def _entropy_hits(self, text: str) -> list[_Hit]:
        hits = []
        for m in self._quoted_run.finditer(text):
            for plugin, min_len in ((self._base64, self._min_len), (self._hex, self._hex_min_len)):
                pm = plugin.regex.match(text, m.start()) if plugin else None
                if pm and len(pm.group(2)) >= min_len and _entropy_ok(plugin, pm.group(2), _line_at(text, m.start())):
                    hits.append(_Hit(pm.start(2), pm.end(2), "high-entropy"))
                    break
        return hits

    def _grep_hits(self, text: str) -> list[_Hit]:
        """``path:line:content`` results (grep -rn) whose path is a secret file: the content goes."""
        hits = []
        for start, end in _windows(text, text, self._path_needles, 1 << 30, 1 << 30):
            line_start = start
            for line in text[start:end].split("\n"):
                path, sep, rest = line.partition(":")
                if sep and path and not any(c.isspace() for c in path) and self.is_secret_path(path):
                    skip = len(path) + 1
                    number = re.match(r"\d+[:-]", rest)
                    skip += number.end() if number else 0
                    if line_start + skip < line_start + len(line):
                        hits.append(_Hit(line_start + skip, line_start + len(line), "secret-file"))
                line_start += len(line) + 1
        return hits

    # -- applying ---------------------------------------------------------------------------------------

    def _apply_unit(self, u: _Unit, put: Callable[[str], None]) -> list[tuple[Finding, str]]:
        if u.secret_file:
            put(_secret_file_output(u.text))
            return [(Finding("secret-file", u.field, u.turn), u.text)]
        if not u.hits:
            return []
        u.hits = _merge(u.hits)
        put(_render(u))
        seen: dict[tuple[str, str], Finding] = {}
        for h in u.hits:
            seen.setdefault((h.kind, u.text[h.start:h.end]), Finding(h.kind, u.field, u.turn))
        return [(f, value) for (_, value), f in seen.items()]

    def _apply_messages(self, messages: list[dict], units: list[_Unit]) -> tuple[list[dict], list]:
        out = list(messages)
        copied: set[int] = set()
        found = []

        def put_for(path: tuple) -> Callable[[str], None]:
            def put(value: str) -> None:
                i = path[0]
                if i not in copied:
                    out[i] = orjson.loads(orjson.dumps(messages[i]))
                    copied.add(i)
                _set_path(out[i], path[1:], value)
            return put

        for u in units:
            found += self._apply_unit(u, put_for(u.path))
        return out, found

    def _apply_raw(self, obj: Any, units: list[_Unit]) -> list:
        found = []
        for u in units:
            found += self._apply_unit(u, lambda value, path=u.path: _set_path(obj, path, value))
        return found

    def _excluded(self, findings: list[Finding]) -> bool:
        return any(self.actions.get(f.kind, "redact") == "exclude" for f in findings)


NO_CONTEXT = _Context()


def check_actions(actions: dict[str, str]) -> dict[str, str]:
    """Validate ``[secrets] actions`` (kind -> redact | exclude); raise SecretsConfigError."""
    for kind, action in actions.items():
        if kind not in KINDS:
            raise SecretsConfigError(f"[secrets] actions: unknown kind {kind!r}; kinds are {', '.join(KINDS)}")
        if action not in ACTIONS:
            raise SecretsConfigError(f"[secrets] actions: {kind} = {action!r}, expected redact or exclude")
    return dict(actions)


# -- detectors (module functions: pure, text in, hits out) ---------------------------------------------


def _jwt_hits(text: str) -> list[_Hit]:
    """detect-secrets' JWT pattern and validity check; the match is extended over the signature."""
    hits = []
    for regex in JWT.denylist:
        for m in regex.finditer(text):
            if JWT.is_formally_valid(m.group()):
                end = JWT_SIGNATURE.match(text, m.end()).end() if m.group().endswith(".") else m.end()
                hits.append(_Hit(m.start(), end, "jwt"))
    return hits


def _private_key_hits(text: str) -> list[_Hit]:
    """The whole key block from detect-secrets' BEGIN line to its END line (or the end of the text)."""
    hits = []
    for regex in PRIVATE_KEY.denylist:
        for m in regex.finditer(text):
            start = m.start()
            while start > 0 and text[start - 1] in "- ":
                start -= 1
            if m.group().startswith("PuTTY"):
                end = PUTTY_END.search(text, m.end())
            elif m.start() - start >= 4:
                end = KEY_BLOCK_END.search(text, m.end())
            else:
                continue  # "BEGIN RSA PRIVATE KEY" in prose, not a key
            hits.append(_Hit(start, end.end() if end else len(text), "private-key"))
    return hits


def _keyword_hits(text: str, lower: str, filetype: FileType) -> list[_Hit]:
    """detect-secrets' keyword patterns (for the file type, else quotes required) near each keyword."""
    table = REGEX_BY_FILETYPE.get(filetype, QUOTES_REQUIRED_DENYLIST_REGEX_TO_GROUP)
    quotes = table is QUOTES_REQUIRED_DENYLIST_REGEX_TO_GROUP
    hits = []
    for start, end in _windows(text, lower, KEYWORD_NEEDLES, 120, 400):
        window = text[start:end]
        if quotes and "'" not in window and '"' not in window and "`" not in window:
            continue
        for regex, group in table.items():
            for m in regex.finditer(window):
                value = m.group(group)
                if value and _keyword_value_ok(value, window):
                    kind = "password" if PASSWORDISH.search(window[m.start():m.start(group)]) else "secret-assignment"
                    hits.append(_Hit(start + m.start(group), _extend(text, start + m.end(group), end), kind))
    return hits


def _env_hits(text: str) -> list[_Hit]:
    """``NAME=value`` (shell, .env, ``export``) where NAME names a secret: DB_PASSWORD, GH_TOKEN..."""
    hits = []
    for start, end in _windows(text, text, ENV_NEEDLES, 120, 400):
        for m in ENV_ASSIGN.finditer(text, start, end):
            if _secret_name(m.group(1)) and _value_ok(m.group(2), _name_kind(m.group(1))):
                s, e = _unquoted_span(m, 2)
                hits.append(_Hit(s, _extend(text, e, end), _name_kind(m.group(1))))
    return hits


def _cli_hits(text: str, lower: str) -> list[_Hit]:
    """Passwords on command lines: --password=X, --token X, mysql -pX, sshpass -p X, curl -u u:X."""
    hits = []
    for start, end in _windows(text, lower, FLAG_NEEDLES, 80, 400):
        for m in CLI_FLAG.finditer(text, start, end):
            flag = m.group(1).lower()
            kind = "password" if PASSWORDISH.search(flag) else "secret-assignment"
            if not flag.endswith(FLAG_NOT_VALUE) and _value_ok(m.group(2), kind) and not m.group(2).startswith("-"):
                s, e = _unquoted_span(m, 2)
                hits.append(_Hit(s, e, kind))
    for start, end in _windows(text, lower, TOOL_NEEDLES, 0, 1 << 30):
        for regex in CLI_TOOLS:
            for m in regex.finditer(text, start, end):
                if _value_ok(m.group(1)):
                    s, e = _unquoted_span(m, 1)
                    hits.append(_Hit(s, e, "password"))
    return hits


def _field_hits(key: str, value: str) -> list[_Hit]:
    """A JSON field whose name names a secret (tool call arguments): the whole value."""
    name = CAMEL.sub(r"\1_\2", key).upper().replace("-", "_")
    if _secret_name(name) and "\n" not in value and _value_ok(value, _name_kind(name)):
        return [_Hit(0, len(value), _name_kind(name))]
    return []


def _entropy_ok(plugin: Any, value: str, line: str) -> bool:
    return (plugin.calculate_shannon_entropy(value) > plugin.entropy_limit
            and not SRI_HASH.match(value)
            and not heuristic.is_sequential_string(value)
            and not heuristic.is_potential_uuid(value)
            and not heuristic.is_likely_id_string(value, line, plugin))


def _keyword_value_ok(value: str, line: str) -> bool:
    """detect-secrets' heuristic filters for keyword findings, plus lacd's placeholder words."""
    return (_value_ok(value)
            and not heuristic.is_indirect_reference(line)
            and not heuristic.is_sequential_string(value)
            and not heuristic.is_potential_uuid(value)
            and not heuristic.is_likely_id_string(value, line))


def _value_ok(value: str, kind: str = "password") -> bool:
    """Could this assigned value be a secret (not empty, a template, a variable or a placeholder;
    a number is a password's value but not a token's: ``--max-tokens 2048``)?"""
    value = value.strip().strip("'\"`")
    return (len(value) >= MIN_VALUE
            and not (kind != "password" and value.isdigit())
            and not heuristic.is_templated_secret(value)
            and not heuristic.is_prefixed_with_dollar_sign(value)
            and not heuristic.is_not_alphanumeric_string(value)
            and value.lower() not in PLACEHOLDERS
            and not value.startswith(("<redacted:", "%(", "{{")))


def _secret_name(name: str) -> bool:
    """Does an UPPER_SNAKE variable name name a secret?"""
    parts = name.split("_")
    return (any(w in name for w in ("PASSWORD", "PASSWD", "PASSPHRASE", "SECRET"))
            or any(p in ("PASS", "PWD", "TOKEN", "APIKEY", "CREDENTIAL", "CREDENTIALS", "PAT") for p in parts)
            or parts[-1].endswith("TOKEN")
            or (len(parts) > 1 and parts[-1] == "KEY" and parts[-2] not in ("PRIMARY", "FOREIGN", "SORT", "PARTITION",
                                                                              "CACHE", "HOT", "PUBLIC", "LICENSE")))


def _name_kind(name: str) -> str:
    return "password" if re.search("PASS|PWD", name.upper()) else "secret-assignment"


# -- helpers --------------------------------------------------------------------------------------------


def _windows(text: str, hay: str, needles: Iterable[str], before: int, after: int) -> list[tuple[int, int]]:
    """Merged [start, end) windows around each needle occurrence in ``hay``, kept inside its line."""
    spans = []
    for needle in needles:
        pos = hay.find(needle)
        while pos >= 0:
            line_start = text.rfind("\n", 0, pos) + 1
            line_end = text.find("\n", pos)
            line_end = len(text) if line_end < 0 else line_end
            spans.append((max(line_start, pos - before), min(line_end, pos + len(needle) + after)))
            pos = hay.find(needle, pos + 1)
    spans.sort()
    merged: list[tuple[int, int]] = []
    for s, e in spans:
        if merged and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], e))
        else:
            merged.append((s, e))
    return merged


def _extend(text: str, end: int, window_end: int) -> int:
    """A value cut by its window's end runs on to the next quote, space or comma."""
    if end < window_end:
        return end
    while end < len(text) and text[end] not in " \t\r\n'\"`,":
        end += 1
    return end


def _unquoted_span(m: re.Match, group: int) -> tuple[int, int]:
    s, e = m.span(group)
    value = m.group(group)
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return s + 1, e - 1
    return s, e


def _line_at(text: str, pos: int) -> str:
    start = text.rfind("\n", 0, pos) + 1
    end = text.find("\n", pos)
    return text[start:end if end >= 0 else len(text)]


def _merge(hits: list[_Hit]) -> list[_Hit]:
    """Overlapping hits become one; its kind is the most specific of theirs."""
    out: list[_Hit] = []
    for h in sorted(hits, key=lambda h: (h.start, -h.end)):
        if h.end <= h.start:
            continue
        if out and h.start < out[-1].end:
            last = out[-1]
            kind = min((last.kind, h.kind), key=lambda k: PRIORITY.get(k, 1))
            out[-1] = _Hit(last.start, max(last.end, h.end), kind)
        else:
            out.append(h)
    return out


def _render(u: _Unit) -> str:
    if u.secret_file:
        return _secret_file_output(u.text)
    u.hits = _merge(u.hits)
    pieces, pos = [], 0
    for h in u.hits:
        pieces += [u.text[pos:h.start], f"<redacted:{h.kind}>"]
        pos = h.end
    pieces.append(u.text[pos:])
    return "".join(pieces)


def _secret_file_output(text: str) -> str:
    m = WRAPPER.match(text)
    return f"<{m.group(1)}><redacted:secret-file></{m.group(1)}>" if m else "<redacted:secret-file>"


def _literal(pattern: str) -> str:
    """The longest run of a glob pattern without wildcards (a needle that any match contains)."""
    return max(re.split(r"[*?\[\]]", pattern.rsplit("/", 1)[-1]), key=len)


def _parse_call(text: str) -> tuple[str | None, list[str]]:
    """A tool call's name and arguments (JavaScript literals decoded; raw text when it does not parse)."""
    call = parse_call(text)
    if call.ok:
        return call.name, list(call.args)
    m = CALL_NAME.match(text)
    return (m.group(1) if m else None), [text[m.end():] if m else text]


def _calls_of(message: dict) -> list[tuple[str | None, list[str]]]:
    content = message.get("content") if isinstance(message.get("content"), str) else ""
    calls = [_parse_call(block) for block in TOOL_CODE.findall(content)]
    for call in message.get("tool_calls") or ():
        fn = call.get("function", call) if isinstance(call, dict) else {}
        args = fn.get("arguments") if isinstance(fn, dict) else None
        if isinstance(args, str):
            try:
                args = orjson.loads(args)
            except orjson.JSONDecodeError:
                pass
        calls.append((fn.get("name") if isinstance(fn, dict) else None, list(_strings(args))))
    return calls


def _plan_of(message: dict) -> tuple[str | None, list[str]] | None:
    content = message.get("content") if isinstance(message.get("content"), str) else ""
    plans = PLAN.findall(content)
    return (None, plans) if plans else None


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)


def _leaf_units(node: Any, path: tuple, field_name: str, turn: int, key: str | None = None) -> list[_Unit]:
    if isinstance(node, str):
        return [_Unit(node, path, field_name, turn, key=key)]
    if isinstance(node, dict):
        return [u for k, v in node.items() for u in _leaf_units(v, path + (k,), field_name, turn, str(k))]
    if isinstance(node, list):
        return [u for i, v in enumerate(node) for u in _leaf_units(v, path + (i,), field_name, turn, key)]
    return []


def _set_path(node: Any, path: tuple, value: str) -> None:
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value


def _env_dump_word(text: str, lower: str) -> bool:
    return "printenv" in lower or ("env" in lower and ENV_WORD.search(text) is not None)


def _is_message_list(node: list) -> bool:
    return bool(node) and all(isinstance(m, dict) and "role" in m for m in node)


def _json_container(text: str) -> Any:
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, (dict, list)) else None
