"""A second kind of objective, written as another package would write one: text regression (a number per text).

It differs from the builtin objectives for real: its own config section (`regression:`, which names the target
column and scales it), its own data column (a number, not a label), its own head (one output, MSE loss), its own
metric (`eval_mae`) and its own serving output (a score, not a label or text). It imports only what an objective
may: the record, the settings and the measuring below the objectives. tests/test_objective_plugin.py registers it
with one entry point line and takes it through run -> register -> predict in fresh processes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from pydantic import Field
from torch import nn
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding

from adapters_impl.model_heads import ModelHead
from tasks.errors import UserInputError
from tasks.measuring import model_device
from tasks.objectives.base import Encode, Encoding, Objective, ReportInput
from tasks.settings import DataSettings, Section

HEAD = ModelHead(
    "sequence_regression",
    "AutoModelForSequenceClassification",
    "ForSequenceClassification",
    output="score",
    extra={"num_labels": 1, "problem_type": "regression"},
)


class RegressionSettings(Section):
    target_column: str = Field("score", description="the column holding each text's number")
    scale: float = Field(1.0, gt=0, description="targets are divided by this while training, multiplied back after")


def _settings(config: Any) -> RegressionSettings:
    return getattr(config, "regression", None) or RegressionSettings()


def options(config: Any) -> dict[str, Any]:
    return _settings(config).model_dump()


def prepare_rows(table: Dataset, settings: DataSettings, label_column: str | None, key: str, value: str) -> Dataset:
    """Rows with a text; the target column is checked when the encoder knows its name."""
    if settings.text_column not in table.column_names:
        raise UserInputError(f"{key}: {value} has no column {settings.text_column!r} (data.text_column)")
    return table.filter(lambda row: bool(str(row[settings.text_column] or "").strip()))


def encoder(
    tokenizer: Any,
    data: Any,
    train: Dataset,
    eval_: Dataset,
    max_length: int,
    settings: dict[str, Any],
    encoding: Encoding,
) -> tuple[Encode, None]:
    target, scale = settings["target_column"], settings["scale"]
    if target not in train.column_names:
        raise UserInputError(f"regression.target_column: the data has no column {target!r}")
    encoding.package = {"score_scale": scale}

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        encoded = tokenizer(batch[data.text_column], truncation=True, max_length=max_length)
        return {**encoded, "labels": [float(v) / scale for v in batch[target]]}

    return encode, None


def collator(tokenizer: Any) -> Any:
    return DataCollatorWithPadding(tokenizer)


@torch.no_grad()
def _predictions(model: nn.Module, dataset: Dataset, collate: Any, batch_size: int) -> tuple[list[float], list[float]]:
    model.eval()
    predicted: list[float] = []
    truth: list[float] = []
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate):  # type: ignore[arg-type]
        batch = {k: v.to(model_device(model)) for k, v in batch.items()}
        labels = batch.pop("labels")
        predicted += model(**batch).logits.float().squeeze(-1).tolist()
        truth += labels.float().tolist()
    return predicted, truth


def eval_loss(model: nn.Module, dataset: Dataset, collate: Any, batch_size: int) -> float:
    """Mean squared error per text, in training's (scaled) units."""
    predicted, truth = _predictions(model, dataset, collate, batch_size)
    return sum((p - t) ** 2 for p, t in zip(predicted, truth, strict=True)) / max(len(truth), 1)


def metrics(model: nn.Module, tokenizer: Any, tokenized: Any, batch_size: int, keep: Path | None) -> dict[str, float]:
    _, eval_split = tokenized.splits()
    predicted, truth = _predictions(model, eval_split, collator(tokenizer), batch_size)
    scale = tokenized.options["scale"]
    errors = [abs(p - t) * scale for p, t in zip(predicted, truth, strict=True)]
    mse = sum((p - t) ** 2 for p, t in zip(predicted, truth, strict=True)) / max(len(truth), 1)
    return {"eval_loss": mse, "eval_mae": sum(errors) / max(len(errors), 1)}


def base_metrics(source: Any, tokenized: Any, batch_size: int) -> dict[str, float]:
    """The baseline: the training targets' mean, predicted for every text."""
    train, eval_split = tokenized.splits()
    mean = sum(train["labels"]) / max(len(train), 1)
    truth = eval_split["labels"]
    scale = tokenized.options["scale"]
    return {
        "base_eval_loss": sum((mean - t) ** 2 for t in truth) / max(len(truth), 1),
        "base_eval_mae": sum(abs(mean - t) * scale for t in truth) / max(len(truth), 1),
    }


def report(given: ReportInput) -> tuple[dict[str, Any], dict[str, float]]:
    return {"regression": {"eval_mae": given.metrics.get("eval_mae")}}, {}


def probe(*args: Any) -> dict[str, Any]:
    return {}  # no bias checks apply to a score


def metric_names(config: Any) -> tuple[str, ...]:
    return ("eval_loss", "eval_mae")


OBJECTIVE = Objective(
    name="text_regression",
    summary="A number per text (regression.target_column); mean absolute error vs the training mean",
    encoder=encoder,
    collator=collator,
    head=HEAD,
    metrics=metrics,
    eval_loss=eval_loss,
    base_metrics=base_metrics,
    report=report,
    probe=probe,
    prepare_rows=prepare_rows,
    options=options,
    section="regression",
    settings=RegressionSettings,
    packing_problem="a regression head scores one row per sequence",
    token_loss=False,
    metric_names=metric_names,
)
