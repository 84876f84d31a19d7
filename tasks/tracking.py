"""MLflow tracking: where the store is, one run per pipeline run, metrics streamed while training."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import socket
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any

import psutil
from filelock import FileLock
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from pydantic import BaseModel

from tasks.config import RunConfig, TrackingSettings
from tasks.errors import RunFailed, UserInputError
from tasks.process_cache import ProcessCache

log = logging.getLogger("adaptflow")
PROJECT_ROOT = Path(__file__).resolve().parent.parent
SECRET_MARKERS = ("token", "password", "secret", "api_key")
ERROR_TAG = "adaptflow.error"


def embedded_store() -> Path:
    """The embedded store's folder: ADAPTFLOW_MLFLOW_DIR, else the project's git-ignored `mlflow/`."""
    return Path(os.environ.get("ADAPTFLOW_MLFLOW_DIR", PROJECT_ROOT / "mlflow")).resolve()


def tracking_uri(settings: TrackingSettings) -> str:
    """`tracking.uri`, else MLFLOW_TRACKING_URI, else SQLite in the embedded store."""
    if settings.uri:
        return settings.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    store = embedded_store()
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def sqlite_store(uri: str) -> Path | None:
    """The database file of a SQLite tracking URI, None for any other store."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def use_tracking(settings: TrackingSettings) -> MlflowClient:
    """Point this process's MLflow at the configured store (registry included) and return a client."""
    import mlflow

    uri = tracking_uri(settings)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if uri.startswith("sqlite:///") and uri not in _MIGRATED_SQLITE:
        with _sqlite_migration_lock(Path(uri.removeprefix("sqlite:///"))):
            client = MlflowClient(uri, uri)  # opening the stores creates and migrates their tables
            client.search_registered_models(max_results=1)
        _MIGRATED_SQLITE[uri] = True
        return client
    return MlflowClient(uri, uri)


# The SQLite stores this process has already brought to MLflow's current schema (a check costs a query and a lock).
_MIGRATED_SQLITE: ProcessCache[str, bool] = ProcessCache()


def _sqlite_migration_lock(database: Path) -> contextlib.AbstractContextManager[object]:
    """A lock beside a SQLite store: two first runs on a new store would both migrate it, and all but one
    fail half-way (alembic's tables already exist)."""
    if not database.parent.is_dir():  # SQLite itself will say what is wrong
        return contextlib.nullcontext()
    return FileLock(str(database.with_name(database.name + ".lock")), timeout=600, thread_local=False)


def experiment_id(client: MlflowClient, name: str) -> str:
    """The experiment's id, created on first use; with a SQLite store its artifacts go beside the database
    (MLflow's default would be `./mlruns` in whatever the working directory happens to be)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if client.tracking_uri.startswith("sqlite:///"):
        database = Path(client.tracking_uri.removeprefix("sqlite:///"))
        location = (database.parent / "artifacts").as_uri()
    try:  # the UI opens a model-training experiment on its runs, not on an empty GenAI page
        return client.create_experiment(
            name, artifact_location=location, tags={"mlflow.experimentKind": "custom_model_development"}
        )
    except Exception:  # created meanwhile by a concurrent run
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def git_commit() -> str:
    """The project's git commit, or 'unknown' outside a checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def prefect_flow_run_id() -> str:
    """The id of the Prefect flow run we are in, or '' outside one."""
    try:
        from prefect.runtime import flow_run

        return str(flow_run.id or "")
    except Exception:
        return ""


def redact(text: str) -> str:
    """Credentials in URLs (`scheme://user:password@host`) replaced by `***`."""
    return re.sub(r"(//)[^/@\s]+@", r"\1***@", text)


def public_params(config: RunConfig) -> dict[str, str]:
    """The resolved config as MLflow params; nothing that looks like a secret, no credentials in URLs."""
    params = {}
    for key, value in config.flat().items():
        if any(marker in key.lower() for marker in SECRET_MARKERS):
            continue
        params[key] = redact(str(value))[:6000]
    return params


class RunRef(BaseModel):
    """A pipeline run: its MLflow run and its local folder."""

    run_id: str
    experiment_id: str
    tracking_uri: str
    run_dir: str
    resumed: bool = False
    # The status --resume found the run in (KILLED, FAILED, or RUNNING after a SIGKILL): restored when the resume
    # is refused, so that a refusal changes nothing.
    previous_status: str | None = None


