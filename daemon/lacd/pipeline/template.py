"""One conversation renderer for training and for serving.

The model must be trained on exactly the text Ollama gives it when the agent calls /api/chat.
This module holds, for each chat family, both halves of that promise:

- ``ollama_template(family)``: the Go text/template lacd registers as the model's TEMPLATE;
- ``render(family, messages, system)``: the same rendering in Python, with the character spans
  of the assistant's turns (content plus end-of-turn marker), which are what the loss trains on.

tests/test_template.py checks the two agree by executing the Go template with Go's own
text/template (tests/gotemplate/), filled the way Ollama fills it.

How Ollama fills a template that uses ``.Messages`` (template/template.go, server/routes.go):
roles are lower-cased; if the request's first message is not ``system`` the Modelfile's SYSTEM is
prepended; consecutive messages of the same role are merged with a blank line ("\\n\\n"), except
``tool`` messages; system messages stay in ``.Messages`` (``.System`` is their join); the template
is executed once, ``.Response`` is empty. So the template itself must write the generation
prompt, and ``render`` mirrors the collation.

Families:

``chatml`` (SmolLM2, Qwen, ...): every turn is ``<|im_start|>ROLE\\nCONTENT<|im_end|>\\n``, a
``tool`` turn included (role ``tool``). When the last turn is not the assistant's, the template
ends with the generation prompt ``<|im_start|>assistant\\n``; a conversation that ends with the
assistant is rendered whole, with its ``<|im_end|>``, and no generation prompt.

``llama2`` (CodeLlama-Instruct): ``[INST] <<SYS>>\\nSYSTEM\\n<</SYS>>\\n\\nUSER [/INST] ANSWER
</s><s>[INST] USER [/INST]``. CodeLlama has no tool role: consecutive user and tool turns share
one ``[INST]`` block, joined by a blank line, so a tool result (``<tool_output>...`` as the agent
wraps it) is the user side of the turn that precedes the assistant's next reply. System messages
wait for the next ``[INST]`` block and open it with ``<<SYS>>`` (no empty ``<<SYS>>`` block when
there is no system). The text has no leading ``<s>``: llama.cpp and the HF tokenizer both add the
BOS token themselves; later turns write ``<s>`` literally, which both parse as the BOS token.
Unlike the HF chat template, contents are not trimmed: Go templates cannot trim, and the model
must see at training time what it will see when served.

Why lacd registers its own TEMPLATE: templates that do not use ``.Messages`` (Ollama's legacy
``.Prompt``/``.Response`` path, e.g. the stock codellama one) are filled turn by turn from system,
user and assistant messages only, so the agent's ``tool`` messages never reach the model.

Native tool calling (``.Tools``, ``tool_calls``) is not rendered: the agent writes its calls as
``<tool_code>`` text in the reply and receives results as ``tool`` messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

FAMILIES = ("chatml", "llama2")
ROLES = ("system", "user", "assistant", "tool")
IGNORE_INDEX = -100

_CHATML_TEMPLATE = r"""{{- $last := "" }}
{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ $last = .Role }}
{{- end }}
{{- if ne $last "assistant" }}<|im_start|>assistant
{{ end }}"""

_LLAMA2_TEMPLATE = r"""{{- $system := "" }}{{ $open := false }}{{ $started := false }}
{{- range .Messages }}
{{- if eq .Role "system" }}
{{- if $system }}{{ $system = printf "%s\n\n%s" $system .Content }}{{ else }}{{ $system = .Content }}{{ end }}
{{- else if eq .Role "assistant" }}
{{- if $open }} [/INST]{{ $open = false }}{{ end }} {{ .Content }} </s>{{ $started = true }}
{{- else }}
{{- if $open }}{{ "\n\n" }}{{ else }}{{ if $started }}<s>{{ end }}[INST] {{ $open = true }}{{ $started = true }}{{ end }}
{{- if $system }}<<SYS>>{{ "\n" }}{{ $system }}{{ "\n" }}<</SYS>>{{ "\n\n" }}{{ $system = "" }}{{ end }}
{{- .Content }}
{{- end }}
{{- end }}
{{- if $open }} [/INST]{{ end }}"""

_TEMPLATES = {"chatml": _CHATML_TEMPLATE, "llama2": _LLAMA2_TEMPLATE}
_STOPS = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "llama2": ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"),
}


class TemplateError(ValueError):
    """A conversation or family lacd cannot render."""


class UnknownChatFamily(TemplateError):
    """The base model's chat template matches no family lacd knows."""


