"""Measuring a model on tokenized rows: the losses, perplexities and accuracies the objectives report.

Below the objectives (which call these) and the stages (tasks/evaluation.py runs them on a trained model).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from datasets import Dataset
from torch import nn
from torch.utils.data import DataLoader

from tasks.labels import IGNORE_INDEX

EVAL_BATCH_SIZE = 16  # train.eval_batch_size's default, for callers outside a configured run


def _batches(dataset: Dataset, collator: Any, batch_size: int, device: torch.device) -> Any:
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collator)  # type: ignore[arg-type]
    for batch in loader:
        yield {k: v.to(device) for k, v in batch.items()}


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def causal_lm_scores(model: nn.Module, dataset: Dataset, collator: Any, batch_size: int) -> tuple[float, int, int]:
    """Total negative log-likelihood, the number of scored tokens, and how many of them the model ranks first;
    padding and unscored prompt tokens (label -100) are excluded.

    Summing over tokens, not averaging per batch, weights every real token the same.
    """
    model.eval()
    total, count, correct = 0.0, 0, 0
    for batch in _batches(dataset, collator, batch_size, model_device(model)):
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        logits = logits[:, -labels.shape[1] :]  # methods that prepend virtual tokens lengthen the logits
        shifted, targets = logits[:, :-1], labels[:, 1:]
        loss = nn.functional.cross_entropy(
            shifted.reshape(-1, shifted.shape[-1]),
            targets.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        scored = targets != IGNORE_INDEX
        total += float(loss)
        count += int(scored.sum())
        correct += int((shifted.argmax(-1).eq(targets) & scored).sum())
    return total, count, correct


def causal_lm_nll(model: nn.Module, dataset: Dataset, collator: Any, batch_size: int) -> tuple[float, int]:
    """Total negative log-likelihood and the number of scored tokens (see `causal_lm_scores`)."""
    nll, tokens, _ = causal_lm_scores(model, dataset, collator, batch_size)
    return nll, tokens


@torch.no_grad()
def predict_labels(
    model: nn.Module, dataset: Dataset, collator: Any, batch_size: int
) -> tuple[list[int], list[int], float]:
    """(predicted, true) label ids over the dataset, and the mean cross-entropy loss."""
    model.eval()
    predicted: list[int] = []
    truth: list[int] = []
    total = 0.0
    for batch in _batches(dataset, collator, batch_size, model_device(model)):
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        total += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
        predicted += logits.argmax(-1).tolist()
        truth += labels.tolist()
    return predicted, truth, total / max(len(truth), 1)


def causal_lm_metrics(
    model: nn.Module, dataset: Dataset, collator: Any, batch_size: int, prefix: str
) -> dict[str, float]:
    nll, tokens = causal_lm_nll(model, dataset, collator, batch_size)
    loss = nll / max(tokens, 1)
    return {f"{prefix}eval_loss": loss, f"{prefix}eval_perplexity": math.exp(min(loss, 50.0))}


def response_metrics(
    model: nn.Module, dataset: Dataset, collator: Any, batch_size: int, prefix: str
) -> dict[str, float]:
    """Loss, perplexity and next-token accuracy over the scored (response) tokens only."""
    nll, tokens, correct = causal_lm_scores(model, dataset, collator, batch_size)
    loss = nll / max(tokens, 1)
    return {
        f"{prefix}eval_loss": loss,
        f"{prefix}eval_perplexity": math.exp(min(loss, 50.0)),
        f"{prefix}eval_token_accuracy": correct / max(tokens, 1),
    }
