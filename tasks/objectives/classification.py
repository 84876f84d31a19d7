"""Sequence classification: a text -> one of the labels train shows. Metrics are accuracy and F1; the baseline is
the majority class."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapters_impl.model_heads import SEQUENCE_CLASSIFICATION
from tasks.errors import UserInputError, capped
from tasks.objectives.base import Encode, Encoding, Objective, ReportInput

if TYPE_CHECKING:
    from collections.abc import Mapping

    from datasets import Dataset
    from torch import nn

    from tasks.config import RunConfig
    from tasks.load import DataRef
    from tasks.modeling import ModelSource
    from tasks.probe.suites import Suite
    from tasks.settings import ProbeSettings
    from tasks.tokenization import TokenizedRef

# The stages (tasks/*.py) import the objectives, and the config reads their names: what an objective uses of the
# stages is imported inside its functions.
log = logging.getLogger("adaptflow.probe")


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


def encoder(
    tokenizer: Any,
    data: DataRef,
    train: Dataset,
    eval_: Dataset,
    max_length: int,
    options: dict[str, Any],
    encoding: Encoding,
) -> tuple[Encode, list[str]]:
    """Ids, and the label's index among the label names as the one label."""
    assert data.label_column, "load_data keeps the label column for classification"
    text_column, label_column = data.text_column, data.label_column
    names = label_names_of(train, eval_, label_column)
    index = {name: i for i, name in enumerate(names)}

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        encoded = tokenizer(batch[text_column], truncation=True, max_length=max_length)
        return {**encoded, "labels": [index[str(v)] for v in batch[label_column]]}

    return encode, names


def collator(tokenizer: Any) -> Any:
    from transformers import DataCollatorWithPadding

    return DataCollatorWithPadding(tokenizer)


def metrics(
    model: nn.Module, tokenizer: Any, tokenized: TokenizedRef, batch_size: int, keep: Path | None
) -> dict[str, float]:
    """Loss, accuracy and macro F1."""
    from sklearn.metrics import accuracy_score, f1_score  # scipy takes a second to import

    from tasks.measuring import predict_labels

    _, eval_split = tokenized.splits()
    predicted, truth, loss = predict_labels(model, eval_split, collator(tokenizer), batch_size)
    return {
        "eval_loss": loss,
        "eval_accuracy": float(accuracy_score(truth, predicted)),
        "eval_f1_macro": float(f1_score(truth, predicted, average="macro", zero_division=0)),
    }


def eval_loss(model: nn.Module, dataset: Dataset, collate: Any, batch_size: int) -> float:
    """Mean loss per example."""
    from tasks.measuring import predict_labels

    return predict_labels(model, dataset, collate, batch_size)[2]


def base_metrics(source: ModelSource, tokenized: TokenizedRef, batch_size: int) -> dict[str, float]:
    """The majority class's accuracy (an untrained head would be noise)."""
    train_split, eval_split = tokenized.splits()
    majority = Counter(train_split["labels"]).most_common(1)[0][0]
    truth = eval_split["labels"]
    return {"base_eval_accuracy": sum(y == majority for y in truth) / len(truth)}


def check_comparable(tokenized: TokenizedRef, served_label_names: list[str] | None) -> str | None:
    if tokenized.label_names != served_label_names:
        return f"predicts {served_label_names}, the data has {tokenized.label_names}"
    return None


def plot_confusion(matrix: Any, names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2.5, 1.2 * len(names) + 2))
    image = ax.imshow(matrix, cmap="Blues")
    for (i, j), value in ((ij, matrix[ij]) for ij in ((i, j) for i in range(len(names)) for j in range(len(names)))):
        color = "white" if value > matrix.max() / 2 else "black"
        ax.text(j, i, str(value), ha="center", va="center", color=color)
    ticks = range(len(names))
    ax.set(xticks=ticks, yticks=ticks, xticklabels=names, yticklabels=names, xlabel="predicted", ylabel="true")
    ax.set_title("confusion matrix (eval)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(given: ReportInput) -> tuple[dict[str, Any], dict[str, float]]:
    """Precision / recall / F1 (macro and weighted), a per-class report, a confusion matrix (and its plot), and
    the majority-class baseline."""
    from sklearn.metrics import classification_report, confusion_matrix  # scipy: a second to import

    from tasks.measuring import predict_labels

    names = given.label_names or []
    _, eval_split = given.tokenized.splits()
    predicted, truth, _ = predict_labels(given.model, eval_split, collator(given.tokenizer), given.batch_size)
    ids = list(range(len(names)))
    table = classification_report(truth, predicted, labels=ids, target_names=names, output_dict=True, zero_division=0)
    extra: dict[str, float] = {}
    for average in ("macro", "weighted"):
        row = table[f"{average} avg"]
        extra |= {
            f"eval_precision_{average}": row["precision"],
            f"eval_recall_{average}": row["recall"],
            f"eval_f1_{average}": row["f1-score"],
        }
    matrix = confusion_matrix(truth, predicted, labels=ids)
    plot_confusion(matrix, names, given.folder / "confusion_matrix.png")
    sections = {
        "metrics": {
            "eval_accuracy": (given.metrics.get("eval_accuracy"), given.metrics.get("base_eval_accuracy")),
            **{key: (value, None) for key, value in extra.items()},
        },
        "per_class": {name: table[name] for name in names},
        "majority_class_accuracy": given.metrics.get("base_eval_accuracy"),
        "confusion_matrix": {"labels": names, "matrix": matrix.tolist()},
    }
    return sections, extra


def probe_inputs(data: DataRef, tokenized: TokenizedRef) -> tuple[list[str], list[int]]:
    """The eval texts and their label ids, for the robustness check."""
    return list(data.splits()[1][data.text_column]), list(tokenized.splits()[1]["labels"])


def probe(
    model: nn.Module,
    tokenizer: Any,
    suite: Suite,
    settings: ProbeSettings,
    texts: list[str] | None,
    labels: list[int] | None,
    options: Mapping[str, Any],
) -> dict[str, Any]:
    """Robustness: accuracy and consistency under perturbation (the generation checks need a causal LM)."""
    from tasks.probe.scoring import score_robustness

    if not (suite.robustness and texts and labels):
        return {}
    log.info("probe: robustness on %d eval texts", len(texts))
    return {"robustness": score_robustness(model, tokenizer, texts, labels, suite.robustness, settings)}


def metric_names(config: RunConfig) -> tuple[str, ...]:
    return ("eval_loss", "eval_accuracy", "eval_f1_macro")


OBJECTIVE = Objective(
    name="classification",
    summary="Label a text (data.label_column); accuracy and F1, a per-class report, vs the majority class",
    encoder=encoder,
    collator=collator,
    head=SEQUENCE_CLASSIFICATION,
    packing_problem="a classifier scores one row per sequence",
    metrics=metrics,
    eval_loss=eval_loss,
    base_metrics=base_metrics,
    report=report,
    probe=probe,
    uses_labels=True,
    check_comparable=check_comparable,
    probe_inputs=probe_inputs,
    token_loss=False,  # cross entropy over the batch's rows
    metric_names=metric_names,
    report_metrics=tuple(f"eval_{m}_{a}" for a in ("macro", "weighted") for m in ("precision", "recall", "f1")),
)
