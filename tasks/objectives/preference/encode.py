"""Preference rows -> token ids with labels on the responses only, rendered with the run's chat template.

Each response is rendered after its prompt with the template (tasks/instruction.py's `ChatTemplate`,
`response_spans` and `tokenize_with_one_bos`, the code instruction tuning trains and serves with), so the model
sees its preference data exactly as it sees chats. A pair's chosen and rejected rows share their prompt tokens.

Truncation: a row longer than `max_length` loses its oldest prompt tokens first (after BOS; the same number from
chosen and rejected, so both keep the same prompt); a row whose response (with its end of turn) cannot fit with at
least one prompt token is dropped and counted (`pref_dropped_rows`).

Collators pad on the right: `PairCollator` stacks the chosen rows then the rejected rows of a batch into one
batch (one forward for both, as TRL); `UnpairedCollator` adds KTO's mismatched rows (each prompt with the previous
row's completion in the batch, TRL's rotation) for the KL estimate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from adapters_impl.packaged import tokenize_with_one_bos
from tasks.errors import UserInputError
from tasks.labels import IGNORE_INDEX
from tasks.objectives.instruction.chat import ChatTemplate, response_spans

PAIR_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
UNPAIRED_COLUMNS = ("input_ids", "labels", "prompt_length", "label")


@dataclass(frozen=True)
class Rendered:
    """One prompt + response as ids, which tokens are response targets, and where the response starts."""

    ids: list[int]
    target: list[bool]
    start: int  # index of the first response token

    def labels(self) -> list[int]:
        labels = [tok if hit else IGNORE_INDEX for tok, hit in zip(self.ids, self.target, strict=True)]
        labels[0] = IGNORE_INDEX
        return labels


def render(
    prompt: Sequence[Mapping[str, str]],
    completion: Sequence[Mapping[str, str]],
    tokenizer: Any,
    template: ChatTemplate,
) -> Rendered:
    """The prompt and its response rendered and tokenized once; targets = the tokens overlapping the response's
    assistant turns (end of turn included), located by character offsets as instruction tuning does.

    Raises:
        UserInputError: naming instruction.template when no response token can be located.
    """
    messages = [*prompt, *completion]
    text, spans = response_spans(tokenizer, template, messages)
    answers = sum(1 for m in completion if m["role"] == "assistant")
    trained = spans[len(spans) - answers :]
    ids, offsets = tokenize_with_one_bos(tokenizer, text)
    target = [e > b and any(e > s0 and b < s1 for s0, s1 in trained) for b, e in offsets]
    if not any(target[1:]):
        raise UserInputError(
            f"instruction.template: template {template.name} left no response token to train in a preference row; "
            "choose plain or chatml"
        )
    return Rendered(ids, target, target.index(True, 1))


def _cut(row: Rendered, cut: int, keep: int) -> Rendered:
    return Rendered(
        row.ids[:keep] + row.ids[keep + cut :], row.target[:keep] + row.target[keep + cut :], row.start - cut
    )


def _keep(tokenizer: Any, ids: list[int]) -> int:
    return 1 if ids[:1] == [tokenizer.bos_token_id] and tokenizer.bos_token_id is not None else 0


def encode_pair(
    row: Mapping[str, Any], tokenizer: Any, template: ChatTemplate, max_length: int
) -> dict[str, Any] | None:
    """A normalised pair as `PAIR_COLUMNS`; None when a response cannot fit in `max_length` (dropped)."""
    chosen = render(row["prompt"], row["chosen"], tokenizer, template)
    rejected = render(row["prompt"], row["rejected"], tokenizer, template)
    cut = max(len(chosen.ids), len(rejected.ids)) - max_length
    if cut > 0:
        keep = _keep(tokenizer, chosen.ids)
        if keep + cut >= min(chosen.start, rejected.start):
            return None
        chosen, rejected = _cut(chosen, cut, keep), _cut(rejected, cut, keep)
    shared = 0
    limit = min(chosen.start, rejected.start)
    while shared < limit and chosen.ids[shared] == rejected.ids[shared]:
        shared += 1
    return {
        "prompt_input_ids": chosen.ids[:shared],
        "chosen_input_ids": chosen.ids,
        "chosen_labels": chosen.labels(),
        "rejected_input_ids": rejected.ids,
        "rejected_labels": rejected.labels(),
    }


def encode_unpaired(
    row: Mapping[str, Any], tokenizer: Any, template: ChatTemplate, max_length: int
) -> dict[str, Any] | None:
    """A normalised unpaired row as `UNPAIRED_COLUMNS`; None when its completion cannot fit (dropped)."""
    rendered = render(row["prompt"], row["completion"], tokenizer, template)
    cut = len(rendered.ids) - max_length
    if cut > 0:
        keep = _keep(tokenizer, rendered.ids)
        if keep + cut >= rendered.start:
            return None
        rendered = _cut(rendered, cut, keep)
    return {
        "input_ids": rendered.ids,
        "labels": rendered.labels(),
        "prompt_length": rendered.start,
        "label": bool(row["label"]),
    }


@dataclass
class PreferenceEncoder:
    """The batched row encoder (`Dataset.map(batched=True)`): normalised rows in, encoded rows out, rows whose
    response cannot fit dropped and counted in `dropped` (`pref_dropped_rows`)."""

    tokenizer: Any
    template: ChatTemplate
    max_length: int
    paired: bool
    dropped: int = field(default=0)

    @property
    def columns(self) -> tuple[str, ...]:
        return PAIR_COLUMNS if self.paired else UNPAIRED_COLUMNS

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        names = ("prompt", "chosen", "rejected") if self.paired else ("prompt", "completion", "label")
        encode = encode_pair if self.paired else encode_unpaired
        out: dict[str, list[Any]] = {key: [] for key in self.columns}
        for values in zip(*(batch[n] for n in names), strict=True):
            row = encode(dict(zip(names, values, strict=True)), self.tokenizer, self.template, self.max_length)
            if row is None:
                self.dropped += 1
                continue
            for key in self.columns:
                out[key].append(row[key])
        return out


def encode_all(
    rows: Sequence[Mapping[str, Any]], tokenizer: Any, template: ChatTemplate, max_length: int, paired: bool
) -> tuple[list[dict[str, Any]], int]:
    """Every normalised row encoded (a list; the pipeline maps `PreferenceEncoder` over a Dataset), and the count
    of rows dropped.

    Raises:
        UserInputError: naming data.max_length when every row is dropped.
    """
    encoder = PreferenceEncoder(tokenizer, template, max_length, paired)
    names = ("prompt", "chosen", "rejected") if paired else ("prompt", "completion", "label")
    encoded = encoder({n: [r[n] for r in rows] for n in names})
    out = [dict(zip(encoded, values, strict=True)) for values in zip(*encoded.values(), strict=True)]
    if not out:
        raise UserInputError(
            f"data.max_length: {max_length} tokens is too short for every preference row ({encoder.dropped} dropped: "
            "a response with its end of turn and one prompt token must fit); raise data.max_length"
        )
    return out, encoder.dropped


def _pad(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def padded(ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids, attention mask and labels (padding labelled IGNORE_INDEX)."""
    return {
        "input_ids": _pad(ids, pad_id),
        "attention_mask": _pad([[1] * len(r) for r in ids], 0),
        "labels": _pad(labels, IGNORE_INDEX),
    }


