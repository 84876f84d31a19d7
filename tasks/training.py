"""Train: the HF Trainer on the adapted model, seeded, checkpointed, streaming metrics to MLflow."""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import logging
import math
import os
import resource
import shutil
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from mlflow.entities import Metric
from safetensors import safe_open
from torch import nn
from transformers import PreTrainedModel, Trainer, TrainerCallback, TrainerState, TrainingArguments

from adapters_impl import get_method
from adapters_impl.base import SaveFn
from tasks import periodic_eval
from tasks.adapting import AdaptedRef, load_adapted, remember, take
from tasks.config import TrainSettings
from tasks.distributed import fsdp_arguments, train_distributed
from tasks.errors import RunFailed, disk_error
from tasks.modeling import load_tokenizer, training_dtype
from tasks.objectives import get_objective
from tasks.periodic_eval import PeriodicEval, best_checkpoint, stopped_early
from tasks.tokenization import TokenizedRef, make_collator
from tasks.tracking import RunRef, client_for, log_metrics
from tasks.trained import TrainedRef, TrainingDiverged

log = logging.getLogger("adaptflow")


def checkpoint_problems(folder: Path) -> list[str]:
    """Why the Trainer could not resume from this checkpoint ([] when it can): the weights must open with
    safetensors (a truncated file fails its header or size check), trainer_state.json must parse, and the
    optimizer and scheduler files (torch zip archives; truncation loses their central directory) must be there.
    """
    problems = []
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        problems.append(f"{folder / '*.safetensors'}: no weights file")
    for path in weights:
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except Exception as exc:  # SafetensorError, OSError
            problems.append(f"{path}: {exc}")
    state = folder / "trainer_state.json"
    try:
        json.loads(state.read_text())
    except (OSError, ValueError) as exc:
        problems.append(f"{state}: {exc.__class__.__name__}: {exc}")
    for name in ("optimizer.pt", "scheduler.pt"):
        path = folder / name
        if name == "optimizer.pt" and not path.exists() and (folder / "optimizer.bin").exists():
            path = folder / "optimizer.bin"  # FSDP's consolidated optimizer state
        try:
            zipfile.ZipFile(path).close()
        except (OSError, zipfile.BadZipFile) as exc:
            problems.append(f"{path}: {exc.__class__.__name__}: {exc}")
    return problems


def drop_partial_checkpoints(folder: Path, exc: Exception) -> None:
    """After training failed: remove the checkpoints it left half-written (unusable, and on a full disk they hold
    the space needed to go on).

    Raises:
        OSError: ENOSPC naming the checkpoint, when the disk is full but the writer did not say so (torch.save's
            "unexpected pos").
    """
    partial = [p for p in folder.glob("checkpoint-*") if checkpoint_problems(p)]
    if not partial:
        return
    full = disk_error(exc) is None and shutil.disk_usage(folder).free < 2**20
    for checkpoint in partial:
        log.warning("removing the checkpoint %s, half-written when training failed", checkpoint)
        shutil.rmtree(checkpoint, ignore_errors=True)
    if full:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(partial[0])) from exc


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint in a run's checkpoint folder that can be resumed from.

    Newer ones that cannot (a kill or a full disk while saving) are removed with a warning saying why.

    Raises:
        RunFailed: there are checkpoints, but none can be resumed from (the message names the files).
    """
    found = sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]), reverse=True)
    damaged: list[tuple[Path, list[str]]] = []
    for checkpoint in found:
        problems = checkpoint_problems(checkpoint)
        if not problems:
            for bad, why in damaged:
                log.warning("checkpoint %s is damaged (%s): removed; resuming from %s", bad, "; ".join(why), checkpoint)
                shutil.rmtree(bad, ignore_errors=True)
            return checkpoint
        damaged.append((checkpoint, problems))
    if damaged:
        listing = "\n".join(f"  - {problem}" for _, why in damaged for problem in why)
        raise RunFailed(
            f"cannot resume: no checkpoint in {folder} can be loaded:\n{listing}\n"
            "remove the damaged checkpoint folders to start training again from step 0"
        )
    return None


class MlflowStreamCallback(TrainerCallback):
    """Streams the Trainer's logs (loss, learning rate, grad norm) to the run as they happen.

    Our own callback rather than transformers' MLflowCallback: that one opens its own run from env vars,
    while stages here log to an explicit run id (they may run in other threads or processes).
    A failed log call is kept and retried at the next log instead of stopping training, unless the store's disk
    is full.
    """

    def __init__(self, run: RunRef, prefix: str = "train_") -> None:
        self.run = run
        self.prefix = prefix
        self.pending: list[Metric] = []
        self.failures = 0

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        now = int(time.time() * 1000)
        summary = "train_runtime" in (logs or {})  # the Trainer's end-of-training summary
        for key, value in (logs or {}).items():
            if isinstance(value, int | float) and math.isfinite(float(value)):
                name = key if key.startswith(("train_", "eval_")) else f"{self.prefix}{key}"
                if summary and key == "train_loss":  # the run's mean, not one more point of the step curve
                    name = "train_loss_mean"
                self.pending.append(Metric(name, float(value), now, state.global_step))
        self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        try:
            client_for(self.run).log_batch(self.run.run_id, metrics=self.pending[:1000])
            del self.pending[:1000]
        except Exception as exc:  # tracking hiccups must not kill training
            if disk_error(exc) is not None:  # a full store is no hiccup: nothing of this run could be recorded
                raise
            self.failures += 1
            log.warning("could not log metrics to MLflow (%s); will retry", exc.__class__.__name__)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.flush()


class _StopOnNonFinite(TrainerCallback):
    def __init__(self) -> None:
        self.bad_step: int | None = None

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        values = [(logs or {}).get(key) for key in ("loss", "grad_norm")]
        if any(v is not None and not math.isfinite(float(v)) for v in values):
            self.bad_step = state.global_step
            control.should_training_stop = True


class StopAtStep(TrainerCallback):
    """Ends training at a step count with a checkpoint there, leaving max_steps and so the learning-rate schedule
    as they are: a grid's pruning rung, which the trial may later continue from that checkpoint."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step >= self.step:
            control.should_training_stop = True
            control.should_save = True


