"""lacd.pipeline.register against the Ollama stand-in, through the official ollama client."""

from __future__ import annotations

import shutil
from pathlib import Path

import ollama
import pytest
import torch

from lacd.pipeline import register as reg
from ollama_standin import free_port, start_process, stub_gguf

CHATML = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
    "<|im_start|>assistant\n"
)
SYSTEM = "You are a helpful AI coding assistant."
PARAMETERS = {"stop": ["<|im_end|>"], "num_ctx": 2048}


@pytest.fixture
def client(server):
    return reg.make_client(server.host, timeout_s=30)


@pytest.fixture
def stubs(tmp_path):
    """stubs(n) -> n small GGUF files with different digests (F16)."""
    return lambda n: [stub_gguf(tmp_path / f"v{i}.gguf", name=f"run-{i}") for i in range(1, n + 1)]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    """A tiny random Llama exported to GGUF by lacd's exporter, for tests that generate."""
    from lacd.export import export_gguf
    from tiny import make_tiny_llama

    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("tiny")
    make_tiny_llama(folder / "hf", tokenizer="bpe")
    return export_gguf(folder / "hf", None, folder / "tiny.gguf", outtype="f16").path


def blob_requests(server, method: str) -> list[dict]:
    return [r for r in server.requests if r["method"] == method and r["path"].startswith("/api/blobs/")]


def test_push_blob_skips_the_upload_when_ollama_has_the_digest(server, client, stubs):
    [gguf] = stubs(1)
    first = reg.push_blob(client, gguf)
    second = reg.push_blob(client, gguf)

    assert first == second == reg.file_digest(gguf)
    assert len(blob_requests(server, "HEAD")) == 2
    assert len(blob_requests(server, "POST")) == 1
    assert blob_requests(server, "POST")[0]["body"] == {"bytes": gguf.stat().st_size}


def test_create_version_registers_template_system_parameters_and_quantize(server, client, tiny_gguf):
    gguf = tiny_gguf  # a real model: llama.cpp's quantizer (the stand-in's, when installed) loads it
    statuses: list[str] = []
    tag = reg.create_version(client, "coder", 1, gguf, CHATML, SYSTEM, PARAMETERS, "q8_0", statuses.append)

    assert tag == "coder:v1"
    assert statuses[0] == "parsing GGUF" and statuses[-1] == "success"
    assert "quantizing F16 model to Q8_0" in statuses
    shown = client.show(tag)
    assert shown.template == CHATML
    assert f'SYSTEM """{SYSTEM}"""' in shown.modelfile
    assert 'PARAMETER stop "<|im_end|>"' in shown.modelfile and "PARAMETER num_ctx 2048" in shown.modelfile
    assert shown.details.quantization_level == "Q8_0"
    [sent] = [r["body"] for r in server.requests if r["path"] == "/api/create"]
    assert sent["files"] == {"model.gguf": reg.file_digest(gguf)}
    assert (sent["template"], sent["system"], sent["parameters"]) == (CHATML, SYSTEM, PARAMETERS)
    assert sent["quantize"] == "q8_0"
    assert sent["stream"] is True


def test_create_version_without_quantize_keeps_the_file_type(server, client, stubs):
    [gguf] = stubs(1)
    reg.create_version(client, "coder", 3, gguf, CHATML, "", {}, None)

    [sent] = [r["body"] for r in server.requests if r["path"] == "/api/create"]
    assert "quantize" not in sent and "system" not in sent and "parameters" not in sent
    assert client.show("coder:v3").details.quantization_level == "F16"