class ExampleTooLong(TemplateError):
    """A rendered example has more tokens than max_len (raised only when truncation is off)."""

    def __init__(self, n_tokens: int, max_len: int) -> None:
        super().__init__(f"example has {n_tokens} tokens, more than max_len={max_len}")
        self.n_tokens = n_tokens
        self.max_len = max_len


@dataclass(frozen=True)
class Rendered:
    """A rendered conversation: the full text and the [start, end) spans the loss trains on."""

    text: str
    assistant_spans: tuple[tuple[int, int], ...]

    def assistant_parts(self) -> list[str]:
        """The text of each assistant span, in order."""
        return [self.text[start:end] for start, end in self.assistant_spans]


def detect_family(chat_template: str | None, override: str | None = None) -> str:
    """The chat family of a base tokenizer's chat_template, or the override when given."""
    if override:
        if override not in FAMILIES:
            raise UnknownChatFamily(
                f"unknown chat family {override!r}; choose one of {', '.join(FAMILIES)}"
            )
        return override
    if not chat_template:
        raise UnknownChatFamily(
            "the base model's tokenizer has no chat_template; "
            f"name its chat family explicitly (one of {', '.join(FAMILIES)})"
        )
    if "<|im_start|>" in chat_template:
        return "chatml"
    if "[INST]" in chat_template and "<<SYS>>" in chat_template:
        return "llama2"
    raise UnknownChatFamily(
        "the base model's chat_template is neither ChatML nor Llama-2 [INST]/<<SYS>>; "
        f"name its chat family explicitly (one of {', '.join(FAMILIES)}) if one of them fits"
    )


def ollama_template(family: str) -> str:
    """The Go TEMPLATE lacd registers with Ollama for a family."""
    return _TEMPLATES[_checked_family(family)]


def stop_tokens(family: str) -> list[str]:
    """The PARAMETER stop strings registered with the TEMPLATE."""
    return list(_STOPS[_checked_family(family)])


def chat_messages(messages: Iterable[Mapping[str, Any]], system: str | None) -> list[dict]:
    """The /api/chat message list for a conversation: the system message (if any) first.

    An empty or None system means no system message; Ollama then prepends the Modelfile's
    SYSTEM, so a caller that registers one should pass the same text here.
    """
    head = [{"role": "system", "content": system}] if system else []
    return head + [{"role": m["role"], "content": m["content"]} for m in messages]


def render(family: str, messages: Sequence[Mapping[str, Any]], system: str | None = None) -> Rendered:
    """Render a conversation exactly as Ollama's template for this family renders it.

    messages: dicts with "role" (system, user, assistant, tool) and "content" (str).
    A conversation that ends with a user or tool turn gets the generation prompt at the end.
    """
    turns = _collate(chat_messages(_checked_messages(messages), system))
    if family == "chatml":
        return _render_chatml(turns)
    if family == "llama2":
        return _render_llama2(turns)
    raise UnknownChatFamily(f"unknown chat family {family!r}; choose one of {', '.join(FAMILIES)}")


def render_prompt(family: str, messages: Sequence[Mapping[str, Any]], system: str | None = None) -> str:
    """The prompt Ollama renders for /api/chat: the history up to the assistant's next reply."""
    turns = _collate(chat_messages(_checked_messages(messages), system))
    if not turns or turns[-1][0] in ("assistant", "system"):
        raise TemplateError("a prompt needs a conversation that ends with a user or tool turn")
    return render(family, messages, system).text