def run_title(config: RunConfig) -> str:
    """A run's name that tells runs apart in the UI: method and its rank/alpha, objective, base, registry name."""
    method = config.method
    shape = "".join(f" {key}={getattr(method, key):g}" for key in ("r", "alpha") if hasattr(method, key))
    base = config.model.name_or_path.rstrip("/").rsplit("/", 1)[-1]
    return f"{method.name}{shape} · {config.task} · {base} → {config.registry.name}"


def log_datasets(run: RunRef, data: Any) -> None:
    """The run's train and eval splits as MLflow dataset inputs (name, source, content digest), so the UI's
    Datasets column and `mlflow.search_runs` show what each run was trained on."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    with warnings.catch_warnings():  # a path reads as several kinds of source; MLflow warns and takes the first
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(str(data.source))
    inputs = []
    for split in ("train", "eval"):
        name = f"{Path(str(data.source)).name}:{split}"
        dataset = MetaDataset(source=source, name=name, digest=data.fingerprint)  # type: ignore[abstract]
        inputs.append(DatasetInput(dataset._to_mlflow_entity(), [InputTag("mlflow.data.context", split)]))
    try:
        client_for(run).log_inputs(run.run_id, datasets=inputs)
    except Exception as exc:  # lineage for the UI: never worth failing a run over
        log.warning("could not log the datasets to MLflow (%s)", exc.__class__.__name__)


def config_hash(config: RunConfig) -> str:
    """Identifies "the same config" for --resume: the resolved config, outputs, tracking and export aside."""
    tree = config.model_dump(mode="json", exclude={"tracking": True, "registry": True, "export": True})
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:16]


def unfinished_run(client: MlflowClient, experiment: str, config: RunConfig) -> str | None:
    """The newest run of this config that did not finish (killed, failed or still marked running)."""
    runs = client.search_runs(
        [experiment],
        filter_string=f"tags.`adaptflow.config_hash` = '{config_hash(config)}' and attributes.status != 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=50,
    )
    standalone = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]  # grid trials resume with their grid
    return standalone[0].info.run_id if standalone else None


OWNER_TAG = "adaptflow.process"  # host:pid:start time of the process a RUNNING run is live in


def process_identity(pid: int | None = None) -> str:
    """This host, a process id and that process's start time: a pid alone is reused after the process ends."""
    process = psutil.Process(pid)
    return f"{socket.gethostname()}:{process.pid}:{process.create_time():.2f}"


def claim(client: MlflowClient, run_id: str) -> None:
    """Record this process as the one a RUNNING run is live in (`sweep_dead_runs` checks it)."""
    client.set_tag(run_id, OWNER_TAG, process_identity())


def _owner_alive(owner: str) -> bool:
    """Whether the process an owner tag names still runs; a run of another host is taken as alive."""
    host, pid, started = [*owner.rsplit(":", 2), "", ""][:3]
    if host != socket.gethostname():
        return True
    try:
        return abs(psutil.Process(int(pid)).create_time() - float(started)) < 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False


def sweep_dead_runs(client: MlflowClient, experiment: str) -> list[str]:
    """Mark FAILED, with an error tag saying why, the experiment's runs still RUNNING whose process on this host
    has ended: one that died without marking its run (SIGKILL, the out-of-memory killer, or a store so full
    that even FAILED could not be written). `--resume` continues them as it does any unfinished run.

    Returns:
        The run ids marked.
    """
    runs = client.search_runs([experiment], filter_string="attributes.status = 'RUNNING'", max_results=1000)
    marked = []
    for run in runs:
        owner = run.data.tags.get(OWNER_TAG)
        if owner is None or _owner_alive(owner):  # runs of other tools, or live ones
            continue
        why = (
            f"the process running it (pid {owner.rsplit(':', 2)[1]} on {socket.gethostname()}) ended without "
            "marking it (killed, out of memory, or its tracking store full); marked FAILED at the next start"
        )
        try:
            client.set_tag(run.info.run_id, ERROR_TAG, why)
            client.set_terminated(run.info.run_id, status="FAILED")
        except Exception as exc:  # a run ending meanwhile, or a store still full: the next start tries again
            log.warning("could not mark the dead run %s FAILED (%s)", run.info.run_id, exc.__class__.__name__)
            continue
        log.warning("run %s: %s", run.info.run_id, why)
        marked.append(run.info.run_id)
    return marked


def check_reachable(uri: str) -> None:
    """Fail fast, naming the URI, when a tracking server does not answer (its client would retry for minutes).

    Raises:
        RunFailed: the server does not answer its health check.
    """
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10):
            pass
    except OSError as exc:
        shown = redact(uri)  # never print credentials
        raise RunFailed(
            f"tracking.uri: the MLflow tracking server at {shown} is unreachable ({exc.__class__.__name__}); "
            "start it (mlflow/start-server.sh) or unset MLFLOW_TRACKING_URI to use the embedded store"
        ) from None


