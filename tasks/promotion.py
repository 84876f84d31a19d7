"""Promote: the champion/challenger decision for a registered version."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from pydantic import BaseModel

from tasks.config import PromoteSettings, RunConfig
from tasks.evaluation import evaluate_registered
from tasks.identity import EVAL_SETTINGS_TAG, describe, differences, recorded
from tasks.load import DataRef
from tasks.modeling import cache_home
from tasks.registry import PENDING

# Scores a registered version on the new version's eval data (used when the champion saw other eval data).
Reevaluate = Callable[[ModelVersion], float | None]

CHAMPION, CHALLENGER = "champion", "challenger"


class Decision(BaseModel):
    """What promotion did and why."""

    name: str
    version: str
    alias: str
    promoted: bool
    champion_version: str
    reason: str


def version_metric(client: MlflowClient, name: str, version: str, metric: str) -> float | None:
    """A version's metric: its `metric.<name>` tag, else its run's logged value."""
    mv = client.get_model_version(name, version)
    tagged = mv.tags.get(f"metric.{metric}")
    if tagged is not None:
        return float(tagged)
    if mv.run_id:
        value = client.get_run(mv.run_id).data.metrics.get(metric)
        return None if value is None else float(value)
    return None


def beats(new: float, old: float, settings: PromoteSettings) -> bool:
    """True when `new` is better than `old` by more than `min_delta` in the configured direction."""
    if settings.mode == "min":
        return new < old - settings.min_delta
    return new > old + settings.min_delta


def _champion(client: MlflowClient, name: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def registry_lock(client: MlflowClient, name: str) -> FileLock:
    """One promotion at a time per registered model (per machine): read champion, decide, move the alias."""
    key = hashlib.sha256(f"{client._registry_uri}|{name}".encode()).hexdigest()[:16]
    folder = cache_home() / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    return FileLock(str(folder / f"promote-{key}.lock"), timeout=600)


def promote_version(
    client: MlflowClient,
    name: str,
    version: str,
    settings: PromoteSettings,
    reevaluate: Reevaluate | None = None,
    gate: dict[str, Any] | None = None,
) -> Decision:
    """Move `@champion` to this version when it beats the current champion; else alias it `@challenger`.

    The champion's metric is its recorded one when it was evaluated under the same settings (eval data,
    max_length, the objective's settings); otherwise `reevaluate` scores it under this version's, so that the two
    numbers compare, and without `reevaluate` the two are not compared (the version is challenger).
    A failed bias `gate` keeps the version out of @champion whatever its metric: it is tagged
    `bias_gate=failed` with the reason, and gets no alias.
    """
    if gate is not None:
        for key, value in gate_tags(gate).items():
            client.set_model_version_tag(name, str(version), key, value)
        if not gate["passed"]:
            reason = f"bias gate failed: {gate['reason']}"
            client.set_model_version_tag(name, str(version), "promotion", reason)
            _settled(client, name, str(version))
            champion = _champion(client, name)
            return Decision(
                name=name,
                version=str(version),
                alias="",
                promoted=False,
                champion_version=str(champion.version) if champion else "",
                reason=reason,
            )
    with registry_lock(client, name):
        return _decide(client, name, str(version), settings, reevaluate)


def _decide(
    client: MlflowClient, name: str, version: str, settings: PromoteSettings, reevaluate: Reevaluate | None
) -> Decision:
    new = version_metric(client, name, version, settings.metric)
    champion = _champion(client, name)
    keep_reason = False
    if new is None or not math.isfinite(new):
        reason = f"version {version} has no finite '{settings.metric}'"
        promoted = False
    elif champion is None:
        reason = "no champion yet"
        promoted = True
    elif str(champion.version) == version:  # never compared with itself (a re-run reporting the champion)
        reason = "already the champion"
        promoted = keep_reason = True
    else:
        promoted, reason = _compare(client, name, version, new, champion, settings, reevaluate)
    alias = CHAMPION if promoted else CHALLENGER
    client.set_registered_model_alias(name, alias, str(version))
    if not keep_reason or "promotion" not in client.get_model_version(name, version).tags:
        client.set_model_version_tag(name, str(version), "promotion", reason)
    _settled(client, name, version)
    return Decision(
        name=name,
        version=str(version),
        alias=alias,
        promoted=promoted,
        champion_version=str(version) if promoted else str(champion.version if champion else ""),
        reason=reason,
    )


def _compare(
    client: MlflowClient,
    name: str,
    version: str,
    new: float,
    champion: ModelVersion,
    settings: PromoteSettings,
    reevaluate: Reevaluate | None,
) -> tuple[bool, str]:
    """Whether the version beats the champion, measured on one yardstick: the version's evaluation settings (its
    eval split, max_length and the objective's settings: `tasks.identity.eval_settings`). A champion evaluated
    under other settings is re-evaluated under the version's; where it cannot be, the two are not compared and
    the version stays challenger. The reason names the settings both numbers were measured under."""
    ours = recorded(client.get_model_version(name, version).tags, EVAL_SETTINGS_TAG)
    differ = differences(recorded(champion.tags, EVAL_SETTINGS_TAG), ours)
    compared_on = "; both measured on " + ", ".join(f"{k} {v}" for k, v in ours.items())
    rule = f"(mode {settings.mode}, min_delta {settings.min_delta})"
    if not differ:
        old = version_metric(client, name, champion.version, settings.metric)
        how = ""
    elif reevaluate is None:
        reason = (
            f"not comparable with champion v{champion.version}: it was evaluated under other settings "
            f"({describe(differ)}) and cannot be re-evaluated here; run `adaptflow promote` where this version's "
            "data and config are at hand"
        )
        return False, reason
    else:
        old = reevaluate(champion)
        how = f" re-evaluated under this version's evaluation settings ({', '.join(differ)} differed)"
    promoted = old is None or not math.isfinite(old) or beats(new, old, settings)
    better = "beats" if promoted else "does not beat"
    return (
        promoted,
        f"{settings.metric} {new:.6g} {better} champion v{champion.version}'s {old}{how} {rule}{compared_on}",
    )


def _settled(client: MlflowClient, name: str, version: str) -> None:
    """The decision is written: the version no longer waits for one."""
    with contextlib.suppress(MlflowException):  # versions registered before the tag existed
        client.delete_model_version_tag(name, version, PENDING)


def gate_tags(gate: dict[str, Any]) -> dict[str, str]:
    """The bias gate's verdict as version tags, recorded at registration so a later decision can honour it."""
    tags = {"bias_gate": "passed" if gate["passed"] else "failed"}
    if not gate["passed"]:
        tags["bias_gate_reason"] = gate["reason"][:5000]
    return tags


def recorded_gate(version: ModelVersion) -> dict[str, Any] | None:
    """The gate verdict recorded with a version (None for versions registered without one)."""
    verdict = version.tags.get("bias_gate")
    if verdict is None:
        return None
    return {"passed": verdict == "passed", "reason": version.tags.get("bias_gate_reason", "")}


def champion_reevaluator(config: RunConfig, data: DataRef) -> Reevaluate:
    """Scores a registered version on `data`'s eval split with the configured promotion metric."""
    cache_dir = Path(config.train.output_dir).resolve() / ".cache" / "tokenized"

    def score(version: ModelVersion) -> float | None:
        uri = f"models:/{version.name}/{version.version}"
        try:
            metrics = evaluate_registered(
                uri, data, config.task, config.data.max_length, cache_dir, options=config.task_options()
            )
        except ValueError as exc:  # e.g. other label names: no comparable score, the new version wins
            logging.getLogger(__name__).warning("cannot re-evaluate %s: %s", uri, exc)
            return None
        return metrics.get(config.registry.promote.metric)

    return score
