"""What full fine-tuning does to a model; its settings and rules are in full.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from adapters_impl.base import ApplyContext
from adapters_impl.full import FullSettings


def apply(model: nn.Module, settings: FullSettings, context: ApplyContext) -> nn.Module:
    model.requires_grad_(True)
    return model


def save(model: nn.Module, directory: Path) -> None:
    assert isinstance(model, PreTrainedModel)
    model.save_pretrained(str(directory), safe_serialization=True)


def load(base: nn.Module, directory: Path, trainable: bool) -> nn.Module:
    """The saved model replaces the base entirely (same class, its own weights, from safetensors only)."""
    model = type(base).from_pretrained(str(directory), dtype=torch.float32, use_safetensors=True)  # type: ignore[attr-defined]
    model.requires_grad_(trainable)
    return model  # type: ignore[no-any-return]


def merge(model: nn.Module, full_precision_base: Callable[[], nn.Module]) -> nn.Module:
    return model  # already a plain model
