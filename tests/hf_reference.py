"""Reference numbers from Hugging Face itself, for tests that pin lacd's own loss code.

``hf_loss`` is transformers' ``model(input_ids, labels=...).loss`` (its own shift, its own
ignore_index -100, mean over the labelled tokens), one example at a time with no padding and no
packing, weighted back into a sum: nothing of lacd's collation or loss code is involved.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch


def hf_loss(model: torch.nn.Module, rows: Sequence[Mapping]) -> tuple[torch.Tensor, int]:
    """(summed loss over every labelled token of rows, number of those tokens), by transformers."""
    device = next(model.parameters()).device
    total, count = torch.zeros((), device=device), 0
    for row in rows:
        labels = torch.tensor([row["labels"]], device=device)
        predicted = int((labels[:, 1:] != -100).sum())  # the tokens transformers averages over
        if predicted == 0:
            continue
        loss = model(input_ids=torch.tensor([row["input_ids"]], device=device), labels=labels).loss
        total = total + loss * predicted
        count += predicted
    return total, count


def hf_mean_loss(model: torch.nn.Module, rows: Sequence[Mapping]) -> float:
    with torch.no_grad():
        total, count = hf_loss(model, rows)
    return float(total) / count


def labelled_texts(tokenizer, input_ids: Sequence[int], labels: Sequence[int]) -> list[str]:
    """The exact text of each run of labelled tokens, whitespace included.

    Decoding a run alone loses what a tokenizer drops at the start of a text (SentencePiece's
    leading space), so each run is the difference of two decoded prefixes of the whole example:
    decode(ids[:end]) minus decode(ids[:start]).
    """
    runs, start = [], None
    for i, label in enumerate([*labels, -100]):
        if label != -100 and start is None:
            start = i
        elif label == -100 and start is not None:
            runs.append((start, i))
            start = None
    texts = []
    for a, b in runs:
        before, through = tokenizer.decode(input_ids[:a]), tokenizer.decode(input_ids[:b])
        assert through.startswith(before), (before[-40:], through[-40:])
        texts.append(through[len(before):])
    return texts
