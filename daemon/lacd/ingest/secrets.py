"""Secrets in lessons: find them and redact them before anything is stored or trained on.

A :class:`Scrubber` scans a lesson and replaces each secret by ``<redacted:KIND>``; it records the
kind and where it was (:class:`Finding`: kind, field, turn), never the secret. Kinds (``KINDS``),
each configurable to ``redact`` (the default: the lesson is kept, redacted) or ``exclude``:

* detect-secrets' plugins: ``aws-access-key``, ``github-token``, ``gitlab-token``, ``slack-token``,
  ``jwt``, ``private-key``, ``stripe-key``, ``openai-key``, ``npm-token``, ``pypi-token``,
  ``sendgrid-key``, ``square-token``, ``azure-storage-key``, ``twilio-key``, ``password-in-url``; its
  keyword plugin gives ``password`` / ``secret-assignment`` (``password = "..."``, ``api_key:
  "..."``); its Base64 and Hex entropy plugins give ``high-entropy`` (quoted strings, as
  detect-secrets does); a fixed-length match runs on to the end of its token;
* lacd's own checks, only where detect-secrets has nothing: token shapes (TOKEN_SHAPES:
  ``anthropic-key``, ``huggingface-token``, ``google-api-key``, OpenAI project/service keys, npm
  ``npm_`` tokens anywhere, Stripe test/webhook keys, Slack app tokens, GitHub fine-grained tokens);
  shapes with no literal, only near their service's name (an AWS secret key near "aws", Twilio
  SIDs and auth tokens near "twilio", an Azure storage key near "azure"); Azure connection strings
  (``SharedAccessKey=``, ``AccountKey=``) and SAS ``sig=``; ``auth-header``: ``Authorization:
  Basic`` (base64 of ``user:password``), ``Bearer`` and ``Authorization: token`` values, API key
  headers (``x-api-key``, ``PRIVATE-TOKEN``...); the whole PEM/PuTTY key block (detect-secrets
  matches only its BEGIN line), the JWT signature (its pattern stops after the payload), passwords
  on command lines (``mysql -pX``, ``--password=X``, ``--token X``, ``sshpass -p X``, ``redis-cli -a
  X``, ``curl -u user:X``, ``docker/podman/helm registry login -p X``, ``echo X | docker login
  --password-stdin``, ``mongosh -p X``, ``sqlcmd -P X``, ``ldapsearch -w X``, ``htpasswd -b``,
  ``openssl ... pass:X``, ``smbclient -U user%X``), shell/.env assignments to secret-named variables (``DB_PASSWORD=X``,
  ``export GH_TOKEN=X``), JSON fields with secret names (tool call arguments), and ``secret-file``:
  the output of a tool call that read a secret-by-nature path (``read_file('.env')``,
  ``cat ~/.ssh/id_rsa``, ``printenv``) is replaced whole (its wrapper tags kept), and so is the
  content part of ``path:line:content`` results (grep) whose path is such a file.

A distinctive value found once (8 characters or more, not a plain word) is redacted everywhere
else in the lesson too, so a reply that repeats a password read from ``.env`` does not leak it; in
the raw line's copy every value found anywhere in the lesson is redacted.

Speed: a gate says which detectors can match at all: one Aho-Corasick pass (pyahocorasick when
installed, else one substring search per literal) over the lower-cased text for the detectors'
literals, one byte translation for quoted high-entropy candidates, and a cheap confirmation next to
each literal found. On a raw JSON line it is sound for the whole lesson (the literals survive JSON
escaping; ``test_the_raw_line_gate_is_sound_wherever_the_secret_sits``), so a clean line costs one
gate (about twice ``parse_line``); detectors then look only near their literals. Everything is
found in the decoded text: a line holding JSON escapes (``\\u0067hp_...``, ``https:\\/\\/...``) is
gated decoded (the escapes are literals of the same pass, so other lines cost nothing more), and
text that is not valid JSON (a reject's prefix) is scanned with its escapes decoded.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import functools
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
from detect_secrets.plugins.keyword import DENYLIST, QUOTES_REQUIRED_DENYLIST_REGEX_TO_GROUP, REGEX_BY_FILETYPE
from detect_secrets.plugins.npm import NpmDetector
from detect_secrets.plugins.openai import OpenAIDetector
from detect_secrets.plugins.private_key import PrivateKeyDetector
from detect_secrets.plugins.pypi_token import PypiTokenDetector
from detect_secrets.plugins.sendgrid import SendGridDetector
from detect_secrets.plugins.slack import SlackDetector
from detect_secrets.plugins.square_oauth import SquareOAuthDetector
from detect_secrets.plugins.stripe import StripeDetector
from detect_secrets.plugins.twilio import TwilioKeyDetector
from detect_secrets.util.filetype import FileType, determine_file_type

from lacd.protocol import IDENT, NO_CONTENT_TOOLS, PLAN, TOOL_CODE, parse_call
from lacd.protocol import RESULT as WRAPPER

try:  # optional: one C pass finds every literal; without it, one substring search per literal
    import ahocorasick
except ImportError:  # pragma: no cover - exercised by a test that hides the module
    ahocorasick = None

KINDS = (
    "aws-access-key", "github-token", "gitlab-token", "slack-token", "jwt", "private-key", "stripe-key",
    "openai-key", "npm-token", "pypi-token", "sendgrid-key", "square-token", "azure-storage-key",
    "password-in-url", "password", "secret-assignment", "high-entropy", "secret-file",
    "anthropic-key", "huggingface-token", "google-api-key", "twilio-key", "auth-header",
)
ACTIONS = ("redact", "exclude")
DEFAULT_SECRET_PATHS = (
    ".env", "*.env", ".env.*", "id_rsa", "id_dsa", "id_ecdsa", "id_ed25519", "*.pem", "*.key", ".netrc",
    ".npmrc", ".pypirc", ".pgpass", ".git-credentials", "credentials",
)
"""Files whose content is secret by nature: fnmatch patterns on the file name (on the path when the
pattern holds a ``/``). A tool output that shows one is replaced whole."""

MIN_PROPAGATED = 8  # a value this long, found once, is redacted wherever else it appears in the lesson
MIN_VALUE = 4  # an assigned value shorter than this is not taken for a secret
MIN_KEYWORD_VALUE = 6  # nor is a string literal shorter than this assigned in code ("warn", "N/A")
TOKEN_RUN = 16  # every token kind holds a run of this many [A-Za-z0-9_-] characters

# -- the agent's calls -------------------------------------------------------------------------------
CALL_NAME = re.compile(r"\s*(" + IDENT.pattern + ")")
PATH_SPLIT = re.compile(r"[\s'\"`=<>|;&(),\[\]{}]+")
ENV_DUMP = re.compile(r"(?:^|[;&|]\s*)(?:printenv|env)\s*(?:$|[;&|])")

# -- lacd's own patterns: only what detect-secrets has no plugin for --------------------------------
URL_CREDENTIALS = re.compile(r"://[^\s:/?#@'\"]*:([^\s/@'\"]+)@[\w\[]")
GITHUB_PAT = re.compile(r"github_pat_[A-Za-z0-9_]{22,}")
JWT_SIGNATURE = re.compile(r"[A-Za-z0-9_\-]*")
KEY_BLOCK_END = re.compile(r"-{4,5} ?END [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)? ?-{4,5}")
PUTTY_END = re.compile(r"Private-MAC: *[0-9a-fA-F]+")
KEY_BODY = re.compile(r"[A-Za-z0-9+/=]{40,}")  # a line of a key's base64 body
VALUE = r"('[^'\n]*'|\"[^\"\n]*\"|[^\s'\"]+)"
ENV_ASSIGN = re.compile(r"([A-Z][A-Z0-9_]*)=" + VALUE)
ENV_NAME_AT = re.compile(r"[A-Z][A-Z0-9_]*=")
ENV_BEFORE = " \t\n;&|(:,>\"'`[{"  # what may precede a shell name being assigned (a tag: <tool_output>NAME=)
TOOL_START = r"(?:(?<![\w-])|(?<=\\[nrt]))"  # a command name starts here (after an escaped newline too)
DASHLESS_VALUE = r"('[^'\n]*'|\"[^\"\n]*\"|[^\s'\"-][^\s'\"]*)"  # a value, not the next -flag
REGISTRY_LOGIN = r"(?:docker|podman|nerdctl|buildah|skopeo|oras|helm(?:\s+registry)?)\s+login\b"
CLI_FLAG = re.compile(r"(--?[\w-]*)(?:=|\s+)" + VALUE)
REGISTRY_WORDS = ("docker", "podman", "nerdctl", "buildah", "skopeo", "oras", "helm")
CLI_TOOLS = (  # (the words one of which starts a match, the pattern); group 1 is the password
    (("mysql", "mariadb", "sshpass"),
     re.compile(TOOL_START + r"(?:mysql|mysqldump|mysqladmin|mysqlimport|mysqlcheck|mysqlshow|mariadb|sshpass)\b"
                r"[^\n|;&]*?\s-p(?:(?<=sshpass -p)\s*)?('[^'\n]*'|\"[^\"\n]*\"|[^\s'\"-][^\s'\"]*)")),
    (("redis-cli",), re.compile(TOOL_START + r"redis-cli\b[^\n|;&]*?\s-a\s+" + VALUE)),
    (("curl",), re.compile(TOOL_START + r"curl\b[^\n|;&]*?\s(?:-u|--user)\s*['\"]?[^\s:'\"]+:([^\s'\"@]+)")),
    (REGISTRY_WORDS, re.compile(TOOL_START + REGISTRY_LOGIN + r"[^\n|;&]*?\s(?:-p|--password)(?:=|\s+)" + DASHLESS_VALUE)),
    (("mongo",), re.compile(TOOL_START + r"(?:mongo|mongosh|mongodump|mongorestore|mongoexport|mongoimport)\b"
                            r"[^\n|;&]*?\s(?:-p|--password)(?:=|\s+)" + DASHLESS_VALUE)),
    (("sqlcmd",), re.compile(TOOL_START + r"sqlcmd\b[^\n|;&]*?\s-P\s*" + DASHLESS_VALUE)),
    (("ldap",), re.compile(TOOL_START + r"ldap(?:search|add|modify|delete|passwd|whoami|compare)\b[^\n|;&]*?\s-w\s+"
                           + DASHLESS_VALUE)),
    (("htpasswd",), re.compile(TOOL_START + r"htpasswd(?=(?:\s+-[a-zA-Z]+)*\s+-[a-zA-Z]*b)(?:\s+-[a-zA-Z]+)+"
                               r"\s+[^\s-]\S*\s+[^\s-]\S*\s+" + DASHLESS_VALUE)),  # htpasswd -b[c] FILE USER PASSWORD
    (("openssl",), re.compile(TOOL_START + r"openssl\b[^\n|;&]*?\s-pass(?:in|out)?\s+['\"]?pass:([^\s'\"]+)")),
    (("smbclient",), re.compile(TOOL_START + r"smbclient\b[^\n|;&]*?\s(?:-U|--user)(?:=|\s+)['\"]?[^\s%'\"]+%([^\s'\"]+)")),
    (("echo",), re.compile(TOOL_START + r"echo\s+(?:-n\s+)?" + DASHLESS_VALUE + r"\s*\|\s*(?:sudo\s+)?"
                           + REGISTRY_LOGIN + r"[^\n|;&]*--password-stdin")),
)
FLAG_WORDS = re.compile(r"password|passwd|passphrase|token|secret|api-?key|api_key", re.I)
FLAG_NOT_VALUE = ("-stdin", "-file", "-env", "-prompt", "-cmd", "-command", "-length", "-len", "-limit")
WORD_BEFORE = re.compile(r"[\w-]*$")
NAME_BEFORE = re.compile(r"[A-Z0-9_]*$")  # an upper-case shell name (stops at the n of an escaped \n)
KEYWORD = re.compile("|".join(DENYLIST))  # detect-secrets' own keyword list, to confirm a gate hit
PASSWORDISH = re.compile(r"pass|pwd|contras", re.I)
HEX_DIGITS = "0123456789abcdefABCDEF"
SRI_HASH = re.compile(r"sha(?:1|256|384|512)-")
SNAKE_WORDS = re.compile(r"[a-z]+(?:_[a-z]+)+")
CAMEL = re.compile(r"([a-z0-9])([A-Z])")
PLACEHOLDERS = frozenset({
    "true", "false", "yes", "no", "null", "none", "nil", "undefined", "password", "passwd", "pass",
    "token", "secret", "apikey", "api_key", "key", "changeme", "xxxx", "xxxxxx", "your_password",
    "your_token", "your_api_key", "redacted", "required", "optional", "string", "str",
})

# -- the gate ------------------------------------------------------------------------------------------
SECRET_WORDS = ("key", "pass", "pwd", "secret", "token", "credential")  # keyword, env, flag and field names
CLI_NEEDLES = (" -p", "curl", "redis-cli", "ldap", "smbclient")
PASS_CLI_NEEDLES = ("htpasswd", "pass:", "password-stdin")  # command lines the literal "pass" opens the gate for
HEADER_NEEDLES = ("bearer", "basic", "authoriz", "api-key", "auth-token", "private-token", "access-token",
                  "subscription-key")  # Authorization and API key headers (kept whole: not reduced by _minimal)
CONTEXT_NEEDLES = ("aws", "twilio", "azure")  # shapes with no literal of their own, looked for near these words
BASE_NEEDLES = (SECRET_WORDS + CLI_NEEDLES + CONTEXT_NEEDLES
                + ("://", "env", "id_", "sig=", "\\u", "\\/"))  # env: .env and env dumps; id_: ssh keys;
# sig=: Azure shared access signatures; \u, \/: JSON escapes (the gate then reads the line decoded)
# gate tags: which detectors have a candidate (see Scrubber.gate)
RUNS, QUOTED, WORDS, KEYS, NPM_TAG, URL, CLI, FILES, HEADERS, CONTEXT = (
    "tokens", "quoted", "words", "keys", "npm", "url", "cli", "files", "headers", "context")
CLASSES = bytes(
    ord("a") if (chr(i).isascii() and chr(i).isalnum()) or chr(i) in "_-" else
    ord("b") if chr(i) in "+/=" else ord("q") if chr(i) in "'\"" else ord(" ") for i in range(256))
FLAT_CLASSES = CLASSES.translate(bytes.maketrans(b"b", b"a"))  # a run character is "a" whatever its kind
RUN_BYTES = re.compile(rb"a{%d,}" % TOKEN_RUN)
TOKEN_SPLIT = re.compile(r"[\s'\"`=<>|;&(),\[\]{}\\:]+")  # PATH_SPLIT plus backslash and colon (raw JSON, grep)
NOT_FILES = frozenset({"process.env", "import.meta.env"})  # JavaScript, not files named *.env
FIELD_AFTER = re.compile(r'[\w-]*\\?"\s*:')  # a JSON field name ends here: "access_token": ...
RUN_CHARS = re.compile(r"[A-Za-z0-9_\-]{%d,}" % TOKEN_RUN)  # the same on text that is not ASCII

PRIORITY = {"private-key": 0, "secret-file": 0, "password-in-url": 2, "auth-header": 2, "password": 3,
            "secret-assignment": 3, "high-entropy": 4}  # the most specific kind names a merged hit; token kinds are 1


class SecretsConfigError(ValueError):
    """A bad ``[secrets]`` setting, with a message that names it."""


@dataclass(frozen=True)
class Finding:
    """One secret found: its kind and where (``field``: the message's role, ``tool_calls`` or ``raw``;
    ``turn``: the message's index, -1 for the raw line). Never the secret itself."""

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
    """:meth:`Scrubber.scrub_lesson`'s answer. ``raw`` is the line itself when nothing was found, else
    the redacted JSON re-encoded; ``findings`` holds the messages' findings plus ``raw`` ones for
    secrets seen only in the raw line (e.g. a plan step's logged call)."""

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


@dataclass(frozen=True)
class _Context:
    """What the call that produced a tool output tells about it."""

    secret_file: bool = False
    filetype: FileType = FileType.OTHER
    lock_file: bool = False


@dataclass
class _Unit:
    """One string to scan, what is known about it, and where it lives (a path into its container)."""

    text: str
    path: tuple
    field: str
    turn: int
    tool_output: bool = False
    context: Any = field(default_factory=_Context)  # a _Context, or a lazy one (pairs calls when first read)
    key: str | None = None
    secret_file: bool = False
    hits: list[_Hit] = field(default_factory=list)


@dataclass(frozen=True)
class _Plugin:
    """A detect-secrets regex plugin, the lacd kind it gives, the literals one of which any match
    holds, and which group of each of its patterns is the secret (0: the whole match)."""

    plugin: Any
    kind: str
    needles: tuple[str, ...]
    groups: tuple[int, ...] = ()
    ignore_case: bool = False

    def spans(self, text: str) -> Iterator[tuple[int, int]]:
        for i, regex in enumerate(self.plugin.denylist):
            group = self.groups[i] if i < len(self.groups) else 0
            for m in regex.finditer(text):
                if m.group(group):
                    yield m.span(group)


TOKEN_PLUGINS = (
    _Plugin(AWSKeyDetector(), "aws-access-key", ("A3T", "ABIA", "ACCA", "AKIA", "ASIA"), (0, 1)),
    _Plugin(GitHubTokenDetector(), "github-token", ("ghp_", "gho_", "ghu_", "ghs_", "ghr_")),
    _Plugin(GitLabTokenDetector(), "gitlab-token", ("glpat-", "gldt-", "glft-", "glsoat-", "glrt-", "GR1348941",
                                                    "glcbt-", "glimt-", "glptt-", "glagent-", "gloas-")),
    _Plugin(SlackDetector(), "slack-token", ("xox",), ignore_case=True),
    _Plugin(StripeDetector(), "stripe-key", ("k_live_",)),
    _Plugin(OpenAIDetector(), "openai-key", ("T3BlbkFJ",)),
    _Plugin(PypiTokenDetector(), "pypi-token", ("pypi-AgE",)),
    _Plugin(SendGridDetector(), "sendgrid-key", ("SG.",)),
    _Plugin(SquareOAuthDetector(), "square-token", ("sq0csp-",)),
)
"""detect-secrets plugins for tokens, each found inside a long run of token characters. Left out:
IBM, SoftLayer, Cloudant, Artifactory, Twilio, Discord, Telegram, Mailchimp (no literal to gate
them: each would cost a full regex pass over every message) and public IP addresses (not secrets)."""
AWS = TOKEN_PLUGINS[0]
SLACK = TOKEN_PLUGINS[3]
NPM = _Plugin(NpmDetector(), "npm-token", ("_authtoken=",), (1,))
AZURE = _Plugin(AzureStorageKeyDetector(), "azure-storage-key", ("accountkey=",))
BASIC_AUTH = _Plugin(BasicAuthDetector(), "password-in-url", ("://",), (1,))
JWT = JwtTokenDetector()
PRIVATE_KEY = PrivateKeyDetector()
TWILIO = TwilioKeyDetector()


def _mixed_case(value: str) -> bool:
    return any(c.isupper() for c in value) and any(c.islower() for c in value)


@dataclass(frozen=True)
class _Shape:
    """A token shape of lacd's own, for a documented format no detect-secrets plugin knows: its kind,
    the literals (case-sensitive) one of which every match holds, its pattern and a check."""

    kind: str
    needles: tuple[str, ...]
    regex: re.Pattern
    check: Callable[[str], bool] | None = None


TOKEN_SHAPES = (
    _Shape("anthropic-key", ("sk-ant-",), re.compile(r"sk-ant-[a-z]{2,8}\d{2}-[A-Za-z0-9_\-]{20,}")),
    _Shape("openai-key", ("sk-proj-", "sk-svcacct-", "sk-admin-"),
           re.compile(r"sk-(?:proj|svcacct|admin)-[A-Za-z0-9_\-]{20,}")),
    _Shape("huggingface-token", ("hf_", "api_org_"),
           re.compile(r"(?<![A-Za-z0-9_])(?:hf|api_org)_[A-Za-z0-9]{34}(?![A-Za-z0-9_])"), _mixed_case),
    _Shape("google-api-key", ("AIza",), re.compile(r"AIza[0-9A-Za-z_\-]{35}(?![0-9A-Za-z_\-])")),
    _Shape("npm-token", ("npm_",), re.compile(r"(?<![A-Za-z0-9_])npm_[A-Za-z0-9]{36}(?![A-Za-z0-9_])")),
    _Shape("stripe-key", ("k_test_", "k_live_", "whsec_"),
           re.compile(r"(?<![A-Za-z0-9])(?:[sr]k_(?:test|live)_[0-9a-zA-Z]{24,}|whsec_[0-9a-zA-Z]{32,})")),
    _Shape("slack-token", ("xapp-",), re.compile(r"xapp-\d-[A-Z0-9]+-\d+-[A-Za-z0-9]+")),
    _Shape("github-token", ("github_pat_",), GITHUB_PAT),
)
"""Anthropic (``sk-ant-api03-``), OpenAI project/service/admin keys (detect-secrets knows only the
``T3BlbkFJ`` ones), Hugging Face (``hf_`` + 34), Google API keys (``AIza`` + 35), npm (``npm_`` +
36; detect-secrets only inside ``.npmrc``), Stripe test and webhook keys, Slack app tokens and
GitHub fine-grained tokens."""
TOKEN_TAIL = re.compile(r"[A-Za-z0-9_\-]*")  # a token a plugin's fixed-length pattern cut short runs on

TOKEN_HINT = re.compile("|".join([re.escape(n) for p in TOKEN_PLUGINS if not p.ignore_case for n in p.needles]
                                 + [re.escape(n) for shape in TOKEN_SHAPES for n in shape.needles]
                                 + ["(?i:xox)", "eyJ"]))
TOKEN_LITERALS: dict[str, tuple[str, ...]] = {}  # lower-cased literal -> its case-sensitive forms ("" : any case)
for _p in TOKEN_PLUGINS:
    for _n in _p.needles:
        TOKEN_LITERALS.setdefault(_n.lower(), ("",) if _p.ignore_case else (_n,))
for _shape in TOKEN_SHAPES:
    for _n in _shape.needles:
        TOKEN_LITERALS[_n.lower()] = tuple(sorted(set(TOKEN_LITERALS.get(_n.lower(), ())) | {_n}))
TOKEN_LITERALS.update({"eyj": ("eyJ",)})

# -- Authorization and API key headers (lacd's own: detect-secrets has none) --------------------------
HEADER_VALUE = r"([A-Za-z0-9._~+/\-]{%d,}=*)(?![A-Za-z0-9._~+/=\-])"
BASIC_HEADER = re.compile(r"(?i:\bbasic)\s+([A-Za-z0-9+/]{8,}={0,2})(?![A-Za-z0-9+/=])")
BEARER_HEADER = re.compile(r"(?:(?i:\bbearer)\s+|(?i:\bauthorization)\\?[\"']?\s*:\s*\\?[\"']?"
                           r"(?:(?i:token|bot|apikey|key|sso-key)\s+)?)" + HEADER_VALUE % 16)
KEY_HEADER_NAMES = HEADER_NEEDLES[3:]
KEY_HEADER = re.compile(r"(?i:(?<![\w-])(?:[a-z]+-)*(?:api-key|auth-token|private-token|access-token|subscription-key))"
                        r"\\?[\"']?\s*:\s*\\?[\"']?" + HEADER_VALUE % 12)

# -- shapes with no literal, looked for only near a word that names their service ---------------------
AWS_SECRET = re.compile(r"(?<![A-Za-z0-9+/=])[A-Za-z0-9+/]{40}(?![A-Za-z0-9+/=])")
AWS_SECRET_LOOSE = re.compile(r"[A-Za-z0-9+/]{40}")  # the gate's superset (a raw line's \\n before it)
BASE64_ENTROPY = Base64HighEntropyString(4.5)
TWILIO_TOKEN = re.compile(r"(?<![A-Za-z0-9])[0-9a-f]{32}(?![A-Za-z0-9])")
AZURE_KEY = re.compile(r"(?<![A-Za-z0-9+/=])[A-Za-z0-9+/]{86}==(?![A-Za-z0-9+/=])")
AZURE_SHARED_KEY = re.compile(r"(?i:SharedAccessKey|AccountKey)\s*=\s*([A-Za-z0-9+/]{20,}={0,2})")
AZURE_SAS = re.compile(r"[?&;]sig=([A-Za-z0-9%+/]{20,}(?:=|%3[dD]){0,2})")
CONTEXT_REACH = 300  # how far from its service's name a context shape is looked for

# -- JSON escapes: a literal written with them (\u0067hp_...) is still that literal ------------------
JSON_ESCAPE = re.compile(r"\\(?:(\\)|u([0-9a-fA-F]{4})|/)")  # an escaped backslash is consumed whole, kept
ANY_ESCAPE = re.compile(r"\\(?:([\"\\nrt])|u([0-9a-fA-F]{4})|/)")
ESCAPED_CHARS = {'"': '"', "\\": "\\", "n": "\n", "r": "\r", "t": "\t"}


class _Literals:
    """Finds which of a set of lower-case literals occur in a lower-cased text."""

    def __init__(self, literals: Iterable[str], use_automaton: bool = True):
        self.literals = tuple(literals)
        self._automaton = None
        if ahocorasick is not None and use_automaton:
            self._automaton = ahocorasick.Automaton()
            for literal in self.literals:
                self._automaton.add_word(literal, literal)
            self._automaton.make_automaton()

    def present(self, lower: str) -> set[str]:
        if self._automaton is None:
            return {n for n in self.literals if n in lower}
        return {n for _, n in self._automaton.iter(lower)}


class Scrubber:
    """Finds and redacts secrets in lessons; built once from the ``[secrets]`` settings.

    ``actions``: kind -> "redact" | "exclude" (kinds not named are redacted); ``secret_paths``:
    fnmatch patterns of secret-by-nature files; ``entropy_limit`` / ``hex_limit``: Shannon entropy
    in bits per character above which a quoted base64 string of ``min_entropy_len`` characters or
    more / a quoted hex string of ``hex_min_len`` or more is a secret. The hex check is off by
    default (``hex_limit=0``; detect-secrets uses 3.0): in code, quoted hex strings are hash digests
    and test vectors far more often than keys, and a hex key assigned to a secret-named variable is
    still found by the keyword check. ``use_automaton=False`` forces the pure-Python gate (the same
    answers, slower; it is also used when pyahocorasick is not installed).
    """

    def __init__(self, actions: dict[str, str] | None = None, secret_paths: Iterable[str] = DEFAULT_SECRET_PATHS,
                 entropy_limit: float = 4.5, hex_limit: float = 0.0, min_entropy_len: int = 20,
                 hex_min_len: int = 32, *, use_automaton: bool = True):
        self.actions = check_actions(actions or {})
        self.secret_paths = tuple(secret_paths)
        if not 0 < entropy_limit <= 8 or not 0 <= hex_limit <= 8:
            raise SecretsConfigError("[secrets] entropy limits must be between 0 and 8 bits per character")
        if min_entropy_len < 8 or hex_min_len < 8:
            raise SecretsConfigError("[secrets] entropy minimum lengths must be at least 8 characters")
        self._base64 = Base64HighEntropyString(entropy_limit)
        self._hex = HexHighEntropyString(hex_limit) if hex_limit else None
        self._min_len = min_entropy_len
        self._hex_min_len = hex_min_len
        shortest = min(min_entropy_len, hex_min_len)
        self._quoted_bytes = re.compile(rb"q[ab]{%d,}" % shortest)
        self._quoted_flat = b"q" + b"a" * shortest  # the same test on FLAT_CLASSES, as a substring
        self._quoted_run = re.compile(r"[\"'][A-Za-z0-9+/=_\-]{%d,}" % shortest)
        self._path_needles = tuple(sorted({_literal(p).lower() for p in self.secret_paths}))
        names = [fnmatch.translate(p) for p in self.secret_paths if "/" not in p]
        paths = [fnmatch.translate(f) for p in self.secret_paths if "/" in p for f in (p, "*/" + p)]
        self._name_pattern = re.compile("|".join(names) or "(?!)")
        self._path_pattern = re.compile("|".join(paths) or "(?!)")
        gate_needles = _minimal(BASE_NEEDLES + self._path_needles)
        self._literals = _Literals(dict.fromkeys(gate_needles + tuple(TOKEN_LITERALS) + HEADER_NEEDLES), use_automaton)
        # each path literal with the gate literal it holds: it is searched for only when that one is there
        self._path_covers = tuple((n, next(m for m in gate_needles if m in n)) for n in self._path_needles)

    # -- public API ---------------------------------------------------------------------------------

    def scrub_messages(self, messages: list[dict[str, Any]]) -> Scrubbed:
        """Redact every message's content and tool call arguments (the input is not modified;
        messages without findings are returned as the same objects)."""
        units = self._message_units(messages)
        tags = set().union(*(self.gate(u.text) for u in units)) if units else set()
        if any(u.key and _field_kind(u.key) for u in units):
            tags.add(WORDS)  # a secret-named argument: its name is not in the text the gate saw
        if not tags:
            return Scrubbed(messages, [], False)
        self._scan(units, tags)
        out, found = _apply_messages(messages, units)
        findings = [f for f, _ in found]
        return Scrubbed(out, findings, self._excluded(findings))

    def scrub_text(self, text: str) -> tuple[str, list[str]]:
        """Redact one text; the kinds found, one per distinct secret.

        A JSON object or array (a raw log line) is decoded, its strings are redacted (with the
        secret-file rule for ``tool_call``/``tool_output`` pairs and role messages) and re-encoded;
        the text itself is returned when nothing was found. Other text is scanned as it is.
        """
        original, obj = text, _json_container(text)
        if obj is None and "\\" in text:
            text = _decoded(text)  # broken JSON (a reject): scanned as the agent wrote it, escapes decoded
        tags = self.gate(text)
        if not tags:
            return original, []
        root = obj if obj is not None else [text]
        units = self._raw_units(obj) if obj is not None else [_Unit(text, (0,), "raw", -1)]
        self._scan(units, tags)
        found = _apply_paths(root, units)
        if not found:
            return original, []
        return (orjson.dumps(obj).decode() if obj is not None else root[0]), [f.kind for f, _ in found]

    def scrub_prefix(self, text: str, limit: int) -> tuple[str, list[str]]:
        """Redact ``text`` whole, then cut it to ``limit`` characters (for a reject's prefix): a secret
        that the cut would break is redacted before the cut, so no part of it survives."""
        scrubbed, kinds = self.scrub_text(text)
        return scrubbed[:limit], kinds

    def scrub_lesson(self, raw: str, messages: list[dict[str, Any]], tags: set[str] | None = None) -> ScrubbedLesson:
        """Redact a parsed line's raw text and canonical messages together: one gate on ``raw`` (a
        clean line costs nothing more), and a value found in either is redacted in both.
        ``tags``: what :meth:`gate` answered for ``raw``, when the caller already asked it."""
        tags = self.gate(raw) if tags is None else tags
        if not tags:
            return ScrubbedLesson(raw, messages, [], False)
        obj = _json_container(raw)
        root = obj if obj is not None else [raw]
        m_units = self._message_units(messages)
        r_units = self._raw_units(obj) if obj is not None else [_Unit(raw, (0,), "raw", -1)]
        self._scan(m_units + r_units, tags)
        out, m_found = _apply_messages(messages, m_units)
        r_found = _apply_paths(root, r_units)
        new_raw = raw if not r_found else orjson.dumps(obj).decode() if obj is not None else root[0]
        seen = {value for _, value in m_found}
        findings = [f for f, _ in m_found]
        findings += [Finding(f.kind, "raw", -1) for f, value in r_found if value not in seen]
        return ScrubbedLesson(new_raw, out, findings, self._excluded(findings))

    def gate(self, text: str) -> set[str]:
        """Which detectors have a candidate in ``text`` (tags); empty: nothing in it can be a secret.

        Each check is a cheap superset of what its detectors need (a literal, and a confirmation
        near it), written so that it also holds on a raw JSON line for every string in it.
        """
        lower = text.lower()
        present = self._literals.present(lower)
        if "\\u" in present or "\\/" in present:  # a literal written with JSON escapes is still that literal
            decoded = _unescaped(text)
            if decoded != text:
                text, lower = decoded, decoded.lower()
                present = self._literals.present(lower)
        tags = set()
        if present and any(form in text for n in present & TOKEN_LITERALS.keys() for form in TOKEN_LITERALS[n]):
            tags.add(RUNS)
        if ("'" in text or '"' in text) and self._quoted_candidate(text, lower):
            tags.add(QUOTED)
        if "sig=" in present and "sv=" in lower:
            tags.add(KEYS)  # an Azure shared access signature
        if not present:
            return tags
        words = [w for w in SECRET_WORDS if w in present]
        if words and _word_candidate(text, lower, words):
            tags.add(WORDS)
        if "key" in present and ("private key" in lower or "putty-user-key" in lower or "accountkey" in lower
                                 or "sharedaccesskey" in lower):
            tags.add(KEYS)
        if any(n in present for n in HEADER_NEEDLES):
            tags.add(HEADERS)
        if ("twilio" in present or "azure" in present
                or (("aws" in present or "secret" in present) and AWS_SECRET_LOOSE.search(text))):
            tags.add(CONTEXT)
        if "token" in present and "_authtoken=" in lower:
            tags.add(NPM_TAG)
        if "://" in present and (("@" in text and (URL_CREDENTIALS.search(text) or next(BASIC_AUTH.spans(text), None)))
                                 or "hooks.slack.com" in lower):
            tags.add(URL)
        if ((any(n in present for n in CLI_NEEDLES) or ("pass" in present and any(n in lower for n in PASS_CLI_NEEDLES)))
                and _cli_tool_hits(text, lower, any_value=True)):
            tags.add(CLI)
        if self._file_candidate(text, lower, present):
            tags.add(FILES)
        return tags

    def _quoted_candidate(self, text: str, lower: str) -> bool:
        """A quoted run long and random enough for the entropy plugins, or for AWS's secret key."""
        encoded = text.encode("utf-8", "surrogatepass")
        if len(encoded) == len(text):
            if self._quoted_flat not in encoded.translate(FLAT_CLASSES):
                return False  # no quote followed by a long enough run: one substring search decides
            classes = encoded.translate(CLASSES)
            runs = (text[m.start() + 1:m.end()] for m in self._quoted_bytes.finditer(classes))
        else:
            runs = (m.group()[1:] for m in self._quoted_run.finditer(text))
        aws = "aws" in lower
        for run in runs:
            if (aws and len(run) >= 40) or (len(run) >= self._min_len and _entropy(self._base64, run) > self._base64.entropy_limit):
                return True
            if self._hex and len(run) >= self._hex_min_len and _entropy(self._hex, run) > self._hex.entropy_limit:
                return True
        return False

    def _file_candidate(self, text: str, lower: str, present: list[str]) -> bool:
        """A secret-by-nature path named somewhere, or an environment dump command."""
        if "env" in present and ("printenv" in lower or any(_env_word_at(lower, pos) for pos in _occurrences(lower, "env"))):
            return True
        for needle, cover in self._path_covers:
            if cover in present and needle in lower:
                for pos in _occurrences(lower, needle):
                    if self.is_secret_path(_token_at(text, pos)):
                        return True
        return False

    def is_secret_path(self, path: str) -> bool:
        """True when ``path`` names a secret-by-nature file (``secret_paths``)."""
        path = path.strip().rstrip("/")
        if not path or path in NOT_FILES:
            return False
        return bool(self._name_pattern.match(path.rsplit("/", 1)[-1]) or self._path_pattern.match(path))

    # -- units: the strings to scan, with what their calls tell ------------------------------------

    def _message_units(self, messages: list[dict[str, Any]]) -> list[_Unit]:
        units = []
        contexts = _LazyContexts(self, messages)
        for i, m in enumerate(messages):
            role = m.get("role", "")
            if isinstance(m.get("content"), str):
                context = contexts.get(i) if role == "tool" else _Context()
                units.append(_Unit(m["content"], (i, "content"), role, i, role == "tool", context))
            for j, call in enumerate(m.get("tool_calls") or ()):
                if isinstance(call, dict):
                    units += _leaf_units(call.get("arguments"), (i, "tool_calls", j, "arguments"), "tool_calls", i)
        return units

    def _raw_units(self, obj: Any) -> list[_Unit]:
        units: list[_Unit] = []
        self._visit(obj, (), None, None, units)
        return units

    def _visit(self, node: Any, path: tuple, key: str | None, ctx: Any, units: list[_Unit]) -> None:
        """Collect a decoded line's strings; ``ctx`` (a context or a lazy one) marks a tool output."""
        if isinstance(node, str):
            units.append(_Unit(node, path, "raw", -1, ctx is not None, ctx if ctx is not None else _Context(), key))
        elif isinstance(node, dict):
            call = node.get("tool_call")
            for k, v in node.items():
                sub = None
                if k == "tool_output" and isinstance(call, str):
                    sub = _LazyCall(self, call)
                elif k == "content" and ctx is not None:
                    sub = ctx
                self._visit(v, path + (k,), k if isinstance(k, str) else None, sub, units)
        elif isinstance(node, list):
            contexts = _LazyContexts(self, node) if _is_message_list(node) else None
            for i, v in enumerate(node):
                sub = contexts.get(i) if contexts and isinstance(v, dict) and v.get("role") == "tool" else None
                self._visit(v, path + (i,), key, sub, units)

    def tool_contexts(self, messages: list) -> dict[int, _Context]:
        """Pair each tool message with the call that produced it: the preceding assistant message's
        calls in order; outputs beyond them belong to its plan, judged by the plan's text."""
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
                out[i] = self.call_context(*call) if call else _Context()
        return out

    def call_context(self, name: str | None, args: list[str]) -> _Context:
        """What a call tells about its output: a secret file?, the file type, a lock file?"""
        first = [t for t in PATH_SPLIT.split(args[0][:500]) if t] if args else []
        typed = next((t for t in first if determine_file_type(t) is not FileType.OTHER), "")
        filetype = determine_file_type(typed) if typed else FileType.OTHER
        lock = any(heuristic.is_lock_file(t) for t in first)
        secret = name not in NO_CONTENT_TOOLS and any(self._reads_secret(a) for a in args)
        return _Context(secret, filetype, lock)

    def _reads_secret(self, arg: str) -> bool:
        lower = arg.lower()
        if "env" in lower and ENV_DUMP.search(arg.strip()):
            return True
        if not any(n in lower for n in self._path_needles):
            return False
        return any(self.is_secret_path(t) for t in PATH_SPLIT.split(arg) if t)

    # -- scanning ---------------------------------------------------------------------------------------

    def _scan(self, units: list[_Unit], tags: set[str]) -> None:
        """Mark secret-file outputs, find hits in every other unit (each distinct text once), then
        redact values found once wherever else they appear."""
        if FILES in tags:
            for u in units:
                u.secret_file = u.tool_output and u.context.secret_file
            _share_secret_files(units)
        strong: dict[str, str] = {}  # distinctive values: redacted in every unit
        weak: dict[str, str] = {}  # any other value found: redacted in the raw line's copies too
        found: dict[tuple[str, bool], list[_Hit]] = {}
        for u in units:
            if u.secret_file:
                inner = _Unit(u.text, (), u.field, u.turn, True,
                              _Context(filetype=u.context.filetype if u.context.filetype is not FileType.OTHER
                                       else FileType.CONFIG))
                hits = self._find(inner, self.gate(u.text))
            else:
                cached = found.get((u.text, u.tool_output))
                if cached is None:
                    cached = found[(u.text, u.tool_output)] = self._find(u, tags)
                u.hits = hits = cached + (_field_hits(u.key, u.text) if u.key and WORDS in tags else [])
            for h in hits:
                value = u.text[h.start:h.end]
                if h.kind != "secret-file" and len(value) >= MIN_VALUE:
                    (strong if _propagates(value) else weak).setdefault(value, h.kind)
        for values, raw_only in ((strong, False), ({**weak, **strong}, True)):
            if values:
                regex = re.compile("|".join(re.escape(v) for v in sorted(values, key=len, reverse=True)))
                for u in units:
                    if not u.secret_file and (u.field == "raw") == raw_only:
                        u.hits = u.hits + [_Hit(m.start(), m.end(), values[m.group()]) for m in regex.finditer(u.text)]

    def _find(self, u: _Unit, tags: set[str]) -> list[_Hit]:
        """Run the detectors that the gate's tags call for on one unit."""
        text = u.text
        lower = text.lower()
        hits: list[_Hit] = []
        if RUNS in tags or QUOTED in tags:
            classes = text.encode("utf-8", "surrogatepass").translate(CLASSES)
            if RUNS in tags and b"a" * TOKEN_RUN in classes:
                hits += _token_hits(text, classes)
            if QUOTED in tags and b"q" in classes:
                hits += self._quoted_hits(u, text, lower)
        if KEYS in tags:
            hits += _plugin_hits(AZURE, text, lower) + _private_key_hits(text, lower) + _azure_hits(text, lower)
        if HEADERS in tags:
            hits += _header_hits(text, lower)
        if CONTEXT in tags:
            hits += _context_hits(text, lower)
        if NPM_TAG in tags:
            hits += _plugin_hits(NPM, text, lower)
        if URL in tags and "://" in text:
            hits += _url_hits(text, lower)
        if WORDS in tags:
            words = [n for n in SECRET_WORDS if n in lower]
            if words:
                hits += _keyword_hits(text, lower, words, lambda: u.context.filetype)
                hits += _assignment_hits(text, lower, words)
        if CLI in tags:
            hits += _cli_tool_hits(text, lower)
        if FILES in tags and u.tool_output:
            hits += self._grep_hits(text, lower)
        return hits

    def _quoted_hits(self, u: _Unit, text: str, lower: str) -> list[_Hit]:
        hits = list(_plugin_hits(AWS, text, lower, needles=("aws",), regexes=(1,)))
        if u.context.lock_file:
            return hits  # detect-secrets skips lock files: their hashes are high-entropy by design
        for m in self._quoted_run.finditer(text):
            for plugin, min_len in ((self._base64, self._min_len), (self._hex, self._hex_min_len)):
                pm = plugin.regex.match(text, m.start()) if plugin else None
                if pm and len(pm.group(2)) >= min_len and _entropy_ok(plugin, pm.group(2), _line_at(text, m.start())):
                    hits.append(_Hit(pm.start(2), pm.end(2), "high-entropy"))
                    break
        return hits

    def _grep_hits(self, text: str, lower: str) -> list[_Hit]:
        """``path:line:content`` results (grep -rn) whose path is a secret file: the content goes."""
        hits = []
        for start, end in _windows(text, lower, [n for n in self._path_needles if n in lower], 1 << 30, 1 << 30):
            line = text[start:end]
            path, sep, rest = line.partition(":")
            if sep and path and not any(c.isspace() for c in path) and self.is_secret_path(path):
                number = re.match(r"\d+[:-]", rest)
                skip = len(path) + 1 + (number.end() if number else 0)
                if skip < len(line):
                    hits.append(_Hit(start + skip, end, "secret-file"))
        return hits

    def _excluded(self, findings: list[Finding]) -> bool:
        return any(self.actions.get(f.kind, "redact") == "exclude" for f in findings)


class _LazyCall:
    """The context of a local-ai-coder ``{"tool_call", "tool_output"}`` pair, parsed when first used."""

    def __init__(self, scrubber: Scrubber, call: str):
        self._scrubber, self._call, self._value = scrubber, call, None

    def __getattr__(self, name: str) -> Any:
        if self._value is None:
            self._value = self._scrubber.call_context(*_parse_call(self._call))
        return getattr(self._value, name)


class _LazyContexts:
    """Tool message contexts of a message list, paired only when a unit first needs one."""

    def __init__(self, scrubber: Scrubber, messages: list):
        self._scrubber, self._messages, self._value = scrubber, messages, None

    def get(self, i: int) -> Any:
        return _LazyItem(self, i)

    def resolve(self, i: int) -> _Context:
        if self._value is None:
            self._value = self._scrubber.tool_contexts(self._messages)
        return self._value.get(i, _Context())


class _LazyItem:
    def __init__(self, contexts: _LazyContexts, i: int):
        self._contexts, self._i = contexts, i

    def __getattr__(self, name: str) -> Any:
        return getattr(self._contexts.resolve(self._i), name)


def check_actions(actions: dict[str, str]) -> dict[str, str]:
    """Validate ``[secrets] actions`` (kind -> redact | exclude); raise SecretsConfigError."""
    for kind, action in actions.items():
        if kind not in KINDS:
            raise SecretsConfigError(f"[secrets] actions: unknown kind {kind!r}; kinds are {', '.join(KINDS)}")
        if action not in ACTIONS:
            raise SecretsConfigError(f"[secrets] actions: {kind} = {action!r}, expected redact or exclude")
    return dict(actions)


# -- detectors: text in, hits out ----------------------------------------------------------------------


def _plugin_hits(p: _Plugin, text: str, lower: str, needles: tuple[str, ...] | None = None,
                 regexes: tuple[int, ...] | None = None) -> list[_Hit]:
    """A plugin's matches when one of its literals is in the text (``regexes``: only those patterns)."""
    if not any(n in lower for n in (needles or p.needles)):
        return []
    hits = []
    for i, regex in enumerate(p.plugin.denylist):
        if regexes is None or i in regexes:
            group = p.groups[i] if i < len(p.groups) else 0
            hits += [_Hit(*m.span(group), p.kind) for m in regex.finditer(text) if m.group(group)]
    return hits


def _token_hits(text: str, classes: bytes) -> list[_Hit]:
    """Tokens: each lives in a long run of token characters; the plugins run only if a run (with
    the three characters before it) holds one of their literals."""
    joined = " ".join(_runs(text, classes))
    if not TOKEN_HINT.search(joined):
        return []
    hits = []
    for p in TOKEN_PLUGINS:
        hay = joined.lower() if p.ignore_case else joined
        if any(n in hay for n in p.needles):
            hits += [_Hit(s, TOKEN_TAIL.match(text, e).end(), p.kind) for s, e in p.spans(text)
                     if p is not AWS or _delimited(text, s, e)]
    for shape in TOKEN_SHAPES:
        if any(n in joined for n in shape.needles):
            hits += [_Hit(m.start(), m.end(), shape.kind) for m in shape.regex.finditer(text)
                     if shape.check is None or shape.check(m.group())]
    if "eyJ" in joined:
        hits += _jwt_hits(text)
    return hits


def _runs(text: str, classes: bytes) -> list[str]:
    """The runs of TOKEN_RUN token characters or more, each with the three characters before it."""
    if len(classes) == len(text):
        spans = [m.span() for m in RUN_BYTES.finditer(classes)]
    else:
        spans = [m.span() for m in RUN_CHARS.finditer(text)]
    return [text[max(0, s - 3):e] for s, e in spans]


def _word_candidate(text: str, lower: str, words: list[str]) -> bool:
    """A secret word where a detector could use it: a keyword of detect-secrets' list, an upper-case
    shell name followed by ``=``, a ``-flag``, or a JSON field name."""
    for word in words:
        for pos in _occurrences(lower, word):
            if KEYWORD.search(lower, max(0, pos - 12), pos + len(word) + 12):
                return True
            if text[pos].isupper() and ENV_NAME_AT.match(text, _name_start(text, pos)):
                return True
            if text.rfind("-", max(0, pos - 64), pos) >= 0 and WORD_BEFORE.search(text, max(0, pos - 64), pos).group()[:1] == "-":
                return True
            after = FIELD_AFTER.match(lower, pos)
            if after and _field_kind(text[pos - len(WORD_BEFORE.search(text, max(0, pos - 64), pos).group()):
                                          after.end()].rstrip(' :"\\')):
                return True
    return False


def _delimited(text: str, start: int, end: int) -> bool:
    """An AWS key id stands alone: no letter or digit right before or after it (not inside a DNA
    sequence or a longer identifier, where detect-secrets' pattern also matches)."""
    return not ((start > 0 and text[start - 1].isalnum()) or (end < len(text) and text[end].isalnum()))


def _jwt_hits(text: str) -> list[_Hit]:
    """detect-secrets' JWT pattern and validity check; the match is extended over the signature."""
    hits = []
    for regex in JWT.denylist:
        for m in regex.finditer(text):
            if JWT.is_formally_valid(m.group()):
                end = JWT_SIGNATURE.match(text, m.end()).end() if m.group().endswith(".") else m.end()
                hits.append(_Hit(m.start(), end, "jwt"))
    return hits


def _private_key_hits(text: str, lower: str) -> list[_Hit]:
    """The whole key block, from detect-secrets' BEGIN line to its END line (or the end of the text)."""
    if "private key" not in lower and "putty-user-key" not in lower:
        return []
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
            stop = end.end() if end else len(text)
            if not KEY_BODY.search(text, m.end(), min(stop, m.end() + 400)):
                continue  # a marker string in code ("-----BEGIN RSA PRIVATE KEY-----" markers), no key
            hits.append(_Hit(start, stop, "private-key"))
    return hits


def _url_hits(text: str, lower: str) -> list[_Hit]:
    """Passwords in URLs: detect-secrets' basic-auth pattern (RFC 3986 characters only) and lacd's
    lenient one (``postgres://app:pa55!word@db``: unencoded characters that drivers accept);
    placeholders (``user:password@host``) and templates (``{token}``) are not secrets."""
    hits = []
    if "@" in text:
        spans = [m.span(1) for m in URL_CREDENTIALS.finditer(text)] + list(BASIC_AUTH.spans(text))
        hits = [_Hit(s, e, "password-in-url") for s, e in spans if _value_ok(text[s:e])]
    if "hooks.slack.com" in lower:
        hits += _plugin_hits(SLACK, text, lower, needles=("hooks.slack.com",), regexes=(1,))
    return hits


def _header_hits(text: str, lower: str) -> list[_Hit]:
    """``Authorization: Basic <base64 of user:password>``, ``Bearer <token>``, ``Authorization: token
    <token>`` and API key headers (``X-Api-Key: ...``, ``PRIVATE-TOKEN: ...``): the credential."""
    hits = []
    if "basic" in lower:
        hits += [_Hit(*m.span(1), "auth-header") for m in BASIC_HEADER.finditer(text) if _basic_credentials(m.group(1))]
    if "bearer" in lower or "authoriz" in lower:
        hits += [_Hit(*m.span(1), "auth-header") for m in BEARER_HEADER.finditer(text) if _opaque_ok(m.group(1))]
    if any(n in lower for n in KEY_HEADER_NAMES):
        hits += [_Hit(*m.span(1), "auth-header") for m in KEY_HEADER.finditer(text) if _opaque_ok(m.group(1))]
    return hits


def _basic_credentials(value: str) -> bool:
    """Is ``value`` base64 of ``user:password`` (printable text with a colon after a user name)?"""
    try:
        decoded = base64.b64decode(value + "=" * (-len(value) % 4), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return False
    return decoded.isprintable() and decoded.find(":") >= 1 and len(decoded) > decoded.find(":") + 1


def _opaque_ok(value: str) -> bool:
    """A header's token: letters and digits (not a word, a template or a placeholder)."""
    return (any(c.isdigit() for c in value) and any(c.isalpha() for c in value)
            and _value_ok(value, "secret-assignment"))


def _azure_hits(text: str, lower: str) -> list[_Hit]:
    """Azure connection strings' ``SharedAccessKey=`` / ``AccountKey=`` (any length; detect-secrets'
    plugin wants exactly 88 characters) and a shared access signature's ``sig=``."""
    hits = []
    if "accountkey" in lower or "sharedaccesskey" in lower:
        hits += [_Hit(*m.span(1), "azure-storage-key") for m in AZURE_SHARED_KEY.finditer(text)]
    if "sig=" in lower and "sv=" in lower:
        hits += [_Hit(*m.span(1), "azure-storage-key") for m in AZURE_SAS.finditer(text)]
    return hits


def _context_hits(text: str, lower: str) -> list[_Hit]:
    """Shapes with no literal, taken for secrets only within CONTEXT_REACH characters of their
    service's name: an AWS secret access key (40 base64 characters, mixed case and digits; near "aws"
    or "secret"), Twilio
    SIDs (detect-secrets' plugin) and auth tokens (32 hex), an Azure storage key (86 + ``==``)."""
    hits = []
    for word, find in (("aws", _aws_secrets), ("secret", _aws_secrets), ("twilio", _twilio_keys), ("azure", _azure_keys)):
        if word in lower:
            for start, end in _reach(lower, word):
                hits += find(text, start, end)
    return hits


def _reach(lower: str, word: str) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    for pos in _occurrences(lower, word):
        s, e = max(0, pos - CONTEXT_REACH), pos + len(word) + CONTEXT_REACH
        if spans and s <= spans[-1][1]:
            spans[-1] = (spans[-1][0], e)
        else:
            spans.append((s, e))
    return spans


def _aws_secrets(text: str, start: int, end: int) -> list[_Hit]:
    return [_Hit(*m.span(), "aws-access-key") for m in AWS_SECRET.finditer(text, start, end)
            if _random_token(m.group())]


def _twilio_keys(text: str, start: int, end: int) -> list[_Hit]:
    hits = [_Hit(*m.span(), "twilio-key") for regex in TWILIO.denylist for m in regex.finditer(text, start, end)
            if _delimited(text, *m.span())]
    return hits + [_Hit(*m.span(), "twilio-key") for m in TWILIO_TOKEN.finditer(text, start, end)
                   if len(set(m.group())) >= 10]


def _azure_keys(text: str, start: int, end: int) -> list[_Hit]:
    return [_Hit(*m.span(), "azure-storage-key") for m in AZURE_KEY.finditer(text, start, end)
            if _random_token(m.group())]


def _random_token(value: str) -> bool:
    """Upper case, lower case and digits, and the entropy of a random string (not a path or a word run)."""
    return (any(c.isdigit() for c in value) and _mixed_case(value) and value.count("/") <= len(value) // 8
            and BASE64_ENTROPY.calculate_shannon_entropy(value) > 4.2)


def _keyword_hits(text: str, lower: str, words: list[str], filetype: Callable[[], FileType]) -> list[_Hit]:
    """detect-secrets' keyword patterns (those for the file type, else quotes required), run near
    each keyword of its DENYLIST; ``filetype`` is asked only when there is such a keyword."""
    confirmed = [n for n in words if n in ("key", "pass", "pwd", "secret")]
    windows = _windows(text, lower, confirmed, 120, 400, confirm=KEYWORD)
    if not windows:
        return []
    table = REGEX_BY_FILETYPE.get(filetype(), QUOTES_REQUIRED_DENYLIST_REGEX_TO_GROUP)
    quotes = table is QUOTES_REQUIRED_DENYLIST_REGEX_TO_GROUP
    hits = []
    for start, end in windows:
        window = text[start:end]
        if quotes and "'" not in window and '"' not in window and "`" not in window:
            continue
        for regex, group in table.items():
            for m in regex.finditer(window):
                value = m.group(group)
                if value and _keyword_value_ok(value, window[m.start():]):
                    kind = "password" if PASSWORDISH.search(window[m.start():m.start(group)]) else "secret-assignment"
                    hits.append(_Hit(start + m.start(group), _extend(text, start + m.end(group), end), kind))
    return hits


def _assignment_hits(text: str, lower: str, words: list[str]) -> list[_Hit]:
    """Shell and .env assignments (``DB_PASSWORD=X``) and command-line flags (``--password=X``)."""
    hits = []
    for word in words:
        pos = lower.find(word)
        while pos >= 0:
            hits += _env_at(text, pos) + _flag_at(text, pos)
            pos = lower.find(word, pos + 1)
    return hits


def _env_at(text: str, pos: int) -> list[_Hit]:
    """``NAME=value`` where NAME, an upper-case shell name holding the word at ``pos``, names a secret."""
    if not text[pos].isupper():
        return []
    start = _name_start(text, pos)
    if start > 0 and text[start - 1] not in ENV_BEFORE and text[start - 2:start] not in ("\\n", "\\t"):
        return []  # (an escaped newline before the name: JSON text scanned as it is)
    m = ENV_ASSIGN.match(text, start)
    if not m or m.end(1) < pos or not _secret_name(m.group(1)) or not _value_ok(m.group(2), _name_kind(m.group(1))):
        return []
    s, e = _unquoted_span(m, 2)
    return [_Hit(s, e, _name_kind(m.group(1)))]


def _flag_at(text: str, pos: int) -> list[_Hit]:
    """``--password=X`` / ``--token X``: a flag holding the word at ``pos``, and its value."""
    if text.rfind("-", max(0, pos - 64), pos) < 0:
        return []
    start = pos - len(WORD_BEFORE.search(text, max(0, pos - 64), pos).group())
    if text[start] != "-" or (start > 0 and (text[start - 1].isalnum() or text[start - 1] in "_-")):
        return []
    m = CLI_FLAG.match(text, start)
    if not m or m.end(1) < pos or not FLAG_WORDS.search(m.group(1)):
        return []
    flag = m.group(1).lower()
    kind = "password" if PASSWORDISH.search(flag) else "secret-assignment"
    if flag.endswith(FLAG_NOT_VALUE) or m.group(2).startswith("-") or not _value_ok(m.group(2), kind):
        return []
    if text[m.end(1)] != "=" and m.group(2).isalpha() and m.group(2).islower():
        return []  # "the --password option": prose, not a command line
    s, e = _unquoted_span(m, 2)
    return [_Hit(s, e, kind)]


def _cli_tool_hits(text: str, lower: str, any_value: bool = False) -> list[_Hit]:
    """``mysql -pX``, ``sshpass -p X``, ``redis-cli -a X``, ``curl -u user:X`` (``any_value``: also
    values the filters would drop; the gate's superset)."""
    hits = []
    for words, regex in CLI_TOOLS:
        for start, end in _windows(text, lower, words, 0, 1 << 30):
            for m in regex.finditer(text, start, end):
                if any_value or _value_ok(m.group(1)):
                    hits.append(_Hit(*_unquoted_span(m, 1), "password"))
    return hits


def _field_hits(key: str, value: str) -> list[_Hit]:
    """A JSON field whose name names a secret (tool call arguments): its whole value."""
    kind = _field_kind(key)
    if kind and "\n" not in value and _value_ok(value, kind):
        return [_Hit(0, len(value), kind)]
    return []


@functools.lru_cache(maxsize=1024)
def _field_kind(key: str) -> str | None:
    """The kind of a JSON field named like a secret (``accessToken``, ``db-password``), else None."""
    name = CAMEL.sub(r"\1_\2", key).upper().replace("-", "_")
    return _name_kind(name) if _secret_name(name) else None


# -- filters -------------------------------------------------------------------------------------------


def _entropy(plugin: Any, value: str) -> float:
    """The plugin's Shannon entropy; -1 for a hex plugin and a value that is not hex, and for a
    value with too few distinct characters to pass the limit (entropy <= log2(distinct))."""
    if isinstance(plugin, HexHighEntropyString) and (value.strip(HEX_DIGITS) or value.isdigit()):
        return -1.0  # not hex, or a number
    if len(set(value)) <= 2 ** plugin.entropy_limit:
        return -1.0
    return plugin.calculate_shannon_entropy(value)


def _entropy_ok(plugin: Any, value: str, line: str) -> bool:
    """detect-secrets' entropy limit and heuristic filters; subresource-integrity hashes pass."""
    return (_entropy(plugin, value) > plugin.entropy_limit
            and not SRI_HASH.match(value)
            and not _alphabet_like(value)
            and not heuristic.is_sequential_string(value)
            and not heuristic.is_potential_uuid(value)
            and not heuristic.is_likely_id_string(value, line, plugin))


def _alphabet_like(value: str) -> bool:
    """An alphabet or character table ("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"), not a random string:
    it holds 8 characters in a row that follow each other in code point order."""
    run = 1
    for a, b in zip(value, value[1:]):
        run = run + 1 if ord(b) == ord(a) + 1 else 1
        if run >= 8:
            return True
    return False


def _keyword_value_ok(value: str, line: str) -> bool:
    """detect-secrets' heuristic filters for keyword findings (``line``: from the keyword on, so that
    ``conn = connect(password="x")`` is not taken for an indirect reference), plus lacd's: at least
    MIN_KEYWORD_VALUE characters, not an ARN, not a name that holds a secret word and no digit
    ("secretsmanager", "apiKeySource", "NEW_PASSWORD_REQUIRED"), not lower_snake_case words."""
    bare = value.strip().strip("'\"`")
    lower = bare.lower()
    if len(bare) < MIN_KEYWORD_VALUE or lower.startswith("arn:"):
        return False
    if not any(c.isdigit() for c in bare) and any(w in lower for w in ("secret", "pass", "pwd", "token", "key")):
        return False
    if SNAKE_WORDS.fullmatch(bare):
        return False  # "not_supported", "no_information": an enum value
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
    """Does an UPPER_SNAKE name name a secret (DB_PASSWORD, GH_TOKEN, STRIPE_API_KEY...)?"""
    parts = name.split("_")
    return (any(w in name for w in ("PASSWORD", "PASSWD", "PASSPHRASE", "SECRET"))
            or any(p in ("PASS", "PWD", "TOKEN", "APIKEY", "CREDENTIAL", "CREDENTIALS") for p in parts)
            or parts[-1].endswith("TOKEN")
            or (len(parts) > 1 and parts[-1] == "KEY" and parts[-2] not in (
                "PRIMARY", "FOREIGN", "SORT", "PARTITION", "CACHE", "HOT", "PUBLIC", "LICENSE")))


def _propagates(value: str) -> bool:
    """Is a found value distinctive enough to be redacted wherever else it appears? (8 characters or
    more, not a plain word: "hunter2x" is, "password" or "production" are not)."""
    return len(value) >= MIN_PROPAGATED and not value.isalpha()


def _name_kind(name: str) -> str:
    upper = name.upper()
    if "AWS" in upper and ("SECRET" in upper or "ACCESS_KEY" in upper):
        return "aws-access-key"
    return "password" if re.search("PASS|PWD", upper) else "secret-assignment"


# -- applying ------------------------------------------------------------------------------------------


def _apply_unit(u: _Unit, put: Callable[[str], None]) -> list[tuple[Finding, str]]:
    """Write the unit's redacted text through ``put``; its findings, each with its secret value."""
    if u.secret_file:
        put(_secret_file_output(u.text))
        return [(Finding("secret-file", u.field, u.turn), u.text)]
    if not u.hits:
        return []
    hits = _merge(u.hits)
    pieces, pos = [], 0
    for h in hits:
        pieces += [u.text[pos:h.start], f"<redacted:{h.kind}>"]
        pos = h.end
    put("".join(pieces) + u.text[pos:])
    seen: dict[tuple[str, str], Finding] = {}
    for h in hits:
        seen.setdefault((h.kind, u.text[h.start:h.end]), Finding(h.kind, u.field, u.turn))
    return [(f, value) for (_, value), f in seen.items()]


def _apply_messages(messages: list[dict], units: list[_Unit]) -> tuple[list[dict], list]:
    """Redacted copies of the messages that had findings (copy on write), the others as they are."""
    out = list(messages)
    copied: set[int] = set()
    found = []
    for u in units:
        def put(value: str, path: tuple = u.path) -> None:
            if path[0] not in copied:
                out[path[0]] = orjson.loads(orjson.dumps(messages[path[0]]))
                copied.add(path[0])
            _set_path(out[path[0]], path[1:], value)
        found += _apply_unit(u, put)
    return (out if copied else messages), found


def _apply_paths(root: Any, units: list[_Unit]) -> list:
    found = []
    for u in units:
        found += _apply_unit(u, lambda value, path=u.path: _set_path(root, path, value))
    return found


def _share_secret_files(units: list[_Unit]) -> None:
    """A tool output judged a secret file once (by its raw call pair or by the messages' pairing)
    is one wherever the same output appears."""
    texts = {u.text for u in units if u.secret_file}
    for u in units:
        u.secret_file = u.secret_file or (u.tool_output and u.text in texts)


def _merge(hits: list[_Hit]) -> list[_Hit]:
    """Overlapping hits become one, named by the most specific of their kinds."""
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


def _secret_file_output(text: str) -> str:
    m = WRAPPER.match(text)
    return f"<{m.group(1)}><redacted:secret-file></{m.group(1)}>" if m else "<redacted:secret-file>"


# -- helpers -------------------------------------------------------------------------------------------


def _windows(text: str, lower: str, needles: Iterable[str], before: int, after: int,
             confirm: re.Pattern | None = None) -> list[tuple[int, int]]:
    """Merged [start, end) windows around each needle occurrence in ``lower``, kept inside its line;
    with ``confirm``, only occurrences where that pattern matches within 12 characters around."""
    spans = []
    for needle in needles:
        pos = lower.find(needle)
        while pos >= 0:
            if confirm is None or confirm.search(lower, max(0, pos - 12), pos + len(needle) + 12):
                line_start = text.rfind("\n", 0, pos) + 1
                line_end = text.find("\n", pos)
                line_end = len(text) if line_end < 0 else line_end
                spans.append((max(line_start, pos - before), min(line_end, pos + len(needle) + after)))
            pos = lower.find(needle, pos + 1)
    spans.sort()
    merged: list[tuple[int, int]] = []
    for s, e in spans:
        if merged and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], e))
        else:
            merged.append((s, e))
    return merged


