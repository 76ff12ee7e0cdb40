"""Generated local-ai-coder log lines that teach the agent's tool protocol (lacd.protocol).

The generator writes lines in the exact shape the local-ai-coder agent appends to
agent_interactions.jsonl (see shared/fixtures/local-ai-coder/README.md):

* v1 ``{"user_prompt", "ai_responses", "tool_executions": [{"tool_call", "tool_output"}]}``: every
  ``<tool_code>`` block of a reply runs, outputs are ``<tool_output>`` or ``<tool_output_error>``,
  and the loop goes on until a reply has no call (so multi-step lines: call, output, call, output,
  summary);
* v2 ``{"user_message", ...}``: one model call per user turn, only the first block runs, failures
  are ``<tool_error>``, a larger tool set.

Each clean lesson maps the user's request to exactly one correct first call: every argument is
copied from the request (paths, patterns, text) or follows a fixed phrase table ("run the tests" is
always ``run_shell_command('npm test')``), so a small model can learn it. Tool outputs come from
small generated projects (JS and Python modules, tests, JSON configs, READMEs) and are consistent
with them: listings show the project's files, searches report the right line numbers.

``noise`` turns that fraction of lines into the defects the real log has, one defect per line, each
named by ``Sample.kind`` (see ``NOISE_KINDS`` and ``CURATION_REASON``).

Use ``generate_lessons`` (lines with their kind, prompt and calls), ``generate_lines`` (JSON text
only), ``write_log`` (stream to a file: tens of MB/s, constant memory) or
``python -m lacd.samples OUT.jsonl --size 1GB``.
"""

from __future__ import annotations

import argparse
import collections
import functools
import itertools
import json
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import structlog

from lacd import protocol
from lacd.protocol import TOOLS_V2, VERSIONS, ToolCall, format_call, parse_call, tool_code_blocks

log = structlog.get_logger(__name__)

NOISE_KINDS: dict[str, float] = {
    "empty_prompt": 1.0,       # the agent was re-prompted with an empty message
    "confirmation": 1.0,       # the user answered "y" to a question
    "no_reply": 1.0,           # every reply is empty
    "fabricated_output": 1.0,  # a reply writes its own <tool_output> after a call
    "unknown_tool": 1.0,       # the only call names a tool that does not exist
    "all_tools_failed": 1.0,   # every executed call failed
    "duplicate": 1.0,          # an exact copy of an earlier clean line
}
"""Noise kinds and their relative weights; ``garbage`` (invalid JSON) is added only on request."""

GARBAGE_WEIGHT = 0.2

CURATION_REASON: dict[str, str | None] = {
    "clean": None,
    "confirmation": None,
    "empty_prompt": "empty_prompt",
    "no_reply": "no_reply",
    "fabricated_output": "fabricated_output",
    "unknown_tool": "all_tools_failed",
    "all_tools_failed": "all_tools_failed",
    "duplicate": "duplicate",
    "garbage": "rejected",
}
"""What curation should decide for each kind (lacd.ingest.lessons reason names; garbage is rejected)."""


class SamplesError(ValueError):
    """A bad request to the generator (unknown version, no size limit...), with a readable message."""


# ---------------------------------------------------------------------------------------------
# Samples
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sample:
    """One generated log line with its kind ("clean" or a noise kind), request and executed calls."""

    line: str
    kind: str
    prompt: str = ""
    calls: tuple[ToolCall, ...] = ()


def generate_lines(
    n: int | None, seed: int = 0, *, noise: float = 0.0, version: str = "v1", garbage: bool = False, chat: float = 0.0
) -> Iterator[str]:
    """Yield ``n`` JSON log lines (no trailing newline); the same arguments give the same lines."""
    return (sample.line for sample in generate_lessons(n, seed, noise, version=version, garbage=garbage, chat=chat))


def generate_lessons(
    n: int | None, seed: int = 0, noise: float = 0.0, *, version: str = "v1", garbage: bool = False, chat: float = 0.0
) -> Iterator[Sample]:
    """Yield ``n`` Samples (endless when n is None).

    ``noise``: fraction of lines carrying one defect of NOISE_KINDS (plus rare invalid JSON when
    ``garbage``); ``chat``: fraction of clean lines that are plain answers without a tool call.
    """
    _check_args(noise, version, chat)  # here, so a bad argument fails at the call, not at the first line
    return _lessons(_Generator(_Random(seed), version, noise, garbage, chat), n)


def _lessons(gen: _Generator, n: int | None) -> Iterator[Sample]:
    count = 0
    while n is None or count < n:
        yield gen.next_sample()
        count += 1


def write_log(
    path: Path,
    n: int | None = None,
    size_bytes: int | None = None,
    seed: int = 0,
    noise: float = 0.0,
    version: str = "v1",
    *,
    garbage: bool = False,
    chat: float = 0.0,
) -> int:
    """Stream lines to ``path`` until ``n`` lines or ``size_bytes`` bytes are written; return the line count."""
    if n is None and size_bytes is None:
        raise SamplesError("give a number of lines or a size in bytes")
    if (n is not None and n < 0) or (size_bytes is not None and size_bytes < 0):
        raise SamplesError("the number of lines and the size must not be negative")
    source = generate_lines(n, seed, noise=noise, version=version, garbage=garbage, chat=chat)
    started, written, lines = time.perf_counter(), 0, 0
    limit = size_bytes if size_bytes is not None else float("inf")
    with open(path, "w", encoding="utf-8", newline="\n", buffering=1 << 20) as out:
        batch: list[str] = []
        for line in source:
            if written >= limit:
                break
            batch.append(line)
            written += (len(line) if line.isascii() else len(line.encode())) + 1
            lines += 1
            if len(batch) >= 512:
                out.write("\n".join(batch) + "\n")
                batch.clear()
        if batch:
            out.write("\n".join(batch) + "\n")
    seconds = time.perf_counter() - started
    log.debug("samples.written", path=str(path), lines=lines, bytes=written, seconds=round(seconds, 3))
    return lines


class _Random(random.Random):
    """random.Random with a cheaper choice(): the generator draws several per line."""

    def choice(self, seq):  # noqa: D102 - same contract as random.Random.choice
        return seq[int(self.random() * len(seq))]


def _check_args(noise: float, version: str, chat: float) -> None:
    if version not in VERSIONS:
        raise SamplesError(f"unknown agent version {version!r}; expected one of {', '.join(VERSIONS)}")
    if not 0.0 <= noise <= 1.0:
        raise SamplesError(f"noise must be a fraction between 0 and 1, got {noise}")
    if not 0.0 <= chat <= 1.0:
        raise SamplesError(f"chat must be a fraction between 0 and 1, got {chat}")


# ---------------------------------------------------------------------------------------------
# Vocabulary and file templates
# ---------------------------------------------------------------------------------------------

NOUNS = (
    "user", "order", "invoice", "cart", "session", "token", "payment", "report", "config", "cache",
    "logger", "router", "parser", "queue", "task", "item", "product", "message", "event", "account",
    "profile", "setting", "note", "todo", "comment", "post", "image", "email", "metric", "search",
    "price", "customer", "ticket", "booking", "schedule", "inventory", "shipment", "review", "rating",
    "tag", "category", "team", "project", "job", "upload", "webhook", "invite", "subscription",
    "address", "coupon", "refund", "warehouse", "course", "lesson", "playlist", "track", "device",
)
VERBS = (
    "get", "create", "update", "delete", "load", "save", "parse", "format", "validate", "build",
    "fetch", "send", "compute", "render", "handle", "check", "find", "list", "sync", "merge",
    "normalize", "serialize", "filter", "sort", "count", "resolve", "apply", "register", "export",
)
FIELDS = ("id", "name", "email", "status", "total", "createdAt", "title", "amount", "count", "owner", "label")
USERS = ("dev", "alice", "sam", "priya", "marco", "lena", "tom", "yuki", "omar", "ines")
NPM_PKGS = ("lodash", "express", "axios", "dayjs", "zod", "chalk", "commander", "uuid", "dotenv",
            "jest", "mocha", "nodemon", "cors", "helmet", "morgan", "yargs", "pino", "knex")
PIP_PKGS = ("requests", "numpy", "pydantic", "rich", "click", "httpx", "pandas", "flask", "fastapi",
            "sqlalchemy", "pytest", "pyyaml", "attrs", "typer", "tqdm")
TEXTS = ("hello", "hello world", "TODO: write docs", "Build passing", "version 2 notes", "draft",
         "Meeting notes for Monday", "temporary file", "Remember to update the changelog",
         "API key goes here", "first line", "Hello from the agent", "done", "It works!", "v1.0.0 release")
EXTS_LANG = {"js": "JavaScript", "py": "Python", "json": "JSON", "md": "Markdown", "css": "CSS",
             "html": "HTML", "txt": "text", "toml": "TOML", "ts": "TypeScript", "yml": "YAML"}

JS_FUNCS = (
    """function %(fn)s(%(arg)s) {
  if (!%(arg)s) {
    throw new Error('%(arg)s is required');
  }
  return %(arg)s.map((item) => ({ ...item, %(field)s: item.%(field)s ?? null }));
}
""",
    """async function %(fn)s(%(arg)sId) {
  const response = await fetch(`/api/%(nouns)s/${%(arg)sId}`);
  if (!response.ok) {
    throw new Error(`Failed to load %(noun)s ${%(arg)sId}: ${response.status}`);
  }
  return response.json();
}
""",
    """function %(fn)s(%(args)s, key = '%(field)s') {
  const result = {};
  for (const entry of %(args)s) {
    const bucket = entry[key];
    result[bucket] = result[bucket] || [];
    result[bucket].push(entry);
  }
  return result;
}
""",
    """const %(fn)s = (%(arg)s) => {
  const total = %(arg)s.items.reduce((sum, line) => sum + line.price * line.qty, 0);
  return Math.round(total * 100) / 100;
};
""",
    """function %(fn)s(%(arg)s) {
  return typeof %(arg)s.%(field)s === 'string' && %(arg)s.%(field)s.trim().length > 0;
}
""",
    """class %(Noun)sStore {
  constructor() {
    this.items = new Map();
  }

  add(%(arg)s) {
    this.items.set(%(arg)s.id, %(arg)s);
    return %(arg)s;
  }

  %(fn)s(id) {
    return this.items.get(id) || null;
  }

  get size() {
    return this.items.size;
  }
}
""",
    """async function %(fn)s(req, res) {
  try {
    const %(arg)s = await db.%(nouns)s.findById(req.params.id);
    if (!%(arg)s) {
      return res.status(404).json({ error: '%(Noun)s not found' });
    }
    res.json(%(arg)s);
  } catch (err) {
    logger.error(err);
    res.status(500).json({ error: 'Internal server error' });
  }
}
""",
    """function %(fn)s(%(arg)s, options = {}) {
  const { limit = 20, offset = 0 } = options;
  // TODO: support sorting by %(field)s
  return %(arg)s.slice(offset, offset + limit);
}
""",
)

