"""The one order of stages before registration, for every caller: a single run, each grid trial, each worker node.

    load -> tokenize -> apply-method -> train -> evaluate

The callers differ only in which callables run the stages (`StageCalls`): the single run and the grid's parent run
them as Prefect tasks (flows/stages.py), a grid trial in its worker process as plain functions, a worker node of a
multi-node run with a train stage that trains its share and no evaluation (node 0 evaluates). The arguments of
each stage are written once, here: a stage argument added once reaches all of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tasks import adapting, evaluation, load, tokenization, training
from tasks.adapting import AdaptedRef
from tasks.config import RunConfig
from tasks.load import DataRef
from tasks.modeling import ModelSource
from tasks.tokenization import TokenizedRef
from tasks.tracking import RunRef
from tasks.trained import TrainedRef

STAGES = ("load", "tokenize", "apply-method", "train", "evaluate")


@dataclass(frozen=True)
class StageCalls:
    """What runs each stage of the sequence: the plain functions by default."""

    load_data: Callable[..., DataRef] = load.load_data
    tokenize_dataset: Callable[..., TokenizedRef] = tokenization.tokenize_dataset
    apply_method: Callable[..., AdaptedRef] = adapting.apply_method
    train_model: Callable[..., TrainedRef | None] = training.train_model
    evaluate_model: Callable[..., dict[str, float]] | None = evaluation.evaluate_model  # None: not evaluated here

    def but(self, **changes: Any) -> StageCalls:
        return replace(self, **changes)


PLAIN = StageCalls()


def load_data(config: RunConfig, cache_dir: Path, calls: StageCalls = PLAIN) -> DataRef:
    """The run's data, read and split (read before any run opens: bad data is named with nothing left behind)."""
    return calls.load_data(config.data, config.objective, cache_dir / "data")


def tokenize(
    config: RunConfig, data: DataRef, source: ModelSource, cache_dir: Path, calls: StageCalls = PLAIN
) -> TokenizedRef:
    """The rows as the objective encodes them, with the objective's options (an instruction run's template)."""
    return calls.tokenize_dataset(
        data, source, config.task, config.data.max_length, cache_dir / "tokenized", config.task_options()
    )


@dataclass(frozen=True)
class Trained:
    """What apply -> train -> evaluate left: the adapted model, the trained one (None on a worker node: node 0
    holds the result) and the eval metrics ({} where this caller does not evaluate)."""

    adapted: AdaptedRef
    trained: TrainedRef | None
    metrics: dict[str, float]


def train_and_evaluate(
    config: RunConfig,
    source: ModelSource,
    tokenized: TokenizedRef,
    run: RunRef,
    calls: StageCalls = PLAIN,
    stop_at: int | None = None,
    adapted: AdaptedRef | None = None,
) -> Trained:
    """apply-method (unless `adapted`: a pruned trial going on with the adapter it was given) -> train (to `stop_at`,
    a rung, when given) -> evaluate."""
    if adapted is None:
        adapted = calls.apply_method(
            source, config.method, config.task, tokenized, run.run_dir, config.train.seed, config.train.precision
        )
    trained = calls.train_model(adapted, tokenized, config.train, run, stop_at)
    metrics: dict[str, float] = {}
    if calls.evaluate_model is not None and trained is not None:
        metrics = calls.evaluate_model(trained, tokenized, run, config.train.eval_batch_size)
    return Trained(adapted=adapted, trained=trained, metrics=metrics)
