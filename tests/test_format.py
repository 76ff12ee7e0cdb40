"""The format stage on tiny real tokenizers: labels, split, truncation, cap, atomic folder, real lines."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from hf_reference import labelled_texts
from lacd.artifacts import temporary_sibling
from lacd.ingest.lessons import canonical
from lacd.pipeline import format as fmt
from lacd.pipeline import template as tpl

HERE = Path(__file__).parent
FIXTURES = HERE.parent.parent / "shared" / "fixtures" / "local-ai-coder"
SYSTEM = "You are a helpful AI coding assistant.\nUse <tool_code>read_file(path)</tool_code> to read files."


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    """Tiny model folders: byte-level BPE (ChatML template) and SentencePiece (read as llama2)."""
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(HERE))
    import tiny

    folder = tmp_path_factory.mktemp("bases")
    return {kind: tiny.make_tiny_llama(folder / kind, tokenizer=kind) for kind in ("bpe", "spm")}


def lesson_in(lesson_id: int, messages: list[dict]) -> fmt.LessonIn:
    """A lesson as the queue holds it: hashed by the ingest's own lessons.canonical."""
    return fmt.LessonIn(lesson_id, canonical(messages)[1], messages)


def conversation(i: int, reply_words: int = 3) -> list[dict]:
    """A tool-using conversation, unique for each i."""
    return [
        {"role": "user", "content": f"What is in notes{i}.txt?"},
        {"role": "assistant", "content": f"<tool_code>\nread_file('notes{i}.txt')\n</tool_code>"},
        {"role": "tool", "content": f"<tool_output>hello {i}</tool_output>"},
        {"role": "assistant", "content": f"The file says hello {i}." + " done" * reply_words},
    ]


def lessons(n: int, start: int = 0) -> list[fmt.LessonIn]:
    """n lessons, newest (highest id) first."""
    ids = reversed(range(start, start + n))
    return [lesson_in(i, conversation(i)) for i in ids]


def spec(base: Path, out: Path, system: str = SYSTEM, **kwargs) -> fmt.FormatSpec:
    return fmt.FormatSpec(base_dir=base, out_dir=out, system_prompt=system, **kwargs)


def run(base: Path, out: Path, batch: list[fmt.LessonIn], **kwargs) -> fmt.FormatResult:
    """format_lessons with the test system prompt."""
    return fmt.format_lessons(batch, spec(base, out, **kwargs))


def load(out: Path) -> dict[str, list[dict]]:
    from datasets import load_from_disk

    return {name: split.to_list() for name, split in load_from_disk(str(out)).items()}


def labelled_segments(row: dict) -> list[list[int]]:
    """Runs of consecutive trained tokens."""
    segments, current = [], []
    for token, label in zip(row["input_ids"], row["labels"]):
        if label != tpl.IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            segments.append(current)
            current = []
    return segments + ([current] if current else [])


@pytest.mark.parametrize("kind, family", [("bpe", "chatml"), ("spm", "llama2")])
def test_labels_cover_exactly_the_assistant_parts(bases, tmp_path, kind, family):
    from transformers import AutoTokenizer

    batch = lessons(6)
    batch[0] = lesson_in(99, [
        {"role": "user", "content": "Fix:\n```python\ndef f(x):\n    return x\n```"},
        {"role": "assistant", "content": "    return x + 1\n"},
        {"role": "user", "content": "y"},
        {"role": "assistant", "content": "Done."},
    ])
    out = tmp_path / "dataset"
    result = run(bases[kind], out, batch, heldout_pct=30, chat_family=family if kind == "spm" else None)
    assert result.family == family
    splits = load(out)
    assert set(splits) == {"train", "heldout"}
    rows = splits["train"] + splits["heldout"]
    assert all(set(row) == {"input_ids", "labels", "lesson_id"} for row in rows)  # no lesson text
    assert sorted(row["lesson_id"] for row in rows) == sorted(lesson.id for lesson in batch)
    tokenizer = AutoTokenizer.from_pretrained(bases[kind])
    by_id = {lesson.id: lesson for lesson in batch}
    for row in rows:
        rendered = tpl.render(family, by_id[row["lesson_id"]].messages, SYSTEM)
        labelled_segments(row)  # every label is its token or ignored
        assert labelled_texts(tokenizer, row["input_ids"], row["labels"]) == rendered.assistant_parts()
        assert tokenizer.decode(row["input_ids"]).count(SYSTEM.splitlines()[0]) == 1
    assert result.train_tokens == sum(len(row["input_ids"]) for row in splits["train"])
    trained = [x for row in splits["train"] for x in row["labels"] if x != tpl.IGNORE_INDEX]
    assert result.assistant_tokens == len(trained)