PY_FUNCS = (
    '''def %(fn)s(%(arg)s):
    """Return the %(noun)s with missing fields filled in."""
    if %(arg)s is None:
        raise ValueError("%(arg)s is required")
    return {**%(arg)s, "%(field)s": %(arg)s.get("%(field)s")}
''',
    '''def %(fn)s(%(args)s, key="%(field)s"):
    groups = {}
    for entry in %(args)s:
        groups.setdefault(entry[key], []).append(entry)
    return groups
''',
    '''class %(Noun)sRepository:
    def __init__(self, db):
        self.db = db

    def %(fn)s(self, %(arg)s_id):
        row = self.db.execute("SELECT * FROM %(nouns)s WHERE id = ?", (%(arg)s_id,)).fetchone()
        return dict(row) if row else None
''',
    '''def %(fn)s(%(arg)s) -> float:
    total = sum(line["price"] * line["qty"] for line in %(arg)s["items"])
    return round(total, 2)
''',
    '''def %(fn)s(path):
    # TODO: handle missing files
    with open(path, encoding="utf-8") as handle:
        return [line.strip() for line in handle if line.strip()]
''',
    '''@dataclass
class %(Noun)s:
    id: int
    %(field_py)s: str
    active: bool = True

    def %(fn)s(self) -> dict:
        return asdict(self)
''',
    '''def %(fn)s(%(arg)s, limit=20, offset=0):
    """Return one page of %(nouns)s."""
    return %(arg)s[offset:offset + limit]
''',
)

CSS_TEMPLATE = """body {
  margin: 0;
  font-family: system-ui, sans-serif;
  color: #222;
}

.%(noun)s-list {
  display: grid;
  gap: 12px;
  padding: 16px;
}

.%(noun)s-card {
  border: 1px solid #ddd;
  border-radius: 8px;
  padding: 12px;
}
"""

HTML_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="UTF-8">
  <title>%(title)s</title>
  <link rel="stylesheet" href="style.css">
</head>
<body>
  <h1>%(title)s</h1>
  <div id="app" class="%(noun)s-list"></div>
  <script src="main.js"></script>
</body>
</html>
"""


VERB_DOC = {
    "get": "returns", "create": "creates", "update": "updates", "delete": "deletes", "load": "loads",
    "save": "saves", "parse": "parses", "format": "formats", "validate": "validates", "build": "builds",
    "fetch": "fetches", "send": "sends", "compute": "computes", "render": "renders", "handle": "handles",
    "check": "checks", "find": "finds", "list": "lists", "sync": "synchronises", "merge": "merges",
    "normalize": "normalizes", "serialize": "serializes", "filter": "filters", "sort": "sorts",
    "count": "counts", "resolve": "resolves", "apply": "applies", "register": "registers", "export": "exports",
}


def _plural(word: str) -> str:
    """English plural of a vocabulary noun (category -> categories, address -> addresses)."""
    if word.endswith("y") and word[-2:-1] not in "aeiou":
        return word[:-1] + "ies"
    if word.endswith(("s", "x", "ch", "sh")):
        return word + "es"
    return word + "s"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun if n == 1 else _plural(noun)}"


@functools.lru_cache(maxsize=4096)
def _explain(fn: str) -> str:
    """A one-line description of a generated function from its name (verb + object)."""
    words = re.sub(r"([A-Z])", r"_\1", fn).lower().split("_")
    verb, rest = words[0], " ".join(w for w in words[1:] if w)
    return f"{VERB_DOC.get(verb, verb)} the {rest or 'input'}"


def _camel(verb: str, noun: str) -> str:
    return verb + noun[0].upper() + noun[1:]


# ---------------------------------------------------------------------------------------------
# Generated projects
# ---------------------------------------------------------------------------------------------


@dataclass
class _File:
    path: str
    lang: str
    content: str
    funcs: list[str]
    about: str

    @property
    def lines(self) -> list[str]:
        return self.content.split("\n")


@dataclass
class _Project:
    name: str
    kind: str  # "node" or "python"
    root: str
    version: str
    runner: str  # jest or mocha (node), pytest (python)
    files: dict[str, _File] = field(default_factory=dict)
    dirs: dict[str, list[str]] = field(default_factory=dict)  # dir -> entry names ("x/" for dirs)
    by_dir: dict[str, list[_File]] = field(default_factory=dict)
    sources: list[_File] = field(default_factory=list)
    cache: dict[str, str] = field(default_factory=dict)  # outputs that never change (project context)

    def add(self, f: _File) -> None:
        self.files[f.path] = f
        self.by_dir.setdefault(f.path.rsplit("/", 1)[0] if "/" in f.path else ".", []).append(f)
        if f.lang in ("js", "py") and f.funcs:
            self.sources.append(f)
        parts = f.path.split("/")
        for i in range(len(parts)):
            parent = "/".join(parts[:i]) or "."
            entry = parts[i] + ("/" if i < len(parts) - 1 else "")
            entries = self.dirs.setdefault(parent, [])
            if entry not in entries:
                entries.append(entry)

    def listing(self, d: str) -> list[str]:
        return sorted(self.dirs.get(_norm_dir(d), []), key=lambda e: e.rstrip("/"))

    def in_dir(self, d: str) -> list[_File]:
        return self.by_dir.get(_norm_dir(d), [])

    def source_files(self) -> list[_File]:
        return self.sources


def _norm_dir(d: str) -> str:
    d = d.strip()
    while d.startswith("./"):
        d = d[2:]
    d = d.rstrip("/")
    return d or "."


class _ProjectMaker:
    """Builds small, consistent node and python projects from the vocabulary."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def make(self) -> _Project:
        r = self.rng
        a, b = r.sample(NOUNS, 2)
        kind = "node" if r.random() < 0.6 else "python"
        name = f"{a}-{b}" if kind == "node" else f"{a}_{b}"
        suffix = r.choice(("", "", "-api", "-service", "-app", "-cli", "-tools"))
        name = name + (suffix.replace("-", "_") if kind == "python" else suffix)
        root = f"/home/{r.choice(USERS)}/{r.choice(('projects', 'code', 'work', 'src'))}/{name}"
        version = f"{r.randint(0, 3)}.{r.randint(0, 12)}.{r.randint(0, 9)}"
        runner = "pytest" if kind == "python" else r.choice(("jest", "mocha"))
        p = _Project(name, kind, root, version, runner)
        (self._node if kind == "node" else self._python)(p)
        return p

    def _node(self, p: _Project) -> None:
        r = self.rng
        nouns = r.sample(NOUNS, r.randint(3, 7))
        src = r.choice(("src", "src", "lib"))
        kinds = ("utils", "routes", "models", "services", "handlers") + (("lib",) if src == "src" else ())
        subdirs = r.sample(kinds, r.randint(1, 3))
        test_dir = r.choice(("test", "tests", "__tests__"))
        for i, noun in enumerate(nouns):
            d = src if i < 2 else f"{src}/{r.choice(subdirs)}"
            ext = "ts" if r.random() < 0.08 else "js"
            f = self._js_module(f"{d}/{noun}.{ext}", noun)
            p.add(f)
            if i == 0 or r.random() < 0.7:
                p.add(self._js_test(f"{test_dir}/{noun}.test.js", noun, f))
        p.add(self._js_module(f"{src}/index.js", r.choice(nouns), entry=True))
        p.add(self._package_json(p, src))
        p.add(self._readme(p))
        p.add(_File(".gitignore", "txt", "node_modules/\ndist/\n.env\ncoverage/\n*.log\n", [], "ignore rules"))
        if r.random() < 0.5:
            p.add(self._json_config(f"config/{r.choice(('default', 'development', 'settings'))}.json", p))
        if r.random() < 0.4:
            noun = r.choice(nouns)
            title = p.name.replace("-", " ").title()
            p.add(_File("public/index.html", "html", HTML_TEMPLATE % {"title": title, "noun": noun}, [],
                        f"the HTML page of {title}"))
            p.add(_File("public/style.css", "css", CSS_TEMPLATE % {"noun": noun}, [], f"styles for the {noun} list"))
        if r.random() < 0.4:
            verb, noun = r.choice(VERBS), r.choice(nouns)
            p.add(self._js_module(f"scripts/{verb}-{_plural(noun)}.js", noun))
        p.dirs.setdefault(".", []).extend(["node_modules/", "package-lock.json"])

    def _python(self, p: _Project) -> None:
        r = self.rng
        pkg = p.name.split("_")[0] if r.random() < 0.5 else p.name.replace("-", "_")
        pkg = pkg.removesuffix("_api").removesuffix("_cli")
        nouns = r.sample(NOUNS, r.randint(3, 7))
        p.add(_File(f"{pkg}/__init__.py", "py", f'"""{pkg}: {p.name.replace("_", " ")}."""\n\n__version__ = "{p.version}"\n',
                    [], f"the package marker of {pkg}"))
        sub = r.choice(("core", "api", "services", "models"))
        for i, noun in enumerate(nouns):
            d = pkg if i < 3 else f"{pkg}/{sub}"
            f = self._py_module(f"{d}/{noun}.py", noun)
            p.add(f)
            if i == 0 or r.random() < 0.7:
                p.add(self._py_test(f"tests/test_{noun}.py", noun, f, d.replace("/", ".")))
        p.add(self._readme(p))
        p.add(_File("requirements.txt", "txt", "\n".join(sorted(r.sample(PIP_PKGS, r.randint(2, 6)))) + "\n", [],
                    "the pinned dependencies"))
        p.add(_File("pyproject.toml", "toml", f'[project]\nname = "{p.name}"\nversion = "{p.version}"\n'
                    f'requires-python = ">=3.10"\n\n[tool.pytest.ini_options]\ntestpaths = ["tests"]\n', [],
                    "the project metadata"))
        if r.random() < 0.5:
            verb, noun = r.choice(VERBS), r.choice(nouns)
            p.add(self._py_module(f"scripts/{verb}_{_plural(noun)}.py", noun))
        if r.random() < 0.4:
            p.add(self._json_config(f"config/{r.choice(('settings', 'logging', 'app'))}.json", p))
        p.dirs.setdefault(".", []).extend([".venv/"])

    def _count(self) -> int:
        """How many snippets a module gets: mostly a few, a long tail up to ~30 KB files."""
        r = self.rng.random()
        if r < 0.15:
            return self.rng.randint(1, 3)
        if r < 0.6:
            return self.rng.randint(3, 10)
        if r < 0.96:
            return self.rng.randint(10, 25)
        return self.rng.randint(25, 100)

    def _fill(self, noun: str) -> dict[str, str]:
        r = self.rng
        verb = r.choice(VERBS)
        fld = r.choice(FIELDS)
        field_py = re.sub(r"([A-Z])", r"_\1", fld).lower() if fld != "id" else "name"
        return {"noun": noun, "Noun": noun.capitalize(), "arg": noun, "field": fld, "nouns": _plural(noun),
                "args": _plural(noun), "field_py": field_py, "verb": verb}

    def _snippet(self, templates: tuple[str, ...], used: set[str]) -> str:
        """A template for the next definition; a module declares each class only once."""
        template = self.rng.choice(templates)
        if "class " in template:
            if template in used:
                return self.rng.choice([t for t in templates if "class " not in t])
            used.add(template)
        return template

    def _js_module(self, path: str, noun: str, entry: bool = False) -> _File:
        r = self.rng
        parts, funcs, classes = [], [], set()
        uses = r.sample(NOUNS, 2)
        head = "'use strict';\n" if r.random() < 0.3 else ""
        requires = "".join(f"const {u}Service = require('./{u}');\n" for u in uses[: r.randint(0, 2)])
        head += ("\n" if head and requires else "") + requires
        for _ in range(self._count()):
            fill = self._fill(noun)
            fill["fn"] = _camel(fill["verb"], r.choice((noun, _plural(noun), noun + "ById", noun + "List", noun + "Total")))
            if fill["fn"] in funcs:
                continue
            funcs.append(fill["fn"])
            parts.append(self._snippet(JS_FUNCS, classes) % fill)
        exports = "module.exports = { " + ", ".join(funcs) + " };\n"
        body = head + ("\n" if head else "") + "\n".join(parts) + "\n" + exports
        if entry:
            port = r.choice((3000, 8080, 5000))
            body = f"const app = require('./app');\n\nconst PORT = process.env.PORT || {port};\n\n" + body
        return _File(path, path.rsplit(".", 1)[1], body, funcs, f"{noun} helpers")

    def _py_module(self, path: str, noun: str) -> _File:
        r = self.rng
        parts, funcs, classes = [], [], set()
        for _ in range(self._count()):
            fill = self._fill(noun)
            obj = r.choice((noun, _plural(noun), noun + "_by_id", noun + "_total", noun + "_page"))
            fill["fn"] = f"{fill['verb']}_{obj}"
            if fill["fn"] in funcs:
                continue
            funcs.append(fill["fn"])
            parts.append(self._snippet(PY_FUNCS, classes) % fill)
        head = f'"""{noun.capitalize()} helpers."""\n\nfrom __future__ import annotations\n\n'
        if any("@dataclass" in s for s in parts):
            head += "from dataclasses import asdict, dataclass\n\n"
        return _File(path, "py", head + "\n\n".join(parts), funcs, f"{noun} helpers")

    def _js_test(self, path: str, noun: str, mod: _File) -> _File:
        name = mod.path.rsplit("/", 1)[1].rsplit(".", 1)[0]
        rel = "../" + mod.path.rsplit(".", 1)[0]
        body = [f"const {{ {', '.join(mod.funcs[:4])} }} = require('{rel}');\n", f"describe('{name}', () => {{"]
        for fn in mod.funcs[:4]:
            body.append(f"  it('{fn} handles an empty input', () => {{\n    expect(() => {fn}([])).not.toThrow();\n  }});\n")
        body.append("});\n")
        return _File(path, "js", "\n".join(body), [], f"the tests of {name}")

    def _py_test(self, path: str, noun: str, mod: _File, modpath: str) -> _File:
        name = mod.path.rsplit("/", 1)[1][:-3]
        body = [f"from {modpath}.{name} import {', '.join(mod.funcs[:4])}\n\n"]
        for fn in mod.funcs[:4]:
            body.append(f"def test_{fn}_accepts_empty_input():\n    assert {fn}([]) is not None\n\n")
        return _File(path, "py", "\n".join(body), [], f"the tests of {name}")

    def _package_json(self, p: _Project, src: str) -> _File:
        r = self.rng
        names = sorted(r.sample(NPM_PKGS, r.randint(1, 5)))
        deps = {k: f"^{r.randint(1, 9)}.{r.randint(0, 20)}.{r.randint(0, 9)}" for k in names}
        data = {
            "name": p.name, "version": p.version, "description": f"{p.name.replace('-', ' ')} for the team",
            "main": f"{src}/index.js",
            "scripts": {"start": f"node {src}/index.js", "test": p.runner, "build": "vite build", "lint": "eslint ."},
            "keywords": [], "author": "", "license": r.choice(("MIT", "ISC", "Apache-2.0")),
            "dependencies": deps, "devDependencies": {p.runner: "^29.7.0" if p.runner == "jest" else "^10.2.0"},
        }
        return _File("package.json", "json", json.dumps(data, indent=2) + "\n", [], "the npm manifest")

    def _json_config(self, path: str, p: _Project) -> _File:
        r = self.rng
        data = {"port": r.choice((3000, 8080, 5000)), "logLevel": r.choice(("info", "debug", "warn")),
                "database": {"host": "localhost", "port": r.choice((5432, 3306, 27017)), "name": p.name.replace("-", "_")},
                "features": {n: r.random() < 0.5 for n in r.sample(NOUNS, r.randint(1, 4))}}
        return _File(path, "json", json.dumps(data, indent=2) + "\n", [], "configuration")

    def _readme(self, p: _Project) -> _File:
        title = p.name.replace("-", " ").replace("_", " ").title()
        run = "npm install\nnpm start"
        if p.kind == "python":
            run = "pip install -r requirements.txt\npython -m " + p.name.split("_")[0]
        test = "npm test" if p.kind == "node" else "pytest -q"
        body = f"# {title}\n\nA small {p.kind} project that manages {_plural(p.name.split('-')[0].split('_')[0])}.\n\n" \
               f"## Getting started\n\n```\n{run}\n```\n\n## Tests\n\n```\n{test}\n```\n"
        return _File("README.md", "md", body, [], f"the readme of {title}")


