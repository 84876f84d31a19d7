"""A registered model's package, loaded: the base (or merged) weights, the tokenizer and the method's weights.

The one loader for a package folder (`adaptflow.json` + weights + tokenizer [+ adapter]): the MLflow pyfunc
(`tasks/pyfunc_model.py`) serves through it, and evaluation and the probe read registered models through it.
It lives here because a package is loaded where adaptflow may not be installed: MLflow ships this folder with
every model (`code_paths`), and nothing here imports the pipeline (`tasks/`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapters_impl.model_heads import ModelHead, head_of_package

INFO_FILE = "adaptflow.json"
# Weight files that are pickles: loading one can run code (torch's restricted loader is the only guard).
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


# Server-side bounds on one served generation, whatever a request asks (the pyfunc behind `mlflow models serve` and
# `adaptflow serve-model` both read them): a request for a billion tokens would otherwise run on for hours.
# Operators raise them with these variables.
MAX_TOKENS_VARIABLE, MAX_SECONDS_VARIABLE = "ADAPTFLOW_SERVE_MAX_TOKENS", "ADAPTFLOW_SERVE_MAX_SECONDS"
DEFAULT_MAX_TOKENS, DEFAULT_MAX_SECONDS = 1024, 120.0


def serving_limits() -> tuple[int, float]:
    """(most new tokens, most seconds) one served generation may take: the environment's or the defaults."""
    return (
        int(os.environ.get(MAX_TOKENS_VARIABLE, DEFAULT_MAX_TOKENS)),
        float(os.environ.get(MAX_SECONDS_VARIABLE, DEFAULT_MAX_SECONDS)),
    )


class BaseUnavailable(RuntimeError):
    """A version's pinned base model cannot be resolved (a deleted folder or run, a missing hub revision)."""


def cache_home() -> Path:
    """Where adaptflow keeps what it builds or downloads once (the builtin model, pinned bases): ADAPTFLOW_CACHE or
    ~/.cache/adaptflow."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "adaptflow"
    return Path(os.environ.get("ADAPTFLOW_CACHE", default))


def model_files(folder: Path) -> list[Path]:
    """The files of a model folder that make up the model: all but hidden files, and pickle weights when safetensors
    weights are there too (the loaders never read both)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.relative_to(folder).as_posix().startswith("."))
    if any(p.suffix == ".safetensors" for p in files):
        files = [p for p in files if not any(p.match(pattern) for pattern in PICKLE_WEIGHTS)]
    return files


def folder_fingerprint(folder: Path) -> str:
    """A content hash of a model folder's files (names and bytes), remembered per folder state (file sizes and
    modification times) so a large base is read once, not once per version."""
    files = model_files(folder)
    state = "|".join(f"{p.relative_to(folder).as_posix()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    memo = cache_home() / "fingerprints" / hashlib.sha256(f"{folder.resolve()}|{state}".encode()).hexdigest()
    if memo.exists():
        return memo.read_text().strip()
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 24):
                digest.update(chunk)
    fingerprint = digest.hexdigest()[:32]
    memo.parent.mkdir(parents=True, exist_ok=True)
    memo.write_text(fingerprint)
    return fingerprint


def describe_base(pin: dict[str, Any]) -> str:
    """How a version's base was pinned, in words for error messages."""
    if pin["kind"] == "hub":
        return f"base model {pin['name']!r} (hub id, pinned to revision {pin.get('revision')})"
    return (
        f"base model {pin['logged_from']!r} (local folder, stored once in the tracking store as run {pin['run_id']} "
        f"artifact '{pin['path']}', fingerprint {pin['fingerprint']})"
    )


