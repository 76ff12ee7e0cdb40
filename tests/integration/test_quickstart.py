"""The README's first command: `lacd quickstart`, with and without an Ollama to register with."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import ollama
import pytest

from conftest import lacd_env
from ollama_standin import StandIn
from tiny import make_tiny_llama


def quickstart(tmp_path, *extra, **env) -> subprocess.CompletedProcess:
    base_env = lacd_env(tmp_path, tmp_path / "unused.jsonl", **env)
    return subprocess.run([sys.executable, "-m", "lacd", "quickstart", "--dir", str(tmp_path / "qs"), *extra],
                          env=base_env, capture_output=True, text=True, timeout=1500)


def test_without_ollama_it_says_where_the_gguf_is_and_how_to_register_it(tmp_path):
    base = make_tiny_llama(tmp_path / "tiny", tokenizer="bpe")
    system = tmp_path / "system.txt"
    system.write_text("You are a coding agent.")
    result = quickstart(tmp_path, "--lessons", "8", LACD_MODEL_BASE=base, LACD_MODEL_SYSTEM_PROMPT=system,
                        LACD_OLLAMA_HOST="http://127.0.0.1:9", LACD_TRAIN_MAX_SEQ_LEN=384)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "qs" / "state" / "runs" / "1"
    assert f"the model is {run_dir / 'model.gguf'}" in result.stdout
    assert f"cd {run_dir} && ollama create lacd-coder:latest -f Modelfile" in result.stdout
    assert (run_dir / "model.gguf").stat().st_size > 0
    assert (run_dir / "Modelfile").read_text().startswith("FROM ./model.gguf\nTEMPLATE \"\"\"")


@pytest.mark.slow
def test_the_embedded_default_cycle_on_smollm2(tmp_path):
    with StandIn(tmp_path / "ollama") as s:
        result = quickstart(tmp_path, "--lessons", "12", LACD_OLLAMA_HOST=s.host)
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"registered with Ollama at {s.host} as lacd-coder:v1 and lacd-coder:latest" in result.stdout
        answer = ollama.Client(host=s.host).generate(model="lacd-coder:latest", prompt="list the files in src",
                                                     options={"num_predict": 8})
        assert answer.done and isinstance(answer.response, str)
    status = subprocess.run([sys.executable, "-m", "lacd", "status", "--json"], capture_output=True, text=True,
                            env={**os.environ, "LACD_STATE_DIR": str(tmp_path / "qs" / "state")})
    run = json.loads(status.stdout)["runs"][0]
    assert run["status"] == "done" and run["lessons"] >= 8