# ---------------------------------------------------------------------------------------------
# The agent's tool results, per version
# ---------------------------------------------------------------------------------------------


class _Agent:
    """How one agent version formats tool results and lines."""

    def __init__(self, version: str):
        self.version = version
        self.prompt_key = "user_prompt" if version == "v1" else "user_message"
        self.json_head = '{"' + self.prompt_key + '":'

    def ok(self, text: str) -> str:
        return protocol.output(text)

    def err(self, text: str) -> str:
        return protocol.error(text, self.version)

    def listing(self, p: _Project, d: str, pattern: str | None = None) -> list[str]:
        entries = p.listing(d)
        if pattern and self.version == "v1":  # the later agent ignores the filter argument
            rx = re.compile(pattern)
            entries = [e for e in entries if rx.search(e.rstrip("/"))]
        if self.version == "v1":
            return [e.rstrip("/") for e in entries]
        return [e.rstrip("/") + (" (directory)" if e.endswith("/") else " (file)") for e in entries]

    def search(self, path: str, pattern: str, f: _File) -> str:
        hits = [(i + 1, ln) for i, ln in enumerate(f.lines) if pattern in ln]
        if self.version == "v2":
            return "\n".join(ln for _, ln in hits)
        if not hits:
            return f"No matches found for pattern '{pattern}' in {path}."
        return f"Matches in {path}:\n" + "\n".join(f"Line {i}: {ln.strip()}" for i, ln in hits)

    def written(self, path: str) -> str:
        return f"File {path} written successfully."

    def replaced(self, path: str, old: str, new: str) -> str:
        if self.version == "v1":
            return f"Replaced all occurrences of '{old}' with '{new}' in {path}."
        return f'Successfully replaced "{old}" with "{new}" in {path}.'

    def shell(self, cmd: str, stdout: str, stderr: str = "", failed: bool = False) -> str:
        """A run_shell_command result: the wrapped output the agent logs."""
        if self.version == "v1":
            if failed:
                return self.err(f"Command failed: Command failed: {cmd}\n{stderr}\nStderr: {stderr}")
            return self.ok(f"Stderr: {stderr}\nStdout: {stdout}" if stderr else stdout)
        if failed:
            return self.err(f"Command failed: {cmd}\n{stderr}")
        return self.err(stderr) if stderr else self.ok(stdout)

    def not_found(self, path: str) -> str:
        return self.err(f"Error reading file: {path} not found.")


# ---------------------------------------------------------------------------------------------
# Phrasings
# ---------------------------------------------------------------------------------------------

READ_PHRASES = (
    "show me what's in {p}", "read {p}", "open {p}", "what does {p} contain?", "print the contents of {p}",
    "can you read {p} for me?", "show me {p}", "cat {p}", "let me see the file {p}", "display {p}",
    "what's inside {p}?", "read the file {p} please",
)
LIST_PHRASES = (
    "list the files in {d}", "what's in the {d} folder?", "show the contents of {d}", "ls {d}",
    "which files are in {d}?", "list the directory {d}", "show me what {d} contains", "list everything under {d}",
)
LIST_HERE_PHRASES = (
    "list the files in the current directory", "what files are here?", "show me the files in this folder",
    "list the current directory", "ls", "what's in the project root?",
)
LIST_FILTER_PHRASES = (
    "list the .{ext} files in {d}", "which .{ext} files are in {d}?", "show only the .{ext} files in {d}",
    "find the .{ext} files in {d}",
)
SEARCH_PHRASES = (
    "search {p} for '{s}'", "find '{s}' in {p}", "where does {p} mention {s}?", "grep {p} for {s}",
    "look for {s} in {p}", "which lines of {p} contain '{s}'?", "search for `{s}` in {p}",
)
MKDIR_PHRASES = (
    "create a folder called {d}", "make a directory {d}", "mkdir {d}", "add a new directory named {d}",
    "create the directory {d}", "please create a {d} folder",
)
REPLACE_PHRASES = (
    "replace '{o}' with '{n}' in {p}", "in {p}, change {o} to {n}", "rename {o} to {n} in {p}",
    "change every '{o}' in {p} to '{n}'", "swap {o} for {n} in {p}",
)
WRITE_PHRASES = (
    "write '{t}' to {p}", "create {p} containing '{t}'", "put '{t}' in the file {p}",
    "save '{t}' to {p}", "make a file {p} with the text '{t}'",
)
WRITE_BLOCK_PHRASES = (
    "save the following to {p}:\n```\n{t}\n```", "create {p} with this content:\n```\n{t}\n```",
    "write this into {p}:\n```\n{t}\n```",
)
CONTEXT_PHRASES = (
    "what kind of project is this?", "give me an overview of the project", "summarize this project",
    "tell me about this project", "what is this repo about?",
)
# shell intents: phrases -> command builder (a fixed mapping, so the command follows from the words)
SHELL_FIXED = (
    (("run the tests", "run the test suite", "execute the unit tests", "can you run the tests?", "run npm test"),
     "npm test", "node"),
    (("run the python tests", "run pytest", "execute the python test suite"), "pytest -q", "python"),
    (("install the dependencies", "install the npm packages", "run npm install"), "npm install", "node"),
    (("install the python requirements", "install everything in requirements.txt"),
     "pip install -r requirements.txt", "python"),
    (("what's the current directory?", "print the working directory", "where am I?",
      "hey let me know current working directory"), "pwd", None),
    (("which node version do I have?", "what version of node is installed?"), "node -v", None),
    (("what version of npm is installed?", "check the npm version"), "npm -v", None),
    (("which python version is installed?", "check the python version"), "python3 --version", None),
    (("show the git status", "what files have changed?", "git status please", "are there uncommitted changes?"),
     "git status", None),
    (("build the project", "run the build", "make a production build"), "npm run build", "node"),
    (("run the linter", "lint the code", "check the code with eslint"), "npm run lint", "node"),
    (("which branch am I on?", "list the git branches"), "git branch", None),
)

