"""What the head method does to a model (a trained classification head on a frozen base); its settings and rules
are in head.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

from adapters_impl._weights import freeze_all_but, load_trained, output_head, save_trainable
from adapters_impl.base import ApplyContext
from adapters_impl.head import HeadSettings


def apply(model: nn.Module, settings: HeadSettings, context: ApplyContext) -> nn.Module:
    """Only the head trains. HF decoder classifiers pool the last token that is not padding (either side)."""
    freeze_all_but(model, [output_head(model)])
    return model


def save(model: nn.Module, directory: Path) -> None:
    save_trainable(model, directory, {"method": "head"})


def load(base: nn.Module, directory: Path, trainable: bool) -> nn.Module:
    load_trained(base, directory)
    freeze_all_but(base, [output_head(base)] if trainable else [])
    return base


def merge(model: nn.Module, full_precision_base: Callable[[], nn.Module]) -> nn.Module:
    return model  # the base with its head is already a plain classifier
