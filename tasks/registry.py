"""Register: log the run's artifacts and a loadable pyfunc model, then create the registry version."""

from __future__ import annotations

import json
import os
import shutil
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types.schema import Array, ColSpec, Object, ParamSchema, ParamSpec, Property, Schema
from pydantic import BaseModel

from adapters_impl import get_method
from adapters_impl.model_heads import head_of_package
from adapters_impl.packaged import INFO_FILE, folder_fingerprint, model_files
from tasks.config import RunConfig, dump_config
from tasks.identity import EVAL_SETTINGS_TAG, IDENTITY_TAG, eval_settings, recorded, run_identity
from tasks.load import DataRef
from tasks.merging import MergedRef
from tasks.modeling import ModelSource, load_tokenizer
from tasks.objectives import get_objective
from tasks.tracking import RunRef, config_hash, experiment_id, git_commit, redact, use_tracking
from tasks.training import TrainedRef

PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
# Shipped with every model: what loading a package needs (adapters_impl.packaged and the methods' loaders), so
# adapter-only versions load where adaptflow is not installed. Not tasks/: the pipeline is not needed to serve.
CODE_PATHS = [str(Path(__file__).parent.parent / "adapters_impl")]
SERVING_PACKAGES = [
    "torch",
    "transformers",
    "tokenizers",
    "peft",
    "safetensors",
    "sentencepiece",
    "bitsandbytes",
    "pydantic",
    "mlflow",
]


# Local base models are logged once, as runs of this experiment tagged with the folder's content fingerprint.
BASES_EXPERIMENT = "adaptflow-bases"
BASE_FINGERPRINT_TAG = "adaptflow.base_fingerprint"
BASE_ARTIFACT = "base"

# Set when a version is created, removed once its promotion decision is written: a run killed in between leaves
# a version that `--resume` and `adaptflow promote` find and decide for.
PENDING = "promotion_pending"


class RegisteredRef(BaseModel):
    """A model version in the registry (`existing`: an identical one was there already; nothing registered)."""

    name: str
    version: str
    model_uri: str
    run_id: str
    existing: bool = False


def identical_version(
    client: MlflowClient, name: str, config: RunConfig, identity: dict[str, str]
) -> ModelVersion | None:
    """The newest version of `name` trained from the same config on the same content (data, base weights, the
    objective's files: `tasks.identity.run_identity`), if any. Versions registered before identities were recorded
    compare by their data alone."""
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException:
        return None
    same = [
        v
        for v in versions
        if v.tags.get("config_hash") == config_hash(config)
        and (
            recorded(v.tags, IDENTITY_TAG) == identity
            if IDENTITY_TAG in v.tags
            else v.tags.get("data_fingerprint") == identity["data"]
        )
    ]
    return max(same, key=lambda v: int(v.version), default=None)


def serving_requirements() -> list[str]:
    """What a registered model needs to load, pinned to what trained it."""
    pins = []
    for package in SERVING_PACKAGES:
        try:
            pins.append(f"{package}=={version(package).split('+')[0]}")
        except PackageNotFoundError:
            pins.append(package)
    return pins


def link_or_copy(source: Path, target: Path) -> None:
    """A folder's files at `target` as hard links (no bytes copied), copies where linking is not possible."""

    def place(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=place)


def logged_base(client: MlflowClient, fingerprint: str) -> str | None:
    """The run that holds the base with this fingerprint, if one finished logging it."""
    experiment = client.get_experiment_by_name(BASES_EXPERIMENT)
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id],
        f"tags.`{BASE_FINGERPRINT_TAG}` = '{fingerprint}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time ASC"],
    )
    # Its files must still be there: a version pinned to a run whose artifacts were deleted would load only
    # while the original folder exists.
    return next((run.info.run_id for run in runs if _holds_base(client, run.info.run_id)), None)


def _holds_base(client: MlflowClient, run_id: str) -> bool:
    try:
        return any(Path(f.path).name == "config.json" for f in client.list_artifacts(run_id, BASE_ARTIFACT))
    except (MlflowException, OSError):
        return False


