"""The @task layer over tasks/: names, retries for transient failures, caching of deterministic stages."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from mlflow.entities.model_registry import ModelVersion
from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.context import TaskRunContext
from prefect.states import State

from tasks import (
    adapting,
    evaluation,
    generation,
    grid_report,
    load,
    merging,
    modeling,
    registry,
    reports,
    tokenization,
    tracking,
    training,
    trials,
)
from tasks.config import RunConfig
from tasks.errors import UserInputError, disk_error
from tasks.probe import report as probe
from tasks.promotion import Decision, champion_reevaluator, promote_version
from tasks.sequence import StageCalls


def is_transient(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Retry I/O and connection failures only; never a config error, a NaN loss, out-of-memory or a full disk."""
    try:
        state.result()
    except (UserInputError, training.TrainingDiverged, MemoryError):
        return False
    except Exception as exc:
        if disk_error(exc) is not None:  # a full or read-only disk: retrying cannot help
            return False
        if isinstance(exc, OSError):  # ConnectionError and TimeoutError included
            return True
        return "ConnectionError" in type(exc).__name__ or "Timeout" in type(exc).__name__
    return False


def _model_fingerprint(source: modeling.ModelSource) -> str:
    folder = Path(source.name_or_path)
    parts = [source.name_or_path, str(source.revision)]
    if folder.is_dir():
        parts += [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sorted(folder.iterdir())]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


# The shape of the cached TokenizedRef: a result stored by a version with other fields is never read back.
_TOKENIZED_SHAPE = hashlib.sha256(
    json.dumps(tokenization.TokenizedRef.model_json_schema(), sort_keys=True).encode()
).hexdigest()[:8]


def _tokenized_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """Tokenization is keyed on data fingerprint + tokenizer files + settings, and the result's shape."""
    key = tokenization.tokenize_key(
        parameters["data"], parameters["source"], parameters["task"], parameters["max_length"], parameters["options"]
    )
    return f"tokenize-{_TOKENIZED_SHAPE}-{key}"


