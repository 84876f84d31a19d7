"""Evaluate: the objective's eval metrics (causal LM: token-weighted loss and perplexity; classification: accuracy
and F1), and the measuring they share."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from torch import nn
from torch.utils.data import DataLoader

from tasks.adapting import load_adapted, remember
from tasks.load import DataRef
from tasks.modeling import ModelSource, load_tokenizer
from tasks.objectives import IGNORE_INDEX, get_objective
from tasks.tokenization import TokenizedRef
from tasks.tracking import RunRef, log_metrics
from tasks.training import TrainedRef

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


def eval_loss(model: nn.Module, dataset: Dataset, collator: Any, batch_size: int, task: str) -> float:
    """Mean eval loss as the objective weighs it: per real token (causal LM) or per example (classification)."""
    return get_objective(task).eval_loss(model, dataset, collator, batch_size)


def evaluate_model(
    trained: TrainedRef, tokenized: TokenizedRef, run: RunRef, batch_size: int = EVAL_BATCH_SIZE
) -> dict[str, float]:
    """The tuned model's eval metrics (and how long evaluating took), logged to the run."""
    started = time.perf_counter()
    adapted = trained.adapted
    model = load_adapted(adapted, trained.adapter_dir)
    remember(trained.adapter_dir, model)  # merge comes next and may reuse it
    reports = Path(run.run_dir) / "reports"  # what evaluation generated, the report reuses
    metrics = model_metrics(model, load_tokenizer(adapted.source), tokenized, batch_size, reports)
    # Evaluation while training counts as evaluation (train_seconds leaves it out).
    metrics["eval_seconds"] = time.perf_counter() - started + trained.periodic.get("periodic_eval_seconds", 0.0)
    # With an evaluation history, at the last step: the run's latest value is then this one (the registered one).
    log_metrics(run, metrics, step=trained.steps if trained.eval_history else 0)
    return metrics


def model_metrics(
    model: nn.Module,
    tokenizer: Any,
    tokenized: TokenizedRef,
    batch_size: int = EVAL_BATCH_SIZE,
    keep: Path | None = None,
) -> dict[str, float]:
    """The objective's metrics on the eval split: loss and perplexity (causal LM), loss, accuracy and macro F1
    (classification); see `Objective.metrics` for `keep`."""
    return get_objective(tokenized.task).metrics(model, tokenizer, tokenized, batch_size, keep)


def evaluate_registered(
    model_uri: str,
    data: DataRef,
    task: str,
    max_length: int,
    cache_dir: Path,
    batch_size: int = EVAL_BATCH_SIZE,
    options: dict[str, Any] | None = None,
) -> dict[str, float]:
    """A registered model's metrics on this data's eval split, tokenized with the model's own tokenizer (and what
    its package records, e.g. its chat template).

    Raises:
        ValueError: the model's outputs differ from this data's (a classifier's label names): its scores would
            not compare.
    """
    from adapters_impl.packaged import download_registered
    from tasks.modeling import local_source
    from tasks.tokenization import tokenize_dataset

    served = download_registered(model_uri)
    source = local_source(served.tokenizer_dir, display_name=model_uri)
    tokenized = tokenize_dataset(data, source, task, max_length, cache_dir, {**(options or {}), **served.serving})
    problem = get_objective(task).check_comparable(tokenized, served.label_names)
    if problem:
        raise ValueError(f"{model_uri} {problem}")
    return model_metrics(served.model, served.tokenizer, tokenized, batch_size)


def evaluate_base(source: ModelSource, tokenized: TokenizedRef, batch_size: int = EVAL_BATCH_SIZE) -> dict[str, float]:
    """The objective's baseline on the same eval set: the untouched base model (causal LM) or the majority class."""
    return get_objective(tokenized.task).base_metrics(source, tokenized, batch_size)