def test_split_follows_the_hash_and_never_changes_when_lessons_are_added(bases, tmp_path):
    few, many = lessons(40), lessons(120)
    first = run(bases["bpe"], tmp_path / "a", few, heldout_pct=20)
    again = run(bases["bpe"], tmp_path / "b", few, heldout_pct=20)
    later = run(bases["bpe"], tmp_path / "c", many, heldout_pct=20)
    expected = [l.id for l in many if int(l.conv_hash[:8], 16) % 10000 < 2000]
    assert later.heldout_ids == expected
    assert 10 <= len(expected) <= 40  # about 20% of 120
    assert first.heldout_ids == again.heldout_ids == [i for i in expected if i < 40]
    assert load(tmp_path / "a") == load(tmp_path / "b")
    assert later.counts["train"] + later.counts["heldout"] == 120
    assert [r["lesson_id"] for r in load(tmp_path / "c")["heldout"]] == expected


def test_split_threshold_is_exact(bases, tmp_path):
    """rank = int(conv_hash[:8], 16) % 10000; held out when rank < heldout_pct * 100."""
    ranks = {1: 1999, 2: 2000, 3: 10000 + 1999, 4: 0, 5: 9999}
    batch = [fmt.LessonIn(i, f"{rank:08x}" + "ab" * 12, conversation(i)) for i, rank in ranks.items()]
    result = run(bases["bpe"], tmp_path / "out", batch, heldout_pct=20)
    assert result.heldout_ids == [1, 3, 4] and result.counts["train"] == 2
    with pytest.raises(fmt.FormatError, match="not a hex digest"):
        fmt.heldout_rank("zz")


def test_one_heldout_lesson_moves_to_train_when_train_would_be_empty(bases, tmp_path):
    batch = lessons(3)
    result = run(bases["bpe"], tmp_path / "out", batch, heldout_pct=100)
    nearest = max(batch, key=lambda l: fmt.heldout_rank(l.conv_hash))
    assert result.counts["train"] == 1 and result.counts["heldout"] == 2
    assert [r["lesson_id"] for r in load(tmp_path / "out")["train"]] == [nearest.id]
    single = run(bases["bpe"], tmp_path / "one", batch[:1], heldout_pct=100)
    assert (single.counts["train"], single.counts["heldout"]) == (1, 0)
    assert load(tmp_path / "one")["heldout"] == []


def test_truncate_keeps_the_head_and_counts(bases, tmp_path):
    batch = lessons(4)
    full = run(bases["bpe"], tmp_path / "full", batch, heldout_pct=0)
    rows = {r["lesson_id"]: r for r in load(tmp_path / "full")["train"]}
    first_label = min(next(i for i, x in enumerate(r["labels"]) if x != -100) for r in rows.values())
    longest = max(len(r["input_ids"]) for r in rows.values())
    short = run(bases["bpe"], tmp_path / "short", batch, heldout_pct=0, max_seq_len=longest - 1)
    assert short.counts["truncated"] == sum(len(r["input_ids"]) == longest for r in rows.values()) >= 1
    for row in load(tmp_path / "short")["train"]:
        whole = rows[row["lesson_id"]]
        assert row["input_ids"] == whole["input_ids"][: longest - 1]
        assert row["labels"] == whole["labels"][: longest - 1]
    none_left = run(bases["bpe"], tmp_path / "none", batch, heldout_pct=0, max_seq_len=first_label,
                    min_train=0)
    assert none_left.dropped_ids == {"dropped_no_assistant_tokens": [3, 2, 1, 0]}
    counts = none_left.counts  # dropped, so not counted as truncated
    assert (counts["dropped_no_assistant_tokens"], counts["truncated"], counts["train"]) == (4, 0, 0)
    assert full.counts["truncated"] == 0


def test_drop_removes_long_examples_and_names_them(bases, tmp_path):
    batch = lessons(3)
    batch[1] = lesson_in(batch[1].id, conversation(batch[1].id, reply_words=200))
    result = run(bases["bpe"], tmp_path / "out", batch, heldout_pct=0, max_seq_len=300,
                 too_long="drop")
    assert result.counts["dropped_too_long"] == 1 and result.counts["truncated"] == 0
    assert result.dropped_ids == {"dropped_too_long": [batch[1].id]}
    assert [r["lesson_id"] for r in load(tmp_path / "out")["train"]] == [batch[0].id, batch[2].id]


def test_cap_keeps_the_newest(bases, tmp_path):
    batch = lessons(5)  # ids 4, 3, 2, 1, 0
    result = run(bases["bpe"], tmp_path / "out", batch, heldout_pct=0, max_lessons=3)
    assert result.counts["capped"] == 2 and result.counts["train"] == 3
    assert [r["lesson_id"] for r in load(tmp_path / "out")["train"]] == [4, 3, 2]


def test_unrenderable_lessons_are_dropped_with_their_reason(bases, tmp_path):
    from lacd.ingest.lessons import parse_line

    starts_with_reply = [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}]
    native_call = parse_line(json.dumps({"messages": [
        {"role": "user", "content": "list files"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "ls", "arguments": "{}"}}]},
        {"role": "tool", "content": "a.py"},
        {"role": "assistant", "content": "There is a.py."},
    ]})).messages
    bad = [lesson_in(8, starts_with_reply), lesson_in(7, native_call)]
    result = run(bases["bpe"], tmp_path / "out", bad + lessons(2), heldout_pct=0)
    assert result.dropped_ids == {"dropped_unrenderable": [8, 7]}
    assert result.counts["train"] == 2


