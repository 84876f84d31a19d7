"""Full fine-tuning: every weight trains; the saved "adapter" is the whole model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import PreTrainedModel

from adapters_impl.base import ApplyContext, Method, MethodSettings


class FullSettings(MethodSettings):
    name: Literal["full"] = "full"


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


METHOD = Method(
    name="full",
    summary="Full fine-tuning: every weight trains; most memory, the reference for quality",
    settings=FullSettings,
    apply=apply,
    save=save,
    load=load,
    merge=merge,
    whole_model=True,
    trains_new_tokens=True,
    fsdp=True,
    lighter=({"train.optim": "paged_adamw_8bit"}, {"method.name": "lora"}, {"method.name": "qlora"}),
)
