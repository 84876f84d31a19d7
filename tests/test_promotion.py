"""Champion/challenger decisions on a real MLflow registry (SQLite)."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from tasks.config import PromoteSettings
from tasks.promotion import promote_version


def register(client: MlflowClient, tmp_path: Path, eval_loss: float) -> str:
    if not client.search_registered_models(filter_string="name = 'm'"):
        client.create_registered_model("m")
    exp = client.get_experiment_by_name("Default")
    run = client.create_run(exp.experiment_id if exp else "0")
    client.log_metric(run.info.run_id, "eval_loss", eval_loss)
    version = client.create_model_version("m", source=(tmp_path / "weights").as_uri(), run_id=run.info.run_id)
    return str(version.version)


def test_first_version_becomes_champion_and_only_a_better_one_replaces_it(tmp_path: Path) -> None:
    client = MlflowClient()
    settings = PromoteSettings(metric="eval_loss", mode="min", min_delta=0.05)
    first = register(client, tmp_path, 2.0)
    decision = promote_version(client, "m", first, settings)
    assert (decision.alias, decision.promoted, decision.reason) == ("champion", True, "no champion yet")

    slightly_better = register(client, tmp_path, 1.97)  # better, but not by min_delta
    decision = promote_version(client, "m", slightly_better, settings)
    assert (decision.alias, decision.champion_version) == ("challenger", first)
    assert "does not beat" in client.get_model_version("m", slightly_better).tags["promotion"]

    better = register(client, tmp_path, 1.5)
    decision = promote_version(client, "m", better, settings)
    assert decision.promoted and decision.champion_version == better
    assert str(client.get_model_version_by_alias("m", "champion").version) == better
    assert str(client.get_model_version_by_alias("m", "challenger").version) == slightly_better


def test_max_mode_promotes_the_higher_metric(tmp_path: Path) -> None:
    client = MlflowClient()
    settings = PromoteSettings(metric="eval_loss", mode="max")
    low = register(client, tmp_path, 0.5)
    promote_version(client, "m", low, settings)
    high = register(client, tmp_path, 0.9)
    assert promote_version(client, "m", high, settings).promoted