def assistant_token_labels(
    tokenizer: Any, rendered: Rendered, max_len: int, *, truncate: bool = True
) -> tuple[list[int], list[int]]:
    """Token ids of the rendered text and labels that are -100 outside the assistant spans.

    The text is tokenized piece by piece (prompt, reply, prompt, reply...), each piece as the
    continuation of everything before it: the tokens before a reply are exactly the tokens of
    the prompt Ollama serves for it, and the reply's tokens are what the model must generate
    after them. Tokenizing the whole text at once would differ where a token straddles the
    boundary (a reply starting with spaces or a newline merges with the prompt's last newline
    in byte-level BPE), training the model on a prompt it never sees. Special tokens are added
    as the tokenizer adds them (a BOS for Llama tokenizers, as llama.cpp does from the GGUF's
    add_bos_token flag) and are never trained on. Longer than max_len: the tail is cut, or
    ExampleTooLong is raised when truncate is False.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TemplateError("assistant_token_labels needs a fast tokenizer")
    head = _encode(tokenizer, "")
    input_ids, labels = list(head), [IGNORE_INDEX] * len(head)
    for start, end, trained in _pieces(rendered):
        whole = _encode(tokenizer, rendered.text[:end])
        if whole[: len(head)] == head:
            piece = whole[len(head):]
        else:  # a token straddles the boundary: the piece's own tokens, as generated or served
            piece = list(tokenizer(rendered.text[start:end], add_special_tokens=False)["input_ids"])
        input_ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
        head = whole
    if len(input_ids) > max_len:
        if not truncate:
            raise ExampleTooLong(len(input_ids), max_len)
        input_ids, labels = input_ids[:max_len], labels[:max_len]
    return input_ids, labels


def _checked_family(family: str) -> str:
    """The family name, or UnknownChatFamily."""
    if family not in FAMILIES:
        raise UnknownChatFamily(f"unknown chat family {family!r}; choose one of {', '.join(FAMILIES)}")
    return family


def _checked_messages(messages: Sequence[Mapping[str, Any]]) -> Sequence[Mapping[str, Any]]:
    """The messages, after checking roles, contents and that no assistant turn comes first."""
    for index, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise TemplateError(f"message {index} has role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise TemplateError(f"message {index} ({role}) has no text content")
    first = next((m["role"] for m in messages if m["role"] != "system"), None)
    if first == "assistant":
        raise TemplateError("a conversation must not start with an assistant turn")
    return messages


def _collate(messages: list[dict]) -> list[tuple[str, str]]:
    """Merge consecutive same-role messages with a blank line, except tool ones, as Ollama does."""
    turns: list[tuple[str, str]] = []
    for message in messages:
        role, content = message["role"], message["content"]
        if turns and turns[-1][0] == role and role != "tool":
            turns[-1] = (role, turns[-1][1] + "\n\n" + content)
        else:
            turns.append((role, content))
    return turns


class _Text:
    """Appends pieces of text and remembers which character ranges are trained on."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.length = 0
        self.spans: list[tuple[int, int]] = []

    def add(self, piece: str, trained: bool = False) -> None:
        """Append a piece; a trained piece extends the previous span when they touch."""
        start, self.length = self.length, self.length + len(piece)
        self.parts.append(piece)
        if trained and piece:
            if self.spans and self.spans[-1][1] == start:
                self.spans[-1] = (self.spans[-1][0], self.length)
            else:
                self.spans.append((start, self.length))

    def rendered(self) -> Rendered:
        """The text and spans built so far."""
        return Rendered("".join(self.parts), tuple(self.spans))


def _render_chatml(turns: list[tuple[str, str]]) -> Rendered:
    """ChatML: one <|im_start|>role turn per message; generation prompt unless the assistant ended."""
    out = _Text()
    for role, content in turns:
        out.add(f"<|im_start|>{role}\n")
        out.add(content + "<|im_end|>", trained=role == "assistant")
        out.add("\n")
    if not turns or turns[-1][0] != "assistant":
        out.add("<|im_start|>assistant\n")
    return out.rendered()


def _render_llama2(turns: list[tuple[str, str]]) -> Rendered:
    """Llama-2 [INST]: user and tool turns share a block; the system opens the next block."""
    out = _Text()
    system, block_open, started = "", False, False
    for role, content in turns:
        if role == "system":
            system = f"{system}\n\n{content}" if system else content
        elif role == "assistant":
            if block_open:
                out.add(" [/INST]")
                block_open = False
            out.add(f" {content} </s>", trained=True)
            started = True
        else:
            out.add("\n\n" if block_open else ("<s>[INST] " if started else "[INST] "))
            block_open = started = True
            if system:
                out.add(f"<<SYS>>\n{system}\n<</SYS>>\n\n")
                system = ""
            out.add(content)
    if block_open:
        out.add(" [/INST]")
    return out.rendered()


def _pieces(rendered: Rendered) -> list[tuple[int, int, bool]]:
    """The text cut at span boundaries: (start, end, trained) for each non-empty piece."""
    pieces, cursor = [], 0
    for start, end in rendered.assistant_spans:
        if start > cursor:
            pieces.append((cursor, start, False))
        pieces.append((start, end, True))
        cursor = end
    if cursor < len(rendered.text):
        pieces.append((cursor, len(rendered.text), False))
    return pieces


def _encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of text with the tokenizer's special tokens; refuses tokenizers that add EOS."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    eos = getattr(tokenizer, "eos_token_id", None)
    if not text and eos is not None and eos in ids and eos != getattr(tokenizer, "bos_token_id", None):
        raise TemplateError("the tokenizer appends EOS to every text; turn add_eos_token off")
    return ids