def resolve_base(pin: dict[str, Any]) -> tuple[str, str | None]:
    """(where to load the pinned base from, revision): a hub id at its commit, or a local folder holding the base
    logged in the tracking store — the folder it was logged from when it still has the same content, else the
    download cached under the fingerprint.

    Raises:
        BaseUnavailable: the base's run or artifacts are gone from the tracking store.
    """
    if pin["kind"] == "hub":
        return str(pin["name"]), pin.get("revision")
    fingerprint = str(pin["fingerprint"])
    origin = Path(str(pin.get("local_path", "")))
    if origin.is_dir() and (origin / "config.json").exists() and folder_fingerprint(origin) == fingerprint:
        return str(origin), None
    cached = cache_home() / "bases" / fingerprint
    if (cached / "config.json").exists():
        check_fingerprint(cached, pin, "the cached copy")
    else:
        import mlflow

        cached.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{fingerprint}-", dir=cached.parent))
        try:
            run = mlflow.tracking.MlflowClient().get_run(str(pin["run_id"]))
            if run.info.lifecycle_stage == "deleted":
                raise BaseUnavailable(f"{describe_base(pin)}: that run was deleted")
            local = mlflow.artifacts.download_artifacts(
                run_id=str(pin["run_id"]), artifact_path=str(pin["path"]), dst_path=str(staging)
            )
            if not (Path(local) / "config.json").exists():
                raise BaseUnavailable(f"{describe_base(pin)}: the artifact holds no config.json")
            check_fingerprint(Path(local), pin, "the tracking store's copy")
            os.replace(local, cached)  # whole or not at all: a concurrent loader finds a complete folder
        except BaseUnavailable:
            raise
        except Exception as exc:
            if (cached / "config.json").exists():  # another process finished the same download first
                return str(cached), None
            raise BaseUnavailable(
                f"{describe_base(pin)} cannot be downloaded: {str(exc).splitlines()[0][:300]}"
            ) from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return str(cached), None


def check_fingerprint(folder: Path, pin: dict[str, Any], what: str) -> None:
    """A stored base is the one the version was trained on, byte for byte: a modified or truncated copy would load
    and answer garbage.

    Raises:
        BaseUnavailable: naming the base, the folder, the expected and found fingerprints, and the fix.
    """
    found = folder_fingerprint(folder)
    if found != pin["fingerprint"]:
        raise BaseUnavailable(
            f"{what} of the base at {folder} has other content than the version was trained on (fingerprint "
            f"{found}, expected {pin['fingerprint']}): it was modified or truncated. Remove the folder {folder} "
            f"(it is downloaded again from the tracking store); if the store's copy changed, register the version "
            f"again from the original base. The base: {describe_base(pin)}"
        )


def with_pad_token(tokenizer: Any) -> Any:
    """The tokenizer with a pad token (eos, else unk) when it has none: batching needs one."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def fit_embeddings(model: Any, tokenizer: Any) -> None:
    """Grow the model's token embeddings (and output layer) to the tokenizer's size when a chat template added
    tokens to it (chatml's); never shrinks, so it is a no-op on a model that already fits. New rows are drawn
    around the old rows' mean (transformers' mean resizing) so they do not dominate the softmax; the method's
    trained rows replace them when an adapter loads."""
    if len(tokenizer) > int(model.get_input_embeddings().weight.shape[0]):
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)


def tokenize_with_one_bos(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and character offsets of a rendered chat `text`, with exactly the one BOS the tokenizer's convention
    wants: the same encoding for training rows (tasks/instruction.py) and served prompts (the pyfunc).

    Tokenized without special tokens (a template that writes BOS as text already has it; some tokenizers would
    also append an EOS the template did not write), then BOS prepended when the tokenizer adds one and the text
    lacks it; repeated leading BOS collapse to one.
    """
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]
    bos = tokenizer.bos_token_id
    if bos is not None:
        while len(ids) > 1 and ids[0] == bos and ids[1] == bos:
            del ids[0], offsets[0]
        adds_bos = tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]
        if ids[:1] != [bos] and adds_bos:
            ids, offsets = [bos, *ids], [(0, 0), *offsets]
    return ids, offsets


def chat_prompt_ids(tokenizer: Any, chat: dict[str, Any], messages: list[dict[str, str]]) -> list[int]:
    """The ids that ask an instruction model to answer `messages`: the package's chat template (`chat["source"]`,
    the one training rendered its rows with) with the generation prompt, encoded as training encodes (one BOS).
    A trailing assistant turn is dropped: the model writes that turn. One function for `predict` (the pyfunc) and
    the OpenAI endpoint, so both ask the same question."""
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    text = tokenizer.apply_chat_template(
        messages, chat_template=chat["source"], tokenize=False, add_generation_prompt=True
    )
    return tokenize_with_one_bos(tokenizer, text)[0]


