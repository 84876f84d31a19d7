"""Promote: the champion/challenger decision for a registered version."""

from __future__ import annotations

import math

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from pydantic import BaseModel

from tasks.config import PromoteSettings

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


def promote_version(client: MlflowClient, name: str, version: str, settings: PromoteSettings) -> Decision:
    """Move `@champion` to this version when it beats the current champion; else alias it `@challenger`."""
    new = version_metric(client, name, version, settings.metric)
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        champion = None
    if new is None or not math.isfinite(new):
        reason = f"version {version} has no finite '{settings.metric}'"
        promoted = False
    elif champion is None:
        reason = "no champion yet"
        promoted = True
    elif champion.version == str(version):
        reason = "already the champion"
        promoted = True
    else:
        old = version_metric(client, name, champion.version, settings.metric)
        promoted = old is None or not math.isfinite(old) or beats(new, old, settings)
        better = "beats" if promoted else "does not beat"
        reason = f"{settings.metric} {new:.6g} {better} champion v{champion.version}'s {old} (mode {settings.mode}, min_delta {settings.min_delta})"
    alias = CHAMPION if promoted else CHALLENGER
    client.set_registered_model_alias(name, alias, str(version))
    client.set_model_version_tag(name, str(version), "promotion", reason)
    return Decision(
        name=name,
        version=str(version),
        alias=alias,
        promoted=promoted,
        champion_version=str(version) if promoted else str(champion.version if champion else ""),
        reason=reason,
    )