SHELL_VERBATIM = ("ls", "ls -la", "date", "whoami", "uname -a", "git branch", "git diff --stat",
                  "npm outdated", "echo $PATH", "df -h .", "git remote -v", "cat package.json")
"""Commands the user spells out ("run `uname -a`"): the call copies them."""

CHAT_QA = (  # general questions answered without a tool; {noun}, {nouns}, {field} vary the wording
    ("how do I sort an array of {nouns} by {field} in JavaScript?",
     "Use `Array.prototype.sort` with a comparator:\n\n```js\n{nouns}.sort((a, b) => (a.{field} > b.{field} ? 1 : -1));\n```\n\n"
     "`sort` changes the array in place; copy it first (`[...{nouns}]`) if you need the original order."),
    ("how do I sort a list of {nouns} by {field} in Python?",
     "Use `sorted` with a key:\n\n```python\nby_{field} = sorted({nouns}, key=lambda {noun}: {noun}[\"{field}\"])\n```\n\n"
     "Pass `reverse=True` for descending order, or call `{nouns}.sort(key=...)` to sort in place."),
    ("how can I remove duplicate {nouns} in JavaScript?",
     "If they are plain values, `const unique = [...new Set({nouns})];`. For objects, keep the first of each {field}:\n\n"
     "```js\nconst seen = new Set();\nconst unique = {nouns}.filter((x) => !seen.has(x.{field}) && seen.add(x.{field}));\n```"),
    ("what's the best way to group {nouns} by {field} in Python?",
     "A `defaultdict(list)` keeps it short:\n\n```python\nfrom collections import defaultdict\n\ngroups = defaultdict(list)\n"
     "for {noun} in {nouns}:\n    groups[{noun}[\"{field}\"]].append({noun})\n```"),
    ("how do I check if a {noun} object has a {field} property in JavaScript?",
     "Use `Object.hasOwn({noun}, '{field}')` (or `'{field}' in {noun}` to include inherited properties). "
     "`{noun}.{field} !== undefined` also works unless the property can be set to `undefined`."),
    ("how do I read a JSON file of {nouns} in Node?",
     "```js\nconst fs = require('fs');\nconst {nouns} = JSON.parse(fs.readFileSync('{nouns}.json', 'utf8'));\n```\n\n"
     "In async code use `await fs.promises.readFile('{nouns}.json', 'utf8')` and parse the result."),
    ("what does async/await do when fetching {nouns}?",
     "`async` makes a function return a promise; `await` pauses it until a promise settles. So "
     "`const {nouns} = await fetch('/api/{nouns}').then((r) => r.json());` reads top to bottom while the request runs."),
    ("how do I write a dataclass for a {noun} with a {field} in Python?",
     "```python\nfrom dataclasses import dataclass\n\n\n@dataclass\nclass {Noun}:\n    id: int\n    {field}: str\n```\n\n"
     "The decorator generates `__init__`, `__repr__` and `__eq__` for you."),
    ("what is the difference between map and forEach for {nouns}?",
     "`{nouns}.map(fn)` returns a new array built from the return values of `fn`; `{nouns}.forEach(fn)` returns "
     "`undefined` and is only for side effects. Use `map` when you want the transformed {nouns}."),
    ("how do I count {nouns} per {field} in Python?",
     "Use `collections.Counter`:\n\n```python\nfrom collections import Counter\n\n"
     "counts = Counter({noun}[\"{field}\"] for {noun} in {nouns})\n```"),
)

PREAMBLES = {
    "read_file": ("I'll read the file.", "Let me open it.", "Reading the file now.", "Sure, here it is:"),
    "list_directory": ("Let me list that directory.", "I'll check what's there.", "Listing the directory."),
    "run_shell_command": ("I'll run that command.", "Running it now.", "Let me run it."),
    "search_file_content": ("I'll search the file.", "Let me look for it.", "Searching now."),
    "create_directory": ("I'll create the directory.", "Creating it now."),
    "replace_in_file": ("I'll make the replacement.", "Let me update the file."),
    "write_file": ("I'll write the file.", "Writing it now."),
    "get_project_context": ("Let me gather the project context.", "I'll look at the project first."),
}

UNKNOWN_CALLS = (
    ("sort", "sort(data)"), ("open_file", "open_file('{p}')"), ("execute_command", "execute_command('ls -la')"),
    ("read", "read('{p}')"), ("cat", "cat('{p}')"), ("write_to_file", "write_to_file('{p}', 'hello')"),
    ("ls", "ls('.')"), ("run", "run('npm test')"), ("delete_file", "delete_file('{p}')"),
    ("search", "search('{p}', 'TODO')"), ("print", "print('{p}')"),
)

FAKE_OUTPUTS = (
    "The file has been successfully written.", "File written successfully!", "[ 'src', 'dist', 'package.json' ]",
    "hello", "All tests passed.", "/home/user/documents", "// The function returns nothing, so there is no output.",
    "Directory created.", "Found 3 matches.",
)


# ---------------------------------------------------------------------------------------------
# The generator
# ---------------------------------------------------------------------------------------------


@dataclass
class _Turn:
    """One user turn being built: the request, the replies and the executed calls with outputs."""

    prompt: str
    replies: list[str] = field(default_factory=list)
    executions: list[tuple[str, str]] = field(default_factory=list)  # (tool_call, tool_output)
    calls: list[ToolCall] = field(default_factory=list)


_AVAILABLE_TOOLS = json.dumps(  # what the later agent's get_available_tools() reports (its tools.js exports)
    [{"name": "".join(w.capitalize() if i else w for i, w in enumerate(n.split("_"))) + "Tool",
      "args": ["filePath"] if n.endswith("file") else []} for n in TOOLS_V2],
    indent=2,
)
_QUOTE = json.encoder.encode_basestring  # a JSON string literal, non-ASCII kept (as JSON.stringify writes it)

FOLLOW_UPS = (
    "Let me know if you want me to change anything.", "Do you want me to do anything else with it?",
    "Tell me what you'd like to do next.", "I can make further changes if you need them.",
    "Is there anything else you need?",
)


