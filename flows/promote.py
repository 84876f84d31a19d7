"""`adaptflow promote`: the champion/challenger decision for the newest version of a registered model."""

from __future__ import annotations

import tempfile
from pathlib import Path

from mlflow.entities.model_registry import ModelVersion
from prefect import flow

from tasks.config import PromoteSettings, RunConfig, TrackingSettings, load_config
from tasks.errors import UserInputError
from tasks.load import load_data
from tasks.promotion import Decision, Reevaluate, champion_reevaluator, promote_version
from tasks.tracking import use_tracking


@flow(name="promote", log_prints=True)
def promote_newest(name: str) -> Decision:
    """Decide for the newest version with the promotion settings it was trained with.

    Raises:
        UserInputError: no registered model of that name.
    """
    client = use_tracking(TrackingSettings())
    versions = client.search_model_versions(f"name='{name}'")
    if not versions:
        raise UserInputError(f"--name: no registered model called {name!r} (or it has no versions)")
    newest = max(versions, key=lambda v: int(v.version))
    settings, reevaluate = PromoteSettings(), None
    if newest.run_id:
        with tempfile.TemporaryDirectory() as folder:
            try:
                path = client.download_artifacts(newest.run_id, "config.yaml", folder)
            except Exception:  # registered outside adaptflow: decide on the recorded metrics alone
                path = None
            if path:
                config = load_config(path, [])
                settings = config.registry.promote
                reevaluate = _reevaluator_if_data_unchanged(config, newest)
    return promote_version(client, name, str(newest.version), settings, reevaluate)


def _reevaluator_if_data_unchanged(config: RunConfig, newest: ModelVersion) -> Reevaluate | None:
    """Re-evaluating the champion needs the newest version's eval data as it was when it was trained."""
    cache = Path(config.train.output_dir).resolve() / ".cache" / "data"
    try:
        data = load_data(config.data, config.task, cache)
    except UserInputError:
        return None
    if data.fingerprint != newest.tags.get("data_fingerprint"):
        return None
    return champion_reevaluator(config, data)