def start_run(
    config: RunConfig, run_name: str | None = None, parent_run_id: str | None = None, resume: bool = False
) -> RunRef:
    """Create the MLflow run (params = the resolved config, lineage tags) and the run's folder.

    With `resume`, continue the newest unfinished run of the same config instead, in the same MLflow run.
    """
    client = use_tracking(config.tracking)
    check_reachable(client.tracking_uri)
    exp = experiment_id(client, config.tracking.experiment)
    if parent_run_id is None:  # a grid's trials start while their grid lives: it swept when it started
        sweep_dead_runs(client, exp)
    previous = unfinished_run(client, exp, config) if resume else None
    if previous:
        previous_status = client.get_run(previous).info.status
        client.update_run(previous, status="RUNNING")
        claim(client, previous)
        client.set_tag(previous, "adaptflow.resumed", "true")
        clear_error(client, previous)  # the interruption being resumed is no longer the run's state
        log.info("resuming run %s", previous)
        run_dir = Path(config.train.output_dir).resolve() / previous
        run_dir.mkdir(parents=True, exist_ok=True)
        return RunRef(
            run_id=previous,
            experiment_id=exp,
            tracking_uri=client.tracking_uri,
            run_dir=str(run_dir),
            resumed=True,
            previous_status=previous_status,
        )
    if resume:  # as the HF Trainer's resume_from_checkpoint=True: asked to continue, nothing to continue from
        raise UserInputError(
            f"--resume: no unfinished run of this config (config hash {config_hash(config)}) in experiment "
            f"{config.tracking.experiment!r}: every run of it finished, or none started with these --set "
            "overrides; run without --resume to start one"
        )
    tags = {
        "adaptflow.config_hash": config_hash(config),
        "adaptflow.base_model": redact(config.model.name_or_path),
        "adaptflow.method": config.method.name,
        "adaptflow.task": config.task,
        "adaptflow.git_commit": git_commit(),
        "adaptflow.prefect_flow_run_id": prefect_flow_run_id(),
        OWNER_TAG: process_identity(),
    }
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    tags["mlflow.source.git.commit"] = tags["adaptflow.git_commit"]  # where MLflow's UI looks for it
    run = client.create_run(exp, tags=tags, run_name=run_name or run_title(config))
    run_id = run.info.run_id
    params = public_params(config)
    items = list(params.items())
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=[Param(k, v) for k, v in items[start : start + 100]])
    run_dir = Path(config.train.output_dir).resolve() / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    return RunRef(run_id=run_id, experiment_id=exp, tracking_uri=client.tracking_uri, run_dir=str(run_dir))


IDENTITY_TAG = "adaptflow.identity"  # config key -> content fingerprint of what the run trains on (JSON)
CHANGED_TAG = "adaptflow.changed_on_resume"  # what differed when a resume was allowed to go on (JSON)


class ResumeChanged(UserInputError):
    """`--resume` of a run whose data, base or objective files changed since it started."""


def record_identity(run: RunRef, identity: dict[str, str], allow_changed: bool = False) -> dict[str, str]:
    """Record what the run trains on (`tasks.identity.run_identity`). A resumed run first compares it with what its
    earlier attempt recorded: continuing on other content would train one run on two datasets (or bases).

    Returns:
        Lineage tags for its version: what changed on an allowed resume, before and after; empty otherwise.

    Raises:
        ResumeChanged: the content changed and `allow_changed` is off, naming what changed.
    """
    client = client_for(run)
    before = client.get_run(run.run_id).data.tags.get(IDENTITY_TAG) if run.resumed else None
    changed = {}
    if before:
        recorded = json.loads(before)
        changed = {k: {"before": recorded[k], "after": v} for k, v in identity.items() if recorded.get(k, v) != v}
    if changed and not allow_changed:
        names = {"data": "data.train/data.eval"}
        shown = ", ".join(f"{names.get(k, k)} (fingerprint {c['before']} -> {c['after']})" for k, c in changed.items())
        raise ResumeChanged(
            f"--resume: run {run.run_id} started on other content: {shown} changed since; its checkpoints were "
            "trained on the old content. Run without --resume to start afresh, or add --allow-changed to continue "
            "on the new content (its version records both)"
        )
    lineage = {}
    if changed:
        log.warning("resuming run %s on changed content: %s", run.run_id, ", ".join(changed))
        lineage["changed_on_resume"] = json.dumps(changed, sort_keys=True)
        client.set_tag(run.run_id, CHANGED_TAG, lineage["changed_on_resume"])
    client.set_tag(run.run_id, IDENTITY_TAG, json.dumps(identity, sort_keys=True))
    return lineage