def test_format_json_is_the_result_and_the_folder_appears_complete(bases, tmp_path):
    out = tmp_path / "dataset"
    stale = temporary_sibling(out)  # a half-written folder of an earlier attempt under this pid
    stale.mkdir()
    (stale / "junk").write_text("half-written", encoding="utf-8")
    result = run(bases["bpe"], out, lessons(5))
    assert json.loads((out / "format.json").read_text(encoding="utf-8")) == result.to_dict()
    assert not stale.exists() and not (out / "junk").exists()
    rerun = run(bases["bpe"], out, lessons(3))  # a redone stage replaces the folder
    splits = load(out)
    assert [len(splits["train"]), len(splits["heldout"])] == [rerun.counts["train"], rerun.counts["heldout"]]
    assert sorted(row["lesson_id"] for row in splits["train"] + splits["heldout"]) == [0, 1, 2]


def test_a_failure_midway_leaves_no_folder(bases, tmp_path, monkeypatch):
    from datasets import DatasetDict

    real_save = DatasetDict.save_to_disk

    def save_then_fail(self, path, **kwargs):
        real_save(self, path, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(DatasetDict, "save_to_disk", save_then_fail)
    out = tmp_path / "dataset"
    with pytest.raises(OSError, match="disk full"):
        run(bases["bpe"], out, lessons(3))
    assert not out.exists() and not (tmp_path / "dataset.tmp").exists()


def test_trainer_reads_the_dataset(bases, tmp_path):
    from lacd.pipeline.train import load_examples

    run(bases["bpe"], tmp_path / "out", lessons(10), heldout_pct=30)
    train, _ = load_examples(tmp_path / "out", "train", 2048)
    heldout, _ = load_examples(tmp_path / "out", "heldout", 2048)
    assert len(train) + len(heldout) == 10 and len(train) >= 1


@pytest.mark.parametrize("batch, kwargs, message", [
    ([], {}, "no lessons to format"),
    (lessons(2), {"max_seq_len": 3},
     r"nothing to train on: 0 training example\(s\) from 2 lesson\(s\), at least 1 needed "
     r"\(dropped: no assistant tokens 2\)"),
    (lessons(2), {"min_train": 3}, "at least 3 needed"),
    (lessons(1), {"too_long": "cut"}, "too_long is 'cut'"),
    (lessons(1), {"chat_family": "gemma"}, "unknown chat family 'gemma'"),
])
def test_clear_errors(bases, tmp_path, batch, kwargs, message):
    with pytest.raises(fmt.FormatError, match=message):
        run(bases["bpe"], tmp_path / "out", batch, heldout_pct=0, **kwargs)
    assert not (tmp_path / "out").exists()


def test_missing_base_folder_is_a_format_error(tmp_path):
    with pytest.raises(fmt.FormatError, match="cannot load the tokenizer"):
        fmt.format_lessons(lessons(1), spec(tmp_path / "absent", tmp_path / "out"))


def test_default_system_prompt_is_the_agents():
    prompt = fmt.default_system_prompt()
    assert "<tool_code>" in prompt and "read_file" in prompt
    if FIXTURES.exists():
        assert prompt == (FIXTURES / "system_prompt.txt").read_text(encoding="utf-8")


@pytest.mark.skipif(not FIXTURES.exists(), reason="../shared fixtures are absent")
@pytest.mark.parametrize("kind, family", [("bpe", "chatml"), ("spm", "llama2")])
def test_real_agent_lines(bases, tmp_path, kind, family):
    from transformers import AutoTokenizer

    from lacd.ingest.lessons import parse_line

    lines = (FIXTURES / "agent_interactions.jsonl").read_text(encoding="utf-8").splitlines()
    parsed = [parse_line(line) for line in lines]
    batch = [fmt.LessonIn(i, p.conv_hash, p.messages) for i, p in reversed(list(enumerate(parsed)))]
    system = fmt.default_system_prompt()
    result = run(bases[kind], tmp_path / "out", batch, system=system, chat_family=family, max_seq_len=100_000)
    counts = result.counts
    no_reply = [i for i, p in enumerate(parsed) if not any(m["role"] == "assistant" for m in p.messages)]
    assert no_reply and result.dropped_ids == {"dropped_no_assistant_tokens": no_reply[::-1]}  # "" replies
    assert counts["train"] + counts["heldout"] + len(no_reply) == len(lines) and counts["truncated"] == 0
    usable = [lesson for lesson in batch if lesson.id not in no_reply]
    assert result.heldout_ids == [lesson.id for lesson in usable if fmt.heldout_rank(lesson.conv_hash) < 1000]
    tokenizer = AutoTokenizer.from_pretrained(bases[kind])
    by_id = {lesson.id: lesson for lesson in batch}
    for row in load(tmp_path / "out")["train"]:
        rendered = tpl.render(family, by_id[row["lesson_id"]].messages, system)
        labelled_segments(row)  # every label is its token or ignored
        assert labelled_texts(tokenizer, row["input_ids"], row["labels"]) == rendered.assistant_parts()
