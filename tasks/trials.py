"""The comparison grid's own logic: expand the grid, run one isolated trial, compare, pick the best
(its table and plots: tasks/grid_report.py)."""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from itertools import product
from pathlib import Path
from typing import Any, Literal

import torch
from filelock import FileLock, Timeout
from pydantic import BaseModel

from adapters_impl import METHODS
from tasks import evaluation, sequence
from tasks.config import GRID_DIMENSIONS, GridSettings, PruneSettings, RunConfig, SelectSettings
from tasks.errors import UserInputError
from tasks.memory import preflight_plan
from tasks.modeling import ModelSource
from tasks.periodic_eval import RUNG_PREFIX, logged_metrics
from tasks.tokenization import TokenizedRef
from tasks.tracking import RunRef, claim, clear_error, client_for, end_run, log_metrics, start_run
from tasks.trained import TrainedRef

TrialStatus = Literal["ok", "failed", "pruned", "skipped"]


class RungRecord(BaseModel):
    """A trial's evaluation at a pruning rung: the metric that ranked it there after `steps` steps."""

    steps: int
    metric: str
    value: float | None


class TrialSpec(BaseModel):
    """One combination of the grid, as the full config of its run."""

    index: int
    name: str
    params: dict[str, Any]
    config: RunConfig

    def outcome(self, status: TrialStatus, **fields: Any) -> TrialResult:
        """This trial's result: its identity plus what happened."""
        return TrialResult(index=self.index, name=self.name, params=self.params, status=status, **fields)


class TrialResult(BaseModel):
    """What a trial produced; a failed trial keeps its error and has no trained model. Under pruning, `ok` is
    also a trial between rungs; a pruned one keeps the metrics of the last rung it reached."""

    index: int
    name: str
    params: dict[str, Any]
    status: TrialStatus
    steps: int = 0
    rungs: list[RungRecord] = []
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
            "steps": self.steps,
            "params": self.params,
            "metrics": self.metrics,
            "error": self.error,
            "rungs": [rung.model_dump() for rung in self.rungs],
        }


def targets_label(targets: list[str] | str) -> str:
    return targets if isinstance(targets, str) else "+".join(targets)


def expand_grid(config: RunConfig) -> list[TrialSpec]:
    """Every combination of grid.method x grid.target_modules x grid.r x grid.alpha x the objective's own
    dimensions (grid.beta, ...), in that order."""
    grid = config.grid
    assert grid is not None, "expand_grid needs a grid section"
    base = config.method.model_dump()
    specs = []
    variants = config.grid_variants()
    combinations = product(grid.method or [config.method.name], grid.target_modules, grid.r, grid.alpha, variants)
    for index, (method, targets, r, alpha, own) in enumerate(combinations):
        settings_type = METHODS[method].settings
        kept = {k: v for k, v in base.items() if k in settings_type.model_fields and k != "name"}
        settings = settings_type.model_validate(
            {**kept, "name": method, "r": r, "alpha": alpha, "target_modules": targets}
        )
        params = {"method": method, "r": r, "alpha": alpha, "target_modules": targets, **own}
        name = " ".join(
            [f"{method} r={r} alpha={alpha:g} targets={targets_label(targets)}"]
            + [GRID_DIMENSIONS[key].label(value) for key, value in own.items()]
        )
        trial_config = config.with_section(own).model_copy(update={"method": settings, "grid": None})
        specs.append(TrialSpec(index=index, name=name, params=params, config=trial_config))
    return specs


def objective_params(params: dict[str, Any]) -> dict[str, Any]:
    """A trial's values of the objective's grid dimensions (grid.beta, ...)."""
    return {key: value for key, value in params.items() if key in GRID_DIMENSIONS}


def trial_tokenized(tokenized: TokenizedRef, spec: TrialSpec) -> TokenizedRef:
    """The grid's tokenized rows with the trial's own values of the objective's dimensions in their options (what
    its loss and evaluation read: `GridDimension`)."""
    own = objective_params(spec.params)
    if not own:
        return tokenized
    return tokenized.model_copy(update={"options": {**tokenized.options, **own}})


def split_fitting(specs: list[TrialSpec]) -> tuple[list[TrialSpec], list[TrialResult]]:
    """The trials whose planned peak memory fits this machine's device (or that cannot be planned), and the others
    as `skipped` results with the estimate as their reason (tasks.memory)."""
    fitting, skipped = [], []
    for spec in specs:
        try:
            plan = preflight_plan(spec.config)
        except UserInputError:  # settings that do not fit the model: the trial fails with its own message
            plan = None
        if plan is None or plan.fits:
            fitting.append(spec)
        else:
            skipped.append(spec.outcome("skipped", error=f"would not fit in memory: {plan.describe()}"))
    return fitting, skipped


