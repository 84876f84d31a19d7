"""The fine-tuning pipeline every method flow runs: load -> tokenize -> apply -> train -> evaluate -> merge -> register."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlflow.entities.model_registry import ModelVersion
from pydantic import BaseModel

from flows import stages
from flows.promote import finish_pending
from tasks.config import RunConfig
from tasks.promotion import Decision, gate_tags, recorded_gate
from tasks.tracking import RunRef


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
    """One MLflow run around the pipeline, marked FAILED if any stage raises (KILLED on Ctrl-C or SIGTERM)."""
    run = stages.start_run(config, run_name, None, resume)
    try:
        yield run
    except BaseException as exc:
        # Not an Exception: KeyboardInterrupt, or Prefect's TerminationSignal for a SIGTERM inside a flow.
        stopped = not isinstance(exc, Exception)
        stages.end_run(run, "KILLED" if stopped else "FAILED", repr(exc)[:5000])
        raise
    stages.end_run(run, "FINISHED")


def preflight(config: RunConfig) -> None:
    """Cheap checks before any service starts: the data files and the model folder exist.

    Raises:
        UserInputError: naming the key and the missing file.
    """
    from tasks.load import check_source
    from tasks.modeling import resolve_model

    check_source(config.data.train, "data.train")
    if config.data.eval:
        check_source(config.data.eval, "data.eval")
    resolve_model(config.model)


def finetune(config: RunConfig, resume: bool = False) -> RunResult:
    """Run the pipeline for one configured method; the method flows are thin, typed entries into this.

    With `resume`, the newest unfinished run of this config continues from its last checkpoint.
    """
    finished.clear()
    if resume and (pending := finish_pending(config)):  # killed between registration and promotion
        return _finish(_pending_result(config, *pending[-1]))
    cache_dir = Path(config.train.output_dir).resolve() / ".cache"
    source = stages.resolve_model(config.model)
    with tracked_run(config, resume=resume) as run:
        data = stages.load_data(config.data, config.task, cache_dir / "data")
        tokenized = stages.tokenize_dataset(data, source, config.task, config.data.max_length, cache_dir / "tokenized")
        base_metrics = stages.evaluate_base(source, tokenized, batch_size=config.train.eval_batch_size or 16)
        adapted = stages.apply_method(source, config.method, config.task, tokenized, run.run_dir, config.train.seed)
        trained = stages.train_model(adapted, tokenized, config.train, run)
        tuned_metrics = stages.evaluate_model(trained, tokenized, run)
        base_texts = stages.base_generations(source, data, config.task)
        tuned_metrics |= stages.report_evaluation(
            trained, data, tokenized, {**tuned_metrics, **base_metrics}, base_texts, run
        )
        base_probe = stages.probe_base(source, config.task, config.bias_probe)
        probe_report = stages.bias_probe(trained, data, tokenized, config.bias_probe, base_probe, run)
        merged = stages.merge_model(trained, tokenized, run)
        metrics = {**tuned_metrics, **base_metrics, **trained.metrics()}
        if merged.merge_max_abs_diff is not None:
            metrics["merge_max_abs_diff"] = merged.merge_max_abs_diff
        if merged.merged_eval_loss is not None:
            metrics["merged_eval_loss"] = merged.merged_eval_loss
            metrics["merge_eval_loss_gap"] = merged.merged_eval_loss - tuned_metrics["eval_loss"]
        gate = gate_tags(probe_report.gate)
        registered = stages.register_model(config, data, run, trained, merged, metrics, gate)
        decision = stages.promote(registered, run, config, data, probe_report)
    warnings = []
    if registered.existing:
        warnings.append(
            f"version {registered.version} (run {registered.run_id}) was trained from the same config on the same "
            "data: reported instead of registering an identical version"
        )
    return _finish(
        RunResult(
            warnings=warnings,
            run_id=run.run_id,
            method=config.method.name,
            task=config.task,
            metrics=metrics,
            model_name=registered.name,
            model_version=registered.version,
            model_uri=registered.model_uri,
            aliases=[decision.alias] if decision.alias else [],
            bias_probe=probe_report.public(),
            mergeable=adapted.mergeable,
            promotion=decision.reason,
            run_dir=run.run_dir,
            resumed_from_step=trained.resumed_from_step,
        )
    )


def _finish(result: RunResult) -> RunResult:
    finished.append(result)
    return result


def _pending_result(config: RunConfig, version: ModelVersion, decision: Decision) -> RunResult:
    """What the killed run would have reported, from its registered version and its MLflow run."""
    from adapters_impl import METHODS
    from tasks.tracking import use_tracking

    run = use_tracking(config.tracking).get_run(str(version.run_id))
    return RunResult(
        run_id=run.info.run_id,
        method=config.method.name,
        task=config.task,
        metrics=dict(run.data.metrics),
        bias_probe={"gate": recorded_gate(version)} if recorded_gate(version) else {},
        model_name=decision.name,
        model_version=decision.version,
        model_uri=f"models:/{decision.name}/{decision.version}",
        aliases=[decision.alias] if decision.alias else [],
        mergeable=METHODS[config.method.name].mergeable,
        promotion=decision.reason,
        run_dir=str(Path(config.train.output_dir).resolve() / run.info.run_id),
        warnings=[f"finished the promotion decision of version {decision.version}, left pending by a killed run"],
    )
