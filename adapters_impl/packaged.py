"""A registered model's package, loaded: the base (or merged) weights, the tokenizer and the method's weights.

The one loader for a package folder (`adaptflow.json` + weights + tokenizer [+ adapter]): the MLflow pyfunc
(`tasks/pyfunc_model.py`) serves through it, and evaluation and the probe read registered models through it.
It lives here because a package is loaded where adaptflow may not be installed: MLflow ships this folder with
every model (`code_paths`), and nothing here imports the pipeline (`tasks/`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

INFO_FILE = "adaptflow.json"


def with_pad_token(tokenizer: Any) -> Any:
    """The tokenizer with a pad token (eos, else unk) when it has none: batching needs one."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


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
    def label_names(self) -> list[str] | None:
        return self.info.get("label_names")

    @property
    def tokenizer_dir(self) -> Path:
        return self.folder / self.info["tokenizer"]


def load_packaged(folder: str | Path) -> PackagedModel:
    """Load a package folder: weights (safetensors only unless the registering run allowed pickles), tokenizer,
    and the method's adapter on top for adapter-only versions."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    folder = Path(folder)
    info = json.loads((folder / INFO_FILE).read_text())
    tokenizer = with_pad_token(AutoTokenizer.from_pretrained(folder / info["tokenizer"]))
    # The one objective branch left here: this runs where only adapters_impl is installed, so it cannot ask the
    # objective registry (tasks/objectives); every objective but classification trains a causal LM.
    auto = AutoModelForSequenceClassification if info["task"] == "classification" else AutoModelForCausalLM
    safetensors_only = None if info.get("allow_pickle") else True  # model.allow_pickle of the registering run
    model = auto.from_pretrained(folder / info["weights"], dtype=torch.float32, use_safetensors=safetensors_only)
    if info.get("adapter"):
        from adapters_impl import get_method

        model = get_method(info["method"]).load(model, folder / info["adapter"], False)
    return PackagedModel(folder=folder, info=info, model=model.eval(), tokenizer=tokenizer)


def download_registered(model_uri: str) -> PackagedModel:
    """A `models:/` or `runs:/` URI's package, downloaded from the tracking store and loaded (no pyfunc)."""
    import mlflow
    from mlflow.models import Model

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    # Where the pyfunc keeps its "model" artifact, as its MLmodel file records it.
    artifacts = Model.load(str(local)).flavors["python_function"]["artifacts"]
    return load_packaged(local / artifacts["model"]["path"])
