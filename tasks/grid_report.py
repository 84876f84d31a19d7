"""The grid's report: the results table (CSV, Markdown) and its plots (heatmap, Pareto front, loss curves),
written to the parent run."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from tasks.config import GRID_DIMENSIONS, SelectSettings
from tasks.periodic_eval import plot_trial_curves
from tasks.tracking import RunRef, client_for
from tasks.trials import TrialResult, objective_params, pareto_front, selection_score, targets_label


def results_table(results: list[TrialResult], select: SelectSettings) -> pd.DataFrame:
    """One row per trial: its params, status, the select metric and the usual numbers; best first."""
    rows = []
    for r in sorted(results, key=lambda r: r.index):
        rows.append(
            {
                "trial": r.index,
                "method": r.params["method"],
                "target_modules": targets_label(r.params["target_modules"]),
                "r": r.params["r"],
                "alpha": r.params["alpha"],
                **objective_params(r.params),  # the objective's dimensions (beta, loss), when the grid lists them
                "status": r.status,
                "steps": r.steps,
                select.metric: r.metrics.get(select.metric, math.nan),
                "trainable_params": r.metrics.get("trainable_params", math.nan),
                "train_seconds": r.metrics.get("train_seconds", math.nan),
                "error": r.error or "",
            }
        )
    table = pd.DataFrame(rows)
    table = table.sort_values(select.metric, ascending=select.mode == "min", na_position="last", kind="stable")
    # Finished trials first: a pruned trial's metric is from fewer steps and does not compare with theirs.
    return table.sort_values("status", key=lambda s: s != "ok", kind="stable")


def rung_table(results: list[TrialResult]) -> pd.DataFrame:
    """Under pruning: one row per trial, its metric at each rung it reached (one column per rung's steps)."""
    steps = sorted({rung.steps for r in results for rung in r.rungs})
    rows = []
    for r in sorted(results, key=lambda r: r.index):
        at = {rung.steps: rung.value for rung in r.rungs}
        row = {"trial": r.index, "name": r.name, "status": r.status, "steps": r.steps}
        rows.append(row | {f"step {s}": at.get(s, math.nan) for s in steps})
    return pd.DataFrame(rows)


def plot_rungs(results: list[TrialResult], folder: Path) -> Path:
    """The metric of every trial at every rung it reached: finished trials solid, pruned ones dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = next(rung.metric for r in results for rung in r.rungs)
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        points = [(rung.steps, rung.value) for rung in r.rungs if rung.value is not None]
        if points:
            steps, values = zip(*points, strict=True)
            style = "-o" if r.status == "ok" else "--x" if r.status == "pruned" else ":"
            ax.plot(steps, values, style, label=f"{r.index}: {r.name}", linewidth=1, markersize=4)
    ax.set(xscale="log", xlabel="steps (rungs)", ylabel=metric, title="successive halving: metric per rung")
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = folder / "grid_rungs.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def markdown_table(table: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (pandas needs `tabulate` for this; we do not)."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "" if math.isnan(value) else f"{value:.6g}"
        return str(value).replace("|", "\\|")

    header = "| " + " | ".join(table.columns) + " |"
    rule = "|" + "---|" * len(table.columns)
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *rows]) + "\n"


def plot_grid(results: list[TrialResult], select: SelectSettings, folder: Path) -> list[Path]:
    """Heatmaps of the metric over r x alpha (one per method and target set), metric vs size with the Pareto
    front, and the trials' loss curves overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    ok = [r for r in results if selection_score(r, select) is not None]
    paths = []

    # One heatmap per method, target set and value of the objective's dimensions (one per beta, say).
    groups: dict[tuple[str, ...], list[TrialResult]] = {}
    for r in results:
        own = [GRID_DIMENSIONS[k].label(v) for k, v in objective_params(r.params).items()]
        groups.setdefault((r.params["method"], targets_label(r.params["target_modules"]), *own), []).append(r)
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.6), squeeze=False)
    for ax, (group, trials) in zip(axes[0], groups.items(), strict=True):
        ranks = sorted({t.params["r"] for t in trials})
        alphas = sorted({t.params["alpha"] for t in trials})
        grid = pd.DataFrame(math.nan, index=ranks, columns=alphas)
        labels = pd.DataFrame("", index=ranks, columns=alphas)
        for t in trials:  # a pruned trial's metric is from fewer steps: shown as its status, like a failed one
            grid.loc[t.params["r"], t.params["alpha"]] = (
                t.metrics.get(select.metric, math.nan) if t.status == "ok" else math.nan
            )
            last = t.rungs[-1].value if t.status == "pruned" and t.rungs else None
            labels.loc[t.params["r"], t.params["alpha"]] = (
                f"pruned @{t.steps}\n{last:.4g}" if last is not None and math.isfinite(last) else t.status
            )
        image = ax.imshow(grid.values, cmap="viridis_r" if select.mode == "min" else "viridis", aspect="auto")
        for (i, j), value in pd.DataFrame(grid.values).stack(future_stack=True).items():
            shown = labels.iat[i, j] if math.isnan(value) else f"{value:.4g}"
            ax.text(j, i, shown, ha="center", va="center", fontsize=8)
        ax.set(
            xticks=range(len(alphas)),
            xticklabels=[f"{a:g}" for a in alphas],
            yticks=range(len(ranks)),
            yticklabels=ranks,
            xlabel="alpha",
            ylabel="r",
            title=" · ".join(group),
        )
        fig.colorbar(image, ax=ax, label=select.metric)
    fig.tight_layout()
    paths.append(folder / "grid_heatmap.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    front = set(pareto_front(results, select))
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in ok:
        on_front = r.index in front
        ax.scatter(
            r.metrics["trainable_params"],
            r.metrics[select.metric],
            c="tab:red" if on_front else "tab:blue",
            s=40 if on_front else 20,
        )
        ax.annotate(str(r.index), (r.metrics["trainable_params"], r.metrics[select.metric]), fontsize=7)
    for r in results:  # pruned trials at their last rung's value: fewer steps, so off the front
        value = r.rungs[-1].value if r.status == "pruned" and r.rungs else None
        if value is not None and math.isfinite(value) and "trainable_params" in r.metrics:
            ax.scatter(r.metrics["trainable_params"], value, c="tab:gray", marker="x", s=20)
            ax.annotate(f"{r.index} (pruned @{r.steps})", (r.metrics["trainable_params"], value), fontsize=7)
    frontier = sorted((r for r in ok if r.index in front), key=lambda r: r.metrics["trainable_params"])
    ax.plot(
        [r.metrics["trainable_params"] for r in frontier],
        [r.metrics[select.metric] for r in frontier],
        "r--",
        label="Pareto front",
    )
    ax.set(xscale="log", xlabel="trainable parameters", ylabel=select.metric, title="metric vs size (trial numbers)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(folder / "grid_pareto.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in ok:
        assert r.trained is not None
        if r.trained.loss_history:
            steps, losses = zip(*r.trained.loss_history, strict=True)
            ax.plot(steps, losses, label=f"{r.index}: {r.name}", linewidth=1)
    ax.set(xlabel="step", ylabel="training loss", title="loss curves of the trials")
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(folder / "grid_loss_curves.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


def report_grid(results: list[TrialResult], select: SelectSettings, parent: RunRef) -> str:
    """The results table (CSV + Markdown) and the plots, written to the parent run, with the rung table and plot
    under pruning; returns the Markdown."""
    folder = Path(parent.run_dir) / "reports"
    folder.mkdir(parents=True, exist_ok=True)
    table = results_table(results, select)
    table.to_csv(folder / "grid_results.csv", index=False)
    markdown = markdown_table(table)
    (folder / "grid_results.md").write_text(markdown)
    plot_grid(results, select, folder)
    if any(r.rungs for r in results):
        rungs = rung_table(results)
        rungs.to_csv(folder / "grid_rungs.csv", index=False)
        (folder / "grid_rungs.md").write_text(markdown_table(rungs))
        plot_rungs(results, folder)
    if any(r.trained is not None and r.trained.eval_history for r in results):  # evaluation while training
        plot_trial_curves(eval_curves(results, parent, select.metric), select.metric, folder / "grid_eval_curves.png")
    client_for(parent).log_artifacts(parent.run_id, str(folder), "reports")
    return markdown


def eval_curves(results: list[TrialResult], parent: RunRef, metric: str) -> dict[str, list[tuple[int, float]]]:
    """Each trial's logged evaluation history of `metric` (pruned trials too), the first value at each step."""
    client = client_for(parent)
    curves: dict[str, list[tuple[int, float]]] = {}
    for r in results:
        if r.run_id is None:
            continue
        points: dict[int, float] = {}
        for m in sorted(client.get_metric_history(r.run_id, metric), key=lambda m: (m.step, m.timestamp)):
            if m.step > 0:
                points.setdefault(m.step, m.value)
        curves[f"{r.index}: {r.name} ({r.status})"] = sorted(points.items())
    return curves
