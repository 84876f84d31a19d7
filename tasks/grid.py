"""The comparison grid's own logic: expand the grid, run one isolated trial, compare, pick the best
(its table and plots: tasks/grid_report.py)."""

from __future__ import annotations

import math
import traceback
from itertools import product
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel

from adapters_impl import METHODS
from tasks.adapting import apply_method
from tasks.config import RunConfig, SelectSettings
from tasks.evaluation import evaluate_model
from tasks.modeling import ModelSource
from tasks.tokenization import TokenizedRef
from tasks.tracking import RunRef, client_for, end_run, log_metrics, start_run
from tasks.training import TrainedRef, train_model


class TrialSpec(BaseModel):
    """One combination of the grid, as the full config of its run."""

    index: int
    name: str
    params: dict[str, Any]
    config: RunConfig

    def outcome(self, status: Literal["ok", "failed"], **fields: Any) -> TrialResult:
        """This trial's result: its identity plus what happened."""
        return TrialResult(index=self.index, name=self.name, params=self.params, status=status, **fields)


class TrialResult(BaseModel):
    """What a trial produced; a failed trial keeps its error and has no trained model."""

    index: int
    name: str
    params: dict[str, Any]
    status: Literal["ok", "failed"]
    run_id: str | None = None
    run_dir: str | None = None
    metrics: dict[str, float] = {}
    error: str | None = None
    trained: TrainedRef | None = None

    def public(self) -> dict[str, Any]:
        """The trial as the `grid` JSON shows it."""
        return {
            "index": self.index,
            "name": self.name,
            "run_id": self.run_id,
            "status": self.status,
            "params": self.params,
            "metrics": self.metrics,
            "error": self.error,
        }


def targets_label(targets: list[str] | str) -> str:
    return targets if isinstance(targets, str) else "+".join(targets)


def expand_grid(config: RunConfig) -> list[TrialSpec]:
    """Every combination of grid.method x grid.target_modules x grid.r x grid.alpha, in that order."""
    grid = config.grid
    assert grid is not None, "expand_grid needs a grid section"
    base = config.method.model_dump()
    specs = []
    combinations = product(grid.method or [config.method.name], grid.target_modules, grid.r, grid.alpha)
    for index, (method, targets, r, alpha) in enumerate(combinations):
        settings_type = METHODS[method].settings
        kept = {k: v for k, v in base.items() if k in settings_type.model_fields and k != "name"}
        settings = settings_type.model_validate(
            {**kept, "name": method, "r": r, "alpha": alpha, "target_modules": targets}
        )
        params = {"method": method, "r": r, "alpha": alpha, "target_modules": targets}
        name = f"{method} r={r} alpha={alpha:g} targets={targets_label(targets)}"
        trial_config = config.model_copy(update={"method": settings, "grid": None})
        specs.append(TrialSpec(index=index, name=name, params=params, config=trial_config))
    return specs


def run_trial(
    spec: TrialSpec, source: ModelSource, tokenized: TokenizedRef, parent: RunRef, threads: int | None
) -> TrialResult:
    """apply -> train -> evaluate in a nested MLflow run and its own folder; a failure is a result, not a crash."""
    if threads:
        torch.set_num_threads(threads)  # trials share the machine's cores instead of fighting over them
    config = spec.config
    run = start_run(config, run_name=f"trial {spec.index}: {spec.name}", parent_run_id=parent.run_id)
    client = client_for(run)
    client.set_tag(run.run_id, "adaptflow.grid_trial", str(spec.index))
    try:
        adapted = apply_method(source, config.method, config.task, tokenized, run.run_dir, config.train.seed)
        trained = train_model(adapted, tokenized, config.train, run)
        metrics = evaluate_model(trained, tokenized, run, config.train.eval_batch_size)
    except Exception as exc:  # isolation: the grid goes on with the other trials
        error = f"{type(exc).__name__}: {exc}".strip()
        client.set_tag(run.run_id, "adaptflow.error", error[:5000])
        (Path(run.run_dir) / "error.txt").write_text(traceback.format_exc())
        end_run(run, "FAILED")
        return spec.outcome("failed", run_id=run.run_id, run_dir=run.run_dir, error=error)
    metrics = {**metrics, **trained.metrics()}
    log_metrics(run, metrics)
    end_run(run, "FINISHED")
    return spec.outcome("ok", run_id=run.run_id, run_dir=run.run_dir, metrics=metrics, trained=trained)


def selection_score(result: TrialResult, select: SelectSettings) -> float | None:
    value = result.metrics.get(select.metric)
    if result.status != "ok" or value is None or not math.isfinite(value):
        return None
    return value if select.mode == "min" else -value


def select_best(results: list[TrialResult], select: SelectSettings) -> TrialResult | None:
    """The best finished trial by `select`; ties go to fewer trainable parameters, then to the earlier trial."""
    ranked = [(score, r) for r in results if (score := selection_score(r, select)) is not None]
    if not ranked:
        return None
    return min(ranked, key=lambda sr: (sr[0], sr[1].metrics.get("trainable_params", math.inf), sr[1].index))[1]


def pareto_front(results: list[TrialResult], select: SelectSettings) -> list[int]:
    """Indices of the trials no other trial beats on both the metric and the trainable-parameter count."""
    points = [
        (r.index, s, r.metrics["trainable_params"]) for r in results if (s := selection_score(r, select)) is not None
    ]
    return sorted(
        i
        for i, score, size in points
        if not any((s2 <= score and p2 <= size) and (s2 < score or p2 < size) for j, s2, p2 in points if j != i)
    )