def test_refusals_are_register_errors_with_ollamas_message(client, tmp_path, stubs):
    quantized = stub_gguf(tmp_path / "q8.gguf", file_type=7)
    with pytest.raises(reg.RegisterError, match="only supported for F16, BF16 and F32 models") as err:
        reg.create_version(client, "coder", 1, quantized, CHATML, SYSTEM, PARAMETERS, "q4_K_M")
    assert err.value.status_code is None  # Ollama reports it inside the status stream

    with pytest.raises(reg.RegisterError, match="not found") as err:
        reg.promote(client, "coder", "coder:v7")
    assert err.value.status_code == 404
    assert not isinstance(err.value, reg.OllamaUnavailable)

    if shutil.which("go") is not None:
        [gguf] = stubs(1)
        with pytest.raises(reg.RegisterError, match="template error") as err:
            reg.create_version(client, "coder", 2, gguf, "{{ if .Messages }}unclosed", SYSTEM, PARAMETERS)
        assert err.value.status_code == 400


def test_promote_points_latest_at_the_version(client, stubs):
    one, two = stubs(2)
    reg.create_version(client, "coder", 1, one, CHATML, SYSTEM, PARAMETERS)
    reg.create_version(client, "coder", 2, two, CHATML, SYSTEM, PARAMETERS)
    versions = reg.list_versions(client, "coder")
    assert sorted(versions) == [1, 2] and versions[1] != versions[2]

    assert reg.promote(client, "coder", "coder:v1") == "coder:latest"
    assert reg.latest_digest(client, "coder") == versions[1]
    reg.promote(client, "coder", "coder:v2")
    assert reg.latest_digest(client, "coder") == versions[2]


def test_prune_keeps_the_newest_the_protected_and_the_one_in_use(server, client, stubs):
    files = stubs(5)
    for number, gguf in enumerate(files, start=1):
        reg.create_version(client, "coder", number, gguf, CHATML, SYSTEM, PARAMETERS)
    reg.create_version(client, "other", 1, files[0], CHATML, SYSTEM, PARAMETERS)
    reg.promote(client, "coder", "coder:v2")

    assert reg.prune_versions(client, "coder", keep=2, protect={"coder:v1"}) == ["coder:v3"]
    assert sorted(reg.list_versions(client, "coder")) == [1, 2, 4, 5]
    assert reg.prune_versions(client, "coder", keep=1, protect=set()) == ["coder:v4", "coder:v1"]
    assert sorted(reg.list_versions(client, "coder")) == [2, 5]
    assert {m.model for m in client.list().models} == {"coder:v2", "coder:v5", "coder:latest", "other:v1"}

    uploads = len(blob_requests(server, "POST"))
    reg.push_blob(client, files[3])  # v4's blob went with v4: Ollama needs it again
    reg.push_blob(client, files[0])  # v1's blob is still used by other:v1
    assert len(blob_requests(server, "POST")) == uploads + 1
    with pytest.raises(ValueError):
        reg.prune_versions(client, "coder", keep=-1, protect=set())


def test_registered_model_answers_and_unload_all_empties_ps(server, client, tiny_gguf):
    if shutil.which("go") is None:
        pytest.skip("`go` is not installed: the stand-in renders .Messages templates with it")
    tag = reg.create_version(client, "coder", 1, tiny_gguf, CHATML, SYSTEM, PARAMETERS)
    reg.promote(client, "coder", tag)

    answer = client.generate(model="coder:latest", prompt="list the files", options={"num_predict": 4})
    assert answer.done and answer.eval_count > 0
    assert server.prompts[-1].startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nlist the files")
    client.generate(model=tag)  # an empty prompt loads a model
    assert {m.model for m in client.ps().models} == {"coder:latest", "coder:v1"}

    assert sorted(reg.unload_all(client)) == ["coder:latest", "coder:v1"]
    assert client.ps().models == []
    unloads = [r["body"] for r in server.requests if r["path"] == "/api/generate" and "keep_alive" in r["body"]]
    assert all(body["keep_alive"] == 0 and "prompt" not in body for body in unloads) and len(unloads) == 2
    assert reg.unload_all(client) == []


