"""Evaluation while training (`train.eval_steps`, `train.best`, `train.early_stopping`): the HF Trainer's own
evaluation loop, best-checkpoint tracking and EarlyStoppingCallback, with what they get wrong on resume fixed.

The Trainer evaluates every eval_steps (eval_strategy="steps") by calling `MethodTrainer.evaluate`, which measures
the objective's own metrics (`PeriodicEval`, the same numbers the final evaluation reports) and logs them into the
Trainer's log history; `metric_for_best_model` tracks the best value and step in the TrainerState. Everything that
must survive a kill lives in the checkpoint's trainer_state.json: the metric history (`log_history`), the best
value, step and checkpoint (`best_metric`, `best_global_step`, `best_model_checkpoint`), the patience counter and
the step training stopped early at (`stateful_callbacks`).

What stock transformers (5.x) gets wrong here, and what this module does about it:
- EarlyStoppingCallback's patience counter is saved in the checkpoint but only read back with
  `restore_callback_states_from_checkpoint=True`, which also restores the TrainerControl flags (a grid rung's
  "stop" would stop the continued trial at once): `ResumableEarlyStopping` restores its own state itself.
- The best step is recorded at any evaluation, but its checkpoint only exists when that step was also a save step:
  `MethodTrainer` saves a checkpoint at every new best (rotation keeps it: `rotate_checkpoints` protects it).
- Early stopping sets no save, so a run killed after it stopped would resume before the stop and train again:
  the stop is saved as a checkpoint, which records that training ended (`stopped_early`).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import EarlyStoppingCallback, TrainerState

from tasks.config import TrainSettings
from tasks.objectives import get_objective
from tasks.tokenization import TokenizedRef

RUNTIME_KEY = "eval_runtime"  # seconds one evaluation took, in each history entry (HF's own key)


class PeriodicEval:
    """One evaluation of the model being trained: the objective's eval metrics on the eval split, with
    `train.eval_generations` held-out answers (instruction) instead of the final evaluation's count."""

    def __init__(self, tokenizer: Any, tokenized: TokenizedRef, settings: TrainSettings) -> None:
        self.tokenizer = tokenizer
        self.tokenized = tokenized.model_copy(
            update={"options": {**tokenized.options, "eval_generations": settings.eval_generations}}
        )
        self.batch_size = settings.eval_batch_size

    def measure(self, model: nn.Module) -> dict[str, float]:
        started = time.perf_counter()
        was_training = model.training
        # The eval DataLoader draws its seed from the global RNG: without forking it, evaluating would shift the
        # dropout masks of every later step (a run with evaluations would train differently from one without).
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        try:
            with torch.random.fork_rng(devices=devices):
                metrics = get_objective(self.tokenized.task).metrics(
                    model, self.tokenizer, self.tokenized, self.batch_size, None
                )
        finally:
            model.train(was_training)
        return {**metrics, RUNTIME_KEY: time.perf_counter() - started}


class ResumableEarlyStopping(EarlyStoppingCallback):
    """transformers' EarlyStoppingCallback that survives a resume: it restores its patience counter from the
    checkpoint's trainer state, and saves a checkpoint at the step it stops training (recorded as `stopped_at`)."""

    def __init__(
        self, early_stopping_patience: int = 1, early_stopping_threshold: float | None = 0.0, **_: Any
    ) -> None:
        super().__init__(early_stopping_patience, early_stopping_threshold)
        self.stopped_at: int | None = None

    def on_train_begin(self, args: Any, state: TrainerState, control: Any, **kwargs: Any) -> None:
        # Not the parent's: it warns that the best model is not loaded at the end (train_loaded loads it).
        saved = saved_state(state, type(self).__name__)
        if saved is not None:  # a resumed run: the state its checkpoint holds
            attributes = saved.get("attributes", {})
            self.early_stopping_patience_counter = int(attributes.get("early_stopping_patience_counter", 0))
            self.stopped_at = attributes.get("stopped_at")

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any, **kwargs: Any) -> Any:  # type: ignore[override]  # as the parent
        super().on_evaluate(args, state, control, metrics, **kwargs)
        if control.should_training_stop and self.early_stopping_patience_counter >= self.early_stopping_patience:
            self.stopped_at = state.global_step
            control.should_save = True  # the checkpoint that says training ended here

    def state(self) -> dict[str, Any]:
        saved = super().state()
        saved["attributes"]["stopped_at"] = self.stopped_at
        return saved


def stopped_early(state: TrainerState) -> bool:
    """Whether this checkpoint's training ended early (a resume from it has nothing left to train)."""
    saved = saved_state(state, ResumableEarlyStopping.__name__)
    return saved is not None and saved.get("attributes", {}).get("stopped_at") is not None


def saved_state(state: TrainerState, name: str) -> dict[str, Any] | None:
    """A stateful callback's state as the checkpoint's trainer state holds it (a dict keyed by class name)."""
    saved: Any = state.stateful_callbacks
    found = saved.get(name) if isinstance(saved, dict) else None
    return found if isinstance(found, dict) else None


