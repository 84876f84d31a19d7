"""A registered model as the base of a new run: `model.name_or_path: models:/NAME@ALIAS` or `models:/NAME/VERSION`
(e.g. an SFT champion that a DPO challenger starts from).

The version is resolved once per run (an alias is pinned to its version number for the whole process tree, and a
resumed run is pinned to the version it started on), then made into a plain model folder: the version's pinned base
with its adapter merged in (peft `merge_and_unload`, in fp32), or its whole weights, plus its tokenizer carrying the
chat template the version was trained with. The new run applies its own method on that folder like on any local
base. Merging rather than stacking a second adapter keeps every method working unchanged (a new LoRA, DoRA, IA3,
prefix... on a plain model), makes the preference reference "the policy with its adapter disabled" exactly the
parent model, as TRL's DPOTrainer does when it starts from an adapter, and lets the registry pin the folder like any
local base (logged once, by fingerprint), so the new version loads on its own.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from adapters_impl.packaged import cache_home, folder_fingerprint
from tasks.errors import UserInputError
from tasks.load import publish
from tasks.settings import REGISTERED_FORMS, parse_registered

KEY = "model.name_or_path"
# Alias URI -> the version it was resolved to, for this process and the ones it starts (training workers): one
# version per run even when the alias moves while it runs (each run starts with `unpin`, or a resumed run's `pin`).
PINNED_VARIABLE = "ADAPTFLOW_PINNED_PARENTS"
PARENT_FILE = ".adaptflow-parent.json"  # hidden: not part of the model folder's files or fingerprint


@dataclass(frozen=True)
class Parent:
    """A registered version, resolved: what it is and where its merged model folder is."""

    uri: str  # as the config gives it
    name: str
    version: str
    run_id: str
    experiment_id: str
    task: str
    method: str
    fingerprint: str  # the content of the version's package (adapter, tokenizer, pinned base)
    chat: bool  # it carries a chat template (its objective's, or its tokenizer's own)
    folder: str

    @property
    def pinned_uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    def tags(self) -> dict[str, str]:
        """The lineage a run started from it records, on the run and on its version."""
        return {
            "parent_model_uri": self.pinned_uri,
            "parent_run_id": self.run_id,
            "parent_model_fingerprint": self.fingerprint,
        }


def pinned() -> dict[str, str]:
    return dict(json.loads(os.environ.get(PINNED_VARIABLE, "{}")))


def pin(uri: str, version: str) -> None:
    """Resolve `uri` (an alias) to `version` from now on, in this process and those it starts."""
    os.environ[PINNED_VARIABLE] = json.dumps(pinned() | {uri: version}, sort_keys=True)


def unpin(uri: str) -> None:
    """Forget `uri`'s pin: a new run in a long-lived process (a served deployment) reads the alias anew."""
    os.environ[PINNED_VARIABLE] = json.dumps({k: v for k, v in pinned().items() if k != uri}, sort_keys=True)


def _known(client: Any, name: str) -> str:
    """What exists, for an error message: the registered names, or this name's aliases and versions."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException:
        names = sorted(m.name for m in client.search_registered_models(max_results=50))
        return f"no registered model named {name!r}; registered: {', '.join(names) or 'none'}"
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
    aliases = ", ".join(f"@{a} (version {v})" for a, v in sorted(dict(model.aliases or {}).items()))
    return f"{name} has versions {', '.join(map(str, versions)) or 'none'} and aliases {aliases or 'none'}"


def resolve_version(uri: str) -> Any:
    """The registered version `uri` names (an alias read once per run and pinned: `pin`, `flows.pipeline.pin_parent`).

    Raises:
        UserInputError: no such model, alias or version, naming model.name_or_path and what exists.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        name, alias, version = parse_registered(uri)
    except ValueError:
        raise UserInputError(f"{KEY}: expected {REGISTERED_FORMS}, got {uri!r}") from None
    client = MlflowClient()
    if alias is not None and uri in pinned():
        alias, version = None, pinned()[uri]
    try:
        found = (
            client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, str(version))
        )
    except MlflowException:
        what = f"alias @{alias}" if alias else f"version {version}"
        raise UserInputError(f"{KEY}: {uri}: no {what}; {_known(client, name)}") from None
    if alias is not None:
        pin(uri, str(found.version))
    return found


