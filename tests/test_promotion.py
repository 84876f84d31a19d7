"""Champion/challenger decisions on a real MLflow registry (SQLite)."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from flows.promote import promote_newest, promote_pending
from tasks.config import PromoteSettings, RunConfig
from tasks.load import DataRef
from tasks.promotion import gate_tags, promote_version
from tasks.registry import PENDING, creation_tags, identical_version
from tasks.tracking import start_run


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


def register_tagged(client: MlflowClient, tmp_path: Path, eval_loss: float, fingerprint: str) -> str:
    version = register(client, tmp_path, eval_loss)
    client.set_model_version_tag("m", version, "data_fingerprint", fingerprint)
    return version


def test_champion_is_re_evaluated_when_the_eval_data_changed(tmp_path: Path) -> None:
    client = MlflowClient()
    settings = PromoteSettings(metric="eval_loss", mode="min")
    old = register_tagged(client, tmp_path, 1.0, "data-v1")
    promote_version(client, "m", old, settings)
    scored: list[str] = []

    def on_new_data(version) -> float:  # the champion scores 3.0 on the new, harder eval data
        scored.append(str(version.version))
        return 3.0

    new = register_tagged(client, tmp_path, 2.0, "data-v2")  # worse than 1.0 on paper, better on the same data
    decision = promote_version(client, "m", new, settings, reevaluate=on_new_data)
    assert scored == [old] and decision.promoted
    assert "re-evaluated under this version's evaluation settings (data differed)" in decision.reason

    same_data = register_tagged(client, tmp_path, 2.5, "data-v2")  # same data as the champion: no re-evaluation
    assert not promote_version(client, "m", same_data, settings, reevaluate=on_new_data).promoted
    assert scored == [old]


def test_concurrent_promotions_leave_the_best_as_the_one_champion(tmp_path: Path, monkeypatch) -> None:
    """Two promotions at once: each reads the champion, decides, moves the alias; the lock serialises them."""
    import threading
    import time

    import tasks.promotion as promotion

    client = MlflowClient()
    settings = PromoteSettings(metric="eval_loss", mode="min")
    first = register(client, tmp_path, 3.0)
    promote_version(client, "m", first, settings)
    better, best = register(client, tmp_path, 2.0), register(client, tmp_path, 1.0)
    slow_read = promotion.version_metric

    def slowly(*args, **kwargs):  # widen the read-decide-write window so that an unlocked race would show
        time.sleep(0.3)
        return slow_read(*args, **kwargs)

    monkeypatch.setattr(promotion, "version_metric", slowly)
    threads = [
        threading.Thread(target=promote_version, args=(MlflowClient(), "m", v, settings)) for v in (best, better)
    ]
    for thread in threads:
        thread.start()
        time.sleep(0.05)  # `best` decides first; `better` must then compare against it, not against v1
    for thread in threads:
        thread.join()
    assert str(client.get_model_version_by_alias("m", "champion").version) == best
    assert str(client.get_model_version_by_alias("m", "challenger").version) == better


def test_a_version_left_pending_by_a_kill_is_decided_by_resume_and_by_promote(tmp_path: Path) -> None:
    """A run killed between "Created version" and its decision: the version waits (tagged), not lost."""
    client = MlflowClient()
    config = RunConfig.model_validate(
        {"data": {"train": "x.jsonl"}, "registry": {"name": "m"}, "train": {"output_dir": str(tmp_path)}}
    )
    data = DataRef(train_dir="t", eval_dir="e", fingerprint="fp1", text_column="text", label_column=None,
                   train_rows=1, eval_rows=1, source="x.jsonl")  # fmt: skip

    def create(gate: dict, data: DataRef = data) -> str:
        """register_model's last step; the process is "killed" right after it."""
        run = start_run(config)
        identity = {"data": data.fingerprint, "model.name_or_path": "base"}
        tags = creation_tags(config, data, run, {"eval_loss": 1.0}, gate_tags(gate), identity)
        if not client.search_registered_models(filter_string="name = 'm'"):
            client.create_registered_model("m")
        source = (tmp_path / "weights").as_uri()
        return str(client.create_model_version("m", source=source, run_id=run.run_id, tags=tags).version)

    first = create({"passed": True, "reason": "ok"})
    killed = client.get_model_version("m", first)
    assert killed.tags[PENDING] == "true" and not killed.aliases and "promotion" not in killed.tags

    ((version, decision),) = promote_pending(config)  # what `adaptflow run --resume` does first
    assert str(version.version) == first and decision.alias == "champion"
    assert PENDING not in client.get_model_version("m", first).tags and promote_pending(config) == []

    # A re-run of the same config on the same data finds that version instead of registering another.
    same = {"data": "fp1", "model.name_or_path": "base"}
    assert str(identical_version(client, "m", config, same).version) == first  # type: ignore[union-attr]
    assert identical_version(client, "m", config, same | {"data": "fp2"}) is None
    assert identical_version(client, "m", config, same | {"model.name_or_path": "other"}) is None  # base replaced
    other = data.model_copy(update={"fingerprint": "fp2"})

    # `adaptflow promote` finishes it too, and honours the bias gate recorded at creation.
    failed = create({"passed": False, "reason": "stereotype score rose"}, other)
    decision = promote_newest.fn("m")
    assert decision.version == failed and decision.alias == "" and "bias gate failed" in decision.reason
    settled = client.get_model_version("m", failed)
    assert PENDING not in settled.tags and not settled.aliases
    assert str(client.get_model_version_by_alias("m", "champion").version) == first
