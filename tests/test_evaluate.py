"""The evaluate stage: protocol metrics, held-out prompts, both generators, the child process.

Tests use a tiny random Llama (tests/tiny.py) exported to GGUF by lacd's exporter and the stand-in
Ollama. The learning test (SmolLM2-135M, one real cycle through the gate) is in
tests/test_gate_learning.py.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from lacd.ingest.lessons import parse_line
from lacd.pipeline import template as tpl
from lacd.pipeline.evaluate import (
    EvalSpec,
    ModelRef,
    choose_generators,
    evaluate_candidate,
    generate_ollama,
    generate_transformers,
    heldout_prompts,
    incumbent_ref,
    overall_generator,
    protocol_metrics,
)
from lacd.pipeline.format import FormatSpec, LessonIn, format_lessons
from lacd.protocol import TOOLS, TOOLS_V2
from lacd.samples import generate_lessons

needs_go = pytest.mark.skipif(shutil.which("go") is None, reason="`go` is not installed: .Messages templates need it")
SYSTEM = "You are a coding agent. Call tools in <tool_code> blocks."
REF_READ = "I'll read it.\n\n<tool_code>\nread_file('src/app.js')\n</tool_code>"


# --------------------------------------------------------------------------- protocol metrics


def test_exact_and_name_accuracy_compare_parsed_first_calls():
    references = [REF_READ, REF_READ, REF_READ, REF_READ]
    generations = [
        'Reading.\n<tool_code>\nread_file("src/app.js")\n</tool_code>',  # other quotes: same call
        "<tool_code>read_file('src/index.js')</tool_code>",  # right tool, wrong argument
        "<tool_code>list_directory('src')</tool_code>",  # wrong tool
        "I cannot do that.",  # no call
    ]
    m = protocol_metrics(generations, references, TOOLS, [True] * 4)
    assert m["exact_call_accuracy"] == 0.25
    assert m["tool_name_accuracy"] == 0.5
    assert m["tool_call_validity"] == 1.0  # the three blocks written are valid calls
    assert (m["n_cases"], m["n_expected_calls"], m["blocks_written"]) == (4, 4, 3)


def test_only_the_first_call_counts_for_accuracy_but_every_block_for_validity():
    generation = ("<tool_code>read_file('src/app.js')</tool_code>\n<tool_code>read_file()</tool_code>\n"
                  "<tool_code>rm -rf /</tool_code>")
    m = protocol_metrics([generation], [REF_READ], TOOLS, [True])
    assert m["exact_call_accuracy"] == 1.0
    assert m["tool_call_validity"] == pytest.approx(1 / 3, abs=1e-4)  # wrong arity, unparsable


@pytest.mark.parametrize("block, valid", [
    ("read_file('a')", True),
    ("read_file('a', 'b')", False),  # read_file takes 1 argument
    ("list_directory('src', '*.js')", True),  # 1 to 2
    ("get_project_context()", True),
    ("delete_everything('x')", False),  # unknown tool
    ("read_file(path)", False),  # not a string literal
])
def test_validity_follows_the_configured_tools_and_arities(block, valid):
    m = protocol_metrics([f"<tool_code>{block}</tool_code>"], [REF_READ], TOOLS, [True])
    assert m["tool_call_validity"] == (1.0 if valid else 0.0)


def test_tool_set_is_configurable():
    generation = "<tool_code>git_diff('src/app.js')</tool_code>"
    assert protocol_metrics([generation], [REF_READ], TOOLS, [True])["tool_call_validity"] == 0.0
    assert protocol_metrics([generation], [REF_READ], TOOLS_V2, [True])["tool_call_validity"] == 1.0


def test_a_reference_without_a_call_wants_a_reply_without_one():
    reference = "Python lists are ordered and mutable."
    m = protocol_metrics(["Lists are mutable.", "<tool_code>read_file('a')</tool_code>"], [reference] * 2,
                         TOOLS, [True, True])
    assert m["exact_call_accuracy"] == 0.5 and m["tool_name_accuracy"] == 0.5
    assert m["n_expected_calls"] == 0


def test_fabricated_output_and_clean_stop_rates():
    generations = [
        REF_READ + "\n\nOutput:\n<tool_output>\nconsole.log(1)\n</tool_output>",
        REF_READ + "\n<tool_error>no such file</tool_error>",
        REF_READ,
        REF_READ,
    ]
    m = protocol_metrics(generations, [REF_READ] * 4, TOOLS, [True, False, False, True])
    assert m["fabricated_output_rate"] == 0.5
    assert m["clean_stop_rate"] == 0.5
    assert m["exact_call_accuracy"] == 1.0  # the call itself was right each time


def test_no_cases_gives_no_rates_and_mismatched_lengths_are_refused():
    m = protocol_metrics([], [], TOOLS, [])
    assert m["n_cases"] == 0 and all(m[k] is None for k in ("exact_call_accuracy", "clean_stop_rate"))
    assert protocol_metrics(["x"], [REF_READ], TOOLS, [True])["tool_call_validity"] is None  # no block
    with pytest.raises(ValueError):
        protocol_metrics(["a", "b"], [REF_READ], TOOLS, [True, True])
    with pytest.raises(ValueError):
        protocol_metrics(["a"], [REF_READ], TOOLS, [True, False])


# --------------------------------------------------------------------------- held-out prompts


def sample_lessons(n: int, seed: int = 3) -> list[LessonIn]:
    out = []
    for i, sample in enumerate(generate_lessons(n, seed)):
        parsed = parse_line(sample.line)
        out.append(LessonIn(i + 1, parsed.conv_hash, parsed.messages))
    return out


@pytest.mark.parametrize("family", ["chatml", "llama2"])
def test_heldout_prompt_is_the_training_text_up_to_the_first_reply(family):
    lessons = sample_lessons(12)
    ids = [lesson.id for lesson in lessons[::3]]
    cases = heldout_prompts(lessons, ids, family, SYSTEM)
    assert [c.lesson_id for c in cases] == ids
    for case in cases:
        lesson = next(item for item in lessons if item.id == case.lesson_id)
        trained = tpl.render(family, lesson.messages, SYSTEM)
        start, end = trained.assistant_spans[0]
        assert case.prompt == trained.text[:start] or case.prompt + " " == trained.text[:start]
        assert trained.text[start:end].strip().startswith(case.reference.strip())
        assert case.reference == next(m["content"] for m in lesson.messages if m["role"] == "assistant")
        assert case.messages[0] == {"role": "system", "content": SYSTEM}
        assert all(m["role"] != "assistant" for m in case.messages)


def test_heldout_prompts_skip_lessons_without_a_reply_and_honour_max_cases():
    lessons = [
        {"id": 1, "messages": [{"role": "user", "content": "hi"}]},
        {"id": 2, "messages": [{"role": "user", "content": "read a"}, {"role": "assistant", "content": REF_READ}]},
        {"id": 3, "messages": [{"role": "user", "content": "x"},
                               {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f"}}]}]},
        {"id": 4, "messages": [{"role": "user", "content": "read b"}, {"role": "assistant", "content": "ok"}]},
    ]
    cases = heldout_prompts(lessons, [1, 2, 3, 4, 99], "chatml", None)
    assert [c.lesson_id for c in cases] == [2, 4]
    assert cases[0].prompt == "<|im_start|>user\nread a<|im_end|>\n<|im_start|>assistant\n"
    assert cases[0].messages == [{"role": "user", "content": "read a"}]
    assert [c.lesson_id for c in heldout_prompts(lessons, [1, 2, 3, 4], "chatml", None, max_cases=1)] == [2]


# --------------------------------------------------------------------------- which model, which generator


def test_incumbent_is_the_base_before_the_first_promotion_then_the_promoted_adapter(tmp_path):
    assert incumbent_ref(None, None).is_base
    run = tmp_path / "runs" / "3"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    ref = incumbent_ref("coder:v2", run)
    assert (ref.label, ref.adapter_dir, ref.ollama_tag) == ("coder:v2", run / "adapter", "coder:v2")
    gone = incumbent_ref("coder:v2", tmp_path / "runs" / "1")  # its folder was pruned
    assert gone.adapter_dir is None and gone.ollama_tag == "coder:v2" and not gone.is_base


def test_generator_choice():
    cand_tag = ModelRef("c", adapter_dir=Path("a"), gguf=Path("m.gguf"), ollama_tag="coder:v3")
    cand_local = ModelRef("c", adapter_dir=Path("a"), gguf=Path("m.gguf"))
    base = ModelRef("base model")
    served_only = ModelRef("coder:v1", ollama_tag="coder:v1")
    both = ModelRef("coder:v2", adapter_dir=Path("b"), ollama_tag="coder:v2")
    assert choose_generators(cand_tag, both, True) == {"candidate": "ollama", "incumbent": "ollama"}
    assert choose_generators(cand_tag, both, False) == {"candidate": "transformers", "incumbent": "transformers"}
    assert choose_generators(cand_tag, base, True) == {"candidate": "transformers", "incumbent": "transformers"}
    assert choose_generators(cand_local, served_only, True) == {"candidate": "transformers", "incumbent": "ollama"}
    assert choose_generators(cand_local, served_only, False) == {"candidate": "transformers", "incumbent": "none"}
    assert overall_generator({"candidate": "ollama", "incumbent": "ollama"}) == "ollama"
    assert overall_generator({"candidate": "transformers", "incumbent": "ollama"}) == "mixed"


# --------------------------------------------------------------------------- tiny real models


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama base, a random LoRA for it, its formatted dataset and the merged GGUF."""
    from lacd.export import export_gguf
    from tiny import make_random_lora, make_tiny_llama

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tiny-eval")
    base = make_tiny_llama(root / "base", tokenizer="bpe")
    adapter = make_random_lora(base, root / "adapter", seed=1)
    lessons = sample_lessons(40, seed=11)
    result = format_lessons(lessons, FormatSpec(base, root / "dataset", SYSTEM, max_seq_len=256, heldout_pct=25))
    gguf = export_gguf(base, adapter, root / "model.gguf", outtype="f32").path
    base_gguf = export_gguf(base, None, root / "base.gguf", outtype="f32").path
    cases = heldout_prompts(lessons, result.heldout_ids, result.family, SYSTEM, max_cases=4)
    assert len(cases) == 4
    return {"root": root, "base": base, "adapter": adapter, "gguf": gguf, "base_gguf": base_gguf,
            "cases": cases, "family": result.family}


