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
