"""The fine-tuning pipeline every method flow runs: load -> tokenize -> apply -> train -> evaluate -> report -> probe
-> merge -> register -> promote. `finish` is the part after training, shared with the grid's best trial."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlflow.entities.model_registry import ModelVersion
from pydantic import BaseModel

from flows import stages
from flows.promote import finish_pending
from tasks.adapting import forget as forget_live_model
from tasks.config import RunConfig
from tasks.errors import UserInputError, disk_error, disk_failure
from tasks.identity import run_identity
from tasks.load import DataRef
from tasks.modeling import ModelSource
from tasks.probe import ProbeReport
from tasks.promotion import Decision, gate_tags, recorded_gate
from tasks.registry import RegisteredRef
from tasks.tokenization import TokenizedRef
from tasks.tracking import ResumeChanged, RunRef, restore_status, run_title
from tasks.training import TrainedRef


class RunResult(BaseModel):
    """What `adaptflow run --json` prints (the contract's `run` object)."""

    command: str = "run"
    status: str = "ok"
    run_id: str
    method: str
    task: str
    metrics: dict[str, float | int]
    bias_probe: dict[str, Any] = {}
    model_name: str
    model_version: str
    model_uri: str
    aliases: list[str]
    mergeable: bool
    promotion: str
    run_dir: str
    resumed_from_step: int | None = None
    warnings: list[str] = []


# The result of the pipeline this process finished last: the outcome of the run even when the orchestrator
# (Prefect) was lost on the way and its flow call raises afterwards.
finished: list[RunResult] = []


@contextmanager
def tracked_run(config: RunConfig, run_name: str | None = None, resume: bool = False) -> Iterator[RunRef]:
    """One MLflow run around the pipeline, marked FAILED if any stage raises (KILLED on Ctrl-C or SIGTERM).
    The live model its stages handed on is dropped at the end, however it ends."""
    run = stages.start_run(config, run_name, None, resume)
    try:
        yield run
    except ResumeChanged:
        forget_live_model()
        restore_status(run)  # a refused resume changes nothing: the run stays as it was found
        raise
    except BaseException as exc:
        forget_live_model()
        # Not an Exception: KeyboardInterrupt, or Prefect's TerminationSignal for a SIGTERM inside a flow.
        stopped = not isinstance(exc, Exception)
        stages.end_run(run, "KILLED" if stopped else "FAILED", repr(exc)[:5000])
        with named_disk_errors(config):
            raise
    forget_live_model()
    stages.end_run(run, "FINISHED")


@contextmanager
def named_disk_errors(config: RunConfig) -> Iterator[None]:
    """A full or read-only disk is named by its path and train.output_dir's free space, not a bare errno."""
    try:
        yield
    except Exception as exc:
        reason = disk_error(exc)
        if reason is not None:
            raise disk_failure(exc, config.train.output_dir, reason) from None
        raise


def check_writable(folder: Path, key: str) -> None:
    """Create the folder and write and remove a probe file in it: a read-only or full disk is named at once,
    before any run is opened (it would otherwise fail mid-run, after MLflow runs were created).

    Raises:
        UserInputError: naming the key, the folder and the reason.
    """
    probe = folder / f".adaptflow-write-check-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"adaptflow")
        probe.unlink()
    except OSError as exc:
        raise UserInputError(
            f"{key}: cannot write to {folder.resolve()}: {exc.strerror or exc}; "
            f"choose a writable folder with free space (--set {key}=PATH)"
        ) from None


def preflight(config: RunConfig) -> None:
    """Cheap checks before any service starts: the output folder is writable, the data files and the model
    folder exist, the devices fit `train.distributed`, the run fits in memory (a grid: at least one trial does).

    Raises:
        UserInputError: naming the key and the missing file or unwritable folder.
    """
    from tasks.distributed import check_device
    from tasks.grid import check_grid_fits
    from tasks.load import check_source
    from tasks.memory import check_fits
    from tasks.modeling import check_context, resolve_model
    from tasks.objectives import get_objective

    check_writable(Path(config.train.output_dir), "train.output_dir")
    problems = get_objective(config.task).check(config)
    if problems:
        raise UserInputError.many("invalid configuration:", problems)
    check_source(config.data.train, "data.train")
    if config.data.eval:
        check_source(config.data.eval, "data.eval")
    check_context(resolve_model(config.model), config.data.max_length)
    check_device(config.train)
    if config.grid is None:
        check_fits(config)
    else:
        check_grid_fits(config)


class Finished(BaseModel):
    """A trained model taken through the stages after training: its metrics, probe, version and promotion."""

    metrics: dict[str, float | int]
    probe_report: ProbeReport
    registered: RegisteredRef
    decision: Decision


def finish(
    config: RunConfig,
    source: ModelSource,
    data: DataRef,
    tokenized: TokenizedRef,
    run: RunRef,
    trained: TrainedRef,
    metrics: dict[str, float],
    lineage: dict[str, str] | None = None,
    force: bool = False,
) -> Finished:
    """report -> probe -> merge -> register -> promote a trained and evaluated model: the one order for runs and
    for a grid's best trial. `metrics` holds the tuned and base evaluations; this adds the report's, the merge's
    and training's own."""
    metrics = {**metrics, **trained.metrics(), **tokenized.metrics()}
    # The base's numbers beside the tuned ones in the run (they were only in the version's tags and the report).
    stages.log_metrics(run, {**tokenized.metrics(), **{k: v for k, v in metrics.items() if k.startswith("base_")}})
    stages.log_params(run, tokenized.params())
    base_texts = stages.base_generations(source, data, tokenized)
    metrics |= stages.report_evaluation(
        trained, data, tokenized, metrics, base_texts, run, config.train.eval_batch_size
    )
    base_probe = stages.probe_base(source, config.task, config.bias_probe, tokenized.options)
    probe_report = stages.bias_probe(trained, data, tokenized, config.bias_probe, base_probe, run)
    merged = stages.merge_model(trained, tokenized, run, config.train.eval_batch_size, config.registry.merged)
    if merged.merge_max_abs_diff is not None:
        metrics["merge_max_abs_diff"] = merged.merge_max_abs_diff
    if merged.merge_tolerance is not None:
        metrics["merge_tolerance"] = merged.merge_tolerance
    if merged.merged_eval_loss is not None:  # a lossy merge: what serving the merged model costs
        metrics["merged_eval_loss"] = merged.merged_eval_loss
        metrics["merge_eval_loss_gap"] = merged.merged_eval_loss - metrics["eval_loss"]
    tags = {**(lineage or {}), **gate_tags(probe_report.gate)}  # the gate's verdict is on the version from the start
    registered = stages.register_model(config, data, run, trained, merged, metrics, tags, tokenized.package(), force)
    exported = stages.export_version(config, registered, run)
    decision = stages.promote(registered, run, config, data, probe_report, exported)
    return Finished(metrics=metrics, probe_report=probe_report, registered=registered, decision=decision)


def finetune(config: RunConfig, resume: bool = False, allow_changed: bool = False, force: bool = False) -> RunResult:
    """Run the pipeline for one configured method; the method flows are thin, typed entries into this.

    With `resume`, the newest unfinished run of this config continues from its last checkpoint, provided its data,
    base and objective files are the ones it started on (or `allow_changed`). A config already trained on the same
    content reports that version without training, unless `force`: then it trains and registers a new version.
    """
    finished.clear()
    distributed = config.train.distributed
    if distributed is not None and distributed.node_rank > 0:
        return _finish(worker_node(config, resume))
    if resume and (pending := finish_pending(config)):  # killed between registration and promotion
        return _finish(_pending_result(config, *pending[-1]))
    cache_dir = Path(config.train.output_dir).resolve() / ".cache"
    eval_batch = config.train.eval_batch_size
    source = stages.resolve_model(config.model)
    with named_disk_errors(config):  # read before any run opens: bad data is named with nothing left behind
        data = stages.load_data(config.data, config.task, cache_dir / "data")
    identity = run_identity(config, data, source)
    if not resume and not force and (same := stages.identical_version(config, identity)) is not None:
        return _finish(_identical_result(config, same))
    with tracked_run(config, resume=resume) as run:
        lineage = stages.record_identity(run, identity, allow_changed)
        stages.log_datasets(run, data)
        tokenized = stages.tokenize_dataset(
            data, source, config.task, config.data.max_length, cache_dir / "tokenized", config.task_options()
        )
        base_metrics = stages.evaluate_base(source, tokenized, eval_batch)
        adapted = stages.apply_method(
            source, config.method, config.task, tokenized, run.run_dir, config.train.seed, config.train.precision
        )
        trained = stages.train_model(adapted, tokenized, config.train, run)
        tuned_metrics = stages.evaluate_model(trained, tokenized, run, eval_batch)
        metrics = {**tuned_metrics, **base_metrics}
        done = finish(config, source, data, tokenized, run, trained, metrics, lineage, force)
        stages.publish_summary(run, run_title(config), done.registered, done.decision, done.metrics)
    warnings = []
    if done.registered.existing:
        warnings.append(
            f"version {done.registered.version} (run {done.registered.run_id}) was trained from the same config on "
            "the same data: reported instead of registering an identical version"
        )
    return _finish(
        RunResult(
            warnings=warnings,
            run_id=run.run_id,
            method=config.method.name,
            task=config.task,
            metrics=done.metrics,
            model_name=done.registered.name,
            model_version=done.registered.version,
            model_uri=done.registered.model_uri,
            aliases=[done.decision.alias] if done.decision.alias else [],
            bias_probe=done.probe_report.public(),
            mergeable=adapted.mergeable,
            promotion=done.decision.reason,
            run_dir=run.run_dir,
            resumed_from_step=trained.resumed_from_step,
        )
    )


def worker_node(config: RunConfig, resume: bool) -> RunResult:
    """A node other than node 0 of a multi-node run: it prepares the same adapted model and data, runs its share
    of the workers, and leaves tracking, evaluation and registration to node 0 (global rank 0 lives there).

    Raises:
        UserInputError: --resume (the checkpoints are node 0's).
    """
    from tasks.distributed import train_distributed
    from tasks.tracking import config_hash, tracking_uri

    distributed = config.train.distributed
    assert distributed is not None
    if resume:
        raise UserInputError(
            "--resume: a multi-node run resumes from node 0's checkpoints; restart every node without --resume "
            f"(train.distributed.node_rank is {distributed.node_rank})"
        )
    output = Path(config.train.output_dir).resolve()
    folder = output / f"node{distributed.node_rank}-{config_hash(config)}"
    source = stages.resolve_model(config.model)
    data = stages.load_data(config.data, config.task, output / ".cache" / "data")
    tokenized = stages.tokenize_dataset(  # as node 0 tokenizes: the objective's options too (instruction: ...)
        data, source, config.task, config.data.max_length, output / ".cache" / "tokenized", config.task_options()
    )
    # Seeded like node 0's; DDP and FSDP (sync_module_states) also start every rank from rank 0's weights.
    adapted = stages.apply_method(
        source, config.method, config.task, tokenized, str(folder), config.train.seed, config.train.precision
    )
    run = RunRef(run_id="", experiment_id="", tracking_uri=tracking_uri(config.tracking), run_dir=str(folder))
    train_distributed(adapted, tokenized, config.train, run, None)
    return RunResult(
        run_id="",
        method=config.method.name,
        task=config.task,
        metrics={"world_size": distributed.world_size},
        model_name="",
        model_version="",
        model_uri="",
        aliases=[],
        mergeable=adapted.mergeable,
        promotion=f"node {distributed.node_rank} of {distributed.nnodes} trained its share; node 0 evaluates, "
        "registers and promotes",
        run_dir=str(folder),
    )


def _finish(result: RunResult) -> RunResult:
    finished.append(result)
    return result


def _pending_result(config: RunConfig, version: ModelVersion, decision: Decision) -> RunResult:
    """What the killed run would have reported, from its registered version and its MLflow run."""
    warning = f"finished the promotion decision of version {decision.version}, left pending by a killed run"
    aliases = [decision.alias] if decision.alias else []
    return _version_result(config, version, aliases, decision.reason, warning)


def _identical_result(config: RunConfig, version: ModelVersion) -> RunResult:
    """A config already trained on the same content: that version, as its run reported it; nothing trained."""
    warning = (
        f"version {version.version} (run {version.run_id}) was trained from this config on the same data, base "
        "and files: reported without training (--force trains and registers anew)"
    )
    return _version_result(config, version, list(version.aliases), version.tags.get("promotion", ""), warning)


def _version_result(
    config: RunConfig, version: ModelVersion, aliases: list[str], promotion: str, warning: str
) -> RunResult:
    from adapters_impl import METHODS
    from tasks.tracking import use_tracking

    run = use_tracking(config.tracking).get_run(str(version.run_id))
    return RunResult(
        run_id=run.info.run_id,
        method=config.method.name,
        task=config.task,
        metrics=dict(run.data.metrics),
        bias_probe={"gate": recorded_gate(version)} if recorded_gate(version) else {},
        model_name=version.name,
        model_version=str(version.version),
        model_uri=f"models:/{version.name}/{version.version}",
        aliases=aliases,
        mergeable=METHODS[config.method.name].mergeable,
        promotion=promotion,
        run_dir=str(Path(config.train.output_dir).resolve() / run.info.run_id),
        warnings=[warning],
    )