def test_transformers_generation_from_gguf_and_from_the_hf_folder_agree(tiny):
    cases = tiny["cases"]
    from_gguf = generate_transformers(tiny["base_gguf"], cases, 6, "chatml", batch_size=1)
    from_folder = generate_transformers(tiny["base"], cases, 6, "chatml", batch_size=1)
    assert len(from_gguf) == len(cases)
    assert all(isinstance(text, str) and isinstance(stopped, bool) for text, stopped in from_gguf)
    assert from_gguf == from_folder  # f32 GGUF: the same weights, the same greedy tokens
    assert generate_transformers(tiny["base"], cases, 6, "chatml", batch_size=4) == from_folder  # left padding


def merged_greedy(base, adapter, cases, max_tokens: int) -> list[tuple[str, bool]]:
    """(reply, stopped) of base + adapter merged by peft, greedy, with transformers' generate: none of
    lacd's export, GGUF loading or generation code (the independent side of a comparison)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter)).merge_and_unload()
    stops = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    out = []
    for case in cases:
        ids = tokenizer(case.prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            new = model.eval().generate(ids, max_new_tokens=max_tokens, do_sample=False, eos_token_id=stops,
                                        pad_token_id=stops[0])[0, ids.shape[1]:].tolist()
        cut = next((i for i, t in enumerate(new) if t in stops), None)
        out.append((tokenizer.decode(new[:cut]), cut is not None))
    return out


def test_generation_reuses_the_system_prompts_cache_and_generates_the_same(tiny, monkeypatch):
    """Issue 14: the prompts' shared prefix (the system prompt) is computed once and its key/value
    cache reused, with the greedy tokens of computing every prompt whole, batched or not."""
    from lacd.pipeline import evaluate as evaluate_mod

    model, tokenizer = evaluate_mod.load_for_generation(tiny["base"])
    cases = tiny["cases"]
    prompts = [tokenizer(c.prompt, add_special_tokens=True)["input_ids"] for c in cases]
    length, cache = evaluate_mod._prefix_cache(model, prompts, torch.device("cpu"))
    assert length >= 16 and cache.get_seq_length() == length
    assert SYSTEM in tokenizer.decode(prompts[0][:length])  # the system prompt is in the shared part
    shared = {size: generate_transformers(model, cases, 6, "chatml", tokenizer=tokenizer, batch_size=size)
              for size in (1, 4)}
    monkeypatch.setattr(evaluate_mod, "_prefix_cache", lambda *args: (0, None))
    whole = generate_transformers(model, cases, 6, "chatml", tokenizer=tokenizer, batch_size=1)
    assert shared[1] == whole and shared[4] == whole


def generate_alone(model, prompts, max_new: int, stop_ids) -> list[list[int]]:
    """transformers' generate on each prompt alone (no batch, no padding, no shared cache), greedy; each
    reply cut after its first stop token, as lacd.pipeline.greedy returns it."""
    out = []
    for ids in prompts:
        with torch.no_grad():
            new = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=max_new, do_sample=False, eos_token_id=list(stop_ids),
                                 pad_token_id=stop_ids[0])[0, len(ids):].tolist()
        cut = next((i for i, t in enumerate(new) if t in stop_ids), None)
        out.append(new if cut is None else new[: cut + 1])
    return out


def test_greedy_batches_equal_generate_on_each_prompt_alone_with_stops_inside_the_batch(tiny):
    """Issue 14: the evaluate stage's decoding (rows left-padded after the shared prefix's cache, a row
    leaving the batch at its stop token) gives generate's greedy tokens of each prompt decoded alone,
    with and without the shared prefix, whichever rows stop first."""
    from lacd.pipeline import evaluate as evaluate_mod
    from lacd.pipeline.greedy import greedy

    model, tokenizer = evaluate_mod.load_for_generation(tiny["base"])
    # prompts cut short at different points: the tiny random model's replies differ with the last token
    prompts = [tokenizer(c.prompt)["input_ids"][: -cut or None] for c, cut in zip(tiny["cases"], (0, 3, 7, 12))]
    eos = [tokenizer.eos_token_id]
    free = generate_alone(model, prompts, 12, eos)
    stop = free[0][-3]  # a token row 0 writes late: the rows stop at different steps, or not at all
    alone = generate_alone(model, prompts, 12, [*eos, stop])
    assert len({len(r) for r in alone}) >= 3 and max(len(r) for r in alone) == 12
    length, cache = evaluate_mod._prefix_cache(model, prompts, torch.device("cpu"))
    assert length >= 16 and len({len(p) - length for p in prompts}) > 1  # own parts of different lengths
    shared = greedy(model, prompts, 12, [*eos, stop], prefix=length, shared=cache, pad=eos[0])
    whole = greedy(model, prompts, 12, [*eos, stop], pad=eos[0])
    assert shared == alone and whole == alone
    assert cache.get_seq_length() == length  # the shared cache is left for the next batch


def test_a_stop_string_ends_a_row_early_with_the_reply_of_running_to_the_budget(tiny):
    """A stop string of several tokens ends its row as soon as no other stop string can come before
    it; _finish then gives the reply and stop flag of decoding to the token budget."""
    from lacd.pipeline import evaluate as evaluate_mod
    from lacd.pipeline.greedy import greedy

    model, tokenizer = evaluate_mod.load_for_generation(tiny["base"])
    prompts = [tokenizer(c.prompt)["input_ids"] for c in tiny["cases"]]
    eos = [tokenizer.eos_token_id]
    full = greedy(model, prompts, 12, eos, pad=eos[0])
    text = tokenizer.decode(full[1])
    stops = [text[4:7], text[3:5] + "\x00"]  # the second one would start first but never completes
    done = evaluate_mod._stop_string_seen(tokenizer, stops)
    early = greedy(model, prompts, 12, eos, pad=eos[0], done=done)
    assert len(early[1]) < 12 and early[1] == full[1][: len(early[1])]
    finish = [evaluate_mod._finish(tokenizer, r, eos, stops, 12) for r in (early[1], full[1])]
    assert finish[0] == finish[1] == (text[: text.index(stops[0])], True)


def test_the_model_in_use_is_decoded_with_its_adapter_merged_and_the_same_tokens(tiny):
    """An adapter folder is merged into the base weights for decoding (_merged): no LoRA product left
    in the layers, and the greedy replies of the unmerged adapter model."""
    from lacd.pipeline import evaluate as evaluate_mod

    model, tokenizer = evaluate_mod.load_for_generation(tiny["base"], tiny["adapter"])
    unmerged = generate_transformers(model, tiny["cases"], 8, "chatml", tokenizer=tokenizer)
    merged = evaluate_mod._merged(model)
    assert not any("lora" in name for name, _ in merged.named_modules())
    assert generate_transformers(merged, tiny["cases"], 8, "chatml", tokenizer=tokenizer) == unmerged


def test_cpu_batches_hold_as_many_prompts_as_a_gib_of_cache_and_at_least_eight(tiny):
    """On the CPU a batch holds as many prompts as fill CPU_CACHE_BYTES of key/value cache (counted
    from the model's shape: what a real cache of its layers takes a token), never fewer than 8."""
    from lacd.pipeline import evaluate as evaluate_mod
    from lacd.pipeline.greedy import cache_bytes_per_token, prefix_cache

    model, _ = evaluate_mod.load_for_generation(tiny["base"])
    cache = prefix_cache(model, list(range(5, 25)), torch.device("cpu"))
    held = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert cache_bytes_per_token(model) * 20 == held
    per_row = evaluate_mod.CPU_CACHE_BYTES // (held // 20) // 1000
    assert per_row > evaluate_mod.BATCH_ROWS  # the tiny model: many rows of 1,000 tokens
    assert evaluate_mod._rows_per_batch(model, 1000) == per_row
    assert evaluate_mod._rows_per_batch(model, 10**9) == evaluate_mod.BATCH_ROWS


@needs_go
def test_ollama_generation_matches_transformers_on_the_merged_model(tiny, tmp_path):
    from lacd.pipeline import register
    from ollama_standin import StandIn

    with StandIn(tmp_path / "ollama") as server:
        client = register.make_client(server.host)
        register.create_version(client, "coder", 1, tiny["gguf"], tpl.ollama_template("chatml"), SYSTEM,
                                {"stop": tpl.stop_tokens("chatml")})
        served = generate_ollama(client, "coder:v1", tiny["cases"], 6)
        chats = [r for r in server.requests if r["path"] == "/api/chat"]
        prompts = list(server.prompts[-len(tiny["cases"]):])
    assert served == merged_greedy(tiny["base"], tiny["adapter"], tiny["cases"], 6)
    assert prompts == [case.prompt for case in tiny["cases"]]  # Ollama's TEMPLATE rendered the same prompt
    assert chats[0]["body"]["options"]["num_predict"] == 6 and chats[0]["body"]["options"]["temperature"] == 0


def test_evaluate_candidate_against_the_base_model_with_transformers(tiny, tmp_path):
    from lacd.pipeline.train import load_examples

    spec = EvalSpec(base_dir=tiny["base"], dataset_dir=tiny["root"] / "dataset", family="chatml",
                    max_tokens=5, max_seq_len=256, device="cpu", threads=1)
    candidate = ModelRef("coder:v1", adapter_dir=tiny["adapter"], gguf=tiny["gguf"])
    out = tmp_path / "evaluation.json"
    result = evaluate_candidate(spec, tiny["cases"], candidate, incumbent_ref(None, None), out_path=out)
    json.dumps(result)  # JSON-able
    assert result["generator"] == "transformers" and result["n_cases"] == 4
    cand, inc = result["candidate"], result["incumbent"]
    assert cand["label"] == "coder:v1" and inc["label"] == "base model"
    assert cand["loss_source"] == inc["loss_source"] == "measured"
    assert cand["heldout_loss"] != inc["heldout_loss"]  # the adapter changes the model
    from transformers import AutoModelForCausalLM

    from hf_reference import hf_mean_loss

    rows, _ = load_examples(tiny["root"] / "dataset", "heldout", 256)
    base_loss = hf_mean_loss(AutoModelForCausalLM.from_pretrained(tiny["base"]), rows)  # transformers' own loss
    assert inc["heldout_loss"] == pytest.approx(base_loss, abs=1e-4)
    assert inc["perplexity"] == pytest.approx(2.718281828 ** base_loss, rel=1e-3)
    for name in ("exact_call_accuracy", "clean_stop_rate", "fabricated_output_rate"):
        assert 0.0 <= cand[name] <= 1.0
    saved = json.loads(out.read_text())
    assert len(saved["cases"]["candidate"]) == 4 and saved["cases"]["candidate"][0]["expected"]

    known = evaluate_candidate(spec, tiny["cases"][:1], candidate, incumbent_ref(None, None),
                               known_losses={"candidate": 1.5, "incumbent": 2.5})
    assert (known["candidate"]["heldout_loss"], known["incumbent"]["loss_source"]) == (1.5, "train")


def test_evaluate_in_a_child_process_gives_the_same_result(tiny, tmp_path):
    from lacd.pipeline.evaluate import EvaluateError, evaluate_in_child

    spec = EvalSpec(base_dir=tiny["base"], dataset_dir=tiny["root"] / "dataset", family="chatml",
                    max_tokens=4, max_seq_len=256, device="cpu", threads=1)
    candidate = ModelRef("coder:v1", adapter_dir=tiny["adapter"], gguf=tiny["gguf"])
    cases = tiny["cases"][:2]
    here = evaluate_candidate(spec, cases, candidate, incumbent_ref(None, None))
    there = evaluate_in_child(spec, cases, candidate, incumbent_ref(None, None), tmp_path / "evaluation.json")
    for who in ("candidate", "incumbent"):
        assert there[who] == here[who]
    assert "cases" in json.loads((tmp_path / "evaluation.json").read_text()) and "cases" not in there

    missing = ModelRef("coder:v2", adapter_dir=tmp_path / "nowhere", gguf=tmp_path / "nowhere.gguf")
    with pytest.raises(EvaluateError, match="no LoRA adapter in"):
        evaluate_in_child(spec, cases, missing, incumbent_ref(None, None), tmp_path / "again.json")
    assert not list(tmp_path.glob("*.request.json"))  # the prompts in clear text do not stay behind


def test_a_stop_request_ends_the_child_at_once(tiny, tmp_path):
    import threading

    from lacd.pipeline.evaluate import EvaluateInterrupted, evaluate_in_child

    spec = EvalSpec(base_dir=tiny["base"], dataset_dir=tiny["root"] / "dataset", family="chatml",
                    max_tokens=4, max_seq_len=256, device="cpu", threads=1)
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    started = time.monotonic()
    with pytest.raises(EvaluateInterrupted, match="redone at the next start"):
        evaluate_in_child(spec, tiny["cases"], ModelRef("coder:v1", adapter_dir=tiny["adapter"]),
                          incumbent_ref(None, None), tmp_path / "evaluation.json", stop=stop, poll_s=0.1)
    assert time.monotonic() - started < 10
    assert not (tmp_path / "evaluation.json").exists()


def test_no_case_gives_an_unmeasured_result_with_the_known_losses():
    from lacd.pipeline.evaluate import unmeasured_result

    result = unmeasured_result(ModelRef("coder:v2", adapter_dir=Path("a")), incumbent_ref(None, None),
                               {"candidate": 1.0})
    assert (result["generator"], result["n_cases"]) == ("none", 0)
    assert result["candidate"]["heldout_loss"] == 1.0 and result["candidate"]["perplexity"] == pytest.approx(2.7183)
    assert result["incumbent"]["heldout_loss"] is None and result["incumbent"]["label"] == "base model"
    assert all(result[who][m] is None for who in ("candidate", "incumbent") for m in ("exact_call_accuracy",
                                                                                     "clean_stop_rate"))


@needs_go
def test_evaluate_candidate_through_ollama_when_both_models_are_served(tiny, tmp_path):
    from lacd.pipeline import register
    from ollama_standin import StandIn

    spec = EvalSpec(base_dir=tiny["base"], dataset_dir=tiny["root"] / "dataset", family="chatml",
                    max_tokens=4, max_seq_len=256, device="cpu", threads=1)
    with StandIn(tmp_path / "ollama") as server:
        client = register.make_client(server.host)
        for version, gguf in ((1, tiny["base_gguf"]), (2, tiny["gguf"])):
            register.create_version(client, "coder", version, gguf, tpl.ollama_template("chatml"), SYSTEM,
                                    {"stop": tpl.stop_tokens("chatml")})
        candidate = ModelRef("coder:v2", adapter_dir=tiny["adapter"], gguf=tiny["gguf"], ollama_tag="coder:v2")
        incumbent = ModelRef("coder:v1", ollama_tag="coder:v1")  # its run folder is gone: no loss
        result = evaluate_candidate(spec, tiny["cases"][:2], candidate, incumbent, client=client)
        models = [r["body"]["model"] for r in server.requests if r["path"] == "/api/chat"]
    assert result["generator"] == "ollama" and models == ["coder:v2"] * 2 + ["coder:v1"] * 2
    assert result["incumbent"]["heldout_loss"] is None and result["candidate"]["heldout_loss"] is not None

    down = register.make_client("http://127.0.0.1:9", connect_timeout_s=0.5)
    local = evaluate_candidate(spec, tiny["cases"][:2], candidate, ModelRef("base model"), client=down)
    assert local["generator"] == "transformers"