def registered_parent(uri: str) -> Parent:
    """The version `uri` names, made into a model folder once (cached under its run id and version).

    Raises:
        UserInputError: no such version, or one that cannot be a base (a classifier; an adapter that cannot be
            merged into its base and was not registered merged).
    """
    from mlflow.tracking import MlflowClient

    version = resolve_version(uri)
    name, number, run_id = str(version.name), str(version.version), str(version.run_id)
    folder = cache_home() / "parents" / f"{run_id}-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}-v{number}"
    if not (folder / PARENT_FILE).exists():
        publish(folder, lambda staging: _merge_parent(f"models:/{name}/{number}", staging))
    recorded = json.loads((folder / PARENT_FILE).read_text())
    experiment = MlflowClient().get_run(run_id).info.experiment_id
    return Parent(uri=uri, name=name, version=number, run_id=run_id, experiment_id=str(experiment), **recorded,
                  folder=str(folder))  # fmt: skip


def _merge_parent(pinned_uri: str, target: Path) -> None:
    """Write the version's model, its adapter merged into its base, with its tokenizer and chat template, and what
    it is (`PARENT_FILE`) into `target`."""
    import mlflow
    from mlflow.models import Model

    from adapters_impl import get_method
    from adapters_impl.packaged import head_of_package, load_packaged

    with tempfile.TemporaryDirectory(prefix="adaptflow-parent-") as download:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=pinned_uri, dst_path=download))
        artifacts = Model.load(str(local)).flavors["python_function"]["artifacts"]
        package = local / artifacts["model"]["path"]
        info = json.loads((package / "adaptflow.json").read_text())
        head = head_of_package(info)
        if head.output != "text":
            raise UserInputError(
                f"{KEY}: {pinned_uri} is a {info['task']} model (it answers a {head.output}); only a model that "
                "generates text can be the base of a new run"
            )
        method = get_method(str(info["method"]))
        if not (info.get("merged") or info.get("weights") or method.mergeable):
            raise UserInputError(
                f"{KEY}: {pinned_uri} was trained with method {method.name}, whose weights cannot be merged into "
                "its base, so it cannot be the base of a new run; start from a version of a mergeable method "
                "(lora, dora, qlora, ia3, full) or one registered with registry.merged: true"
            )
        packaged = load_packaged(package)  # merged in memory by the method (load_packaged), fp32
        tokenizer = packaged.tokenizer
        chat = info.get("chat")
        if chat:  # the template the parent was trained and is served with: the new run's `template: tokenizer`
            tokenizer.chat_template = chat["source"]
        packaged.model.save_pretrained(str(target), safe_serialization=True)  # type: ignore[operator]
        tokenizer.save_pretrained(str(target))
        record = {
            "task": str(info["task"]),
            "method": method.name,
            "fingerprint": folder_fingerprint(package),
            "chat": bool(chat) or isinstance(getattr(tokenizer, "chat_template", None), str),
        }
        (target / PARENT_FILE).write_text(json.dumps(record, indent=2))
        shutil.rmtree(local, ignore_errors=True)


def parent_record(parent: Parent) -> dict[str, str]:
    """The parent as strings (for a model source)."""
    return {key: str(value) for key, value in asdict(parent).items()} | {"pinned_uri": parent.pinned_uri}


def parent_of(source: Any) -> Parent | None:
    """The registered version a model source is (None for other bases)."""
    record = dict(getattr(source, "parent", None) or {})
    if not record:
        return None
    record.pop("pinned_uri", None)
    return Parent(**{**record, "chat": record["chat"] == "True"})


def check_parent(parent: Parent, task: str, template: str | None, section: str | None) -> list[str]:
    """A chat objective (its section's `template`) on a parent without a chat template, left to `tokenizer`, is
    named: the new run would quietly render its rows with another template than the parent answers in."""
    if template != "tokenizer" or parent.chat:
        return []
    return [
        f"{KEY}: {parent.pinned_uri} is a {parent.task} model without a chat template, and task {task} renders "
        f"conversations with one ({section}.template: tokenizer); set {section}.template to plain, chatml or a "
        ".jinja file, or start from a chat model's version"
    ]