def _minimal(needles: Iterable[str]) -> tuple[str, ...]:
    """The needles that hold no other needle (when a needle is absent, any that holds it is too)."""
    unique = sorted(set(needles), key=len)
    return tuple(n for i, n in enumerate(unique) if not any(m in n for m in unique[:i]))


def _name_start(text: str, pos: int) -> int:
    """Where the upper-case shell name holding ``pos`` starts."""
    return pos - len(NAME_BEFORE.search(text, max(0, pos - 64), pos).group())


def _env_word_at(lower: str, pos: int) -> bool:
    """Is the "env" at ``pos`` a word of its own (the command), not part of a name or a path?"""
    before = lower[pos - 1] if pos else " "
    after = lower[pos + 3] if pos + 3 < len(lower) else " "
    return not (before.isalnum() or before in "_.$/-") and not (after.isalnum() or after in "_.=/-")


def _occurrences(hay: str, needle: str) -> Iterator[int]:
    pos = hay.find(needle)
    while pos >= 0:
        yield pos
        pos = hay.find(needle, pos + 1)


def _token_at(text: str, pos: int) -> str:
    """The path-like token around ``pos`` (split on quotes, spaces, separators, backslashes, colons)."""
    start = max(0, pos - 200)
    left = TOKEN_SPLIT.split(text[start:pos])[-1]
    right = TOKEN_SPLIT.split(text[pos:pos + 200], maxsplit=1)[0]
    return left + right