def test_nothing_listening_is_ollama_unavailable(tmp_path, stubs):
    [gguf] = stubs(1)
    client = reg.make_client(f"http://127.0.0.1:{free_port()}", timeout_s=5)

    assert reg.is_reachable(client) is False
    with pytest.raises(reg.OllamaUnavailable, match="not reachable at http://127.0.0.1"):
        reg.create_version(client, "coder", 1, gguf, CHATML, SYSTEM, PARAMETERS)
    with pytest.raises(reg.OllamaUnavailable):
        reg.unload_all(client)


def test_proxy_errors_count_as_unavailable(client):
    with pytest.raises(reg.OllamaUnavailable, match="unavailable \\(503\\)"):
        with reg.ollama_calls(client, "list models"):
            raise ollama.ResponseError("service unavailable", 503)
    with pytest.raises(reg.RegisterError, match="Ollama refused to list models: boom \\(HTTP 500\\)"):
        with reg.ollama_calls(client, "list models"):
            raise ollama.ResponseError("boom", 500)


def test_ollama_down_then_back(tmp_path, stubs):
    """Kill the stand-in process: register fails as unavailable; restart it: the same client works on."""
    one, two = stubs(2)
    store, port = tmp_path / "ollama", free_port()
    procs = [start_process(store, port)]
    try:
        client = reg.make_client(f"http://127.0.0.1:{port}", timeout_s=30)
        reg.create_version(client, "coder", 1, one, CHATML, SYSTEM, PARAMETERS)
        assert reg.is_reachable(client)

        procs[0].kill()
        procs[0].wait(timeout=10)
        assert reg.is_reachable(client) is False
        with pytest.raises(reg.OllamaUnavailable):
            reg.create_version(client, "coder", 2, two, CHATML, SYSTEM, PARAMETERS)

        procs.append(start_process(store, port))
        assert reg.is_reachable(client)
        assert sorted(reg.list_versions(client, "coder")) == [1]  # the store kept v1
        reg.create_version(client, "coder", 2, two, CHATML, SYSTEM, PARAMETERS)
        reg.promote(client, "coder", "coder:v2")
        assert reg.latest_digest(client, "coder") == reg.list_versions(client, "coder")[2]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=10)


def test_tags_and_versions():
    assert reg.version_tag("coder", 3) == "coder:v3"
    assert reg.parse_version("coder:v12", "coder") == 12
    assert reg.parse_version("registry.example/library/coder:v2", "coder") == 2
    assert reg.parse_version("coder:latest", "coder") is None
    assert reg.parse_version("coder2:v1", "coder") is None
    with pytest.raises(ValueError):
        reg.version_tag("coder", 0)


# --------------------------------------------------------------------------- quantized registration


def _base_from(tmp_path: Path, file_type: int | None) -> Path:
    """A base folder as lacd.basemodel leaves it: converted from a GGUF of this file type (None: an HF folder)."""
    import json

    base = tmp_path / f"base-{file_type}"
    base.mkdir()
    if file_type is not None:
        source = stub_gguf(tmp_path / f"source-{file_type}.gguf", file_type=file_type)
        (base / "lacd_source.json").write_text(json.dumps({"source_gguf": str(source)}))
    return base


@pytest.mark.parametrize("file_type, setting, outtype, expected", [
    (2, "", "f16", "q4_K_M"),  # Q4_0, ollama:codellama's blob: stays 4-bit
    (3, "", "f16", "q4_K_M"),  # Q4_1, the embedded SmolLM2
    (15, "", "f16", "q4_K_M"),  # Q4_K_M
    (7, "", "f16", "q8_0"),  # Q8_0
    (18, "", "f16", "q8_0"),  # Q6_K
    (1, "", "f16", None),  # an F16 GGUF
    (None, "", "f16", None),  # an HF folder
    (2, "f16", "f16", None),  # the user keeps full precision
    (None, "q4_K_S", "f16", "q4_K_S"),  # the user asks for it
    (2, "", "q8_0", None),  # an export Ollama cannot quantize further
])
def test_choose_quantize_keeps_the_served_model_as_small_as_the_base(tmp_path, file_type, setting, outtype, expected):
    chosen, why = reg.choose_quantize(setting, _base_from(tmp_path, file_type), outtype)
    assert chosen == expected
    assert why  # the reason is logged and kept in the register stage's result


