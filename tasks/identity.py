"""Identity: what a run's result depends on beyond its config, by content — its data, its base's weights, the files
its objective's settings name — and the settings its evaluation ran under.

Re-registration, `--resume` and promotion compare these, never paths: a file replaced at the same path is a change.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from adapters_impl.packaged import folder_fingerprint
from tasks.config import RunConfig
from tasks.load import DataRef
from tasks.modeling import ModelSource
from tasks.objectives import get_objective

# Version tags: the identity (config key -> content fingerprint) and the evaluation settings, as JSON.
IDENTITY_TAG = "identity"
EVAL_SETTINGS_TAG = "eval_settings"


def base_fingerprint(source: ModelSource) -> str:
    """A local base by the content of its files (remembered per folder state); a hub base by its resolved commit."""
    folder = Path(source.name_or_path)
    if folder.is_dir():
        return folder_fingerprint(folder)
    return f"{source.name_or_path}@{source.commit_hash or source.revision or 'default'}"


def run_identity(config: RunConfig, data: DataRef, source: ModelSource) -> dict[str, str]:
    """Config key -> content fingerprint of everything a run reads that its config names by path."""
    identity = {"data": data.fingerprint, "model.name_or_path": base_fingerprint(source)}
    if source.parent:  # started from a registered version: which one, pinned, and its content
        identity["model.parent"] = f"{source.parent['pinned_uri']}@{source.parent['fingerprint']}"
    return identity | get_objective(config.task).files(config)


def eval_settings(config: RunConfig, data: DataRef) -> dict[str, Any]:
    """What decides what an evaluation measures: the eval split (the data's fingerprint covers it), the length rows
    are cut or dropped at, and the objective's settings (an instruction run's loss_on, template and generations)."""
    options = {f"{config.task}.{key}": value for key, value in sorted(config.task_options().items())}
    return {"data": data.fingerprint, "data.max_length": config.data.max_length, **options}


def recorded(tags: dict[str, str], tag: str) -> dict[str, Any]:
    """A JSON tag as a dict; versions registered before the tag existed record only their data's fingerprint."""
    text = tags.get(tag)
    if text:
        return dict(json.loads(text))
    return {"data": tags["data_fingerprint"]} if "data_fingerprint" in tags else {}


def differences(before: dict[str, Any], after: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Key -> (before, after) for every key whose value differs (a key one side lacks differs)."""
    keys = sorted(before.keys() | after.keys())
    return {key: (before.get(key), after.get(key)) for key in keys if before.get(key) != after.get(key)}


def describe(changes: dict[str, tuple[Any, Any]]) -> str:
    """`key (old -> new)`, comma separated, values shortened."""

    def short(value: Any) -> str:
        text = "absent" if value is None else str(value)
        return text if len(text) <= 40 else text[:37] + "..."

    return ", ".join(f"{key} ({short(old)} -> {short(new)})" for key, (old, new) in changes.items())