class _Generator:
    """Draws lines one at a time from a seeded random source (constant memory)."""

    LIVE_PROJECTS = 8
    NEW_PROJECT_EVERY = 250
    DEDUP_LIMIT = 200_000
    RECENT = 64

    def __init__(self, rng: random.Random, version: str, noise: float, garbage: bool, chat: float):
        self.rng, self.noise, self.chat = rng, noise, chat
        self.agent = _Agent(version)
        self.v1 = version == "v1"
        self.maker = _ProjectMaker(rng)
        self.projects = [self.maker.make() for _ in range(self.LIVE_PROJECTS)]
        kinds = dict(NOISE_KINDS)
        if garbage:
            kinds["garbage"] = GARBAGE_WEIGHT
        self.noise_kinds, self.noise_weights = list(kinds), list(kinds.values())
        self.recent: collections.deque[Sample] = collections.deque(maxlen=self.RECENT)
        self.seen: set[int] = set()
        self.scenarios, weights = self._scenario_table()
        self.cum_weights = list(itertools.accumulate(weights))
        self.noise_cum = list(itertools.accumulate(self.noise_weights))

    def _scenario_table(self) -> tuple[list[Callable[[_Project], _Turn]], list[float]]:
        table: list[tuple[Callable[[_Project], _Turn], float]] = [
            (self._read, 22), (self._list, 10), (self._list_filter, 3), (self._shell, 17), (self._search, 10),
            (self._mkdir, 4), (self._replace, 5), (self._write, 4), (self._write_block, 4), (self._context, 4),
        ]
        if self.v1:
            table += [(self._list_then_read, 5), (self._tests_then_read, 3), (self._bump_version, 3),
                      (self._mkdir_then_write, 4), (self._search_then_replace, 3), (self._missing_then_list, 3)]
        else:
            table += [(self._v2_metadata, 2), (self._v2_diff_file, 2), (self._v2_diff_all, 1), (self._v2_blame, 2),
                      (self._v2_summarize, 2), (self._v2_update_context, 1.5), (self._v2_get_context, 1),
                      (self._v2_tools, 1), (self._v2_regex_replace, 2)]
        return [s for s, _ in table], [w for _, w in table]

    # -- drawing lines ------------------------------------------------------------------------

    def next_sample(self) -> Sample:
        r = self.rng
        if r.random() < 1.0 / self.NEW_PROJECT_EVERY:
            self.projects[r.randrange(self.LIVE_PROJECTS)] = self.maker.make()
        if r.random() < self.noise:
            kind = r.choices(self.noise_kinds, cum_weights=self.noise_cum)[0]
            sample = self._noise(kind)
            if sample is not None:
                return sample
        return self._clean()

    def _clean(self) -> Sample:
        for _ in range(8):
            turn = self._chat() if self.chat and self.rng.random() < self.chat else self._scenario()
            line = self._dump(turn)
            h = hash(line)
            if h in self.seen:
                continue
            if len(self.seen) < self.DEDUP_LIMIT:
                self.seen.add(h)
            sample = Sample(line, "clean", turn.prompt, tuple(turn.calls))
            self.recent.append(sample)
            return sample
        return Sample(line, "clean", turn.prompt, tuple(turn.calls))

    def _scenario(self) -> _Turn:
        project = self.rng.choice(self.projects)
        return self.rng.choices(self.scenarios, cum_weights=self.cum_weights)[0](project)

    def _dump(self, turn: _Turn) -> str:
        q = _QUOTE
        return (self.agent.json_head + q(turn.prompt) + ',"ai_responses":[' + ",".join(map(q, turn.replies))
                + '],"tool_executions":['
                + ",".join('{"tool_call":' + q(c) + ',"tool_output":' + q(o) + "}" for c, o in turn.executions) + "]}")

    # -- building blocks ----------------------------------------------------------------------

    def _call_reply(self, name: str, *args: str, lead: str | None = None) -> tuple[str, str]:
        """A reply holding one call, and the call text the agent logs for it."""
        r = self.rng
        call = format_call(name, *args)
        comment = f"// {name.replace('_', ' ')}\n" if self.v1 and r.random() < 0.03 else ""
        if lead is None:
            lead = r.choice(PREAMBLES.get(name, ("",))) if r.random() < 0.5 else ""
        block = protocol.code_block(comment + call)
        return (f"{lead}\n\n{block}" if lead else block), call

    def _step(self, turn: _Turn, output: str, name: str, *args: str, lead: str | None = None) -> None:
        """Append a reply with one call and its execution."""
        reply, call = self._call_reply(name, *args, lead=lead)
        turn.replies.append(reply)
        turn.executions.append((call, output))
        turn.calls.append(ToolCall(name, tuple(args), None, call))

    def _finish(self, turn: _Turn, summary: str) -> _Turn:
        """End a turn: v1 writes the summary reply; v2 makes one model call per turn, so it stops."""
        if self.v1:
            if summary and self.rng.random() < 0.4:
                summary += ("\n\n" if "\n" in summary else " ") + self.rng.choice(FOLLOW_UPS)
            turn.replies.append(summary)
        return turn

    def _path_as_said(self, path: str) -> str:
        return "./" + path if self.rng.random() < 0.15 else path

    def _dir_as_said(self, d: str) -> str:
        r = self.rng.random()
        return "./" + d if r < 0.15 else (d + "/" if r < 0.25 else d)

    def _pick_file(self, p: _Project, langs: tuple[str, ...] | None = None) -> _File:
        files = [f for f in p.files.values() if langs is None or f.lang in langs]
        return self.rng.choice(files or list(p.files.values()))

    def _pick_dir(self, p: _Project) -> str:
        return self.rng.choice([d for d in p.dirs if d != "."])

    # -- single-call scenarios ------------------------------------------------------------------

    def _read(self, p: _Project) -> _Turn:
        f = self._pick_file(p)
        said = self._path_as_said(f.path)
        turn = _Turn(self.rng.choice(READ_PHRASES).format(p=said))
        self._step(turn, self.agent.ok(f.content), "read_file", said)
        return self._finish(turn, self._describe(f, said))

    def _describe(self, f: _File, said: str) -> str:
        n = f.content.count("\n")
        lang = EXTS_LANG.get(f.lang, f.lang)
        if f.funcs:
            head = self.rng.choice((
                f"`{said}` is a {lang} module of {n} lines with the {f.about}. It defines:",
                f"This {lang} file ({n} lines) holds the {f.about}:",
                f"Here is `{said}`. It contains {len(f.funcs)} definition{'s' if len(f.funcs) > 1 else ''}:",
            ))
            items = "\n".join(f"- `{fn}`: {_explain(fn)}" for fn in f.funcs[:8])
            more = f"\n- ... and {len(f.funcs) - 8} more" if len(f.funcs) > 8 else ""
            return f"{head}\n\n{items}{more}"
        if f.lang == "json" and f.content.lstrip().startswith("{"):
            keys = ", ".join(f"`{k}`" for k in json.loads(f.content))
            return f"`{said}` is {f.about} in JSON ({n} lines). Its top-level keys are {keys}."
        return self.rng.choice((
            f"`{said}` is {f.about} ({lang}, {n} lines).",
            f"That file holds {f.about}. It is {n} lines of {lang}.",
        ))

    def _list(self, p: _Project) -> _Turn:
        r = self.rng
        if r.random() < 0.3:
            d, prompt = ".", r.choice(LIST_HERE_PHRASES)
        else:
            d = self._dir_as_said(self._pick_dir(p))
            prompt = r.choice(LIST_PHRASES).format(d=d)
        entries = self.agent.listing(p, d)
        turn = _Turn(prompt)
        self._step(turn, self.agent.ok("\n".join(entries)), "list_directory", d)
        return self._finish(turn, self._list_summary(d, entries))

    def _list_summary(self, d: str, entries: list[str]) -> str:
        where = "The current directory" if d == "." else f"`{d}`"
        names = [e.split(" (")[0] for e in entries]
        dirs = [x for x in names if x in ("node_modules", ".venv") or "." not in x]
        items = "\n".join(f"- `{x}`" + (" (directory)" if x in dirs else "") for x in names[:12])
        more = f"\n- ... and {len(names) - 12} more" if len(names) > 12 else ""
        return (f"{where} has {_count(len(names), 'entry')} ({_count(len(names) - len(dirs), 'file')}, "
                f"{_count(len(dirs), 'directory')}):\n\n{items}{more}")

    def _list_filter(self, p: _Project) -> _Turn:
        r = self.rng
        d = _norm_dir(self._dir_as_said(self._pick_dir(p)))
        exts = sorted({f.path.rsplit(".", 1)[-1] for f in p.in_dir(d)} | {"js", "py", "json", "md"})
        ext = r.choice(exts)
        pattern = "\\." + ext + "$"
        entries = self.agent.listing(p, d, pattern)
        turn = _Turn(r.choice(LIST_FILTER_PHRASES).format(ext=ext, d=d))
        self._step(turn, self.agent.ok("\n".join(entries)), "list_directory", d, pattern)
        if not entries:
            return self._finish(turn, f"There are no .{ext} files in `{d}`.")
        names = ", ".join(f"`{e.split(' (')[0]}`" for e in entries)
        return self._finish(turn, f"`{d}` has {len(entries)} .{ext} file{'s' if len(entries) > 1 else ''}: {names}.")

    def _search(self, p: _Project) -> _Turn:
        r = self.rng
        f = r.choice(p.source_files() or list(p.files.values()))
        if f.funcs and r.random() < 0.8:
            pattern = r.choice(f.funcs)
        else:
            pattern = r.choice(("TODO", "return", "const", "def", "error"))
        said = self._path_as_said(f.path)
        turn = _Turn(r.choice(SEARCH_PHRASES).format(p=said, s=pattern))
        self._step(turn, self.agent.ok(self.agent.search(said, pattern, f)), "search_file_content", said, pattern)
        hits = [i + 1 for i, ln in enumerate(f.lines) if pattern in ln]
        if not hits:
            return self._finish(turn, f"`{pattern}` does not appear in `{said}`.")
        items = "\n".join(f"- line {h}: `{f.lines[h - 1].strip()[:80]}`" for h in hits[:6])
        more = f"\n- ... and {len(hits) - 6} more" if len(hits) > 6 else ""
        return self._finish(turn, f"`{pattern}` appears on {_count(len(hits), 'line')} of `{said}`:\n\n{items}{more}")

    def _mkdir(self, p: _Project) -> _Turn:
        r = self.rng
        d = self._new_dir(p)
        turn = _Turn(r.choice(MKDIR_PHRASES).format(d=d))
        self._step(turn, self.agent.ok(f"Directory {d} created successfully."), "create_directory", d)
        return self._finish(turn, r.choice((f"Created the directory `{d}`.", f"Done: `{d}` now exists.",
                                            f"The folder `{d}` has been created.")))

    def _new_dir(self, p: _Project) -> str:
        r = self.rng
        base = r.choice(("build", "dist", "logs", "tmp", "docs", "assets", "fixtures", "data", "output", "backup",
                         "migrations", "examples", "coverage", "reports", "cache"))
        if r.random() < 0.5:
            parent = self._pick_dir(p)
            base = f"{parent}/{base}" if r.random() < 0.5 else f"{parent}/{_plural(r.choice(NOUNS))}"
        return self._dir_as_said(base).rstrip("/")

    def _replace(self, p: _Project) -> _Turn:
        r = self.rng
        f = r.choice(p.source_files() or list(p.files.values()))
        old = r.choice(f.funcs) if f.funcs else "localhost"
        new = self._renamed(old)
        said = self._path_as_said(f.path)
        turn = _Turn(r.choice(REPLACE_PHRASES).format(p=said, o=old, n=new))
        self._step(turn, self.agent.ok(self.agent.replaced(said, old, new)), "replace_in_file", said, old, new)
        return self._finish(turn, f"Every `{old}` in `{said}` is now `{new}`.")

    def _renamed(self, old: str) -> str:
        for _ in range(8):
            new = self._rename_once(old)
            if new != old:
                return new
        return old + "2"

    def _rename_once(self, old: str) -> str:
        r = self.rng
        if "_" in old:
            return r.choice(VERBS) + "_" + old.split("_", 1)[1]
        for i, c in enumerate(old):
            if c.isupper():
                return r.choice(VERBS) + old[i:]
        return old + r.choice(("V2", "Host", "Name"))

    def _write(self, p: _Project) -> _Turn:
        r = self.rng
        text = r.choice(TEXTS)
        path = self._path_as_said(self._new_file(p, ("txt", "md")))
        turn = _Turn(r.choice(WRITE_PHRASES).format(p=path, t=text))
        self._step(turn, self.agent.ok(self.agent.written(path)), "write_file", path, text)
        return self._finish(turn, r.choice((f"Wrote '{text}' to `{path}`.", f"`{path}` now contains '{text}'.")))

    def _write_block(self, p: _Project) -> _Turn:
        r = self.rng
        src = r.choice(p.source_files() or list(p.files.values()))
        text = "\n".join(ln for ln in src.content.split("\n")[:40] if "//" not in ln).strip("\n")
        path = self._path_as_said(self._new_file(p, (src.lang,)))
        turn = _Turn(r.choice(WRITE_BLOCK_PHRASES).format(p=path, t=text))
        self._step(turn, self.agent.ok(self.agent.written(path)), "write_file", path, text)
        return self._finish(turn, f"Saved {text.count(chr(10)) + 1} lines to `{path}`.")

    def _new_file(self, p: _Project, exts: tuple[str, ...]) -> str:
        r = self.rng
        name = r.choice(("notes", "hello", "todo", "output", "draft", "changelog", "scratch", "test", "example",
                         r.choice(NOUNS), r.choice(VERBS) + "_" + r.choice(NOUNS)))
        d = self._pick_dir(p) if r.random() < 0.4 else ""
        return (d + "/" if d else "") + name + "." + r.choice(exts)

    def _context(self, p: _Project) -> _Turn:
        if "context" not in p.cache:
            ctx: dict[str, object] = {}
            pkg = p.files.get("package.json")
            missing = f"Error reading package.json: ENOENT: no such file or directory, open '{p.root}/package.json'"
            ctx["package.json"] = json.loads(pkg.content) if pkg else missing
            ctx["README.md"] = p.files["README.md"].content
            ctx["root_directory_contents"] = "\n".join(p.listing("."))
            p.cache["context"] = json.dumps(ctx, indent=2, ensure_ascii=False)
        turn = _Turn(self.rng.choice(CONTEXT_PHRASES))
        self._step(turn, self.agent.ok(p.cache["context"]), "get_project_context")
        lang = "Node.js" if p.kind == "node" else "Python"
        return self._finish(turn, f"This is a {lang} project called `{p.name}` (version {p.version}). "
                                  f"Its top level has {len(p.listing('.'))} entries and the tests run with {p.runner}.")

    def _shell(self, p: _Project) -> _Turn:
        r = self.rng
        roll = r.random()
        if roll < 0.55:
            phrases, cmd, _ = r.choice([s for s in SHELL_FIXED if s[2] in (None, p.kind)])
            prompt = r.choice(phrases)
        elif roll < 0.85:
            prompt, cmd = self._shell_with_args(p)
        else:
            cmd = r.choice(SHELL_VERBATIM)
            prompt = r.choice(("run `{c}`", "execute: {c}", "please run {c} in the shell", "run the command {c}"))
            prompt = prompt.format(c=cmd)
        stdout, stderr, failed = self._shell_result(p, cmd)
        turn = _Turn(prompt)
        self._step(turn, self.agent.shell(cmd, stdout, stderr, failed), "run_shell_command", cmd)
        return self._finish(turn, self._shell_summary(cmd, stdout, stderr, failed))

    def _shell_with_args(self, p: _Project) -> tuple[str, str]:
        """A request naming a file, folder, package or count, and the command it maps to."""
        r = self.rng
        f, d = self._pick_file(p).path, self._pick_dir(p)
        n, k = r.randint(2, 10), r.choice(NPM_PKGS if p.kind == "node" else PIP_PKGS)
        scripts = [x for x in p.files if x.startswith("scripts/")]
        script = r.choice(scripts) if scripts else ""
        options = [
            (("show the last {n} commits", "what were the last {n} commits?"), f"git log --oneline -{n}"),
            (("count the lines in {f}", "how many lines does {f} have?"), f"wc -l {f}"),
            (("how much space does {d} take?", "check the disk usage of {d}"), f"du -sh {d}"),
            (("show the first 10 lines of {f}", "print the top of {f}"), f"head -n 10 {f}"),
            (("find all TODO comments in {d}", "list the TODOs in {d}"), f'grep -rn "TODO" {d}'),
            (("show a detailed listing of {d}", "ls -la {d}"), f"ls -la {d}"),
            (("install {k}", "add {k} as a dependency", "npm install {k}"), f"npm install {k}")
            if p.kind == "node" else
            (("install the python package {k}", "pip install {k}"), f"pip install {k}"),
            (("show the diff of {f}", "run git diff on {f}"), f"git diff {f}"),
        ]
        if script:
            runner = "node" if script.endswith(".js") else "python"
            options.append((("run the script {s}", "execute {s}"), f"{runner} {script}"))
        phrases, cmd = r.choice(options)
        return r.choice(phrases).format(n=n, f=f, d=d, k=k, s=script), cmd

    def _shell_result(self, p: _Project, cmd: str) -> tuple[str, str, bool]:
        """(stdout, stderr, failed) of a command run in project p."""
        r = self.rng
        head = cmd.split(" ")[0]
        if cmd == "npm test":
            return self._npm_test(p, fail=False)  # a failing run is all a one-call line has: see _tests_then_read
        if cmd == "pytest -q":
            return self._pytest(p), "", False
        if cmd == "pwd":
            return p.root + "\n", "", False
        if cmd == "node -v":
            return r.choice(("v18.19.0", "v20.11.1", "v22.2.0", "v21.6.2")) + "\n", "", False
        if cmd == "npm -v":
            return r.choice(("9.8.1", "10.2.4", "10.9.2", "10.5.0")) + "\n", "", False
        if cmd == "python3 --version":
            return r.choice(("Python 3.10.12", "Python 3.11.6", "Python 3.12.3")) + "\n", "", False
        if cmd == "git status":
            return self._git_status(p), "", False
        if cmd.startswith("git log"):
            return self._git_log(p, int(cmd.rsplit("-", 1)[1])), "", False
        if cmd.startswith("npm install") or cmd.startswith("pip install"):
            return self._install(cmd), "", False
        if cmd == "npm run build":
            return self._build(p), "", False
        if cmd == "npm run lint":
            return self._lint(p), "", False
        if head == "wc":
            f = p.files[cmd.split(" ", 2)[2]]
            return f"{f.content.count(chr(10)):>5} {f.path}\n", "", False
        if head == "head":
            f = p.files[cmd.split(" ", 3)[3]]
            return "\n".join(f.lines[:10]) + "\n", "", False
        if head == "du":
            return f"{r.randint(4, 900)}K\t{cmd.split(' ', 2)[2]}\n", "", False
        if head == "grep":
            return self._grep(p, cmd.rsplit(" ", 1)[1]), "", False
        if cmd.startswith("ls -la "):
            return self._ls_la(p, cmd[7:]), "", False
        if head in ("node", "python"):
            return f"Processed {r.randint(1, 5000)} records in {r.uniform(0.05, 9):.2f}s\n", "", False
        if cmd == "git branch":
            branches = sorted({"main", f"feature/{r.choice(NOUNS)}", f"fix/{r.choice(NOUNS)}"})
            return "".join(("* " if b == "main" else "  ") + b + "\n" for b in branches), "", False
        if cmd.startswith("git diff"):
            return self._git_diff(p, cmd), "", False
        return self._misc(p, cmd), "", False

    def _npm_test(self, p: _Project, fail: bool) -> tuple[str, str, bool]:
        tests = [f for f in p.files.values() if f.path.endswith(".test.js")] or [self._pick_file(p)]
        lines, total, failed_tests = [], 0, 0
        failing = self.rng.choice(tests) if fail else None
        for t in tests:
            names = re.findall(r"it\('([^']+)'", t.content) or ["works"]
            total += len(names)
            if p.runner == "jest":
                lines.append(("FAIL " if t is failing else "PASS ") + t.path)
            else:
                lines.append("  " + t.path.rsplit("/", 1)[-1].split(".")[0])
            for i, n in enumerate(names):
                bad = t is failing and i == 0
                failed_tests += bad
                ms = self.rng.randint(1, 40)
                if p.runner == "jest":
                    lines.append(f"  {'✕' if bad else '✓'} {n} ({ms} ms)")
                else:
                    lines.append(f"    ✔ {n}")
        if p.runner == "mocha":
            ms = self.rng.randint(5, 900)
            report = "\n".join(lines)
            return f"\n> {p.name}@{p.version} test\n> mocha\n\n\n{report}\n\n\n  {total} passing ({ms}ms)\n\n", "", False
        suites = len(tests)
        body = "\n".join(lines)
        if failing is not None:
            fn = (re.findall(r"it\('(\S+)", failing.content) or ["fn"])[0]
            suite = failing.path.rsplit("/", 1)[-1].split(".")[0]
            body += (f"\n\n  ● {suite} › {fn} handles an empty input\n\n"
                     f"    TypeError: Cannot read properties of undefined (reading 'map')\n\n"
                     f"      at {fn} ({failing.path.replace('.test', '')}:3:12)\n"
                     f"      at Object.<anonymous> ({failing.path}:4:19)\n")
        summary = (f"\n\nTest Suites: {'1 failed, ' if fail else ''}{suites - fail} passed, {suites} total\n"
                   f"Tests:       {f'{failed_tests} failed, ' if fail else ''}{total - failed_tests} passed, {total} total\n"
                   f"Snapshots:   0 total\nTime:        {self.rng.uniform(0.4, 6):.3f} s\nRan all test suites.\n")
        stdout = f"\n> {p.name}@{p.version} test\n> jest\n\n"
        if not self.v1:  # v2 reports any stderr as a failure: its users' jest setups print to stdout
            return stdout + body + summary, "", False
        return stdout, body + summary, fail

    def _pytest(self, p: _Project) -> str:
        tests = [f for f in p.files.values() if f.path.startswith("tests/test_")]
        n = sum(f.content.count("def test_") for f in tests)
        if not n:
            return f"\nno tests ran in {self.rng.uniform(0.01, 0.2):.2f}s\n"
        lines = []
        done = 0
        for t in tests:
            k = t.content.count("def test_")
            done += k
            pct = int(100 * done / max(n, 1))
            lines.append(f"{t.path} {'.' * k}".ljust(75) + f"[{pct:3d}%]")
        secs = self.rng.uniform(0.05, 3)
        return "\n".join(lines) + f"\n\n{n} passed in {secs:.2f}s\n"

    def _git_status(self, p: _Project) -> str:
        r = self.rng
        files = r.sample(list(p.files), min(len(p.files), r.randint(0, 4)))
        if not files:
            return "On branch main\nYour branch is up to date with 'origin/main'.\n\nnothing to commit, working tree clean\n"
        mod = "".join(f"\tmodified:   {f}\n" for f in files)
        return ("On branch main\nYour branch is up to date with 'origin/main'.\n\nChanges not staged for commit:\n"
                "  (use \"git add <file>...\" to update what will be committed)\n"
                "  (use \"git restore <file>...\" to discard changes in working directory)\n"
                f"{mod}\nno changes added to commit (use \"git add\" and/or \"git commit -a\")\n")

    def _git_log(self, p: _Project, n: int) -> str:
        r = self.rng
        out = []
        for _ in range(n):
            sha = "%07x" % r.getrandbits(28)
            msg = r.choice(("Fix {n} validation", "Add {n} endpoint", "Refactor {n} helpers", "Update dependencies",
                            "Add tests for {n}", "Handle empty {n} list", "Bump version", "Clean up {n} module",
                            "Merge branch 'feature/{n}'", "Improve {n} error messages")).format(n=r.choice(NOUNS))
            out.append(f"{sha} {msg}")
        return "\n".join(out) + "\n"

    def _install(self, cmd: str) -> str:
        r = self.rng
        if cmd.startswith("npm"):
            added, audited, secs, funding = r.randint(1, 300), r.randint(300, 900), r.randint(1, 40), r.randint(10, 150)
            return (f"\nadded {added} packages, and audited {audited} packages in {secs}s\n\n{funding} packages are "
                    "looking for funding\n  run `npm fund` for details\n\nfound 0 vulnerabilities\n")
        pkgs = cmd.split(" ")[2:]
        if pkgs[0] == "-r":
            pkgs = r.sample(PIP_PKGS, 3)
        lines = []
        for k in pkgs:
            v = f"{r.randint(0, 3)}.{r.randint(0, 30)}.{r.randint(0, 9)}"
            lines.append(f"Collecting {k}\n  Downloading {k}-{v}-py3-none-any.whl ({r.randint(10, 900)} kB)")
        return "\n".join(lines) + "\nInstalling collected packages: " + ", ".join(pkgs) + \
            "\nSuccessfully installed " + " ".join(f"{k}-{r.randint(0, 3)}.{r.randint(0, 30)}.0" for k in pkgs) + "\n"

    def _build(self, p: _Project) -> str:
        r = self.rng
        js = r.uniform(20, 400)
        vite = f"5.{r.randint(0, 4)}.{r.randint(0, 12)}"
        return (f"\n> {p.name}@{p.version} build\n> vite build\n\nvite v{vite} building for production...\n"
                f"✓ {r.randint(10, 400)} modules transformed.\n"
                f"dist/index.html                  0.46 kB │ gzip:  0.30 kB\n"
                f"dist/assets/index-{r.getrandbits(32):08x}.css   {r.uniform(1, 20):.2f} kB │ "
                f"gzip:  {r.uniform(.5, 5):.2f} kB\n"
                f"dist/assets/index-{r.getrandbits(32):08x}.js   {js:.2f} kB │ gzip: {js / 3:.2f} kB\n"
                f"✓ built in {r.uniform(0.5, 9):.2f}s\n")

    def _lint(self, p: _Project) -> str:
        r = self.rng
        srcs = p.source_files()
        if not srcs or r.random() < 0.4:
            return f"\n> {p.name}@{p.version} lint\n> eslint .\n\n"
        f = r.choice(srcs)
        k = r.randint(1, 4)
        probs = "\n".join(f"  {r.randint(1, max(2, len(f.lines)))}:{r.randint(1, 30)}  warning  '{r.choice(f.funcs)}' "
                          "is defined but never used  no-unused-vars" for _ in range(k))
        return (f"\n> {p.name}@{p.version} lint\n> eslint .\n\n{p.root}/{f.path}\n{probs}\n\n"
                f"✖ {_count(k, 'problem')} (0 errors, {_count(k, 'warning')})\n")

    def _grep(self, p: _Project, d: str) -> str:
        out = []
        for f in p.files.values():
            if f.path.startswith(_norm_dir(d) + "/") or _norm_dir(d) == ".":
                out += [f"{f.path}:{i + 1}:{ln}" for i, ln in enumerate(f.lines) if "TODO" in ln]
        return "\n".join(out) + ("\n" if out else "")

    def _ls_la(self, p: _Project, d: str) -> str:
        r = self.rng
        rows = [f"total {r.randint(8, 200)}", "drwxr-xr-x  6 dev dev 4096 Mar 12 10:04 .",
                "drwxr-xr-x 14 dev dev 4096 Mar 11 18:22 .."]
        for e in p.listing(d):
            path = (_norm_dir(d) + "/" if _norm_dir(d) != "." else "") + e.rstrip("/")
            size = len(p.files[path].content) if path in p.files else 4096
            mode = "drwxr-xr-x" if e.endswith("/") else "-rw-r--r--"
            when = f"Mar {r.randint(1, 28):>2} {r.randint(0, 23):02d}:{r.randint(0, 59):02d}"
            rows.append(f"{mode}  1 dev dev {size:>5} {when} {e.rstrip('/')}")
        return "\n".join(rows) + "\n"

    def _git_diff(self, p: _Project, cmd: str) -> str:
        target = cmd.split(" ")[-1]
        f = p.files.get(target) or self.rng.choice(list(p.files.values()))
        if cmd.endswith("--stat"):
            return f" {f.path} | {self.rng.randint(1, 30)} ++++---\n 1 file changed, 4 insertions(+), 3 deletions(-)\n"
        i = self.rng.randrange(max(1, len(f.lines) - 3))
        ctx = f.lines[i:i + 3]
        old = ctx[0] if ctx else ""
        before, after = self.rng.getrandbits(28), self.rng.getrandbits(28)
        return (f"diff --git a/{f.path} b/{f.path}\nindex {before:07x}..{after:07x} 100644\n"
                f"--- a/{f.path}\n+++ b/{f.path}\n@@ -{i + 1},3 +{i + 1},3 @@\n-{old}\n+{old.rstrip()}  \n"
                + "".join(f" {c}\n" for c in ctx[1:]))

    def _misc(self, p: _Project, cmd: str) -> str:
        r = self.rng
        if cmd == "ls":
            return "\n".join(e.rstrip("/") for e in p.listing(".")) + "\n"
        if cmd == "ls -la":
            return self._ls_la(p, ".")
        if cmd == "date":
            day = r.choice(("Mon", "Tue", "Wed", "Thu", "Fri"))
            hour, minute, sec = r.randint(0, 23), r.randint(0, 59), r.randint(0, 59)
            return f"{day} Mar {r.randint(1, 28)} {hour:02d}:{minute:02d}:{sec:02d} UTC 2025\n"
        if cmd == "whoami":
            return p.root.split("/")[2] + "\n"
        if cmd == "uname -a":
            return f"Linux devbox 6.{r.randint(1, 8)}.0-{r.randint(10, 40)}-generic #1 SMP x86_64 GNU/Linux\n"
        if cmd == "npm outdated":
            return "Package  Current  Wanted  Latest  Location\n" + "".join(
                f"{k:<8} {r.randint(1, 4)}.0.0    {r.randint(4, 6)}.1.0   {r.randint(6, 9)}.0.0   node_modules/{k}\n"
                for k in r.sample(NPM_PKGS, 2))
        if cmd == "echo $PATH":
            return f"/home/{p.root.split('/')[2]}/.local/bin:/usr/local/bin:/usr/bin:/bin\n"
        if cmd == "df -h .":
            used, avail, pct = r.randint(50, 400), r.randint(20, 300), r.randint(10, 90)
            return f"Filesystem      Size  Used Avail Use% Mounted on\n/dev/nvme0n1p2  468G  {used}G  {avail}G  {pct}% /\n"
        if cmd == "git remote -v":
            url = f"git@example.com:{p.root.split('/')[2]}/{p.name}.git"
            return f"origin\t{url} (fetch)\norigin\t{url} (push)\n"
        if cmd == "cat package.json":
            return p.files["package.json"].content if "package.json" in p.files else ""
        return ""

    def _shell_summary(self, cmd: str, stdout: str, stderr: str, failed: bool) -> str:
        if failed:
            m = re.search(r"Tests:\s+(\d+) failed", stderr)
            return (f"`{cmd}` failed: {m.group(1) if m else 'some'} test(s) did not pass. "
                    "The error is a TypeError: a function received undefined instead of a list.")
        if cmd in ("npm test", "pytest -q"):
            m = re.search(r"(\d+) (passing|passed)", stdout + stderr)
            return f"All {m.group(1) if m else 'the'} tests passed."
        text = (stdout or stderr).strip()
        if not text:
            return f"`{cmd}` finished without output."
        lines = text.split("\n")
        if len(lines) == 1:
            return self.rng.choice((f"`{cmd}` printed: {lines[0]}", f"The result is `{lines[0]}`.", f"Output: {lines[0]}"))
        shown = "\n".join(lines[:8]) + ("\n..." if len(lines) > 8 else "")
        return f"`{cmd}` finished and printed {len(lines)} lines:\n\n```\n{shown}\n```"

    # -- multi-step scenarios (v1) ---------------------------------------------------------------

    def _list_then_read(self, p: _Project) -> _Turn:
        r = self.rng
        candidates = [d for d in p.dirs if d != "." and p.in_dir(d)]
        d = r.choice(candidates)
        f = sorted(p.in_dir(d), key=lambda x: x.path)[0]
        ext = f.path.rsplit(".", 1)[1]
        turn = _Turn(r.choice(("list {d} and open the first .{e} file", "look in {d} and show me the first .{e} file there",
                                "what's in {d}? read the first .{e} file you find")).format(d=d, e=ext))
        entries = self.agent.listing(p, d)
        self._step(turn, self.agent.ok("\n".join(entries)), "list_directory", d)
        self._step(turn, self.agent.ok(f.content), "read_file", f.path,
                   lead=f"`{d}` has {_count(len(entries), 'entry')}. The first .{ext} file is `{f.path}`; reading it.")
        return self._finish(turn, self._describe(f, f.path))

    def _tests_then_read(self, p: _Project) -> _Turn:
        if p.runner != "jest" or not any(f.endswith(".test.js") for f in p.files):
            return self._shell(p)
        turn = _Turn(self.rng.choice(("run the tests", "run the test suite", "execute the unit tests")))
        stdout, stderr, _ = self._npm_test(p, fail=True)
        self._step(turn, self.agent.shell("npm test", stdout, stderr, True), "run_shell_command", "npm test")
        failing = re.search(r"FAIL (\S+)", stderr).group(1)
        src = failing.replace(".test", "").replace("test/", "").replace("tests/", "").replace("__tests__/", "")
        target = next((f for f in p.files.values() if f.path.endswith("/" + src)), p.files[failing])
        self._step(turn, self.agent.ok(target.content), "read_file", target.path,
                   lead=f"A test in `{failing}` fails with a TypeError. Let me look at `{target.path}`.")
        fn = target.funcs[0] if target.funcs else "the function"
        return self._finish(turn, f"`{fn}` in `{target.path}` expects a list but the test passes an empty or "
                                  f"undefined value. Add a guard such as `if (!input) return [];` at the top of `{fn}`.")

    def _bump_version(self, p: _Project) -> _Turn:
        if "package.json" not in p.files:
            return self._replace(p)
        r = self.rng
        new = f"{r.randint(0, 4)}.{r.randint(0, 15)}.{r.randint(0, 9)}"
        turn = _Turn(r.choice(("bump the version in package.json to {v}", "set the package version to {v}",
                                "update package.json to version {v}")).format(v=new))
        pkg = p.files["package.json"]
        self._step(turn, self.agent.ok(pkg.content), "read_file", "package.json")
        old, new_s = f'"version": "{p.version}"', f'"version": "{new}"'
        self._step(turn, self.agent.ok(self.agent.replaced("package.json", old, new_s)), "replace_in_file",
                   "package.json", old, new_s, lead=f"The current version is {p.version}. Updating it to {new}.")
        return self._finish(turn, f"package.json now has version {new} (was {p.version}).")

    def _mkdir_then_write(self, p: _Project) -> _Turn:
        r = self.rng
        d = self._new_dir(p)
        name, text = r.choice(("README.md", "notes.txt", "index.js", "todo.md", ".gitkeep.txt")), r.choice(TEXTS)
        turn = _Turn(r.choice(("create a folder {d} with a file {f} containing '{t}'",
                                "make the directory {d} and write '{t}' to {d}/{f}")).format(d=d, f=name, t=text))
        path = f"{d}/{name}"
        if r.random() < 0.3:  # both calls in one reply: the v1 agent runs every block
            reply1, c1 = self._call_reply("create_directory", d, lead="")
            reply2, c2 = self._call_reply("write_file", path, text, lead="")
            turn.replies.append("I'll create the folder and the file.\n\n" + reply1 + "\n" + reply2)
            turn.executions += [(c1, self.agent.ok(f"Directory {d} created successfully.")),
                                (c2, self.agent.ok(self.agent.written(path)))]
            turn.calls += [ToolCall("create_directory", (d,), None, c1), ToolCall("write_file", (path, text), None, c2)]
        else:
            self._step(turn, self.agent.ok(f"Directory {d} created successfully."), "create_directory", d)
            self._step(turn, self.agent.ok(self.agent.written(path)), "write_file", path, text,
                       lead=f"The folder exists now. Writing `{path}`.")
        return self._finish(turn, f"Created `{d}` and wrote '{text}' to `{path}`.")

    def _search_then_replace(self, p: _Project) -> _Turn:
        r = self.rng
        srcs = p.source_files()
        if not srcs:
            return self._search(p)
        f = r.choice(srcs)
        old = r.choice(f.funcs)
        new = self._renamed(old)
        phrase = r.choice(("find '{o}' in {p} and replace it with '{n}'", "look for {o} in {p} and rename it to {n}"))
        turn = _Turn(phrase.format(o=old, p=f.path, n=new))
        self._step(turn, self.agent.ok(self.agent.search(f.path, old, f)), "search_file_content", f.path, old)
        hits = sum(old in ln for ln in f.lines)
        self._step(turn, self.agent.ok(self.agent.replaced(f.path, old, new)), "replace_in_file", f.path, old, new,
                   lead=f"`{old}` appears on {hits} line{'s' if hits != 1 else ''}. Replacing it.")
        return self._finish(turn, f"Renamed `{old}` to `{new}` in `{f.path}` ({hits} line{'s' if hits != 1 else ''}).")

    def _missing_then_list(self, p: _Project) -> _Turn:
        r = self.rng
        d = r.choice([d for d in p.dirs if p.in_dir(d)])
        real = r.choice(p.in_dir(d))
        name = real.path.rsplit("/", 1)[-1]
        stem, ext = name.rsplit(".", 1) if "." in name else (name, "txt")
        missing_name = r.choice((stem + "s", stem[:-1] if len(stem) > 3 else stem + "_old", "main", "app", "utils"))
        missing_name += "." + ext
        missing = (d + "/" if d != "." else "") + missing_name
        if missing in p.files:
            return self._read(p)
        turn = _Turn(r.choice(READ_PHRASES).format(p=missing))
        self._step(turn, self.agent.not_found(missing), "read_file", missing)
        entries = self.agent.listing(p, d)
        self._step(turn, self.agent.ok("\n".join(entries)), "list_directory", d,
                   lead=f"`{missing}` does not exist. Let me see what is in `{d}`.")
        return self._finish(turn, f"There is no `{missing_name}` in `{d}`. It has: "
                                  + ", ".join(f"`{e.split(' (')[0]}`" for e in entries[:10]) + f". Did you mean `{real.path}`?")

    # -- v2-only tools -----------------------------------------------------------------------------

    def _v2_file(self, p: _Project) -> tuple[_File, str]:
        f = self._pick_file(p)
        return f, self._path_as_said(f.path)

    def _v2_metadata(self, p: _Project) -> _Turn:
        r = self.rng
        f, said = self._v2_file(p)
        turn = _Turn(r.choice(("how big is {p}?", "when was {p} last modified?", "get the metadata of {p}")).format(p=said))
        meta = {"size": len(f.content.encode()), "createdAt": f"2025-0{r.randint(1, 9)}-1{r.randint(0, 9)}T09:12:44.512Z",
                "modifiedAt": f"2025-0{r.randint(1, 9)}-2{r.randint(0, 8)}T16:03:{r.randint(10, 59)}.108Z"}
        # the agent concatenates the metadata object into a string, so it usually logs "[object Object]"
        self._step(turn, self.agent.ok("[object Object]" if r.random() < 0.5 else json.dumps(meta)), "get_file_metadata", said)
        return turn

    def _v2_diff_file(self, p: _Project) -> _Turn:
        f, said = self._v2_file(p)
        turn = _Turn(self.rng.choice(("show the git diff for {p}", "what changed in {p}?")).format(p=said))
        self._step(turn, self.agent.ok(self._git_diff(p, "git diff " + f.path)), "git_diff", said)
        return turn

    def _v2_diff_all(self, p: _Project) -> _Turn:
        f, _ = self._v2_file(p)
        turn = _Turn(self.rng.choice(("show the uncommitted changes", "git diff please",
                                      "what did I change since the last commit?")))
        self._step(turn, self.agent.ok(self._git_diff(p, "git diff " + f.path)), "git_diff")
        return turn

    def _v2_blame(self, p: _Project) -> _Turn:
        r = self.rng
        f, said = self._v2_file(p)
        turn = _Turn(r.choice(("who wrote {p}?", "git blame {p}", "show the blame for {p}")).format(p=said))
        who = r.choice(USERS).capitalize()
        blame = "\n".join(f"{r.getrandbits(32):08x} ({who} 2025-03-{r.randint(10, 28)} 1{r.randint(0, 9)}:00:00 +0000 "
                          f"{i + 1:>3}) {ln}" for i, ln in enumerate(f.lines[:60]))
        self._step(turn, self.agent.ok(blame), "git_blame", said)
        return turn

    def _v2_summarize(self, p: _Project) -> _Turn:
        _, said = self._v2_file(p)
        turn = _Turn(self.rng.choice(("summarize {p}", "add a summary of {p} to the context")).format(p=said))
        self._step(turn, self.agent.ok(f"File {said} summarized and added to context."), "summarize_file", said)
        return turn

    def _v2_update_context(self, p: _Project) -> _Turn:
        r = self.rng
        key = r.choice(("test_command", "main_file", "language", "style", "owner"))
        value = r.choice(("npm test", "src/index.js", "python", "2 spaces", r.choice(USERS)))
        turn = _Turn(r.choice(("remember that {k} is {v}", "update the context: {k} = {v}")).format(k=key, v=value))
        self._step(turn, self.agent.ok(f"Context updated: {key} = {value}"), "update_context", key, value)
        return turn

    def _v2_get_context(self, p: _Project) -> _Turn:
        r = self.rng
        f, _ = self._v2_file(p)
        turn = _Turn(r.choice(("show me the saved context", "what context do you remember?", "print the current context")))
        ctx = {"project": p.name, "test_command": "npm test" if p.kind == "node" else "pytest -q",
               "last_file": f.path, "history": [r.choice(READ_PHRASES).format(p=f.path)]}
        self._step(turn, self.agent.ok(json.dumps(ctx, indent=2)), "get_context")
        return turn

    def _v2_tools(self, p: _Project) -> _Turn:
        turn = _Turn(self.rng.choice(("what tools do you have?", "list your available tools")))
        self._step(turn, self.agent.ok(_AVAILABLE_TOOLS), "get_available_tools")
        return turn

    def _v2_regex_replace(self, p: _Project) -> _Turn:
        r = self.rng
        f = r.choice(p.source_files())
        old = r.choice(f.funcs)
        pattern, new = old + "\\b", self._renamed(old)
        phrase = r.choice(("replace every match of the regex '{x}' with '{n}' in {p}", "regex-replace '{x}' by '{n}' in {p}"))
        turn = _Turn(phrase.format(x=pattern, n=new, p=f.path))
        done = f'Successfully replaced all occurrences of "{pattern}" with "{new}" in {f.path}.'
        self._step(turn, self.agent.ok(done), "search_and_replace_in_file", f.path, pattern, new)
        return turn

    def _chat(self) -> _Turn:
        q, a = self.rng.choice(CHAT_QA)
        noun = self.rng.choice(NOUNS)
        fill = {"noun": noun, "Noun": noun.capitalize(), "nouns": _plural(noun), "field": self.rng.choice(FIELDS)}
        return _Turn(q.format(**fill), [a.format(**fill)])

    # -- noise ----------------------------------------------------------------------------------

    def _noise(self, kind: str) -> Sample | None:
        if kind == "duplicate":
            if not self.recent:
                return None
            src = self.rng.choice(self.recent)
            return Sample(src.line, "duplicate", src.prompt, src.calls)
        if kind == "garbage":
            return self._garbage()
        turn = getattr(self, "_noise_" + kind)(self.rng.choice(self.projects))
        return Sample(self._dump(turn), kind, turn.prompt, tuple(turn.calls))

    def _noise_empty_prompt(self, p: _Project) -> _Turn:
        turn = self._scenario()
        turn.prompt = ""
        return turn

    def _noise_confirmation(self, p: _Project) -> _Turn:
        turn = self._scenario()
        turn.prompt = self.rng.choice(("y", "y", "yes", "Y", "ok"))
        return turn

    def _noise_no_reply(self, p: _Project) -> _Turn:
        turn = self._scenario()
        return _Turn(turn.prompt, [""] * self.rng.choice((1, 1, 2)))

    def _noise_fabricated_output(self, p: _Project) -> _Turn:
        turn = self._scenario()
        while not turn.executions or not turn.executions[0][1].startswith(protocol.OUTPUT_OPEN):
            turn = self._scenario()
        fake = self.rng.choice(FAKE_OUTPUTS)
        glue = self.rng.choice(("\n\nOutput:\n\n", "\n\n", "\n\nAfter running this tool call, the output should be:\n\n"))
        turn.replies[0] = turn.replies[0] + glue + protocol.output(f"\n{fake}\n")
        if self.v1:  # the model stops after its invented output: keep reply 1's calls only
            n1 = len(tool_code_blocks(turn.replies[0]))
            turn.replies[1:] = [""]
            del turn.executions[n1:], turn.calls[n1:]
        return turn

    def _noise_unknown_tool(self, p: _Project) -> _Turn:
        r = self.rng
        f = self._pick_file(p)
        name, call = r.choice(UNKNOWN_CALLS)
        call = call.format(p=f.path)
        turn = _Turn(r.choice(READ_PHRASES + LIST_PHRASES).format(p=f.path, d=self._pick_dir(p)))
        turn.replies.append(protocol.code_block(call))
        turn.executions.append((call, self.agent.err(f"Unknown tool: {name}")))
        turn.calls.append(parse_call(call))
        return self._finish(turn, r.choice(("", "It seems that tool is not available.", "")))

    def _noise_all_tools_failed(self, p: _Project) -> _Turn:
        r = self.rng
        turn = _Turn("")
        d = self._pick_dir(p)
        missing = f"{d}/{r.choice(NOUNS)}_{r.choice(('old', 'backup', 'v2', 'copy'))}.{r.choice(('js', 'py', 'json'))}"
        turn.prompt = r.choice(READ_PHRASES).format(p=missing)
        self._step(turn, self.agent.not_found(missing), "read_file", missing)
        if self.v1 and r.random() < 0.5:
            gone = d + r.choice(("_old", "-backup", "2"))
            self._step(turn, self.agent.err(f"Error listing directory: {gone} not found."), "list_directory", gone,
                       lead="That file does not exist. Let me list the folder.")
        return self._finish(turn, r.choice(("I could not find that file.", "Sorry, the file does not exist.", "")))

    def _garbage(self) -> Sample:
        r = self.rng
        base = self._dump(self._scenario())
        kind = r.randrange(4)
        if kind == 0:
            line = base[: r.randint(1, max(1, len(base) - 2))]
        elif kind == 1:
            line = base.replace('","', '" "', 1) if '","' in base else base[:-1]
        elif kind == 2:
            line = r.choice(("Error: ECONNREFUSED 127.0.0.1:11434", "undefined", "[object Object]",
                             "--- Executing Tool: read_file(./test.txt) ---"))
        else:
            line = "{'user_prompt': 'hello', 'ai_responses': []}"
        return Sample(line, "garbage")


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.I)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """Bytes in a size like ``1GB`` (10^9), ``512MiB`` (2^29), ``2000``."""
    m = _SIZE_RE.match(text)
    unit = (m.group(2) or "").lower() if m else None
    if not m or unit not in _UNITS:
        raise SamplesError(f"cannot read the size {text!r}; write it like 1GB, 500MB or 64MiB")
    return int(float(m.group(1)) * _UNITS[unit])