class MethodTrainer(Trainer):
    """The HF Trainer, saving checkpoints in the method's own format (adapter weights, not the whole model).

    Also what lets the models that are not `PreTrainedModel`s (our pooled prefix/prompt classifier) checkpoint:
    the Trainer's fallback writes the raw state dict, which refuses the tensors peft shares with the base.
    """

    def __init__(self, *args: Any, save_method: SaveFn, periodic: PeriodicEval | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.save_method = save_method
        self.periodic = periodic  # train.eval_steps: what each evaluation measures
        self.checkpoint_seconds = 0.0  # inside trainer.train(), reported apart from the training throughput
        self.tokens_seen: torch.Tensor | int = 0  # real (non-padding) tokens trained on in this call

    def _track_num_input_tokens(self, inputs: dict[str, Any]) -> None:
        """Count real tokens on the batch's device, read once after training: the Trainer's own count
        (`include_num_input_tokens_seen`) copies it to the host every step, a device sync per step on a GPU."""
        mask = inputs.get("attention_mask")
        self.tokens_seen = self.tokens_seen + (mask.sum() if mask is not None else inputs["input_ids"].numel())

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        started = time.perf_counter()
        super()._save_checkpoint(model, trial)
        self.checkpoint_seconds += time.perf_counter() - started

    # --- evaluation while training (tasks/periodic_eval.py) ---
    def evaluate(self, eval_dataset: Any = None, ignore_keys: Any = None, metric_key_prefix: str = "eval") -> Any:
        """The objective's own eval metrics (the final evaluation's numbers), logged into the history and to the
        callbacks (early stopping, MLflow) as the Trainer's evaluation loop does."""
        if self.periodic is None:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        assert self.model is not None
        metrics = self.periodic.measure(self.model)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics=metrics)
        return metrics

    def _determine_best_metric(self, metrics: dict[str, float], trial: Any) -> bool:
        """Also save a checkpoint at every new best: the best step's weights are what the run registers."""
        new_best = bool(super()._determine_best_metric(metrics, trial))
        if new_best:
            self.control.should_save = True
        return new_best

    # --- end evaluation while training ---

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        """Nothing to do: on resume the model was already built from the checkpoint by the method's own `load`
        (never by applying the method twice); the Trainer restores optimizer, scheduler, RNG and data position."""

    def _save(self, output_dir: str | None = None, state_dict: dict[str, Any] | None = None) -> None:
        if not self.args.should_save:  # rank 0 alone writes (the Trainer's own _save checks this too)
            return
        folder = Path(output_dir or str(self.args.output_dir))
        folder.mkdir(parents=True, exist_ok=True)
        assert self.model is not None
        if self.is_fsdp_enabled and state_dict is not None:
            # Under FSDP the model's own weights are shards: save the full state dict the ranks gathered for
            # rank 0. FSDP trains full and lora only, whose own save is exactly this save_pretrained.
            unwrapped = self.accelerator.unwrap_model(self.model)
            unwrapped.save_pretrained(str(folder), state_dict=state_dict, safe_serialization=True)
            return
        self.save_method(self.model, folder)


