"""Saving and loading just the trained weights of a model (a head, bottleneck adapters) as safetensors + JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

WEIGHTS_FILE = "weights.safetensors"
CONFIG_FILE = "adaptflow_adapter.json"
# The layers that map hidden states to labels, by the names transformers gives them.
HEAD_NAMES = ("score", "classifier")


def output_head(model: nn.Module) -> nn.Module:
    """The classification head of a sequence classifier (`score` for decoder models)."""
    for name in HEAD_NAMES:
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            return head
    raise ValueError(f"{type(model).__name__} has no classification head ({' or '.join(HEAD_NAMES)})")


def is_classifier(model: nn.Module) -> bool:
    """Whether the model ends in a classification head (a sequence classifier), not a vocabulary head."""
    return any(isinstance(getattr(model, name, None), nn.Module) for name in HEAD_NAMES)


def freeze_all_but(model: nn.Module, trainable: list[nn.Module]) -> None:
    """Freeze every parameter, then unfreeze those of `trainable`."""
    model.requires_grad_(False)
    for module in trainable:
        module.requires_grad_(True)


def save_trainable(model: nn.Module, directory: Path, config: dict[str, Any]) -> None:
    """The trainable parameters, by their names in the model, plus a JSON description."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(tensors, str(directory / WEIGHTS_FILE))
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))


def read_config(directory: Path) -> dict[str, Any]:
    return dict(json.loads((directory / CONFIG_FILE).read_text()))


def load_trained(model: nn.Module, directory: Path) -> None:
    """Load saved weights into a model that has the same modules; every saved tensor must find its place."""
    tensors = load_file(str(directory / WEIGHTS_FILE))
    missing_places = set(tensors) - {n for n, _ in model.named_parameters()}
    if missing_places:
        raise ValueError(f"{directory}: weights for modules this model lacks: {sorted(missing_places)[:5]}")
    model.load_state_dict(tensors, strict=False)
