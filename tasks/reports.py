"""Evaluation reports for the run (JSON + Markdown + plots), beyond the headline metrics.

Causal LM: eval loss and perplexity, tuned vs base, and greedy generations for fixed prompts, tuned vs base.
Classification: accuracy, precision / recall / F1 (macro and weighted), a per-class report, a confusion
matrix plot, and the majority-class baseline.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from tasks.adapting import load_adapted, remember
from tasks.config import ProbeSettings
from tasks.evaluation import EVAL_BATCH_SIZE, predict_labels
from tasks.generation import generate
from tasks.load import DataRef
from tasks.modeling import ModelSource, load_base_model, load_tokenizer
from tasks.tokenization import TokenizedRef, make_collator
from tasks.tracking import RunRef, log_metrics
from tasks.training import TrainedRef

PROMPTS = 4  # generations for the first few eval texts, cut to their first words
PROMPT_WORDS = 6
GREEDY = ProbeSettings(samples=1, max_new_tokens=30)


def fixed_prompts(data: DataRef) -> list[str]:
    """The first eval texts, cut to their first words: the same prompts for every run on this data."""
    texts = data.splits()[1][data.text_column][:PROMPTS]
    return [" ".join(str(t).split()[:PROMPT_WORDS]) for t in texts]


def base_generations(source: ModelSource, data: DataRef, task: str) -> list[str]:
    """The untouched base model's greedy continuations of the fixed prompts (causal LM; deterministic)."""
    if task != "causal_lm":
        return []
    tokenizer = load_tokenizer(source)
    base = load_base_model(source, "causal_lm", tokenizer)
    return generate(base, tokenizer, fixed_prompts(data), GREEDY, 0)


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


def _markdown(report: dict[str, Any]) -> str:
    lines = [f"# Evaluation ({report['task']})", "", "| metric | tuned | base |", "|---|---|---|"]
    for key, (tuned, base) in report["metrics"].items():
        fmt = lambda v: "" if v is None else f"{v:.6g}"  # noqa: E731
        lines.append(f"| {key} | {fmt(tuned)} | {fmt(base)} |")
    if "generations" in report:
        lines += ["", "## Greedy generations", "", "| prompt | tuned | base |", "|---|---|---|"]
        for g in report["generations"]:
            cells = [g[k].replace("|", "\\|").replace("\n", " ") for k in ("prompt", "tuned", "base")]
            lines.append("| " + " | ".join(cells) + " |")
    if "per_class" in report:
        lines += ["", "## Per class", "", "| class | precision | recall | f1 | support |", "|---|---|---|---|---|"]
        for name, row in report["per_class"].items():
            lines.append(
                f"| {name} | {row['precision']:.4g} | {row['recall']:.4g} | {row['f1-score']:.4g} | {row['support']:g} |"
            )
    return "\n".join(lines) + "\n"


def report_evaluation(
    trained: TrainedRef,
    data: DataRef,
    tokenized: TokenizedRef,
    metrics: dict[str, float],
    base_texts: list[str],
    run: RunRef,
    batch_size: int = EVAL_BATCH_SIZE,
) -> dict[str, float]:
    """Write `reports/eval_report.{json,md}` (and the confusion matrix); return the extra metrics.

    `base_texts` are the base model's continuations of the same prompts (`base_generations`, cached).
    """
    adapted = trained.adapted
    model: nn.Module = load_adapted(adapted, trained.adapter_dir)
    tokenizer = load_tokenizer(adapted.source)
    folder = Path(run.run_dir) / "reports"
    folder.mkdir(parents=True, exist_ok=True)
    extra: dict[str, float] = {}
    report: dict[str, Any] = {"task": adapted.task, "method": adapted.method_name}
    if adapted.task == "causal_lm":
        report["metrics"] = {
            key: (metrics.get(key), metrics.get(f"base_{key}")) for key in ("eval_loss", "eval_perplexity")
        }
        prompts = fixed_prompts(data)
        report["generations"] = [
            {"prompt": prompt, "tuned": tuned, "base": base}
            for prompt, tuned, base in zip(
                prompts, generate(model, tokenizer, prompts, GREEDY, 0), base_texts, strict=True
            )
        ]
    else:
        from sklearn.metrics import classification_report, confusion_matrix  # scipy: a second to import

        names = adapted.label_names or []
        _, eval_split = tokenized.splits()
        predicted, truth, _ = predict_labels(model, eval_split, make_collator(tokenizer, "classification"), batch_size)
        ids = list(range(len(names)))
        table = classification_report(
            truth, predicted, labels=ids, target_names=names, output_dict=True, zero_division=0
        )
        for average in ("macro", "weighted"):
            row = table[f"{average} avg"]
            extra |= {
                f"eval_precision_{average}": row["precision"],
                f"eval_recall_{average}": row["recall"],
                f"eval_f1_{average}": row["f1-score"],
            }
        report["metrics"] = {
            "eval_accuracy": (metrics.get("eval_accuracy"), metrics.get("base_eval_accuracy")),
            **{key: (value, None) for key, value in extra.items()},
        }
        report["per_class"] = {name: table[name] for name in names}
        report["majority_class_accuracy"] = metrics.get("base_eval_accuracy")
        matrix = confusion_matrix(truth, predicted, labels=ids)
        report["confusion_matrix"] = {"labels": names, "matrix": matrix.tolist()}
        plot_confusion(matrix, names, folder / "confusion_matrix.png")
    remember(trained.adapter_dir, model)  # the next stages reuse it
    (folder / "eval_report.json").write_text(json.dumps(report, indent=2, default=str))
    (folder / "eval_report.md").write_text(_markdown(report))
    log_metrics(run, extra)
    return extra