def _base_eval_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    tokenized: tokenization.TokenizedRef = parameters["tokenized"]
    # With the objective's settings: a grid trial's own loss settings (grid.beta) change the base's loss.
    options = hashlib.sha256(json.dumps(tokenized.options, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return (
        f"base-eval-{tokenized.train_dir}-{_model_fingerprint(parameters['source'])}-{parameters['batch_size']}"
        f"-{options}"
    )


resolve_model = task(name="resolve-model", cache_policy=NO_CACHE)(modeling.resolve_model)
start_run = task(
    name="start-run", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=3, retry_condition_fn=is_transient
)(tracking.start_run)
load_data = task(name="load", cache_policy=NO_CACHE)(load.load_data)
_tokenize = task(name="tokenize", cache_key_fn=_tokenized_key, persist_result=True, result_serializer="json")(
    tokenization.tokenize_dataset
)


def tokenize_dataset(
    data: load.DataRef,
    source: modeling.ModelSource,
    task: str,
    max_length: int,
    cache_dir: Path,
    options: dict[str, Any] | None = None,
) -> tokenization.TokenizedRef:
    """Cached tokenization; recomputed (cache refreshed) only if its output folder was deleted."""
    folder = cache_dir / tokenization.tokenize_key(data, source, task, max_length, options)
    return _tokenize.with_options(refresh_cache=not folder.exists())(
        data, source, task, max_length, cache_dir, options or {}
    )


evaluate_base = task(name="evaluate-base", cache_key_fn=_base_eval_key, persist_result=True, result_serializer="json")(
    evaluation.evaluate_base
)


def _base_probe_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    settings = parameters["settings"]
    suite = Path(str(settings.suite))
    stamp = f"{suite.stat().st_mtime_ns}" if suite.exists() else str(settings.suite)
    # v3: the objective's options (an instruction run's template) shape the prompts
    options = json.dumps(parameters.get("options") or {}, sort_keys=True, default=str)
    text = f"v3|{_model_fingerprint(parameters['source'])}|{parameters['task']}|{settings.model_dump_json()}|{stamp}"
    text += f"|{options}"
    return "base-probe-" + hashlib.sha256(text.encode()).hexdigest()[:20]


# The base model's probe is deterministic and the same for every run on this model: cached.
probe_base = task(name="bias-probe-base", cache_key_fn=_base_probe_key, persist_result=True, result_serializer="json")(
    probe.probe_base
)
bias_probe = task(name="bias-probe", cache_policy=NO_CACHE)(probe.bias_probe)
report_evaluation = task(name="evaluation-report", cache_policy=NO_CACHE)(reports.report_evaluation)


def _base_generations_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    data: load.DataRef = parameters["data"]
    tokenized: tokenization.TokenizedRef = parameters["tokenized"]
    settings = f"{generation.PROMPTS}-{generation.PROMPT_WORDS}-{generation.GREEDY.model_dump_json()}"
    options = json.dumps([tokenized.options, tokenized.encoding.model_dump()], sort_keys=True, default=str)
    text = f"{_model_fingerprint(parameters['source'])}|{data.fingerprint}|{tokenized.task}|{settings}|{options}"
    return "base-generations-" + hashlib.sha256(text.encode()).hexdigest()[:20]


# Like the base eval and probe: deterministic, the same for every run on this model and data, cached.
base_generations = task(
    name="base-generations", cache_key_fn=_base_generations_key, persist_result=True, result_serializer="json"
)(reports.base_generations)
apply_method = task(name="apply-method", cache_policy=NO_CACHE)(adapting.apply_method)
# Training never caches. A retry (transient failures only) continues from the run's last checkpoint.
train_model = task(
    name="train", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5, retry_condition_fn=is_transient
)(training.train_model)
evaluate_model = task(name="evaluate", cache_policy=NO_CACHE)(evaluation.evaluate_model)
merge_model = task(name="merge", cache_policy=NO_CACHE)(merging.merge_model)
register_model = task(
    name="register", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5, retry_condition_fn=is_transient
)(registry.register_model)


@task(name="export", cache_policy=NO_CACHE)
def export_version(config: RunConfig, registered: registry.RegisteredRef, run: tracking.RunRef) -> Any:
    """The config's `export:` section on the version just registered, verified and tagged (None: no section)."""
    from tasks.export.pipeline import export_registered

    return export_registered(config.export, registered, tracking.client_for(run), config.train.output_dir)


@task(name="promote", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=3, retry_condition_fn=is_transient)
def promote(
    registered: registry.RegisteredRef,
    run: tracking.RunRef,
    config: RunConfig,
    data: load.DataRef,
    report: probe.ProbeReport,
    exported: Any = None,
) -> Decision:
    """Champion/challenger decision for the version just registered, unless the bias gate or (with export.gate)
    the export's verification failed."""
    if exported is not None and exported.holds_back:
        from tasks.export.pipeline import hold_back

        return Decision(**hold_back(tracking.client_for(run), registered, exported))
    return promote_version(
        tracking.client_for(run),
        registered.name,
        registered.version,
        config.registry.promote,
        reevaluate=champion_reevaluator(config, data),
        gate=report.gate,
    )


# A trial is the unit of fan-out and of failure isolation; it records its own failure instead of raising.
run_trial = task(name="trial", cache_policy=NO_CACHE)(trials.run_trial)
report_grid = task(name="compare", cache_policy=NO_CACHE)(grid_report.report_grid)
log_metrics = task(name="log-metrics", cache_policy=NO_CACHE)(tracking.log_metrics)
log_params = task(name="log-params", cache_policy=NO_CACHE)(tracking.log_params)


end_run = task(name="end-run", cache_policy=NO_CACHE)(tracking.end_run)
record_identity = task(name="record-identity", cache_policy=NO_CACHE)(tracking.record_identity)
log_datasets = task(name="log-datasets", cache_policy=NO_CACHE)(tracking.log_datasets)
record_parent = task(name="record-parent", cache_policy=NO_CACHE)(tracking.record_parent)


@task(name="find-identical-version", cache_policy=NO_CACHE)
def identical_version(config: RunConfig, identity: dict[str, str]) -> ModelVersion | None:
    """The registered version of this config trained on the same content, if any (before anything is trained)."""
    client = tracking.use_tracking(config.tracking)
    return registry.identical_version(client, config.registry.name, config, identity)


@task(name="summary", cache_policy=NO_CACHE)
def publish_summary(
    run: tracking.RunRef,
    title: str,
    registered: registry.RegisteredRef,
    decision: Decision,
    metrics: dict[str, float | int],
    table: str | None = None,
) -> None:
    """The run's result as a Prefect artifact on its flow run: where its MLflow run is, the version and its
    promotion, the metrics (and a grid's table), so the Prefect UI says what the run did."""
    import re

    from prefect.artifacts import create_markdown_artifact

    aliases = f"@{decision.alias}" if decision.alias else "no alias"
    lines = [
        f"# {title}",
        "",
        f"- MLflow run: {tracking.run_link(run)}",
        f"- registered: `{registered.model_uri}` → {aliases} ({decision.reason})",
        "",
        "| metric | value |",
        "| --- | --- |",
        *(f"| {key} | {value:.6g} |" for key, value in sorted(metrics.items())),
    ]
    if table:
        lines += ["", "## Trials", "", table]
    key = re.sub(r"[^a-z0-9-]+", "-", f"adaptflow-{registered.name}".lower()).strip("-")
    try:
        create_markdown_artifact(markdown="\n".join(lines), key=key, description=title)
    except Exception as exc:  # the run is registered and decided: a lost orchestrator only loses this page
        import logging

        logging.getLogger("adaptflow").warning("the Prefect summary artifact was not written (%s)", type(exc).__name__)


def summary(result: Any) -> str | None:
    """One line for what a stage returned: the numbers a user checks at that point (None: nothing worth a line)."""
    if isinstance(result, load.DataRef):
        return f"{result.train_rows} train / {result.eval_rows} eval rows from {result.source}"
    if isinstance(result, tokenization.TokenizedRef):
        return f"{result.train_tokens:,} train / {result.eval_tokens:,} eval tokens"
    if isinstance(result, adapting.AdaptedRef):
        share = result.trainable_params / max(result.total_params, 1)
        return f"{result.trainable_params:,} of {result.total_params:,} parameters trainable ({share:.2%})"
    if isinstance(result, training.TrainedRef):
        return (
            f"{result.steps} steps, train loss {result.train_loss:.4g}, "
            f"{result.train_tokens_per_second:,.0f} tokens/s, {result.train_seconds:.1f} s"
        )
    if isinstance(result, merging.MergedRef) and result.merge_max_abs_diff is not None:
        return f"merged; logits within {result.merge_max_abs_diff:.2g} of the unmerged model"
    if isinstance(result, probe.ProbeReport):
        verdict = "passed" if result.gate.get("passed") else f"FAILED ({result.gate.get('reason')})"
        return f"bias gate {verdict}"
    if isinstance(result, registry.RegisteredRef):
        return f"{result.model_uri}" + (" (an identical version, reported)" if result.existing else "")
    if isinstance(result, Decision):
        return f"@{result.alias or 'no alias'}: {result.reason}"
    if isinstance(result, dict) and any(str(k).startswith(("eval_", "base_eval_")) for k in result):
        shown = [f"{k} {v:.4g}" for k, v in result.items() if isinstance(v, int | float) and "eval_" in str(k)]
        return ", ".join(shown[:6])
    return None


def say_what_it_did(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> None:
    """A stage's one line on the console: its name and key result, instead of Prefect's "Completed()"."""
    import logging

    try:
        line = summary(state.result())
    except Exception:  # a result that cannot be read back says nothing, and must not fail the run
        return
    if line:
        cached = " (cached)" if state.name == "Cached" else ""
        logging.getLogger("adaptflow.stages").info("%s%s: %s", task.name, cached, line)


for _stage in [value for value in list(globals().values()) if isinstance(value, Task)]:
    _stage.on_completion(say_what_it_did)


def tag_flow_run(tags: list[str] | tuple[str, ...]) -> None:
    """Tag this flow run (not its task runs: tags on tasks make Prefect check tag concurrency limits with the
    API at every task start, which fails a run whose orchestrator was lost). Best effort: a label for the UI."""
    import logging
    import uuid

    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    try:
        with get_client(sync_client=True) as client:
            current = client.read_flow_run(uuid.UUID(str(flow_run.id)))
            client.update_flow_run(current.id, tags=sorted({*current.tags, *tags}))
    except Exception as exc:
        logging.getLogger("adaptflow").warning("the flow run was not tagged (%s)", type(exc).__name__)


# The sequence's stages as Prefect tasks, for the single run and the grid's parent (tasks/sequence.py).
CALLS = StageCalls(
    load_data=load_data,
    tokenize_dataset=tokenize_dataset,
    apply_method=apply_method,
    train_model=train_model,
    evaluate_model=evaluate_model,
)