def stop_ids(tokenizer: Any, end_of_turn: str) -> list[int]:
    """Ids that end a generated response: the template's end-of-turn token (when it is one token) and EOS."""
    eot = tokenizer(end_of_turn, add_special_tokens=False)["input_ids"]
    ids = eot[:1] if len(eot) == 1 else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return list(ids)


def response_only(text: str, end_of_turn: str, eos_token: str | None) -> str:
    """A generated continuation (decoded with special tokens kept) cut at the first end of turn or EOS."""
    for stop in (end_of_turn, eos_token):
        if stop:
            text = text.split(stop, 1)[0]
    return text.strip()


@dataclass
class PackagedModel:
    """A loaded package: the model in eval mode, its tokenizer, and the package's `adaptflow.json`."""

    folder: Path
    info: dict[str, Any]
    model: nn.Module
    tokenizer: Any

    @property
    def task(self) -> str:
        return str(self.info["task"])

    @property
    def head(self) -> ModelHead:
        return head_of_package(self.info)

    @property
    def label_names(self) -> list[str] | None:
        return self.info.get("label_names")

    @property
    def serving(self) -> dict[str, Any]:
        """What the registering run recorded for serving beyond the weights (an instruction model's template)."""
        return {"chat": self.info["chat"]} if self.info.get("chat") else {}

    @property
    def tokenizer_dir(self) -> Path:
        return self.folder / self.info["tokenizer"]


def load_packaged(folder: str | Path) -> PackagedModel:
    """Load a package folder: its merged or whole-model weights when it has them, else the pinned base (resolved
    and cached, see `resolve_base`) with the method's weights on top, merged in memory when the method merges;
    safetensors only unless the registering run allowed pickles; and the tokenizer.

    Raises:
        BaseUnavailable: the pinned base cannot be resolved (the message names it and how it was pinned).
    """
    from transformers import AutoTokenizer

    from adapters_impl import get_method

    folder = Path(folder)
    info = json.loads((folder / INFO_FILE).read_text())
    tokenizer = with_pad_token(AutoTokenizer.from_pretrained(folder / info["tokenizer"]))
    head = head_of_package(info)  # recorded by the registry: this runs where only adapters_impl is installed
    auto = head.auto_class()
    safetensors_only = None if info.get("allow_pickle") else True  # model.allow_pickle of the registering run
    weights = info.get("merged") or info.get("weights")
    if weights:  # one folder holds the whole model
        model = auto.from_pretrained(folder / weights, dtype=torch.float32, use_safetensors=safetensors_only)
        return PackagedModel(folder=folder, info=info, model=model.eval(), tokenizer=tokenizer)
    pin = info["base"]
    where, revision = resolve_base(pin)
    # A classifier's base gets the head shape training gave it (one output per label, named).
    options = head.options(info.get("label_names"))
    try:
        model = auto.from_pretrained(
            where, revision=revision, dtype=torch.float32, use_safetensors=safetensors_only, **options
        )
    except (OSError, ValueError) as exc:
        raise BaseUnavailable(f"{describe_base(pin)} cannot be loaded: {str(exc).splitlines()[0][:300]}") from None
    if model.config.pad_token_id is None:  # as in training: classifiers pool the last token that is not padding
        model.config.pad_token_id = tokenizer.pad_token_id
    fit_embeddings(model, tokenizer)  # the packaged tokenizer holds the template's added tokens, the base does not
    method = get_method(info["method"])
    model = method.load(model, folder / info["adapter"], False)
    if method.mergeable and hasattr(model, "merge_and_unload"):  # peft LoRA-family: plain layers serve faster
        model = model.merge_and_unload()  # type: ignore[operator]
    return PackagedModel(folder=folder, info=info, model=model.eval(), tokenizer=tokenizer)


def download_registered(model_uri: str) -> PackagedModel:
    """A `models:/` or `runs:/` URI's package, downloaded from the tracking store and loaded (no pyfunc)."""
    import mlflow
    from mlflow.models import Model

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    # Where the pyfunc keeps its "model" artifact, as its MLmodel file records it.
    artifacts = Model.load(str(local)).flavors["python_function"]["artifacts"]
    return load_packaged(local / artifacts["model"]["path"])
