"""Tokenize: text to token ids (causal LM) or ids plus label ids (classification), saved and cached."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from datasets import Dataset, load_from_disk
from pydantic import BaseModel
from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding, PreTrainedTokenizerBase

from tasks.errors import UserInputError, capped
from tasks.load import DataRef, publish
from tasks.modeling import ModelSource, load_tokenizer

IGNORE_INDEX = -100  # label id the loss skips: padding, and prompt tokens where masked


class TokenizedRef(BaseModel):
    """Tokenized train/eval splits on disk, with what a model head needs to know."""

    train_dir: str
    eval_dir: str
    task: str
    label_names: list[str] | None = None
    train_tokens: int
    eval_tokens: int

    def splits(self) -> tuple[Dataset, Dataset]:
        return load_from_disk(self.train_dir), load_from_disk(self.eval_dir)


def tokenize_key(data: DataRef, source: ModelSource, task: str, max_length: int) -> str:
    """What tokenization depends on: the data's content, the tokenizer's files, the settings."""
    parts = [data.fingerprint, source.tokenizer_fingerprint, task, str(max_length), data.text_column]
    parts.append(data.label_column or "")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


def label_names_of(train: Dataset, eval_: Dataset, column: str) -> list[str]:
    """Label names in a stable order (numeric labels numerically); eval labels must occur in train.

    Raises:
        UserInputError: eval has labels train never shows, or train has fewer than two classes.
    """
    seen = {str(v) for v in train[column]}
    unseen = {str(v) for v in eval_[column]} - seen
    if unseen:
        raise UserInputError(
            f"data.label_column: eval labels {capped(sorted(unseen))} never occur in train; "
            f"train has {capped(sorted(seen))}"
        )
    if len(seen) < 2:
        raise UserInputError(f"data.label_column: train has {len(seen)} distinct label(s); need at least 2")
    numeric = all(s.lstrip("-").isdigit() for s in seen)
    return sorted(seen, key=int) if numeric else sorted(seen)


def _causal(tokenizer: PreTrainedTokenizerBase, text_column: str, max_length: int) -> Any:
    eos = tokenizer.eos_token_id

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        # Room for an eos token, so the model learns where a text ends.
        encoded = tokenizer(batch[text_column], truncation=True, max_length=max_length - 1)
        ids = [[*seq, eos] if eos is not None and (not seq or seq[-1] != eos) else seq for seq in encoded["input_ids"]]
        return {
            "input_ids": ids,
            "attention_mask": [[1] * len(s) for s in ids],
            "labels": [list(s) for s in ids],
        }

    return encode


def _classify(
    tokenizer: PreTrainedTokenizerBase, text_column: str, label_column: str, names: list[str], max_length: int
) -> Any:
    index = {name: i for i, name in enumerate(names)}

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        encoded = tokenizer(batch[text_column], truncation=True, max_length=max_length)
        return {**encoded, "labels": [index[str(v)] for v in batch[label_column]]}

    return encode


def tokenize_dataset(data: DataRef, source: ModelSource, task: str, max_length: int, cache_dir: Path) -> TokenizedRef:
    """Tokenize both splits into `cache_dir/<key>`; padding happens per batch in the collator."""
    tokenizer = load_tokenizer(source)
    train, eval_ = data.splits()
    names: list[str] | None = None
    if task == "classification":
        assert data.label_column, "load_data keeps the label column for classification"
        names = label_names_of(train, eval_, data.label_column)
        encode = _classify(tokenizer, data.text_column, data.label_column, names, max_length)
    else:
        encode = _causal(tokenizer, data.text_column, max_length)
    key = tokenize_key(data, source, task, max_length)
    folder = cache_dir / key
    encoded = {}
    minimum = 2 if task == "causal_lm" else 1  # a causal text needs two tokens to predict anything
    for split, table in (("train", train), ("eval", eval_)):
        # Our own fingerprint: datasets would otherwise hash `encode` with dill (slow, and it prints).
        # In memory: a cache file would land in the data folder (a second copy, and a partial one on a full disk);
        # the one copy on disk is the published folder below.
        out = table.map(
            encode,
            batched=True,
            keep_in_memory=True,
            remove_columns=table.column_names,
            desc=f"tokenize {split}",
            new_fingerprint=f"{key}-{split}",
        )
        long_enough = [i for i, ids in enumerate(out["input_ids"]) if len(ids) >= minimum]
        out = out if len(long_enough) == len(out) else out.select(long_enough)
        if len(out) == 0:
            raise UserInputError(f"data.{split}: no text left after tokenization (data.max_length={max_length})")
        encoded[split] = out
    if not folder.exists():
        publish(folder, lambda staging: [encoded[s].save_to_disk(str(staging / s)) for s in encoded])
    return TokenizedRef(
        train_dir=str(folder / "train"),
        eval_dir=str(folder / "eval"),
        task=task,
        label_names=names,
        train_tokens=sum(len(ids) for ids in encoded["train"]["input_ids"]),
        eval_tokens=sum(len(ids) for ids in encoded["eval"]["input_ids"]),
    )


def make_collator(tokenizer: PreTrainedTokenizerBase, task: str) -> Any:
    """Dynamic padding per batch; causal labels are padded with IGNORE_INDEX so padding never counts."""
    if task == "causal_lm":
        return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, padding=True)
    return DataCollatorWithPadding(tokenizer)