def check_grid_fits(config: RunConfig) -> None:
    """A grid's pre-flight: refuse it when not one trial fits in memory (the others are skipped as it runs).

    Raises:
        UserInputError: naming the smallest trial's estimate.
    """
    fitting, skipped = split_fitting(expand_grid(config))
    if not fitting:
        raise UserInputError(
            f"grid: not one of its {len(skipped)} trials would fit in memory; trial {skipped[0].index} "
            f"({skipped[0].name}) {skipped[0].error}; `adaptflow plan` shows each trial's estimate and settings "
            "that would fit (train.memory_check: false skips this check)"
        )


def trial_run(result: TrialResult, parent: RunRef) -> RunRef:
    """The nested MLflow run (and folder) a trial already has."""
    assert result.run_id and result.run_dir
    return RunRef(
        run_id=result.run_id,
        experiment_id=parent.experiment_id,
        tracking_uri=parent.tracking_uri,
        run_dir=result.run_dir,
    )


TRIAL_LOCK = ".trial.lock"  # in a trial's folder, held by the process that trains it


def become_trial_worker(grid_pid: int) -> None:
    """In a worker process of the grid's: end within a second of the grid (a SIGKILLed grid cannot stop its
    workers, which would train on, alone, and beside a resumed grid in the same folders); leave a terminal's
    Ctrl-C to the grid; print on stderr (the grid's stdout holds its --json result alone). Once per process.
    """
    if grid_pid == os.getpid():  # trials in the grid's own process (one at a time) end with it anyway
        return
    # A terminal's Ctrl-C reaches the whole process group: the grid ends its workers itself, and a worker
    # interrupted on its own would leave the pool waiting on its pipe.
    if threading.current_thread() is threading.main_thread():  # a Dask worker runs tasks in threads: its nanny
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # and the cluster's shutdown handle its signals
    sys.stdout = sys.stderr  # the Trainer prints its log dicts
    name = f"adaptflow-follow-{grid_pid}"
    if any(thread.name == name for thread in threading.enumerate()):
        return

    def watch() -> None:
        while True:
            try:
                os.kill(grid_pid, 0)
            except ProcessLookupError:
                os.kill(os.getpid(), signal.SIGKILL)  # nothing to save: the grid's resume continues the trial
            time.sleep(0.5)

    threading.Thread(target=watch, name=name, daemon=True).start()


def end_live_trials(parent: RunRef, status: str) -> None:
    """Mark the grid's trial runs still RUNNING as `status` (their processes were ended)."""
    client = client_for(parent)
    running = client.search_runs(
        [parent.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}' and attributes.status = 'RUNNING'",
        max_results=5000,
    )
    for run in running:
        client.set_terminated(run.info.run_id, status)


