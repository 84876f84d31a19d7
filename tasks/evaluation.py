"""Evaluate: the objective's eval metrics on a trained, a registered or the base model (causal LM: token-weighted
loss and perplexity; classification: accuracy and F1); the measuring itself is in tasks/measuring.py."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from datasets import Dataset
from torch import nn

from tasks.adapting import load_adapted, remember
from tasks.load import DataRef
from tasks.measuring import EVAL_BATCH_SIZE
from tasks.modeling import ModelSource, load_tokenizer
from tasks.objectives import get_objective
from tasks.tokenization import TokenizedRef
from tasks.tracking import RunRef, log_metrics
from tasks.training import TrainedRef


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
