"""The fine-tuning pipeline every method flow runs: the sequence (tasks/sequence.py: load -> tokenize -> apply ->
train -> evaluate) then report -> probe -> merge -> register -> promote (`register_and_promote`, shared with the
grid's best trial)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlflow.entities.model_registry import ModelVersion
from pydantic import BaseModel

from flows import stages
from flows.promote import promote_pending
from tasks import process_cache, sequence
from tasks.config import RunConfig
from tasks.errors import RunFailed, UserInputError, disk_error, disk_failure
from tasks.identity import run_identity
from tasks.load import DataRef
from tasks.modeling import ModelSource
from tasks.parents import pin, unpin
from tasks.probe.report import ProbeReport
from tasks.promotion import Decision, gate_tags, recorded_gate
from tasks.registry import RegisteredRef
from tasks.tokenization import TokenizedRef
from tasks.tracking import ResumeChanged, RunRef, restore_status, resumed_parent_version, run_title
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
    # The `export:` section's verdict and artifacts (None: no export configured).
    export: dict[str, Any] | None = None


# The result of the pipeline this process completed last, a process cache reset by each `finetune` call: the
# outcome of the run even when the orchestrator (Prefect) was lost on the way and its flow call raises afterwards.
last_result: list[RunResult] = []


@contextmanager
def tracked_run(config: RunConfig, run_name: str | None = None, resume: bool = False) -> Iterator[RunRef]:
    """One MLflow run around the pipeline, marked FAILED if any stage raises (KILLED on Ctrl-C or SIGTERM).
    The process's caches (the live model its stages handed on among them) are dropped at the end, however it ends.
    A full disk is named by its path (`named_disk_errors`), also when it stops the store from marking the run (the
    next run's start marks it)."""
    with named_disk_errors(config):
        run = stages.start_run(config, run_name, None, resume)
    try:
        yield run
    except ResumeChanged:
        process_cache.drop_all()
        restore_status(run)  # a refused resume changes nothing: the run stays as it was found
        raise
    except BaseException as exc:
        process_cache.drop_all()
        # Not an Exception: KeyboardInterrupt, or Prefect's TerminationSignal for a SIGTERM inside a flow.
        stopped = not isinstance(exc, Exception)
        try:
            stages.end_run(run, "KILLED" if stopped else "FAILED", repr(exc)[:5000])
        except Exception as unmarked:
            if disk_error(unmarked) is None:
                raise
            raise full_disk(config, exc if disk_error(exc) else unmarked, unmarked=True) from None
        with named_disk_errors(config):
            raise
    process_cache.drop_all()
    with named_disk_errors(config):
        stages.end_run(run, "FINISHED")


def full_disk(config: RunConfig, exc: BaseException, unmarked: bool = False) -> RunFailed:
    """The message naming the full place of a disk error (`disk_failure`): the output folder or the MLflow store."""
    from tasks.tracking import sqlite_store, tracking_uri

    reason = disk_error(exc) or str(exc)
    return disk_failure(exc, config.train.output_dir, reason, sqlite_store(tracking_uri(config.tracking)), unmarked)


@contextmanager
def named_disk_errors(config: RunConfig) -> Iterator[None]:
    """A full or read-only disk is named by its path (train.output_dir, the MLflow store or its artifacts) and
    free space, not a bare errno or SQLite's "database or disk is full"."""
    try:
        yield
    except Exception as exc:
        if disk_error(exc) is not None:
            raise full_disk(config, exc) from None
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
    from tasks.load import check_source
    from tasks.memory import check_fits
    from tasks.modeling import check_context, resolve_model
    from tasks.objectives import get_objective
    from tasks.parents import check_parent, parent_of
    from tasks.tracking import use_tracking
    from tasks.trials import check_grid_fits

    check_writable(Path(config.train.output_dir), "train.output_dir")
    objective = get_objective(config.task)
    problems = objective.check(config)
    if problems:
        raise UserInputError.many("invalid configuration:", problems)
    check_source(config.data.train, "data.train")
    if config.data.eval:
        check_source(config.data.eval, "data.eval")
    if config.model.registered:  # the base is a registered version: read from the registry before any run opens
        use_tracking(config.tracking)
    source = resolve_model(config.model)
    parent = parent_of(source)
    if parent is not None:
        section = getattr(config, objective.section, None) if objective.section else None
        if section is None and objective.settings is not None:  # the section left out: its defaults
            section = objective.settings()
        problems = check_parent(parent, config.task, getattr(section, "template", None), objective.section)
        if problems:
            raise UserInputError.many("invalid configuration:", problems)
    check_context(source, config.data.max_length)
    check_device(config.train)
    if config.grid is None:
        check_fits(config)
    else:
        check_grid_fits(config)


def pin_parent(config: RunConfig, resume: bool) -> None:
    """A base given as a registry alias is read once per run, here: anew for a new run (a served deployment runs
    many in one process), as the run found it when it started for a resumed one (tasks/parents.py)."""
    if not config.model.registered:
        return
    unpin(config.model.name_or_path)
    if resume and (version := resumed_parent_version(config)) is not None:
        pin(config.model.name_or_path, version)


class Outcome(BaseModel):
    """A trained model taken through the stages after training: its metrics, probe, version and promotion."""

    metrics: dict[str, float | int]
    probe_report: ProbeReport
    registered: RegisteredRef
    decision: Decision
    export: dict[str, Any] | None = None


def register_and_promote(
    config: RunConfig,
    source: ModelSource,
    data: DataRef,
    tokenized: TokenizedRef,
    run: RunRef,
    trained: TrainedRef,
    metrics: dict[str, float],
    lineage: dict[str, str] | None = None,
    force: bool = False,
) -> Outcome:
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
    from tasks.export.pipeline import ExportVerdict

    export = exported.public() if isinstance(exported, ExportVerdict) else None
    return Outcome(metrics=metrics, probe_report=probe_report, registered=registered, decision=decision,
                   export=export)  # fmt: skip


def finetune(config: RunConfig, resume: bool = False, allow_changed: bool = False, force: bool = False) -> RunResult:
    """Run the pipeline for one configured method; the method flows are thin, typed entries into this.

    With `resume`, the newest unfinished run of this config continues from its last checkpoint, provided its data,
    base and objective files are the ones it started on (or `allow_changed`). A config already trained on the same
    content reports that version without training, unless `force`: then it trains and registers a new version.
    """
    last_result.clear()
    distributed = config.train.distributed
    if distributed is not None and distributed.node_rank > 0:
        return _remember(worker_node(config, resume))
    if resume and (pending := promote_pending(config)):  # killed between registration and promotion
        return _remember(_pending_result(config, *pending[-1]))
    cache_dir = Path(config.train.output_dir).resolve() / ".cache"
    pin_parent(config, resume)
    source = stages.resolve_model(config.model)
    with named_disk_errors(config):  # read before any run opens: bad data is named with nothing left behind
        data = sequence.load_data(config, cache_dir, stages.CALLS)
    identity = run_identity(config, data, source)
    if not resume and not force and (same := stages.identical_version(config, identity)) is not None:
        return _remember(_identical_result(config, same))
    with tracked_run(config, resume=resume) as run:
        lineage = stages.record_identity(run, identity, allow_changed)
        lineage |= stages.record_parent(run, source)
        stages.log_datasets(run, data)
        tokenized = sequence.tokenize(config, data, source, cache_dir, stages.CALLS)
        base_metrics = stages.evaluate_base(source, tokenized, config.train.eval_batch_size)
        done = sequence.train_and_evaluate(config, source, tokenized, run, stages.CALLS)
        assert done.trained is not None  # node 0 holds the trained model
        metrics = {**done.metrics, **base_metrics}
        outcome = register_and_promote(config, source, data, tokenized, run, done.trained, metrics, lineage, force)
        stages.publish_summary(run, run_title(config), outcome.registered, outcome.decision, outcome.metrics)
    warnings = []
    if outcome.registered.existing:
        warnings.append(
            f"version {outcome.registered.version} (run {outcome.registered.run_id}) was trained from the same "
            "config on the same data: reported instead of registering an identical version"
        )
    return _remember(
        run_result(
            config,
            run.run_id,
            run.run_dir,
            outcome.metrics,
            outcome.decision.reason,
            version=(outcome.registered.name, outcome.registered.version),
            aliases=[outcome.decision.alias] if outcome.decision.alias else [],
            bias_probe=outcome.probe_report.public(),
            resumed_from_step=done.trained.resumed_from_step,
            warnings=warnings,
            export=outcome.export,
        )
    )


def worker_node(config: RunConfig, resume: bool) -> RunResult:
    """A node other than node 0 of a multi-node run: the same sequence as node 0 (the same data, tokens and adapted
    model), its train stage running this node's share of the workers and no evaluation; tracking, evaluation and
    registration are node 0's (global rank 0 lives there).

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

    def train_share(adapted: Any, tokenized: Any, settings: Any, run: RunRef, stop_at: int | None) -> None:
        train_distributed(adapted, tokenized, settings, run, None)

    calls = stages.CALLS.but(train_model=train_share, evaluate_model=None)
    source = stages.resolve_model(config.model)
    data = sequence.load_data(config, output / ".cache", calls)
    tokenized = sequence.tokenize(config, data, source, output / ".cache", calls)
    run = RunRef(run_id="", experiment_id="", tracking_uri=tracking_uri(config.tracking), run_dir=str(folder))
    # Seeded like node 0's; DDP and FSDP (sync_module_states) also start every rank from rank 0's weights.
    done = sequence.train_and_evaluate(config, source, tokenized, run, calls)
    promotion = (
        f"node {distributed.node_rank} of {distributed.nnodes} trained its share; node 0 evaluates, registers "
        "and promotes"
    )
    return run_result(
        config, "", str(folder), {"world_size": distributed.world_size}, promotion, mergeable=done.adapted.mergeable
    )


def run_result(
    config: RunConfig,
    run_id: str,
    run_dir: str,
    metrics: dict[str, float | int],
    promotion: str,
    version: tuple[str, str] | None = None,
    aliases: list[str] | None = None,
    bias_probe: dict[str, Any] | None = None,
    mergeable: bool | None = None,
    resumed_from_step: int | None = None,
    warnings: list[str] | None = None,
    export: dict[str, Any] | None = None,
) -> RunResult:
    """The one place a run's result is assembled: a run that trained, a worker node, or a version reported
    without training (`version`: its registered name and number)."""
    from adapters_impl import METHODS

    name, number = version or ("", "")
    return RunResult(
        run_id=run_id,
        method=config.method.name,
        task=config.task,
        metrics=metrics,
        bias_probe=bias_probe or {},
        model_name=name,
        model_version=number,
        model_uri=f"models:/{name}/{number}" if version else "",
        aliases=aliases or [],
        mergeable=METHODS[config.method.name].mergeable if mergeable is None else mergeable,
        promotion=promotion,
        run_dir=run_dir,
        resumed_from_step=resumed_from_step,
        warnings=warnings or [],
        export=export,
    )


def _remember(result: RunResult) -> RunResult:
    last_result.append(result)
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
    from tasks.tracking import use_tracking

    run = use_tracking(config.tracking).get_run(str(version.run_id))
    gate = recorded_gate(version)
    return run_result(
        config,
        run.info.run_id,
        str(Path(config.train.output_dir).resolve() / run.info.run_id),
        dict(run.data.metrics),
        promotion,
        version=(version.name, str(version.version)),
        aliases=aliases,
        bias_probe={"gate": gate} if gate else {},
        warnings=[warning],
    )