def _extend(text: str, end: int, window_end: int) -> int:
    """A value cut by its window's end runs on to the next quote, space or comma."""
    if end < window_end:
        return end
    while end < len(text) and text[end] not in " \t\r\n'\"`,":
        end += 1
    return end


def _unescaped(text: str) -> str:
    """``text`` with JSON's ``\\uXXXX`` and ``\\/`` escapes decoded (a surrogate stays escaped)."""
    return JSON_ESCAPE.sub(_unescape_one, text)


def _decoded(text: str) -> str:
    """Text that is not valid JSON (a broken line) with JSON's escapes decoded, twice over (a JSON
    string inside a JSON string: tool call arguments), so that ``password: \\"X\\"`` reads as code."""
    for _ in range(2):
        if "\\" not in text:
            break
        text = ANY_ESCAPE.sub(_decode_one, text)
    return text


def _decode_one(m: re.Match) -> str:
    return ESCAPED_CHARS[m.group(1)] if m.group(1) else _char(m.group(2), m.group())


def _unescape_one(m: re.Match) -> str:
    return m.group() if m.group(1) else _char(m.group(2), m.group())


def _char(hex_code: str | None, escape: str) -> str:
    """The character a ``\\uXXXX`` escape stands for (``/`` for ``\\/``); a control character or a
    surrogate stays escaped."""
    if hex_code is None:
        return "/"
    code = int(hex_code, 16)
    return chr(code) if code >= 0x20 and not 0xD800 <= code < 0xE000 else escape


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


def _literal(pattern: str) -> str:
    """The longest run of a glob without wildcards: a literal that every match holds."""
    literal = max(re.split(r"\[[^\]]*\]|[*?]", pattern), key=len)
    if not literal:
        raise SecretsConfigError(f"[secrets] paths: {pattern!r} has no literal part to look for; name the file")
    return literal


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


def _is_message_list(node: list) -> bool:
    return bool(node) and all(isinstance(m, dict) and "role" in m for m in node)


def _json_container(text: str) -> Any:
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, (dict, list)) else None
