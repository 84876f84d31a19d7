"""Tokenize: rows to token ids and labels, as the run's objective encodes them, saved and cached."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from datasets import Dataset, load_from_disk
from pydantic import BaseModel
from transformers import DataCollatorWithFlattening, PreTrainedTokenizerBase

from tasks.errors import UserInputError
from tasks.labels import IGNORE_INDEX
from tasks.load import DataRef, publish
from tasks.modeling import ModelSource, load_tokenizer
from tasks.objectives import get_objective
from tasks.objectives.base import Encoding

__all__ = ["IGNORE_INDEX", "TokenizedRef", "make_collator", "tokenize_dataset", "tokenize_key"]


class TokenizedRef(BaseModel):
    """Tokenized train/eval splits on disk, with what a model head needs to know."""

    train_dir: str
    eval_dir: str
    task: str
    label_names: list[str] | None = None
    train_tokens: int
    eval_tokens: int
    options: dict[str, Any] = {}  # the objective's settings, and what its encoder resolved for its own stages
    encoding: Encoding = Encoding()  # what the encoder resolved that every stage reads

    def splits(self) -> tuple[Dataset, Dataset]:
        return load_from_disk(self.train_dir), load_from_disk(self.eval_dir)

    def metrics(self) -> dict[str, float]:
        """Numbers the encoding found that the run logs (e.g. instruction rows dropped as too long)."""
        return dict(self.encoding.metrics)

    def params(self) -> dict[str, str]:
        """Run params the encoding resolved (e.g. the instruction template used)."""
        return dict(self.encoding.params)

    def model_source(self, source: ModelSource) -> ModelSource:
        """The base as these rows need it: with the tokens the encoder added to the tokenizer (a chat template's,
        in `encoding.added_tokens`), which every later load adds again, growing the embeddings to match."""
        added = list(self.encoding.added_tokens)
        return source.model_copy(update={"added_tokens": added}) if added else source

    def package(self) -> dict[str, Any]:
        """What a registered model's package records for serving (e.g. its chat template)."""
        return dict(self.encoding.package)


def tokenize_key(
    data: DataRef, source: ModelSource, task: str, max_length: int, options: dict[str, Any] | None = None
) -> str:
    """What tokenization depends on: the data's content, the tokenizer's files, the settings."""
    parts = [data.fingerprint, source.tokenizer_fingerprint, task, str(max_length), data.text_column]
    parts.append(data.label_column or "")
    if options:
        parts.append(json.dumps(options, sort_keys=True, default=str))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


def tokenize_dataset(
    data: DataRef,
    source: ModelSource,
    task: str,
    max_length: int,
    cache_dir: Path,
    options: dict[str, Any] | None = None,
) -> TokenizedRef:
    """Tokenize both splits into `cache_dir/<key>`; padding happens per batch in the collator.

    `options` are the objective's settings from the run config (`Objective.options`).
    """
    objective = get_objective(task)
    tokenizer = load_tokenizer(source)
    train, eval_ = data.splits()
    key = tokenize_key(data, source, task, max_length, options)
    resolved = json.loads(json.dumps(options or {}))  # a copy the encoder adds to
    encoding = Encoding()
    encode, names = objective.encoder(tokenizer, data, train, eval_, max_length, resolved, encoding)
    folder = cache_dir / key
    encoded = {}
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
        long_enough = [i for i, ids in enumerate(out["input_ids"]) if len(ids) >= objective.min_tokens]
        out = out if len(long_enough) == len(out) else out.select(long_enough)
        if len(out) == 0:
            raise UserInputError(
                f"data.max_length: no row of data.{split} is left after tokenization with data.max_length="
                f"{max_length} (empty texts, or every response cut away); raise data.max_length or check the data"
            )
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
        options=resolved,
        encoding=encoding,
    )


def make_collator(tokenizer: PreTrainedTokenizerBase, task: str, packing: bool = False) -> Any:
    """Dynamic padding per batch, as the objective pads (labels padded with IGNORE_INDEX never count); with
    `packing` (train.packing, for training only), rows flattened into one sequence and kept apart."""
    if packing:
        return PackingCollator(return_position_ids=True, separator_id=IGNORE_INDEX)
    return get_objective(task).collator(tokenizer)


class PackingCollator(DataCollatorWithFlattening):
    """Rows flattened into one sequence: position ids restart per row, labels -100 at each row's first token.

    With no attention mask, transformers builds a block-diagonal causal mask from the restarting position ids
    (eager and sdpa; flash-attention uses them as varlen boundaries), so rows never attend to one another. It does
    so only without a KV cache: a model whose config has `use_cache: true` (most) creates one in every forward,
    training included, and the rows then silently attend across boundaries. Each batch therefore carries
    `use_cache=False`, whatever the model's config says.
    """

    def __call__(
        self, features: list[dict[str, Any]], return_tensors: str | None = None, separator_id: int | None = None
    ) -> dict[str, Any]:
        batch = super().__call__(features, return_tensors=return_tensors, separator_id=separator_id)
        batch["use_cache"] = False
        return batch