@dataclass(frozen=True)
class PairCollator:
    """A batch of pairs as one batch of 2×pairs rows: the chosen rows, then the rejected rows."""

    pad_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [f["chosen_input_ids"] for f in features] + [f["rejected_input_ids"] for f in features]
        labels = [f["chosen_labels"] for f in features] + [f["rejected_labels"] for f in features]
        return padded(ids, labels, self.pad_id)


@dataclass(frozen=True)
class UnpairedCollator:
    """A batch of labelled rows, plus KTO's mismatched rows: row i's prompt with row i-1's completion (TRL's
    rotation by one within the batch), cut to `max_length` from the prompt's oldest tokens after BOS."""

    pad_id: int
    max_length: int
    bos_id: int | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = padded([f["input_ids"] for f in features], [f["labels"] for f in features], self.pad_id)
        batch["label"] = torch.tensor([bool(f["label"]) for f in features], dtype=torch.bool)
        kl_ids, kl_labels = [], []
        for i, f in enumerate(features):
            other = features[i - 1]
            start = int(other["prompt_length"])
            prompt = list(f["input_ids"][: int(f["prompt_length"])])
            ids, labels = (
                prompt + list(other["input_ids"][start:]),
                [IGNORE_INDEX] * len(prompt) + list(other["labels"][start:]),
            )
            cut = len(ids) - self.max_length
            if cut > 0:
                keep = 1 if self.bos_id is not None and ids[:1] == [self.bos_id] else 0
                ids, labels = ids[:keep] + ids[keep + cut :], labels[:keep] + labels[keep + cut :]
            kl_ids.append(ids)
            kl_labels.append(labels)
        kl = padded(kl_ids, kl_labels, self.pad_id)
        batch |= {f"kl_{key}": value for key, value in kl.items()}
        return batch


def collator(tokenizer: Any, paired: bool, max_length: int) -> PairCollator | UnpairedCollator:
    """The collator for encoded pairs or unpaired rows of this tokenizer."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return PairCollator(pad) if paired else UnpairedCollator(pad, max_length, tokenizer.bos_token_id)