def record_parent(run: RunRef, source: Any) -> dict[str, str]:
    """A run started from a registered version (tasks/parents.py) records it: tags `parent_model_uri` (pinned to
    the version number), `parent_run_id`, its fingerprint and a link to the parent's run, and a line in the run's
    description. Returns the same tags for the new version; empty for other bases."""
    from tasks.parents import parent_of

    parent = parent_of(source)
    if parent is None:
        return {}
    link = run_link(RunRef(run_id=parent.run_id, experiment_id=parent.experiment_id, tracking_uri=run.tracking_uri,
                           run_dir=""))  # fmt: skip
    tags = parent.tags() | {"parent_run_link": link}
    client = client_for(run)
    for key, value in tags.items():
        client.set_tag(run.run_id, key, value)
    note = client.get_run(run.run_id).data.tags.get("mlflow.note.content", "")
    line = f"Started from {parent.pinned_uri} ({parent.uri}), trained in {link}."
    if line not in note:
        client.set_tag(run.run_id, "mlflow.note.content", f"{note}\n\n{line}".strip())
    return tags


def resumed_parent_version(config: RunConfig) -> str | None:
    """The version an unfinished run of this config started from, when its base is a registry alias: a resume
    continues on that version even when the alias has moved since."""
    from tasks.settings import parse_registered

    if not config.model.registered or parse_registered(config.model.name_or_path)[1] is None:
        return None
    client = use_tracking(config.tracking)
    found = client.get_experiment_by_name(config.tracking.experiment)
    run_id = unfinished_run(client, found.experiment_id, config) if found else None
    uri = client.get_run(run_id).data.tags.get("parent_model_uri", "") if run_id else ""
    return uri.rsplit("/", 1)[1] if uri else None


def restore_status(run: RunRef) -> None:
    """Put a resumed run back in the status --resume found it in."""
    if run.previous_status and run.previous_status != "RUNNING":
        client_for(run).set_terminated(run.run_id, status=run.previous_status)


def run_link(run: RunRef) -> str:
    """Where to open the run: its page on a tracking server, else the command that shows the local store."""
    if run.tracking_uri.startswith(("http://", "https://")):
        return f"{redact(run.tracking_uri).rstrip('/')}/#/experiments/{run.experiment_id}/runs/{run.run_id}"
    return f"run `{run.run_id}` (`mlflow ui --backend-store-uri {run.tracking_uri}`)"


def client_for(run: RunRef) -> MlflowClient:
    return MlflowClient(run.tracking_uri, run.tracking_uri)


def log_metrics(run: RunRef, metrics: dict[str, float], step: int = 0) -> None:
    """Log finite numeric metrics in one batch."""
    now = int(time.time() * 1000)
    batch = [
        Metric(k, float(v), now, step)
        for k, v in metrics.items()
        if isinstance(v, int | float) and math.isfinite(float(v))
    ]
    if batch:
        client_for(run).log_batch(run.run_id, metrics=batch)


def log_params(run: RunRef, params: dict[str, str]) -> None:
    """Log params the stages resolved (the config's own are logged when the run starts); a resumed run that
    logged them already is left as it is (MLflow refuses to change a param)."""
    client = client_for(run)
    logged = client.get_run(run.run_id).data.params
    fresh = [Param(k, str(v)) for k, v in params.items() if k not in logged]
    if fresh:
        client.log_batch(run.run_id, params=fresh)


def clear_error(client: MlflowClient, run_id: str) -> None:
    """Drop the error tag an earlier, interrupted attempt of this run left."""
    if ERROR_TAG in client.get_run(run_id).data.tags:
        client.delete_tag(run_id, ERROR_TAG)


def end_run(run: RunRef, status: str, error: str | None = None) -> None:
    """Mark the MLflow run FINISHED, FAILED or KILLED (with the error, when there is one).

    A SQLite store still locked by a write that a signal interrupted is waited for a few seconds: this is the one
    write that must happen when a run stops.
    """
    client = client_for(run)
    for attempt in range(4):
        try:
            if error:
                client.set_tag(run.run_id, ERROR_TAG, error)
            elif status == "FINISHED":
                clear_error(client, run.run_id)
            client.set_terminated(run.run_id, status=status)
            return
        except Exception as exc:
            if "database is locked" not in str(exc) or attempt == 3:
                raise
            time.sleep(1.0 + attempt)
