"""Evaluate: token-weighted eval loss and perplexity (causal LM), accuracy and F1 (classification)."""

from __future__ import annotations

import math
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from torch import nn
from torch.utils.data import DataLoader

from tasks.adapting import load_adapted, remember
from tasks.load import DataRef
from tasks.modeling import ModelSource, load_base_model, load_tokenizer
from tasks.tokenization import IGNORE_INDEX, TokenizedRef, make_collator
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
def causal_lm_nll(model: nn.Module, dataset: Dataset, collator: Any, batch_size: int) -> tuple[float, int]:
    """Total negative log-likelihood and the number of scored tokens; padding (label -100) is excluded.

    Summing over tokens, not averaging per batch, weights every real token the same.
    """
    model.eval()
    total, count = 0.0, 0
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
        total += float(loss)
        count += int((targets != IGNORE_INDEX).sum())
    return total, count


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


def eval_loss(model: nn.Module, dataset: Dataset, collator: Any, batch_size: int, task: str) -> float:
    """Mean eval loss: per real token (causal LM) or per example (classification)."""
    if task == "causal_lm":
        nll, tokens = causal_lm_nll(model, dataset, collator, batch_size)
        return nll / max(tokens, 1)
    return predict_labels(model, dataset, collator, batch_size)[2]


def evaluate_model(
    trained: TrainedRef, tokenized: TokenizedRef, run: RunRef, batch_size: int = EVAL_BATCH_SIZE
) -> dict[str, float]:
    """The tuned model's eval metrics (and how long evaluating took), logged to the run."""
    started = time.perf_counter()
    adapted = trained.adapted
    model = load_adapted(adapted, trained.adapter_dir)
    remember(trained.adapter_dir, model)  # merge comes next and may reuse it
    metrics = model_metrics(model, load_tokenizer(adapted.source), tokenized, batch_size)
    metrics["eval_seconds"] = time.perf_counter() - started
    log_metrics(run, metrics)
    return metrics


def model_metrics(
    model: nn.Module, tokenizer: Any, tokenized: TokenizedRef, batch_size: int = EVAL_BATCH_SIZE
) -> dict[str, float]:
    """Eval loss and perplexity (causal LM) or loss, accuracy and macro F1 (classification) on the eval split."""
    collator = make_collator(tokenizer, tokenized.task)
    _, eval_split = tokenized.splits()
    if tokenized.task == "causal_lm":
        return causal_lm_metrics(model, eval_split, collator, batch_size, prefix="")
    from sklearn.metrics import accuracy_score, f1_score  # classification only: scipy takes a second to import

    predicted, truth, loss = predict_labels(model, eval_split, collator, batch_size)
    return {
        "eval_loss": loss,
        "eval_accuracy": float(accuracy_score(truth, predicted)),
        "eval_f1_macro": float(f1_score(truth, predicted, average="macro", zero_division=0)),
    }


def evaluate_registered(
    model_uri: str, data: DataRef, task: str, max_length: int, cache_dir: Path, batch_size: int = EVAL_BATCH_SIZE
) -> dict[str, float]:
    """A registered model's metrics on this data's eval split, tokenized with the model's own tokenizer.

    Raises:
        ValueError: a classifier whose label names differ from this data's (its scores would not compare).
    """
    from adapters_impl.packaged import download_registered
    from tasks.modeling import local_source
    from tasks.tokenization import tokenize_dataset

    served = download_registered(model_uri)
    source = local_source(served.tokenizer_dir, display_name=model_uri)
    tokenized = tokenize_dataset(data, source, task, max_length, cache_dir)
    if task == "classification" and tokenized.label_names != served.label_names:
        raise ValueError(f"{model_uri} predicts {served.label_names}, the data has {tokenized.label_names}")
    return model_metrics(served.model, served.tokenizer, tokenized, batch_size)


def evaluate_base(source: ModelSource, tokenized: TokenizedRef, batch_size: int = EVAL_BATCH_SIZE) -> dict[str, float]:
    """The baseline on the same eval set: the untouched base model (causal LM) or the majority class."""
    train_split, eval_split = tokenized.splits()
    if tokenized.task == "classification":
        majority = Counter(train_split["labels"]).most_common(1)[0][0]
        truth = eval_split["labels"]
        return {"base_eval_accuracy": sum(y == majority for y in truth) / len(truth)}
    tokenizer = load_tokenizer(source)
    model = load_base_model(source, "causal_lm", tokenizer)
    return causal_lm_metrics(model, eval_split, make_collator(tokenizer, "causal_lm"), batch_size, prefix="base_")