@pytest.mark.skipif(shutil.which("go") is None, reason="the ChatML TEMPLATE needs go to render")
@pytest.mark.parametrize("setting", ["", "f16"])
def test_register_stage_quantizes_for_a_quantized_base_and_evaluation_sees_the_served_file(
        tmp_path, server, client, tiny_gguf, setting):
    """The real register stage against the stand-in (which quantizes as Ollama does), then the
    evaluation's Ollama generator: it is answered by the quantized blob, not the exported f16 file."""
    import threading

    import gguf
    from sqlalchemy import insert

    from conftest import lacd_env
    from lacd import config, db
    from lacd.models import Run
    from lacd.pipeline.evaluate import Case, choose_generators, generate_ollama
    from lacd.pipeline.stages import RunContext, _compared_models, register_stage
    from lacd.pipeline.results import FormatStageResult
    from lacd.runs import RunStore
    from lacd.versions import VersionStore

    settings = config.load(env=lacd_env(tmp_path, tmp_path / "agent.jsonl", LACD_OLLAMA_HOST=server.host,
                                        LACD_OLLAMA_QUANTIZE=setting))  # fmt: skip
    store = RunStore(db.write_engine(settings.db_path))
    db.migrate(store.engine)
    with store.engine.begin() as conn:
        run_id = conn.execute(insert(Run).values(status="running", created_at=1.0, lesson_count=1,
                                                 reason="threshold")).inserted_primary_key[0]  # fmt: skip
    store.begin_stage(run_id, "format")
    store.finish_stage(run_id, "format", FormatStageResult(base_dir=str(_base_from(tmp_path, 2)), family="chatml"))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(tiny_gguf, run_dir / "model.gguf")
    ctx = RunContext(run_id, run_dir, settings, store, VersionStore(store.engine), lambda _p: None, threading.Event())

    store.begin_stage(run_id, "register")
    result = register_stage(ctx)
    store.finish_stage(run_id, "register", result)  # as the executor records it
    [sent] = [r["body"] for r in server.requests if r["path"] == "/api/create"]
    served = Path(client.show(result.tag).modelfile.split("\nFROM ", 1)[1].split("\n", 1)[0])
    kinds = {t.tensor_type.name for t in gguf.GGUFReader(served).tensors}
    if setting == "":
        assert result.quantize == sent["quantize"] == "q4_K_M"
        assert client.show(result.tag).details.quantization_level == "Q4_K_M"
        assert "F16" not in kinds and served.stat().st_size < tiny_gguf.stat().st_size / 2.2  # 4-6 bit blocks
    else:
        assert result.quantize is None and "quantize" not in sent
        assert served.read_bytes() == tiny_gguf.read_bytes()

    candidate, incumbent = _compared_models(ctx)  # what the evaluate stage measures next
    generators = choose_generators(candidate, incumbent, ollama_reachable=True)
    if setting == "":  # the served, quantized file through Ollama; the base (not served) with transformers
        assert (candidate.gguf, candidate.adapter_dir, candidate.ollama_tag) == (None, None, result.tag)
        assert generators == {"candidate": "ollama", "incumbent": "transformers"}
    else:  # full precision: the exported file is what Ollama serves
        assert candidate.gguf == run_dir / "model.gguf" and generators["candidate"] == "transformers"
    generate_ollama(client, result.tag, [Case(1, "", [{"role": "user", "content": "hi"}], "")], 2)
    assert server.completions[-1]["blob"] == f"sha256:{served.name.removeprefix('sha256-')}"