def training_arguments(settings: TrainSettings) -> dict[str, Any]:
    """The TrainingArguments of evaluation while training ({} when train.eval_steps is unset)."""
    if settings.eval_steps is None:
        return {}
    arguments: dict[str, Any] = {
        "eval_strategy": "steps",
        "eval_steps": settings.eval_steps,
        "per_device_eval_batch_size": settings.eval_batch_size,
    }
    best = settings.best_tracking()
    if best is not None:
        arguments |= {"metric_for_best_model": best.metric, "greater_is_better": best.mode == "max"}
    return arguments


def callbacks(settings: TrainSettings) -> list[Any]:
    """The Trainer callbacks of evaluation while training."""
    if settings.early_stopping is None:
        return []
    stopping = settings.early_stopping
    return [ResumableEarlyStopping(stopping.patience, stopping.min_delta)]


def eval_history(state: TrainerState) -> list[tuple[int, dict[str, float]]]:
    """Every evaluation while training so far, as (step, its metrics), from the trainer state's log history."""
    history = []
    for entry in state.log_history:
        if RUNTIME_KEY in entry:
            metrics = {k: float(v) for k, v in entry.items() if k.startswith("eval_") and isinstance(v, int | float)}
            history.append((int(entry["step"]), metrics))
    return history


def best_checkpoint(state: TrainerState, checkpoints: Path) -> Path | None:
    """The checkpoint of the best evaluation, if best tracking is on and it is on disk."""
    if not state.best_global_step:
        return None
    folder = checkpoints / f"checkpoint-{state.best_global_step}"
    return folder if (folder / "trainer_state.json").is_file() else None


def best_step_of(checkpoints: Path) -> int | None:
    """The best step the newest checkpoint in this folder records (None: none, or no best tracking)."""
    found = sorted(checkpoints.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    for folder in reversed(found):
        try:
            return TrainerState.load_from_json(str(folder / "trainer_state.json")).best_global_step
        except (OSError, ValueError):
            continue
    return None


def summary(state: TrainerState, settings: TrainSettings) -> dict[str, float]:
    """The run metrics of evaluation while training: steps trained, the best step and value, whether training
    stopped early, and the seconds the evaluations took ({} when train.eval_steps is unset)."""
    if settings.eval_steps is None:
        return {}
    history = eval_history(state)
    measured: dict[str, float] = {
        "steps": state.global_step,
        "evaluations": len(history),
        "periodic_eval_seconds": sum(m.get(RUNTIME_KEY, 0.0) for _, m in history),
    }
    best = settings.best_tracking()
    if best is not None and state.best_global_step:
        measured["best_step"] = state.best_global_step
        if state.best_metric is not None and math.isfinite(state.best_metric):
            measured["best_metric"] = float(state.best_metric)
    if settings.early_stopping is not None:
        measured["stopped_early"] = float(stopped_early(state))
    return measured


def plot_run_curves(
    loss_history: list[tuple[int, float]],
    history: list[tuple[int, dict[str, float]]],
    metric: str,
    best_step: int | None,
    title: str,
    path: Path,
) -> None:
    """Training loss and the eval metric against step (the best step marked), as a PNG for the run's reports."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if loss_history:
        steps, losses = zip(*loss_history, strict=True)
        ax.plot(steps, losses, label="train loss", linewidth=1)
    points = [(step, m[metric]) for step, m in history if metric in m]
    if points:
        steps, values = zip(*points, strict=True)
        ax.plot(steps, values, marker="o", markersize=3, label=f"{metric} (held out)")
    if best_step is not None:
        ax.axvline(best_step, color="gray", linestyle="--", linewidth=1, label=f"best step {best_step}")
    ax.set(xlabel="step", ylabel="value", title=title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_trial_curves(curves: dict[str, list[tuple[int, float]]], metric: str, path: Path) -> None:
    """Every grid trial's eval metric against step, overlaid (pruned and early-stopped trials end early)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, points in curves.items():
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, marker="o", markersize=2, linewidth=1, label=label)
    ax.set(xlabel="step", ylabel=metric, title=f"{metric} while training, per trial")
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def logged_metrics(
    history: list[tuple[int, dict[str, float]]], periodic: dict[str, float], steps: int
) -> dict[str, float] | None:
    """The eval metrics of the model a trial delivers, read from its evaluation history instead of evaluated again
    (a grid's rung): the best evaluation's under train.best, else the one at the step training reached; None when
    that step was not evaluated (the steps do not line up)."""
    step = int(periodic.get("best_step", steps))
    found = dict(history).get(step)
    return {k: v for k, v in found.items() if k != RUNTIME_KEY} if found is not None else None


RUNG_PREFIX = "rung_"  # a rung's logged values, apart from the eval history under the metrics' own names
