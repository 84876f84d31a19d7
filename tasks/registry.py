"""Register: log the run's artifacts and a loadable pyfunc model, then create the registry version."""

from __future__ import annotations

import json
import shutil
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from pydantic import BaseModel

from adapters_impl.packaged import INFO_FILE
from tasks.config import RunConfig, dump_config
from tasks.load import DataRef
from tasks.merging import MergedRef
from tasks.tracking import RunRef, config_hash, git_commit, redact, use_tracking
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


def identical_version(client: MlflowClient, name: str, config: RunConfig, data: DataRef) -> ModelVersion | None:
    """The newest version of `name` trained from the same config on the same data, if any."""
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException:
        return None
    same = [
        v
        for v in versions
        if v.tags.get("config_hash") == config_hash(config) and v.tags.get("data_fingerprint") == data.fingerprint
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


def package_model(
    trained: TrainedRef, merged: MergedRef, folder: Path, generation: dict[str, Any], serving: dict[str, Any]
) -> Path:
    """A self-describing folder the pyfunc loads: merged weights, or base weights plus the adapter; `serving` is
    what the objective records on top (an instruction model's chat template and answer length)."""
    adapted = trained.adapted
    shutil.rmtree(folder, ignore_errors=True)
    info: dict[str, Any] = {
        "task": adapted.task,
        "method": adapted.method_name,
        "label_names": adapted.label_names,
        "generation": generation,
    }
    info |= serving
    if merged.merged_dir:
        shutil.copytree(merged.merged_dir, folder / "model")
        info |= {"weights": "model", "tokenizer": "model", "adapter": None}
    else:
        shutil.copytree(adapted.source.name_or_path, folder / "base")
        shutil.copytree(trained.adapter_dir, folder / "adapter")
        # The base as given: pickle weights only when the run's config allowed them (model.allow_pickle).
        info |= {
            "weights": "base",
            "tokenizer": "base",
            "adapter": "adapter",
            "allow_pickle": adapted.source.allow_pickle,
        }
    (folder / INFO_FILE).write_text(json.dumps(info, indent=2))
    return folder


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


def version_tags(config: RunConfig, data: DataRef, run: RunRef, metrics: dict[str, float]) -> dict[str, str]:
    """Lineage and results carried by the run and by the registry version."""
    from tasks.tracking import prefect_flow_run_id

    tags = {
        "base_model": redact(config.model.name_or_path),
        "method": config.method.name,
        "task": config.task,
        "data_fingerprint": data.fingerprint,
        "config_hash": config_hash(config),
        "git_commit": git_commit(),
        "prefect_flow_run_id": prefect_flow_run_id(),
        "run_id": run.run_id,
    }
    tags |= {f"metric.{k}": f"{v:.6g}" for k, v in metrics.items()}
    return tags


def creation_tags(
    config: RunConfig, data: DataRef, run: RunRef, metrics: dict[str, float], extra_tags: dict[str, str] | None
) -> dict[str, str]:
    """The tags a version is created with (in the same call, so no version exists without them)."""
    return version_tags(config, data, run, metrics) | (extra_tags or {}) | {PENDING: "true"}


def register_model(
    config: RunConfig,
    data: DataRef,
    run: RunRef,
    trained: TrainedRef,
    merged: MergedRef,
    metrics: dict[str, float],
    extra_tags: dict[str, str] | None = None,
    serving: dict[str, Any] | None = None,
) -> RegisteredRef:
    """Log artifacts first, then create the version: the registry never points at missing files.

    Idempotent: when a version of the same config on the same data exists (a re-run after a lost orchestrator,
    a retrying script), that version is returned instead of registering a duplicate.
    """
    import mlflow

    client = use_tracking(config.tracking)
    found = identical_version(client, config.registry.name, config, data)
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
    (run_dir / "config.yaml").write_text(dump_config(config))
    package = package_model(trained, merged, run_dir / "package", {"max_new_tokens": 40}, serving or {})
    tags = creation_tags(config, data, run, metrics, extra_tags)
    client.set_tag(run.run_id, "adaptflow.data_fingerprint", data.fingerprint)
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
        )
    # Registered only now, after every artifact is stored.
    registered = mlflow.register_model(info.model_uri, config.registry.name, tags=tags)
    return RegisteredRef(
        name=config.registry.name,
        version=str(registered.version),
        model_uri=f"models:/{config.registry.name}/{registered.version}",
        run_id=run.run_id,
    )