def trial_lock(run_dir: str | Path) -> FileLock:
    """The lock a trial's trainer holds: released by the operating system when that process dies."""
    folder = Path(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    return FileLock(str(folder / TRIAL_LOCK))


def check_no_live_trials(recorded: dict[int, TrialResult], wait: float = 5.0) -> None:
    """A resumed grid never trains beside a process of the grid it resumes (still training a trial's folder).

    Raises:
        UserInputError: naming the trial and its folder.
    """
    for index, result in recorded.items():
        if not result.run_dir:
            continue
        lock = trial_lock(result.run_dir)
        try:
            with lock.acquire(timeout=wait):
                pass
        except Timeout:
            raise UserInputError(
                f"--resume: trial {index} ({result.run_dir}) is still being trained by a process of the grid this "
                "resumes; wait for it to end (or stop it), then resume"
            ) from None


def run_trial(
    spec: TrialSpec,
    source: ModelSource,
    tokenized: TokenizedRef,
    parent: RunRef,
    threads: int | None,
    stop_at: int | None = None,
    previous: TrialResult | None = None,
    grid_pid: int | None = None,
) -> TrialResult:
    """apply -> train -> evaluate in a nested MLflow run and its own folder; a failure is a result, not a crash.

    Under pruning, training stops at `stop_at` (a rung) and a trial that goes on (`previous`, its result at the
    rung before) continues in the same run from its own checkpoint, with the adapter it was given then.
    In a worker process on the grid's machine (`grid_pid`), the trial ends with the grid.
    """
    if grid_pid is not None:
        become_trial_worker(grid_pid)
    if threads:
        torch.set_num_threads(threads)  # trials share the machine's cores instead of fighting over them
    config = spec.config
    if previous is None:
        run = start_run(config, run_name=f"trial {spec.index}: {spec.name}", parent_run_id=parent.run_id)
        client = client_for(run)
        client.set_tag(run.run_id, "adaptflow.grid_trial", str(spec.index))
    else:
        run = trial_run(previous, parent)
        client = client_for(run)
        client.update_run(run.run_id, status="RUNNING")
        claim(client, run.run_id)  # live in this process now (the sweep of dead runs checks it)
        clear_error(client, run.run_id)  # a failure of an interrupted attempt is no longer the trial's state
    kept = {"steps": previous.steps, "rungs": previous.rungs} if previous else {}
    with trial_lock(run.run_dir):
        return _train_trial(spec, source, trial_tokenized(tokenized, spec), run, stop_at, previous, kept)


def logged_at_rung(trained: TrainedRef, stop_at: int | None, max_steps: int | None) -> dict[str, float] | None:
    """At an intermediate rung, the evaluation training logged at that step (`train.eval_steps`), if any."""
    if stop_at is not None and max_steps is not None and stop_at < max_steps:
        return logged_metrics(trained.eval_history, trained.periodic, trained.steps)
    return None


def rung_evaluation(stop_at: int | None, max_steps: int | None) -> Callable[..., dict[str, float]]:
    """The evaluate stage of a trial: what training logged at an intermediate rung, else the evaluation itself."""

    def evaluate(trained: TrainedRef, tokenized: TokenizedRef, run: RunRef, batch_size: int) -> dict[str, float]:
        return logged_at_rung(trained, stop_at, max_steps) or evaluation.evaluate_model(
            trained, tokenized, run, batch_size
        )

    return evaluate


def _train_trial(
    spec: TrialSpec,
    source: ModelSource,
    tokenized: TokenizedRef,
    run: RunRef,
    stop_at: int | None,
    previous: TrialResult | None,
    kept: dict[str, Any],
) -> TrialResult:
    config = spec.config
    client = client_for(run)
    try:
        going_on = previous.trained.adapted if previous is not None and previous.trained is not None else None
        calls = sequence.PLAIN.but(evaluate_model=rung_evaluation(stop_at, config.train.max_steps))
        done = sequence.train_and_evaluate(config, source, tokenized, run, calls, stop_at, going_on)
        assert done.trained is not None
        trained, metrics = done.trained, done.metrics
        logged = logged_at_rung(trained, stop_at, config.train.max_steps)
    except Exception as exc:  # isolation: the grid goes on with the other trials
        error = f"{type(exc).__name__}: {exc}".strip()
        client.set_tag(run.run_id, "adaptflow.error", error[:5000])
        (Path(run.run_dir) / "error.txt").write_text(traceback.format_exc())
        end_run(run, "FAILED")
        return spec.outcome("failed", run_id=run.run_id, run_dir=run.run_dir, error=error, **kept)
    metrics = {**metrics, **trained.metrics()}
    if previous is not None:  # a trial continued across rungs: its training time is every rung's
        metrics["train_seconds"] += previous.metrics.get("train_seconds", 0.0)
    # Under pruning each rung's evaluation is logged at its step: the trial's metric history is its rungs
    # (beside an evaluation history, under rung_ names: tasks/periodic_eval.py).
    if logged is not None:
        metrics = {**metrics, **{f"{RUNG_PREFIX}{k}": v for k, v in logged.items()}}
        log_metrics(run, {k: v for k, v in metrics.items() if k not in logged}, step=trained.steps)
    else:
        log_metrics(run, metrics, step=trained.steps if stop_at else 0)
    end_run(run, "FINISHED")
    return spec.outcome(
        "ok",
        run_id=run.run_id,
        run_dir=run.run_dir,
        metrics=metrics,
        trained=trained,
        steps=trained.steps,
        rungs=previous.rungs if previous else [],
    )


def selection_score(result: TrialResult, select: SelectSettings) -> float | None:
    value = result.metrics.get(select.metric)
    if result.status != "ok" or value is None or not math.isfinite(value):
        return None
    return value if select.mode == "min" else -value


def ranked(results: list[TrialResult], select: SelectSettings) -> list[TrialResult]:
    """The finished trials with a finite `select` metric, best first; ties go to fewer trainable parameters, then
    to the earlier trial."""
    scored = [(score, r) for r in results if (score := selection_score(r, select)) is not None]
    scored.sort(key=lambda sr: (sr[0], sr[1].metrics.get("trainable_params", math.inf), sr[1].index))
    return [r for _, r in scored]


def select_best(results: list[TrialResult], select: SelectSettings) -> TrialResult | None:
    """The best finished trial by `select` (ties as in `ranked`)."""
    best = ranked(results, select)
    return best[0] if best else None


def rung_steps(max_steps: int, prune: PruneSettings, trials: int) -> list[int]:
    """The step counts at which the trials are ranked, growing by eta, the last one max_steps.

    From `prune.min_steps` when set; else max_steps / eta^k with k the most halvings `trials` allow
    (eta^k <= trials), so that about one trial is left for the last rung.
    """
    if prune.min_steps is not None:
        rungs, step = [], prune.min_steps
        while step < max_steps:
            rungs.append(step)
            step *= prune.eta
        return [*rungs, max_steps]
    k = 0
    while prune.eta ** (k + 1) <= trials:
        k += 1
    return sorted({max(1, round(max_steps / prune.eta**i)) for i in range(k + 1)})


def rung_ranking(grid: GridSettings) -> SelectSettings:
    """What ranks the trials at a rung: `grid.prune`'s metric and mode, else `grid.select`'s."""
    assert grid.prune is not None
    return SelectSettings(metric=grid.prune.metric or grid.select.metric, mode=grid.prune.mode or grid.select.mode)


def survivors(results: list[TrialResult], ranking: SelectSettings, eta: int) -> list[int]:
    """Indices of the trials that go on after a rung: the best ceil(n / eta) of the n that finished it with a
    finite metric (a failed trial is out; ties as in `ranked`)."""
    finished = ranked(results, ranking)
    return sorted(r.index for r in finished[: math.ceil(len(finished) / eta)])


def at_rung(result: TrialResult, ranking: SelectSettings) -> TrialResult:
    """The trial's result with its evaluation at this rung recorded (a failed trial records none)."""
    if result.status != "ok":
        return result
    value = result.metrics.get(ranking.metric)
    rung = RungRecord(steps=result.steps, metric=ranking.metric, value=value)
    return result.model_copy(update={"rungs": [*result.rungs, rung]})


def mark_pruned(result: TrialResult, parent: RunRef) -> TrialResult:
    """A trial that stops at this rung: tagged in its run, status `pruned`, no model to select."""
    client_for(parent).set_tag(trial_run(result, parent).run_id, "adaptflow.grid_status", "pruned")
    return result.model_copy(update={"status": "pruned", "trained": None})


def recorded_trials(parent: RunRef, specs: list[TrialSpec], metric: str | None) -> dict[int, TrialResult]:
    """The trials a resumed grid had started, by index: their runs and folders to continue in (from their own
    checkpoints) and, under pruning, the rung evaluations they logged (`metric` at each rung's step)."""
    client = client_for(parent)
    runs = client.search_runs(
        [parent.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}'",
        order_by=["attributes.start_time ASC"],  # the newest run of a trial wins
        max_results=5000,
    )
    found = {}
    for run in runs:
        index = int(run.data.tags.get("adaptflow.grid_trial", "-1"))
        if not 0 <= index < len(specs):
            continue
        # With an evaluation history, the rungs' values are logged under rung_ names (tasks/periodic_eval.py).
        key = f"{RUNG_PREFIX}{metric}" if metric and specs[index].config.train.eval_steps else metric
        history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step) if key else []
        rungs = [RungRecord(steps=m.step, metric=metric or m.key, value=m.value) for m in history if m.step > 0]
        found[index] = specs[index].outcome(
            "ok",
            run_id=run.info.run_id,
            run_dir=str(Path(parent.run_dir).parent / run.info.run_id),  # beside the parent, as start_run makes them
            metrics=dict(run.data.metrics),
            rungs=rungs,
        )
    return found


def before_rung(result: TrialResult, steps: int) -> TrialResult:
    """A recorded trial as it was before the rung at `steps`: what a resumed grid continues from."""
    rungs = [rung for rung in result.rungs if rung.steps < steps]
    return result.model_copy(update={"rungs": rungs, "steps": rungs[-1].steps if rungs else 0})


def replay_rung(result: TrialResult, steps: int) -> TrialResult | None:
    """A recorded trial's result at the rung at `steps`, if it logged one (a resumed grid does not train it again)."""
    rungs = [rung for rung in result.rungs if rung.steps <= steps]
    if not rungs or rungs[-1].steps != steps or rungs[-1].value is None:
        return None
    metrics = {**result.metrics, rungs[-1].metric: rungs[-1].value}
    return result.model_copy(update={"rungs": rungs, "steps": steps, "metrics": metrics, "status": "ok"})


def steps_saved(results: list[TrialResult], max_steps: int | None) -> int:
    """Training steps the pruned trials did not take."""
    return sum(max_steps - r.steps for r in results if r.status == "pruned" and max_steps)


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