def log_base(client: MlflowClient, folder: Path, fingerprint: str, display_name: str) -> str:
    """Log a local base model's files once into the tracking store; the run is FINISHED only when all are there,
    so a half-logged base is never reused."""
    tags = {BASE_FINGERPRINT_TAG: fingerprint, "mlflow.runName": f"base-{fingerprint[:12]}", "source": display_name}
    run_id = client.create_run(experiment_id(client, BASES_EXPERIMENT), tags=tags).info.run_id
    try:
        for file in model_files(folder):
            parent = file.relative_to(folder).parent.as_posix()
            client.log_artifact(run_id, str(file), BASE_ARTIFACT if parent == "." else f"{BASE_ARTIFACT}/{parent}")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id


def pin_base(client: MlflowClient, source: ModelSource) -> dict[str, Any]:
    """A reference to the base a version loads: a hub id at its resolved commit, or a local folder's content
    logged once into the tracking store (reused by every later version on the same content)."""
    folder = Path(source.name_or_path)
    if not folder.is_dir():
        return {"kind": "hub", "name": source.name_or_path, "revision": source.commit_hash or source.revision}
    fingerprint = folder_fingerprint(folder)
    run_id = logged_base(client, fingerprint) or log_base(client, folder, fingerprint, source.display_name)
    return {
        "kind": "tracking",
        "fingerprint": fingerprint,
        "run_id": run_id,
        "path": BASE_ARTIFACT,
        "logged_from": source.display_name,
        "local_path": str(folder.resolve()),  # used instead of a download while it still holds the same content
    }


def model_signature(info: dict[str, Any]) -> tuple[ModelSignature, Any]:
    """The signature and input example of a version's pyfunc (tasks/pyfunc_model.py), from its package's info:
    what `mlflow.pyfunc.load_model(...).predict` and `mlflow models serve` accept once MLflow enforces it, and
    what the MLflow UI shows. Chat models: `messages` (OpenAI-style, with an optional `max_tokens`) or `prompt`;
    others: texts. Generating models take the param `max_new_tokens` (default: the registered length)."""
    output = head_of_package(info).output
    texts = Schema([ColSpec("string")])  # unnamed: a list of strings, or a DataFrame's text column
    if output in ("label", "score"):
        outputs = Schema([ColSpec("string")]) if output == "label" else None
        return ModelSignature(texts, outputs), ["The food was great."]
    length = int(info.get("generation", {}).get("max_new_tokens", 40))
    params = ParamSchema([ParamSpec("max_new_tokens", "long", length)])
    if not info.get("chat"):
        return ModelSignature(texts, Schema([ColSpec("string")]), params), (["Once upon a time"], {"max_new_tokens": 4})
    message = Object([Property("role", "string"), Property("content", "string")])
    inputs = Schema(
        [
            ColSpec(Array(message), "messages", required=False),
            ColSpec("string", "prompt", required=False),
            ColSpec("long", "max_tokens", required=False),
        ]
    )
    return ModelSignature(inputs, None, params), {"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 4}


def package_model(
    trained: TrainedRef,
    merged: MergedRef,
    folder: Path,
    generation: dict[str, Any],
    serving: dict[str, Any],
    base: dict[str, Any] | None,
) -> Path:
    """A self-describing folder the pyfunc loads: what the run made new (the method's weights, or the whole model
    for methods that train the base), the tokenizer, a pinned reference to the base, and merged weights when
    `merged` has a folder. `serving` is what the objective records on top (an instruction model's chat template
    and answer length). Files are hard links to the run's where possible: no bytes copied."""
    adapted = trained.adapted
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    info: dict[str, Any] = {
        "task": adapted.task,
        "head": get_objective(adapted.task).head.record(),  # what serving loads and answers, without the objectives
        "method": adapted.method_name,
        "label_names": adapted.label_names,
        "generation": generation,
    }
    info |= serving
    load_tokenizer(adapted.source).save_pretrained(str(folder / "tokenizer"))
    if get_method(adapted.method_name).whole_model:
        link_or_copy(Path(trained.adapter_dir), folder / "model")
        info |= {"weights": "model", "tokenizer": "tokenizer", "adapter": None, "base": None}
    else:
        link_or_copy(Path(trained.adapter_dir), folder / "adapter")
        # The base as given: pickle weights only when the run's config allowed them (model.allow_pickle).
        info |= {
            "weights": None,
            "tokenizer": "tokenizer",
            "adapter": "adapter",
            "base": base,
            "allow_pickle": adapted.source.allow_pickle,
        }
    if merged.merged_dir:  # registry.merged: one folder for serving stacks; loaders prefer it
        shutil.move(merged.merged_dir, folder / "merged")
        info["merged"] = "merged"
    (folder / INFO_FILE).write_text(json.dumps(info, indent=2))
    return folder


def tidy_run_dir(run_dir: Path, keep_checkpoints: int) -> None:
    """After a version is registered, the run folder keeps the adapter, reports and the newest `keep_checkpoints`
    checkpoints (and the best one, under train.best): packages, merged weights and the untrained adapter are in the tracking store or no longer needed."""
    for name in ("package", "merged", "adapter-init"):
        shutil.rmtree(run_dir / name, ignore_errors=True)
    checkpoints = sorted(
        (run_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]), reverse=True
    )
    from tasks.periodic_eval import best_step_of

    best = best_step_of(run_dir / "checkpoints")  # train.best: its checkpoint is never deleted
    for old in checkpoints[keep_checkpoints:]:
        if best is None or old.name != f"checkpoint-{best}":
            shutil.rmtree(old, ignore_errors=True)


