"""A frozen base with a trained classification head, pooled on the last non-padding token."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

from torch import nn

from adapters_impl._weights import freeze_all_but, load_trained, output_head, save_trainable
from adapters_impl.base import ApplyContext, Method, MethodSettings


class HeadSettings(MethodSettings):
    name: Literal["head"] = "head"


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


METHOD = Method(
    name="head",
    summary="Frozen base + a trained classification head (linear probe); classification only",
    settings=HeadSettings,
    apply=apply,
    save=save,
    load=load,
    merge=merge,
    unsupported={
        "causal_lm": "a frozen base with a new head only classifies; to generate text use lora, full or another method",
    },
)
