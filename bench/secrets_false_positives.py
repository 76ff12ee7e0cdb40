"""Secret scanning numbers: false positives on ordinary input, scanning speed, ingestion cost.

    python bench/secrets_false_positives.py                   # the README's numbers
    python bench/secrets_false_positives.py --code-lines 5000 --ingest-mb 0   # a quick look
    python bench/secrets_false_positives.py --show 20         # print the redacted lines found in code

Corpora (nothing in them is a real secret, so every finding is a false positive or a test fixture):
1. fixture: the real agent lines in shared/fixtures/local-ai-coder/agent_interactions.jsonl;
2. samples: generated ordinary lines (lacd.samples: v1 with 10% noise, v2 with 20% chat);
3. code: the standard library's Python files (evenly spread over the tree), cut into 60-line
   chunks, each wrapped as the output of ``read_file('<path>')`` in a local-ai-coder line.
For each: lines scanned, findings by kind, and lines/s (CPU time) of ``Scrubber.scrub_lesson`` (raw
line and messages together, the ingest path) and of ``Scrubber.scrub_messages`` alone.
4. ingest: ``lacd ingest``'s own code path in this process on a generated log, without and with
   scrubbing (``[secrets] scan`` off and on, every line classified in-process): lines/s of CPU time.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path


from lacd.ingest.lessons import LineRejected, parse_line
from lacd.ingest.secrets import Scrubber
from lacd.samples import generate_lines

FIXTURE = Path(__file__).resolve().parents[2] / "shared/fixtures/local-ai-coder/agent_interactions.jsonl"
PLACEHOLDER = re.compile(r"<redacted:([a-z-]+)>")


def fixture_lines() -> list[str]:
    if not FIXTURE.exists():
        return []
    return [line for line in FIXTURE.read_text(encoding="utf-8").splitlines() if line.strip()]


def sample_lines(n: int) -> list[str]:
    half = n // 2
    return (list(generate_lines(half, seed=7, noise=0.1))
            + list(generate_lines(n - half, seed=8, version="v2", chat=0.2, noise=0.1)))


def code_lines(root: Path, max_lines: int) -> list[tuple[str, str]]:
    """(relative path, 60-line chunk) pairs from Python files spread evenly over ``root``."""
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    out: list[tuple[str, str]] = []
    total, step = 0, max(1, len(files) * 300 // max(max_lines, 1))
    for path in files[::step]:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (UnicodeDecodeError, OSError):
            continue
        rel = str(path.relative_to(root))
        for i in range(0, len(lines), 60):
            out.append((rel, "\n".join(lines[i:i + 60])))
            total += len(lines[i:i + 60])
            if total >= max_lines:
                return out
    return out


def as_read_file(rel: str, chunk: str) -> str:
    call = f"read_file('{rel}')"
    return json.dumps({"user_prompt": f"show me {rel}", "ai_responses": [f"<tool_code>\n{call}\n</tool_code>", "Here it is."],
                       "tool_executions": [{"tool_call": call, "tool_output": f"<tool_output>{chunk}</tool_output>"}]})


def scan(scrubber: Scrubber, lines: list[str], show: int, label: str) -> dict:
    parsed = []
    for line in lines:
        try:
            parsed.append((line, parse_line(line).messages))
        except LineRejected:
            pass
    kinds: collections.Counter = collections.Counter()
    examples = []
    started = time.process_time()
    for line, messages in parsed:
        result = scrubber.scrub_lesson(line, messages)
        kinds.update(result.counts())
        if result.findings and len(examples) < show:
            examples += _examples(result)
    cpu = time.process_time() - started
    started = time.process_time()
    for _, messages in parsed:
        scrubber.scrub_messages(messages)
    cpu_messages = time.process_time() - started
    for example in examples[:show]:
        print(f"  [{label}] {example}")
    return {"corpus": label, "lines": len(parsed), "findings": sum(kinds.values()), "kinds": dict(kinds),
            "lines_per_s": len(parsed) / cpu if cpu else float("inf"),
            "messages_per_s": len(parsed) / cpu_messages if cpu_messages else float("inf")}


def _examples(result) -> list[str]:
    out = []
    for message in result.messages:
        content = message.get("content") or ""
        for m in PLACEHOLDER.finditer(content):
            start = content.rfind("\n", 0, m.start()) + 1
            end = content.find("\n", m.end())
            out.append(content[start:end if end >= 0 else None].strip()[:160])
    return out


def ingest_rate(size_mb: float, scrub: bool) -> dict:
    """``lacd ingest``'s code path in this process (no worker processes) on a fresh state, with
    ``[secrets] scan`` on or off; lines/s of CPU time."""
    from lacd import config, db, logs, service
    from lacd.samples import write_log

    work = Path(tempfile.mkdtemp(prefix="lacd-secrets-bench-"))
    log = work / "agent_interactions.jsonl"
    lines = write_log(log, size_bytes=int(size_mb * (1 << 20)), seed=1, noise=0.1)
    env = {"LACD_STATE_DIR": str(work / "state"), "LACD_WATCH_LOG": str(log), "LACD_LOG_LEVEL": "warning",
           "LACD_SECRETS_SCAN": "true" if scrub else "false"}
    settings = config.load(env={**{k: v for k, v in os.environ.items() if not k.startswith("LACD_")}, **env})
    logs.setup("warning")
    try:
        service.prepare_state_dir(settings)
        engine = db.write_engine(settings.db_path)
        db.migrate(engine)
        tailer = service.open_tailer(settings, engine)
        tailer.workers = 0  # every line classified in this process, so its CPU time is all of it
        tailer.start()
        started = time.process_time()
        stats = tailer.sync()
        cpu = time.process_time() - started
        tailer.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"scrub": scrub, "lines": lines, "lessons": stats.lessons, "cpu_s": cpu, "lines_per_s": lines / cpu}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=20000, help="generated ordinary lines (default 20000)")
    ap.add_argument("--code-lines", type=int, default=100000, help="lines of stdlib code wrapped as read_file outputs")
    ap.add_argument("--code-root", type=Path, default=Path(sysconfig.get_paths()["stdlib"]), help="where the code comes from")
    ap.add_argument("--ingest-mb", type=float, default=50, help="size of the log for the ingest comparison (0: skip)")
    ap.add_argument("--show", type=int, default=0, help="print up to N redacted lines per corpus")
    args = ap.parse_args(argv)

    scrubber = Scrubber()
    rows = []
    fixture = fixture_lines()
    if fixture:
        rows.append(scan(scrubber, fixture, args.show, "fixture"))
    rows.append(scan(scrubber, sample_lines(args.samples), args.show, "samples"))
    chunks = code_lines(args.code_root, args.code_lines)
    rows.append(scan(scrubber, [as_read_file(rel, chunk) for rel, chunk in chunks], args.show, "code"))
    rows[-1]["code_lines"] = sum(chunk.count("\n") + 1 for _, chunk in chunks)

    print("| corpus | lines scanned | findings | by kind | scrub_lesson lines/s | scrub_messages lines/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        scanned = f"{r['lines']:,}" + (f" ({r['code_lines']:,} code lines)" if "code_lines" in r else "")
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(r["kinds"].items())) or "-"
        print(f"| {r['corpus']} | {scanned} | {r['findings']} | {kinds} | {r['lines_per_s']:,.0f} | {r['messages_per_s']:,.0f} |")
    if args.ingest_mb > 0:
        ingest_rate(1, True)  # warm-up: imports, migrations and first-use costs out of the measured runs
        plain, scrubbed = ingest_rate(args.ingest_mb, False), ingest_rate(args.ingest_mb, True)
        print()
        print("| ingest (CPU time, in-process) | lines | lines/s |")
        print("|---|---|---|")
        for r in (plain, scrubbed):
            print(f"| {'with' if r['scrub'] else 'without'} secret scrubbing | {r['lines']:,} | {r['lines_per_s']:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