def main(argv: list[str] | None = None) -> int:
    """``python -m lacd.samples OUT.jsonl --lines N | --size 1GB [--seed S] [--noise F] [--version v2]``."""
    ap = argparse.ArgumentParser(prog="python -m lacd.samples", description="Write a generated local-ai-coder log.")
    ap.add_argument("out", type=Path, help="file to write (overwritten)")
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--lines", type=int, help="number of lines")
    group.add_argument("--size", help="stop once this size is reached, e.g. 1GB, 200MB")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--noise", type=float, default=0.0, help="fraction of lines with a defect (0-1)")
    ap.add_argument("--version", choices=VERSIONS, default="v1", help="agent version whose format to write")
    ap.add_argument("--garbage", action="store_true", help="also write rare invalid JSON lines")
    ap.add_argument("--chat", type=float, default=0.0, help="fraction of clean lines without a tool call")
    ns = ap.parse_args(argv)
    try:
        size = parse_size(ns.size) if ns.size else None
        started = time.perf_counter()
        lines = write_log(ns.out, ns.lines, size, ns.seed, ns.noise, ns.version, garbage=ns.garbage, chat=ns.chat)
    except (SamplesError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - started
    nbytes = ns.out.stat().st_size
    print(f"wrote {lines} lines, {nbytes} bytes to {ns.out} in {seconds:.1f}s ({nbytes / 1e6 / max(seconds, 1e-9):.1f} MB/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