def mean_loss(history: list[tuple[int, float]]) -> float:
    """The mean loss per step from logged (step, mean loss since the previous log) pairs: the Trainer's
    `training_loss` of a run whose training already ended."""
    total, previous = 0.0, 0
    for step, loss in history:
        total += loss * (step - previous)
        previous = step
    return total / previous if previous else math.nan


def peak_memory_mb() -> float:
    """Peak accelerator memory on CUDA; else the process's peak resident memory."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def training_arguments(
    settings: TrainSettings, checkpoint_dir: Path, model: nn.Module | None = None
) -> TrainingArguments:
    """TrainingArguments for our settings; fp32 on CPU (see training_dtype). Under torchrun (WORLD_SIZE > 1)
    the Trainer wraps the model in DDP or FSDP (see distributed_arguments)."""
    dtype = training_dtype(settings.precision)
    distributed = distributed_arguments(settings, model) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else {}
    max_steps = settings.max_steps or -1
    warmup = int(settings.warmup_ratio * settings.max_steps) if settings.max_steps else 0
    optional: dict[str, Any] = {"optim": settings.optim} if settings.optim else {}  # unset: HF's default
    return TrainingArguments(
        **optional,
        output_dir=str(checkpoint_dir),
        max_steps=max_steps,
        num_train_epochs=settings.epochs or 1.0,
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        learning_rate=settings.learning_rate,
        weight_decay=settings.weight_decay,
        warmup_steps=warmup,
        seed=settings.seed,
        data_seed=settings.seed,
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=2,
        logging_steps=settings.logging_steps,
        logging_first_step=True,
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        dataloader_num_workers=0,
        include_num_input_tokens_seen="no",  # MethodTrainer counts them without a per-step device sync
        # The filter reads every step's loss on the host (a device sync per step) and hides a NaN behind the
        # average of earlier losses; unfiltered, a NaN reaches the logged loss and _StopOnNonFinite stops the run.
        logging_nan_inf_filter=False,
        disable_tqdm=False,
        **distributed,
        **periodic_eval.training_arguments(settings),
    )


# Config keys of mixture-of-experts models (Mixtral, Qwen-MoE, DeepSeek...): experts the router skips in a step
# get no gradient there.
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


def routes_to_experts(model: nn.Module | None) -> bool:
    config = getattr(model, "config", None)
    return any(getattr(config, key, None) for key in EXPERT_COUNT_KEYS)


def distributed_arguments(settings: TrainSettings, model: nn.Module | None = None) -> dict[str, Any]:
    """The Trainer's DDP / FSDP arguments for `train.distributed`: gloo on CPU, NCCL on GPUs."""
    assert settings.distributed is not None
    arguments: dict[str, Any] = {
        "ddp_backend": "nccl" if torch.cuda.is_available() else "gloo",
        # Every method x task gives every trainable parameter a gradient in every step (checked for all of them
        # on one batch), so DDP need not walk the autograd graph each step looking for parameters without one;
        # a mixture of experts does leave the experts its router skipped without one, so it searches.
        "ddp_find_unused_parameters": routes_to_experts(model),
    }
    if settings.distributed.strategy == "fsdp":
        arguments |= fsdp_arguments(settings.distributed.fsdp)
    return arguments


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute activations in backward, for every method: on the outermost transformer inside the method's
    wrapper (a peft model, our pooled classifier), which the Trainer's own switch cannot reach. Non-reentrant, so a
    frozen embedding needs no input gradients."""
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and module.supports_gradient_checkpointing:
            module.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            return


def train_model(
    adapted: AdaptedRef, tokenized: TokenizedRef, settings: TrainSettings, run: RunRef, stop_at: int | None = None
) -> TrainedRef:
    """Train, save the result to `<run_dir>/adapter`, log loss/lr as they happen; `stop_at` ends training at that
    step (with a checkpoint to continue from) instead of at max_steps.

    With `train.distributed` over more than one process, torchrun's workers train (tasks.distributed) and
    this process waits for rank 0's result.

    Raises:
        TrainingDiverged: the loss became NaN or infinite (the run stops with that message).
        RunFailed: the run has checkpoints but none can be resumed from; a distributed worker failed.
    """
    checkpoints = Path(run.run_dir) / "checkpoints"
    resume_from = latest_checkpoint(checkpoints)
    state = TrainerState.load_from_json(str(resume_from / "trainer_state.json")) if resume_from else None
    done = state is not None and 0 < min(state.max_steps, stop_at or state.max_steps) <= state.global_step
    done = done or (state is not None and stopped_early(state))  # train.early_stopping ended it there
    if world_size(settings) > 1 and not done:
        assert stop_at is None, "the config refuses grid.prune with train.distributed"
        take(adapted.adapter_dir)  # the workers load it from disk; this process holds no model meanwhile
        result = train_distributed(adapted, tokenized, settings, run, resume_from)
        assert result is not None, "nodes other than node 0 train through flows.pipeline.worker_node"
        trained = result
    else:
        if resume_from is not None:  # a resumed run or a retried task: continue, do not start again at step 0
            take(adapted.adapter_dir)
            model = load_adapted(adapted, resume_from, trainable=True)
            log.info("resuming training from %s (step %s)", resume_from, resume_from.name.split("-")[1])
        else:
            model = load_adapted(adapted, adapted.adapter_dir, trainable=True)
        trained = train_loaded(
            model, adapted, tokenized, settings, run, resume_from, state if done else None, stop_at=stop_at
        )
    log_metrics(run, trained.metrics())
    return trained


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Leave the objects that exist before training out of the garbage collector's passes while it trains.

    A pipeline process holds ~700 k long-lived objects (Prefect, MLflow, pydantic, SQLAlchemy; the plain script
    ~170 k): the full collection the Trainer runs as it starts (accelerate's `free_memory`) took
    0.5 s of a 12 s run, and each automatic full collection during training walks them all again. Frozen, they
    are skipped; unfrozen afterwards, any garbage among them is collected as usual.
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def world_size(settings: TrainSettings) -> int:
    """Processes that train together (1: in this process)."""
    return settings.distributed.world_size if settings.distributed else 1


def train_loaded(
    model: nn.Module,
    adapted: AdaptedRef,
    tokenized: TokenizedRef,
    settings: TrainSettings,
    run: RunRef,
    resume_from: Path | None,
    finished: TrainerState | None = None,
    rank: int = 0,
    stop_at: int | None = None,
) -> TrainedRef:
    """Train the loaded model (in this process, or as one rank of a distributed run) and save it from rank 0.

    `finished`: the state of a checkpoint at the last step (killed after training ended, while evaluating, say):
    the Trainer would take one step more, so the model is saved as it is. `stop_at`: see `train_model`.
    """
    checkpoints = Path(run.run_dir) / "checkpoints"
    method = get_method(adapted.method_name)
    if settings.gradient_checkpointing:
        enable_activation_checkpointing(model)
    failures, bad_step, tokens, checkpoint_seconds = 0, None, 0, 0.0
    if finished is not None:
        state = finished
        log.info("checkpoint %s is at the last step: training is done, going on to evaluation", resume_from)
        history = [(int(e["step"]), float(e["loss"])) for e in state.log_history if "loss" in e]
        train_loss = mean_loss(history)
        seconds = float(next((e["train_runtime"] for e in reversed(state.log_history) if "train_runtime" in e), 0.0))
    else:
        tokenizer = load_tokenizer(adapted.source)
        train_split, eval_split = tokenized.splits()
        stream = MlflowStreamCallback(run)
        guard = _StopOnNonFinite()
        # -- an objective with a loss of its own (preference tuning) trains through its Trainer mixin and collator
        trainer_class: Any = MethodTrainer
        collate, own_kwargs = make_collator(tokenizer, tokenized.task, settings.packing), {}
        if (own := get_objective(tokenized.task).training) is not None:
            custom = own(tokenized.options, model, tokenizer, lambda: load_adapted(adapted, adapted.adapter_dir))
            trainer_class = type(f"{custom.mixin.__name__}Trainer", (custom.mixin, MethodTrainer), {})
            collate, own_kwargs = custom.collator, dict(custom.kwargs)
        # -- end of the objective's own loss
        evaluating = settings.eval_steps is not None
        trainer = trainer_class(
            **own_kwargs,
            model=model,
            save_method=method.save,
            periodic=PeriodicEval(tokenizer, tokenized, settings) if evaluating else None,
            args=training_arguments(settings, checkpoints, model),
            train_dataset=train_split,
            eval_dataset=eval_split if evaluating else None,
            data_collator=collate,
            # Rank 0 alone tracks; a grid's rung stops at its step with a checkpoint to continue from.
            callbacks=[
                *([stream] if rank == 0 else []),
                guard,
                *([StopAtStep(stop_at)] if stop_at else []),
                *periodic_eval.callbacks(settings),
            ],
        )
        if not get_objective(tokenized.task).token_loss:
            # The Trainer takes any forward with **kwargs for one that divides by the global batch's label count and
            # multiplies its loss by the world size (and skips dividing by grad_accum): a mean loss would count
            # world size x grad_accum times over.
            trainer.model_accepts_loss_kwargs = False
        started = time.perf_counter()
        try:
            with frozen_heap():
                output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        except Exception as exc:
            if rank == 0:
                drop_partial_checkpoints(checkpoints, exc)
            raise
        seconds = time.perf_counter() - started
        state, failures, bad_step, train_loss = trainer.state, stream.failures, guard.bad_step, output.training_loss
        tokens, checkpoint_seconds = all_ranks_sum(trainer.tokens_seen), trainer.checkpoint_seconds
        history = [(int(e["step"]), float(e["loss"])) for e in state.log_history if "loss" in e]
    if bad_step is None and not all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad):
        bad_step = state.global_step  # diverged between two logging steps
    if bad_step is not None:
        raise TrainingDiverged(
            f"training diverged: the loss became NaN or infinite at step {bad_step} (or before); "
            "lower train.learning_rate or check the data"
        )
    folder = Path(run.run_dir) / "adapter"
    best = best_checkpoint(state, checkpoints) if settings.best_tracking() else None
    if best is not None and state.best_global_step != state.global_step:  # train.best: register the best step's
        log.info("the best evaluation was at step %s: its checkpoint is the trained model", state.best_global_step)
        model = load_adapted(adapted, best)
    if finished is None and trainer.is_fsdp_enabled:
        trainer.save_model(str(folder))  # every rank takes part in gathering the shards; rank 0 writes
    elif rank == 0:
        method.save(model, folder)
        remember(folder, model)
    periodic = periodic_eval.summary(state, settings)
    since = int(resume_from.name.split("-")[1]) if resume_from else 0
    in_this_call = sum(
        m.get(periodic_eval.RUNTIME_KEY, 0.0) for step, m in periodic_eval.eval_history(state) if step > since
    )
    seconds = max(seconds - in_this_call, 0.0)  # evaluating is reported as eval_seconds, not as training
    training_only = seconds - checkpoint_seconds
    return TrainedRef(
        adapted=adapted,
        adapter_dir=str(folder),
        steps=state.global_step,
        train_loss=float(train_loss),
        train_seconds=seconds,
        train_tokens_per_second=tokens / training_only if training_only > 0 else 0.0,
        checkpoint_seconds=checkpoint_seconds,
        peak_memory_mb=peak_memory_mb(),
        loss_history=history,
        resumed_from_step=int(resume_from.name.split("-")[1]) if resume_from else None,
        tracking_failures=failures,
        world_size=world_size(settings),
        global_batch_size=settings.batch_size * settings.grad_accum * world_size(settings),
        periodic=periodic,
        eval_history=periodic_eval.eval_history(state),
    )


def all_ranks_sum(count: torch.Tensor | int) -> int:
    """A count summed over the ranks of a distributed run (this rank's alone in one process)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return int(count)
    device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
    total = torch.as_tensor(count, dtype=torch.int64, device=device).clone()
    torch.distributed.all_reduce(total)
    return int(total.item())
