"""Evaluation reports for the run (JSON + Markdown + plots), beyond the headline metrics.

The objective (tasks/objectives/<task>.py) writes its sections: for causal LM, loss and perplexity and greedy
generations for fixed prompts, tuned vs base; for classification, precision / recall / F1, a per-class report, a
confusion matrix plot and the majority-class baseline.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from tasks.adapting import load_adapted, remember
from tasks.load import DataRef
from tasks.measuring import EVAL_BATCH_SIZE
from tasks.modeling import ModelSource, load_tokenizer
from tasks.objectives import ReportInput, get_objective
from tasks.tokenization import TokenizedRef
from tasks.tracking import RunRef, log_metrics
from tasks.training import TrainedRef


def base_generations(source: ModelSource, data: DataRef, tokenized: TokenizedRef) -> list[str]:
    """The untouched base model's part of the report, e.g. its greedy continuations of the fixed prompts (causal
    LM) or its responses to held-out prompts (instruction); deterministic."""
    return get_objective(tokenized.task).base_generations(source, data, tokenized)


def _markdown(report: dict[str, Any]) -> str:
    lines = [f"# Evaluation ({report['task']})", "", "| metric | tuned | base |", "|---|---|---|"]
    for key, (tuned, base) in report["metrics"].items():
        fmt = lambda v: "" if v is None else f"{v:.6g}"  # noqa: E731
        lines.append(f"| {key} | {fmt(tuned)} | {fmt(base)} |")
    if report.get("generations"):
        columns = [k for k in ("prompt", "reference", "tuned", "base") if k in report["generations"][0]]
        lines += ["", "## Greedy generations", "", "| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
        for g in report["generations"]:
            cells = [g[k].replace("|", "\\|").replace("\n", " ") for k in columns]
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
    # Every eval metric tuned vs base; an objective's own sections may say more (or lay the table out its way).
    table = {
        k: (v, metrics.get(f"base_{k}")) for k, v in metrics.items() if k.startswith("eval_") and k != "eval_seconds"
    }
    report: dict[str, Any] = {"task": adapted.task, "method": adapted.method_name, "metrics": table}
    given = ReportInput(
        model=model,
        tokenizer=tokenizer,
        data=data,
        tokenized=tokenized,
        metrics=metrics,
        base_texts=base_texts,
        label_names=adapted.label_names,
        folder=folder,
        batch_size=batch_size,
    )
    sections, extra = get_objective(adapted.task).report(given)
    report |= sections
    remember(trained.adapter_dir, model)  # the next stages reuse it
    (folder / "eval_report.json").write_text(json.dumps(report, indent=2, default=str))
    (folder / "eval_report.md").write_text(_markdown(report))
    log_metrics(run, extra)
    return extra
