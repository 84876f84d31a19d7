"""DoRA: LoRA on the direction of each weight plus a trained magnitude vector (peft `use_dora`)."""

from __future__ import annotations

from typing import Literal

from peft import get_peft_model
from torch import nn

from adapters_impl._peft import load_peft, merge_peft, save_peft
from adapters_impl.base import ApplyContext, Method
from adapters_impl.lora import LowRankSettings, lora_config


class DoraSettings(LowRankSettings):
    name: Literal["dora"] = "dora"


def apply(model: nn.Module, settings: DoraSettings, context: ApplyContext) -> nn.Module:
    """LoRA with weight decomposition: magnitude and direction are learned separately."""
    return get_peft_model(model, lora_config(settings, model, context, use_dora=True))  # type: ignore[arg-type]


METHOD = Method(
    name="dora",
    summary="DoRA: weight-decomposed LoRA (magnitude + low-rank direction); merges exactly",
    settings=DoraSettings,
    apply=apply,
    save=save_peft,
    load=load_peft,
    merge=merge_peft,
    trains_new_tokens=True,
    lora_weights="dora",
    lighter=({"method.name": "qlora"},),
)
