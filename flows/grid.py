"""The comparison grid: load and tokenize once, fan the trials out, compare, register the best, promote it."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.futures import as_completed
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner
from pydantic import BaseModel

from flows import stages
from flows.pipeline import pin_parent, register_and_promote, tracked_run
from tasks import sequence
from tasks.config import GridSettings, RunConfig
from tasks.errors import RunFailed
from tasks.halving import TrialSchedule
from tasks.identity import run_identity
from tasks.modeling import ModelSource
from tasks.tokenization import TokenizedRef
from tasks.tracking import RunRef, run_title
from tasks.trials import (
    TrialResult,
    TrialSpec,
    check_no_live_trials,
    end_live_trials,
    expand_grid,
    recorded_trials,
    rung_ranking,
    select_best,
    split_fitting,
    steps_saved,
    trial_tokenized,
)

# Progress goes to the terminal (stderr) whatever Prefect's log level; the Prefect UI shows each trial's state.
progress = logging.getLogger("adaptflow.grid")


class GridFailed(RunFailed):
    """Every trial of the grid failed (exit 1, with a summary of the errors)."""


class GridResult(BaseModel):
    """What `adaptflow grid --json` prints (the contract's `grid` object)."""

    command: str = "grid"
    status: str = "ok"
    parent_run_id: str
    select: dict[str, str]
    trials: list[dict[str, Any]]
    best: dict[str, Any]
    model_name: str
    model_version: str
    model_uri: str
    promoted: bool
    champion_version: str
    aliases: list[str]
    promotion: str
    bias_probe: dict[str, Any]
    table: str
    steps_total: int = 0  # training steps of all trials together
    steps_saved: int = 0  # steps the pruned trials did not take (0 without grid.prune)
    export: dict[str, Any] | None = None  # the best version's `export:` verdict and artifacts (None: none configured)


def trial_runner(grid: GridSettings) -> tuple[TaskRunner[Any], int | None]:
    """The task runner for the trials and the torch threads each trial gets (None: leave as is).

    Several trials at once run in separate processes (local) or Dask workers, never threads of one process:
    seeding and torch's thread pool are process-wide, and separate processes give the same numbers anywhere.
    """
    threads = max(1, (os.cpu_count() or 1) // grid.max_parallel)
    if grid.runner == "dask":
        from prefect_dask import DaskTaskRunner

        if grid.dask_address:
            return DaskTaskRunner(address=grid.dask_address), None
        cluster = {
            "n_workers": grid.max_parallel,
            "threads_per_worker": 1,
            "processes": True,
            "dashboard_address": None,
        }
        return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=cluster), threads
    if grid.max_parallel == 1:
        return ThreadPoolTaskRunner(max_workers=1), None
    return ProcessPoolTaskRunner(max_workers=grid.max_parallel), threads


@contextmanager
def workers_ended_on_interrupt(runner: TaskRunner[Any], parent: RunRef) -> Iterator[None]:
    """Ctrl-C or SIGTERM while trials train: end the worker processes at once (the runner's exit would wait for
    every trial to finish its rung, and workers interrupted by a terminal's Ctrl-C hang on their pipes) and mark
    the trials' runs KILLED, as the grid's run is. Workers ignore SIGINT (`tasks.trials.become_trial_worker`)."""
    try:
        yield
    except BaseException:
        executor = getattr(runner, "_executor", None)  # ProcessPoolTaskRunner's ProcessPoolExecutor
        for process in list((getattr(executor, "_processes", None) or {}).values()):
            with contextlib.suppress(Exception):
                process.kill()
        end_live_trials(parent, "KILLED")
        raise


def fan_out(
    runner: TaskRunner[Any],
    threads: int | None,
    work: list[tuple[TrialSpec, TrialResult | None]],
    context: dict[str, Any],
    grid: GridSettings,
    stop_at: int | None = None,
    stage: str = "",
) -> list[TrialResult]:
    """Run the trials (each continuing from its previous result, if any) on the runner, reporting trials done /
    total and the best so far."""
    results: list[TrialResult] = []
    futures = {
        runner.submit(
            # Named by its settings in the Prefect UI (trial 3: lora r=8 alpha=16 targets=q,v), not trial-473.
            stages.run_trial.with_options(task_run_name=f"trial {spec.index}: {spec.name}"),
            {"spec": spec, **context, "threads": threads, "stop_at": stop_at, "previous": previous},
        ): spec
        for spec, previous in work
    }
    for future in as_completed(list(futures)):
        spec = futures[future]
        try:
            result = future.result()
        except Exception as exc:  # the worker died before the trial could record its own failure
            result = spec.outcome("failed", error=f"{type(exc).__name__}: {exc}")
        results.append(result)
        best = select_best(results, grid.select)
        metric = grid.select.metric
        outcome = f"{metric} {result.metrics[metric]:.4g}" if metric in result.metrics else result.error
        so_far = f"trial {best.index} ({metric} {best.metrics[metric]:.4g})" if best else "none yet"
        progress.info(
            "[%s%d/%d trials done] trial %d %s: %s; best so far: %s",
            stage,
            len(results),
            len(work),
            result.index,
            result.name,
            outcome,
            so_far,
        )
    return sorted(results, key=lambda r: r.index)


def run_trials(
    specs: list[TrialSpec],
    source: ModelSource,
    tokenized: TokenizedRef,
    parent: RunRef,
    grid: GridSettings,
    max_steps: int | None,
) -> list[TrialResult]:
    """Fan the trials out on the configured runner as the schedule says: once each to the end, or in rungs under
    `grid.prune`."""
    runner, threads = trial_runner(grid)
    # Workers on this machine (processes, a local Dask cluster) end with this process; a cluster's do not.
    grid_pid = None if grid.dask_address else os.getpid()
    context = {"source": source, "tokenized": tokenized, "parent": parent, "grid_pid": grid_pid}
    metric = rung_ranking(grid).metric if grid.prune else None
    # A resumed grid continues each trial it had started in that trial's run, from its own checkpoint.
    recorded = recorded_trials(parent, specs, metric) if parent.resumed else {}
    check_no_live_trials(recorded)
    schedule = TrialSchedule(specs, grid, max_steps, recorded, parent)
    with runner, workers_ended_on_interrupt(runner, parent):
        while (rung := schedule.next_rung()) is not None:
            schedule.record(fan_out(runner, threads, rung.work, context, grid, rung.stop_at, rung.label))
    return schedule.results()


def _grid_run_name() -> str:
    from prefect.runtime import flow_run

    config = RunConfig.model_validate(dict(flow_run.parameters)["config"])
    grid = config.grid or GridSettings()
    return f"grid x{grid.size} · {run_title(config)}"


@flow(name="lora_grid", log_prints=False, flow_run_name=_grid_run_name)
def lora_grid(config: RunConfig, resume: bool = False, allow_changed: bool = False) -> GridResult:
    """Compare LoRA-family settings over rank x alpha x target modules; register the best, promote if it wins.

    The best trial is bias-probed before registration; a failed gate keeps it out of @champion. With `resume`,
    the newest unfinished grid of this config continues: each trial from its own checkpoint.
    """
    grid = config.grid or GridSettings()
    config = config.model_copy(update={"grid": grid})
    stages.tag_flow_run(["grid", "adaptflow", f"method:{config.method.name}", f"model:{config.registry.name}"])
    cache_dir = Path(config.train.output_dir).resolve() / ".cache"
    pin_parent(config, resume)
    source = stages.resolve_model(config.model)
    with tracked_run(config, run_name=f"grid {config.method.name} x{grid.size}", resume=resume) as parent:
        data = sequence.load_data(config, cache_dir, stages.CALLS)
        changed = stages.record_identity(parent, run_identity(config, data, source), allow_changed)
        changed |= stages.record_parent(parent, source)
        stages.log_datasets(parent, data)
        tokenized = sequence.tokenize(config, data, source, cache_dir, stages.CALLS)
        base_metrics = stages.evaluate_base(source, tokenized, config.train.eval_batch_size)
        specs = expand_grid(config)
        fitting, skipped = split_fitting(specs)
        for trial in skipped:
            progress.info("trial %d %s: skipped, %s", trial.index, trial.name, trial.error)
        results = run_trials(fitting, source, tokenized, parent, grid, config.train.max_steps)
        results = sorted([*results, *skipped], key=lambda r: r.index)
        table = stages.report_grid(results, grid.select, parent)
        best = select_best(results, grid.select)
        if best is None:
            errors = "; ".join(f"trial {r.index} ({r.name}): {r.error}" for r in results)
            raise GridFailed(f"all {len(results)} trials failed: {errors}")
        assert best.trained is not None and best.run_id and best.run_dir
        best_run = RunRef(
            run_id=best.run_id,
            experiment_id=parent.experiment_id,
            tracking_uri=parent.tracking_uri,
            run_dir=best.run_dir,
        )
        lineage = {"grid_parent_run_id": parent.run_id, "grid_trial": str(best.index), **changed}
        lineage |= {f"param.{k}": str(v) for k, v in best.params.items()}
        best_config = specs[best.index].config
        best_tokenized = trial_tokenized(tokenized, specs[best.index])  # its own loss settings (grid.beta, ...)
        if best_tokenized is not tokenized:  # the base's loss under the best trial's loss settings
            base_metrics = stages.evaluate_base(source, best_tokenized, config.train.eval_batch_size)
        metrics = {**best.metrics, **base_metrics}
        done = register_and_promote(best_config, source, data, best_tokenized, best_run, best.trained, metrics, lineage)
        title = f"grid x{grid.size}: best trial {best.index} ({best.name})"
        stages.publish_summary(parent, title, done.registered, done.decision, done.metrics, table)
        stages.log_metrics(parent, {f"best_{k}": v for k, v in done.metrics.items()})
    return GridResult(
        parent_run_id=parent.run_id,
        select=grid.select.model_dump(),
        trials=[r.public() for r in results],
        best=best.public(),
        model_name=done.registered.name,
        model_version=done.registered.version,
        model_uri=done.registered.model_uri,
        promoted=done.decision.promoted,
        champion_version=done.decision.champion_version,
        aliases=[done.decision.alias] if done.decision.alias else [],
        promotion=done.decision.reason,
        bias_probe=done.probe_report.public(),
        table=table,
        steps_total=sum(r.steps for r in results),
        steps_saved=steps_saved(results, config.train.max_steps),
        export=done.export,
    )
