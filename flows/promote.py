"""`adaptflow promote`: the champion/challenger decision for the newest version of a registered model; and the
decisions a killed run left pending (its version created, its decision not yet written)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient
from prefect import flow

from tasks.config import PromoteSettings, RunConfig, TrackingSettings, load_config
from tasks.errors import UserInputError
from tasks.load import load_data
from tasks.promotion import Decision, Reevaluate, champion_reevaluator, promote_version, recorded_gate
from tasks.registry import PENDING
from tasks.tracking import config_hash, use_tracking


@flow(name="promote", log_prints=False)
def promote_newest(name: str) -> Decision:
    """Finish the pending decisions (oldest first), then decide for the newest version, each with the promotion
    settings it was trained with and the bias gate verdict recorded with it.

    Raises:
        UserInputError: no registered model of that name.
    """
    client = use_tracking(TrackingSettings())
    versions = client.search_model_versions(f"name='{name}'")
    if not versions:
        raise UserInputError(f"--name: no registered model called {name!r} (or it has no versions)")
    newest = max(versions, key=lambda v: int(v.version))
    for pending in _pending(versions):
        if pending.version != newest.version:
            decide_recorded(client, pending)
    return decide_recorded(client, newest)


def promote_pending(config: RunConfig) -> list[tuple[ModelVersion, Decision]]:
    """Decide for this config's versions whose run was killed before their decision was written."""
    client = use_tracking(config.tracking)
    versions = client.search_model_versions(f"name='{config.registry.name}'")
    mine = [v for v in _pending(versions) if v.tags.get("config_hash") == config_hash(config)]
    return [(v, decide_recorded(client, v)) for v in mine]


def _pending(versions: list[ModelVersion]) -> list[ModelVersion]:
    return sorted((v for v in versions if v.tags.get(PENDING)), key=lambda v: int(v.version))


def decide_recorded(client: MlflowClient, version: ModelVersion) -> Decision:
    """The decision for a version with the settings it was trained with and its recorded gate verdict."""
    settings, reevaluate = PromoteSettings(), None
    if version.run_id:
        with tempfile.TemporaryDirectory() as folder:
            try:
                path = client.download_artifacts(version.run_id, "config.yaml", folder)
            except Exception:  # registered outside adaptflow: decide on the recorded metrics alone
                path = None
            if path:
                config = load_config(path, [])
                settings = config.registry.promote
                reevaluate = _reevaluator_if_data_unchanged(config, version)
    return promote_version(
        client, version.name, str(version.version), settings, reevaluate, gate=recorded_gate(version)
    )


def _reevaluator_if_data_unchanged(config: RunConfig, newest: ModelVersion) -> Reevaluate | None:
    """Re-evaluating the champion needs the newest version's eval data as it was when it was trained."""
    cache = Path(config.train.output_dir).resolve() / ".cache" / "data"
    try:
        data = load_data(config.data, config.objective, cache)
    except UserInputError:
        return None
    if data.fingerprint != newest.tags.get("data_fingerprint"):
        return None
    return champion_reevaluator(config, data)