def plot_loss_curve(history: list[tuple[int, float]], title: str, path: Path) -> None:
    """Training loss against step, as a PNG for the run's reports."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    if history:
        steps, losses = zip(*history, strict=True)
        ax.plot(steps, losses, marker="o", markersize=3)
    ax.set(xlabel="step", ylabel="training loss", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def version_tags(
    config: RunConfig, data: DataRef, run: RunRef, metrics: dict[str, float], identity: dict[str, str]
) -> dict[str, str]:
    """Lineage and results carried by the run and by the registry version: what it was trained on (by content)
    and what its evaluation measured on (which promotion compares)."""
    from tasks.tracking import prefect_flow_run_id

    tags = {
        "base_model": redact(config.model.name_or_path),
        "method": config.method.name,
        "task": config.task,
        "data_fingerprint": data.fingerprint,
        IDENTITY_TAG: json.dumps(identity, sort_keys=True),
        EVAL_SETTINGS_TAG: json.dumps(eval_settings(config, data), sort_keys=True)[:5000],
        "config_hash": config_hash(config),
        "git_commit": git_commit(),
        "prefect_flow_run_id": prefect_flow_run_id(),
        "run_id": run.run_id,
    }
    tags |= {f"metric.{k}": f"{v:.6g}" for k, v in metrics.items()}
    return tags


def creation_tags(
    config: RunConfig,
    data: DataRef,
    run: RunRef,
    metrics: dict[str, float],
    extra_tags: dict[str, str] | None,
    identity: dict[str, str],
) -> dict[str, str]:
    """The tags a version is created with (in the same call, so no version exists without them)."""
    return version_tags(config, data, run, metrics, identity) | (extra_tags or {}) | {PENDING: "true"}


def describe(config: RunConfig, data: DataRef, metrics: dict[str, float], tags: dict[str, str] | None = None) -> str:
    """A version's description: what was tuned on what, and how it did against its base (and the registered
    version it started from, when `tags` name one)."""
    metric = config.registry.promote.metric
    tuned, base = metrics.get(metric), metrics.get(f"base_{metric}")
    result = f"{metric} {tuned:.4g}" if tuned is not None else ""
    if tuned is not None and base is not None:
        result = f"{metric} {base:.4g} (base) -> {tuned:.4g}"
    return (
        f"{config.method.name} ({config.task}) on {redact(config.model.name_or_path)}, trained on "
        f"{redact(str(data.source))} ({data.train_rows} rows, {data.eval_rows} held out). {result}".strip()
    ) + parent_line(tags or {})


def parent_line(tags: dict[str, str]) -> str:
    """ " Started from models:/NAME/VERSION (run ID)." when the version started from a registered one."""
    if "parent_model_uri" not in tags:
        return ""
    return f" Started from {tags['parent_model_uri']} (its run {tags.get('parent_run_id', '?')})."


def register_model(
    config: RunConfig,
    data: DataRef,
    run: RunRef,
    trained: TrainedRef,
    merged: MergedRef,
    metrics: dict[str, float],
    extra_tags: dict[str, str] | None = None,
    serving: dict[str, Any] | None = None,
    force: bool = False,
) -> RegisteredRef:
    """Log artifacts first, then create the version: the registry never points at missing files.

    Idempotent: when a version of the same config on the same content exists (a re-run after a lost orchestrator,
    a retrying script), that version is returned instead of registering a duplicate, unless `force`.
    """
    import mlflow

    client = use_tracking(config.tracking)
    identity = run_identity(config, data, trained.adapted.source)
    found = None if force else identical_version(client, config.registry.name, config, identity)
    if found is not None:
        return RegisteredRef(
            name=config.registry.name,
            version=str(found.version),
            model_uri=f"models:/{config.registry.name}/{found.version}",
            run_id=str(found.run_id),
            existing=True,
        )
    run_dir = Path(run.run_dir)
    reports = run_dir / "reports"
    reports.mkdir(exist_ok=True)
    (reports / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    (reports / "loss_history.json").write_text(json.dumps(trained.loss_history))
    plot_loss_curve(
        trained.loss_history, f"{config.method.name} on {config.model.name_or_path}", reports / "loss_curve.png"
    )
    if trained.eval_history:  # evaluation while training: its history and curves (tasks/periodic_eval.py)
        from tasks.periodic_eval import plot_run_curves

        (reports / "eval_history.json").write_text(json.dumps(trained.eval_history))
        best = config.train.best_tracking()
        best_step = trained.periodic.get("best_step")
        plot_run_curves(
            trained.loss_history,
            trained.eval_history,
            best.metric if best else "eval_loss",
            int(best_step) if best_step is not None else None,
            f"{config.method.name} on {config.model.name_or_path}",
            reports / "metric_curves.png",
        )
    (run_dir / "config.yaml").write_text(dump_config(config))
    method = get_method(config.method.name)
    base = None if method.whole_model else pin_base(client, trained.adapted.source)
    package = package_model(trained, merged, run_dir / "package", {"max_new_tokens": 40}, serving or {}, base)
    signature, example = model_signature(json.loads((package / INFO_FILE).read_text()))
    tags = creation_tags(config, data, run, metrics, extra_tags, identity)
    client.set_tag(run.run_id, "adaptflow.data_fingerprint", data.fingerprint)
    if base is not None:
        client.set_tag(run.run_id, "adaptflow.base", json.dumps(base))
    with mlflow.start_run(run_id=run.run_id):
        mlflow.log_artifacts(trained.adapter_dir, "adapter")
        mlflow.log_artifact(str(run_dir / "config.yaml"))
        mlflow.log_artifacts(str(reports), "reports")
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC_FILE),
            artifacts={"model": str(package)},
            code_paths=CODE_PATHS,
            pip_requirements=serving_requirements(),
            signature=signature,
            input_example=example,  # MLflow predicts it once here: a signature the pyfunc does not fit warns
        )
    # Registered only now, after every artifact is stored.
    registered = mlflow.register_model(info.model_uri, config.registry.name, tags=tags)
    client.update_model_version(
        config.registry.name, registered.version, description=describe(config, data, metrics, extra_tags)
    )
    tidy_run_dir(run_dir, config.train.keep_checkpoints)
    return RegisteredRef(
        name=config.registry.name,
        version=str(registered.version),
        model_uri=f"models:/{config.registry.name}/{registered.version}",
        run_id=run.run_id,
    )
