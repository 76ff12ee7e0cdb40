"""Issue 7's proof: a log full of realistic secrets goes through ingestion and a whole learning
cycle (format, train, export, evaluate, register with the stand-in Ollama), and none of the secrets
is in any byte lacd wrote: the database and its WAL, the run folder (dataset, checkpoints, adapter,
GGUF, report), the Modelfile and blobs it sent to Ollama, and the logs (at info level)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from conftest import run_cli
from secrets_corpus import corpus, leaked
from test_cycle import cycle_env, tiny_base  # noqa: F401 - the module fixture
from ollama_standin import StandIn
from lacd.samples import generate_lines


def all_bytes(*folders: Path) -> str:
    parts = []
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                parts.append(path.read_bytes().decode("latin-1"))
    return "\n".join(parts)


def dataset_text(dataset_dir: Path, base: Path) -> str:
    """Every split's token ids decoded with the base tokenizer: the dataset stores ids, so a secret
    that reached training is in no byte of the run folder, only in this text."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    splits = load_from_disk(str(dataset_dir))
    return "\n".join(tokenizer.decode(ids) for split in splits.values() for ids in split["input_ids"])


def test_no_secret_survives_a_whole_cycle_and_files_are_private(tmp_path, tiny_base):  # noqa: F811
    lines, planted = corpus(seed=23)
    ordinary = list(generate_lines(8, seed=4))
    with StandIn(tmp_path / "ollama") as standin:
        env = cycle_env(tmp_path, tiny_base, standin.host)
        env.update(LACD_QUEUE_THRESHOLD="1000", LACD_QUEUE_HELDOUT_PCT="20", LACD_RUN_KEEP_GGUF="true",
                   LACD_EVALUATE_MAX_CASES="2", LACD_EVALUATE_MAX_NEW_TOKENS="8", LACD_LOG_LEVEL="info")
        Path(env["LACD_WATCH_LOG"]).write_text("\n".join(ordinary[:4] + lines + ordinary[4:]) + "\n")
        ingest = run_cli("ingest", env=env)
        assert ingest.returncode == 0, ingest.stderr
        train = run_cli("train", env=env, timeout=600)
        assert train.returncode == 0 or "rejected" in train.stdout, train.stderr[-3000:]
        status = json.loads(run_cli("status", "--json", env=env).stdout)
        requests = json.dumps(standin.requests)
    state = Path(env["LACD_STATE_DIR"])
    run_dir = state / "runs" / str(status["runs"][0]["id"])
    assert (run_dir / "model.gguf").exists() and status["runs"][0]["lessons"] > len(ordinary)
    trained_on = dataset_text(run_dir / "dataset", tiny_base)
    assert "<redacted:" in trained_on and "<tool_code>" in trained_on  # the decoded text is the lessons'
    everything = (all_bytes(state, tmp_path / "ollama") + trained_on + ingest.stderr + train.stdout + train.stderr
                  + requests)
    for p in planted:
        assert not leaked(p.secret, everything), f"{p.kind} planted in line {p.line} survived"
    assert set(status["secrets"]) >= {p.kind for p in planted}
    for path in [state, *state.rglob("*")]:  # private: 0700 folders, 0600 files
        mode = stat.S_IMODE(os.stat(path).st_mode)
        assert mode & 0o077 == 0, f"{path} is {oct(mode)}"
